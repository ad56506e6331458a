//! The decision pipeline: token → claims → caller → app entry → application user → role → decision.
//!
//! Three pure stages, so the cache layer can do its I/O between them without the core knowing:
//! `precheck` (everything before a key is needed), `verify` (key and signature; its result is what a
//! token cache may keep), and `authorize` (time, audience, app-only, allowlist, role, route,
//! impersonation — evaluated afresh on every request so registry changes apply at once).
//! A decision cannot fail: every problem is a `Denied` with a reason.

use super::claims::{AppClaims, AppOnlyEvidence, VerifiedClaims};
use super::ids::{ClientAppId, ObjectId, SpiffeId, TenantId, lower_guid};
use super::keys::{KeySet, VerifyingKey};
use super::reason::DenyReason;
use super::registry::{AppEntryKind, RegistrySnapshot};
use super::token::{self, Claims, MAX_TOKEN_BYTES, UnverifiedToken};
use super::trust::{AppOnlyRule, Audiences, IssuerProfile, TrustSnapshot, TrustedIssuer};
use jsonwebtoken::Algorithm;
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;

/// Request headers, looked up by lower-case name.
pub trait Headers: Sync {
    fn header(&self, name: &str) -> Option<&str>;
}

impl Headers for HashMap<String, String> {
    fn header(&self, name: &str) -> Option<&str> {
        self.get(name).map(String::as_str)
    }
}

/// What is being decided: the raw bearer credential and the request it came with.
pub struct Request<'a> {
    /// The token as received, with or without a `Bearer ` prefix.
    pub token: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub headers: &'a (dyn Headers + Sync),
    /// The calling workload's identity as the proxy saw it (Envoy's `source.principal`: the SPIFFE id
    /// of its client certificate), when one was sent.
    pub source_principal: Option<&'a str>,
}

/// The settings a decision depends on.
#[derive(Clone, Debug)]
pub struct DecisionSettings {
    /// `ServiceAuthEnabled`: when false every call is denied.
    pub service_auth_enabled: bool,
    /// Whether calls must carry `clienttype: service` (always under the MCT settings).
    pub require_client_type: bool,
    pub clock_skew_secs: i64,
    /// Audiences accepted for Entra tokens (and generic issuers without their own).
    pub audiences: Audiences,
    /// Algorithms accepted for Entra tokens.
    pub algorithms: Vec<Algorithm>,
    /// Every app entry must name the workloads it may call from, and every request must come from one
    /// of them. Off: only entries that name source principals are held to them.
    pub require_source_principal: bool,
}

/// Every check, in evaluation order. The first failure is the reason reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    TokenPresent,
    ServiceAuth,
    ClientType,
    Size,
    Syntax,
    Algorithm,
    Issuer,
    Key,
    Signature,
    Lifetime,
    Audience,
    AppOnly,
    Allowlist,
    SourcePrincipal,
    Enabled,
    Role,
    RoutePrivilege,
    Impersonation,
}

