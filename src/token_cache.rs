//! `TokenCache`: tokens whose signature already checked out, so that a token seen again skips parsing
//! and RS256 verification. It caches the verification, never the authorization: `authorize` (time,
//! audience, app-only, allowlist, role, route, impersonation) runs on every decision.
//!
//! - Keyed by the SHA-256 of the whole token (the full 32 bytes): a different token never matches.
//! - Only a successful `verify` is ever inserted; a failure is never cached.
//! - Bounded in entries (S3-FIFO, from `quick_cache`): a flood of unique tokens cannot grow memory and,
//!   because new keys enter a small probation queue, cannot push the hot tokens out either.
//! - An entry is never served after `exp` + clock skew.
//! - An entry stands in for a verification only while the key that verified it is still published, with
//!   the same key material, in the issuer's current usable key set, and the issuer is still trusted:
//!   `CachedToken::revalidate` checks this on every hit, so a key removed from the JWKS evicts what it
//!   verified at the next use after the key cache refreshes.
//! - Small: an entry is the core's compact `VerifiedToken` (lifetime inline; issuer, key and the
//!   application's claims behind shared `Arc`s), and the application's claims are interned, so the
//!   tokens of one application share one copy. About 0.2 KB per entry, where the full claims took 4.6 KB.

use crate::core::DecisionSettings;
use crate::core::claims::AppClaims;
use crate::core::decision::VerifiedToken;
use crate::core::keys::{KeySet, VerifyingKey};
use crate::core::trust::TrustSnapshot;
use jsonwebtoken::DecodingKeyKind;
use quick_cache::sync::Cache;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// SHA-256 of a token (without its `Bearer ` prefix): the cache key, and the source of the audit log's
/// short token hash.
pub type TokenDigest = [u8; 32];

/// The SHA-256 of `token`, which must already be stripped of any `Bearer ` prefix.
pub fn digest(token: &str) -> TokenDigest {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// One verified token: its compact claims, its issuer, and the algorithm and key that verified it.
#[derive(Debug)]
pub struct CachedToken {
    pub verified: VerifiedToken,
}

/// What a cache hit may be used for right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Revalidation {
    /// The entry stands in for `precheck` + `verify`; go straight to `authorize`.
    Valid,
    /// The entry no longer proves anything (issuer untrusted or changed, key gone or replaced, no
    /// usable key set): drop it and take the full path.
    Stale,
    /// The entry is sound but the current settings reject what it verified (e.g. its algorithm is no
    /// longer allowed): take the full path, which reports the reason, and keep the entry.
    Bypass,
}

impl CachedToken {
    pub fn new(verified: VerifiedToken) -> Self {
        CachedToken { verified }
    }

    /// Whether this entry may replace `precheck`'s token checks and `verify` now, given the current
    /// trusted issuers, the current usable key set of the entry's `jwks_uri` (`None` when there is none)
    /// and the current decision settings.
    pub fn revalidate(
        &self,
        trust: &TrustSnapshot,
        keys: Option<&KeySet>,
        settings: &DecisionSettings,
    ) -> Revalidation {
        let verified = &self.verified;
        let cached = &verified.issuer;
        let Some(issuer) = trust.issuer(&cached.issuer) else {
            return Revalidation::Stale;
        };
        // Rediscovery republishes equal issuers under new `Arc`s; anything else changed is a new issuer.
        if !Arc::ptr_eq(issuer, cached) && **issuer != **cached {
            return Revalidation::Stale;
        }
        if !crate::core::decision::algorithm_allowed(settings, &issuer.profile, verified.alg) {
            return Revalidation::Bypass;
        }
        let Some(keys) = keys else {
            return Revalidation::Stale;
        };
        // The key that verified the token was found under the token's `kid`, so its `kid` is the token's.
        match keys.find(verified.kid()) {
            Some(key)
                if (Arc::ptr_eq(key, &verified.key) || same_key(key, &verified.key))
                    && key.accepts(verified.alg) =>
            {
                Revalidation::Valid
            }
            _ => Revalidation::Stale,
        }
    }

    /// The last second (Unix time) at which this entry may be served: `exp` plus the clock skew, the
    /// same bound `authorize` applies.
    pub fn served_until(&self, skew_secs: i64) -> i64 {
        self.verified.claims.exp.saturating_add(skew_secs)
    }
}

