//! Table-driven decision cases: claims and request in, expected decision out, through all three pure
//! stages with a real RSA key. Every deny reason of the contract appears here.

use super::decision::{self, KeyLookup, Request};
use super::ids::{ClientAppId, ObjectId, SpiffeId, TenantId};
use super::keys::KeySet;
use super::registry::{
    AppEntry, AppEntryKind, ApplicationUser, Operation, RegistrySnapshot, Route, SecurityRole, User,
};
use super::trust::{
    AppOnlyRule, Audiences, IssuerProfile, OidcProfile, TrustSnapshot, TrustedIssuer,
};
use super::*;
use aws_lc_rs::rsa::{KeyPair, KeySize, PublicKeyComponents};
use aws_lc_rs::signature::RSA_PKCS1_SHA256;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, OnceLock};

mod properties;

const TENANT: &str = "3f6b2a1e-8c4d-4e5f-9a7b-1c2d3e4f5a6b";
const OTHER_TENANT: &str = "aaaaaaaa-8c4d-4e5f-9a7b-1c2d3e4f5a6b";
const APP: &str = "6a1f0c2b-3d4e-4f5a-8b6c-7d8e9f0a1b2c";
const APP_OID: &str = "9c8b7a6f-5e4d-4c3b-8a29-1f0e9d8c7b6a";
const DISABLED_APP: &str = "11111111-3d4e-4f5a-8b6c-7d8e9f0a1b2c";
const MI_OID: &str = "22222222-5e4d-4c3b-8a29-1f0e9d8c7b6a";
const DELEGATE_APP: &str = "33333333-3d4e-4f5a-8b6c-7d8e9f0a1b2c";
const USER_OID: &str = "44444444-5e4d-4c3b-8a29-1f0e9d8c7b6a";
/// An application that may call only from the workloads below (entry `bound`).
const BOUND_APP: &str = "66666666-3d4e-4f5a-8b6c-7d8e9f0a1b2c";
const BOUND_WORKLOAD: &str = "spiffe://cluster.local/ns/orders/sa/orders";
const BOUND_CANARY: &str = "spiffe://cluster.local/ns/orders/sa/orders-canary";
const AUD: &str = "api://b7e3c1a2-4d5e-4f60-8a9b-0c1d2e3f4a5b";
const AUD_GUID: &str = "b7e3c1a2-4d5e-4f60-8a9b-0c1d2e3f4a5b";
const NOW: i64 = 1_800_000_000;
const KID: &str = "test-key";
const OIDC_ISS: &str = "http://127.0.0.1:3000/oidc";
const V1_ISS: &str = "https://sts.windows.net/3f6b2a1e-8c4d-4e5f-9a7b-1c2d3e4f5a6b/";
const V2_ISS: &str = "https://login.microsoftonline.com/3f6b2a1e-8c4d-4e5f-9a7b-1c2d3e4f5a6b/v2.0";

fn key() -> &'static KeyPair {
    static KEY: OnceLock<KeyPair> = OnceLock::new();
    KEY.get_or_init(|| KeyPair::generate(KeySize::Rsa2048).unwrap())
}

fn jwks() -> KeySet {
    let public =
        PublicKeyComponents::<Vec<u8>>::from(aws_lc_rs::signature::KeyPair::public_key(key()));
    let doc = json!({"keys": [{"kty": "RSA", "use": "sig", "kid": KID, "n": URL_SAFE_NO_PAD.encode(&public.n), "e": URL_SAFE_NO_PAD.encode(&public.e)}]});
    KeySet::parse(doc.to_string().as_bytes()).unwrap()
}