impl Check {
    pub const ALL: [Check; 18] = [
        Check::TokenPresent,
        Check::ServiceAuth,
        Check::ClientType,
        Check::Size,
        Check::Syntax,
        Check::Algorithm,
        Check::Issuer,
        Check::Key,
        Check::Signature,
        Check::Lifetime,
        Check::Audience,
        Check::AppOnly,
        Check::Allowlist,
        Check::SourcePrincipal,
        Check::Enabled,
        Check::Role,
        Check::RoutePrivilege,
        Check::Impersonation,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Check::TokenPresent => "token_present",
            Check::ServiceAuth => "service_auth_enabled",
            Check::ClientType => "client_type",
            Check::Size => "size",
            Check::Syntax => "syntax",
            Check::Algorithm => "algorithm",
            Check::Issuer => "issuer",
            Check::Key => "key",
            Check::Signature => "signature",
            Check::Lifetime => "lifetime",
            Check::Audience => "audience",
            Check::AppOnly => "app_only",
            Check::Allowlist => "allowlist",
            Check::SourcePrincipal => "source_principal",
            Check::Enabled => "enabled",
            Check::Role => "role",
            Check::RoutePrivilege => "route_privilege",
            Check::Impersonation => "impersonation",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    Failed,
    Skipped,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceStep {
    pub check: Check,
    pub outcome: Outcome,
    pub detail: String,
}

/// Collects the trace for `Explain`; a disabled trace costs nothing on the hot path.
#[derive(Debug, Default)]
pub struct Trace(Option<Vec<TraceStep>>);

impl Trace {
    pub fn enabled() -> Self {
        Trace(Some(Vec::with_capacity(Check::ALL.len())))
    }

    pub fn disabled() -> Self {
        Trace(None)
    }

    fn pass(&mut self, check: Check, detail: impl FnOnce() -> String) {
        if let Some(steps) = &mut self.0 {
            steps.push(TraceStep {
                check,
                outcome: Outcome::Passed,
                detail: detail(),
            });
        }
    }

    fn skip(&mut self, check: Check, detail: &str) {
        if let Some(steps) = &mut self.0 {
            steps.push(TraceStep {
                check,
                outcome: Outcome::Skipped,
                detail: detail.to_owned(),
            });
        }
    }

    fn fail(&mut self, check: Check, denied: &Denied) {
        if let Some(steps) = &mut self.0 {
            steps.push(TraceStep {
                check,
                outcome: Outcome::Failed,
                detail: format!("{}: {}", denied.reason, denied.message),
            });
        }
    }

    /// The steps in check order, every check not reached marked skipped.
    pub fn finish(self) -> Vec<TraceStep> {
        let Some(steps) = self.0 else {
            return Vec::new();
        };
        let mut recorded = steps.into_iter().peekable();
        let mut out = Vec::with_capacity(Check::ALL.len());
        for check in Check::ALL {
            match recorded.next_if(|s| s.check == check) {
                Some(step) => out.push(step),
                None => out.push(TraceStep {
                    check,
                    outcome: Outcome::Skipped,
                    detail: "not evaluated".to_owned(),
                }),
            }
        }
        out
    }
}

/// The verified identity of the caller; built only from claims whose signature was checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub tenant_id: TenantId,
    pub client_app_id: Option<ClientAppId>,
    pub object_id: Option<ObjectId>,
    pub token_version: Option<String>,
    pub expires_at: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allowed {
    pub caller: Caller,
    pub application_user_id: String,
    pub application_user_name: String,
    pub entry_name: String,
    pub security_role: String,
    pub effective_user: Option<ObjectId>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denied {
    pub reason: DenyReason,
    /// Human text; never token contents.
    pub message: String,
    /// Present only when the signature was verified.
    pub caller: Option<Caller>,
}

impl Denied {
    pub fn new(reason: DenyReason, message: impl Into<String>) -> Self {
        Denied {
            reason,
            message: message.into(),
            caller: None,
        }
    }

    fn with_caller(mut self, caller: &Caller) -> Self {
        self.caller = Some(caller.clone());
        self
    }
}

/// The answer. Never an error: every problem is a deny with a reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow(Box<Allowed>),
    Deny(Box<Denied>),
}

impl Decision {
    pub fn deny(reason: DenyReason, message: impl Into<String>) -> Self {
        Decision::Deny(Box::new(Denied::new(reason, message)))
    }

    pub fn reason(&self) -> Option<DenyReason> {
        match self {
            Decision::Allow(_) => None,
            Decision::Deny(d) => Some(d.reason),
        }
    }

    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow(_))
    }
}

/// A token that passed every check that needs no key, with the issuer it claims.
#[derive(Debug)]
pub struct Prechecked<'a> {
    pub token: UnverifiedToken<'a>,
    pub alg: Algorithm,
    pub issuer: Arc<TrustedIssuer>,
}

impl Prechecked<'_> {
    pub fn kid(&self) -> Option<&str> {
        self.token.header.kid.as_deref()
    }
}

/// A token whose signature checked out: what a verified-token cache may keep. Time, audience and
/// allowlist are not part of it; they are checked on every use.
///
/// Compact on purpose (see `claims`): the claims `authorize` reads, the issuer, and the algorithm and key
/// that verified the signature, so that a cache can tell when the key has left the issuer's JWKS.
#[derive(Clone, Debug)]
pub struct VerifiedToken {
    pub claims: VerifiedClaims,
    pub issuer: Arc<TrustedIssuer>,
    /// The token's `alg`.
    pub alg: Algorithm,
    /// The key that verified the signature; its `kid` is the token's.
    pub key: Arc<VerifyingKey>,
}

