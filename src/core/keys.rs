//! Signing keys as the decision sees them: a parsed JWKS, indexed by `kid`.
//!
//! Parsing is pure so the cache layer can hand the core an immutable `KeySet`. Entries that cannot be
//! used to verify a signature (encryption keys, symmetric keys, unknown types, malformed members) are
//! skipped, not fatal: one odd key must not take an issuer's other keys down with it.

use super::FastMap;
use super::token::SignatureSegment;
use aws_lc_rs::signature::{ParsedPublicKey, RSA_PKCS1_2048_8192_SHA256, RsaPublicKeyComponents};
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind};
use serde_json::Value;
use std::str::FromStr;
use std::sync::Arc;

/// One public key usable for signature verification.
#[derive(Clone)]
pub struct VerifyingKey {
    pub kid: Option<String>,
    /// The algorithm the JWKS pins the key to, if it says.
    pub alg: Option<Algorithm>,
    pub family: AlgorithmFamily,
    pub key: DecodingKey,
    /// The key parsed once for RS256, which is what Entra signs with: verifying through `DecodingKey`
    /// rebuilds the RSA key from `n` and `e` (and clones them) on every call.
    rs256: Option<ParsedPublicKey>,
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyingKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("family", &self.family)
            .finish_non_exhaustive()
    }
}

impl VerifyingKey {
    /// Whether a token signed with `alg` may be verified with this key: same family, and the key's own
    /// `alg` (when the JWKS names one) equal. This is what defeats RS/HS confusion even if HMAC were allowed.
    pub fn accepts(&self, alg: Algorithm) -> bool {
        alg.family() == self.family && self.alg.is_none_or(|pinned| pinned == alg)
    }

