//! Shutdown of the real binary under load: SIGTERM while calls are in flight (held on a key refresh by
//! an issuer the test controls) lets them finish with real answers, refuses new ones cleanly, turns
//! health NOT_SERVING for watchers, and exits 0; the drain timeout bounds a call that cannot finish.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use s2s_authz::devissuer::{
    DevClient as IssuerClient, DevIssuer, DevIssuerConfig, DevTenant, FaultMode, TokenVersion,
};
use s2s_authz::proto::s2sauthz::v1::authorizer_client::AuthorizerClient;
use s2s_authz::proto::s2sauthz::v1::{DecideRequest, DecideResponse, DenyReason};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use support::{AUDIENCE, DEADLINE, ORDERS, Sidecar, TENANT, dev_config};
use tokio::task::{JoinSet, block_in_place};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Billing is on the development allowlist, but its tokens carry no app role.
const BILLING_APP: &str = "8b9c0d1e-2f30-4a41-b5c6-d7e8f9a0b1c2";
const BILLING_OID: &str = "7f6e5d4c-3b2a-4918-8776-655443322110";

fn client(app: &str, oid: &str, roles: &[&str]) -> IssuerClient {
    IssuerClient {
        client_id: app.to_owned(),
        client_secret: "unused".to_owned(),
        object_id: oid.to_owned(),
        roles: roles.iter().map(|r| (*r).to_owned()).collect(),
        token_version: TokenVersion::V2,
    }
}

/// An issuer for the development tenant that the test controls (faults, keys), on loopback port 0.
async fn start_issuer() -> DevIssuer {
    DevIssuer::start(DevIssuerConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        tenants: vec![DevTenant {
            tenant_id: TENANT.to_owned(),
            clients: vec![client(ORDERS.client_id, ORDERS.object_id, &["S2SAppRole"])],
        }],
        token_lifetime: Duration::from_secs(3600),
    })
    .await
    .unwrap()
}

/// The development configuration without its embedded issuer, trusting `issuer` instead, plus `extra`.
fn config_for(issuer: &DevIssuer, extra: &str) -> String {
    let base = dev_config();
    let cut = base.find("\ndev_issuer:").expect("a dev_issuer section");
    let base = base[..=cut].replacen(
        "auth:\n",
        &format!("auth:\n  instance: \"{}\"\n", issuer.instance()),
        1,
    );
    format!("{base}{extra}")
}

async fn channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn decide_request(token: &str) -> DecideRequest {
    DecideRequest {
        token: token.to_owned(),
        context: None,
    }
}

/// `Decide`, failing the test if it takes longer than `DEADLINE`: no call may hang.
async fn decide(
    client: &mut AuthorizerClient<Channel>,
    token: &str,
) -> Result<DecideResponse, tonic::Status> {
    tokio::time::timeout(DEADLINE, client.decide(decide_request(token)))
        .await
        .expect("a call returned or failed within the deadline")
        .map(tonic::Response::into_inner)
}

/// The sidecar's `s2s_authz_key_refresh_waiters` gauge.
fn key_refresh_waiters(sidecar: &Sidecar) -> Option<u64> {
    let (_, body) = support::http_get(sidecar.metrics_addr, "/metrics")?;
    body.lines()
        .find_map(|l| l.strip_prefix("s2s_authz_key_refresh_waiters "))
        .and_then(|v| v.trim().parse().ok())
}

/// A call the sidecar did not take: UNAVAILABLE (the connection was refused or went away), or a request
/// the client had queued on a connection that closed before it was sent (hyper cancels it, which tonic
/// reports as CANCELLED "connection closed"; it never reached the server, so a client retries it), or a
/// request sent while the server's graceful GOAWAY (NO_ERROR) was on its way: its stream is above the
/// GOAWAY's last stream id, so the server did not process it (RFC 9113 §6.8), and h2 fails it with that
/// GOAWAY, which tonic reports as INTERNAL.
fn refused_cleanly(status: &tonic::Status) -> bool {
    let debug = format!("{status:?}");
    match status.code() {
        tonic::Code::Unavailable => true,
        tonic::Code::Cancelled => debug.contains("connection closed"),
        tonic::Code::Internal => debug.contains("GoAway(b\"\", NO_ERROR, Remote)"),
        _ => false,
    }
}