impl VerifiedToken {
    /// The token's `kid` (the verifying key's: `KeySet::find` only matches equal ones).
    pub fn kid(&self) -> Option<&str> {
        self.key.kid.as_deref()
    }

    /// The verified identity of the caller, as reported in decisions.
    pub fn caller(&self) -> Caller {
        let app = &self.claims.app;
        Caller {
            tenant_id: self.issuer.tenant.clone(),
            client_app_id: app.client_app_id.clone(),
            object_id: app.object_id.clone(),
            token_version: app.token_version.as_deref().map(str::to_owned),
            expires_at: self.claims.exp,
        }
    }
}

/// Strips an optional, case-insensitive `Bearer ` scheme and surrounding whitespace.
pub fn bearer_token(raw: &str) -> &str {
    let trimmed = raw.trim();
    if trimmed.eq_ignore_ascii_case("bearer") {
        return "";
    }
    match trimmed.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case("bearer ") => trimmed[7..].trim_start(),
        _ => trimmed,
    }
}

/// Stage 1: every check before a key is needed. On success the caller looks up the key for
/// `issuer.jwks_uri` and the token's `kid`, refreshing its cache if it must, then calls `verify`.
pub fn precheck<'a>(
    request: &Request<'a>,
    settings: &DecisionSettings,
    trust: &TrustSnapshot,
    trace: &mut Trace,
) -> Result<Prechecked<'a>, Box<Denied>> {
    let fail = |trace: &mut Trace, check, denied: Denied| {
        trace.fail(check, &denied);
        Err(Box::new(denied))
    };
    let raw = bearer_token(request.token);
    if raw.is_empty() {
        return fail(
            trace,
            Check::TokenPresent,
            Denied::new(DenyReason::TokenMissing, "no bearer token was sent"),
        );
    }
    trace.pass(Check::TokenPresent, String::new);

    if !settings.service_auth_enabled {
        return fail(
            trace,
            Check::ServiceAuth,
            Denied::new(
                DenyReason::ApplicationNotAllowed,
                "service auth is disabled (`ServiceAuthEnabled=false`)",
            ),
        );
    }
    trace.pass(Check::ServiceAuth, String::new);

    if settings.require_client_type {
        if !has_service_client_type(request.headers) {
            return fail(
                trace,
                Check::ClientType,
                Denied::new(
                    DenyReason::ClientTypeMissing,
                    "header `clienttype: service` is required",
                ),
            );
        }
        trace.pass(Check::ClientType, || "clienttype: service".to_owned());
    } else {
        trace.skip(Check::ClientType, "not required");
    }

    if raw.len() > MAX_TOKEN_BYTES {
        return fail(
            trace,
            Check::Size,
            Denied::new(
                DenyReason::TokenTooLarge,
                format!(
                    "token is {} bytes; the limit is {MAX_TOKEN_BYTES}",
                    raw.len()
                ),
            ),
        );
    }
    trace.pass(Check::Size, || format!("{} bytes", raw.len()));

    let token = match token::parse(raw) {
        Ok(t) => t,
        Err(e) => {
            return fail(
                trace,
                Check::Syntax,
                Denied::new(DenyReason::TokenMalformed, e.to_string()),
            );
        }
    };
    trace.pass(Check::Syntax, String::new);

    // `none` and the HMAC family are never accepted, whatever the configuration says.
    let alg = match Algorithm::from_str(&token.header.alg) {
        Ok(a) if a.family() != jsonwebtoken::AlgorithmFamily::Hmac => a,
        _ => {
            return fail(
                trace,
                Check::Algorithm,
                Denied::new(
                    DenyReason::AlgorithmNotAllowed,
                    "token algorithm is not accepted",
                ),
            );
        }
    };
    // The allowed list depends on the issuer, which is checked next; check against the union here and
    // the issuer's own list right after, so that the reported order stays alg → issuer.
    let issuer = trust_issuer(&token.claims, trust);
    let allowed =
        match &issuer {
            Ok(i) => algorithm_allowed(settings, &i.profile, alg),
            Err(_) => settings.algorithms.contains(&alg)
                || trust.issuers().any(
                    |i| matches!(&i.profile, IssuerProfile::Oidc(p) if p.algorithms.contains(&alg)),
                ),
        };
    if !allowed {
        return fail(
            trace,
            Check::Algorithm,
            Denied::new(
                DenyReason::AlgorithmNotAllowed,
                format!("algorithm `{alg:?}` is not accepted"),
            ),
        );
    }
    trace.pass(Check::Algorithm, || format!("{alg:?}"));

    let issuer = match issuer {
        Ok(i) => i,
        Err(denied) => return fail(trace, Check::Issuer, *denied),
    };
    trace.pass(Check::Issuer, || format!("tenant {}", issuer.tenant));
    Ok(Prechecked { token, alg, issuer })
}