/// Same public key material, family and pinned algorithm. A refreshed JWKS parses into new `Arc`s, so
/// pointer equality alone would make every key refresh look like a rotation.
fn same_key(a: &VerifyingKey, b: &VerifyingKey) -> bool {
    if a.family != b.family || a.alg != b.alg {
        return false;
    }
    match (a.key.kind(), b.key.kind()) {
        (DecodingKeyKind::SecretOrDer(x), DecodingKeyKind::SecretOrDer(y)) => x == y,
        (
            DecodingKeyKind::RsaModulusExponent { n: n1, e: e1 },
            DecodingKeyKind::RsaModulusExponent { n: n2, e: e2 },
        ) => n1 == n2 && e1 == e2,
        _ => false,
    }
}

/// How many distinct `AppClaims` the interner keeps at most. Far more applications than one service
/// talks to; past it, those no cached token uses any more are dropped (and, if that is not enough,
/// all: sharing is an optimisation, never needed for correctness).
const MAX_INTERNED_APPS: usize = 4096;

/// Shares one `AppClaims` between the cached tokens of one application: every token an issuer mints for
/// an application carries the same identity, roles and audience, and a cache full of one busy caller's
/// tokens should not hold a copy of them per token. Only touched when an entry is inserted.
#[derive(Debug, Default)]
struct AppInterner {
    apps: Mutex<HashSet<Arc<AppClaims>>>,
}

impl AppInterner {
    fn intern(&self, app: Arc<AppClaims>) -> Arc<AppClaims> {
        // A poisoned lock only means another insert panicked; not sharing is still correct.
        let Ok(mut apps) = self.apps.lock() else {
            return app;
        };
        if let Some(shared) = apps.get(&*app) {
            return shared.clone();
        }
        if apps.len() >= MAX_INTERNED_APPS {
            apps.retain(|a| Arc::strong_count(a) > 1);
            if apps.len() >= MAX_INTERNED_APPS {
                apps.clear();
            }
        }
        apps.insert(app.clone());
        app
    }

    fn len(&self) -> usize {
        self.apps.lock().map_or(0, |apps| apps.len())
    }
}

/// The bounded cache of verified tokens, shared by every request. Lookups take one shard's read lock;
/// there is no global lock.
pub struct TokenCache {
    /// `None` when disabled (`token_cache_entries: 0`).
    entries: Option<Cache<TokenDigest, Arc<CachedToken>>>,
    apps: AppInterner,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("entries", &self.len())
            .field("capacity", &self.capacity())
            .field("shared_app_claims", &self.apps.len())
            .finish()
    }
}

