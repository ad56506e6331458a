//! The decision port through real gRPC clients: the native `Decide`/`Explain` API with the crate's
//! generated client, Envoy's `Check` with Envoy's own generated client (envoy-types), health, and the
//! metrics/probe endpoints — every deny reason reachable through the API, with its wire shape.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    CheckResponse, DeniedHttpResponse, OkHttpResponse, attribute_context,
};
use envoy_types::pb::google::protobuf::value::Kind;
use s2s_authz::devissuer::DevIssuer;
use s2s_authz::proto::s2sauthz::v1::{CheckOutcome, DenyReason};
use serde_json::{Value, json};
use std::collections::HashMap;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;

fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Unpadded base64url length of `n` bytes.
fn b64_len(n: usize) -> usize {
    (n * 4).div_ceil(3)
}

/// A valid orders-service token of exactly `target` bytes (padded with a claim and a header member).
fn token_of_len(dev: &DevIssuer, target: usize) -> String {
    let kid = dev.current_kid();
    let mut claims = v2_claims(dev, ORDERS_APP, ORDERS_OID, &[APP_ROLE]);
    claims["pad"] = json!("");
    let empty_claims = claims.to_string().len();
    // RS256 with a 2048-bit key: 256 signature bytes.
    let signature = b64_len(256);
    for header_pad in 0..4 {
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": kid, "x": "h".repeat(header_pad)})
            .to_string();
        let fixed = b64_len(header.len()) + 1 + 1 + signature;
        for claims_pad in 0..target {
            let total = fixed + b64_len(empty_claims + claims_pad);
            if total == target {
                claims["pad"] = json!("p".repeat(claims_pad));
                let token = dev.sign_raw(&header, &claims.to_string()).expect("sign");
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

#[tokio::test]
async fn decide_allows_v2_and_v1_app_tokens() {
    let server = TestServer::start_ready(&Config::new()).await;
    let dev = server.dev();

    let v2 = orders_token(dev);
    let exp = segment(&v2, 1)["exp"].as_i64().unwrap();
    for token in [v2.clone(), format!("Bearer {v2}"), format!("bearer {v2}")] {
        let r = server.decide(&token).await;
        assert_allowed(&r);
        let caller = r.caller.as_ref().expect("caller");
        assert_eq!(caller.tenant_id, TENANT);
        assert_eq!(caller.client_app_id, ORDERS_APP);
        assert_eq!(caller.object_id, ORDERS_OID);
        assert_eq!(caller.token_version, "2.0");
        assert_eq!(caller.expires_at, exp);
        let user = r.application_user.as_ref().expect("application user");
        assert_eq!(user.id, ORDERS_USER_ID);
        assert_eq!(user.name, ORDERS_USER_NAME);
        assert_eq!(user.entry_name, "orders-service");
        assert_eq!(r.security_role.as_ref().expect("role").name, ORDERS_ROLE);
        assert!(r.effective_user_object_id.is_empty());
    }

    let v1 = dev
        .mint_app_token(TENANT, &legacy_client(), AUDIENCE)
        .unwrap();
    let claims = segment(&v1, 1);
    assert_eq!(claims["ver"], "1.0");
    assert_eq!(claims["iss"], format!("https://sts.windows.net/{TENANT}/"));
    let r = server.decide(&format!("Bearer {v1}")).await;
    assert_allowed(&r);
    let caller = r.caller.as_ref().expect("caller");
    assert_eq!(caller.tenant_id, TENANT);
    assert_eq!(caller.client_app_id, LEGACY_APP);
    assert_eq!(caller.object_id, LEGACY_OID);
    assert_eq!(caller.token_version, "1.0");
    assert_eq!(caller.expires_at, claims["exp"].as_i64().unwrap());
    let user = r.application_user.as_ref().expect("application user");
    assert_eq!(user.id, LEGACY_USER_ID);
    assert_eq!(user.name, "legacy-reports", "named after the entry");
    assert_eq!(user.entry_name, "legacy-reports");
    assert_eq!(r.security_role.as_ref().unwrap().name, LEGACY_ROLE);

    // `aud` may be an array; one accepted value suffices. A v2 token may also carry the URI form.
    let array = with(
        v2_claims(dev, ORDERS_APP, ORDERS_OID, &[APP_ROLE]),
        &[("aud", json!(["api://something-else", API_GUID]))],
    );
    assert_allowed(&server.decide(&dev.sign(&array).unwrap()).await);
    let uri = with(
        v2_claims(dev, ORDERS_APP, ORDERS_OID, &[APP_ROLE]),
        &[("aud", json!(AUDIENCE))],
    );
    assert_allowed(&server.decide(&dev.sign(&uri).unwrap()).await);
    server.shutdown().await;
}

#[tokio::test]
async fn missing_and_malformed_tokens() {
    let server = TestServer::start_ready(&Config::new()).await;
    let dev = server.dev();
    for token in ["", "   ", "Bearer ", "Bearer    "] {
        assert_denied(&server.decide(token).await, DenyReason::TokenMissing, false);
    }

    let claims = v2_claims(dev, ORDERS_APP, ORDERS_OID, &[APP_ROLE]);
    let kid = dev.current_kid();
    let header = json!({"alg": "RS256", "typ": "JWT", "kid": kid}).to_string();
    let valid = orders_token(dev);
    let parts: Vec<&str> = valid.split('.').collect();
    let mut malformed = vec![
        "abc".to_owned(),
        "a.b".to_owned(),
        "a.b.c.d".to_owned(),
        format!("{}.{}.{}.{}", parts[0], parts[1], parts[2], parts[2]),
        format!("{}.{}", parts[0], parts[1]),
        format!("!!!.{}.{}", parts[1], parts[2]),
        format!("{}.{}.{}", b64("not json"), parts[1], parts[2]),
        format!("{}.{}.{}", parts[0], b64("[1,2,3]"), parts[2]),
        format!("{}.{}.sig+with/bad=chars", parts[0], parts[1]),
    ];
    let signed =
        |header: String, claims: Value| dev.sign_raw(&header, &claims.to_string()).unwrap();
    // Signed with the real key, but not acceptable syntax (RFC 7515/7519/8725).
    malformed.push(signed(
        json!({"alg": "RS256", "kid": kid, "crit": ["exp"], "exp": 1}).to_string(),
        claims.clone(),
    ));
    malformed.push(signed(
        json!({"alg": "RS256", "kid": kid, "b64": false}).to_string(),
        claims.clone(),
    ));
    malformed.push(signed(
        json!({"alg": "RS256", "kid": kid, "cty": "JWT"}).to_string(),
        claims.clone(),
    ));
    malformed.push(signed(
        header.clone(),
        with(claims.clone(), &[("exp", Value::Null)]),
    ));
    malformed.push(signed(
        header.clone(),
        with(claims.clone(), &[("exp", json!("soon"))]),
    ));
    malformed.push(signed(
        header.clone(),
        with(claims.clone(), &[("roles", json!(APP_ROLE))]),
    ));
    malformed.push(signed(json!({"kid": kid}).to_string(), claims.clone()));
    for token in &malformed {
        let r = server.decide(token).await;
        assert_denied(&r, DenyReason::TokenMalformed, false);
    }
    server.shutdown().await;
}

#[tokio::test]
async fn tokens_over_16_kib_are_too_large() {
    let server = TestServer::start_ready(&Config::new()).await;
    let dev = server.dev();
    let at_limit = token_of_len(dev, 16_384);
    let r = server.decide(&at_limit).await;
    assert_ne!(r.reason(), DenyReason::TokenTooLarge);
    assert_allowed(&r);
    // The limit is on the token, not on the `Bearer ` prefix.
    assert_allowed(&server.decide(&format!("Bearer {at_limit}")).await);

    let over = token_of_len(dev, 16_385);
    assert_denied(
        &server.decide(&over).await,
        DenyReason::TokenTooLarge,
        false,
    );
    assert_denied(
        &server.decide(&format!("Bearer {over}")).await,
        DenyReason::TokenTooLarge,
        false,
    );
    // Size is checked before syntax.
    assert_denied(
        &server.decide(&"x".repeat(100_000)).await,
        DenyReason::TokenTooLarge,
        false,
    );
    server.shutdown().await;
}

#[tokio::test]
async fn none_hmac_and_unconfigured_algorithms_are_refused() {
    let server = TestServer::start_ready(&Config::new()).await;
    let dev = server.dev();
    let kid = dev.current_kid();
    let claims = v2_claims(dev, ORDERS_APP, ORDERS_OID, &[APP_ROLE]).to_string();

    let mut refused = Vec::new();
    // `alg: none` with a signature attached anyway, and in any spelling.
    for alg in ["none", "None", "NONE"] {
        refused.push(
            dev.sign_raw(
                &json!({"alg": alg, "typ": "JWT", "kid": kid}).to_string(),
                &claims,
            )
            .unwrap(),
        );
    }
    // HS256 "signed" with the issuer's public key as the HMAC secret (the classic key-confusion attack).
    let pem = dev.public_key_pem(&kid).expect("public key");
    let header = json!({"alg": "HS256", "typ": "JWT", "kid": kid}).to_string();
    let input = format!("{}.{}", b64(&header), b64(&claims));
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, pem.as_bytes());
    let tag = aws_lc_rs::hmac::sign(&key, input.as_bytes());
    refused.push(format!("{input}.{}", b64(tag.as_ref())));
    // A real JWS algorithm that is not configured (only RS256 is).
    refused.push(
        dev.sign_raw(
            &json!({"alg": "RS512", "typ": "JWT", "kid": kid}).to_string(),
            &claims,
        )
        .unwrap(),
    );
    for token in &refused {
        assert_denied(
            &server.decide(token).await,
            DenyReason::AlgorithmNotAllowed,
            false,
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn unsecured_jwt_with_empty_signature_is_algorithm_not_allowed() {
    let server = TestServer::start_ready(&Config::new()).await;
    let dev = server.dev();
    let claims = v2_claims(dev, ORDERS_APP, ORDERS_OID, &[APP_ROLE]).to_string();
    // The canonical unsecured JWT (RFC 7519 §6.1, RFC 7518 §3.6): its JWS Signature is the empty octet
    // sequence, whose base64url encoding is the empty string, so the token ends in a dot. It is a
    // well-formed compact JWS (RFC 7515 §7.1); what is wrong with it is `alg: none`, and that is the
    // reason to report (SPEC: syntax → `alg`; "`none` and HMAC are never accepted").
    for header in [
        json!({"alg": "none", "typ": "JWT"}),
        json!({"alg": "none", "typ": "JWT", "kid": dev.current_kid()}),
    ] {
        let unsecured = format!("{}.{}.", b64(header.to_string()), b64(&claims));
        let r = server.decide(&unsecured).await;
        assert_denied(&r, DenyReason::AlgorithmNotAllowed, false);
        let trace = server.explain(&unsecured).await;
        let failed: Vec<&str> = trace
            .trace
            .iter()
            .filter(|s| s.outcome() == CheckOutcome::Failed)
            .map(|s| s.check.as_str())
            .collect();
        assert_eq!(failed, ["algorithm"], "{:?}", trace.trace);
    }
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_kid_and_bad_signatures() {
    let server = TestServer::start_ready(&Config::new()).await;
    let dev = server.dev();
    let claims = v2_claims(dev, ORDERS_APP, ORDERS_OID, &[APP_ROLE]);

    let unknown = sign_with_kid(dev, &random_kid(), &claims);
    assert_denied(
        &server.decide(&unknown).await,
        DenyReason::KeyNotFound,
        false,
    );

    // Payload changed after signing.
    let valid = dev.sign(&claims).unwrap();
    let parts: Vec<&str> = valid.split('.').collect();
    let tampered_claims = with(claims.clone(), &[("oid", json!(STRANGER_OID))]);
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64(tampered_claims.to_string()),
        parts[2]
    );
    assert_denied(
        &server.decide(&tampered).await,
        DenyReason::SignatureInvalid,
        false,
    );
    // Signature bytes flipped.
    let mut sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    sig[10] ^= 0x55;
    let flipped = format!("{}.{}.{}", parts[0], parts[1], b64(&sig));
    assert_denied(
        &server.decide(&flipped).await,
        DenyReason::SignatureInvalid,
        false,
    );
    // Signed by another key while naming the published kid.
    let other = dev.add_key();
    let forged = dev
        .sign_raw_with_key(
            &other,
            &json!({"alg": "RS256", "typ": "JWT", "kid": dev.current_kid()}).to_string(),
            &claims.to_string(),
        )
        .unwrap();
    assert_denied(
        &server.decide(&forged).await,
        DenyReason::SignatureInvalid,
        false,
    );
    // The original is still fine.
    assert_allowed(&server.decide(&valid).await);
    server.shutdown().await;
}

#[tokio::test]
async fn lifetime_is_checked_with_clock_skew() {
    let server = TestServer::start_ready(&Config::new()).await;
    let dev = server.dev();
    let base = || v2_claims(dev, ORDERS_APP, ORDERS_OID, &[APP_ROLE]);
    let now = now();

    let expired = with(
        base(),
        &[
            ("exp", json!(now - 400)),
            ("iat", json!(now - 4000)),
            ("nbf", json!(now - 4000)),
        ],
    );
    let r = server.decide(&dev.sign(&expired).unwrap()).await;
    assert_denied(&r, DenyReason::TokenExpired, true);
    assert_eq!(r.caller.as_ref().unwrap().expires_at, now - 400);

    let within_skew = with(
        base(),
        &[
            ("exp", json!(now - 200)),
            ("iat", json!(now - 3800)),
            ("nbf", json!(now - 3800)),
        ],
    );
    assert_allowed(&server.decide(&dev.sign(&within_skew).unwrap()).await);

    let future = with(
        base(),
        &[
            ("nbf", json!(now + 400)),
            ("iat", json!(now + 400)),
            ("exp", json!(now + 4000)),
        ],
    );
    assert_denied(
        &server.decide(&dev.sign(&future).unwrap()).await,
        DenyReason::TokenNotYetValid,
        true,
    );
    let soon = with(
        base(),
        &[("nbf", json!(now + 200)), ("iat", json!(now + 200))],
    );
    assert_allowed(&server.decide(&dev.sign(&soon).unwrap()).await);
    server.shutdown().await;
}

#[tokio::test]
async fn issuer_and_tenant_must_be_trusted() {
    let server = TestServer::start_ready(&Config::new()).await;
    let dev = server.dev();
    let (discovery, jwks) = (dev.discovery_fetches(), dev.jwks_fetches());
    let base = || v2_claims(dev, ORDERS_APP, ORDERS_OID, &[APP_ROLE]);

    let foreign_v2 = with(
        base(),
        &[
            ("iss", json!(dev.v2_issuer(FOREIGN_TENANT))),
            ("tid", json!(FOREIGN_TENANT)),
        ],
    );
    let foreign_v1 = with(
        v1_claims(dev, ORDERS_APP, ORDERS_OID, &[APP_ROLE]),
        &[
            ("iss", json!(dev.v1_issuer(FOREIGN_TENANT))),
            ("tid", json!(FOREIGN_TENANT)),
        ],
    );
    // A trusted tenant's issuer, but `tid` names another tenant (and the other way round).
    let tid_mismatch = with(base(), &[("tid", json!(FOREIGN_TENANT))]);
    let iss_mismatch = with(base(), &[("iss", json!(dev.v2_issuer(FOREIGN_TENANT)))]);
    let no_tid = with(base(), &[("tid", Value::Null)]);
    let elsewhere = with(
        base(),
        &[(
            "iss",
            json!(format!("https://login.evil.example/{TENANT}/v2.0")),
        )],
    );
    let no_iss = with(base(), &[("iss", Value::Null)]);
    for claims in [
        foreign_v2,
        foreign_v1,
        tid_mismatch,
        iss_mismatch,
        no_tid,
        elsewhere,
        no_iss,
    ] {
        let token = dev.sign(&claims).unwrap();
        assert_denied(
            &server.decide(&token).await,
            DenyReason::IssuerNotTrusted,
            false,
        );
        // An unknown kid must not make an untrusted issuer fetch anything either.
        let token = sign_with_kid(dev, &random_kid(), &claims);
        assert_denied(
            &server.decide(&token).await,
            DenyReason::IssuerNotTrusted,
            false,
        );
    }
    assert_eq!(dev.discovery_fetches(), discovery, "no outbound discovery");
    assert_eq!(dev.jwks_fetches(), jwks, "no outbound JWKS fetch");
    server.shutdown().await;
}

#[tokio::test]
async fn audience_must_be_this_api() {
    let server = TestServer::start_ready(&Config::new()).await;
    let dev = server.dev();
    for aud in [
        json!("api://00000000-1111-4222-8333-444444444444"),
        json!("00000000-1111-4222-8333-444444444444"),
        json!(["https://graph.microsoft.com"]),
        json!([]),
        Value::Null,
    ] {
        let claims = with(
            v2_claims(dev, ORDERS_APP, ORDERS_OID, &[APP_ROLE]),
            &[("aud", aud)],
        );
        let r = server.decide(&dev.sign(&claims).unwrap()).await;
        assert_denied(&r, DenyReason::AudienceMismatch, true);
        assert_eq!(r.caller.as_ref().unwrap().client_app_id, ORDERS_APP);
    }
    server.shutdown().await;
}

#[tokio::test]
async fn only_app_tokens_are_accepted() {
    let server = TestServer::start_ready(&Config::new()).await;
    let dev = server.dev();
    let base = || v2_claims(dev, ORDERS_APP, ORDERS_OID, &[APP_ROLE]);
    let user = with(base(), &[("idtyp", json!("user"))]);
    let user_with_same_ids = with(base(), &[("idtyp", json!("user")), ("scp", Value::Null)]);
    let delegated = with(
        base(),
        &[("idtyp", Value::Null), ("scp", json!("Orders.Read"))],
    );
    let different_sub = with(
        base(),
        &[
            ("idtyp", Value::Null),
            ("sub", json!("f0f0f0f0-0000-4000-8000-000000000001")),
        ],
    );
    for claims in [user, user_with_same_ids, delegated, different_sub] {
        let r = server.decide(&dev.sign(&claims).unwrap()).await;
        assert_denied(&r, DenyReason::NotAppToken, true);
    }
    // Without `idtyp`, no `scp` and `oid == sub` is an app token.
    let implicit = with(base(), &[("idtyp", Value::Null)]);
    assert_allowed(&server.decide(&dev.sign(&implicit).unwrap()).await);
    server.shutdown().await;
}

#[tokio::test]
async fn allowlist_disabled_entries_and_app_role() {
    let server = TestServer::start_ready(&Config::new()).await;
    let dev = server.dev();

    let stranger = v2_claims(dev, STRANGER_APP, STRANGER_OID, &[APP_ROLE]);
    let r = server.decide(&dev.sign(&stranger).unwrap()).await;
    assert_denied(&r, DenyReason::ApplicationNotAllowed, true);
    assert_eq!(r.caller.as_ref().unwrap().client_app_id, STRANGER_APP);

    // The right app id in another claim does not count: v2 names the caller in `azp`.
    let wrong_claim = with(
        v2_claims(dev, STRANGER_APP, STRANGER_OID, &[APP_ROLE]),
        &[("appid", json!(ORDERS_APP))],
    );
    assert_denied(
        &server.decide(&dev.sign(&wrong_claim).unwrap()).await,
        DenyReason::ApplicationNotAllowed,
        true,
    );

    let disabled = v2_claims(dev, DISABLED_APP, DISABLED_OID, &[APP_ROLE]);
    let r = server.decide(&dev.sign(&disabled).unwrap()).await;
    assert_denied(&r, DenyReason::ApplicationDisabled, true);
    assert_eq!(r.caller.as_ref().unwrap().client_app_id, DISABLED_APP);

    for roles in [json!([]), json!(["Other.Role"]), Value::Null] {
        let claims = with(
            v2_claims(dev, BILLING_APP, BILLING_OID, &[]),
            &[("roles", roles)],
        );
        let r = server.decide(&dev.sign(&claims).unwrap()).await;
        assert_denied(&r, DenyReason::RoleMissing, true);
        let caller = r.caller.as_ref().unwrap();
        assert_eq!(caller.client_app_id, BILLING_APP);
        assert_eq!(caller.object_id, BILLING_OID);
        assert_eq!(caller.tenant_id, TENANT);
        assert_eq!(caller.token_version, "2.0");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn client_type_header_when_required() {
    let server = TestServer::start_ready(&Config::new().require_client_type()).await;
    let dev = server.dev();
    let token = orders_token(dev);

    let r = server.decide(&token).await;
    assert_denied(&r, DenyReason::ClientTypeMissing, false);
    for value in ["browser", "", "services"] {
        let r = server
            .decide_with(&token, "GET", "/orders", &[("clienttype", value)])
            .await;
        assert_denied(&r, DenyReason::ClientTypeMissing, false);
    }
    for (key, value) in [
        ("clienttype", "Service"),
        ("clienttype", "service"),
        ("clienttype", "SERVICE"),
        ("ClientType", "Service"),
    ] {
        let r = server
            .decide_with(&token, "GET", "/orders", &[(key, value)])
            .await;
        assert_allowed(&r);
    }
    // A token allowed before is still refused without the header (nothing remembered bypasses it).
    assert_denied(
        &server.decide(&token).await,
        DenyReason::ClientTypeMissing,
        false,
    );
    assert_denied(
        &server
            .decide_with(&token, "GET", "/orders", &[("clienttype", "browser")])
            .await,
        DenyReason::ClientTypeMissing,
        false,
    );
    // Token presence is checked first.
    assert_denied(&server.decide("").await, DenyReason::TokenMissing, false);
    // Envoy: an authorization problem.
    let auth = format!("Bearer {token}");
    let denied = denied_of(&server.check(&[("authorization", &auth)]).await);
    assert_eq!(denied.http, 403);
    assert_eq!(
        denied.header("x-s2s-deny-reason"),
        Some("CLIENT_TYPE_MISSING")
    );
    let ok = server
        .check(&[("authorization", &auth), ("clienttype", "Service")])
        .await;
    assert_eq!(ok.status.unwrap().code, 0);
    server.shutdown().await;
}

#[tokio::test]
async fn route_privileges_and_impersonation() {
    let server = TestServer::start_ready(&Config::new().routes()).await;
    let dev = server.dev();
    let orders = orders_token(dev);
    let legacy = dev
        .mint_app_token(TENANT, &legacy_client(), AUDIENCE)
        .unwrap();

    for (method, path) in [
        ("GET", "/orders"),
        ("GET", "/orders/42?expand=lines"),
        ("POST", "/orders"),
    ] {
        let r = server.decide_with(&orders, method, path, &[]).await;
        assert_allowed(&r);
        assert_eq!(r.security_role.unwrap().name, ORDERS_ROLE);
    }
    for (method, path) in [("DELETE", "/orders/42"), ("GET", "/invoices"), ("GET", "/")] {
        let r = server.decide_with(&orders, method, path, &[]).await;
        assert_denied(&r, DenyReason::PrivilegeMissing, true);
    }
    assert_allowed(&server.decide_with(&legacy, "GET", "/orders/7", &[]).await);
    assert_denied(
        &server.decide_with(&legacy, "POST", "/orders", &[]).await,
        DenyReason::PrivilegeMissing,
        true,
    );

    // Impersonation: allowed for a role with act_on_behalf, within the user's privileges too.
    let r = server
        .decide_with(&orders, "GET", "/orders", &[("callerobjectid", USER_OID)])
        .await;
    assert_allowed(&r);
    assert_eq!(r.effective_user_object_id, USER_OID);
    assert_eq!(r.application_user.unwrap().id, ORDERS_USER_ID);
    // The user may only read: the intersection does not grant create.
    let r = server
        .decide_with(&orders, "POST", "/orders", &[("callerobjectid", USER_OID)])
        .await;
    assert_denied(&r, DenyReason::PrivilegeMissing, true);
    // A role without act_on_behalf may not impersonate, and unknown users cannot be impersonated.
    let r = server
        .decide_with(&legacy, "GET", "/orders", &[("callerobjectid", USER_OID)])
        .await;
    assert_denied(&r, DenyReason::ImpersonationNotAllowed, true);
    let r = server
        .decide_with(
            &orders,
            "GET",
            "/orders",
            &[("callerobjectid", "99999999-8888-4777-8666-555555555555")],
        )
        .await;
    assert_denied(&r, DenyReason::ImpersonationNotAllowed, true);

    // Envoy: the effective user is set and therefore not removed.
    let auth = format!("Bearer {orders}");
    let response = server
        .check(&[("authorization", &auth), ("callerobjectid", USER_OID)])
        .await;
    let ok = ok_of(&response);
    assert_eq!(header_of(ok, "x-s2s-effective-user"), Some(USER_OID));
    assert!(
        !ok.headers_to_remove
            .iter()
            .any(|h| h == "x-s2s-effective-user")
    );
    let denied = denied_of(
        &server
            .check(&[
                ("authorization", &format!("Bearer {legacy}")),
                ("callerobjectid", USER_OID),
            ])
            .await,
    );
    assert_eq!(denied.http, 403);
    assert_eq!(
        denied.header("x-s2s-deny-reason"),
        Some("IMPERSONATION_NOT_ALLOWED")
    );
    server.shutdown().await;
}

const CHECKS: [&str; 18] = [
    "token_present",
    "service_auth_enabled",
    "client_type",
    "size",
    "syntax",
    "algorithm",
    "issuer",
    "key",
    "signature",
    "lifetime",
    "audience",
    "app_only",
    "allowlist",
    "source_principal",
    "enabled",
    "role",
    "route_privilege",
    "impersonation",
];

/// Asserts the trace names every check in order, `failing` failed, everything after it skipped, and
/// nothing before it failed.
fn assert_trace(response: &s2s_authz::proto::s2sauthz::v1::ExplainResponse, failing: Option<&str>) {
    let names: Vec<&str> = response.trace.iter().map(|s| s.check.as_str()).collect();
    assert_eq!(names, CHECKS, "every check, in order");
    let failed_at = failing.map(|f| CHECKS.iter().position(|c| *c == f).unwrap());
    for (i, step) in response.trace.iter().enumerate() {
        let outcome = step.outcome();
        match failed_at {
            Some(at) if i == at => {
                assert_eq!(outcome, CheckOutcome::Failed, "{step:?}");
                assert!(!step.detail.is_empty());
            }
            Some(at) if i > at => assert_eq!(outcome, CheckOutcome::Skipped, "{step:?}"),
            _ => assert!(
                matches!(outcome, CheckOutcome::Passed | CheckOutcome::Skipped),
                "{step:?}"
            ),
        }
    }
    let decision = response.decision.as_ref().expect("decision");
    assert_eq!(decision.allowed, failing.is_none());
}

#[tokio::test]
async fn explain_traces_every_check_in_order() {
    let server = TestServer::start_ready(&Config::new()).await;
    let dev = server.dev();

    let valid = orders_token(dev);
    let r = server.explain(&valid).await;
    assert_trace(&r, None);
    let outcome = |r: &s2s_authz::proto::s2sauthz::v1::ExplainResponse, check: &str| {
        r.trace.iter().find(|s| s.check == check).unwrap().outcome()
    };
    for check in [
        "token_present",
        "size",
        "syntax",
        "algorithm",
        "issuer",
        "key",
        "signature",
        "lifetime",
        "audience",
        "app_only",
        "allowlist",
        "enabled",
        "role",
    ] {
        assert_eq!(outcome(&r, check), CheckOutcome::Passed, "{check}");
    }
    // Not required here, and no route table or callerobjectid: skipped.
    assert_eq!(outcome(&r, "client_type"), CheckOutcome::Skipped);
    assert_eq!(outcome(&r, "impersonation"), CheckOutcome::Skipped);
    let decide = server.decide(&valid).await;
    assert_eq!(r.decision.as_ref().unwrap().caller, decide.caller);
    assert_eq!(
        r.decision.as_ref().unwrap().application_user,
        decide.application_user
    );

    let billing = dev
        .sign(&v2_claims(dev, BILLING_APP, BILLING_OID, &[]))
        .unwrap();
    let r = server.explain(&billing).await;
    assert_trace(&r, Some("role"));
    let d = r.decision.as_ref().unwrap();
    assert_eq!(d.reason(), DenyReason::RoleMissing);
    assert!(d.caller.is_some());
    assert_eq!(outcome(&r, "allowlist"), CheckOutcome::Passed);
    assert_eq!(outcome(&r, "enabled"), CheckOutcome::Passed);

    let r = server.explain("").await;
    assert_trace(&r, Some("token_present"));
    assert_eq!(
        r.decision.as_ref().unwrap().reason(),
        DenyReason::TokenMissing
    );

    let parts: Vec<&str> = valid.split('.').collect();
    let claims = with(
        v2_claims(dev, ORDERS_APP, ORDERS_OID, &[APP_ROLE]),
        &[("roles", json!(["Admin"]))],
    );
    let tampered = format!("{}.{}.{}", parts[0], b64(claims.to_string()), parts[2]);
    let r = server.explain(&tampered).await;
    assert_trace(&r, Some("signature"));
    let d = r.decision.as_ref().unwrap();
    assert_eq!(d.reason(), DenyReason::SignatureInvalid);
    assert!(d.caller.is_none());

    let r = server
        .explain(&sign_with_kid(dev, &random_kid(), &claims))
        .await;
    assert_trace(&r, Some("key"));
    assert_eq!(
        r.decision.as_ref().unwrap().reason(),
        DenyReason::KeyNotFound
    );

    let r = server.explain("not-a-token").await;
    assert_trace(&r, Some("syntax"));

    let expired = with(
        v2_claims(dev, ORDERS_APP, ORDERS_OID, &[APP_ROLE]),
        &[("exp", json!(now() - 1000))],
    );
    let r = server.explain(&dev.sign(&expired).unwrap()).await;
    assert_trace(&r, Some("lifetime"));
    assert_eq!(
        r.decision.as_ref().unwrap().reason(),
        DenyReason::TokenExpired
    );
    server.shutdown().await;
}

fn header_of<'a>(ok: &'a OkHttpResponse, key: &str) -> Option<&'a str> {
    ok.headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .find(|h| h.key == key)
        .map(|h| h.value.as_str())
}

fn ok_of(response: &CheckResponse) -> &OkHttpResponse {
    assert_eq!(
        response.status.as_ref().expect("status").code,
        0,
        "{response:?}"
    );
    match &response.http_response {
        Some(HttpResponse::OkResponse(ok)) => ok,
        other => panic!("expected an ok_response, got {other:?}"),
    }
}

struct Denied {
    http: i32,
    code: i32,
    headers: HashMap<String, String>,
    body: Value,
}

impl Denied {
    fn header(&self, key: &str) -> Option<&str> {
        self.headers.get(key).map(String::as_str)
    }
}

fn denied_of(response: &CheckResponse) -> Denied {
    let denied: &DeniedHttpResponse = match &response.http_response {
        Some(HttpResponse::DeniedResponse(d)) => d,
        other => panic!("expected a denied_response, got {other:?}"),
    };
    Denied {
        http: denied.status.as_ref().expect("http status").code,
        code: response.status.as_ref().expect("status").code,
        headers: denied
            .headers
            .iter()
            .filter_map(|h| h.header.as_ref())
            .map(|h| (h.key.to_ascii_lowercase(), h.value.clone()))
            .collect(),
        body: serde_json::from_str(&denied.body).expect("JSON body"),
    }
}

const IDENTITY_HEADERS: [&str; 6] = [
    "x-s2s-client-app-id",
    "x-s2s-tenant-id",
    "x-s2s-object-id",
    "x-s2s-application-user-id",
    "x-s2s-application-user-name",
    "x-s2s-security-role",
];

fn assert_identity_headers(ok: &OkHttpResponse, expected: [&str; 6]) {
    for (key, value) in IDENTITY_HEADERS.iter().zip(expected) {
        let option = ok
            .headers
            .iter()
            .find(|h| h.header.as_ref().is_some_and(|h| h.key == *key))
            .unwrap_or_else(|| panic!("{key} is set: {ok:?}"));
        assert_eq!(option.header.as_ref().unwrap().value, value, "{key}");
        assert_eq!(
            option.append_action,
            HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
            "{key} overwrites, never appends"
        );
        assert!(
            !ok.headers_to_remove.iter().any(|h| h == key),
            "{key} is set, so not removed"
        );
    }
}

#[tokio::test]
async fn check_allows_with_identity_headers_and_strips_spoofed_ones() {
    let server = TestServer::start_ready(&Config::new()).await;
    let dev = server.dev();
    let token = orders_token(dev);
    let auth = format!("Bearer {token}");
    let response = server
        .check(&[
            ("authorization", &auth),
            ("x-s2s-foo", "spoofed"),
            ("x-s2s-client-app-id", "spoofed"),
            ("x-s2s-effective-user", USER_OID),
            ("x-s2s-deny-reason", "NONE"),
        ])
        .await;
    let ok = ok_of(&response);
    let expected = [
        ORDERS_APP,
        TENANT,
        ORDERS_OID,
        ORDERS_USER_ID,
        ORDERS_USER_NAME,
        ORDERS_ROLE,
    ];
    assert_identity_headers(ok, expected);
    assert_eq!(header_of(ok, "x-s2s-effective-user"), None);
    for removed in ["x-s2s-foo", "x-s2s-effective-user", "x-s2s-deny-reason"] {
        assert!(
            ok.headers_to_remove.iter().any(|h| h == removed),
            "{removed} must be removed: {:?}",
            ok.headers_to_remove
        );
    }
    let metadata = response
        .dynamic_metadata
        .as_ref()
        .expect("dynamic_metadata");
    let values: Vec<&str> = metadata
        .fields
        .values()
        .filter_map(|v| match &v.kind {
            Some(Kind::StringValue(s)) => Some(s.as_str()),
            _ => None,
        })
        .collect();
    for value in expected {
        assert!(
            values.contains(&value),
            "{value} in dynamic metadata: {metadata:?}"
        );
    }

    // Even when the caller sent none, every contract header that is not set is removed.
    let response = server.check(&[("authorization", &auth)]).await;
    let ok = ok_of(&response);
    assert_identity_headers(ok, expected);
    // Envoy's `allowed_headers` may hide what the caller sent: contract headers not set are always removed.
    for removed in ["x-s2s-effective-user", "x-s2s-deny-reason"] {
        assert!(
            ok.headers_to_remove.iter().any(|h| h == removed),
            "{removed} must be removed: {:?}",
            ok.headers_to_remove
        );
    }

    // Impersonation without a route table: the effective user is set.
    let response = server
        .check(&[("authorization", &auth), ("callerobjectid", USER_OID)])
        .await;
    let ok = ok_of(&response);
    assert_identity_headers(ok, expected);
    assert_eq!(header_of(ok, "x-s2s-effective-user"), Some(USER_OID));
    server.shutdown().await;
}

#[tokio::test]
async fn check_reads_raw_header_map() {
    let server = TestServer::start_ready(&Config::new()).await;
    let dev = server.dev();
    let token = dev
        .mint_app_token(TENANT, &legacy_client(), AUDIENCE)
        .unwrap();
    let raw = |key: &str, value: &str| HeaderValue {
        key: key.to_owned(),
        value: String::new(),
        raw_value: value.as_bytes().to_vec(),
    };
    let http = |headers: Vec<HeaderValue>| attribute_context::HttpRequest {
        method: "GET".to_owned(),
        path: "/orders".to_owned(),
        header_map: Some(HeaderMap { headers }),
        ..Default::default()
    };
    let response = server
        .check_http(http(vec![
            raw(":authority", "orders.internal"),
            raw("authorization", &format!("Bearer {token}")),
            raw("x-s2s-bar", "spoofed"),
        ]))
        .await;
    let ok = ok_of(&response);
    assert_identity_headers(
        ok,
        [
            LEGACY_APP,
            TENANT,
            LEGACY_OID,
            LEGACY_USER_ID,
            "legacy-reports",
            LEGACY_ROLE,
        ],
    );
    assert!(ok.headers_to_remove.iter().any(|h| h == "x-s2s-bar"));

    // Raw headers without a token: denied like any missing token.
    let denied = denied_of(&server.check_http(http(vec![raw("accept", "*/*")])).await);
    assert_eq!(denied.http, 401);
    assert_eq!(denied.header("x-s2s-deny-reason"), Some("TOKEN_MISSING"));
    server.shutdown().await;
}

#[tokio::test]
async fn check_denials_have_the_http_shape() {
    let server = TestServer::start_ready(&Config::new()).await;
    let dev = server.dev();
    let claims = v2_claims(dev, ORDERS_APP, ORDERS_OID, &[APP_ROLE]);
    let billing = dev
        .sign(&v2_claims(dev, BILLING_APP, BILLING_OID, &[]))
        .unwrap();
    let stranger = dev
        .sign(&v2_claims(dev, STRANGER_APP, STRANGER_OID, &[APP_ROLE]))
        .unwrap();
    let unknown = sign_with_kid(dev, &random_kid(), &claims);
    let expired = dev
        .sign(&with(claims.clone(), &[("exp", json!(now() - 1000))]))
        .unwrap();

    // (HTTP status, challenge, CheckResponse.status code)
    type Shape = (i32, &'static str, i32);
    const NO_CREDENTIALS: Shape = (401, "Bearer", 16);
    const INVALID_TOKEN: Shape = (401, "Bearer error=\"invalid_token\"", 16);
    const INSUFFICIENT_SCOPE: Shape = (403, "Bearer error=\"insufficient_scope\"", 7);
    let cases: Vec<(Option<String>, &str, Shape)> = vec![
        (None, "TOKEN_MISSING", NO_CREDENTIALS),
        (
            Some("Basic dXNlcjpwYXNz".to_owned()),
            "TOKEN_MISSING",
            NO_CREDENTIALS,
        ),
        (
            Some("Bearer not-a-jwt".to_owned()),
            "TOKEN_MALFORMED",
            INVALID_TOKEN,
        ),
        (
            Some(format!("Bearer {unknown}")),
            "KEY_NOT_FOUND",
            INVALID_TOKEN,
        ),
        (
            Some(format!("Bearer {expired}")),
            "TOKEN_EXPIRED",
            INVALID_TOKEN,
        ),
        (
            Some(format!("Bearer {billing}")),
            "ROLE_MISSING",
            INSUFFICIENT_SCOPE,
        ),
        (
            Some(format!("Bearer {stranger}")),
            "APPLICATION_NOT_ALLOWED",
            INSUFFICIENT_SCOPE,
        ),
    ];
    for (authorization, reason, (http, challenge, code)) in cases {
        let mut headers = vec![("x-s2s-client-app-id", ORDERS_APP)];
        if let Some(a) = authorization.as_deref() {
            headers.push(("authorization", a));
        }
        let response = server.check(&headers).await;
        let denied = denied_of(&response);
        assert_eq!(denied.http, http, "{reason}");
        assert_eq!(denied.code, code, "{reason}");
        assert_eq!(
            denied.header("www-authenticate"),
            Some(challenge),
            "{reason}"
        );
        assert_eq!(denied.header("x-s2s-deny-reason"), Some(reason));
        assert_eq!(denied.body["reason"], reason);
        assert!(
            denied.body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{reason}: {}",
            denied.body
        );
        if let Some(a) = authorization.as_deref() {
            let token = a.trim_start_matches("Bearer ");
            assert_no_token_in(&denied.body.to_string(), token);
            assert_no_token_in(&response.status.as_ref().unwrap().message, token);
        }
    }
    server.shutdown().await;
}

#[tokio::test]
async fn health_metrics_and_readiness() {
    let server = TestServer::start_ready(&Config::new()).await;
    for service in HEALTH_SERVICES {
        assert_eq!(
            server.health(service).await,
            ServingStatus::Serving,
            "{service:?}"
        );
    }
    let unknown = server
        .health_client()
        .check(HealthCheckRequest {
            service: "no.such.Service".to_owned(),
        })
        .await
        .expect_err("unknown services are not reported healthy");
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    assert_denied(&server.decide("").await, DenyReason::TokenMissing, false);
    assert_allowed(&server.decide(&orders_token(server.dev())).await);
    let (status, metrics) = server.http_get("/metrics").await;
    assert_eq!(status, 200);
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with(r#"s2s_authz_decisions_total{decision="deny",reason="TOKEN_MISSING"} "#)
        })
        .unwrap_or_else(|| panic!("TOKEN_MISSING counter in:\n{metrics}"));
    let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(value >= 1.0, "{line}");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("s2s_authz_decisions_total{decision=\"allow\"")),
        "allow counter in:\n{metrics}"
    );

    let (status, _) = server.http_get("/readyz").await;
    assert_eq!(status, 200);
    let (status, _) = server.http_get("/healthz").await;
    assert_eq!(status, 200);
    server.shutdown().await;
}