/// Whether the request carries `clienttype: service` (value case-insensitive), as the MCT settings require.
pub fn has_service_client_type(headers: &dyn Headers) -> bool {
    headers
        .header("clienttype")
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("service"))
}

/// Whether tokens of an issuer with this profile may be signed with `alg` under the current settings.
pub fn algorithm_allowed(
    settings: &DecisionSettings,
    profile: &IssuerProfile,
    alg: Algorithm,
) -> bool {
    match profile {
        IssuerProfile::Entra => settings.algorithms.contains(&alg),
        IssuerProfile::Oidc(p) => p.algorithms.contains(&alg),
    }
}

fn trust_issuer(claims: &Claims, trust: &TrustSnapshot) -> Result<Arc<TrustedIssuer>, Box<Denied>> {
    let Some(iss) = claims.iss.as_deref() else {
        return Err(Box::new(Denied::new(
            DenyReason::IssuerNotTrusted,
            "token has no `iss`",
        )));
    };
    match trust.issuer(iss) {
        Some(issuer) => {
            if issuer.profile == IssuerProfile::Entra {
                let tid_matches = claims
                    .tid
                    .as_deref()
                    .is_some_and(|tid| TenantId::from_token(tid) == issuer.tenant);
                if !tid_matches {
                    return Err(Box::new(Denied::new(
                        DenyReason::IssuerNotTrusted,
                        "`tid` does not name the tenant of `iss`",
                    )));
                }
            }
            Ok(issuer.clone())
        }
        None if trust.is_pending(claims.tid.as_deref(), iss) => Err(Box::new(Denied::new(
            DenyReason::IssuerUnavailable,
            "the issuer's metadata has not been loaded yet",
        ))),
        None => Err(Box::new(Denied::new(
            DenyReason::IssuerNotTrusted,
            "issuer is not a trusted tenant's",
        ))),
    }
}

/// What the cache layer found for the token's key.
pub enum KeyLookup<'k> {
    /// No usable key set at all (never loaded, or older than the staleness limit).
    Unavailable,
    /// A key set is loaded (and was refreshed if it had to be).
    Loaded(&'k KeySet),
}

/// Stage 2: key and signature. The result is independent of time and registry.
pub fn verify(
    pre: Prechecked<'_>,
    keys: KeyLookup<'_>,
    trace: &mut Trace,
) -> Result<VerifiedToken, Box<Denied>> {
    let fail = |trace: &mut Trace, check, denied: Denied| {
        trace.fail(check, &denied);
        Err(Box::new(denied))
    };
    let set = match keys {
        KeyLookup::Unavailable => {
            return fail(
                trace,
                Check::Key,
                Denied::new(
                    DenyReason::IssuerUnavailable,
                    "no usable signing keys for this issuer",
                ),
            );
        }
        KeyLookup::Loaded(set) => set,
    };
    let key: &Arc<VerifyingKey> = match set.find(pre.kid()) {
        Some(k) => k,
        None => {
            return fail(
                trace,
                Check::Key,
                Denied::new(
                    DenyReason::KeyNotFound,
                    "no published key matches the token's `kid`",
                ),
            );
        }
    };
    if !key.accepts(pre.alg) {
        return fail(
            trace,
            Check::Key,
            Denied::new(
                DenyReason::AlgorithmNotAllowed,
                "the key does not allow the token's algorithm",
            ),
        );
    }
    trace.pass(Check::Key, || pre.kid().unwrap_or("(no kid)").to_owned());

    if !key.verifies(
        pre.alg,
        pre.token.signing_input.as_bytes(),
        &pre.token.signature,
    ) {
        return fail(
            trace,
            Check::Signature,
            Denied::new(DenyReason::SignatureInvalid, "signature does not verify"),
        );
    }
    trace.pass(Check::Signature, String::new);

    let claims = &pre.token.claims;
    let app = match identify(claims, &pre.issuer) {
        Ok(app) => app,
        Err(e) => {
            return fail(
                trace,
                Check::Signature,
                Denied::new(DenyReason::TokenMalformed, e.to_string()),
            );
        }
    };
    Ok(VerifiedToken {
        claims: VerifiedClaims {
            exp: claims.exp,
            nbf: claims.nbf,
            app: Arc::new(app),
        },
        alg: pre.alg,
        key: key.clone(),
        issuer: pre.issuer,
    })
}

