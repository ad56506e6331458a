//! A fleet on one PostgreSQL registry: two real `s2s-authz` binaries share a database (started by
//! `scripts/test` on loopback), and a change made through either sidecar, or straight in the database by
//! another tool, reaches the other's decisions within one second (LISTEN/NOTIFY). A change that sends no
//! notice is healed by the periodic resync.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use s2s_authz::proto::s2sauthz::v1::authorizer_client::AuthorizerClient;
use s2s_authz::proto::s2sauthz::v1::registry_client::RegistryClient;
use s2s_authz::proto::s2sauthz::v1::{
    AppEntry, AppEntryKind, CreateAppEntryRequest, DecideRequest, DecideResponse, DeleteRequest,
    DenyReason, GetRequest, UpdateAppEntryRequest,
};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::{PgDatabase, STRANGER, Sidecar, TENANT, block_on, dev_config, poll};

/// The contract: a change reaches every sidecar's decisions within one second.
const PROPAGATION: Duration = Duration::from_secs(1);
const ENTRY: &str = "stranger-service";

/// The development configuration on a shared database. `instance`: another sidecar's issuer to trust
/// instead of this one's own (so that both sidecars accept the same tokens).
fn config(db: &PgDatabase, instance: Option<&str>, resync_secs: u64) -> String {
    let mut text = format!(
        "database_url: {}\nregistry_resync_secs: {resync_secs}\n{}",
        db.url,
        dev_config()
    );
    if let Some(instance) = instance {
        text = text.replacen("auth:\n", &format!("auth:\n  instance: {instance}\n"), 1);
    }
    text
}

/// Two sidecars on one database, both trusting the first one's development issuer.
fn fleet(db: &PgDatabase, resync_secs: u64) -> (Sidecar, Sidecar) {
    let a = Sidecar::start_with_config(&config(db, None, resync_secs));
    let b = Sidecar::start_with_config(&config(db, Some(&a.issuer_url()), resync_secs));
    (a, b)
}

fn decide(addr: SocketAddr, token: &str) -> DecideResponse {
    let token = token.to_owned();
    block_on(async move {
        let mut client = AuthorizerClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        client
            .decide(DecideRequest {
                token,
                context: None,
            })
            .await
            .unwrap()
            .into_inner()
    })
}

/// Polls `addr`'s decision for `token` until `wanted` holds, for at most `bound`; returns how long it took.
fn decision_within(
    bound: Duration,
    addr: SocketAddr,
    token: &str,
    what: &str,
    wanted: impl Fn(&DecideResponse) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let response = decide(addr, token);
        if wanted(&response) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < bound,
            "{what}: not seen within {bound:?}; last decision: {response:?}"
        );
        std::thread::yield_now();
    }
}

fn stranger_entry() -> AppEntry {
    AppEntry {
        name: ENTRY.to_owned(),
        client_app_id: STRANGER.client_id.to_owned(),
        tenant_id: TENANT.to_owned(),
        kind: AppEntryKind::ClientCredentials as i32,
        enabled: true,
        ..Default::default()
    }
}

fn admin_call<T, F>(
    addr: SocketAddr,
    call: impl FnOnce(RegistryClient<tonic::transport::Channel>) -> F + Send + 'static,
) -> T
where
    T: Send + 'static,
    F: std::future::Future<Output = T> + Send,
{
    block_on(async move {
        let client = RegistryClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        call(client).await
    })
}

fn create_entry(addr: SocketAddr) -> Result<AppEntry, tonic::Status> {
    admin_call(addr, move |mut admin| async move {
        admin
            .create_app_entry(CreateAppEntryRequest {
                entry: Some(stranger_entry()),
                security_role: "Orders Integration".to_owned(),
                ..Default::default()
            })
            .await
            .map(tonic::Response::into_inner)
    })
}

fn get_entry(addr: SocketAddr) -> AppEntry {
    admin_call(addr, move |mut admin| async move {
        admin
            .get_app_entry(GetRequest {
                key: ENTRY.to_owned(),
            })
            .await
            .unwrap()
            .into_inner()
    })
}

fn update_entry(addr: SocketAddr, entry: AppEntry) -> Result<AppEntry, tonic::Status> {
    admin_call(addr, move |mut admin| async move {
        admin
            .update_app_entry(UpdateAppEntryRequest { entry: Some(entry) })
            .await
            .map(tonic::Response::into_inner)
    })
}

fn allowed(r: &DecideResponse) -> bool {
    r.allowed
}

fn denied_with(reason: DenyReason) -> impl Fn(&DecideResponse) -> bool {
    move |r| !r.allowed && r.reason == reason as i32
}