    /// Whether `signature` signs `message` under `alg` with this key. The caller has checked
    /// `accepts(alg)`. Any failure is `false`.
    pub fn verifies(
        &self,
        alg: Algorithm,
        message: &[u8],
        signature: &SignatureSegment<'_>,
    ) -> bool {
        match (&self.rs256, alg) {
            (Some(parsed), Algorithm::RS256) => {
                parsed.verify_sig(message, &signature.bytes).is_ok()
            }
            _ => jsonwebtoken::crypto::verify(signature.encoded, message, &self.key, alg)
                .unwrap_or(false),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    #[error("JWKS document is not a JSON object with a `keys` array")]
    NotAKeySet,
    #[error("JWKS document has no usable signing key ({skipped} skipped)")]
    NoUsableKeys { skipped: usize },
}

/// A parsed JWKS.
#[derive(Clone, Debug, Default)]
pub struct KeySet {
    by_kid: FastMap<String, Arc<VerifyingKey>>,
    /// Keys published without a `kid`; usable only by tokens without one.
    anonymous: Vec<Arc<VerifyingKey>>,
    /// How many entries were skipped as unusable.
    pub skipped: usize,
}

impl KeySet {
    pub fn parse(document: &[u8]) -> Result<KeySet, JwksError> {
        let doc: Value = serde_json::from_slice(document).map_err(|_| JwksError::NotAKeySet)?;
        let Some(entries) = doc.get("keys").and_then(Value::as_array) else {
            return Err(JwksError::NotAKeySet);
        };
        let mut set = KeySet::default();
        for entry in entries {
            match usable_key(entry) {
                Some(key) => {
                    let key = Arc::new(key);
                    match key.kid.clone() {
                        Some(kid) => {
                            set.by_kid.insert(kid, key);
                        }
                        None => set.anonymous.push(key),
                    }
                }
                None => set.skipped += 1,
            }
        }
        if set.is_empty() {
            return Err(JwksError::NoUsableKeys {
                skipped: set.skipped,
            });
        }
        Ok(set)
    }

    pub fn is_empty(&self) -> bool {
        self.by_kid.is_empty() && self.anonymous.is_empty()
    }

    pub fn len(&self) -> usize {
        self.by_kid.len() + self.anonymous.len()
    }

    /// The key a token names. Without a `kid`, only an unambiguous anonymous key will do.
    pub fn find(&self, kid: Option<&str>) -> Option<&Arc<VerifyingKey>> {
        match kid {
            Some(kid) => self.by_kid.get(kid),
            None => match self.anonymous.as_slice() {
                [only] => Some(only),
                _ => None,
            },
        }
    }

    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.by_kid.keys().map(String::as_str)
    }
}

fn usable_key(entry: &Value) -> Option<VerifyingKey> {
    if let Some(u) = entry.get("use")
        && u.as_str() != Some("sig")
    {
        return None;
    }
    let alg = match entry.get("alg") {
        None => None,
        Some(v) => Some(Algorithm::from_str(v.as_str()?).ok()?),
    };
    let jwk: Jwk = serde_json::from_value(entry.clone()).ok()?;
    let family = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => AlgorithmFamily::Rsa,
        AlgorithmParameters::EllipticCurve(_) => AlgorithmFamily::Ec,
        AlgorithmParameters::OctetKeyPair(_) => AlgorithmFamily::Ed,
        // A symmetric key in a public JWKS is never a verification key for us (no HMAC, ever).
        _ => return None,
    };
    if alg.is_some_and(|a| a.family() != family) {
        return None;
    }
    let key = DecodingKey::from_jwk(&jwk).ok()?;
    let rs256 = match key.kind() {
        DecodingKeyKind::RsaModulusExponent { n, e }
            if alg.is_none_or(|a| a == Algorithm::RS256) =>
        {
            RsaPublicKeyComponents { n, e }
                .to_parsed_public_key(&RSA_PKCS1_2048_8192_SHA256)
                .ok()
        }
        _ => None,
    };
    Some(VerifyingKey {
        kid: jwk.common.key_id.clone(),
        alg,
        family,
        key,
        rs256,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // A real 2048-bit modulus is not needed to exercise parsing: jsonwebtoken keeps n/e as given.
    const N: &str = "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw";

    #[test]
    fn skips_unusable_entries_and_keeps_the_rest() {
        let doc = serde_json::json!({"keys": [
            {"kty": "RSA", "use": "sig", "kid": "good", "n": N, "e": "AQAB"},
            {"kty": "RSA", "use": "enc", "kid": "enc", "n": N, "e": "AQAB"},
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {"kty": "RSA", "kid": "bad-alg", "alg": "ES256", "n": N, "e": "AQAB"},
            {"kty": "RSA", "kid": "no-n", "e": "AQAB"},
            {"kty": "weird", "kid": "weird"},
            "not an object"
        ]});
        let set = KeySet::parse(doc.to_string().as_bytes()).unwrap();
        assert_eq!(set.kids().collect::<Vec<_>>(), ["good"]);
        assert_eq!(set.skipped, 6);
        assert!(set.find(Some("hmac")).is_none());
    }

    #[test]
    fn a_key_pinned_to_an_algorithm_accepts_only_that_one() {
        let doc = serde_json::json!({"keys": [{"kty": "RSA", "kid": "k", "alg": "RS256", "n": N, "e": "AQAB"}]});
        let set = KeySet::parse(doc.to_string().as_bytes()).unwrap();
        let key = set.find(Some("k")).unwrap();
        assert!(key.accepts(Algorithm::RS256));
        assert!(!key.accepts(Algorithm::RS384));
        assert!(!key.accepts(Algorithm::HS256));
    }

    /// The pre-parsed RS256 path and jsonwebtoken's generic path agree on good, tampered, truncated,
    /// oversized and undecodable signatures.
    #[test]
    fn the_parsed_rs256_key_verifies_exactly_like_jsonwebtoken() {
        use aws_lc_rs::rsa::{KeyPair, KeySize, PublicKeyComponents};
        use aws_lc_rs::signature::RSA_PKCS1_SHA256;
        use base64::Engine as _;
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let pair = KeyPair::generate(KeySize::Rsa2048).unwrap();
        let public =
            PublicKeyComponents::<Vec<u8>>::from(aws_lc_rs::signature::KeyPair::public_key(&pair));
        let doc = serde_json::json!({"keys": [{"kty": "RSA", "kid": "k",
            "n": URL_SAFE_NO_PAD.encode(&public.n), "e": URL_SAFE_NO_PAD.encode(&public.e)}]});
        let set = KeySet::parse(doc.to_string().as_bytes()).unwrap();
        let key = set.find(Some("k")).unwrap();
        assert!(
            key.rs256.is_some(),
            "an RSA key without `alg` is parsed for RS256"
        );
        let message = b"header.claims";
        let mut raw = vec![0; pair.public_modulus_len()];
        pair.sign(
            &RSA_PKCS1_SHA256,
            &aws_lc_rs::rand::SystemRandom::new(),
            message,
            &mut raw,
        )
        .unwrap();
        let good = URL_SAFE_NO_PAD.encode(&raw);
        let mut flipped = raw.clone();
        flipped[10] ^= 1;
        let cases = [
            (good.clone(), true),
            (URL_SAFE_NO_PAD.encode(&flipped), false),
            (URL_SAFE_NO_PAD.encode(&raw[..raw.len() - 1]), false),
            (URL_SAFE_NO_PAD.encode(vec![7u8; 2048]), false),
            (String::new(), false),
        ];
        for (encoded, expected) in cases {
            let generic =
                jsonwebtoken::crypto::verify(&encoded, message, &key.key, Algorithm::RS256)
                    .unwrap_or(false);
            assert_eq!(generic, expected, "jsonwebtoken on {encoded:.20}");
            let segment = SignatureSegment::decode(&encoded).unwrap();
            assert_eq!(
                key.verifies(Algorithm::RS256, message, &segment),
                expected,
                "parsed key on {encoded:.20}"
            );
        }
        assert_eq!(SignatureSegment::decode("not base64!"), None);
        // Another message with the right signature, and another algorithm, do not verify.
        let good = SignatureSegment::decode(&good).unwrap();
        assert!(!key.verifies(Algorithm::RS256, b"header.claimz", &good));
        assert!(!key.verifies(Algorithm::RS384, message, &good));
    }

    #[test]
    fn rejects_documents_without_usable_keys() {
        assert_eq!(KeySet::parse(b"[]").unwrap_err(), JwksError::NotAKeySet);
        assert_eq!(
            KeySet::parse(b"garbage").unwrap_err(),
            JwksError::NotAKeySet
        );
        assert_eq!(
            KeySet::parse(br#"{"keys":[{"kty":"oct","k":"AA"}]}"#).unwrap_err(),
            JwksError::NoUsableKeys { skipped: 1 }
        );
    }
}