fn sign_raw(header: &str, claims: &str) -> String {
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let mut sig = vec![0; key().public_modulus_len()];
    key()
        .sign(
            &RSA_PKCS1_SHA256,
            &aws_lc_rs::rand::SystemRandom::new(),
            input.as_bytes(),
            &mut sig,
        )
        .unwrap();
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

fn sign(claims: &Value) -> String {
    sign_raw(
        &json!({"alg": "RS256", "typ": "JWT", "kid": KID}).to_string(),
        &claims.to_string(),
    )
}

/// A v2 client-credentials app token that the default setup allows.
fn v2_claims() -> Value {
    json!({
        "aud": AUD_GUID, "iss": V2_ISS, "iat": NOW - 60, "nbf": NOW - 60, "exp": NOW + 3600,
        "azp": APP, "azpacr": "1", "oid": APP_OID, "sub": APP_OID, "tid": TENANT,
        "roles": ["S2SAppRole"], "idtyp": "app", "ver": "2.0"
    })
}

fn trust() -> TrustSnapshot {
    let entra = |iss: &str| TrustedIssuer {
        issuer: iss.to_owned(),
        tenant: TenantId::new(TENANT),
        profile: IssuerProfile::Entra,
        jwks_uri: "jwks".to_owned(),
    };
    let oidc = TrustedIssuer {
        issuer: OIDC_ISS.to_owned(),
        tenant: TenantId::new(OIDC_ISS),
        profile: IssuerProfile::Oidc(Arc::new(OidcProfile {
            app_id_claim: "client_id".to_owned(),
            object_id_claim: "sub".to_owned(),
            roles_claim: "roles".to_owned(),
            app_only: AppOnlyRule::SubEqualsAppId,
            audiences: Audiences::new(["https://orders.example"]),
            algorithms: vec![jsonwebtoken::Algorithm::RS256],
        })),
        jwks_uri: "jwks".to_owned(),
    };
    let pending = HashSet::from([TenantId::new("55555555-8c4d-4e5f-9a7b-1c2d3e4f5a6b")]);
    TrustSnapshot::new(
        [entra(V1_ISS), entra(V2_ISS), oidc],
        pending,
        HashSet::new(),
    )
}

fn role(name: &str, grants: &[(&str, Operation)], act_on_behalf: bool) -> SecurityRole {
    let mut privileges: HashMap<String, BTreeSet<Operation>> = HashMap::new();
    for (resource, op) in grants {
        privileges
            .entry((*resource).to_owned())
            .or_default()
            .insert(*op);
    }
    SecurityRole {
        name: name.to_owned(),
        privileges,
        act_on_behalf,
        builtin: false,
    }
}

fn registry(with_routes: bool) -> RegistrySnapshot {
    let entry = |name: &str,
                 tenant: &str,
                 app: Option<&str>,
                 oid: Option<&str>,
                 kind,
                 role: Option<&str>,
                 enabled| AppEntry {
        name: name.to_owned(),
        tenant_id: TenantId::new(tenant),
        client_app_id: app.map(ClientAppId::new),
        object_id: oid.map(ObjectId::new),
        kind,
        required_role: role.map(str::to_owned),
        enabled,
        source_principals: Vec::new(),
    };
    let entries = vec![
        entry(
            "orders",
            TENANT,
            Some(APP),
            None,
            AppEntryKind::ClientCredentials,
            Some("S2SAppRole"),
            true,
        ),
        entry(
            "disabled",
            TENANT,
            Some(DISABLED_APP),
            None,
            AppEntryKind::ClientCredentials,
            Some("S2SAppRole"),
            false,
        ),
        entry(
            "mi",
            TENANT,
            None,
            Some(MI_OID),
            AppEntryKind::ManagedIdentity,
            None,
            true,
        ),
        entry(
            "delegate",
            TENANT,
            Some(DELEGATE_APP),
            None,
            AppEntryKind::ClientCredentials,
            None,
            true,
        ),
        entry(
            "oidc-app",
            OIDC_ISS,
            Some("orders-cli"),
            None,
            AppEntryKind::ClientCredentials,
            Some("S2SAppRole"),
            true,
        ),
        AppEntry {
            source_principals: vec![
                SpiffeId::parse(BOUND_WORKLOAD).unwrap(),
                SpiffeId::parse(BOUND_CANARY).unwrap(),
            ],
            ..entry(
                "bound",
                TENANT,
                Some(BOUND_APP),
                None,
                AppEntryKind::ClientCredentials,
                Some("S2SAppRole"),
                true,
            )
        },
    ];
    let user = |entry: &str, role: &str| ApplicationUser {
        id: format!("{entry}-id"),
        name: format!("{entry} user"),
        entry_name: entry.to_owned(),
        security_role: role.to_owned(),
    };
    let app_users = vec![
        user("orders", "Reader"),
        user("disabled", "Reader"),
        user("mi", "Reader"),
        user("delegate", "Delegate"),
        user("oidc-app", "Reader"),
        user("bound", "Reader"),
    ];
    let roles = vec![
        role("Reader", &[("orders", Operation::Read)], false),
        role(
            "Delegate",
            &[("orders", Operation::Read), ("orders", Operation::Write)],
            true,
        ),
        role("Viewer", &[("orders", Operation::Read)], false),
    ];
    let users = vec![User {
        object_id: ObjectId::new(USER_OID),
        name: "Ada".to_owned(),
        security_role: "Viewer".to_owned(),
    }];
    let routes = if with_routes {
        vec![
            Route {
                id: "r1".to_owned(),
                method: Some("GET".to_owned()),
                path: "/orders".to_owned(),
                resource: "orders".to_owned(),
                operation: Operation::Read,
            },
            Route {
                id: "r2".to_owned(),
                method: Some("POST".to_owned()),
                path: "/orders".to_owned(),
                resource: "orders".to_owned(),
                operation: Operation::Write,
            },
        ]
    } else {
        Vec::new()
    };
    RegistrySnapshot::build(entries, app_users, roles, users, routes).unwrap()
}

fn settings() -> DecisionSettings {
    DecisionSettings {
        service_auth_enabled: true,
        require_client_type: false,
        clock_skew_secs: 300,
        audiences: Audiences::new([AUD]),
        algorithms: vec![jsonwebtoken::Algorithm::RS256],
        require_source_principal: false,
    }
}

struct Case {
    name: &'static str,
    token: String,
    headers: Vec<(&'static str, &'static str)>,
    source_principal: Option<&'static str>,
    method: &'static str,
    path: &'static str,
    settings: DecisionSettings,
    routes: bool,
    keys: Option<KeySet>,
    expect: Result<&'static str, DenyReason>,
}

fn case(name: &'static str, token: String, expect: Result<&'static str, DenyReason>) -> Case {
    Case {
        name,
        token,
        headers: Vec::new(),
        source_principal: None,
        method: "GET",
        path: "/orders",
        settings: settings(),
        routes: false,
        keys: Some(jwks()),
        expect,
    }
}

fn with(mut claims: Value, changes: Value) -> Value {
    for (k, v) in changes.as_object().unwrap() {
        if v.is_null() {
            claims.as_object_mut().unwrap().remove(k);
        } else {
            claims[k] = v.clone();
        }
    }
    claims
}

fn run(c: &Case) -> (Decision, Vec<TraceStep>) {
    let headers: HashMap<String, String> = c
        .headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let request = Request {
        token: &c.token,
        method: c.method,
        path: c.path,
        headers: &headers,
        source_principal: c.source_principal,
    };
    let mut trace = Trace::enabled();
    let decision = (|| {
        let pre = decision::precheck(&request, &c.settings, &trust(), &mut trace)
            .map_err(Decision::Deny)?;
        let keys = match &c.keys {
            Some(set) => KeyLookup::Loaded(set),
            None => KeyLookup::Unavailable,
        };
        let verified = decision::verify(pre, keys, &mut trace).map_err(Decision::Deny)?;
        Ok::<_, Decision>(decision::authorize(
            &verified,
            &request,
            &c.settings,
            &registry(c.routes),
            NOW,
            &mut trace,
        ))
    })()
    .unwrap_or_else(|d| d);
    (decision, trace.finish())
}

#[test]
fn every_case_decides_as_expected() {
    let v2 = v2_claims();
    let v1 = with(
        v2.clone(),
        json!({"iss": V1_ISS, "ver": "1.0", "azp": null, "appid": APP, "aud": AUD}),
    );
    let header = |h: Value| h.to_string();
    let hs256_with_public_key = {
        // RS/HS confusion: an attacker signs with HMAC using the (public) RSA key as the secret.
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","kid":"test-key"}"#),
            URL_SAFE_NO_PAD.encode(v2.to_string())
        );
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(b"forged"))
    };
    let unsigned = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
        URL_SAFE_NO_PAD.encode(v2.to_string())
    );
    let alg_none_with_sig = format!(
        "{}.{}.c2ln",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
        URL_SAFE_NO_PAD.encode(v2.to_string())
    );
    let mut tampered = sign(&v2);
    let payload_with_other_role =
        URL_SAFE_NO_PAD.encode(with(v2.clone(), json!({"roles": ["Admin"]})).to_string());
    let parts: Vec<&str> = tampered.split('.').collect();
    tampered = format!("{}.{payload_with_other_role}.{}", parts[0], parts[2]);
    let oidc = json!({"iss": OIDC_ISS, "aud": "https://orders.example", "exp": NOW + 600, "client_id": "orders-cli", "sub": "orders-cli", "roles": ["S2SAppRole"]});

    let mut cases = vec![
        case("v2 app token", sign(&v2), Ok("orders")),
        case(
            "v1 app token with App ID URI audience",
            sign(&v1),
            Ok("orders"),
        ),
        case(
            "bearer prefix",
            format!("Bearer {}", sign(&v2)),
            Ok("orders"),
        ),
        case(
            "managed identity by object id, no role needed",
            sign(&with(
                v2.clone(),
                json!({"azp": "77777777-3d4e-4f5a-8b6c-7d8e9f0a1b2c", "oid": MI_OID, "sub": MI_OID, "roles": null}),
            )),
            Ok("mi"),
        ),
        case(
            "expired within skew",
            sign(&with(v2.clone(), json!({"exp": NOW - 200}))),
            Ok("orders"),
        ),
        case(
            "fractional exp",
            sign(&with(v2.clone(), json!({"exp": (NOW + 10) as f64 + 0.5}))),
            Ok("orders"),
        ),
        case(
            "aud array",
            sign(&with(
                v2.clone(),
                json!({"aud": ["https://other", AUD_GUID]}),
            )),
            Ok("orders"),
        ),
        case(
            "aud: the GUID in upper case is the same audience",
            sign(&with(
                v2.clone(),
                json!({"aud": AUD_GUID.to_ascii_uppercase()}),
            )),
            Ok("orders"),
        ),
        case(
            "aud: the Application ID URI in upper case is not",
            sign(&with(v2.clone(), json!({"aud": AUD.to_ascii_uppercase()}))),
            Err(DenyReason::AudienceMismatch),
        ),
        case(
            "no idtyp: no scp and oid == sub is app-only",
            sign(&with(v2.clone(), json!({"idtyp": null}))),
            Ok("orders"),
        ),
        case(
            "generic OIDC issuer (RFC 9068 client credentials)",
            sign(&oidc),
            Ok("oidc-app"),
        ),
        case("empty", String::new(), Err(DenyReason::TokenMissing)),
        case(
            "bearer only",
            "Bearer ".to_owned(),
            Err(DenyReason::TokenMissing),
        ),
        case(
            "too large",
            "a".repeat(16_385),
            Err(DenyReason::TokenTooLarge),
        ),
        case(
            "two segments",
            "abc.def".to_owned(),
            Err(DenyReason::TokenMalformed),
        ),
        case(
            "unsigned (alg none, empty signature)",
            unsigned,
            Err(DenyReason::AlgorithmNotAllowed),
        ),
        case(
            "crit header",
            sign_raw(
                &header(json!({"alg":"RS256","kid":KID,"crit":["exp"],"exp":1})),
                &v2.to_string(),
            ),
            Err(DenyReason::TokenMalformed),
        ),
        case(
            "b64 false",
            sign_raw(
                &header(json!({"alg":"RS256","kid":KID,"b64":false})),
                &v2.to_string(),
            ),
            Err(DenyReason::TokenMalformed),
        ),
        case(
            "nested JWT",
            sign_raw(
                &header(json!({"alg":"RS256","kid":KID,"cty":"JWT"})),
                &v2.to_string(),
            ),
            Err(DenyReason::TokenMalformed),
        ),
        case(
            "duplicate aud",
            sign_raw(
                &header(json!({"alg":"RS256","kid":KID})),
                &format!(r#"{{"aud":"x",{}"#, &v2.to_string()[1..]),
            ),
            Err(DenyReason::TokenMalformed),
        ),
        case(
            "no exp",
            sign(&with(v2.clone(), json!({"exp": null}))),
            Err(DenyReason::TokenMalformed),
        ),
        case(
            "string exp",
            sign(&with(v2.clone(), json!({"exp": "soon"}))),
            Err(DenyReason::TokenMalformed),
        ),
        case(
            "roles as string",
            sign(&with(v2.clone(), json!({"roles": "S2SAppRole"}))),
            Err(DenyReason::TokenMalformed),
        ),
        case(
            "alg none",
            alg_none_with_sig,
            Err(DenyReason::AlgorithmNotAllowed),
        ),
        case(
            "HS256 with the public key as secret",
            hs256_with_public_key,
            Err(DenyReason::AlgorithmNotAllowed),
        ),
        case(
            "RS384 not configured",
            sign_raw(&header(json!({"alg":"RS384","kid":KID})), &v2.to_string()),
            Err(DenyReason::AlgorithmNotAllowed),
        ),
        case(
            "unknown issuer",
            sign(&with(v2.clone(), json!({"iss": "https://evil.example/"}))),
            Err(DenyReason::IssuerNotTrusted),
        ),
        case(
            "no iss",
            sign(&with(v2.clone(), json!({"iss": null}))),
            Err(DenyReason::IssuerNotTrusted),
        ),
        case(
            "tid not the tenant of iss",
            sign(&with(v2.clone(), json!({"tid": OTHER_TENANT}))),
            Err(DenyReason::IssuerNotTrusted),
        ),
        case(
            // Identifiers from a token are compared as signed, never trimmed.
            "tid with a trailing space",
            sign(&with(v2.clone(), json!({"tid": format!("{TENANT} ")}))),
            Err(DenyReason::IssuerNotTrusted),
        ),
        case(
            "other tenant's issuer",
            sign(&with(
                v2.clone(),
                json!({"iss": format!("https://login.microsoftonline.com/{OTHER_TENANT}/v2.0"), "tid": OTHER_TENANT}),
            )),
            Err(DenyReason::IssuerNotTrusted),
        ),
        case(
            "trusted tenant not yet discovered",
            sign(&with(
                v2.clone(),
                json!({"iss": "https://login.microsoftonline.com/55555555-8c4d-4e5f-9a7b-1c2d3e4f5a6b/v2.0", "tid": "55555555-8c4d-4e5f-9a7b-1c2d3e4f5a6b"}),
            )),
            Err(DenyReason::IssuerUnavailable),
        ),
        case(
            "unknown kid",
            sign_raw(
                &header(json!({"alg":"RS256","kid":"rotated-away"})),
                &v2.to_string(),
            ),
            Err(DenyReason::KeyNotFound),
        ),
        case(
            "jku header is ignored: still our key",
            sign_raw(
                &header(json!({"alg":"RS256","kid":"evil","jku":"https://evil.example/jwks"})),
                &v2.to_string(),
            ),
            Err(DenyReason::KeyNotFound),
        ),
        case(
            // 343 characters end in two bits that must be zero and are not: not base64url.
            "signature segment not canonical base64url",
            format!("{}x", sign(&v2)),
            Err(DenyReason::TokenMalformed),
        ),
        case(
            "tampered payload",
            tampered,
            Err(DenyReason::SignatureInvalid),
        ),
        case(
            "expired beyond skew",
            sign(&with(v2.clone(), json!({"exp": NOW - 301}))),
            Err(DenyReason::TokenExpired),
        ),
        case(
            "exp at the bottom of i64 (the message must not overflow)",
            sign(&with(v2.clone(), json!({"exp": i64::MIN}))),
            Err(DenyReason::TokenExpired),
        ),
        case(
            "nbf at the top of i64",
            sign(&with(v2.clone(), json!({"nbf": i64::MAX}))),
            Err(DenyReason::TokenNotYetValid),
        ),
        case(
            "not yet valid beyond skew",
            sign(&with(v2.clone(), json!({"nbf": NOW + 301}))),
            Err(DenyReason::TokenNotYetValid),
        ),
        case(
            "other audience of the same tenant",
            sign(&with(v2.clone(), json!({"aud": "api://another-api"}))),
            Err(DenyReason::AudienceMismatch),
        ),
        case(
            "no aud",
            sign(&with(v2.clone(), json!({"aud": null}))),
            Err(DenyReason::AudienceMismatch),
        ),
        case(
            "user token (idtyp user)",
            sign(&with(v2.clone(), json!({"idtyp": "user"}))),
            Err(DenyReason::NotAppToken),
        ),
        case(
            "delegated token (scp, no idtyp)",
            sign(&with(
                v2.clone(),
                json!({"idtyp": null, "scp": "Orders.Read"}),
            )),
            Err(DenyReason::NotAppToken),
        ),
        case(
            "oid != sub, no idtyp",
            sign(&with(
                v2.clone(),
                json!({"idtyp": null, "sub": "someone-else"}),
            )),
            Err(DenyReason::NotAppToken),
        ),
        case(
            "OIDC token whose sub is not the client",
            sign(&with(oidc.clone(), json!({"sub": "a-user"}))),
            Err(DenyReason::NotAppToken),
        ),
        case(
            "unlisted app",
            sign(&with(
                v2.clone(),
                json!({"azp": "88888888-3d4e-4f5a-8b6c-7d8e9f0a1b2c"}),
            )),
            Err(DenyReason::ApplicationNotAllowed),
        ),
        case(
            "azp with a leading space is another application",
            sign(&with(v2.clone(), json!({"azp": format!(" {APP}")}))),
            Err(DenyReason::ApplicationNotAllowed),
        ),
        case(
            "oid with a leading space is not the managed identity",
            sign(&with(
                v2.clone(),
                json!({"azp": "77777777-3d4e-4f5a-8b6c-7d8e9f0a1b2c", "oid": format!(" {MI_OID}"), "sub": format!(" {MI_OID}"), "roles": null}),
            )),
            Err(DenyReason::ApplicationNotAllowed),
        ),
        case(
            "an upper-case azp is the same GUID",
            sign(&with(v2.clone(), json!({"azp": APP.to_ascii_uppercase()}))),
            Ok("orders"),
        ),
        case(
            "v1 token's appid decides, not azp",
            sign(&with(
                v1.clone(),
                json!({"appid": "88888888-3d4e-4f5a-8b6c-7d8e9f0a1b2c", "azp": APP}),
            )),
            Err(DenyReason::ApplicationNotAllowed),
        ),
        case(
            "disabled entry",
            sign(&with(v2.clone(), json!({"azp": DISABLED_APP}))),
            Err(DenyReason::ApplicationDisabled),
        ),
        case(
            "role missing",
            sign(&with(v2.clone(), json!({"roles": ["Other"]}))),
            Err(DenyReason::RoleMissing),
        ),
        case(
            "roles absent",
            sign(&with(v2.clone(), json!({"roles": null}))),
            Err(DenyReason::RoleMissing),
        ),
    ];

    let mut c = case(
        "no keys loaded",
        sign(&v2),
        Err(DenyReason::IssuerUnavailable),
    );
    c.keys = None;
    cases.push(c);
    let mut c = case(
        "service auth disabled",
        sign(&v2),
        Err(DenyReason::ApplicationNotAllowed),
    );
    c.settings.service_auth_enabled = false;
    cases.push(c);
    let mut c = case(
        "clienttype required and missing",
        sign(&v2),
        Err(DenyReason::ClientTypeMissing),
    );
    c.settings.require_client_type = true;
    cases.push(c);
    let mut c = case("clienttype is case-insensitive", sign(&v2), Ok("orders"));
    c.settings.require_client_type = true;
    c.headers = vec![("clienttype", "Service")];
    cases.push(c);
    let mut c = case("route grants read", sign(&v2), Ok("orders"));
    c.routes = true;
    c.path = "/orders/42?expand=lines";
    cases.push(c);
    let mut c = case(
        "route needs write",
        sign(&v2),
        Err(DenyReason::PrivilegeMissing),
    );
    c.routes = true;
    c.method = "POST";
    cases.push(c);
    let mut c = case(
        "no route matches: deny by default",
        sign(&v2),
        Err(DenyReason::PrivilegeMissing),
    );
    c.routes = true;
    c.path = "/invoices";
    cases.push(c);
    let mut c = case(
        "impersonation without act_on_behalf",
        sign(&v2),
        Err(DenyReason::ImpersonationNotAllowed),
    );
    c.headers = vec![("callerobjectid", USER_OID)];
    cases.push(c);
    let delegate = sign(&with(v2.clone(), json!({"azp": DELEGATE_APP})));
    let mut c = case(
        "impersonation of a known user",
        delegate.clone(),
        Ok("delegate"),
    );
    c.headers = vec![("callerobjectid", USER_OID)];
    c.routes = true;
    cases.push(c);
    let mut c = case(
        "impersonation of an unknown user",
        delegate.clone(),
        Err(DenyReason::ImpersonationNotAllowed),
    );
    c.headers = vec![("callerobjectid", "99999999-5e4d-4c3b-8a29-1f0e9d8c7b6a")];
    cases.push(c);
    let mut c = case(
        "impersonation: intersection lacks write",
        delegate,
        Err(DenyReason::PrivilegeMissing),
    );
    c.headers = vec![("callerobjectid", USER_OID)];
    c.routes = true;
    c.method = "POST";
    cases.push(c);

    let mut seen = HashSet::new();
    for c in &cases {
        let (decision, trace) = run(c);
        match (&c.expect, &decision) {
            (Ok(entry), Decision::Allow(a)) => assert_eq!(a.entry_name, *entry, "{}", c.name),
            (Err(reason), Decision::Deny(d)) => {
                assert_eq!(d.reason, *reason, "{}: {}", c.name, d.message);
                seen.insert(*reason);
                assert!(
                    !d.message.contains(&c.token[..c.token.len().min(20)]) || c.token.len() < 20,
                    "{}: message leaks the token",
                    c.name
                );
            }
            _ => panic!("{}: expected {:?}, got {decision:?}", c.name, c.expect),
        }
        // The trace covers every check in order; exactly one fails on a deny, none on an allow.
        assert_eq!(
            trace.iter().map(|s| s.check).collect::<Vec<_>>(),
            Check::ALL,
            "{}",
            c.name
        );
        let failed = trace
            .iter()
            .filter(|s| s.outcome == Outcome::Failed)
            .count();
        assert_eq!(failed, usize::from(!decision.is_allowed()), "{}", c.name);
    }
    let missing: Vec<_> = DenyReason::ALL
        .iter()
        .filter(|r| !seen.contains(r))
        .collect();
    assert!(missing.is_empty(), "reasons without a case: {missing:?}");
}

