//! The soak: the real binary held at a fraction of its measured capacity for minutes, while its signing
//! keys rotate (pre-published, then signing, then removed) and its registry is edited through the admin
//! API, every answer checked against what its token must get at that moment, with the server's RSS
//! sampled throughout. `benches/soak.rs` runs it for as long as asked (10 minutes by default);
//! `tests/soak_smoke.rs` runs a few seconds of it in the suite.
//!
//! The oracle: every token belongs to a class whose right answer depends on the state of its signing key
//! (trusted, being removed, removed and refreshed) and of the one app entry the edits cycle through.
//! Both are read before and after each call; when neither changed the answer must be exactly the right
//! one, otherwise it may be the right one of either state (the change happened during the call). State
//! changes are published only once they must be visible: a registry edit when its admin call returned
//! (SPEC §2.4: the very next decision sees it), a key once the sidecar has been seen to use or refuse it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hdrhistogram::Histogram;
use s2s_authz::devissuer::{DevClient, DevIssuer, DevIssuerConfig, DevTenant, TokenVersion};
use s2s_authz::proto::envoy::config::core::v3::HeaderValueOption;
use s2s_authz::proto::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use s2s_authz::proto::envoy::service::auth::v3::check_response::HttpResponse;
use s2s_authz::proto::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse, attribute_context,
};
use s2s_authz::proto::s2sauthz::v1::registry_client::RegistryClient;
use s2s_authz::proto::s2sauthz::v1::{
    AppEntry, AppEntryKind, CreateAppEntryRequest, CreateSecurityRoleRequest, DeleteRequest,
    ListRequest, Operation, Privilege, SecurityRole, UpdateAppEntryRequest,
    UpdateApplicationUserRequest,
};
use serde_json::json;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tonic::transport::{Channel, Endpoint};

const TENANT: &str = "3f6b2a1e-8c4d-4e5f-9a7b-1c2d3e4f5a6b";
const FOREIGN_TENANT: &str = "e1e2e3e4-f5f6-4a7b-8c9d-0a1b2c3d4e5f";
const AUDIENCE: &str = "api://b7e3c1a2-4d5e-4f60-8a9b-0c1d2e3f4a5b";
const API_GUID: &str = "b7e3c1a2-4d5e-4f60-8a9b-0c1d2e3f4a5b";
const APP_ROLE: &str = "S2SAppRole";
const ORDERS_ROLE: &str = "Orders Integration";
const ORDERS: (&str, &str) = (
    "6a1f0c2b-3d4e-4f5a-8b6c-7d8e9f0a1b2c",
    "9c8b7a6f-5e4d-4c3b-8a29-1f0e9d8c7b6a",
);
const LEGACY: (&str, &str) = (
    "2e4d6c8a-0b1c-4d2e-9f3a-5b6c7d8e9f01",
    "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d",
);
const BILLING: (&str, &str) = (
    "8b9c0d1e-2f30-4a41-b5c6-d7e8f9a0b1c2",
    "7f6e5d4c-3b2a-4918-8776-655443322110",
);
/// The app the registry edits add, change, disable, enable and remove.
const STRANGER: (&str, &str) = (
    "4d5e6f70-8192-4a3b-9c4d-5e6f7a8b9c0d",
    "0f1e2d3c-4b5a-4968-8776-5a4b3c2d1e0f",
);
const STRANGER_ENTRY: &str = "soak-stranger";
const READER_ROLE: &str = "Soak Reader";
const WRITER_ROLE: &str = "Soak Writer";
/// Distinct tokens per class and key: mostly token-cache hits, as real callers reuse their tokens.
const TOKENS_PER_CLASS: usize = 8;
/// No call may take longer than this; one that does counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// A key change must be visible to the sidecar within this long, or the soak fails.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(60);

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// The steady phase (after the capacity measurement).
    pub duration: Duration,
    /// The share of the measured capacity the steady phase sends, open loop.
    pub load_fraction: f64,
    pub capacity_duration: Duration,
    /// Connections and calls in flight of the capacity measurement; the steady phase uses the connections.
    pub connections: usize,
    pub concurrency: usize,
    /// How often a key rotation starts (add, confirm, remove the oldest, confirm).
    pub rotate_every: Duration,
    /// How often the next registry edit is made.
    pub edit_every: Duration,
    pub rss_every: Duration,
    /// Allowed RSS drift after the warm-up (the first tenth of the steady phase); `None` reports it only.
    pub rss_tolerance: Option<f64>,
    /// The product's `keys.min_refresh_interval_secs`: how soon it may refetch keys for an unknown kid.
    pub min_key_refresh_secs: u64,
    /// The product's `RUST_LOG`.
    pub log_filter: String,
    pub server_bin: PathBuf,
}

impl Options {
    /// The documented soak: 10 minutes at half the measured capacity.
    pub fn full() -> Self {
        Options {
            duration: Duration::from_secs(600),
            load_fraction: 0.5,
            capacity_duration: Duration::from_secs(15),
            connections: 2,
            concurrency: 32,
            rotate_every: Duration::from_secs(60),
            edit_every: Duration::from_secs(10),
            rss_every: Duration::from_secs(5),
            rss_tolerance: Some(0.10),
            min_key_refresh_secs: 5,
            log_filter: "info".to_owned(),
            server_bin: PathBuf::from(env!("CARGO_BIN_EXE_s2s-authz")),
        }
    }