/// Reduces signed claims to what the decision reads about the calling application.
fn identify(claims: &Claims, issuer: &TrustedIssuer) -> Result<AppClaims, token::SyntaxError> {
    let custom: (Option<String>, Option<String>);
    let (app, oid, roles) = match &issuer.profile {
        IssuerProfile::Entra => {
            // v1 tokens name the caller in `appid`, v2 in `azp`; tokens without `ver` get whichever is there.
            let app = match claims.ver.as_deref() {
                Some("1.0") => claims.appid.as_deref(),
                Some("2.0") => claims.azp.as_deref(),
                _ => claims.appid.as_deref().or(claims.azp.as_deref()),
            };
            (app, claims.oid.as_deref(), boxed(&claims.roles))
        }
        IssuerProfile::Oidc(p) => {
            custom = (
                claims.custom_str(&p.app_id_claim)?,
                claims.custom_str(&p.object_id_claim)?,
            );
            (
                custom.0.as_deref(),
                custom.1.as_deref(),
                boxed(&claims.custom_roles(&p.roles_claim)?),
            )
        }
    };
    let client_app_id = app.map(ClientAppId::from_token);
    let app_only = AppOnlyEvidence {
        idtyp_is_app: claims.idtyp.as_deref().map(|t| t == "app"),
        has_scp: claims.scp.is_some(),
        oid_is_sub: matches!((&claims.oid, &claims.sub), (Some(oid), Some(sub)) if oid == sub),
        sub_is_client_app_id: match (claims.sub.as_deref(), &client_app_id) {
            (Some(sub), Some(app)) => ClientAppId::from_token(sub) == *app,
            _ => false,
        },
    };
    Ok(AppClaims {
        client_app_id,
        object_id: oid.map(ObjectId::from_token),
        token_version: claims.ver.as_deref().map(Box::from),
        audiences: claims
            .aud
            .iter()
            .map(|a| Box::from(lower_guid(a).as_ref()))
            .collect(),
        roles,
        app_only,
    })
}

fn boxed(strings: &[String]) -> Box<[Box<str>]> {
    strings.iter().map(|s| Box::from(s.as_str())).collect()
}

/// The checks of a verified token that depend on the clock and the configuration but not on the
/// registry: lifetime (with skew) and audience. `authorize` starts with them; the admin port admits a
/// token that passes them (and holds the admin role) without consulting the allowlist.
pub fn authenticate(
    verified: &VerifiedToken,
    settings: &DecisionSettings,
    now: i64,
    trace: &mut Trace,
) -> Result<(), Box<Denied>> {
    let deny = |trace: &mut Trace, check, reason, message: String| {
        let denied = Denied::new(reason, message).with_caller(&verified.caller());
        trace.fail(check, &denied);
        Box::new(denied)
    };
    let claims = &verified.claims;
    let skew = settings.clock_skew_secs;
    if now > claims.exp.saturating_add(skew) {
        return Err(deny(
            trace,
            Check::Lifetime,
            DenyReason::TokenExpired,
            // Saturating: `exp` is whatever the issuer signed, down to `i64::MIN`.
            format!("token expired {} s ago", now.saturating_sub(claims.exp)),
        ));
    }
    if let Some(nbf) = claims.nbf
        && now.saturating_add(skew) < nbf
    {
        return Err(deny(
            trace,
            Check::Lifetime,
            DenyReason::TokenNotYetValid,
            format!("token is valid only in {} s", nbf.saturating_sub(now)),
        ));
    }
    trace.pass(Check::Lifetime, || format!("expires at {}", claims.exp));

    let audiences = match &verified.issuer.profile {
        IssuerProfile::Oidc(p) if !p.audiences.is_empty() => &p.audiences,
        _ => &settings.audiences,
    };
    if !claims
        .app
        .audiences
        .iter()
        .any(|a| audiences.accepts_normalised(a))
    {
        return Err(deny(
            trace,
            Check::Audience,
            DenyReason::AudienceMismatch,
            "token is not for this service's audience".to_owned(),
        ));
    }
    trace.pass(Check::Audience, String::new);
    Ok(())
}

