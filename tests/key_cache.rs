//! Signing-key cache behaviour against a development issuer the tests control: rotation (also under a
//! steady load), unknown-`kid` floods (throttled, single-flight, 10,000 among valid traffic), a slow JWKS
//! endpoint, last-known-good keys through outages, staleness, an issuer that is down, garbage, oversized
//! or hanging at start — always fail-closed, never a panic.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use envoy_types::pb::envoy::service::auth::v3::CheckResponse;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use s2s_authz::devissuer::{DevIssuer, FaultMode};
use s2s_authz::proto::s2sauthz::v1::{DecideResponse, DenyReason};
use std::sync::Arc;
use std::time::{Duration, Instant};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_jwks_endpoint_never_stalls_decisions_whose_keys_are_cached() {
    let wait_ms = 200;
    let server = Arc::new(
        TestServer::start_ready(
            &Config::new()
                .key("min_refresh_interval_secs", 0)
                .key("unknown_kid_wait_ms", wait_ms)
                // Slow, not failing: the fetch must outlive the whole test, not time out.
                .key("fetch_timeout_ms", 120_000),
        )
        .await,
    );
    let dev = server.dev();
    let old = dev.current_kid();
    let hot = orders_token(dev);
    assert_allowed(&server.decide(&hot).await);

    // The issuer now holds every JWKS response until the test releases it.
    dev.set_fault(FaultMode::Hang);
    let before = dev.jwks_fetches();
    dev.rotate_key();
    let new_token = orders_token(dev);
    let r = tokio::time::timeout(call_bound(wait_ms), server.decide(&new_token))
        .await
        .expect("gives up on the slow refresh after its wait");
    assert_denied(&r, DenyReason::KeyNotFound, false);
    assert_eq!(
        dev.jwks_fetches(),
        before + 1,
        "the slow refresh is in flight"
    );

    // While it is in flight, every token whose key is cached is decided on the cached keys: the hot
    // token (a token-cache hit) and fresh tokens that need verifying, v2 and v1, allowed and denied.
    // A decision that waited on the held fetch could only end in KEY_NOT_FOUND or never.
    let mut calls = JoinSet::new();
    for i in 0..40 {
        let (token, expected) = match i % 4 {
            0 => (hot.clone(), None),
            1 => (
                sign_with_key(
                    dev,
                    &old,
                    &v2_claims(dev, ORDERS_APP, ORDERS_OID, &[APP_ROLE]),
                ),
                None,
            ),
            2 => (
                sign_with_key(
                    dev,
                    &old,
                    &v1_claims(dev, LEGACY_APP, LEGACY_OID, &[APP_ROLE]),
                ),
                None,
            ),
            _ => (
                sign_with_key(dev, &old, &v2_claims(dev, BILLING_APP, BILLING_OID, &[])),
                Some(DenyReason::RoleMissing),
            ),
        };
        let s = server.clone();
        calls.spawn(async move {
            let r = tokio::time::timeout(call_bound(wait_ms), s.decide(&token))
                .await
                .expect("returns while the JWKS endpoint is slow");
            (expected, r)
        });
    }
    while let Some(joined) = calls.join_next().await {
        match joined.expect("task") {
            (None, r) => assert_allowed(&r),
            (Some(reason), r) => assert_denied(&r, reason, true),
        }
    }
    // Still the one fetch, still held: the new kid joins it and gives up again.
    assert_denied(
        &server.decide(&new_token).await,
        DenyReason::KeyNotFound,
        false,
    );
    assert_eq!(dev.jwks_fetches(), before + 1);

    // Released, the slow response itself brings the new key: no second fetch is needed.
    dev.set_fault(FaultMode::Normal);
    eventually("the slow response's keys serve", || async {
        server.decide(&new_token).await.allowed.then_some(())
    })
    .await;
    assert_eq!(dev.jwks_fetches(), before + 1);
    Arc::into_inner(server)
        .expect("sole owner")
        .shutdown()
        .await;
}

/// Where a key is in its life, as the test moves it, and so what its tokens must get.
const TRUSTED: u8 = 0;
/// Added but perhaps not fetched yet, or removed but perhaps still cached: either answer is right.
const CHANGING: u8 = 1;
/// Removed, and the sidecar has refreshed since: its tokens are KEY_NOT_FOUND, never allowed.
const REVOKED: u8 = 2;

/// One signing key of the issuer with tokens signed by it and what each must get while it is trusted.
struct TrackedKey {
    kid: String,
    state: std::sync::atomic::AtomicU8,
    /// Calls made (and checked) in each state.
    calls: [std::sync::atomic::AtomicU64; 3],
    tokens: Vec<(String, Option<DenyReason>)>,
}