    /// A few seconds of the same, for the test suite: every building block once or more.
    pub fn smoke() -> Self {
        Options {
            duration: Duration::from_secs(10),
            capacity_duration: Duration::from_secs(2),
            concurrency: 8,
            rotate_every: Duration::from_secs(3),
            edit_every: Duration::from_millis(700),
            rss_every: Duration::from_secs(1),
            rss_tolerance: None,
            min_key_refresh_secs: 1,
            ..Options::full()
        }
    }
}

/// What a soak found.
#[derive(Debug, Default)]
pub struct Report {
    pub capacity_per_sec: f64,
    pub target_per_sec: f64,
    pub achieved_per_sec: f64,
    pub steady_elapsed: Duration,
    /// Calls of the steady phase (and of the capacity measurement), all checked.
    pub calls: u64,
    pub capacity_calls: u64,
    /// gRPC errors and timeouts.
    pub failed: u64,
    /// Answers that were not the right one for the token at that moment.
    pub wrong: u64,
    /// Of those, allows that should have been denies.
    pub wrong_allows: u64,
    /// The first few problems, described.
    pub problems: Vec<String>,
    /// Calls per state of the oracle's answer: allowed, and each deny reason.
    pub answers: HashMap<String, u64>,
    pub rotations: u64,
    pub edits: u64,
    pub latency_p50_us: f64,
    pub latency_p99_us: f64,
    pub latency_max_us: f64,
    /// (seconds into the steady phase, RSS KiB).
    pub rss: Vec<(f64, u64)>,
    pub rss_baseline_kib: u64,
    /// Every sample after the warm-up against the baseline: transients included.
    pub rss_min_ratio: f64,
    pub rss_max_ratio: f64,
    /// The sustained level (`SUSTAINED_RSS_WINDOW` rolling median) against the baseline: what "flat"
    /// is judged on, since a leak or a kept high-water mark is a level that stays, while the requests
    /// that wait out a key refresh during a rotation raise RSS for a sample or two.
    pub rss_sustained_min_ratio: f64,
    pub rss_sustained_max_ratio: f64,
    pub rss_flat: Option<bool>,
    pub log_lines: u64,
    pub log_errors: Vec<String>,
    pub exit_code: Option<i32>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.failed == 0
            && self.wrong == 0
            && self.problems.is_empty()
            && self.log_errors.is_empty()
            && self.exit_code == Some(0)
            && self.rss_flat != Some(false)
            && self.calls > 0
    }

    pub fn print(&self) {
        let ratio = |r: f64| format!("{:+.1} %", (r - 1.0) * 100.0);
        println!("\n== Soak report");
        println!("| figure | value |");
        println!("|---|---|");
        println!(
            "| capacity (closed loop, same token mix) | {:.0} calls/s ({} calls) |",
            self.capacity_per_sec, self.capacity_calls
        );
        println!(
            "| steady load | {:.0} calls/s asked, {:.0} calls/s sent, for {:.0} s |",
            self.target_per_sec,
            self.achieved_per_sec,
            self.steady_elapsed.as_secs_f64()
        );
        println!("| calls checked | {} |", self.calls);
        println!(
            "| failed calls (gRPC error or > {CALL_TIMEOUT:?}) | {} |",
            self.failed
        );
        println!(
            "| wrong answers | {} (of which allows that should be denies: {}) |",
            self.wrong, self.wrong_allows
        );
        println!(
            "| key rotations (pre-publish, confirm, remove oldest, confirm) | {} |",
            self.rotations
        );
        println!("| registry edits through the admin API | {} |", self.edits);
        println!(
            "| latency p50 / p99 / max | {:.0} / {:.0} / {:.0} µs |",
            self.latency_p50_us, self.latency_p99_us, self.latency_max_us
        );
        println!(
            "| RSS after warm-up | {:.1} MiB; sustained level ({:.0} s rolling median) {} to {} of it, \
             single samples {} to {} ({}) |",
            self.rss_baseline_kib as f64 / 1024.0,
            SUSTAINED_RSS_WINDOW.as_secs_f64(),
            ratio(self.rss_sustained_min_ratio),
            ratio(self.rss_sustained_max_ratio),
            ratio(self.rss_min_ratio),
            ratio(self.rss_max_ratio),
            match self.rss_flat {
                Some(true) => "flat within the tolerance",
                Some(false) => "NOT flat",
                None => "reported only",
            }
        );
        println!(
            "| server log | {} lines, {} at ERROR or panics |",
            self.log_lines,
            self.log_errors.len()
        );
        println!("| exit after SIGTERM | {:?} |", self.exit_code);
        let mut answers: Vec<_> = self.answers.iter().collect();
        answers.sort();
        println!("answers: {answers:?}");
        let series: Vec<String> = self
            .rss
            .iter()
            .map(|(t, kib)| format!("{t:.0}s {:.1}", *kib as f64 / 1024.0))
            .collect();
        println!("RSS MiB over time: {}", series.join(", "));
        for p in self.problems.iter().chain(&self.log_errors).take(20) {
            println!("problem: {p}");
        }
        println!(
            "verdict: {}",
            if self.passed() { "PASSED" } else { "FAILED" }
        );
    }
}

// ---------------------------------------------------------------------------------------------------
// The oracle.