const LAG: &str = "s2s_authz_registry_change_lag_seconds";

/// How many changes made elsewhere `sidecar` has measured the publication lag of.
fn lag_count(sidecar: &Sidecar) -> f64 {
    sidecar.metric(&format!("{LAG}_count"), &[])
}

/// Waits until `sidecar` has measured `count` lags, and checks they add up to a plausible time: positive,
/// and no more than the test has been running.
fn wait_lag_count(sidecar: &Sidecar, count: f64, since: Instant) {
    let seen = poll(&format!("{LAG}_count to reach {count}"), || {
        Some(lag_count(sidecar)).filter(|n| *n >= count)
    });
    let sum = sidecar.metric(&format!("{LAG}_sum"), &[]);
    assert!(
        sum > 0.0 && sum <= since.elapsed().as_secs_f64() * seen,
        "lag sum {sum} s for {seen} change(s) within {:?}",
        since.elapsed()
    );
    eprintln!(
        "registry change lag: {seen} change(s), {:.1} ms on average",
        sum * 1000.0 / seen
    );
}

#[test]
fn a_change_through_either_sidecar_reaches_the_other_within_one_second() {
    let Some(db) = PgDatabase::create("fleet_postgres") else {
        return;
    };
    // A resync period far beyond the bound: only the change notices can make it in time.
    let (a, b) = fleet(&db, 3600);
    let token = a.token(&STRANGER);
    assert!(denied_with(DenyReason::ApplicationNotAllowed)(&decide(
        b.grpc_addr,
        &token
    )));

    // Created through A: B allows the new caller.
    let started = Instant::now();
    let created = create_entry(a.admin_addr).unwrap();
    let lag = decision_within(
        PROPAGATION,
        b.grpc_addr,
        &token,
        "an entry created on A allowed on B",
        allowed,
    );
    eprintln!("create on A -> allowed on B: {lag:?}");
    let on_b = decide(b.grpc_addr, &token);
    assert_eq!(on_b.application_user.unwrap().entry_name, ENTRY);
    // B measured how long A's change took to reach it; A published its own change as it committed,
    // so it measured nothing (its own notice is not a change made elsewhere).
    wait_lag_count(&b, 1.0, started);
    assert_eq!(lag_count(&a), 0.0, "A's own change is no lag");

    // Disabled through B: A denies it.
    let disabled = AppEntry {
        enabled: false,
        ..created.clone()
    };
    let updated = update_entry(b.admin_addr, disabled).unwrap();
    let lag = decision_within(
        PROPAGATION,
        a.grpc_addr,
        &token,
        "an entry disabled on B denied on A",
        denied_with(DenyReason::ApplicationDisabled),
    );
    eprintln!("disable on B -> denied on A: {lag:?}");
    wait_lag_count(&a, 1.0, started);

    // Both sidecars hand out the same etags, and a stale one is refused on either.
    assert_eq!(get_entry(a.admin_addr).etag, updated.etag);
    let stale = update_entry(a.admin_addr, created).unwrap_err();
    assert_eq!(stale.code(), tonic::Code::Aborted, "{stale:?}");

    // Deleted through A: B stops allowing it (and the audit sees APPLICATION_NOT_ALLOWED again).
    let enabled = update_entry(
        b.admin_addr,
        AppEntry {
            enabled: true,
            ..updated
        },
    )
    .unwrap();
    decision_within(PROPAGATION, a.grpc_addr, &token, "re-enabled", allowed);
    admin_call(a.admin_addr, move |mut admin| async move {
        admin
            .delete_app_entry(DeleteRequest {
                key: ENTRY.to_owned(),
                etag: enabled.etag,
            })
            .await
            .unwrap()
    });
    decision_within(
        PROPAGATION,
        b.grpc_addr,
        &token,
        "an entry deleted on A denied on B",
        denied_with(DenyReason::ApplicationNotAllowed),
    );
}

