//! `Authorizer`: runs one decision end to end — the pure core's three stages, with the key cache's
//! I/O between them — and records it (metrics, an audit log line with a token hash, never the token).
//!
//! It also owns the allowlist cache: the registry snapshot and decision settings, swapped atomically
//! on reload so that a decision always sees one consistent policy; and the verified-token cache
//! (`token_cache`), which lets a token seen before skip `precheck` and `verify` — never `authorize`.

use crate::core::decision::{self, KeyLookup, Request};
use crate::core::registry::RegistrySnapshot;
use crate::core::token::MAX_TOKEN_BYTES;
use crate::core::trust::TrustSnapshot;
use crate::core::{Decision, DecisionSettings, Trace, TraceStep};
use crate::core::{Denied, VerifiedToken};
use crate::directory::IssuerDirectory;
use crate::metrics::{Api, Metrics};
use crate::token_cache::{self, CachedToken, Revalidation, TokenCache, TokenDigest};
use arc_swap::ArcSwap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tracing::field::Empty;
use tracing::{Instrument as _, Span};

/// The policy a decision is made against: settings and registry, always replaced together.
#[derive(Debug)]
pub struct Policy {
    pub settings: DecisionSettings,
    pub registry: RegistrySnapshot,
}

/// The allowlist cache: one atomically swapped `Policy`.
#[derive(Debug)]
pub struct AllowlistCache {
    current: ArcSwap<Policy>,
}

impl AllowlistCache {
    pub fn new(policy: Policy) -> Self {
        AllowlistCache {
            current: ArcSwap::from_pointee(policy),
        }
    }

    pub fn load(&self) -> Arc<Policy> {
        self.current.load_full()
    }

    pub fn replace(&self, policy: Policy) {
        self.current.store(Arc::new(policy));
    }
}

/// A decision and, for `Explain`, its trace.
#[derive(Debug)]
pub struct Evaluation {
    pub decision: Decision,
    pub trace: Vec<TraceStep>,
}

#[derive(Debug)]
pub struct Authorizer {
    allowlist: AllowlistCache,
    directory: Arc<IssuerDirectory>,
    metrics: Arc<Metrics>,
    tokens: TokenCache,
}

impl Authorizer {
    /// `token_cache_entries` bounds the verified-token cache; 0 disables it.
    pub fn new(
        policy: Policy,
        directory: Arc<IssuerDirectory>,
        metrics: Arc<Metrics>,
        token_cache_entries: usize,
    ) -> Self {
        Authorizer {
            allowlist: AllowlistCache::new(policy),
            directory,
            metrics,
            tokens: TokenCache::new(token_cache_entries),
        }
    }

    pub fn allowlist(&self) -> &AllowlistCache {
        &self.allowlist
    }