/// Where a signing key is in its life.
const TRUSTED: u8 = 0;
/// Unpublished, perhaps still cached by the sidecar: its tokens may be allowed or KEY_NOT_FOUND.
const REMOVING: u8 = 1;
/// Unpublished, and the sidecar has been seen to refuse it: KEY_NOT_FOUND, never allowed.
const REVOKED: u8 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    /// orders-service, v2: allowed.
    Orders,
    /// legacy-reports, v1: allowed.
    Legacy,
    /// billing-service, no app role: ROLE_MISSING.
    Billing,
    /// The app the registry edits move around.
    Stranger,
    /// A tenant nobody trusts: ISSUER_NOT_TRUSTED.
    Foreign,
    /// Expired long ago: TOKEN_EXPIRED.
    Expired,
    /// orders-service, signed with a key being removed or removed.
    Retired,
}

/// The mix of the load, one class per call in turn.
const MIX: [Class; 10] = [
    Class::Orders,
    Class::Orders,
    Class::Orders,
    Class::Legacy,
    Class::Stranger,
    Class::Billing,
    Class::Orders,
    Class::Retired,
    Class::Foreign,
    Class::Expired,
];
const CLASSES: [Class; 6] = [
    Class::Orders,
    Class::Legacy,
    Class::Billing,
    Class::Stranger,
    Class::Foreign,
    Class::Expired,
];

