//! Hostile tokens (RFC 8725 and the known JWT attack classes) against the real server in-process: each
//! attack is signed for real where it needs a signature, sent through the native API (`Decide`, the
//! reason and whether a caller is named) and through Envoy's `Check` (HTTP status, challenge and
//! `x-s2s-deny-reason`), must not make the sidecar fetch anything it should not, and leaves the server
//! healthy and still allowing a valid token. Ends with proptest-generated requests through both APIs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use aws_lc_rs::rsa::{KeyPair as RsaKeyPair, PublicKeyComponents};
use aws_lc_rs::signature::{KeyPair as _, RSA_PKCS1_SHA256};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use common::*;
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{CheckResponse, attribute_context};
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use s2s_authz::config::{self, MctSettings, ServeArgs};
use s2s_authz::devissuer::{DevIssuer, TokenVersion};
use s2s_authz::proto::s2sauthz::v1::DenyReason;
use s2s_authz::server;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tonic::transport::Endpoint;

/// A second tenant the sidecar trusts (configured, with its own app), for the cross-tenant attacks.
const PARTNER_TENANT: &str = "7b8c9d0e-1f2a-4b3c-8d4e-5f6a7b8c9d0e";
const PARTNER_APP: &str = "0a9b8c7d-6e5f-4a3b-9c2d-1e0f9a8b7c6d";
const PARTNER_OID: &str = "5e6f7a8b-9c0d-4e1f-8a2b-3c4d5e6f7a8b";

fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The development setup plus `PARTNER_TENANT` (trusted, with one client at the development issuer).
/// An unknown `kid` may refresh the JWKS on every request (no minimum interval), so that a test can
/// tell the attacks that reach the key cache from those that must never get that far; a request waits
/// for that refresh to finish (bounded) so that fetch counts are settled when it returns.
async fn start() -> TestServer {
    let mut yaml = Config::new()
        .key("min_refresh_interval_secs", 0)
        .key("unknown_kid_wait_ms", 20_000)
        .yaml();
    let tenants = format!("  tenants: [{TENANT}]\n");
    assert!(yaml.contains(&tenants), "{yaml}");
    yaml = yaml.replace(
        &tenants,
        &format!("  tenants: [{TENANT}, {PARTNER_TENANT}]\n"),
    );
    // The development issuer's tenant list is the file's last section.
    assert!(
        yaml.trim_end().ends_with("token_version: \"1.0\""),
        "{yaml}"
    );
    yaml.push_str(&format!(
        r#"    - tenant_id: {PARTNER_TENANT}
      clients:
        - client_id: {PARTNER_APP}
          client_secret: dev-secret-partner
          object_id: {PARTNER_OID}
          roles: [{APP_ROLE}]
          token_version: "2.0"
"#
    ));
    let file = config::parse_yaml(&yaml, "hostile-token test configuration").expect("yaml");
    let settings = config::resolve(file, &ServeArgs::default(), &MctSettings::default())
        .expect("configuration resolves");
    let running = server::start(settings).await.expect("server starts");
    let channel = Endpoint::from_shared(format!("http://{}", running.grpc_addr))
        .unwrap()
        .connect()
        .await
        .expect("connect to the decision port");
    let server = TestServer { running, channel };
    server.wait_serving().await;
    server
}

fn claims(dev: &DevIssuer) -> Value {
    v2_claims(dev, ORDERS_APP, ORDERS_OID, &[APP_ROLE])
}

fn with(mut claims: Value, changes: &[(&str, Value)]) -> Value {
    for (k, v) in changes {
        if v.is_null() {
            claims.as_object_mut().unwrap().remove(*k);
        } else {
            claims[*k] = v.clone();
        }
    }
    claims
}

fn header(kid: &str) -> Value {
    json!({"alg": "RS256", "typ": "JWT", "kid": kid})
}

/// RS256 over arbitrary header and claims bytes (not necessarily UTF-8 or JSON) with the issuer's
/// current signing key: a genuine signature over whatever the attack needs.
fn sign_bytes(dev: &DevIssuer, header: &[u8], claims: &[u8]) -> String {
    let der = dev.private_key_pkcs8_der(&dev.current_kid()).unwrap();
    let key = RsaKeyPair::from_pkcs8(&der).unwrap();
    rs256(&key, header, claims)
}

fn rs256(key: &RsaKeyPair, header: &[u8], claims: &[u8]) -> String {
    let input = format!("{}.{}", b64(header), b64(claims));
    let mut sig = vec![0; key.public_modulus_len()];
    key.sign(
        &RSA_PKCS1_SHA256,
        &aws_lc_rs::rand::SystemRandom::new(),
        input.as_bytes(),
        &mut sig,
    )
    .unwrap();
    format!("{input}.{}", b64(sig))
}

/// Claims as JSON text with `"__X__"` replaced verbatim (for literals `serde_json` cannot write).
fn raw_claims(claims: &Value, literal: &str) -> String {
    let text = claims.to_string();
    assert!(text.contains("\"__X__\""), "no placeholder in {text}");
    text.replace("\"__X__\"", literal)
}

/// One hostile token and what the sidecar must answer.
struct Attack {
    name: String,
    token: String,
    reason: DenyReason,
    /// Whether the signature checks out (then the deny names the verified caller).
    verified: bool,
    /// Whether the attack legitimately reaches the key cache with an unknown `kid`, which may refresh
    /// the trusted issuer's JWKS once (SPEC §4). Every other attack must cause no fetch at all.
    unknown_kid: bool,
}

impl Attack {
    /// Refused before the signature is checked, without any fetch.
    fn early(name: impl Into<String>, token: String, reason: DenyReason) -> Self {
        Attack {
            name: name.into(),
            token,
            reason,
            verified: false,
            unknown_kid: false,
        }
    }

    /// `KEY_NOT_FOUND`: the trusted issuer publishes no such key.
    fn unknown_kid(name: impl Into<String>, token: String) -> Self {
        Attack {
            unknown_kid: true,
            ..Attack::early(name, token, DenyReason::KeyNotFound)
        }
    }

    /// Genuinely signed, refused after verification: the deny names the caller.
    fn verified(name: impl Into<String>, token: String, reason: DenyReason) -> Self {
        Attack {
            verified: true,
            ..Attack::early(name, token, reason)
        }
    }
}