/// (name, token, principal sent, required for every entry, the entry allowed or a message fragment)
type PrincipalCase<'a> = (
    &'static str,
    &'a String,
    Option<&'static str>,
    bool,
    Result<&'static str, &'static str>,
);

/// The source-principal check (Envoy's `source.principal`, a SPIFFE id): per entry, and for every entry
/// when required; right after the allowlist, so it is decided before `enabled`, the role and routes.
#[test]
fn source_principals_bind_an_entry_to_its_workloads() {
    let bound = sign(&with(v2_claims(), json!({"azp": BOUND_APP})));
    let orders = sign(&v2_claims());
    let disabled = sign(&with(v2_claims(), json!({"azp": DISABLED_APP})));
    let required = DecisionSettings {
        require_source_principal: true,
        ..settings()
    };
    let table: [PrincipalCase; 11] = [
        (
            "bound, its workload",
            &bound,
            Some(BOUND_WORKLOAD),
            false,
            Ok("bound"),
        ),
        (
            "bound, its other workload",
            &bound,
            Some(BOUND_CANARY),
            false,
            Ok("bound"),
        ),
        (
            "bound, trust domain in another case",
            &bound,
            Some("spiffe://Cluster.LOCAL/ns/orders/sa/orders"),
            false,
            Ok("bound"),
        ),
        (
            "bound, required too",
            &bound,
            Some(BOUND_WORKLOAD),
            true,
            Ok("bound"),
        ),
        (
            "bound, nothing sent",
            &bound,
            None,
            false,
            Err("no source principal"),
        ),
        (
            "bound, blank",
            &bound,
            Some("  "),
            false,
            Err("no source principal"),
        ),
        (
            "bound, another workload",
            &bound,
            Some("spiffe://cluster.local/ns/billing/sa/billing"),
            false,
            Err(
                "`spiffe://cluster.local/ns/billing/sa/billing` is not one app entry `bound` may call from",
            ),
        ),
        (
            "bound, path case differs",
            &bound,
            Some("spiffe://cluster.local/ns/orders/sa/Orders"),
            false,
            Err("is not one app entry `bound` may call from"),
        ),
        (
            "bound, not a SPIFFE id",
            &bound,
            Some("CN=orders,O=evil"),
            false,
            Err("is not a SPIFFE id"),
        ),
        (
            "unbound, not required: any source",
            &orders,
            Some("CN=whatever"),
            false,
            Ok("orders"),
        ),
        (
            "unbound, required: the entry must name its workloads",
            &orders,
            Some(BOUND_WORKLOAD),
            true,
            Err("app entry `orders` names no source principals"),
        ),
    ];
    for (name, token, principal, require, expect) in table {
        let mut c = case(name, token.clone(), Ok("unused"));
        c.source_principal = principal;
        if require {
            c.settings = required.clone();
        }
        let (decision, trace) = run(&c);
        let step = trace
            .iter()
            .find(|s| s.check == Check::SourcePrincipal)
            .unwrap();
        match (expect, &decision) {
            (Ok(entry), Decision::Allow(a)) => {
                assert_eq!(a.entry_name, entry, "{name}");
                let bound_entry = entry == "bound";
                let expected = if bound_entry {
                    Outcome::Passed
                } else {
                    Outcome::Skipped
                };
                assert_eq!(step.outcome, expected, "{name}: {step:?}");
            }
            (Err(fragment), Decision::Deny(d)) => {
                assert_eq!(d.reason, DenyReason::ApplicationNotAllowed, "{name}");
                assert!(d.message.contains(fragment), "{name}: {}", d.message);
                assert_eq!(step.outcome, Outcome::Failed, "{name}: {step:?}");
                assert!(d.caller.is_some(), "{name}: the token was verified");
            }
            _ => panic!("{name}: expected {expect:?}, got {decision:?}"),
        }
    }
    // Placed right after the allowlist: a disabled entry is refused for its source before `enabled`.
    let mut c = case("x", disabled, Ok("unused"));
    c.settings = required;
    let (decision, trace) = run(&c);
    assert_eq!(decision.reason(), Some(DenyReason::ApplicationNotAllowed));
    let outcome = |check| trace.iter().find(|s| s.check == check).unwrap().outcome;
    assert_eq!(outcome(Check::Allowlist), Outcome::Passed);
    assert_eq!(outcome(Check::SourcePrincipal), Outcome::Failed);
    assert_eq!(outcome(Check::Enabled), Outcome::Skipped);
    let position = |check| Check::ALL.iter().position(|c| *c == check).unwrap();
    assert_eq!(
        position(Check::SourcePrincipal),
        position(Check::Allowlist) + 1
    );
}