/// The stranger's app entry, as the edits leave it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Entry {
    Absent,
    Enabled(&'static str),
    Disabled,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Answer {
    Allow(String),
    Deny(String),
}

impl Answer {
    fn of(response: &CheckResponse) -> Answer {
        let header = |headers: &[HeaderValueOption], name: &str| {
            headers
                .iter()
                .filter_map(|h| h.header.as_ref())
                .find(|h| h.key.eq_ignore_ascii_case(name))
                .map(|h| h.value.clone())
                .unwrap_or_default()
        };
        let code = response.status.as_ref().map_or(-1, |s| s.code);
        match &response.http_response {
            Some(HttpResponse::OkResponse(ok)) if code == 0 => {
                Answer::Allow(header(&ok.headers, "x-s2s-security-role"))
            }
            Some(HttpResponse::DeniedResponse(denied)) if code != 0 => {
                Answer::Deny(header(&denied.headers, "x-s2s-deny-reason"))
            }
            _ => Answer::Deny(format!("malformed CheckResponse (status {code})")),
        }
    }

    fn label(&self) -> String {
        match self {
            Answer::Allow(role) => format!("allow as {role}"),
            Answer::Deny(reason) => reason.clone(),
        }
    }
}

fn deny(reason: &str) -> Answer {
    Answer::Deny(reason.to_owned())
}

/// The right answers for a token of `class` signed by a key in `key_state`, with the entry `entry`.
fn right_answers(class: Class, key_state: u8, entry: &Entry, into: &mut Vec<Answer>) {
    if class == Class::Foreign {
        // The issuer is checked before the key.
        if into.is_empty() {
            into.push(deny("ISSUER_NOT_TRUSTED"));
        }
        return;
    }
    let own = match class {
        Class::Orders | Class::Legacy | Class::Retired => Answer::Allow(ORDERS_ROLE.to_owned()),
        Class::Billing => deny("ROLE_MISSING"),
        Class::Expired => deny("TOKEN_EXPIRED"),
        Class::Stranger => match entry {
            Entry::Absent => deny("APPLICATION_NOT_ALLOWED"),
            Entry::Enabled(role) => Answer::Allow((*role).to_owned()),
            Entry::Disabled => deny("APPLICATION_DISABLED"),
        },
        Class::Foreign => deny("ISSUER_NOT_TRUSTED"),
    };
    let mut add = |answer: Answer| {
        if !into.contains(&answer) {
            into.push(answer);
        }
    };
    if key_state != REVOKED {
        add(own);
    }
    if key_state != TRUSTED {
        add(deny("KEY_NOT_FOUND"));
    }
}

/// The entry's state: (before, after) an edit in progress, equal when none is.
type EntryState = (Entry, Entry);

/// A signing key of the issuer and tokens of every class signed with it.
struct SoakKey {
    kid: String,
    state: AtomicU8,
    requests: HashMap<&'static str, Vec<CheckRequest>>,
}

fn class_name(class: Class) -> &'static str {
    match class {
        Class::Orders | Class::Retired => "orders",
        Class::Legacy => "legacy",
        Class::Billing => "billing",
        Class::Stranger => "stranger",
        Class::Foreign => "foreign",
        Class::Expired => "expired",
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .try_into()
        .unwrap()
}

/// App-only claims as Entra writes them; `lifetime` may be negative (an expired token).
fn claims(dev: &DevIssuer, class: Class, lifetime: i64) -> serde_json::Value {
    let now = unix_now();
    let (tenant, (app, oid), roles, v1) = match class {
        Class::Orders | Class::Retired | Class::Expired => (TENANT, ORDERS, vec![APP_ROLE], false),
        Class::Legacy => (TENANT, LEGACY, vec![APP_ROLE], true),
        Class::Billing => (TENANT, BILLING, vec![], false),
        Class::Stranger => (TENANT, STRANGER, vec![APP_ROLE], false),
        Class::Foreign => (FOREIGN_TENANT, ORDERS, vec![APP_ROLE], false),
    };
    let (exp, iat) = if class == Class::Expired {
        (now - 3600, now - 7200)
    } else {
        (now + lifetime, now)
    };
    if v1 {
        json!({
            "aud": AUDIENCE, "iss": dev.v1_issuer(tenant), "iat": iat, "nbf": iat, "exp": exp,
            "appid": app, "appidacr": "1", "idtyp": "app", "oid": oid, "sub": oid, "tid": tenant,
            "roles": roles, "ver": "1.0", "uti": uuid::Uuid::new_v4().simple().to_string(),
        })
    } else {
        json!({
            "aud": API_GUID, "iss": dev.v2_issuer(tenant), "iat": iat, "nbf": iat, "exp": exp,
            "azp": app, "azpacr": "1", "idtyp": "app", "oid": oid, "sub": oid, "tid": tenant,
            "roles": roles, "ver": "2.0", "uti": uuid::Uuid::new_v4().simple().to_string(),
        })
    }
}

fn sign(dev: &DevIssuer, kid: &str, claims: &serde_json::Value) -> String {
    let header = json!({"alg": "RS256", "typ": "JWT", "kid": kid, "x5t": kid}).to_string();
    dev.sign_raw_with_key(kid, &header, &claims.to_string())
        .unwrap()
}

fn check_request(token: &str) -> CheckRequest {
    let headers: HashMap<String, String> = [
        (":method", "GET"),
        (":path", "/orders/42"),
        (":authority", "orders.internal"),
        ("authorization", &format!("Bearer {token}")),
        ("x-request-id", "soak"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    method: "GET".to_owned(),
                    path: "/orders/42".to_owned(),
                    host: "orders.internal".to_owned(),
                    scheme: "https".to_owned(),
                    protocol: "HTTP/1.1".to_owned(),
                    headers,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

impl SoakKey {
    fn new(dev: &DevIssuer, kid: String, lifetime: i64) -> Arc<SoakKey> {
        let requests = CLASSES
            .iter()
            .map(|&class| {
                let pool = (0..TOKENS_PER_CLASS)
                    .map(|_| check_request(&sign(dev, &kid, &claims(dev, class, lifetime))))
                    .collect();
                (class_name(class), pool)
            })
            .collect();
        Arc::new(SoakKey {
            kid,
            state: AtomicU8::new(TRUSTED),
            requests,
        })
    }

    fn state(&self) -> u8 {
        self.state.load(Ordering::SeqCst)
    }

    fn request(&self, class: Class, i: usize) -> CheckRequest {
        let pool = &self.requests[class_name(class)];
        pool[i % pool.len()].clone()
    }
}

/// Everything the load, the controllers and the checks share.
struct World {
    dev: DevIssuer,
    lifetime: i64,
    keys: RwLock<Vec<Arc<SoakKey>>>,
    entry: Mutex<EntryState>,
    stats: Mutex<Tally>,
}

#[derive(Default)]
struct Tally {
    calls: u64,
    failed: u64,
    wrong: u64,
    wrong_allows: u64,
    problems: Vec<String>,
    answers: HashMap<String, u64>,
    latency: Option<Histogram<u64>>,
}

impl Tally {
    fn problem(&mut self, text: String) {
        if self.problems.len() < 20 {
            self.problems.push(text);
        }
    }
}

/// One call of the load: what was sent and the state it was sent in.
struct Pick {
    class: Class,
    key: Arc<SoakKey>,
    request: CheckRequest,
}

impl World {
    /// The `i`-th call of the mix: trusted keys in turn, the most recently retired key for `Retired`.
    fn pick(&self, i: u64) -> Pick {
        let keys = self.keys.read().unwrap();
        let mut class = MIX[(i % MIX.len() as u64) as usize];
        let turn = (i / MIX.len() as u64) as usize;
        let retired = keys.iter().rev().find(|k| k.state() != TRUSTED);
        let key = match (class, retired) {
            (Class::Retired, Some(k)) => k.clone(),
            _ => {
                if class == Class::Retired {
                    class = Class::Orders;
                }
                let trusted: Vec<&Arc<SoakKey>> =
                    keys.iter().filter(|k| k.state() == TRUSTED).collect();
                trusted[turn % trusted.len()].clone()
            }
        };
        let request = key.request(class, turn);
        Pick {
            class,
            key,
            request,
        }
    }

    fn entry(&self) -> EntryState {
        self.entry.lock().unwrap().clone()
    }

    /// Sends `pick` and checks the answer against the states before and after the call.
    async fn call(&self, client: &mut AuthorizationClient<Channel>, pick: Pick) {
        let key_before = pick.key.state();
        let entry_before = self.entry();
        let sent = Instant::now();
        let result = tokio::time::timeout(CALL_TIMEOUT, client.check(pick.request)).await;
        let elapsed = sent.elapsed();
        let key_after = pick.key.state();
        let entry_after = self.entry();
        let mut tally = self.stats.lock().unwrap();
        tally.calls += 1;
        if let Some(h) = tally.latency.as_mut() {
            h.saturating_record(elapsed.as_micros().max(1) as u64);
        }
        let response = match result {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => {
                tally.failed += 1;
                tally.problem(format!("{:?}: gRPC {status:?}", pick.class));
                return;
            }
            Err(_) => {
                tally.failed += 1;
                tally.problem(format!(
                    "{:?}: no answer within {CALL_TIMEOUT:?}",
                    pick.class
                ));
                return;
            }
        };
        let answer = Answer::of(&response);
        let mut right = Vec::new();
        for key_state in [key_before, key_after] {
            for entry in [
                &entry_before.0,
                &entry_before.1,
                &entry_after.0,
                &entry_after.1,
            ] {
                right_answers(pick.class, key_state, entry, &mut right);
            }
        }
        *tally.answers.entry(answer.label()).or_default() += 1;
        if !right.contains(&answer) {
            tally.wrong += 1;
            if matches!(answer, Answer::Allow(_)) {
                tally.wrong_allows += 1;
            }
            tally.problem(format!(
                "{:?} token of key {} (state {key_before}->{key_after}, entry {entry_before:?}->{entry_after:?}): \
                 got {answer:?}, right: {right:?}",
                pick.class, pick.key.kid
            ));
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// The product.

struct Product {
    child: Child,
    /// The server process (the child of `timeout`).
    pid: u32,
    grpc: SocketAddr,
    admin: SocketAddr,
    log: Arc<Mutex<(u64, Vec<String>)>>,
    _dir: tempfile::TempDir,
}

impl Drop for Product {
    fn drop(&mut self) {
        // SIGTERM to `timeout`, which passes it on to the server; SIGKILL would leave the server behind.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn child_of(pid: u32) -> Option<u32> {
    let listed = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    listed.split_whitespace().next()?.parse().ok()
}

/// How long RSS must stay at a level to count as the sustained level.
pub const SUSTAINED_RSS_WINDOW: Duration = Duration::from_secs(30);

/// The median of every `window` consecutive values (one per full window; all of `values` when shorter).
pub fn rolling_median(values: &[u64], window: usize) -> Vec<u64> {
    let window = window.clamp(1, values.len().max(1));
    values
        .windows(window)
        .map(|w| {
            let mut sorted = w.to_vec();
            sorted.sort_unstable();
            sorted[sorted.len() / 2]
        })
        .collect()
}

pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn start_product(options: &Options, dev: &DevIssuer, lifetime: Duration) -> Product {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("s2s-authz.yaml");
    std::fs::write(
        &config,
        format!(
            r#"data_dir: "{data}"
auth:
  instance: "{instance}"
  tenants: ["{TENANT}"]
  audiences: ["{AUDIENCE}"]
keys: {{ min_refresh_interval_secs: {min_refresh} }}
security_roles:
  - name: {ORDERS_ROLE}
    privileges: [{{ resource: orders, operations: [read] }}]
app_entries:
  - {{ name: orders-service, tenant_id: "{TENANT}", client_app_id: "{orders}", required_role: {APP_ROLE},
      application_user: {{ security_role: {ORDERS_ROLE} }} }}
  - {{ name: legacy-reports, tenant_id: "{TENANT}", client_app_id: "{legacy}", required_role: {APP_ROLE},
      application_user: {{ security_role: {ORDERS_ROLE} }} }}
  - {{ name: billing-service, tenant_id: "{TENANT}", client_app_id: "{billing}", required_role: {APP_ROLE},
      application_user: {{ security_role: {ORDERS_ROLE} }} }}
"#,
            data = dir.path().join("data").display(),
            instance = dev.instance(),
            min_refresh = options.min_key_refresh_secs,
            orders = ORDERS.0,
            legacy = LEGACY.0,
            billing = BILLING.0,
        ),
    )
    .unwrap();
    let (grpc, admin, metrics) = (free_addr(), free_addr(), free_addr());
    // Under `timeout`, so that the server stops by itself even if this process is killed.
    let mut child = Command::new("timeout")
        .args(["--kill-after=5", &format!("{}s", lifetime.as_secs())])
        .arg(&options.server_bin)
        .args(["serve", "--log-format", "json", "--config"])
        .arg(&config)
        .args(["--grpc-addr", &grpc.to_string()])
        .args(["--admin-addr", &admin.to_string()])
        .args(["--metrics-addr", &metrics.to_string()])
        .env("RUST_LOG", &options.log_filter)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", options.server_bin.display()));
    // The log is read as it comes (an audit line per decision would fill a disk over a long soak):
    // lines are counted, and errors and panics kept.
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new((0u64, Vec::new())));
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let mut log = sink.lock().unwrap();
            log.0 += 1;
            if (line.contains("\"level\":\"ERROR\"") || line.contains("panicked"))
                && log.1.len() < 20
            {
                log.1.push(line);
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let pid = loop {
        if let Some(pid) = child_of(child.id()) {
            break pid;
        }
        assert!(Instant::now() < deadline, "s2s-authz did not start");
        std::thread::sleep(Duration::from_millis(10));
    };
    Product {
        child,
        pid,
        grpc,
        admin,
        log,
        _dir: dir,
    }
}

async fn connect(addr: SocketAddr) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .tcp_nodelay(true)
            .connect()
            .await
        {
            Ok(c) => return c,
            Err(e) => assert!(Instant::now() < deadline, "connecting to {addr}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `request` until `done` accepts its answer, failing the soak after `CONFIRM_TIMEOUT`.
async fn until(
    client: &mut AuthorizationClient<Channel>,
    what: &str,
    mut next: impl FnMut() -> CheckRequest,
    done: impl Fn(&Answer) -> bool,
    problems: &Mutex<Tally>,
) -> bool {
    let deadline = Instant::now() + CONFIRM_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(r) = client.check(next()).await
            && done(&Answer::of(r.get_ref()))
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    problems
        .lock()
        .unwrap()
        .problem(format!("{what}: not seen within {CONFIRM_TIMEOUT:?}"));
    false
}

/// One rotation as Entra does it: publish the next key, and once the sidecar verifies with it, sign
/// with it and unpublish the oldest; that key is revoked once the sidecar has been seen to refuse it.
async fn rotate(world: &World, client: &mut AuthorizationClient<Channel>) -> bool {
    let dev = &world.dev;
    let kid = dev.add_key();
    let key = SoakKey::new(dev, kid, world.lifetime);
    // The new kid is unknown to the sidecar, so these probes make it refresh (once the minimum
    // interval has passed since the last refresh); v2 and v1 tokens have a key set each.
    for class in [Class::Orders, Class::Legacy] {
        let what = format!("the sidecar verifying with new key {}", key.kid);
        let ok = until(
            client,
            &what,
            || key.request(class, 0),
            |a| matches!(a, Answer::Allow(_)),
            &world.stats,
        )
        .await;
        if !ok {
            return false;
        }
    }
    let oldest = {
        let mut keys = world.keys.write().unwrap();
        keys.push(key.clone());
        keys.iter().find(|k| k.state() == TRUSTED).cloned().unwrap()
    };
    oldest.state.store(REMOVING, Ordering::SeqCst);
    dev.remove_key(&oldest.kid);
    for class in [Class::Orders, Class::Legacy] {
        let what = format!("the sidecar refusing removed key {}", oldest.kid);
        let probe = Mutex::new(0u64);
        let ok = until(
            client,
            &what,
            // Alternately the removed key's token and one naming an unknown kid, which makes the
            // sidecar refresh that key set.
            || {
                let mut n = probe.lock().unwrap();
                *n += 1;
                if *n % 2 == 1 {
                    oldest.request(class, 0)
                } else {
                    let header = json!({"alg": "RS256", "kid": uuid::Uuid::new_v4().to_string()});
                    let token = dev
                        .sign_raw(&header.to_string(), &claims(dev, class, 3600).to_string())
                        .unwrap();
                    check_request(&token)
                }
            },
            |a| *a == deny("KEY_NOT_FOUND") && *probe.lock().unwrap() % 2 == 1,
            &world.stats,
        )
        .await;
        if !ok {
            return false;
        }
    }
    oldest.state.store(REVOKED, Ordering::SeqCst);
    // Keep the two most recently retired keys in the mix; older ones add nothing.
    let mut keys = world.keys.write().unwrap();
    while keys.iter().filter(|k| k.state() != TRUSTED).count() > 2 {
        let first = keys.iter().position(|k| k.state() != TRUSTED).unwrap();
        keys.remove(first);
    }
    true
}

/// The registry edits, in a cycle: the stranger's entry created (application user with the reader
/// role), its user moved to the writer role, the entry disabled, enabled, deleted.
struct Editor {
    admin: RegistryClient<Channel>,
    step: usize,
    entry_etag: String,
}

impl Editor {
    async fn new(admin_addr: SocketAddr) -> Editor {
        let mut admin = RegistryClient::new(connect(admin_addr).await);
        for name in [READER_ROLE, WRITER_ROLE] {
            admin
                .create_security_role(CreateSecurityRoleRequest {
                    security_role: Some(SecurityRole {
                        name: name.to_owned(),
                        privileges: vec![Privilege {
                            resource: "orders".to_owned(),
                            operations: vec![Operation::Read as i32],
                        }],
                        ..Default::default()
                    }),
                })
                .await
                .unwrap();
        }
        Editor {
            admin,
            step: 0,
            entry_etag: String::new(),
        }
    }

    fn entry(enabled: bool, etag: &str) -> AppEntry {
        AppEntry {
            name: STRANGER_ENTRY.to_owned(),
            client_app_id: STRANGER.0.to_owned(),
            tenant_id: TENANT.to_owned(),
            kind: AppEntryKind::ClientCredentials as i32,
            required_role: APP_ROLE.to_owned(),
            enabled,
            etag: etag.to_owned(),
            ..Default::default()
        }
    }

    /// Makes the next edit; the entry's state is (old, new) while the call runs, new once it returned.
    async fn next(&mut self, world: &World) -> Result<(), tonic::Status> {
        let (_, current) = world.entry();
        let target = match self.step % 5 {
            0 => Entry::Enabled(READER_ROLE),
            1 => Entry::Enabled(WRITER_ROLE),
            2 => Entry::Disabled,
            3 => Entry::Enabled(WRITER_ROLE),
            _ => Entry::Absent,
        };
        *world.entry.lock().unwrap() = (current, target.clone());
        let result = self.apply().await;
        let mut entry = world.entry.lock().unwrap();
        // A failed edit may or may not have been applied: the entry stays in both states, and the soak
        // reports the failure and stops editing.
        if result.is_ok() {
            *entry = (target.clone(), target);
        }
        self.step += 1;
        result
    }

    async fn apply(&mut self) -> Result<(), tonic::Status> {
        let admin = &mut self.admin;
        match self.step % 5 {
            0 => {
                let created = admin
                    .create_app_entry(CreateAppEntryRequest {
                        entry: Some(Self::entry(true, "")),
                        application_user_name: String::new(),
                        security_role: READER_ROLE.to_owned(),
                    })
                    .await?
                    .into_inner();
                self.entry_etag = created.etag;
            }
            1 => {
                let users = admin
                    .list_application_users(ListRequest {
                        page_size: 1000,
                        page_token: String::new(),
                    })
                    .await?
                    .into_inner();
                let mut user = users
                    .application_users
                    .into_iter()
                    .find(|u| u.app_entry == STRANGER_ENTRY)
                    .ok_or_else(|| tonic::Status::not_found("the stranger's application user"))?;
                user.security_role = WRITER_ROLE.to_owned();
                admin
                    .update_application_user(UpdateApplicationUserRequest {
                        application_user: Some(user),
                    })
                    .await?;
            }
            step @ (2 | 3) => {
                let updated = admin
                    .update_app_entry(UpdateAppEntryRequest {
                        entry: Some(Self::entry(step == 3, &self.entry_etag)),
                    })
                    .await?
                    .into_inner();
                self.entry_etag = updated.etag;
            }
            _ => {
                admin
                    .delete_app_entry(DeleteRequest {
                        key: STRANGER_ENTRY.to_owned(),
                        etag: self.entry_etag.clone(),
                    })
                    .await?;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------
// The run.

/// Closed loop at `concurrency` over `clients` until `until`: the capacity for this mix.
async fn closed_loop(
    world: &Arc<World>,
    clients: &[Channel],
    concurrency: usize,
    until: Instant,
) -> u64 {
    let counter = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..concurrency.max(1) {
        let mut client = AuthorizationClient::new(clients[w % clients.len()].clone());
        let (world, counter) = (world.clone(), counter.clone());
        tasks.spawn(async move {
            while Instant::now() < until {
                let i = counter.fetch_add(1, Ordering::Relaxed);
                let pick = world.pick(i);
                world.call(&mut client, pick).await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    counter.load(Ordering::Relaxed)
}

pub async fn run(options: Options) -> Report {
    let dev = DevIssuer::start(DevIssuerConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        tenants: vec![DevTenant {
            tenant_id: TENANT.to_owned(),
            clients: vec![DevClient {
                client_id: ORDERS.0.to_owned(),
                client_secret: "soak".to_owned(),
                object_id: ORDERS.1.to_owned(),
                roles: vec![APP_ROLE.to_owned()],
                token_version: TokenVersion::V2,
            }],
        }],
        token_lifetime: Duration::from_secs(3600),
    })
    .await
    .unwrap();
    let total = options.capacity_duration + options.duration;
    let lifetime = i64::try_from(total.as_secs()).unwrap() + 3600;
    let product = start_product(&options, &dev, total + Duration::from_secs(300));
    let first = SoakKey::new(&dev, dev.current_kid(), lifetime);
    let world = Arc::new(World {
        dev,
        lifetime,
        keys: RwLock::new(vec![first]),
        entry: Mutex::new((Entry::Absent, Entry::Absent)),
        stats: Mutex::new(Tally::default()),
    });

    // Ready: a valid token allowed.
    let mut control = AuthorizationClient::new(connect(product.grpc).await);
    let ready = until(
        &mut control,
        "the sidecar allowing a valid token (keys loaded)",
        || world.pick(0).request,
        |a| matches!(a, Answer::Allow(_)),
        &world.stats,
    )
    .await;
    assert!(ready, "the sidecar never became ready");
    let mut editor = Editor::new(product.admin).await;
    let mut clients = Vec::new();
    for _ in 0..options.connections.max(1) {
        clients.push(connect(product.grpc).await);
    }

    // Capacity with this very mix, closed loop at saturation.
    let started = Instant::now();
    let capacity_calls = closed_loop(
        &world,
        &clients,
        options.concurrency,
        started + options.capacity_duration,
    )
    .await;
    let capacity = capacity_calls as f64 / started.elapsed().as_secs_f64();
    let target = (capacity * options.load_fraction).max(1.0);
    println!(
        "capacity {capacity:.0} calls/s over {:.0} s; steady load {target:.0} calls/s for {:.0} s",
        options.capacity_duration.as_secs_f64(),
        options.duration.as_secs_f64()
    );
    {
        let mut tally = world.stats.lock().unwrap();
        tally.calls = 0;
        tally.answers.clear();
        tally.latency = Some(Histogram::new_with_bounds(1, 60_000_000, 3).unwrap());
    }

    // The steady phase: open loop at `target`, with rotations, edits and RSS sampling alongside.
    let started = Instant::now();
    let deadline = started + options.duration;
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (stop, pid, every) = (stop.clone(), product.pid, options.rss_every);
        std::thread::spawn(move || {
            let mut series = Vec::new();
            while !stop.load(Ordering::Acquire) {
                series.push((started.elapsed().as_secs_f64(), rss_kib(pid)));
                let next = every.mul_f64(series.len() as f64);
                while !stop.load(Ordering::Acquire) && started.elapsed() < next {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            series
        })
    };
    let in_flight = Arc::new(AtomicU64::new(0));
    let pacer = {
        let (world, clients, in_flight) = (world.clone(), clients.clone(), in_flight.clone());
        let handle = tokio::runtime::Handle::current();
        // An OS thread: tokio's timer is too coarse for thousands of calls a second.
        std::thread::spawn(move || {
            let mut sent = 0u64;
            while Instant::now() < deadline {
                let due = (started.elapsed().as_secs_f64() * target) as u64;
                while sent < due {
                    // A stalled server must not make the load pile up without bound.
                    if in_flight.load(Ordering::Acquire) > 20_000 {
                        world.stats.lock().unwrap().problem(
                            "more than 20,000 calls in flight: the server stalled".to_owned(),
                        );
                        return sent;
                    }
                    let mut client =
                        AuthorizationClient::new(clients[(sent as usize) % clients.len()].clone());
                    let (world, in_flight) = (world.clone(), in_flight.clone());
                    let i = sent;
                    in_flight.fetch_add(1, Ordering::AcqRel);
                    handle.spawn(async move {
                        let pick = world.pick(i);
                        world.call(&mut client, pick).await;
                        in_flight.fetch_sub(1, Ordering::AcqRel);
                    });
                    sent += 1;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            sent
        })
    };
    let rotations = {
        let (world, every) = (world.clone(), options.rotate_every);
        tokio::spawn(async move {
            let mut done = 0u64;
            while Instant::now() + every < deadline {
                tokio::time::sleep(every).await;
                if !rotate(&world, &mut control).await {
                    break;
                }
                done += 1;
            }
            done
        })
    };
    let edits = {
        let (world, every) = (world.clone(), options.edit_every);
        tokio::spawn(async move {
            let mut done = 0u64;
            while Instant::now() + every < deadline {
                tokio::time::sleep(every).await;
                if let Err(status) = editor.next(&world).await {
                    world
                        .stats
                        .lock()
                        .unwrap()
                        .problem(format!("registry edit {}: {status:?}", editor.step - 1));
                    break;
                }
                done += 1;
            }
            done
        })
    };
    let sent = tokio::task::spawn_blocking(move || pacer.join().unwrap())
        .await
        .unwrap();
    let steady_elapsed = started.elapsed();
    let rotations = rotations.await.unwrap();
    let edits = edits.await.unwrap();
    let drain = Instant::now() + CALL_TIMEOUT + Duration::from_secs(5);
    while in_flight.load(Ordering::Acquire) > 0 && Instant::now() < drain {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Release);
    let rss = sampler.join().unwrap();

    // Stop the product as an orchestrator would, and read what it logged.
    let _ = Command::new("kill")
        .args(["-TERM", &product.pid.to_string()])
        .status();
    let mut product = product;
    let exit_deadline = Instant::now() + Duration::from_secs(30);
    let exit_code = loop {
        if let Ok(Some(status)) = product.child.try_wait() {
            break status.code();
        }
        if Instant::now() > exit_deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The reader sees the end of the log once the process has gone.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (log_lines, log_errors) = product.log.lock().unwrap().clone();

    let mut report = {
        let mut tally = world.stats.lock().unwrap();
        let latency = tally.latency.take().unwrap();
        Report {
            capacity_per_sec: capacity,
            target_per_sec: target,
            achieved_per_sec: sent as f64 / steady_elapsed.as_secs_f64(),
            steady_elapsed,
            calls: tally.calls,
            capacity_calls,
            failed: tally.failed,
            wrong: tally.wrong,
            wrong_allows: tally.wrong_allows,
            problems: std::mem::take(&mut tally.problems),
            answers: std::mem::take(&mut tally.answers),
            rotations,
            edits,
            latency_p50_us: latency.value_at_quantile(0.5) as f64,
            latency_p99_us: latency.value_at_quantile(0.99) as f64,
            latency_max_us: latency.max() as f64,
            log_lines,
            log_errors,
            exit_code,
            ..Report::default()
        }
    };
    if in_flight.load(Ordering::Acquire) > 0 {
        report.problems.push(format!(
            "{} calls still in flight after the drain",
            in_flight.load(Ordering::Acquire)
        ));
    }
    // RSS: the first sample after the warm-up (the first tenth of the steady phase) is the baseline.
    let warm_up = options.duration.as_secs_f64() / 10.0;
    let after: Vec<u64> = rss
        .iter()
        .filter(|(t, _)| *t >= warm_up)
        .map(|(_, kib)| *kib)
        .collect();
    if let Some(&baseline) = after.first() {
        let ratio = |kib: u64| kib as f64 / baseline.max(1) as f64;
        let extremes = |values: &[u64]| {
            values
                .iter()
                .copied()
                .map(ratio)
                .fold((f64::INFINITY, 0.0_f64), |(min, max), r| {
                    (min.min(r), max.max(r))
                })
        };
        report.rss_baseline_kib = baseline;
        (report.rss_min_ratio, report.rss_max_ratio) = extremes(&after);
        let window = (SUSTAINED_RSS_WINDOW.as_secs_f64() / options.rss_every.as_secs_f64())
            .round()
            .max(1.0) as usize;
        (
            report.rss_sustained_min_ratio,
            report.rss_sustained_max_ratio,
        ) = extremes(&rolling_median(&after, window));
        report.rss_flat = options.rss_tolerance.map(|tolerance| {
            report.rss_sustained_max_ratio <= 1.0 + tolerance
                && report.rss_sustained_min_ratio >= 1.0 - tolerance
        });
    }
    report.rss = rss;
    report
}