/// HTTP status, `CheckResponse.status` code and challenge that SPEC §2.2/§2.3 give a reason.
fn expected_check_shape(reason: DenyReason) -> (i32, i32, Option<&'static str>) {
    use DenyReason as R;
    match reason {
        R::TokenMissing => (401, 16, Some("Bearer")),
        R::IssuerUnavailable => (503, 14, None),
        R::TokenMalformed
        | R::TokenTooLarge
        | R::AlgorithmNotAllowed
        | R::KeyNotFound
        | R::SignatureInvalid
        | R::TokenExpired
        | R::TokenNotYetValid
        | R::IssuerNotTrusted
        | R::AudienceMismatch => (401, 16, Some("Bearer error=\"invalid_token\"")),
        _ => (403, 7, Some("Bearer error=\"insufficient_scope\"")),
    }
}

/// Asserts `response` is the denied `CheckResponse` for `reason`.
fn assert_check_denied(response: &CheckResponse, reason: DenyReason, name: &str) {
    let (http, code, challenge) = expected_check_shape(reason);
    assert_eq!(
        response.status.as_ref().map(|s| s.code),
        Some(code),
        "{name}: {response:?}"
    );
    let Some(HttpResponse::DeniedResponse(denied)) = &response.http_response else {
        panic!("{name}: expected a denied response, got {response:?}");
    };
    assert_eq!(denied.status.as_ref().map(|s| s.code), Some(http), "{name}");
    let headers: HashMap<&str, &str> = denied
        .headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .map(|h| (h.key.as_str(), h.value.as_str()))
        .collect();
    assert_eq!(
        headers.get("x-s2s-deny-reason").copied(),
        Some(reason.as_str_name()),
        "{name}"
    );
    assert_eq!(
        headers.get("www-authenticate").copied(),
        challenge,
        "{name}"
    );
    let body: Value = serde_json::from_str(&denied.body).expect("JSON body");
    assert_eq!(body["reason"], reason.as_str_name(), "{name}");
}

fn assert_check_allowed(response: &CheckResponse, name: &str) {
    let Some(HttpResponse::OkResponse(ok)) = &response.http_response else {
        panic!("{name}: expected an ok response, got {response:?}");
    };
    assert_eq!(response.status.as_ref().map(|s| s.code), Some(0), "{name}");
    let app = ok
        .headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .find(|h| h.key == "x-s2s-client-app-id")
        .map(|h| h.value.as_str());
    assert_eq!(app, Some(ORDERS_APP), "{name}");
}

async fn check_bearer(server: &TestServer, token: &str) -> CheckResponse {
    server
        .check(&[("authorization", &format!("Bearer {token}"))])
        .await
}

/// Sends every attack through both APIs and checks answers and fetches; then that the server is
/// still healthy and still allows a valid token.
async fn refuse_all(server: &TestServer, attacks: &[Attack]) {
    let dev = server.dev();
    assert!(!attacks.is_empty());
    for attack in attacks {
        let name = &attack.name;
        let (discovery, jwks) = (dev.discovery_fetches(), dev.jwks_fetches());

        let response = server.decide(&attack.token).await;
        assert!(!response.allowed, "{name}: allowed! {response:?}");
        assert_eq!(response.reason(), attack.reason, "{name}: {response:?}");
        assert_denied(&response, attack.reason, attack.verified);
        if attack.verified {
            assert_eq!(
                response.caller.as_ref().unwrap().client_app_id,
                ORDERS_APP,
                "{name}"
            );
        }
        assert_check_denied(
            &check_bearer(server, &attack.token).await,
            attack.reason,
            name,
        );

        assert_eq!(
            dev.discovery_fetches(),
            discovery,
            "{name}: no discovery fetch"
        );
        let refreshed = dev.jwks_fetches() - jwks;
        if attack.unknown_kid {
            // At most the one refresh per request that an unknown kid may cause (one per API call).
            assert!(refreshed <= 2, "{name}: {refreshed} JWKS fetches");
        } else {
            assert_eq!(refreshed, 0, "{name}: no JWKS fetch");
        }
    }
    assert_still_serving(server).await;
}

async fn assert_still_serving(server: &TestServer) {
    for service in HEALTH_SERVICES {
        assert_eq!(
            server.health(service).await,
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            "health of {service:?}"
        );
    }
    let valid = orders_token(server.dev());
    assert_allowed(&server.decide(&valid).await);
    assert_check_allowed(&check_bearer(server, &valid).await, "valid token");
}

#[tokio::test]
async fn alg_none_in_any_spelling_is_refused() {
    let server = start().await;
    let dev = server.dev();
    let kid = dev.current_kid();
    let claims = claims(dev).to_string();
    let mut attacks = Vec::new();
    for alg in ["none", "None", "NONE", "nOnE"] {
        for header in [
            json!({"alg": alg, "typ": "JWT"}),
            json!({"alg": alg, "typ": "JWT", "kid": kid}),
        ] {
            let unsigned = format!("{}.{}.", b64(header.to_string()), b64(&claims));
            attacks.push(Attack::early(
                format!("alg {alg}, empty signature, {header}"),
                unsigned,
                DenyReason::AlgorithmNotAllowed,
            ));
            // With a genuine RS256 signature attached: the header still says `none`.
            let signed = dev.sign_raw(&header.to_string(), &claims).unwrap();
            attacks.push(Attack::early(
                format!("alg {alg}, real signature, {header}"),
                signed,
                DenyReason::AlgorithmNotAllowed,
            ));
        }
    }
    attacks.push(Attack::early(
        "alg empty",
        dev.sign_raw(&json!({"alg": "", "kid": kid}).to_string(), &claims)
            .unwrap(),
        DenyReason::AlgorithmNotAllowed,
    ));
    for header in [
        json!({"kid": kid}),
        json!({"alg": null, "kid": kid}),
        json!({"alg": ["RS256"], "kid": kid}),
    ] {
        attacks.push(Attack::early(
            format!("alg missing or not a string: {header}"),
            dev.sign_raw(&header.to_string(), &claims).unwrap(),
            DenyReason::TokenMalformed,
        ));
    }
    refuse_all(&server, &attacks).await;
    server.shutdown().await;
}

