//! `VerifiedClaims`: the compact form of a verified token's claims — exactly what `authorize`, the token
//! cache's revalidation and the responses read, and nothing else.
//!
//! A parsed token (`token::Claims`) owns every claim twice over (typed fields and the raw JSON object,
//! including per-token noise such as `aio`, `uti` and `rh`): about 4.6 KB. A cache of 100,000 verified
//! tokens cannot afford that, so `verify` reduces the claims to this type. What varies per token (`exp`,
//! `nbf`) is kept inline; what an issuer repeats in every token it mints for one application (who it is,
//! its roles, the audience, how it proves to be app-only) is one `Arc<AppClaims>`, which the cache layer
//! shares between all the tokens of that application.

use super::ids::{ClientAppId, ObjectId};
use std::sync::Arc;

/// The verified claims a decision needs. Built only by `decision::verify`, from signed claims.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedClaims {
    /// `exp`, seconds since the epoch.
    pub exp: i64,
    /// `nbf`, when the token has one.
    pub nbf: Option<i64>,
    /// Everything else: identical for every token an issuer mints for one application.
    pub app: Arc<AppClaims>,
}

/// What a verified token says about the calling application, apart from its lifetime.
///
/// Every audience and every role is kept (not only the ones that matched when the token was verified):
/// `authorize` checks them against the settings and registry of each decision, which may have changed
/// since. Strings are boxed slices, not `String`s or `Vec`s, so that an entry carries no spare capacity.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AppClaims {
    /// `appid` (v1) / `azp` (v2), or a generic issuer's configured application id claim.
    pub client_app_id: Option<ClientAppId>,
    /// `oid`, or a generic issuer's configured object id claim.
    pub object_id: Option<ObjectId>,
    /// `ver`.
    pub token_version: Option<Box<str>>,
    /// `aud`, through [`super::ids::lower_guid`] once, as [`super::trust::Audiences`] compares
    /// audiences, so a cache hit compares them without normalising again.
    pub audiences: Box<[Box<str>]>,
    /// `roles`, or a generic issuer's configured roles claim.
    pub roles: Box<[Box<str>]>,
    pub app_only: AppOnlyEvidence,
}

impl AppClaims {
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| &**r == role)
    }
}

/// The facts the app-only rules (`trust::AppOnlyRule`) are decided on, taken from the signed claims so
/// that `sub`, `scp` and `idtyp` need not be kept. Which rule applies depends on the issuer, which a
/// cached token keeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AppOnlyEvidence {
    /// `idtyp`: `None` when absent, else whether it is `app`.
    pub idtyp_is_app: Option<bool>,
    /// Whether the token carries delegated scopes (`scp`).
    pub has_scp: bool,
    /// Whether `oid` and `sub` are both present and equal.
    pub oid_is_sub: bool,
    /// Whether `sub` is present and names the calling application (`client_app_id`).
    pub sub_is_client_app_id: bool,
}