    pub fn directory(&self) -> &Arc<IssuerDirectory> {
        &self.directory
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn token_cache(&self) -> &TokenCache {
        &self.tokens
    }

    /// A decision asked through the native API (`Decide`, or `Explain` with `explain`).
    pub async fn decide(&self, request: &Request<'_>, explain: bool) -> Evaluation {
        self.decide_via(Api::Native, request, explain).await
    }

    /// A decision asked through `api`; metrics and the audit line name it.
    pub async fn decide_via(&self, api: Api, request: &Request<'_>, explain: bool) -> Evaluation {
        let started = Instant::now();
        let mut trace = if explain {
            Trace::enabled()
        } else {
            Trace::disabled()
        };
        // One SHA-256 serves as the cache key and as the audit line's token hash. Tokens the size check
        // refuses are neither cached nor hashed here.
        let raw = decision::bearer_token(request.token);
        let digest = (!raw.is_empty()
            && raw.len() <= MAX_TOKEN_BYTES
            && (self.tokens.is_enabled() || audit_enabled()))
        .then(|| token_cache::digest(raw));
        // A span per decision (and its stages) for OpenTelemetry; without an exporter the callsites are
        // disabled, and all of this is a couple of loads.
        let span = tracing::info_span!(
            "decision",
            api = api.as_str(),
            decision = Empty,
            reason = Empty,
            token_cache = Empty,
            token_hash = Empty,
            tenant = Empty,
            client_app_id = Empty,
        );
        if !span.is_disabled() {
            crate::telemetry::adopt_remote_parent(&span, request.headers);
        }
        let decision = self
            .evaluate(request, digest.as_ref(), explain, &mut trace, &span)
            .instrument(span.clone())
            .await;
        let elapsed = started.elapsed();
        if !span.is_disabled() {
            record_decision(&span, &decision, digest.as_ref());
        }
        self.metrics.decision(api, decision.reason(), elapsed);
        audit(api, request, digest.as_ref(), &decision, elapsed);
        Evaluation {
            decision,
            trace: trace.finish(),
        }
    }

    async fn evaluate(
        &self,
        request: &Request<'_>,
        digest: Option<&TokenDigest>,
        explain: bool,
        trace: &mut Trace,
        span: &Span,
    ) -> Decision {
        // `Explain` always takes the full path, so that its trace shows every check actually made.
        if !explain && let Some(digest) = digest {
            // A borrowed snapshot (`ArcSwap::load`): the hot path takes no reference on the shared
            // `Arc<Policy>`, whose counter would otherwise bounce between the cores on every call.
            let policy = self.allowlist.current.load();
            let trust = self.directory.trust();
            let cached = self.decide_cached(digest, request, &policy, &trust);
            if !span.is_disabled() {
                span.record("token_cache", if cached.is_some() { "hit" } else { "miss" });
            }
            if let Some(decision) = cached {
                return decision;
            }
        }
        let policy = self.allowlist.load();
        let trust = self.directory.trust();
        let verified = match self.verify(request, &policy, &trust, trace).await {
            Ok(v) => v,
            Err(denied) => return Decision::Deny(denied),
        };
        let now = unix_now();
        let decision = tracing::info_span!("decision.authorize").in_scope(|| {
            decision::authorize(
                &verified,
                request,
                &policy.settings,
                &policy.registry,
                now,
                trace,
            )
        });
        // Cache the verification (never a failure): what `verify` returned, with the key it used.
        if let Some(digest) = digest {
            self.tokens.insert(
                *digest,
                CachedToken::new(verified),
                now,
                policy.settings.clock_skew_secs,
            );
        }
        decision
    }

    /// `precheck` and `verify`: the token's syntax, issuer, key and signature, with a key lookup that
    /// may wait for a refresh.
    async fn verify(
        &self,
        request: &Request<'_>,
        policy: &Policy,
        trust: &TrustSnapshot,
        trace: &mut Trace,
    ) -> Result<VerifiedToken, Box<Denied>> {
        let pre = tracing::info_span!("decision.precheck")
            .in_scope(|| decision::precheck(request, &policy.settings, trust, trace))?;
        // The one stage that may wait: for a refresh, when the token names a `kid` the set lacks.
        let loaded = self
            .directory
            .jwks()
            .lookup(&pre.issuer.jwks_uri, pre.kid())
            .instrument(tracing::info_span!(
                "decision.key_lookup",
                issuer = pre.issuer.issuer.as_str()
            ))
            .await;
        let keys = match &loaded {
            Some(k) => KeyLookup::Loaded(&k.set),
            None => KeyLookup::Unavailable,
        };
        tracing::info_span!("decision.verify").in_scope(|| decision::verify(pre, keys, trace))
    }

    /// Verifies a token as a decision would, up to and including its lifetime and audience, without
    /// the allowlist: for admin calls, which are authorised by an app role instead. Never cached, and
    /// not counted as a decision.
    pub async fn authenticate(&self, request: &Request<'_>) -> Result<VerifiedToken, Box<Denied>> {
        let policy = self.allowlist.load();
        let trust = self.directory.trust();
        let mut trace = Trace::disabled();
        let verified = self.verify(request, &policy, &trust, &mut trace).await?;
        decision::authenticate(&verified, &policy.settings, unix_now(), &mut trace)?;
        Ok(verified)
    }

    /// The decision from a cached verification, or `None` to take the full path.
    ///
    /// A hit replaces `precheck` and `verify`, so the checks of `precheck` that depend on the settings
    /// or the request rather than on the token are made here first; when one fails, the full path runs
    /// and reports it with its usual reason and message. (Presence and size were checked before the
    /// digest was taken.) Everything after `verify` is `authorize`, run in full as always.
    fn decide_cached(
        &self,
        digest: &TokenDigest,
        request: &Request<'_>,
        policy: &Policy,
        trust: &TrustSnapshot,
    ) -> Option<Decision> {
        let settings = &policy.settings;
        if !settings.service_auth_enabled {
            return None;
        }
        if settings.require_client_type && !decision::has_service_client_type(request.headers) {
            return None;
        }
        let now = unix_now();
        let Some(entry) = self.tokens.get(digest, now, settings.clock_skew_secs) else {
            self.metrics.token_cache_miss();
            return None;
        };
        let keys = self
            .directory
            .jwks()
            .usable(&entry.verified.issuer.jwks_uri);
        let revalidation = entry.revalidate(trust, keys.as_ref().map(|k| &k.set), settings);
        if revalidation == Revalidation::Valid {
            self.metrics.token_cache_hit();
        } else {
            self.metrics.token_cache_miss();
        }
        match revalidation {
            Revalidation::Valid => Some(tracing::info_span!("decision.authorize").in_scope(|| {
                decision::authorize(
                    &entry.verified,
                    request,
                    settings,
                    &policy.registry,
                    now,
                    &mut Trace::disabled(),
                )
            })),
            Revalidation::Stale => {
                self.tokens.remove(digest, &entry);
                None
            }
            Revalidation::Bypass => None,
        }
    }
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A short, non-reversible token fingerprint for correlating log lines: SHA-256, first 8 bytes, hex.
pub fn token_hash(token: &str) -> String {
    short_hash(&token_cache::digest(decision::bearer_token(token)))
        .as_str()
        .to_owned()
}

/// The first 8 bytes of a digest in lower-case hex, on the stack: the audit line runs on every decision.
struct ShortHash([u8; 16]);

impl ShortHash {
    fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever written.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

fn short_hash(digest: &TokenDigest) -> ShortHash {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 16];
    for (i, b) in digest[..8].iter().enumerate() {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 0x0f)];
    }
    ShortHash(out)
}