#[tokio::test]
async fn hmac_keyed_with_the_issuers_public_key_is_refused() {
    let server = start().await;
    let dev = server.dev();
    let kid = dev.current_kid();
    let claims = claims(dev).to_string();
    // Every form an attacker could take the public key in: the PEM (with and without its final
    // newline), the SPKI DER, the raw modulus, its base64url as in the JWKS, and the JWK itself.
    let pem = dev.public_key_pem(&kid).unwrap();
    let der = STANDARD
        .decode(
            pem.lines()
                .filter(|l| !l.starts_with("-----"))
                .collect::<String>(),
        )
        .unwrap();
    let (n, e) = dev.public_key_components(&kid).unwrap();
    let jwk =
        json!({"kty": "RSA", "use": "sig", "kid": kid, "n": b64(&n), "e": b64(&e)}).to_string();
    let secrets: [(&str, Vec<u8>); 6] = [
        ("PEM", pem.clone().into_bytes()),
        (
            "PEM without final newline",
            pem.trim_end().as_bytes().to_vec(),
        ),
        ("SPKI DER", der),
        ("raw modulus", n.clone()),
        ("base64url modulus", b64(&n).into_bytes()),
        ("JWK JSON", jwk.into_bytes()),
    ];
    use aws_lc_rs::hmac;
    let mut attacks = Vec::new();
    for (form, secret) in &secrets {
        for (alg, algorithm) in [
            ("HS256", hmac::HMAC_SHA256),
            ("HS384", hmac::HMAC_SHA384),
            ("HS512", hmac::HMAC_SHA512),
        ] {
            for header in [
                json!({"alg": alg, "typ": "JWT", "kid": kid}),
                json!({"alg": alg, "typ": "JWT"}),
            ] {
                let input = format!("{}.{}", b64(header.to_string()), b64(&claims));
                let tag = hmac::sign(&hmac::Key::new(algorithm, secret), input.as_bytes());
                attacks.push(Attack::early(
                    format!("{alg} keyed with the {form}, {header}"),
                    format!("{input}.{}", b64(tag.as_ref())),
                    DenyReason::AlgorithmNotAllowed,
                ));
            }
        }
        // The same MAC under a header that claims RS256: it is checked as an RSA signature, and fails.
        let input = format!("{}.{}", b64(header(&kid).to_string()), b64(&claims));
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), input.as_bytes());
        attacks.push(Attack::early(
            format!("HS256 MAC keyed with the {form} under alg RS256"),
            format!("{input}.{}", b64(tag.as_ref())),
            DenyReason::SignatureInvalid,
        ));
    }
    refuse_all(&server, &attacks).await;
    server.shutdown().await;
}

/// A loopback server an attacker controls: serves its JWKS and certificate at any path, counting
/// every request. The sidecar must never ask it anything.
struct AttackerServer {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    _task: tokio::task::JoinHandle<()>,
}

impl AttackerServer {
    async fn start(jwks: Value, cert_pem: String) -> Self {
        let requests = Arc::new(AtomicU64::new(0));
        let counter = requests.clone();
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
            let counter = counter.clone();
            let (jwks, cert_pem) = (jwks.clone(), cert_pem.clone());
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                if uri.path().ends_with(".pem") {
                    cert_pem
                } else {
                    jwks.to_string()
                }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        AttackerServer {
            addr,
            requests,
            _task: task,
        }
    }

    fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

#[tokio::test]
async fn attacker_keys_in_jwk_x5c_jku_and_x5u_headers_are_never_used() {
    let server = start().await;
    let dev = server.dev();
    let kid = dev.current_kid();
    let claims = claims(dev).to_string();

    // The attacker's own RSA key and a self-signed certificate for it.
    let attacker = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["attacker.example".to_owned()])
        .unwrap()
        .self_signed(&attacker)
        .unwrap();
    let key = RsaKeyPair::from_pkcs8(&attacker.serialize_der()).unwrap();
    let public = PublicKeyComponents::<Vec<u8>>::from(key.public_key());
    let x5c = STANDARD.encode(cert.der());
    let attacker_jwk = |kid: Option<&str>| {
        let mut jwk = json!({"kty": "RSA", "use": "sig", "alg": "RS256", "n": b64(&public.n), "e": b64(&public.e), "x5c": [x5c]});
        if let Some(kid) = kid {
            jwk["kid"] = json!(kid);
        }
        jwk
    };
    let evil = AttackerServer::start(
        json!({"keys": [attacker_jwk(Some("attacker")), attacker_jwk(Some(&kid))]}),
        format!("-----BEGIN CERTIFICATE-----\n{x5c}\n-----END CERTIFICATE-----\n"),
    )
    .await;
    let jku = format!("http://{}/jwks.json", evil.addr);
    let x5u = format!("http://{}/cert.pem", evil.addr);

    let carriers: Vec<(&str, Value)> = vec![
        ("jwk", json!({"jwk": attacker_jwk(None)})),
        ("x5c", json!({"x5c": [x5c]})),
        ("jku", json!({"jku": jku})),
        ("x5u", json!({"x5u": x5u})),
        (
            "jwk, x5c, jku and x5u at once",
            json!({"jwk": attacker_jwk(None), "x5c": [x5c], "jku": jku, "x5u": x5u}),
        ),
    ];
    let mut attacks = Vec::new();
    for (carrier, members) in &carriers {
        for (which, token_kid) in [
            ("the published kid", Some(kid.as_str())),
            ("the attacker's kid", Some("attacker")),
            ("no kid", None),
        ] {
            let mut h = json!({"alg": "RS256", "typ": "JWT"});
            for (k, v) in members.as_object().unwrap() {
                h[k] = v.clone();
            }
            if let Some(token_kid) = token_kid {
                h["kid"] = json!(token_kid);
            }
            let token = rs256(&key, h.to_string().as_bytes(), claims.as_bytes());
            let name = format!("attacker key in `{carrier}`, {which}");
            attacks.push(match token_kid {
                // The published key is used, and the attacker's signature does not verify with it.
                Some(k) if k == kid => Attack::early(name, token, DenyReason::SignatureInvalid),
                _ => Attack::unknown_kid(name, token),
            });
        }
    }
    refuse_all(&server, &attacks).await;
    assert_eq!(evil.requests(), 0, "the attacker's server was contacted");
    // It was there to be contacted: zero means never asked, not unreachable.
    let served = reqwest::get(&jku).await.unwrap().text().await.unwrap();
    assert!(served.contains("attacker"));
    assert_eq!(evil.requests(), 1);
    server.shutdown().await;
}