impl TokenCache {
    /// A cache of at most about `max_entries` tokens (each shard holds its share, rounded up); 0 disables it.
    pub fn new(max_entries: usize) -> Self {
        TokenCache {
            entries: (max_entries > 0).then(|| Cache::new(max_entries)),
            apps: AppInterner::default(),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.entries.is_some()
    }

    /// The entry for `digest`, unless it is past its `exp` + skew at `now` (then it is dropped).
    pub fn get(&self, digest: &TokenDigest, now: i64, skew_secs: i64) -> Option<Arc<CachedToken>> {
        let entries = self.entries.as_ref()?;
        let entry = entries.get(digest)?;
        if now > entry.served_until(skew_secs) {
            self.remove(digest, &entry);
            return None;
        }
        Some(entry)
    }

    /// Keeps a successfully verified token. Returns whether it was kept: a token already past its
    /// `exp` + skew is not (it could never be served).
    pub fn insert(
        &self,
        digest: TokenDigest,
        mut entry: CachedToken,
        now: i64,
        skew_secs: i64,
    ) -> bool {
        let Some(entries) = &self.entries else {
            return false;
        };
        if now > entry.served_until(skew_secs) {
            return false;
        }
        let claims = &mut entry.verified.claims;
        claims.app = self.apps.intern(claims.app.clone());
        entries.insert(digest, Arc::new(entry));
        true
    }

    /// Drops `entry` if it is still the one cached under `digest` (a fresher entry another request
    /// inserted meanwhile stays).
    pub fn remove(&self, digest: &TokenDigest, entry: &Arc<CachedToken>) {
        if let Some(entries) = &self.entries {
            entries.remove_if(digest, |current| Arc::ptr_eq(current, entry));
        }
    }

    pub fn len(&self) -> usize {
        self.entries.as_ref().map_or(0, Cache::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The configured bound on entries (0 when disabled).
    pub fn capacity(&self) -> u64 {
        self.entries.as_ref().map_or(0, Cache::capacity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::decision::{self, KeyLookup, Request, Trace};
    use crate::core::ids::TenantId;
    use crate::core::trust::IssuerProfile;
    use crate::core::trust::{Audiences, TrustedIssuer};
    use aws_lc_rs::rsa::{KeyPair, KeySize, PublicKeyComponents};
    use aws_lc_rs::signature::RSA_PKCS1_SHA256;
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use jsonwebtoken::Algorithm;
    use serde_json::json;
    use std::collections::{HashMap, HashSet};
    use std::sync::OnceLock;

    const TENANT: &str = "3f6b2a1e-8c4d-4e5f-9a7b-1c2d3e4f5a6b";
    const ISS: &str = "https://login.microsoftonline.com/3f6b2a1e-8c4d-4e5f-9a7b-1c2d3e4f5a6b/v2.0";
    const AUD: &str = "b7e3c1a2-4d5e-4f60-8a9b-0c1d2e3f4a5b";
    const NOW: i64 = 1_800_000_000;
    const SKEW: i64 = 300;

    fn key_pair(which: usize) -> &'static KeyPair {
        static KEYS: OnceLock<[KeyPair; 2]> = OnceLock::new();
        &KEYS.get_or_init(|| {
            [
                KeyPair::generate(KeySize::Rsa2048).unwrap(),
                KeyPair::generate(KeySize::Rsa2048).unwrap(),
            ]
        })[which]
    }

    /// A JWKS publishing `(kid, key pair index)` pairs.
    fn jwks(keys: &[(&str, usize)]) -> KeySet {
        let keys: Vec<_> = keys
            .iter()
            .map(|(kid, which)| {
                let public = PublicKeyComponents::<Vec<u8>>::from(
                    aws_lc_rs::signature::KeyPair::public_key(key_pair(*which)),
                );
                json!({"kty": "RSA", "use": "sig", "kid": kid,
                       "n": URL_SAFE_NO_PAD.encode(&public.n), "e": URL_SAFE_NO_PAD.encode(&public.e)})
            })
            .collect();
        KeySet::parse(json!({ "keys": keys }).to_string().as_bytes()).unwrap()
    }

    fn sign(kid: &str, which: usize, exp: i64) -> String {
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": kid}).to_string();
        let claims =
            json!({"aud": AUD, "iss": ISS, "exp": exp, "azp": "app", "oid": "o", "sub": "o",
                            "tid": TENANT, "roles": ["S2SAppRole"], "idtyp": "app", "ver": "2.0"})
            .to_string();
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims)
        );
        let pair = key_pair(which);
        let mut sig = vec![0; pair.public_modulus_len()];
        pair.sign(
            &RSA_PKCS1_SHA256,
            &aws_lc_rs::rand::SystemRandom::new(),
            input.as_bytes(),
            &mut sig,
        )
        .unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
    }

    fn trust() -> TrustSnapshot {
        TrustSnapshot::new(
            [TrustedIssuer {
                issuer: ISS.to_owned(),
                tenant: TenantId::new(TENANT),
                profile: IssuerProfile::Entra,
                jwks_uri: "http://127.0.0.1/jwks".to_owned(),
            }],
            HashSet::new(),
            HashSet::new(),
        )
    }

    fn settings() -> DecisionSettings {
        DecisionSettings {
            service_auth_enabled: true,
            require_client_type: false,
            clock_skew_secs: SKEW,
            audiences: Audiences::new([AUD]),
            algorithms: vec![Algorithm::RS256],
            require_source_principal: false,
        }
    }

    /// Verifies `token` through the core, as the engine does, and builds the cache entry.
    fn verified(token: &str, keys: &KeySet, trust: &TrustSnapshot) -> CachedToken {
        let headers: HashMap<String, String> = HashMap::new();
        let request = Request {
            token,
            method: "GET",
            path: "/",
            headers: &headers,
            source_principal: None,
        };
        let mut trace = Trace::disabled();
        let pre = decision::precheck(&request, &settings(), trust, &mut trace).unwrap();
        let alg = pre.alg;
        let v = decision::verify(pre, KeyLookup::Loaded(keys), &mut trace).unwrap();
        assert_eq!(v.alg, alg);
        CachedToken::new(v)
    }

    #[test]
    fn stays_bounded_under_ten_times_its_capacity_of_unique_tokens() {
        let (keys, trust) = (jwks(&[("k1", 0)]), trust());
        let template = verified(&sign("k1", 0, NOW + 3600), &keys, &trust);
        let cache = TokenCache::new(1000);
        for i in 0u32..10_000 {
            let entry = CachedToken::new(template.verified.clone());
            assert!(cache.insert(digest(&format!("token-{i}")), entry, NOW, SKEW));
            assert!(cache.len() <= 1000, "{} entries after {i}", cache.len());
        }
        assert!(cache.len() > 500, "the cache should stay mostly full");
    }

    #[test]
    fn hot_tokens_survive_a_flood_of_unique_ones() {
        let (keys, trust) = (jwks(&[("k1", 0)]), trust());
        let template = verified(&sign("k1", 0, NOW + 3600), &keys, &trust);
        let entry = || CachedToken::new(template.verified.clone());
        let cache = TokenCache::new(1000);
        let hot: Vec<TokenDigest> = (0..50).map(|i| digest(&format!("hot-{i}"))).collect();
        for d in &hot {
            cache.insert(*d, entry(), NOW, SKEW);
        }
        for round in 0..100 {
            for d in &hot {
                assert!(
                    cache.get(d, NOW, SKEW).is_some(),
                    "hot token lost in round {round}"
                );
            }
            for i in 0..100 {
                cache.insert(digest(&format!("flood-{round}-{i}")), entry(), NOW, SKEW);
            }
        }
    }

    #[test]
    fn an_entry_is_never_served_past_exp_plus_skew() {
        let (keys, trust) = (jwks(&[("k1", 0)]), trust());
        let token = sign("k1", 0, NOW + 60);
        let cache = TokenCache::new(10);
        let d = digest(&token);
        assert!(cache.insert(d, verified(&token, &keys, &trust), NOW, SKEW));
        assert!(cache.get(&d, NOW + 60 + SKEW, SKEW).is_some());
        assert!(cache.get(&d, NOW + 61 + SKEW, SKEW).is_none());
        // Dropped, not just hidden: even an earlier clock no longer finds it.
        assert!(cache.get(&d, NOW, SKEW).is_none());
        assert!(cache.is_empty());
        // A token already past its lifetime is never kept.
        assert!(!cache.insert(d, verified(&token, &keys, &trust), NOW + 61 + SKEW, SKEW));
        assert!(cache.is_empty());
    }

    #[test]
    fn removing_the_key_from_the_jwks_invalidates_what_it_verified() {
        let trust = trust();
        let before = jwks(&[("k1", 0), ("k2", 1)]);
        let entry = verified(&sign("k1", 0, NOW + 3600), &before, &trust);
        let settings = settings();
        assert_eq!(
            entry.revalidate(&trust, Some(&before), &settings),
            Revalidation::Valid
        );
        // The same keys, fetched again: new `Arc`s, same material, still valid.
        let refreshed = jwks(&[("k1", 0), ("k2", 1)]);
        assert_eq!(
            entry.revalidate(&trust, Some(&refreshed), &settings),
            Revalidation::Valid
        );
        // `k1` removed.
        let removed = jwks(&[("k2", 1)]);
        assert_eq!(
            entry.revalidate(&trust, Some(&removed), &settings),
            Revalidation::Stale
        );
        // `k1` now names another key.
        let reused = jwks(&[("k1", 1)]);
        assert_eq!(
            entry.revalidate(&trust, Some(&reused), &settings),
            Revalidation::Stale
        );
        // No usable key set at all.
        assert_eq!(
            entry.revalidate(&trust, None, &settings),
            Revalidation::Stale
        );
    }

    #[test]
    fn an_issuer_no_longer_trusted_or_an_algorithm_no_longer_allowed_is_not_served() {
        let (keys, trust) = (jwks(&[("k1", 0)]), trust());
        let entry = verified(&sign("k1", 0, NOW + 3600), &keys, &trust);
        let empty = TrustSnapshot::default();
        assert_eq!(
            entry.revalidate(&empty, Some(&keys), &settings()),
            Revalidation::Stale
        );
        // The same issuer rediscovered (a new `Arc`, equal contents) is still the same issuer.
        assert_eq!(
            entry.revalidate(&self::trust(), Some(&keys), &settings()),
            Revalidation::Valid
        );
        let mut rs384_only = settings();
        rs384_only.algorithms = vec![Algorithm::RS384];
        assert_eq!(
            entry.revalidate(&trust, Some(&keys), &rs384_only),
            Revalidation::Bypass
        );
    }

    #[test]
    fn a_disabled_cache_keeps_nothing() {
        let (keys, trust) = (jwks(&[("k1", 0)]), trust());
        let token = sign("k1", 0, NOW + 3600);
        let cache = TokenCache::new(0);
        assert!(!cache.is_enabled());
        assert!(!cache.insert(digest(&token), verified(&token, &keys, &trust), NOW, SKEW));
        assert!(cache.get(&digest(&token), NOW, SKEW).is_none());
        assert_eq!(cache.capacity(), 0);
    }

    #[test]
    fn removal_spares_a_fresher_entry() {
        let (keys, trust) = (jwks(&[("k1", 0)]), trust());
        let token = sign("k1", 0, NOW + 3600);
        let d = digest(&token);
        let cache = TokenCache::new(10);
        cache.insert(d, verified(&token, &keys, &trust), NOW, SKEW);
        let old = cache.get(&d, NOW, SKEW).unwrap();
        cache.insert(d, verified(&token, &keys, &trust), NOW, SKEW);
        cache.remove(&d, &old);
        assert!(cache.get(&d, NOW, SKEW).is_some());
    }

    #[test]
    fn tokens_of_one_application_share_their_app_claims() {
        let (keys, trust) = (jwks(&[("k1", 0)]), trust());
        let cache = TokenCache::new(10);
        let (a, b) = (sign("k1", 0, NOW + 3600), sign("k1", 0, NOW + 3601));
        let (entry_a, entry_b) = (verified(&a, &keys, &trust), verified(&b, &keys, &trust));
        // Verified separately: equal, but two copies.
        assert_eq!(entry_a.verified.claims.app, entry_b.verified.claims.app);
        assert!(!Arc::ptr_eq(
            &entry_a.verified.claims.app,
            &entry_b.verified.claims.app
        ));
        assert!(cache.insert(digest(&a), entry_a, NOW, SKEW));
        assert!(cache.insert(digest(&b), entry_b, NOW, SKEW));
        let (hit_a, hit_b) = (
            cache.get(&digest(&a), NOW, SKEW).unwrap(),
            cache.get(&digest(&b), NOW, SKEW).unwrap(),
        );
        assert!(Arc::ptr_eq(
            &hit_a.verified.claims.app,
            &hit_b.verified.claims.app
        ));
        // What differs per token stays per token.
        assert_eq!(hit_a.verified.claims.exp, NOW + 3600);
        assert_eq!(hit_b.verified.claims.exp, NOW + 3601);
        assert_eq!(cache.apps.len(), 1);
    }

    #[test]
    fn the_interner_stays_bounded() {
        let (keys, trust) = (jwks(&[("k1", 0)]), trust());
        let template = verified(&sign("k1", 0, NOW + 3600), &keys, &trust);
        let interner = AppInterner::default();
        let mut kept = Vec::new();
        for i in 0..(MAX_INTERNED_APPS * 2 + 10) {
            let mut app = (*template.verified.claims.app).clone();
            app.roles = vec![format!("role-{i}").into_boxed_str()].into_boxed_slice();
            let shared = interner.intern(Arc::new(app.clone()));
            assert_eq!(*shared, app);
            // Every other one stays in use, as if a cached token held it.
            if i % 2 == 0 {
                kept.push(shared);
            }
            assert!(interner.len() <= MAX_INTERNED_APPS);
        }
    }

    #[test]
    fn a_cache_entry_is_small() {
        // The compact entry itself; what it points to is shared (issuer, key, interned app claims).
        assert!(
            std::mem::size_of::<CachedToken>() <= 64,
            "{} bytes",
            std::mem::size_of::<CachedToken>()
        );
    }
}