impl TrackedKey {
    fn new(dev: &DevIssuer, kid: String, state: u8) -> Arc<TrackedKey> {
        let tokens = vec![
            (
                sign_with_key(
                    dev,
                    &kid,
                    &v2_claims(dev, ORDERS_APP, ORDERS_OID, &[APP_ROLE]),
                ),
                None,
            ),
            (
                sign_with_key(
                    dev,
                    &kid,
                    &v1_claims(dev, LEGACY_APP, LEGACY_OID, &[APP_ROLE]),
                ),
                None,
            ),
            (
                sign_with_key(dev, &kid, &v2_claims(dev, BILLING_APP, BILLING_OID, &[])),
                Some(DenyReason::RoleMissing),
            ),
        ];
        Arc::new(TrackedKey {
            kid,
            state: std::sync::atomic::AtomicU8::new(state),
            calls: Default::default(),
            tokens,
        })
    }

    fn state(&self) -> u8 {
        self.state.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn set(&self, state: u8) {
        self.state.store(state, std::sync::atomic::Ordering::SeqCst);
    }

    fn calls(&self, state: u8) -> u64 {
        self.calls[usize::from(state)].load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Checks one answer for a token of `key` against the key's state before and after the call.
fn check_key_answer(
    key: &TrackedKey,
    expected: Option<DenyReason>,
    (before, after): (u8, u8),
    r: &DecideResponse,
) {
    let own = || match expected {
        None => r.allowed,
        Some(reason) => !r.allowed && r.reason() == reason,
    };
    let revoked = || !r.allowed && r.reason() == DenyReason::KeyNotFound && r.caller.is_none();
    let right = match (before, after) {
        (TRUSTED, TRUSTED) => own(),
        (REVOKED, REVOKED) => revoked(),
        _ => own() || revoked(),
    };
    assert!(
        right,
        "key {} in states {before}->{after}, expected {expected:?}: {r:?}",
        key.kid
    );
}

/// Lets the steady load make `n` checked calls with `key` in `state`.
async fn wait_for_calls(key: &TrackedKey, state: u8, n: u64) {
    eventually(
        &format!("{n} calls with key {} in state {state}", key.kid),
        || async { (key.calls(state) >= n).then_some(()) },
    )
    .await;
}

/// Makes the sidecar refresh until tokens of the removed `key` are refused on both slots (v1 and v2),
/// then marks it revoked: from then on, no token of it may be allowed.
async fn confirm_removed(server: &TestServer, key: &TrackedKey) {
    let dev = server.dev();
    for (i, (token, _)) in key.tokens.iter().enumerate().take(2) {
        eventually(
            &format!("tokens of removed key {} refused", key.kid),
            || async {
                let r = server.decide(token).await;
                if !r.allowed {
                    assert_denied(&r, DenyReason::KeyNotFound, false);
                    return Some(());
                }
                // Still cached: an unknown kid on the same slot makes the sidecar refresh.
                let claims = if i == 0 {
                    v2_claims(dev, ORDERS_APP, ORDERS_OID, &[APP_ROLE])
                } else {
                    v1_claims(dev, LEGACY_APP, LEGACY_OID, &[APP_ROLE])
                };
                server
                    .decide(&sign_with_kid(dev, &random_kid(), &claims))
                    .await;
                None
            },
        )
        .await;
    }
    key.set(REVOKED);
}

/// Makes the sidecar fetch the just-published `key` (its tokens name an unknown kid, which refreshes)
/// until both slots know it, then marks it trusted.
async fn confirm_added(server: &TestServer, key: &TrackedKey) {
    for (token, _) in key.tokens.iter().take(2) {
        eventually(
            &format!("tokens of new key {} allowed", key.kid),
            || async { server.decide(token).await.allowed.then_some(()) },
        )
        .await;
    }
    key.set(TRUSTED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_added_rotated_and_removed_under_steady_load_are_never_misjudged() {
    let server = Arc::new(
        TestServer::start_ready(
            &Config::new()
                .key("min_refresh_interval_secs", 0)
                .key("unknown_kid_wait_ms", 2_000),
        )
        .await,
    );
    let dev = server.dev();
    let first = TrackedKey::new(dev, dev.current_kid(), TRUSTED);
    let keys = Arc::new(std::sync::RwLock::new(vec![first.clone()]));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));

    // The steady load: every worker cycles through every token of every key the test has made.
    let mut load = JoinSet::new();
    for worker in 0..6usize {
        let (server, keys, stop) = (server.clone(), keys.clone(), stop.clone());
        load.spawn(async move {
            let mut i = worker;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let key = {
                    let keys = keys.read().unwrap();
                    keys[i % keys.len()].clone()
                };
                let (token, expected) = &key.tokens[(i / 7) % key.tokens.len()];
                let before = key.state();
                let r = tokio::time::timeout(call_bound(2_000), server.decide(token))
                    .await
                    .expect("no call hangs");
                let after = key.state();
                check_key_answer(&key, *expected, (before, after), &r);
                if before == after {
                    key.calls[usize::from(before)]
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                i += 1;
            }
        });
    }
    let track = |key: &Arc<TrackedKey>| keys.write().unwrap().push(key.clone());
    wait_for_calls(&first, TRUSTED, 30).await;

    // Entra pre-publishes the next key before signing with it.
    let published = TrackedKey::new(dev, dev.add_key(), CHANGING);
    track(&published);
    confirm_added(&server, &published).await;
    wait_for_calls(&published, TRUSTED, 30).await;

    // Rotation: a new signing key, the old ones still published.
    let rotated = TrackedKey::new(dev, dev.rotate_key(), CHANGING);
    track(&rotated);
    confirm_added(&server, &rotated).await;
    wait_for_calls(&rotated, TRUSTED, 30).await;

    // The first key, then the pre-published one, are unpublished: after a refresh, never allowed again.
    for removed in [&first, &published] {
        removed.set(CHANGING);
        assert!(dev.remove_key(&removed.kid));
        confirm_removed(&server, removed).await;
        wait_for_calls(removed, REVOKED, 30).await;
    }
    // The remaining key serves on.
    let calls = rotated.calls(TRUSTED);
    wait_for_calls(&rotated, TRUSTED, calls + 30).await;

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    while let Some(joined) = load.join_next().await {
        joined.expect("every answer of the steady load was right");
    }
    assert_eq!(dev.published_kids(), vec![rotated.kid.clone()]);
    Arc::into_inner(server)
        .expect("sole owner")
        .shutdown()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_unknown_kids_among_valid_traffic_cost_one_fetch_per_minimum_interval() {
    const FLOOD: usize = 10_000;
    const IN_FLIGHT: usize = 64;
    let min_interval = Duration::from_secs(2);
    let server = Arc::new(
        TestServer::start_ready(
            &Config::new()
                .key("min_refresh_interval_secs", min_interval.as_secs())
                .key("unknown_kid_wait_ms", 100),
        )
        .await,
    );
    let dev = server.dev();
    // Valid traffic: a hot token and fresh ones, each needing a verification the first time.
    let valid: Vec<String> = std::iter::once(orders_token(dev))
        .chain((0..20).map(|_| orders_token(dev)))
        .collect();
    assert_allowed(&server.decide(&valid[0]).await);
    // The flood: a real token's claims and signature under headers naming random kids, as an attacker
    // replaying a token would send (the kid is looked up before the signature is checked).
    let genuine = orders_token(dev);
    let (_, rest) = genuine.split_once('.').unwrap();
    let unknown = |_| {
        let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": random_kid()});
        format!("{}.{rest}", URL_SAFE_NO_PAD.encode(header.to_string()))
    };

    let before = dev.jwks_fetches();
    let started = Instant::now();
    let mut calls = JoinSet::new();
    let (mut flood, mut allowed) = (0usize, 0usize);
    for i in 0..FLOOD + FLOOD / 10 {
        // Every eleventh call is valid traffic, the rest the flood.
        let (token, is_valid) = if i % 11 == 10 {
            (valid[i % valid.len()].clone(), true)
        } else {
            (unknown(i), false)
        };
        let s = server.clone();
        calls.spawn(async move {
            let r = tokio::time::timeout(call_bound(100), s.decide(&token))
                .await
                .expect("each call returns within the unknown-kid wait (plus slack)");
            (is_valid, r)
        });
        while calls.len() >= IN_FLIGHT {
            let (is_valid, r) = calls.join_next().await.unwrap().expect("task");
            count_flood_answer(is_valid, &r, &mut flood, &mut allowed);
        }
    }
    while let Some(joined) = calls.join_next().await {
        let (is_valid, r) = joined.expect("task");
        count_flood_answer(is_valid, &r, &mut flood, &mut allowed);
    }
    let elapsed = started.elapsed();
    assert_eq!((flood, allowed), (FLOOD, FLOOD / 10));

    // Refreshes of one jwks_uri start at least `min_interval` apart, whatever the flood: over the
    // burst, at most one per interval it spanned, plus one at its start.
    let fetched = dev.jwks_fetches() - before;
    let bound = 1 + (elapsed.as_secs_f64() / min_interval.as_secs_f64()).floor() as u64;
    eprintln!(
        "{FLOOD} unknown kids and {allowed} valid calls: {fetched} JWKS fetches in {elapsed:?}"
    );
    assert!(
        fetched <= bound,
        "{fetched} JWKS fetches for {FLOOD} unknown kids over {elapsed:?} (at most {bound})"
    );
    assert_allowed(&server.decide(&valid[0]).await);
    Arc::into_inner(server)
        .expect("sole owner")
        .shutdown()
        .await;
}

fn count_flood_answer(is_valid: bool, r: &DecideResponse, flood: &mut usize, allowed: &mut usize) {
    if is_valid {
        assert_allowed(r);
        *allowed += 1;
    } else {
        assert_denied(r, DenyReason::KeyNotFound, false);
        *flood += 1;
    }
}