#[tokio::test]
async fn kid_with_path_sql_and_control_characters_finds_no_key() {
    let server = start().await;
    let dev = server.dev();
    let kid = dev.current_kid();
    let claims = claims(dev);
    let hostile_kids = [
        "../../etc/passwd".to_owned(),
        "../../../../../../dev/null".to_owned(),
        "/dev/random".to_owned(),
        "file:///etc/passwd".to_owned(),
        "%2e%2e%2f%2e%2e%2fetc%2fpasswd".to_owned(),
        "' OR 1=1 --".to_owned(),
        "\" OR \"\"=\"".to_owned(),
        "x'; DROP TABLE s2s_authz_resources; --".to_owned(),
        "${jndi:ldap://127.0.0.1:1/a}".to_owned(),
        "<script>alert(1)</script>".to_owned(),
        "http://127.0.0.1:1/jwks.json".to_owned(),
        "\u{0}".to_owned(),
        format!("{kid}\u{0}"),
        format!("{kid}\u{0}attacker"),
        format!("{kid}\n"),
        format!("{kid} "),
        kid.to_ascii_uppercase(),
        format!("{kid}/../{kid}"),
        "\u{202e}dik".to_owned(),
        String::new(),
        "k".repeat(8 * 1024),
    ];
    let mut attacks: Vec<Attack> = hostile_kids
        .iter()
        .map(|k| {
            let shown: String = k.chars().take(40).collect();
            Attack::unknown_kid(format!("kid {shown:?}"), sign_with_kid(dev, k, &claims))
        })
        .collect();
    for bad in [json!(7), json!([kid]), json!({"kid": kid}), json!(true)] {
        let h = json!({"alg": "RS256", "typ": "JWT", "kid": bad});
        attacks.push(Attack::early(
            format!("kid not a string: {bad}"),
            dev.sign_raw(&h.to_string(), &claims.to_string()).unwrap(),
            DenyReason::TokenMalformed,
        ));
    }
    let fetches = dev.jwks_fetches();
    refuse_all(&server, &attacks).await;
    // The configuration lets an unknown kid refresh on every request, so the zero counts that every
    // other attack must show are not the rate limit's doing.
    assert!(
        dev.jwks_fetches() > fetches,
        "unknown kids refreshed the JWKS"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn crit_b64_false_and_nested_jwts_are_malformed() {
    let server = start().await;
    let dev = server.dev();
    let kid = dev.current_kid();
    let claims = claims(dev).to_string();
    let headers = [
        json!({"alg": "RS256", "kid": kid, "crit": ["exp"], "exp": 1}),
        json!({"alg": "RS256", "kid": kid, "crit": []}),
        json!({"alg": "RS256", "kid": kid, "crit": ["b64"], "b64": false}),
        json!({"alg": "RS256", "kid": kid, "crit": "b64"}),
        json!({"alg": "RS256", "kid": kid, "b64": false}),
        json!({"alg": "RS256", "kid": kid, "b64": "false"}),
        json!({"alg": "RS256", "kid": kid, "b64": 0}),
        json!({"alg": "RS256", "kid": kid, "cty": "JWT"}),
        json!({"alg": "RS256", "kid": kid, "cty": "jwt"}),
        json!({"alg": "RS256", "kid": kid, "cty": "application/jwt"}),
        json!({"alg": "RS256", "kid": kid, "cty": "APPLICATION/JWT"}),
    ];
    let mut attacks: Vec<Attack> = headers
        .iter()
        .map(|h| {
            Attack::early(
                format!("header {h}"),
                dev.sign_raw(&h.to_string(), &claims).unwrap(),
                DenyReason::TokenMalformed,
            )
        })
        .collect();
    // A real nested JWT: the payload is a whole signed token, under `cty: JWT` and without it.
    let inner = orders_token(dev);
    for h in [
        json!({"alg": "RS256", "kid": kid, "cty": "JWT"}),
        header(&kid),
    ] {
        attacks.push(Attack::early(
            format!("nested JWT as payload, header {h}"),
            dev.sign_raw(&h.to_string(), &inner).unwrap(),
            DenyReason::TokenMalformed,
        ));
    }
    // `b64: false` the way RFC 7797 means it: the payload in the clear, detached or inline.
    let h = b64(json!({"alg": "RS256", "kid": kid, "b64": false, "crit": ["b64"]}).to_string());
    attacks.push(Attack::early(
        "unencoded payload (RFC 7797), detached",
        format!("{h}..{}", b64(b"sig")),
        DenyReason::TokenMalformed,
    ));
    attacks.push(Attack::early(
        "unencoded payload (RFC 7797), inline",
        format!("{h}.{claims}.{}", b64(b"sig")),
        DenyReason::TokenMalformed,
    ));
    // A JWE (five segments) where a JWS is expected.
    attacks.push(Attack::early(
        "JWE compact serialization",
        format!(
            "{}.{}.{}.{}.{}",
            b64(json!({"alg": "RSA-OAEP", "enc": "A256GCM", "kid": kid}).to_string()),
            b64(b"key"),
            b64(b"iv"),
            b64(&claims),
            b64(b"tag")
        ),
        DenyReason::TokenMalformed,
    ));
    refuse_all(&server, &attacks).await;
    server.shutdown().await;
}

#[tokio::test]
async fn non_utf8_and_non_json_segments_are_malformed() {
    let server = start().await;
    let dev = server.dev();
    let kid = dev.current_kid();
    let h = header(&kid).to_string();
    let c = claims(dev).to_string();
    let mut bom = vec![0xef, 0xbb, 0xbf];
    bom.extend_from_slice(c.as_bytes());
    let utf16: Vec<u8> = c.encode_utf16().flat_map(u16::to_le_bytes).collect();
    // `"idtyp":"app"` with the value's bytes a lone continuation byte and an overlong `/`.
    let (before, after) = c.split_once("\"app\"").unwrap();
    let non_utf8_value = [before.as_bytes(), b"\"\x80\xc0\xaf\"", after.as_bytes()].concat();
    let deep = format!("{{\"exp\":1,\"x\":{}{}}}", "[".repeat(200), "]".repeat(200));
    let cases: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        (
            "header bytes not UTF-8",
            vec![0xff, 0xfe, 0xfd],
            c.clone().into_bytes(),
        ),
        (
            "claims bytes not UTF-8",
            h.clone().into_bytes(),
            vec![0xff, 0xfe, b'{', b'}'],
        ),
        (
            "claims string value not UTF-8",
            h.clone().into_bytes(),
            non_utf8_value,
        ),
        ("claims with a byte-order mark", h.clone().into_bytes(), bom),
        ("claims in UTF-16", h.clone().into_bytes(), utf16),
        (
            "claims a JSON array",
            h.clone().into_bytes(),
            b"[1,2,3]".to_vec(),
        ),
        (
            "claims a JSON string",
            h.clone().into_bytes(),
            br#""exp""#.to_vec(),
        ),
        ("claims null", h.clone().into_bytes(), b"null".to_vec()),
        ("claims empty", h.clone().into_bytes(), Vec::new()),
        (
            "claims with trailing data",
            h.clone().into_bytes(),
            format!("{c} {c}").into_bytes(),
        ),
        (
            "claims with a comment",
            h.clone().into_bytes(),
            format!("/* hi */{c}").into_bytes(),
        ),
        (
            "claims with single quotes",
            h.clone().into_bytes(),
            c.replace('"', "'").into_bytes(),
        ),
        (
            "claims with a lone surrogate",
            h.clone().into_bytes(),
            c.replacen("\"app\"", r#""\ud800""#, 1).into_bytes(),
        ),
        (
            "claims nested 200 deep",
            h.clone().into_bytes(),
            deep.into_bytes(),
        ),
        ("header not JSON", b"RS256".to_vec(), c.clone().into_bytes()),
        (
            "header a JSON array",
            br#"["RS256"]"#.to_vec(),
            c.clone().into_bytes(),
        ),
        (
            "header with trailing data",
            format!("{h}x").into_bytes(),
            c.clone().into_bytes(),
        ),
    ];
    let mut attacks: Vec<Attack> = cases
        .into_iter()
        .map(|(name, header, claims)| {
            Attack::early(
                name,
                sign_bytes(dev, &header, &claims),
                DenyReason::TokenMalformed,
            )
        })
        .collect();
    // Encodings that are not unpadded base64url, around a genuine token.
    let valid = orders_token(dev);
    let parts: Vec<&str> = valid.split('.').collect();
    let standard_sig = STANDARD.encode(URL_SAFE_NO_PAD.decode(parts[2]).unwrap());
    let mut sig_trailing_bits = parts[2].to_owned();
    // 256 bytes end in a character carrying 4 spare bits; setting one yields a second spelling.
    let last = sig_trailing_bits.pop().unwrap();
    let index = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        .iter()
        .position(|&b| b == last as u8)
        .unwrap();
    sig_trailing_bits.push(
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[index ^ 1] as char,
    );
    for (name, token) in [
        (
            "padded header",
            format!("{}==.{}.{}", parts[0], parts[1], parts[2]),
        ),
        (
            "standard-alphabet signature",
            format!("{}.{}.{standard_sig}", parts[0], parts[1]),
        ),
        (
            "signature with spare bits set",
            format!("{}.{}.{sig_trailing_bits}", parts[0], parts[1]),
        ),
        // 342 + 3 characters: a length no byte string encodes to.
        ("signature of impossible length", format!("{valid}AAA")),
        (
            "whitespace inside",
            format!("{}. {}.{}", parts[0], parts[1], parts[2]),
        ),
        (
            "percent-encoded dot",
            format!("{}%2E{}.{}", parts[0], parts[1], parts[2]),
        ),
        ("two segments", format!("{}.{}", parts[0], parts[1])),
        ("four segments", format!("{valid}.{}", parts[2])),
        (
            "empty header segment",
            format!(".{}.{}", parts[1], parts[2]),
        ),
        ("only dots", "..".to_owned()),
    ] {
        attacks.push(Attack::early(name, token, DenyReason::TokenMalformed));
    }
    refuse_all(&server, &attacks).await;
    server.shutdown().await;
}

#[tokio::test]
async fn hostile_exp_and_nbf_values_are_refused() {
    let server = start().await;
    let dev = server.dev();
    let kid = dev.current_kid();
    let h = header(&kid).to_string();
    let exp = with(claims(dev), &[("exp", json!("__X__"))]);
    let nbf = with(claims(dev), &[("nbf", json!("__X__"))]);
    let mut attacks = Vec::new();
    for literal in [
        "1e309",
        "-1e309",
        "NaN",
        "Infinity",
        "-Infinity",
        "\"1800000000\"",
        "\"soon\"",
        "18446744073709551616",
        "9223372036854775808",
        "99999999999999999999999999999",
        "1e20",
        "9007199254740993.5",
        "true",
        "null",
        "[1800000000]",
        "{\"$numberLong\":\"1800000000\"}",
        "0x7fffffff",
        "+1800000000",
        "01800000000",
    ] {
        attacks.push(Attack::early(
            format!("exp {literal}"),
            dev.sign_raw(&h, &raw_claims(&exp, literal)).unwrap(),
            DenyReason::TokenMalformed,
        ));
    }
    // Numbers this service can compare, long past: expired, and named (the signature is genuine).
    for literal in ["-1", "0", "-9223372036854775808", "-0.0", "1.5"] {
        attacks.push(Attack::verified(
            format!("exp {literal}"),
            dev.sign_raw(&h, &raw_claims(&exp, literal)).unwrap(),
            DenyReason::TokenExpired,
        ));
    }
    for literal in ["1e309", "NaN", "Infinity", "\"0\"", "18446744073709551616"] {
        attacks.push(Attack::early(
            format!("nbf {literal}"),
            dev.sign_raw(&h, &raw_claims(&nbf, literal)).unwrap(),
            DenyReason::TokenMalformed,
        ));
    }
    attacks.push(Attack::verified(
        "nbf 9223372036854775807",
        dev.sign_raw(&h, &raw_claims(&nbf, "9223372036854775807"))
            .unwrap(),
        DenyReason::TokenNotYetValid,
    ));
    refuse_all(&server, &attacks).await;
    server.shutdown().await;
}

#[tokio::test]
async fn duplicate_claim_and_header_names_are_malformed() {
    let server = start().await;
    let dev = server.dev();
    let kid = dev.current_kid();
    let h = header(&kid).to_string();
    let now = now();
    let base = claims(dev).to_string();
    // `{"name":first, …the valid claims… }` and `{ …the valid claims…, "name":last }`: whichever of the
    // two a lenient parser keeps, one order gets the attacker what it wants.
    let first = |member: &str| format!("{{{member},{}", &base[1..]);
    let last = |member: &str| format!("{},{member}}}", &base[..base.len() - 1]);
    let members = [
        format!("\"exp\":{}", now - 100_000),
        format!("\"exp\":{}", now + 100_000_000),
        "\"aud\":\"api://another-api\"".to_owned(),
        format!("\"tid\":\"{PARTNER_TENANT}\""),
        format!("\"iss\":\"{}\"", dev.v2_issuer(PARTNER_TENANT)),
        format!("\"azp\":\"{STRANGER_APP}\""),
        "\"roles\":[\"Admin\"]".to_owned(),
        "\"idtyp\":\"user\"".to_owned(),
        // The same name spelt with an escape.
        "\"a\\u0075d\":\"api://another-api\"".to_owned(),
        "\"\\u0065xp\":1".to_owned(),
    ];
    let mut attacks = Vec::new();
    for member in &members {
        for (order, claims) in [("first", first(member)), ("last", last(member))] {
            attacks.push(Attack::early(
                format!("duplicate {member} {order}"),
                dev.sign_raw(&h, &claims).unwrap(),
                DenyReason::TokenMalformed,
            ));
        }
    }
    for header in [
        format!(r#"{{"alg":"RS256","alg":"none","kid":"{kid}"}}"#),
        format!(r#"{{"alg":"none","alg":"RS256","kid":"{kid}"}}"#),
        format!(r#"{{"alg":"RS256","kid":"attacker","kid":"{kid}"}}"#),
        format!(r#"{{"alg":"RS256","kid":"{kid}","k\u0069d":"attacker"}}"#),
    ] {
        attacks.push(Attack::early(
            format!("duplicate in header {header}"),
            dev.sign_raw(&header, &base).unwrap(),
            DenyReason::TokenMalformed,
        ));
    }
    refuse_all(&server, &attacks).await;
    server.shutdown().await;
}

/// `aud` may be a string or an array (SPEC §4, RFC 7519 §4.1.3). An array is for this service when one
/// of its values is this service's audience: RFC 7519 has each recipient look for itself in the array,
/// and Microsoft.IdentityModel does the same. Entra itself only ever issues one string.
#[tokio::test]
async fn aud_arrays_are_accepted_only_when_they_name_this_api() {
    let server = start().await;
    let dev = server.dev();
    for aud in [
        json!([API_GUID]),
        json!(["api://another-api", API_GUID]),
        json!([AUDIENCE, "https://graph.microsoft.com"]),
    ] {
        let token = dev
            .sign(&with(claims(dev), &[("aud", aud.clone())]))
            .unwrap();
        assert_allowed(&server.decide(&token).await);
        assert_check_allowed(&check_bearer(&server, &token).await, &aud.to_string());
    }
    let mut attacks = Vec::new();
    for aud in [
        json!([]),
        json!(["api://another-api"]),
        json!(["https://graph.microsoft.com", "api://another-api"]),
        json!(format!("{API_GUID} api://another-api")),
        json!(format!("[\"{API_GUID}\"]")),
    ] {
        attacks.push(Attack::verified(
            format!("aud {aud}"),
            dev.sign(&with(claims(dev), &[("aud", aud.clone())]))
                .unwrap(),
            DenyReason::AudienceMismatch,
        ));
    }
    for aud in [
        json!([API_GUID, 5]),
        json!([API_GUID, null]),
        json!([[API_GUID]]),
        json!({"0": API_GUID}),
        json!(5),
        json!(true),
    ] {
        attacks.push(Attack::early(
            format!("aud {aud}"),
            dev.sign(&with(claims(dev), &[("aud", aud.clone())]))
                .unwrap(),
            DenyReason::TokenMalformed,
        ));
    }
    refuse_all(&server, &attacks).await;
    server.shutdown().await;
}

#[tokio::test]
async fn cross_tenant_tokens_are_not_trusted() {
    let server = start().await;
    let dev = server.dev();
    let partner_client = dev_client(PARTNER_APP, PARTNER_OID, &[APP_ROLE], TokenVersion::V2);
    // The partner tenant is trusted and its own token is fine (not on the allowlist, but genuine).
    let partner = dev
        .mint_app_token(PARTNER_TENANT, &partner_client, AUDIENCE)
        .unwrap();
    let r = server.decide(&partner).await;
    assert_denied(&r, DenyReason::ApplicationNotAllowed, true);
    assert_eq!(r.caller.as_ref().unwrap().tenant_id, PARTNER_TENANT);

    let partner_claims = with(
        claims(dev),
        &[
            ("iss", json!(dev.v2_issuer(PARTNER_TENANT))),
            ("tid", json!(PARTNER_TENANT)),
        ],
    );
    let partner_v1 = with(
        v1_claims(dev, ORDERS_APP, ORDERS_OID, &[APP_ROLE]),
        &[
            ("iss", json!(dev.v1_issuer(PARTNER_TENANT))),
            ("tid", json!(PARTNER_TENANT)),
        ],
    );
    let mut attacks = vec![
        // The partner's issuer claiming the home tenant, to borrow its allowlist.
        Attack::early(
            "partner iss, home tid",
            dev.sign(&with(partner_claims.clone(), &[("tid", json!(TENANT))]))
                .unwrap(),
            DenyReason::IssuerNotTrusted,
        ),
        Attack::early(
            "partner v1 iss, home tid",
            dev.sign(&with(partner_v1, &[("tid", json!(TENANT))]))
                .unwrap(),
            DenyReason::IssuerNotTrusted,
        ),
        // And the other way round.
        Attack::early(
            "home iss, partner tid",
            dev.sign(&with(claims(dev), &[("tid", json!(PARTNER_TENANT))]))
                .unwrap(),
            DenyReason::IssuerNotTrusted,
        ),
        Attack::early(
            "home iss, no tid",
            dev.sign(&with(claims(dev), &[("tid", Value::Null)]))
                .unwrap(),
            DenyReason::IssuerNotTrusted,
        ),
        Attack::early(
            "home iss, tid with a trailing space",
            dev.sign(&with(claims(dev), &[("tid", json!(format!("{TENANT} ")))]))
                .unwrap(),
            DenyReason::IssuerNotTrusted,
        ),
        Attack::early(
            "home tenant in an upper-case iss",
            dev.sign(&with(
                claims(dev),
                &[("iss", json!(dev.v2_issuer(&TENANT.to_ascii_uppercase())))],
            ))
            .unwrap(),
            DenyReason::IssuerNotTrusted,
        ),
        // A foreign, untrusted tenant: refused from the trust snapshot, no discovery.
        Attack::early(
            "untrusted tenant",
            dev.sign(&with(
                claims(dev),
                &[
                    ("iss", json!(dev.v2_issuer(FOREIGN_TENANT))),
                    ("tid", json!(FOREIGN_TENANT)),
                ],
            ))
            .unwrap(),
            DenyReason::IssuerNotTrusted,
        ),
    ];
    // A genuine partner-tenant token for the home tenant's app id (multi-tenant apps share one):
    // verified, but the allowlist entry is the home tenant's, so not this one.
    attacks.push(Attack::verified(
        "partner tenant's token for the home app id",
        dev.sign(&partner_claims).unwrap(),
        DenyReason::ApplicationNotAllowed,
    ));
    refuse_all(&server, &attacks).await;
    server.shutdown().await;
}

#[tokio::test]
async fn tokens_for_another_audience_of_the_same_tenant_are_refused() {
    let server = start().await;
    let dev = server.dev();
    let mut attacks = Vec::new();
    // Minted by the issuer exactly as Entra would for another API of the tenant.
    for resource in [
        "api://another-api",
        "api://00000000-1111-4222-8333-444444444444",
        "https://graph.microsoft.com",
    ] {
        attacks.push(Attack::verified(
            format!("minted for {resource}"),
            dev.mint_app_token(TENANT, &orders_client(), resource)
                .unwrap(),
            DenyReason::AudienceMismatch,
        ));
    }
    // Near misses of this API's audience.
    for aud in [
        format!("{AUDIENCE}/"),
        format!("{AUDIENCE}/.default"),
        AUDIENCE.to_ascii_uppercase(),
        format!(" {API_GUID}"),
        format!("{API_GUID}\u{0}"),
        format!("https://{API_GUID}"),
    ] {
        attacks.push(Attack::verified(
            format!("aud {aud:?}"),
            dev.sign(&with(claims(dev), &[("aud", json!(aud))]))
                .unwrap(),
            DenyReason::AudienceMismatch,
        ));
    }
    refuse_all(&server, &attacks).await;
    server.shutdown().await;
}

/// Unpadded base64url length of `n` bytes.
fn b64_len(n: usize) -> usize {
    (n * 4).div_ceil(3)
}

/// A valid orders-service token of exactly `target` bytes (padded with a claim and a header member).
fn token_of_len(dev: &DevIssuer, target: usize) -> String {
    let kid = dev.current_kid();
    let mut claims = claims(dev);
    claims["pad"] = json!("");
    let empty_claims = claims.to_string().len();
    let signature = b64_len(256);
    for header_pad in 0..4 {
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": kid, "x": "h".repeat(header_pad)})
            .to_string();
        let fixed = b64_len(header.len()) + 2 + signature;
        for claims_pad in 0..target {
            let total = fixed + b64_len(empty_claims + claims_pad);
            if total == target {
                claims["pad"] = json!("p".repeat(claims_pad));
                let token = dev.sign_raw(&header, &claims.to_string()).unwrap();
                assert_eq!(token.len(), target);
                return token;
            }
            if total > target {
                break;
            }
        }
    }
    panic!("no padding gives a {target}-byte token");
}

#[tokio::test]
async fn tokens_at_16_kib_and_one_byte_more() {
    let server = start().await;
    let dev = server.dev();
    let at_limit = token_of_len(dev, 16_384);
    assert_allowed(&server.decide(&at_limit).await);
    assert_check_allowed(&check_bearer(&server, &at_limit).await, "16,384 bytes");
    let over = token_of_len(dev, 16_385);
    let attacks = vec![
        Attack::early("16,385 bytes", over.clone(), DenyReason::TokenTooLarge),
        Attack::early(
            "16,385 bytes after `Bearer `",
            format!("Bearer {over}"),
            DenyReason::TokenTooLarge,
        ),
        Attack::early(
            "1 MiB of dots",
            ".".repeat(1 << 20),
            DenyReason::TokenTooLarge,
        ),
    ];
    refuse_all(&server, &attacks).await;
    server.shutdown().await;
}

/// `DecideRequest.token` and `HttpRequest.headers` on the wire, as bytes, so that a test can send
/// what no well-behaved client can: protobuf `string` fields that are not UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
struct RawDecideRequest {
    #[prost(bytes = "vec", tag = "1")]
    token: Vec<u8>,
}

/// Protobuf strings must be UTF-8, so such a message is refused by the gRPC layer before any decision
/// is made (an RPC error, which Envoy's default `failure_mode_allow: false` turns into a deny; Envoy
/// itself sends non-UTF-8 header values as `raw_value` bytes, which the generated test covers). The
/// server answers it and keeps serving.
#[tokio::test]
async fn protobuf_strings_that_are_not_utf8_are_refused_by_the_transport() {
    let server = start().await;
    let valid = orders_token(server.dev());
    for token in [
        vec![0xff, 0xfe, 0xfd],
        [valid.as_bytes(), &[0xc0, 0xaf]].concat(),
        vec![b'a', 0x80, b'.', b'b', b'.', b'c'],
    ] {
        let mut grpc = tonic::client::Grpc::new(server.channel.clone());
        grpc.ready().await.unwrap();
        let codec = tonic_prost::ProstCodec::<
            RawDecideRequest,
            s2s_authz::proto::s2sauthz::v1::DecideResponse,
        >::default();
        let result = grpc
            .unary(
                tonic::Request::new(RawDecideRequest { token }),
                tonic::codegen::http::uri::PathAndQuery::from_static(
                    "/s2sauthz.v1.Authorizer/Decide",
                ),
                codec,
            )
            .await;
        let status = result.expect_err("an undecodable request is not answered with a decision");
        assert_ne!(status.code(), tonic::Code::Ok);
    }
    assert_still_serving(&server).await;
    server.shutdown().await;
}

// ---------------------------------------------------------------------------------------------------
// Generated requests through the real server.

/// What a client may put where the token goes.
#[derive(Clone, Debug)]
enum TokenInput {
    Valid,
    /// The valid token with the character at this index replaced.
    Edited(prop::sample::Index, char),
    /// The valid token cut short here.
    Cut(prop::sample::Index),
    Arbitrary(String),
}

fn arb_token_input() -> impl Strategy<Value = TokenInput> {
    prop_oneof![
        1 => Just(TokenInput::Valid),
        3 => (any::<prop::sample::Index>(), any::<char>()).prop_map(|(i, c)| TokenInput::Edited(i, c)),
        1 => any::<prop::sample::Index>().prop_map(TokenInput::Cut),
        2 => any::<String>().prop_map(TokenInput::Arbitrary),
        2 => "[A-Za-z0-9_-]{0,40}\\.[A-Za-z0-9_-]{0,40}\\.[A-Za-z0-9_-]{0,40}".prop_map(TokenInput::Arbitrary),
    ]
}

fn token_of(input: &TokenInput, valid: &str) -> String {
    match input {
        TokenInput::Valid => valid.to_owned(),
        TokenInput::Edited(at, c) => {
            let i = at.index(valid.len());
            let mut t = valid.to_owned();
            t.replace_range(i..=i, &c.to_string());
            t
        }
        TokenInput::Cut(at) => valid[..at.index(valid.len())].to_owned(),
        TokenInput::Arbitrary(s) => s.clone(),
    }
}

fn arb_headers() -> impl Strategy<Value = HashMap<String, String>> {
    prop::collection::hash_map(
        prop_oneof![
            select(vec![
                "x-s2s-tenant-id",
                "x-s2s-security-role",
                "x-s2s-zzz",
                "clienttype",
                "x-forwarded-for"
            ])
            .prop_map(str::to_owned),
            "[a-z0-9-]{1,12}",
        ],
        ".{0,24}",
        0..5,
    )
}

/// Whatever arrives, the RPC answers OK with a well-formed response, and only the untouched valid
/// token is ever allowed.
#[test]
fn generated_requests_through_both_apis_never_allow_a_forgery() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = runtime.block_on(start());
    let valid = orders_token(server.dev());
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let strategy = (
        arb_token_input(),
        arb_headers(),
        select(vec!["Bearer ", "bearer ", "BEARER   ", "Basic ", ""]),
        any::<bool>(),
    );
    runner
        .run(&strategy, |(input, mut headers, scheme, raw)| {
            let token = token_of(&input, &valid);
            headers.retain(|k, _| k != "authorization" && k != "callerobjectid");
            let untouched = token == valid;
            runtime.block_on(async {
                // Native API (its client directly: an arbitrary one-letter token may well appear in
                // a message without having leaked).
                let r = server
                    .native()
                    .decide(TestServer::request(&token, "GET", "/orders", &[]))
                    .await
                    .map_err(|e| TestCaseError::fail(format!("Decide failed: {e}")))?
                    .into_inner();
                if untouched {
                    prop_assert!(r.allowed, "{r:?}");
                } else {
                    prop_assert!(!r.allowed, "allowed an altered token: {r:?}");
                    prop_assert!(r.caller.is_none(), "{r:?}");
                    prop_assert!(!r.message.is_empty());
                }

                // ext_authz, with the token in the header map or in raw headers.
                let mut sent = headers.clone();
                sent.insert("authorization".to_owned(), format!("{scheme}{token}"));
                let http = if raw {
                    attribute_context::HttpRequest {
                        header_map: Some(HeaderMap {
                            headers: sent
                                .iter()
                                .map(|(k, v)| HeaderValue {
                                    key: k.clone(),
                                    value: String::new(),
                                    raw_value: v.clone().into_bytes(),
                                })
                                .collect(),
                        }),
                        method: "GET".to_owned(),
                        path: "/orders".to_owned(),
                        ..Default::default()
                    }
                } else {
                    attribute_context::HttpRequest {
                        headers: sent.clone(),
                        method: "GET".to_owned(),
                        path: "/orders".to_owned(),
                        ..Default::default()
                    }
                };
                let response = server.check_http(http).await;
                let bearer = scheme.trim().eq_ignore_ascii_case("bearer") && !scheme.is_empty();
                match &response.http_response {
                    Some(HttpResponse::OkResponse(ok)) => {
                        prop_assert!(untouched && bearer, "allowed {scheme:?} {input:?}");
                        for name in sent.keys().filter(|k| k.starts_with("x-s2s-")) {
                            let set = ok
                                .headers
                                .iter()
                                .any(|h| h.header.as_ref().is_some_and(|h| &h.key == name));
                            prop_assert!(set || ok.headers_to_remove.contains(name), "{name} kept");
                        }
                    }
                    Some(HttpResponse::DeniedResponse(_)) => {
                        prop_assert!(
                            !(untouched && bearer),
                            "denied the valid token: {response:?}"
                        );
                        let reason = response
                            .status
                            .as_ref()
                            .map(|s| s.message.clone())
                            .unwrap_or_default();
                        let reason = DenyReason::from_str_name(&reason).ok_or_else(|| {
                            TestCaseError::fail(format!("no reason: {response:?}"))
                        })?;
                        assert_check_denied(&response, reason, &format!("{input:?}"));
                    }
                    other => prop_assert!(false, "not an ok or denied response: {other:?}"),
                }
                Ok(())
            })
        })
        .unwrap();
    runtime.block_on(async {
        assert_still_serving(&server).await;
        server.shutdown().await;
    });
}
