//! Identifier newtypes, so that a tenant id can never be passed where a client app id is expected.
//!
//! Entra identifiers are GUIDs, compared case-insensitively; they are normalised to lower case on
//! construction. Generic OIDC issuers use arbitrary strings (an issuer URL as the tenant, a `client_id`
//! as the application id), which are kept exactly as given.
//!
//! Configured values (`new`) are trimmed, forgiving stray whitespace in a YAML file or a variable.
//! Values read from a token (`from_token`) never are: a signed ` {guid}` or `orders-cli ` is not the
//! identity it resembles, and trimming it would let one caller pass for another.

use std::borrow::Cow;
use std::fmt;

fn normalise(raw: &str) -> String {
    exact(raw.trim())
}

fn exact(raw: &str) -> String {
    lower_guid(raw).into_owned()
}

/// A GUID in lower case, anything else exactly as given: how identifiers and audiences compare.
/// Borrowed unless a GUID has upper case.
pub fn lower_guid(raw: &str) -> Cow<'_, str> {
    if is_guid(raw) && raw.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(raw.to_ascii_lowercase())
    } else {
        Cow::Borrowed(raw)
    }
}

/// Whether `s` is a GUID in the canonical 8-4-4-4-12 hexadecimal form Entra uses.
pub fn is_guid(s: &str) -> bool {
    let bytes = s.as_bytes();
    bytes.len() == 36
        && bytes.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[serde(from = "String", into = "String")]
        pub struct $name(String);

        impl From<String> for $name {
            fn from(raw: String) -> Self {
                Self::new(&raw)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl $name {
            /// A configured value: trimmed, GUIDs lower-cased.
            pub fn new(raw: &str) -> Self {
                Self(normalise(raw))
            }

            /// A value from a token's claims: GUIDs lower-cased, nothing trimmed.
            pub fn from_token(raw: &str) -> Self {
                Self(exact(raw))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(
    /// An Entra tenant (directory) id, or a generic OIDC issuer URL playing the tenant's part.
    TenantId
);
id_type!(
    /// The calling application's id: `appid` (v1), `azp` (v2) or a generic issuer's client id claim.
    ClientAppId
);
id_type!(
    /// A service principal's or user's object id (`oid`).
    ObjectId
);

/// A workload's SPIFFE id, `spiffe://trust-domain/path`: what Envoy reports as `source.principal` (the
/// URI SAN of the calling workload's certificate, under mTLS). Always valid: built only by `parse`, which
/// follows the SPIFFE specification (the `spiffe` crate) and also requires a path, since a bare trust
/// domain names no workload. The trust domain is case-insensitive and kept in lower case, so equal ids
/// compare equal.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId(String);

/// Why a string is not a workload's SPIFFE id. The input itself is left to the caller to name.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("must be a SPIFFE id (`spiffe://trust-domain/path`): {0}")]
    Invalid(spiffe::SpiffeIdError),
    #[error(
        "must be a SPIFFE id with a path (`spiffe://trust-domain/path`): a trust domain alone names no workload"
    )]
    NoPath,
}

impl SpiffeId {
    pub fn parse(raw: &str) -> Result<Self, SpiffeIdError> {
        let id = spiffe::SpiffeId::new(raw.trim()).map_err(SpiffeIdError::Invalid)?;
        if id.path().is_empty() {
            return Err(SpiffeIdError::NoPath);
        }
        Ok(SpiffeId(id.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = SpiffeIdError;

    fn try_from(raw: String) -> Result<Self, SpiffeIdError> {
        Self::parse(&raw)
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> String {
        id.0
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_are_validated_and_their_trust_domain_folded() {
        let id = SpiffeId::parse("spiffe://Cluster.Local/ns/orders/sa/orders").unwrap();
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/orders/sa/orders");
        assert_eq!(
            id,
            SpiffeId::parse(" spiffe://cluster.local/ns/orders/sa/orders ").unwrap()
        );
        assert_ne!(
            id,
            SpiffeId::parse("spiffe://cluster.local/ns/orders/sa/Orders").unwrap(),
            "paths are case-sensitive"
        );
        for bad in [
            "",
            "https://cluster.local/ns/orders",
            "spiffe://",
            "spiffe:///ns/orders",
            "spiffe://cluster.local/ns//orders",
            "spiffe://cluster.local/ns/orders/",
            "spiffe://cluster.local/ns/../orders",
            "spiffe://cluster.local/ns/orders?x=1",
            "spiffe://user@cluster.local/ns/orders",
            "spiffe://cluster.local:8443/ns/orders",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "`{bad}` must be refused");
        }
        assert_eq!(
            SpiffeId::parse("spiffe://cluster.local"),
            Err(SpiffeIdError::NoPath)
        );
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"spiffe://cluster.local/ns/orders/sa/orders\"");
        assert!(serde_json::from_str::<SpiffeId>("\"spiffe://x/\"").is_err());
    }

    #[test]
    fn guids_compare_case_insensitively() {
        let a = TenantId::new("AAAAAAAA-0000-4000-8000-00000000000A");
        let b = TenantId::new("aaaaaaaa-0000-4000-8000-00000000000a");
        assert_eq!(a, b);
    }

    #[test]
    fn non_guids_are_kept_verbatim() {
        assert_eq!(
            TenantId::new("https://Issuer.example/").as_str(),
            "https://Issuer.example/"
        );
        assert!(!is_guid("aaaaaaaa-0000-4000-8000-00000000000"));
    }

    #[test]
    fn configured_values_are_trimmed_token_values_are_not() {
        let guid = "aaaaaaaa-0000-4000-8000-00000000000a";
        assert_eq!(
            ClientAppId::new(&format!(" {guid} ")),
            ClientAppId::new(guid)
        );
        assert_ne!(
            ClientAppId::from_token(&format!(" {guid}")),
            ClientAppId::new(guid)
        );
        assert_ne!(
            ClientAppId::from_token("orders-cli "),
            ClientAppId::new("orders-cli")
        );
        assert_eq!(
            TenantId::from_token(&guid.to_ascii_uppercase()),
            TenantId::new(guid)
        );
        assert!(!is_guid("aaaaaaaa_0000-4000-8000-00000000000a"));
    }
}