/// What a call of the steady load must get: `None` is an allow, else the deny reason.
fn expected_answer(expected: Option<DenyReason>, response: &DecideResponse) {
    match expected {
        None => assert!(response.allowed, "expected an allow: {response:?}"),
        Some(reason) => {
            assert!(!response.allowed, "expected {reason:?}: {response:?}");
            assert_eq!(response.reason(), reason, "{response:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_finishes_calls_in_flight_refuses_new_ones_and_exits_0() {
    let issuer = start_issuer().await;
    let keys = "keys: {min_refresh_interval_secs: 0, unknown_kid_wait_ms: 60000, fetch_timeout_ms: 60000}\n";
    let config = config_for(&issuer, &format!("{keys}drain_timeout_secs: 30\n"));
    let mut sidecar = block_in_place(|| Sidecar::start_with_config(&config));
    let addr = sidecar.grpc_addr;

    let orders = client(ORDERS.client_id, ORDERS.object_id, &["S2SAppRole"]);
    let valid = issuer.mint_app_token(TENANT, &orders, AUDIENCE).unwrap();
    let billing = client(BILLING_APP, BILLING_OID, &[]);
    let no_role = issuer.mint_app_token(TENANT, &billing, AUDIENCE).unwrap();
    let (head, signature) = valid.rsplit_once('.').unwrap();
    let flipped = if signature.starts_with('A') { 'B' } else { 'A' };
    let forged = format!("{head}.{flipped}{}", &signature[1..]);
    let mix = [
        (valid.clone(), None),
        (no_role, Some(DenyReason::RoleMissing)),
        (forged, Some(DenyReason::SignatureInvalid)),
    ];

    // A steady load on connections of its own; every answer must be right, and the only failures
    // allowed are clean refusals once SIGTERM has been sent.
    let terminated = Arc::new(AtomicBool::new(false));
    let mut load = JoinSet::new();
    for (token, expected) in mix.iter().cloned().cycle().take(6) {
        let mut client = AuthorizerClient::new(channel(addr).await);
        let terminated = terminated.clone();
        load.spawn(async move {
            let (mut before, mut after) = (0u64, 0u64);
            loop {
                let sent_after_term = terminated.load(Ordering::SeqCst);
                match decide(&mut client, &token).await {
                    Ok(response) => {
                        expected_answer(expected, &response);
                        if sent_after_term {
                            after += 1
                        } else {
                            before += 1
                        }
                    }
                    Err(status) => {
                        assert!(
                            terminated.load(Ordering::SeqCst),
                            "a call failed before SIGTERM: {status:?}"
                        );
                        assert!(refused_cleanly(&status), "{status:?}");
                        return (before, after);
                    }
                }
            }
        });
    }

    // Calls held in flight: their tokens name a key the sidecar has not seen, so each waits on the one
    // refresh, which the issuer holds until the test releases it.
    issuer.set_fault(FaultMode::Hang);
    let fetches = issuer.jwks_fetches();
    issuer.rotate_key();
    let held_token = issuer.mint_app_token(TENANT, &orders, AUDIENCE).unwrap();
    let held_channel = channel(addr).await;
    let mut held = JoinSet::new();
    const HELD: u64 = 8;
    for _ in 0..HELD {
        let mut client = AuthorizerClient::new(held_channel.clone());
        let token = held_token.clone();
        held.spawn(async move { decide(&mut client, &token).await });
    }
    block_in_place(|| {
        support::poll("every held call waiting on the key refresh", || {
            (key_refresh_waiters(&sidecar) == Some(HELD)).then_some(())
        })
    });
    assert_eq!(issuer.jwks_fetches(), fetches + 1, "one refresh, held");

    terminated.store(true, Ordering::SeqCst);
    sidecar.signal("TERM");

    // New connections are refused as soon as the listener closes; a new call fails UNAVAILABLE at once.
    block_in_place(|| {
        support::poll("the decision port to refuse connections", || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
                .then_some(())
        })
    });
    let lazy = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let refused = decide(&mut AuthorizerClient::new(lazy), &valid)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    // Every load task has been refused by now, after answering correctly until SIGTERM.
    while let Some(joined) = load.join_next().await {
        let (before, _after) = joined.unwrap();
        assert!(before > 0, "the load ran before SIGTERM");
    }

    // The held calls are still in flight, and the process waits for them.
    assert_eq!(held.len() as u64, HELD);
    assert!(
        sidecar.process.try_wait().is_none(),
        "the process drains in-flight calls before exiting"
    );
    issuer.set_fault(FaultMode::Normal);
    while let Some(joined) = held.join_next().await {
        let response = joined
            .unwrap()
            .expect("a call in flight at SIGTERM gets its answer");
        assert!(
            response.allowed,
            "signed by the newly fetched key: {response:?}"
        );
    }
    let status = block_in_place(|| sidecar.wait_exit(DEADLINE))
        .unwrap_or_else(|| panic!("s2s-authz still runs {DEADLINE:?} after its calls finished"));
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}"
    );
    block_in_place(|| sidecar.wait_for_log(&["stopped"]));
    issuer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_watchers_see_not_serving_at_sigterm_and_do_not_hold_the_drain() {
    // A drain timeout far longer than the deadline: exiting within the deadline shows that the open
    // Watch streams did not hold the shutdown.
    let config = format!("{}drain_timeout_secs: 600\n", dev_config());
    let mut sidecar = block_in_place(|| Sidecar::start_with_config(&config));
    let mut streams = Vec::new();
    for addr in [sidecar.grpc_addr, sidecar.admin_addr] {
        let mut health = HealthClient::new(channel(addr).await);
        let mut stream = health
            .watch(HealthCheckRequest::default())
            .await
            .unwrap()
            .into_inner();
        let first = stream.message().await.unwrap().expect("a first status");
        assert_eq!(first.status(), ServingStatus::Serving, "{addr}");
        streams.push((addr, stream));
    }

    sidecar.signal("TERM");
    for (addr, mut stream) in streams {
        let next = tokio::time::timeout(DEADLINE, stream.message())
            .await
            .expect("the watcher hears of the shutdown")
            .unwrap()
            .expect("a status before the stream ends");
        assert_eq!(next.status(), ServingStatus::NotServing, "{addr}");
        let end = tokio::time::timeout(DEADLINE, stream.message())
            .await
            .expect("the Watch stream ends");
        assert!(
            matches!(end, Ok(None)),
            "{addr}: the stream ends cleanly: {end:?}"
        );
    }
    let status = block_in_place(|| sidecar.wait_exit(DEADLINE))
        .unwrap_or_else(|| panic!("s2s-authz still runs {DEADLINE:?} after SIGTERM"));
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_timeout_bounds_a_call_that_cannot_finish() {
    let issuer = start_issuer().await;
    let keys = "keys: {min_refresh_interval_secs: 0, unknown_kid_wait_ms: 600000, fetch_timeout_ms: 600000}\n";
    let config = config_for(&issuer, &format!("{keys}drain_timeout_secs: 1\n"));
    let mut sidecar = block_in_place(|| Sidecar::start_with_config(&config));

    issuer.set_fault(FaultMode::Hang);
    issuer.rotate_key();
    let orders = client(ORDERS.client_id, ORDERS.object_id, &["S2SAppRole"]);
    let token = issuer.mint_app_token(TENANT, &orders, AUDIENCE).unwrap();
    let mut client = AuthorizerClient::new(channel(sidecar.grpc_addr).await);
    let stuck = tokio::spawn(async move { decide(&mut client, &token).await });
    block_in_place(|| {
        support::poll("the call waiting on the held key refresh", || {
            (key_refresh_waiters(&sidecar) == Some(1)).then_some(())
        })
    });

    // The issuer never answers; the process still exits by itself, cutting the call (never an allow).
    sidecar.signal("TERM");
    let status = block_in_place(|| sidecar.wait_exit(DEADLINE))
        .unwrap_or_else(|| panic!("s2s-authz still runs {DEADLINE:?} after SIGTERM"));
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}"
    );
    let cut = stuck.await.unwrap();
    assert!(cut.is_err(), "the call is cut, not answered: {cut:?}");
    block_in_place(|| sidecar.wait_for_log(&["after the drain timeout"]));
    issuer.set_fault(FaultMode::Normal);
    issuer.shutdown().await;
}