#[test]
fn caller_is_reported_only_once_the_signature_is_verified() {
    let v2 = v2_claims();
    let (role_missing, _) = run(&case(
        "x",
        sign(&with(v2.clone(), json!({"roles": []}))),
        Err(DenyReason::RoleMissing),
    ));
    let Decision::Deny(d) = role_missing else {
        panic!("expected deny")
    };
    let caller = d.caller.expect("verified caller");
    assert_eq!(caller.client_app_id, Some(ClientAppId::new(APP)));
    assert_eq!(caller.token_version.as_deref(), Some("2.0"));
    assert_eq!(caller.expires_at, NOW + 3600);

    // One signature byte flipped, re-encoded so that the segment stays canonical base64url.
    let token = sign(&v2);
    let (input, sig) = token.rsplit_once('.').unwrap();
    let mut sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
    sig[0] ^= 1;
    let (bad_sig, _) = run(&case(
        "x",
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig)),
        Err(DenyReason::SignatureInvalid),
    ));
    let Decision::Deny(d) = bad_sig else {
        panic!("expected deny")
    };
    assert_eq!(d.reason, DenyReason::SignatureInvalid);
    assert_eq!(d.caller, None);
}

#[test]
fn impersonation_reports_the_effective_user() {
    let mut c = case(
        "x",
        sign(&with(v2_claims(), json!({"azp": DELEGATE_APP}))),
        Ok("delegate"),
    );
    c.headers = vec![("callerobjectid", USER_OID)];
    let (decision, _) = run(&c);
    let Decision::Allow(a) = decision else {
        panic!("expected allow")
    };
    assert_eq!(a.effective_user, Some(ObjectId::new(USER_OID)));
    assert_eq!(a.security_role, "Delegate");
}