/// The outcome on the decision's span: the same fields as the audit record's, never the token.
fn record_decision(span: &Span, decision: &Decision, digest: Option<&TokenDigest>) {
    let caller = match decision {
        Decision::Allow(a) => {
            span.record("decision", "allow");
            Some(&a.caller)
        }
        Decision::Deny(d) => {
            span.record("decision", "deny");
            span.record("reason", d.reason.as_str());
            d.caller.as_ref()
        }
    };
    if let Some(caller) = caller {
        span.record("tenant", caller.tenant_id.as_str());
        if let Some(app) = &caller.client_app_id {
            span.record("client_app_id", app.as_str());
        }
    }
    if let Some(digest) = digest {
        span.record("token_hash", short_hash(digest).as_str());
    }
}

fn audit_enabled() -> bool {
    tracing::enabled!(target: crate::log_format::AUDIT_TARGET, tracing::Level::INFO)
}

/// The audit record of one decision: the same fields for allow and deny (empty when not known), so
/// that a log pipeline can rely on its shape. The log layer adds the time. Never the token: a short
/// hash of it (`token_hash`), empty when no token was sent. `digest` is the token's SHA-256 when the
/// caller already computed it.
fn audit(
    api: Api,
    request: &Request<'_>,
    digest: Option<&TokenDigest>,
    decision: &Decision,
    elapsed: Duration,
) {
    if !audit_enabled() {
        return;
    }
    let latency_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
    let raw = decision::bearer_token(request.token);
    let hash = match digest {
        Some(d) => Some(short_hash(d)),
        None if raw.is_empty() => None,
        None => Some(short_hash(&token_cache::digest(raw))),
    };
    let token_hash = hash.as_ref().map_or("", ShortHash::as_str);
    let (result, reason, caller, user_id, user_name, role, effective_user, detail) = match decision
    {
        Decision::Allow(a) => (
            "allow",
            "",
            Some(&a.caller),
            a.application_user_id.as_str(),
            a.application_user_name.as_str(),
            a.security_role.as_str(),
            a.effective_user.as_ref().map_or("", |u| u.as_str()),
            "",
        ),
        Decision::Deny(d) => (
            "deny",
            d.reason.as_str(),
            d.caller.as_ref(),
            "",
            "",
            "",
            "",
            d.message.as_str(),
        ),
    };
    tracing::info!(
        target: crate::log_format::AUDIT_TARGET,
        api = api.as_str(),
        decision = result,
        reason,
        token_hash,
        tenant = caller.map_or("", |c| c.tenant_id.as_str()),
        client_app_id = caller.and_then(|c| c.client_app_id.as_ref()).map_or("", |c| c.as_str()),
        application_user = user_name,
        application_user_id = user_id,
        role,
        effective_user,
        latency_us,
        detail,
        "decision"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_hash_is_the_first_eight_bytes_in_hex() {
        let mut digest = [0u8; 32];
        digest[..8].copy_from_slice(&[0x00, 0x01, 0x7f, 0x80, 0xab, 0xcd, 0xef, 0xff]);
        digest[8] = 0x12;
        assert_eq!(short_hash(&digest).as_str(), "00017f80abcdefff");
        let expected: String = token_cache::digest("abc")[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(token_hash("Bearer abc"), expected);
    }
}