/// Stage 3: everything that depends on the clock, the configuration and the registry.
pub fn authorize(
    verified: &VerifiedToken,
    request: &Request<'_>,
    settings: &DecisionSettings,
    registry: &RegistrySnapshot,
    now: i64,
    trace: &mut Trace,
) -> Decision {
    if let Err(denied) = authenticate(verified, settings, now, trace) {
        return Decision::Deny(denied);
    }
    let caller = verified.caller();
    let deny = |trace: &mut Trace, check, reason, message: String| {
        let denied = Denied::new(reason, message).with_caller(&caller);
        trace.fail(check, &denied);
        Decision::Deny(Box::new(denied))
    };
    let claims = &verified.claims;
    let app = &*claims.app;

    let rule = match &verified.issuer.profile {
        IssuerProfile::Entra => AppOnlyRule::Entra,
        IssuerProfile::Oidc(p) => p.app_only,
    };
    if let Err(why) = app_only(&app.app_only, rule) {
        return deny(
            trace,
            Check::AppOnly,
            DenyReason::NotAppToken,
            why.to_owned(),
        );
    }
    trace.pass(Check::AppOnly, String::new);

    let Some(entry) = registry.find_entry(
        &caller.tenant_id,
        caller.client_app_id.as_ref(),
        caller.object_id.as_ref(),
    ) else {
        return deny(
            trace,
            Check::Allowlist,
            DenyReason::ApplicationNotAllowed,
            "no app entry matches this application in this tenant".to_owned(),
        );
    };
    trace.pass(Check::Allowlist, || {
        format!("entry `{}` ({:?})", entry.name, entry.kind)
    });

    if let Err(why) = source_principal(
        request.source_principal,
        &entry.source_principals,
        &entry.name,
        settings.require_source_principal,
        trace,
    ) {
        return deny(
            trace,
            Check::SourcePrincipal,
            DenyReason::ApplicationNotAllowed,
            why,
        );
    }

    if !entry.enabled {
        return deny(
            trace,
            Check::Enabled,
            DenyReason::ApplicationDisabled,
            format!("app entry `{}` is disabled", entry.name),
        );
    }
    trace.pass(Check::Enabled, String::new);

    match &entry.required_role {
        Some(role) if !app.has_role(role) => {
            return deny(
                trace,
                Check::Role,
                DenyReason::RoleMissing,
                format!("token lacks app role `{role}`"),
            );
        }
        Some(role) => trace.pass(Check::Role, || role.clone()),
        None => trace.skip(
            Check::Role,
            if entry.kind == AppEntryKind::ManagedIdentity {
                "managed identity: no role required"
            } else {
                "no role required"
            },
        ),
    }

    // Validated at snapshot build: every entry has an application user holding a known role.
    let Some((app_user, role)) = registry
        .application_user(&entry.name)
        .and_then(|u| Some((u, registry.role(&u.security_role)?)))
    else {
        return deny(
            trace,
            Check::RoutePrivilege,
            DenyReason::ApplicationNotAllowed,
            "app entry has no application user".to_owned(),
        );
    };

    let route = if registry.has_routes() {
        match registry.route_for(request.method, request.path) {
            None => {
                return deny(
                    trace,
                    Check::RoutePrivilege,
                    DenyReason::PrivilegeMissing,
                    "no route matches this request".to_owned(),
                );
            }
            Some(route) if !role.grants(&route.resource, route.operation) => {
                return deny(
                    trace,
                    Check::RoutePrivilege,
                    DenyReason::PrivilegeMissing,
                    format!(
                        "role `{}` may not {} `{}`",
                        role.name,
                        route.operation.as_str(),
                        route.resource
                    ),
                );
            }
            Some(route) => {
                trace.pass(Check::RoutePrivilege, || {
                    format!("{} `{}`", route.operation.as_str(), route.resource)
                });
                Some(route)
            }
        }
    } else {
        trace.skip(Check::RoutePrivilege, "no route table: role reported only");
        None
    };

    let effective_user = match request
        .headers
        .header("callerobjectid")
        .map(str::trim)
        .filter(|v| !v.is_empty())
    {
        None => {
            trace.skip(Check::Impersonation, "no `callerobjectid`");
            None
        }
        Some(target) => {
            if !role.act_on_behalf {
                return deny(
                    trace,
                    Check::Impersonation,
                    DenyReason::ImpersonationNotAllowed,
                    format!("role `{}` may not act on behalf of users", role.name),
                );
            }
            let target = ObjectId::new(target);
            let Some(user) = registry.user(&target) else {
                return deny(
                    trace,
                    Check::Impersonation,
                    DenyReason::ImpersonationNotAllowed,
                    "the impersonated user is not known".to_owned(),
                );
            };
            // Effective privileges are the intersection of both roles: the user's must grant it too.
            if let Some(route) = route {
                let user_role = registry.role(&user.security_role);
                if !user_role.is_some_and(|r| r.grants(&route.resource, route.operation)) {
                    return deny(
                        trace,
                        Check::Impersonation,
                        DenyReason::PrivilegeMissing,
                        format!(
                            "impersonated user may not {} `{}`",
                            route.operation.as_str(),
                            route.resource
                        ),
                    );
                }
            }
            trace.pass(Check::Impersonation, || {
                format!("acting as user `{}`", user.name)
            });
            Some(target)
        }
    };

    Decision::Allow(Box::new(Allowed {
        caller,
        application_user_id: app_user.id.clone(),
        application_user_name: app_user.name.clone(),
        entry_name: entry.name.clone(),
        security_role: role.name.clone(),
        effective_user,
    }))
}

