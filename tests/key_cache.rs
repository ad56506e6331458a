//! Signing-key cache behaviour against a development issuer the tests control: rotation, unknown-`kid`
//! floods (throttled, single-flight), last-known-good keys through outages, staleness, an issuer that is
//! down, garbage, oversized or hanging at start — always fail-closed, never a panic.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use envoy_types::pb::envoy::service::auth::v3::CheckResponse;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use s2s_authz::devissuer::{DevIssuer, FaultMode};
use s2s_authz::proto::s2sauthz::v1::{DecideResponse, DenyReason};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tonic_health::pb::health_check_response::ServingStatus;

/// Generous bound for one call that may wait for a key refresh: the configured wait plus slack.
fn call_bound(unknown_kid_wait_ms: u64) -> Duration {
    Duration::from_millis(unknown_kid_wait_ms) + Duration::from_secs(10)
}

/// An orders-service token naming a kid nobody publishes, signed with the real key.
fn unknown_kid_token(dev: &DevIssuer) -> String {
    sign_with_kid(
        dev,
        &random_kid(),
        &v2_claims(dev, ORDERS_APP, ORDERS_OID, &[APP_ROLE]),
    )
}

fn assert_check_unavailable(response: &CheckResponse) {
    assert_eq!(response.status.as_ref().unwrap().code, 14, "{response:?}");
    let Some(HttpResponse::DeniedResponse(denied)) = &response.http_response else {
        panic!("expected a denied response: {response:?}");
    };
    assert_eq!(denied.status.as_ref().unwrap().code, 503);
    let header = |k: &str| {
        denied
            .headers
            .iter()
            .filter_map(|h| h.header.as_ref())
            .find(|h| h.key.eq_ignore_ascii_case(k))
            .map(|h| h.value.clone())
    };
    assert_eq!(
        header("www-authenticate"),
        None,
        "the token is not at fault"
    );
    assert_eq!(
        header("x-s2s-deny-reason").as_deref(),
        Some("ISSUER_UNAVAILABLE")
    );
}

#[tokio::test]
async fn rotation_fetches_new_kids_and_drops_removed_ones() {
    let wait_ms = 10_000;
    let server = TestServer::start_ready(
        &Config::new()
            .key("min_refresh_interval_secs", 0)
            .key("unknown_kid_wait_ms", wait_ms),
    )
    .await;
    let dev = server.dev();
    let old = dev.current_kid();
    let old_token = orders_token(dev);
    assert_allowed(&server.decide(&old_token).await);

    let before = dev.jwks_fetches();
    let new = dev.rotate_key();
    assert_ne!(old, new);
    let new_token = orders_token(dev);
    assert_eq!(segment(&new_token, 0)["kid"], new.as_str());
    // The unknown kid triggers a refresh, which the request waits for.
    let r = tokio::time::timeout(call_bound(wait_ms), server.decide(&new_token))
        .await
        .expect("returns");
    assert_allowed(&r);
    assert!(dev.jwks_fetches() > before, "the new kid was fetched");
    // The old key is still published, so its tokens still verify.
    assert_allowed(&server.decide(&old_token).await);
    assert_allowed(&server.decide(&orders_token(dev)).await);

    // Unpublish the old key; once a refresh has seen that, its tokens are refused.
    assert!(dev.remove_key(&old));
    let r = server.decide(&unknown_kid_token(dev)).await;
    assert_denied(&r, DenyReason::KeyNotFound, false);
    let r = eventually("tokens of the removed key are refused", || async {
        let r = server.decide(&old_token).await;
        if r.allowed {
            // Not refreshed yet: ask again with an unknown kid, which refreshes.
            server.decide(&unknown_kid_token(dev)).await;
            None
        } else {
            Some(r)
        }
    })
    .await;
    assert_denied(&r, DenyReason::KeyNotFound, false);
    let forged = sign_with_key(
        dev,
        &old,
        &v2_claims(dev, ORDERS_APP, ORDERS_OID, &[APP_ROLE]),
    );
    assert_denied(
        &server.decide(&forged).await,
        DenyReason::KeyNotFound,
        false,
    );
    assert_allowed(&server.decide(&new_token).await);
    server.shutdown().await;
}