#[test]
fn a_change_made_straight_in_the_database_reaches_every_sidecar() {
    let Some(db) = PgDatabase::create("fleet_postgres") else {
        return;
    };
    let (a, b) = fleet(&db, 3600);
    let token = a.token(&STRANGER);
    let created = create_entry(a.admin_addr).unwrap();
    for sidecar in [&a, &b] {
        decision_within(PROPAGATION, sidecar.grpc_addr, &token, "created", allowed);
    }
    poll("B to measure A's change", || {
        (lag_count(&b) == 1.0).then_some(())
    });
    let before = [lag_count(&a), lag_count(&b)];
    let edited = Instant::now();

    // Another tool flips `enabled` with SQL: the trigger stamps a new version and notifies.
    let mut sql = db.client();
    let n = sql
        .execute(
            "UPDATE s2s_authz_resources SET body = jsonb_set(body, '{enabled}', 'false')
             WHERE kind = 'app_entry' AND key = $1",
            &[&ENTRY],
        )
        .unwrap();
    assert_eq!(n, 1);
    for sidecar in [&a, &b] {
        decision_within(
            PROPAGATION,
            sidecar.grpc_addr,
            &token,
            "disabled in SQL",
            denied_with(DenyReason::ApplicationDisabled),
        );
    }
    let after = get_entry(b.admin_addr);
    assert!(!after.enabled);
    assert_ne!(after.etag, created.etag, "a direct edit gets a new etag");
    // The tool's change is a change made elsewhere for both sidecars: each measured its lag.
    wait_lag_count(&a, before[0] + 1.0, edited);
    wait_lag_count(&b, before[1] + 1.0, edited);
}

#[test]
fn a_change_that_sent_no_notice_is_healed_by_the_resync() {
    let Some(db) = PgDatabase::create("fleet_postgres") else {
        return;
    };
    let (a, b) = fleet(&db, 1);
    let token = a.token(&STRANGER);
    create_entry(a.admin_addr).unwrap();
    decision_within(PROPAGATION, b.grpc_addr, &token, "created", allowed);
    // Let the notice of the create be handled (a resync may have published it first: then it counts
    // no lag), so that only the silent delete could move the counts below.
    b.wait_for_log(&["registry changed in the shared store: published"]);
    let before = [lag_count(&a), lag_count(&b)];

    // Triggers off for this session (as a replication or restore tool would run): no notice is sent.
    let mut sql = db.client();
    sql.batch_execute(&format!(
        "SET session_replication_role = replica;
         DELETE FROM s2s_authz_resources WHERE kind = 'app_entry' AND key = '{ENTRY}';
         DELETE FROM s2s_authz_resources WHERE kind = 'application_user'
             AND body->>'entry_name' = '{ENTRY}';"
    ))
    .unwrap();
    // Within a few resync periods (1 s each here), both sidecars deny it.
    for sidecar in [&a, &b] {
        decision_within(
            Duration::from_secs(10),
            sidecar.grpc_addr,
            &token,
            "a silent delete healed by the resync",
            denied_with(DenyReason::ApplicationNotAllowed),
        );
    }
    // A change without a notice carries no stamp: its lag is unknown, so none is reported.
    assert_eq!([lag_count(&a), lag_count(&b)], before);
}

#[test]
fn sidecars_racing_to_create_one_identity_get_exactly_one_success() {
    let Some(db) = PgDatabase::create("fleet_postgres") else {
        return;
    };
    let (a, b) = fleet(&db, 3600);
    let results: Vec<Result<AppEntry, tonic::Status>> = std::thread::scope(|s| {
        let handles: Vec<_> = [a.admin_addr, b.admin_addr, a.admin_addr, b.admin_addr]
            .into_iter()
            .map(|addr| s.spawn(move || create_entry(addr)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 1, "{results:?}");
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(r.code(), tonic::Code::AlreadyExists, "{r:?}");
    }
}

#[test]
fn the_schema_is_versioned_and_a_lost_connection_is_replaced() {
    let Some(db) = PgDatabase::create("fleet_postgres") else {
        return;
    };
    // Two sidecars migrating one new database at once: both start, and the schema is at version 2.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| Sidecar::start_with_config(&config(&db, None, 3600)));
        let b = s.spawn(|| Sidecar::start_with_config(&config(&db, None, 3600)));
        (a.join().unwrap(), b.join().unwrap())
    });
    let mut sql = db.client();
    let version: i32 = sql
        .query_one("SELECT version FROM s2s_authz_schema", &[])
        .unwrap()
        .get(0);
    assert_eq!(version, 2);

    // Every sidecar connection is cut (as by a database restart or failover); the next admin call
    // still succeeds, and the change feed comes back: B still sees A's changes.
    let cut: i64 = sql
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        cut >= 4,
        "each sidecar holds a store and a feed connection; cut {cut}"
    );
    // (Each trusts its own issuer here: A decides on a token from A's issuer, created through B.)
    let token = a.token(&STRANGER);
    create_entry(b.admin_addr).unwrap();
    decision_within(
        Duration::from_secs(10),
        a.grpc_addr,
        &token,
        "a change through B after the connections were cut, decided on A",
        allowed,
    );
}