/// Whether the request comes from a workload the entry allows (Envoy's `source.principal`). Passes or
/// skips on the trace itself; on failure returns the message, and the caller records the deny.
fn source_principal(
    sent: Option<&str>,
    allowed: &[SpiffeId],
    entry: &str,
    required: bool,
    trace: &mut Trace,
) -> Result<(), String> {
    if allowed.is_empty() {
        if required {
            return Err(format!(
                "app entry `{entry}` names no source principals, and every entry must (`require_source_principal`)"
            ));
        }
        trace.skip(
            Check::SourcePrincipal,
            "not required, and the entry names no source principals",
        );
        return Ok(());
    }
    let Some(sent) = sent.map(str::trim).filter(|p| !p.is_empty()) else {
        return Err(format!(
            "no source principal (the calling workload's SPIFFE id) was sent; app entry `{entry}` requires one"
        ));
    };
    // Parsed, not compared as text, so that a trust domain in another case still matches. A principal
    // that is not a SPIFFE id is not echoed: it is whatever the proxy or caller sent.
    let Ok(id) = SpiffeId::parse(sent) else {
        return Err("the source principal is not a SPIFFE id".to_owned());
    };
    if !allowed.contains(&id) {
        return Err(format!(
            "source principal `{id}` is not one app entry `{entry}` may call from"
        ));
    }
    trace.pass(Check::SourcePrincipal, || id.to_string());
    Ok(())
}

fn app_only(evidence: &AppOnlyEvidence, rule: AppOnlyRule) -> Result<(), &'static str> {
    match rule {
        AppOnlyRule::Any => Ok(()),
        AppOnlyRule::Entra => {
            // `idtyp`, when present, alone decides.
            if let Some(is_app) = evidence.idtyp_is_app {
                return if is_app {
                    Ok(())
                } else {
                    Err("`idtyp` is not `app`")
                };
            }
            if evidence.has_scp {
                return Err("token carries delegated scopes (`scp`)");
            }
            if evidence.oid_is_sub {
                Ok(())
            } else {
                Err("`oid` and `sub` differ: not an application token")
            }
        }
        AppOnlyRule::SubEqualsAppId => {
            if evidence.sub_is_client_app_id {
                Ok(())
            } else {
                Err("`sub` is not the application id: not an application token")
            }
        }
    }
}