#[tokio::test]
async fn keys_published_ahead_are_picked_up_and_v1_tokens_follow_rotation() {
    let server = TestServer::start_ready(
        &Config::new()
            .key("min_refresh_interval_secs", 1)
            .key("unknown_kid_wait_ms", 2_000),
    )
    .await;
    let dev = server.dev();
    // Entra pre-publishes the next key: a token signed with it is accepted once the set is refetched.
    let next = dev.add_key();
    let v1 = v1_claims(dev, LEGACY_APP, LEGACY_OID, &[APP_ROLE]);
    let token = sign_with_key(dev, &next, &v1);
    let r = eventually("a pre-published key is fetched on demand", || async {
        let r = server.decide(&token).await;
        if r.allowed {
            return Some(r);
        }
        assert_denied(&r, DenyReason::KeyNotFound, false);
        None
    })
    .await;
    assert_eq!(r.caller.unwrap().token_version, "1.0");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_kid_burst_with_warm_keys_is_throttled() {
    let server = Arc::new(
        TestServer::start_ready(
            &Config::new()
                .key("min_refresh_interval_secs", 3600)
                .key("unknown_kid_wait_ms", 100),
        )
        .await,
    );
    let dev = server.dev();
    let valid = orders_token(dev);
    assert_allowed(&server.decide(&valid).await);
    let before = dev.jwks_fetches();

    let mut calls = JoinSet::new();
    for i in 0..300 {
        let s = server.clone();
        let token = unknown_kid_token(s.dev());
        calls.spawn(async move {
            let r = tokio::time::timeout(call_bound(100), s.decide(&token))
                .await
                .expect("returns");
            (false, r)
        });
        if i % 10 == 0 {
            let s = server.clone();
            let token = valid.clone();
            calls.spawn(async move { (true, s.decide(&token).await) });
        }
    }
    let mut unknown = 0;
    while let Some(joined) = calls.join_next().await {
        let (is_valid, r) = joined.expect("task");
        if is_valid {
            assert_allowed(&r);
        } else {
            assert_denied(&r, DenyReason::KeyNotFound, false);
            unknown += 1;
        }
    }
    assert_eq!(unknown, 300);
    let fetched = dev.jwks_fetches() - before;
    assert!(
        fetched <= 1,
        "{fetched} JWKS fetches for a burst of unknown kids"
    );
    assert_allowed(&server.decide(&valid).await);
    Arc::into_inner(server)
        .expect("sole owner")
        .shutdown()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_kid_burst_joins_the_one_refresh_in_flight() {
    let wait_ms = 200;
    let server = Arc::new(
        TestServer::start_ready(
            &Config::new()
                .key("min_refresh_interval_secs", 1)
                .key("unknown_kid_wait_ms", wait_ms)
                // The refresh must stay in flight for the whole burst.
                .key("fetch_timeout_ms", 120_000),
        )
        .await,
    );
    let dev = server.dev();
    let valid = orders_token(dev);
    assert_allowed(&server.decide(&valid).await);
    dev.set_fault(FaultMode::Hang);
    let before = dev.jwks_fetches();

    // Unknown kids until one starts a refresh (the minimum interval must pass first), which hangs.
    eventually("an unknown kid starts a refresh", || async {
        let r = tokio::time::timeout(call_bound(wait_ms), server.decide(&unknown_kid_token(dev)))
            .await
            .expect("returns while the refresh hangs");
        assert_denied(&r, DenyReason::KeyNotFound, false);
        (dev.jwks_fetches() > before).then_some(())
    })
    .await;
    assert_eq!(dev.jwks_fetches(), before + 1);

    let mut calls = JoinSet::new();
    for i in 0..300 {
        let s = server.clone();
        let token = unknown_kid_token(s.dev());
        calls.spawn(async move {
            let r = tokio::time::timeout(call_bound(wait_ms), s.decide(&token))
                .await
                .expect("each call returns within the unknown-kid wait (plus slack)");
            (false, r)
        });
        if i % 10 == 0 {
            let s = server.clone();
            let token = valid.clone();
            calls.spawn(async move { (true, s.decide(&token).await) });
        }
    }
    let mut unknown = 0;
    while let Some(joined) = calls.join_next().await {
        let (is_valid, r) = joined.expect("task");
        if is_valid {
            assert_allowed(&r);
        } else {
            assert_denied(&r, DenyReason::KeyNotFound, false);
            unknown += 1;
        }
    }
    assert_eq!(unknown, 300);
    assert_eq!(
        dev.jwks_fetches(),
        before + 1,
        "every unknown kid joined the single refresh in flight"
    );
    // Health is unaffected: keys are loaded.
    assert_eq!(server.health("").await, ServingStatus::Serving);
    dev.set_fault(FaultMode::Normal);
    Arc::into_inner(server)
        .expect("sole owner")
        .shutdown()
        .await;
}

#[tokio::test]
async fn unreachable_issuer_keeps_serving_last_known_good_keys() {
    let server = TestServer::start_ready(
        &Config::new()
            .key("min_refresh_interval_secs", 0)
            .key("unknown_kid_wait_ms", 5_000),
    )
    .await;
    let dev = server.dev();
    let valid = orders_token(dev);
    assert_allowed(&server.decide(&valid).await);

    dev.set_fault(FaultMode::Unavailable);
    let before = dev.jwks_fetches();
    // An unknown kid makes the cache try the issuer, which fails; the keys it had stay.
    let r = server.decide(&unknown_kid_token(dev)).await;
    assert_denied(&r, DenyReason::KeyNotFound, false);
    eventually("a refresh was attempted", || async {
        (dev.jwks_fetches() > before).then_some(())
    })
    .await;
    for _ in 0..5 {
        assert_allowed(&server.decide(&valid).await);
        assert_allowed(&server.decide(&orders_token(dev)).await);
        assert_denied(
            &server.decide(&unknown_kid_token(dev)).await,
            DenyReason::KeyNotFound,
            false,
        );
    }
    assert_eq!(server.health("").await, ServingStatus::Serving);
    dev.set_fault(FaultMode::Normal);
    assert_allowed(&server.decide(&valid).await);
    server.shutdown().await;
}

#[tokio::test]
async fn hanging_refresh_times_out_and_the_server_keeps_answering() {
    let wait_ms = 100;
    let server = TestServer::start_ready(
        &Config::new()
            .key("min_refresh_interval_secs", 0)
            .key("unknown_kid_wait_ms", wait_ms)
            .key("fetch_timeout_ms", 300),
    )
    .await;
    let dev = server.dev();
    let valid = orders_token(dev);
    dev.set_fault(FaultMode::Hang);
    let before = dev.jwks_fetches();
    // Each unknown kid starts (or joins) a refresh that hangs until the fetch timeout ends it.
    eventually("several refreshes have timed out", || async {
        let r = tokio::time::timeout(call_bound(wait_ms), server.decide(&unknown_kid_token(dev)))
            .await
            .expect("returns while the issuer hangs");
        assert_denied(&r, DenyReason::KeyNotFound, false);
        let r = tokio::time::timeout(call_bound(wait_ms), server.decide(&valid))
            .await
            .expect("returns while the issuer hangs");
        assert_allowed(&r);
        (dev.jwks_fetches() >= before + 3).then_some(())
    })
    .await;
    assert_eq!(server.health("").await, ServingStatus::Serving);
    dev.set_fault(FaultMode::Normal);
    server.shutdown().await;
}

/// Warm keys, then a fault: the last good keys serve until they are older than `max_staleness_secs`,
/// after which decisions are ISSUER_UNAVAILABLE (never allowed) until the issuer recovers.
async fn stale_keys_fail_closed(fault: FaultMode) {
    let server = TestServer::start_ready(
        &Config::new()
            .key("min_refresh_interval_secs", 1)
            .key("max_staleness_secs", 1)
            .key("unknown_kid_wait_ms", 1_000),
    )
    .await;
    let dev = server.dev();
    let valid = orders_token(dev);
    eventually("allowed with fresh keys", || async {
        server.decide(&valid).await.allowed.then_some(())
    })
    .await;

    dev.set_fault(fault);
    let r: DecideResponse = eventually("stale keys stop serving", || async {
        let r = server.decide(&valid).await;
        if r.allowed {
            return None;
        }
        assert_denied(&r, DenyReason::IssuerUnavailable, false);
        Some(r)
    })
    .await;
    assert!(!r.allowed);
    for _ in 0..5 {
        let r = server.decide(&valid).await;
        assert_denied(&r, DenyReason::IssuerUnavailable, false);
        let r = server.decide(&unknown_kid_token(dev)).await;
        assert_denied(&r, DenyReason::IssuerUnavailable, false);
    }
    let auth = format!("Bearer {valid}");
    assert_check_unavailable(&server.check(&[("authorization", &auth)]).await);

    dev.set_fault(FaultMode::Normal);
    eventually("recovers once the issuer answers again", || async {
        let r = server.decide(&valid).await;
        if !r.allowed {
            assert_eq!(r.reason(), DenyReason::IssuerUnavailable, "{r:?}");
        }
        r.allowed.then_some(())
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn stale_keys_fail_closed_when_the_issuer_is_unavailable() {
    stale_keys_fail_closed(FaultMode::Unavailable).await;
}

#[tokio::test]
async fn stale_keys_fail_closed_when_the_jwks_is_garbage() {
    stale_keys_fail_closed(FaultMode::Garbage).await;
}

#[tokio::test]
async fn stale_keys_fail_closed_when_the_jwks_is_oversized() {
    stale_keys_fail_closed(FaultMode::Oversized).await;
}

/// The issuer is already broken (`fault`) when the server starts; it must fail closed, keep answering,
/// and heal by itself once the issuer works.
async fn issuer_broken_at_start(fault: FaultMode, extra: &[(&'static str, u64)]) {
    let dev = start_dev_issuer().await;
    dev.set_fault(fault);
    let mut config = Config::new()
        .external(dev.instance())
        .key("min_refresh_interval_secs", 1);
    for (k, v) in extra {
        config = config.key(k, *v);
    }
    let server = TestServer::start(&config).await;
    let token = dev
        .mint_app_token(TENANT, &orders_client(), AUDIENCE)
        .unwrap();
    let v1 = dev
        .mint_app_token(TENANT, &legacy_client(), AUDIENCE)
        .unwrap();
    let auth = format!("Bearer {token}");

    // At least two discovery attempts (start-up and a retry) have failed.
    eventually("discovery was attempted twice", || async {
        (dev.discovery_fetches() >= 4).then_some(())
    })
    .await;
    for service in HEALTH_SERVICES {
        assert_eq!(
            server.health(service).await,
            ServingStatus::NotServing,
            "{service:?}"
        );
    }
    let (status, _) = server.http_get("/readyz").await;
    assert_eq!(status, 503);
    for _ in 0..3 {
        for t in [&token, &v1] {
            let r = tokio::time::timeout(call_bound(1_000), server.decide(t))
                .await
                .expect("answers while the issuer is broken");
            assert_denied(&r, DenyReason::IssuerUnavailable, false);
        }
        assert_check_unavailable(&server.check(&[("authorization", &auth)]).await);
    }
    // Problems with the token itself are still reported as such.
    assert_denied(&server.decide("").await, DenyReason::TokenMissing, false);

    dev.set_fault(FaultMode::Normal);
    server.wait_serving().await;
    let (status, _) = server.http_get("/readyz").await;
    assert_eq!(status, 200);
    assert_allowed(&server.decide(&token).await);
    assert_allowed(&server.decide(&v1).await);
    let response = server.check(&[("authorization", &auth)]).await;
    assert_eq!(response.status.unwrap().code, 0);
    server.shutdown().await;
    dev.shutdown().await;
}

#[tokio::test]
async fn issuer_down_at_start_fails_closed_then_recovers() {
    issuer_broken_at_start(FaultMode::Unavailable, &[]).await;
}

#[tokio::test]
async fn garbage_documents_at_start_fail_closed_then_recover() {
    issuer_broken_at_start(FaultMode::Garbage, &[]).await;
}

#[tokio::test]
async fn oversized_documents_at_start_fail_closed_then_recover() {
    issuer_broken_at_start(FaultMode::Oversized, &[]).await;
}

#[tokio::test]
async fn hanging_issuer_at_start_times_out_then_recovers() {
    issuer_broken_at_start(FaultMode::Hang, &[("fetch_timeout_ms", 300)]).await;
}
