//! Who is trusted to issue tokens: the issuers found by discovery for each trusted tenant (and generic
//! OIDC issuers), and which audiences a token may be for.
//!
//! The cache layer builds a `TrustSnapshot` from discovery results; the core only reads it. Issuer
//! strings come from discovery documents, never from the token.

use super::ids::{TenantId, lower_guid};
use super::{FastMap, FastSet};
use jsonwebtoken::Algorithm;
use std::collections::HashSet;
use std::sync::Arc;

/// How to read identity out of a generic OIDC issuer's tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OidcProfile {
    /// The claim naming the calling application (e.g. `client_id`, `azp`).
    pub app_id_claim: String,
    /// The claim naming the caller's object id (e.g. `sub`).
    pub object_id_claim: String,
    /// The claim listing app roles (e.g. `roles`, `scope`).
    pub roles_claim: String,
    pub app_only: AppOnlyRule,
    /// Audiences for this issuer; empty means the globally configured ones.
    pub audiences: Audiences,
    pub algorithms: Vec<Algorithm>,
}

/// How a generic issuer's token is recognised as app-only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AppOnlyRule {
    /// RFC 9068 client-credentials tokens: `sub` equals the application id.
    SubEqualsAppId,
    /// The Entra rule: `idtyp` decides when present, otherwise no `scp` and `oid == sub`.
    Entra,
    /// The issuer only issues app tokens; no check.
    Any,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IssuerProfile {
    Entra,
    Oidc(Arc<OidcProfile>),
}

/// One issuer string a trusted tenant's discovery document named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustedIssuer {
    pub issuer: String,
    /// The Entra tenant, or the issuer URL for generic OIDC issuers.
    pub tenant: TenantId,
    pub profile: IssuerProfile,
    pub jwks_uri: String,
}

/// The trusted issuers as discovered so far.
#[derive(Clone, Debug, Default)]
pub struct TrustSnapshot {
    issuers: FastMap<String, Arc<TrustedIssuer>>,
    /// Trusted Entra tenants whose discovery has not succeeded yet.
    pending_tenants: FastSet<TenantId>,
    /// Configured generic issuers whose discovery has not succeeded yet.
    pending_issuers: FastSet<String>,
}

impl TrustSnapshot {
    pub fn new(
        issuers: impl IntoIterator<Item = TrustedIssuer>,
        pending_tenants: HashSet<TenantId>,
        pending_issuers: HashSet<String>,
    ) -> Self {
        TrustSnapshot {
            issuers: issuers
                .into_iter()
                .map(|i| (i.issuer.clone(), Arc::new(i)))
                .collect(),
            pending_tenants: pending_tenants.into_iter().collect(),
            pending_issuers: pending_issuers.into_iter().collect(),
        }
    }

    pub fn issuer(&self, iss: &str) -> Option<&Arc<TrustedIssuer>> {
        self.issuers.get(iss)
    }

    /// Whether a token naming this tenant or issuer would be trusted once discovery succeeds.
    pub fn is_pending(&self, tid: Option<&str>, iss: &str) -> bool {
        self.pending_issuers.contains(iss)
            || tid.is_some_and(|t| self.pending_tenants.contains(&TenantId::from_token(t)))
    }

    pub fn issuers(&self) -> impl Iterator<Item = &Arc<TrustedIssuer>> {
        self.issuers.values()
    }
}

/// Accepted audiences. An Application ID URI of the form `api://{guid}` also accepts the bare `{guid}`,
/// which is what v2 tokens carry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Audiences(FastSet<String>);

impl Audiences {
    pub fn new<S: AsRef<str>>(configured: impl IntoIterator<Item = S>) -> Self {
        let mut set = FastSet::default();
        for aud in configured {
            let aud = aud.as_ref().trim();
            if aud.is_empty() {
                continue;
            }
            set.insert(lower_guid(aud).into_owned());
            if let Some(guid) = aud.strip_prefix("api://") {
                let guid = guid.trim_end_matches('/');
                if super::ids::is_guid(guid) {
                    set.insert(guid.to_ascii_lowercase());
                }
            }
        }
        Audiences(set)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether a token's audience, as it is in the token, is accepted. Decisions compare audiences
    /// normalised once, when the token's claims are reduced (`accepts_normalised`).
    #[cfg(test)]
    pub fn accepts(&self, aud: &str) -> bool {
        self.accepts_normalised(&lower_guid(aud))
    }

    /// Whether an audience already through [`lower_guid`] is accepted.
    pub fn accepts_normalised(&self, aud: &str) -> bool {
        self.0.contains(aud)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_guid_uri_also_accepts_the_bare_guid() {
        let a = Audiences::new([
            "api://6E0F2B45-8C2A-4A57-9B2B-1C1F3F1B9A10",
            "https://svc.example",
        ]);
        assert!(a.accepts("api://6E0F2B45-8C2A-4A57-9B2B-1C1F3F1B9A10"));
        assert!(a.accepts("6e0f2b45-8c2a-4a57-9b2b-1c1f3f1b9a10"));
        // A GUID in upper case is the same GUID; anything else is compared exactly.
        assert!(a.accepts("6E0F2B45-8C2A-4A57-9B2B-1C1F3F1B9A10"));
        assert!(!a.accepts("HTTPS://SVC.EXAMPLE"));
        assert!(a.accepts("https://svc.example"));
        assert!(!a.accepts("https://svc.example/"));
        assert!(!a.accepts("api://other"));
    }

    #[test]
    fn a_named_uri_does_not_accept_arbitrary_guids() {
        let a = Audiences::new(["api://orders"]);
        assert!(!a.accepts("orders"));
    }
}
