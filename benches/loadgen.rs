//! Load generator: drives `envoy.service.auth.v3.Authorization/Check` over loopback against the real
//! `s2s-authz` binary and, in the same invocation, against a no-op ext_authz server (this program
//! re-executed with `--noop-server`, answering OK at once) as the baseline; prints ratios.
//!
//! Run `cargo bench --bench loadgen -- --help`. Both servers run as child processes so that their CPU
//! time can be read from `/proc/<pid>/task/*/schedstat` before and after each scenario; the load generator runs its
//! own development issuer in-process, which the product trusts, and pre-signs every token before the
//! run. Open-loop latency is measured from each call's intended send time (no coordinated omission).
//! Every child stops by itself: the product runs under `timeout`, the no-op server has its own deadline
//! and also exits when its standard input closes.
//!
//! The `kidflood` scenario measures what a burst of tokens naming unknown `kid`s costs valid traffic:
//! the same valid load alone, during the burst, and during a burst of as many valid calls (the
//! control: what any extra load of that size costs), each product in the same run.
//!
//! The `envoy` scenario measures where users feel it: HTTP requests through a real Envoy whose
//! ext_authz filter asks each server, against the same Envoy route with the filter disabled, the two
//! routes interleaved in the same run. `--also-bin` measures other builds (say, the previous commit's)
//! in the same run; `--wrap` and `--before-measure`/`--after-measure` run the servers under a profiler
//! (see `benches/README.md`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use clap::Parser;
use hdrhistogram::Histogram;
mod common;

use common::{APP, AUDIENCE, AUDIENCE_GUID, TENANT, app, mint};
use s2s_authz::devissuer::{DevIssuer, DevIssuerConfig, DevTenant};
use s2s_authz::proto::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use s2s_authz::proto::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse, attribute_context,
};
use s2s_authz::proto::google::rpc;
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::codegen::Bytes;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    about = "Load generator for envoy.service.auth.v3.Authorization/Check: s2s-authz against a no-op \
             ext_authz server, measured in the same run",
    after_help = "Scenarios: closed1 (closed loop, 1 connection, 1 call in flight), closed (closed loop at \
                  --connections x --concurrency), open (open loop at each of --rates), cold (closed loop, \
                  every token new: --cold-tokens pre-signed tokens, the scenario ends when they run out, \
                  or with --cold-cycle when --duration does), coldopen (open loop at --cold-rate, a new \
                  token per call, product and no-op at the same rate), envoy (HTTP through a real Envoy, \
                  ext_authz route against the same route with the filter disabled; not in the default \
                  set), kidflood \
                  (valid traffic, 1 conn x 1 in flight, alone and during bursts of --flood-requests calls: \
                  unknown kids, and valid tokens as the control; products only; not in the default set).\n\
                  Example, a longer run: cargo bench --bench loadgen -- --duration 30 --log-levels info,warn"
)]
struct Args {
    /// Seconds per scenario, target and round.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Rounds per scenario. Each round measures every target once, in alternating order, so the no-op
    /// and the product are measured minutes apart at most; figures are the median of the per-round
    /// ratios (and differences), with their range. On a shared VM the speed of the box drifts by ±20 %
    /// within minutes, which one long measurement per target turns into a wrong ratio.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// HTTP/2 connections for the `closed`, `open` and `cold` scenarios.
    #[arg(long, default_value_t = 2)]
    connections: usize,
    /// Calls in flight in the `closed` and `cold` scenarios (spread over the connections).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Open-loop rates (calls/s), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    rates: Vec<u64>,
    /// Distinct tokens in the hot pool (used round robin).
    #[arg(long, default_value_t = 16)]
    hot_tokens: usize,
    /// Tokens pre-signed for the `cold` scenario's closed loop (each is sent once).
    #[arg(long, default_value_t = 20_000)]
    cold_tokens: usize,
    /// The `coldopen` scenario's rate (calls/s): the product and the no-op open loop at the same rate,
    /// each call with a new token (rate x duration x rounds are pre-signed). A server's CPU per call
    /// depends on its rate (fewer calls share each wake-up and write), and in the closed loop the
    /// no-op runs at about twice the product's cold rate; at one offered rate, both pay the same
    /// transport cost per call.
    #[arg(long, default_value_t = 4_000)]
    cold_rate: u64,
    /// `kidflood` scenario: calls in each burst (unknown kids, and the valid control burst).
    #[arg(long, default_value_t = 10_000)]
    flood_requests: usize,
    /// Scenarios to run, comma separated: closed1, closed, open, cold, coldopen; envoy and kidflood are
    /// not run by default.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "closed1,closed,open,cold,coldopen"
    )]
    scenarios: Vec<String>,
    /// `envoy` scenario: the Envoy binary [default: $S2S_ENVOY, else .tools/venv/bin/envoy].
    #[arg(long)]
    envoy_bin: Option<PathBuf>,
    /// `envoy` scenario: open-loop rates (requests/s) through Envoy, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    envoy_rates: Vec<u64>,
    /// `RUST_LOG` of the product server; several (e.g. `info,warn`) start one server per level.
    #[arg(long, value_delimiter = ',', default_value = "info")]
    log_levels: Vec<String>,
    /// The product's `--token-cache-entries`.
    #[arg(long, default_value_t = 100_000)]
    token_cache_entries: usize,
    /// Worker threads of the load generator's runtime.
    #[arg(long, default_value_t = 2)]
    client_threads: usize,
    /// The `s2s-authz` binary [default: $S2S_AUTHZ_BIN, else the one cargo built with this bench].
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Other builds of `s2s-authz` to measure in the same run (e.g. the previous commit's), comma
    /// separated; each is reported under its file name.
    #[arg(long, value_delimiter = ',')]
    also_bin: Vec<PathBuf>,
    /// Skip the no-op baseline.
    #[arg(long)]
    no_baseline: bool,
    /// `cold` only: cycle through the pre-signed cold tokens until `--duration` ends instead of stopping
    /// when they run out: a flood of any length. With more tokens than `--token-cache-entries`, most
    /// calls still miss the cache, though not all: S3-FIFO keeps a stable part of a cycled pool, about
    /// entries / tokens of it (500 entries over 6,000 tokens: 7 % hits). Each row prints the product's
    /// token-cache hits and misses.
    #[arg(long)]
    cold_cycle: bool,
    /// Sample each server's RSS this often during a scenario and print the series (seconds; 0: only at
    /// the end).
    #[arg(long, default_value_t = 0.0)]
    rss_every: f64,
    /// Run both servers under this command prefix (split on whitespace), e.g.
    /// `valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p.out`.
    #[arg(long)]
    wrap: Option<String>,
    /// A shell command run (and waited for) right before each measurement; `{pid}` is the server's pid.
    /// In `envoy`, one measurement is one load with both of its routes. E.g. `callgrind_control -z {pid}`.
    #[arg(long)]
    before_measure: Option<String>,
    /// A shell command run (and waited for) right after each measurement; `{pid}` is the server's pid.
    /// E.g. `callgrind_control -d {pid}`.
    #[arg(long)]
    after_measure: Option<String>,
    /// Also run a second baseline, `noop+decode`: the no-op server that does one raw `jsonwebtoken`
    /// RS256 decode of each call's bearer token (the call's only work; no cache) and answers by its
    /// result. Its CPU over the no-op's is what a raw decode costs *inside a server*, at a rate and
    /// between syscalls as the product's own cold verifications are, where the cold figure's baseline
    /// is a decode in a tight loop on one thread.
    #[arg(long)]
    decode_baseline: bool,
    /// After the summary, print it again over only the measurements whose CPU steal (the share of the
    /// box the hypervisor gave to other guests, printed on every row) was at most this many per cent.
    /// On a shared VM a neighbour's burst inflates every CPU and latency figure of the rounds it hits;
    /// the full summary stays first, so nothing is hidden
    #[arg(long, value_name = "PERCENT")]
    max_steal: Option<f64>,
    /// Internal: serve the no-op ext_authz and print its address.
    #[arg(long, hide = true)]
    noop_server: bool,
    /// Internal: the no-op decodes each bearer token with this RSA key (`n.e`, base64url).
    #[arg(long, hide = true)]
    noop_decode_key: Option<String>,
    /// Internal: the issuer the decoding no-op requires.
    #[arg(long, hide = true)]
    noop_decode_iss: Option<String>,
    /// Internal: the longest a child server may live, in seconds.
    #[arg(long, hide = true, default_value_t = 3600)]
    max_lifetime: u64,
    /// Passed by `cargo bench`; without it (as under `cargo test --benches`) nothing is run.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    let args = Args::parse();
    if args.noop_server {
        let decoder = args.noop_decode_key.as_deref().map(|key| {
            use base64::Engine as _;
            let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
            let (n, e) = key.split_once('.').unwrap();
            raw_decoder_of(
                &b64.decode(n).unwrap(),
                &b64.decode(e).unwrap(),
                args.noop_decode_iss.as_deref().unwrap(),
            )
        });
        noop_server(args.max_lifetime, decoder);
        return;
    }
    if !args.bench {
        println!("loadgen: nothing run outside `cargo bench --bench loadgen` (see --help)");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(args));
}

// ---------------------------------------------------------------------------------------------------
// The no-op baseline server.

/// The baselines' target names.
const NOOP: &str = "noop";
const NOOP_DECODE: &str = "noop+decode";

fn is_baseline(name: &str) -> bool {
    name == NOOP || name == NOOP_DECODE
}

/// Answers OK at once; with a decoder (`--decode-baseline`), first decodes the call's bearer token
/// with raw `jsonwebtoken` and answers PERMISSION_DENIED (7) if that fails.
struct Noop {
    decoder: Option<(jsonwebtoken::DecodingKey, jsonwebtoken::Validation)>,
}

impl Noop {
    fn decodes(&self, request: &CheckRequest) -> bool {
        let Some((key, validation)) = &self.decoder else {
            return true;
        };
        let token = request
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref())
            .and_then(|h| h.headers.get("authorization"))
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        jsonwebtoken::decode::<serde_json::Value>(token, key, validation).is_ok()
    }
}

#[tonic::async_trait]
impl Authorization for Noop {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        let code = if self.decodes(request.get_ref()) {
            0
        } else {
            7
        };
        Ok(tonic::Response::new(CheckResponse {
            status: Some(rpc::Status {
                code,
                ..Default::default()
            }),
            ..Default::default()
        }))
    }
}

/// Serves until its deadline or until standard input closes (the parent is gone).
fn noop_server(
    max_lifetime: u64,
    decoder: Option<(jsonwebtoken::DecodingKey, jsonwebtoken::Validation)>,
) {
    // The same runtime shape as the product's (`new_multi_thread` with default workers).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("LISTENING {}", listener.local_addr().unwrap());
        std::io::stdout().flush().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
            let _ = stop_tx.send(());
        });
        let stop = async move {
            tokio::select! {
                _ = stop_rx => {}
                _ = tokio::time::sleep(Duration::from_secs(max_lifetime)) => {}
            }
        };
        tonic::transport::Server::builder()
            .add_service(AuthorizationServer::new(Noop { decoder }))
            // Like tonic's own `serve(addr)`, which sets TCP_NODELAY on accepted connections.
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                stop,
            )
            .await
            .unwrap();
    });
}

// ---------------------------------------------------------------------------------------------------
// Child processes and /proc.

/// A server under test, stopped when dropped (also on panic).
struct Target {
    name: String,
    addr: SocketAddr,
    /// The process doing the serving (for the product: the child of `timeout`).
    pid: u32,
    child: Child,
    log: Option<PathBuf>,
    /// The product's metrics endpoint, read for its token-cache counters.
    metrics: Option<SocketAddr>,
}

impl Drop for Target {
    fn drop(&mut self) {
        // SIGTERM to our own child: `timeout` forwards it to the product, which drains and exits.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
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

fn clock_ticks_per_sec() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU time of a process, in seconds: the sum of its threads' run time as the scheduler counts it
/// (`/proc/<pid>/task/*/schedstat`, nanoseconds). `utime + stime` in `/proc/<pid>/stat` would also do,
/// but it is counted in clock ticks (10 ms): a cold round of ~7,000 calls costs the server ~0.4 s, so a
/// tick is 2.5 % of it. The servers' threads (runtime workers, the log writer) live as long as they do,
/// so none of a scenario's CPU leaves with an exited thread; if the task list cannot be read at all, the
/// tick-counted figure is used.
fn process_cpu(pid: &str, ticks: f64) -> f64 {
    let threads = std::fs::read_dir(format!("/proc/{pid}/task")).ok();
    let scheduled: Option<f64> = threads.map(|dir| {
        dir.filter_map(Result::ok)
            .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
            .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
            .sum::<f64>()
            / 1e9
    });
    match scheduled {
        Some(seconds) if seconds > 0.0 => seconds,
        _ => ticked_cpu(pid, ticks),
    }
}

/// utime + stime of a process (all its threads, also exited ones), in seconds, in clock ticks. The load
/// generator's own CPU is read so: its pacer threads end with their scenario.
fn ticked_cpu(pid: &str, ticks: f64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the `comm` field, which may contain spaces: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (get(11) + get(12)) / ticks
}

/// CPU time of the calling thread, in seconds (ns precision, from the scheduler).
fn thread_cpu() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |ns| ns / 1e9)
}

/// The box's CPU time in ticks, summed over its CPUs: (steal, all), from the `cpu` line of `/proc/stat`
/// (user, nice, system, idle, iowait, irq, softirq, steal; guest time is already in user).
fn box_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .find_map(|l| l.strip_prefix("cpu "))?
        .split_whitespace()
        .take(8)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    Some((*fields.get(7)?, fields.iter().sum()))
}

/// Steal between two `box_ticks` readings, as a share of all the CPU time between them.
fn steal_between(before: Option<(u64, u64)>, after: Option<(u64, u64)>) -> Option<f64> {
    let ((s0, t0), (s1, t1)) = (before?, after?);
    let total = t1.checked_sub(t0).filter(|t| *t > 0)?;
    Some(s1.saturating_sub(s0) as f64 / total as f64)
}

/// One measurement window of a server process: its CPU time (all of its threads) and the box's CPU
/// steal between `start` and `finish`. The load it measures runs in between, and nothing else does.
struct Window {
    pid: String,
    ticks: f64,
    server_before: f64,
    box_before: Option<(u64, u64)>,
    started: Instant,
}

impl Window {
    fn start(pid: u32) -> Self {
        let (pid, ticks) = (pid.to_string(), clock_ticks_per_sec());
        Window {
            server_before: process_cpu(&pid, ticks),
            box_before: box_ticks(),
            started: Instant::now(),
            pid,
            ticks,
        }
    }

    /// Wall time, the server's CPU seconds and the steal over the window.
    fn finish(self) -> (Duration, f64, Option<f64>) {
        let elapsed = self.started.elapsed();
        let server_cpu = process_cpu(&self.pid, self.ticks) - self.server_before;
        (
            elapsed,
            server_cpu,
            steal_between(self.box_before, box_ticks()),
        )
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn child_of(pid: u32) -> Option<u32> {
    let listed = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    listed.split_whitespace().next()?.parse().ok()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn server_bin(args: &Args) -> PathBuf {
    if let Some(p) = &args.server_bin {
        return p.clone();
    }
    if let Ok(p) = std::env::var("S2S_AUTHZ_BIN") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_BIN_EXE_s2s-authz"))
}

/// `program args…`, or the same under `--wrap`'s command prefix.
fn command(wrap: Option<&str>, program: &std::ffi::OsStr) -> Command {
    let mut prefix = wrap.unwrap_or_default().split_whitespace();
    match prefix.next() {
        None => Command::new(program),
        Some(first) => {
            let mut c = Command::new(first);
            c.args(prefix).arg(program);
            c
        }
    }
}

/// Runs a `--before-measure` / `--after-measure` hook for the server `pid`.
fn hook(cmd: Option<&str>, pid: u32) {
    if let Some(cmd) = cmd {
        let cmd = cmd.replace("{pid}", &pid.to_string());
        match Command::new("sh").args(["-c", &cmd]).status() {
            Ok(s) if s.success() => {}
            other => eprintln!("  warning: `{cmd}`: {other:?}"),
        }
    }
}

/// The no-op baseline (`NOOP`), or with `decode` (the development issuer), the decoding one
/// (`NOOP_DECODE`).
fn start_noop(args: &Args, lifetime: u64, decode: Option<&DevIssuer>) -> Target {
    let mut cmd = command(
        args.wrap.as_deref(),
        std::env::current_exe().unwrap().as_os_str(),
    );
    cmd.args(["--noop-server", "--max-lifetime", &lifetime.to_string()]);
    if let Some(dev) = decode {
        use base64::Engine as _;
        let (n, e) = dev.public_key_components(&dev.current_kid()).unwrap();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        cmd.arg("--noop-decode-key")
            .arg(format!("{}.{}", b64.encode(n), b64.encode(e)))
            .arg("--noop-decode-iss")
            .arg(dev.v2_issuer(TENANT));
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("LISTENING ")
        .unwrap_or_else(|| panic!("no-op server said {line:?}"))
        .parse()
        .unwrap();
    let pid = child.id();
    Target {
        name: if decode.is_some() { NOOP_DECODE } else { NOOP }.to_owned(),
        addr,
        pid,
        child,
        log: None,
        metrics: None,
    }
}

/// The builds under test: (label, binary). The first is `s2s-authz`, the one `--server-bin` names.
fn products(args: &Args) -> Vec<(String, PathBuf)> {
    let mut out = vec![("s2s-authz".to_owned(), server_bin(args))];
    for (i, bin) in args.also_bin.iter().enumerate() {
        let name = bin.file_name().map_or_else(
            || format!("build-{i}"),
            |n| n.to_string_lossy().into_owned(),
        );
        out.push((name, bin.clone()));
    }
    out
}

fn product_name(label: &str, level: &str) -> String {
    format!("{label} (RUST_LOG={level})")
}

fn start_product(
    args: &Args,
    dev: &DevIssuer,
    dir: &std::path::Path,
    (label, bin): &(String, PathBuf),
    level: &str,
    lifetime: u64,
) -> Target {
    let config = dir.join(format!("{label}-{level}.yaml"));
    std::fs::write(
        &config,
        format!(
            r#"
auth:
  instance: "{instance}"
  tenants: ["{TENANT}"]
  audiences: ["{AUDIENCE}"]
token_cache: {{ max_entries: {entries} }}
security_roles:
  - name: Orders Integration
    privileges: [{{ resource: orders, operations: [read] }}]
app_entries:
  - name: orders-service
    tenant_id: "{TENANT}"
    client_app_id: "{APP}"
    required_role: S2SAppRole
    application_user: {{ security_role: Orders Integration }}
"#,
            instance = dev.instance(),
            entries = args.token_cache_entries
        ),
    )
    .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = dir.join(format!("{label}-{level}.log"));
    let mut timeout = Command::new("timeout");
    timeout.args(["--kill-after=5", &format!("{lifetime}s")]);
    if let Some(wrap) = &args.wrap {
        timeout.args(wrap.split_whitespace());
    }
    let child = timeout
        .arg(bin)
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .args(["--grpc-addr", &addr.to_string()])
        .args(["--admin-addr", "127.0.0.1:0"])
        .args(["--metrics-addr", &metrics.to_string()])
        .env("RUST_LOG", level)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("stdout.log")).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
    let timeout_pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    let pid = loop {
        if let Some(pid) = child_of(timeout_pid) {
            break pid;
        }
        assert!(Instant::now() < deadline, "{} did not start", bin.display());
        std::thread::sleep(Duration::from_millis(10));
    };
    Target {
        name: product_name(label, level),
        addr,
        pid,
        child,
        log: Some(log),
        metrics: Some(metrics),
    }
}

// ---------------------------------------------------------------------------------------------------
// Requests and results.

fn check_request(token: &str) -> CheckRequest {
    let headers: HashMap<String, String> = [
        (":authority", "orders.internal"),
        (":method", "GET"),
        (":path", "/orders/42"),
        (":scheme", "http"),
        ("accept", "application/json"),
        ("user-agent", "loadgen/1"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "5b1d0c4e-8a8f-4b7e-9a41-3f1f6c1d2e3a"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .chain([("authorization".to_owned(), format!("Bearer {token}"))])
    .collect();
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    id: "1".to_owned(),
                    method: "GET".to_owned(),
                    path: "/orders/42".to_owned(),
                    host: "orders.internal".to_owned(),
                    scheme: "http".to_owned(),
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

/// A `CheckRequest` for `token`, encoded once.
fn encoded_request(token: &str) -> Bytes {
    Bytes::from(prost::Message::encode_to_vec(&check_request(token)))
}

/// Requests to send, each encoded in advance: a hot pool used round robin, or cold tokens each sent
/// once.
struct Source {
    requests: Vec<Bytes>,
    next: AtomicUsize,
    cycle: bool,
}

impl Source {
    fn new(tokens: &[String], cycle: bool) -> Arc<Source> {
        Arc::new(Source {
            requests: tokens.iter().map(|t| encoded_request(t)).collect(),
            next: AtomicUsize::new(0),
            cycle,
        })
    }

    fn next(&self) -> Option<Bytes> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        if self.cycle && !self.requests.is_empty() {
            self.requests.get(i % self.requests.len()).cloned()
        } else {
            self.requests.get(i).cloned()
        }
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000_000, 3).unwrap()
}

/// What one scenario against one target produced.
struct Stats {
    latency_ns: Histogram<u64>,
    /// Open loop only: actual send time minus intended send time (the generator's own lag).
    lag_ns: Histogram<u64>,
    grpc: BTreeMap<String, u64>,
    /// `CheckResponse.status.code`: 0 is allow.
    decisions: BTreeMap<i32, u64>,
}

impl Stats {
    fn new() -> Self {
        Stats {
            latency_ns: histogram(),
            lag_ns: histogram(),
            grpc: BTreeMap::new(),
            decisions: BTreeMap::new(),
        }
    }

    fn record(&mut self, result: &Result<tonic::Response<CheckResponse>, tonic::Status>, ns: u64) {
        self.latency_ns.saturating_record(ns.max(1));
        match result {
            Ok(r) => {
                *self.grpc.entry("OK".to_owned()).or_default() += 1;
                let code = r.get_ref().status.as_ref().map_or(-1, |s| s.code);
                *self.decisions.entry(code).or_default() += 1;
            }
            Err(s) => *self.grpc.entry(format!("{:?}", s.code())).or_default() += 1,
        }
    }

    /// An HTTP request through Envoy: `decisions` counts HTTP status codes (200 is allow).
    fn record_http(&mut self, result: &Result<u16, String>, ns: u64) {
        self.latency_ns.saturating_record(ns.max(1));
        match result {
            Ok(status) => {
                *self.grpc.entry("HTTP".to_owned()).or_default() += 1;
                *self.decisions.entry(i32::from(*status)).or_default() += 1;
            }
            Err(e) => *self.grpc.entry(e.clone()).or_default() += 1,
        }
    }

    fn merge(&mut self, other: Stats) {
        self.latency_ns.add(&other.latency_ns).unwrap();
        self.lag_ns.add(&other.lag_ns).unwrap();
        for (k, v) in other.grpc {
            *self.grpc.entry(k).or_default() += v;
        }
        for (k, v) in other.decisions {
            *self.decisions.entry(k).or_default() += v;
        }
    }

    fn calls(&self) -> u64 {
        self.latency_ns.len()
    }

    fn allowed(&self) -> u64 {
        self.decisions.get(&0).copied().unwrap_or(0)
    }
}

struct Measurement {
    stats: Stats,
    elapsed: Duration,
    server_cpu: f64,
    client_cpu: f64,
    rss_kib: u64,
    /// `--rss-every`: (seconds into the measurement, RSS KiB).
    rss_series: Vec<(f64, u64)>,
    /// Cold scenario: CPU seconds of one raw `jsonwebtoken` decode, measured in this process right
    /// before and after this round (their mean), so that the baseline shares the moment of the
    /// measurement. The speed of a shared box moves by ±20 % within minutes.
    raw_decode: Option<f64>,
    /// `coldopen`: seconds of the same raw decode when each one follows a pause of the
    /// scenario's interval between calls, as a server's decisions do at that rate (median).
    raw_spaced: Option<f64>,
    /// The product's token-cache hits and misses during the measurement (from its metrics): how many
    /// calls skipped the verification, and how many made one.
    cache: Option<CacheCounts>,
    /// The share of the box's CPU time the hypervisor gave to other guests during the measurement
    /// (steal, from `/proc/stat`). A round with a large steal measures the neighbours as much as the
    /// servers: its latencies and CPU per call are not this box's alone.
    steal: Option<f64>,
}

#[derive(Clone, Copy, Debug, Default)]
struct CacheCounts {
    hits: u64,
    misses: u64,
}

/// The product's token-cache counters now, from its Prometheus endpoint; `None` for the no-op or when
/// the endpoint does not answer.
async fn cache_counts(target: &Target) -> Option<CacheCounts> {
    let addr = target.metrics?;
    let body = http_client()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let counter = |name: &str| common::prom::metric(&body, name, &[]);
    Some(CacheCounts {
        hits: counter("s2s_authz_token_cache_hits_total")? as u64,
        misses: counter("s2s_authz_token_cache_misses_total")? as u64,
    })
}

impl Measurement {
    fn throughput(&self) -> f64 {
        self.stats.calls() as f64 / self.elapsed.as_secs_f64()
    }
    fn server_us_per_call(&self) -> f64 {
        self.server_cpu * 1e6 / self.stats.calls().max(1) as f64
    }
    fn client_us_per_call(&self) -> f64 {
        self.client_cpu * 1e6 / self.stats.calls().max(1) as f64
    }
    fn p(&self, q: f64) -> f64 {
        self.stats.latency_ns.value_at_quantile(q) as f64 / 1e3
    }
}

// ---------------------------------------------------------------------------------------------------
// Load.

/// An ext_authz client that sends requests encoded in advance: per call, a reference count and one
/// copy into the HTTP/2 frame, where the generated client would deep-clone and encode a `CheckRequest`
/// (a dozen strings and a header map: a fifth of the load generator's CPU per call in `perf`). The
/// bytes on the wire are the same.
#[derive(Clone)]
struct Checker(tonic::client::Grpc<Channel>);

impl Checker {
    fn new(channel: Channel) -> Self {
        Checker(tonic::client::Grpc::new(channel))
    }

    async fn check(
        &mut self,
        request: Bytes,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        self.0
            .ready()
            .await
            .map_err(|e| tonic::Status::unknown(format!("service was not ready: {e}")))?;
        let path = PathAndQuery::from_static("/envoy.service.auth.v3.Authorization/Check");
        self.0
            .unary(tonic::Request::new(request), path, PreEncoded)
            .await
    }
}

/// The codec of `Checker`: writes the encoded request as it is, decodes the `CheckResponse`.
struct PreEncoded;

impl tonic::codec::Codec for PreEncoded {
    type Encode = Bytes;
    type Decode = CheckResponse;
    type Encoder = PreEncoded;
    type Decoder = PreEncoded;

    fn encoder(&mut self) -> PreEncoded {
        PreEncoded
    }

    fn decoder(&mut self) -> PreEncoded {
        PreEncoded
    }
}

impl tonic::codec::Encoder for PreEncoded {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use prost::bytes::BufMut as _;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for PreEncoded {
    type Item = CheckResponse;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<CheckResponse>, tonic::Status> {
        prost::Message::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(format!("CheckResponse: {e}")))
    }
}

async fn connect(addr: SocketAddr, n: usize) -> Vec<Checker> {
    let mut clients = Vec::new();
    for _ in 0..n.max(1) {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .tcp_nodelay(true)
            .connect()
            .await
            .unwrap();
        clients.push(Checker::new(channel));
    }
    clients
}

enum Load {
    Closed {
        connections: usize,
        in_flight: usize,
    },
    Open {
        rate: u64,
        connections: usize,
    },
}

async fn measure(
    args: &Args,
    target: &Target,
    load: &Load,
    source: Arc<Source>,
    duration: Duration,
) -> Measurement {
    let ticks = clock_ticks_per_sec();
    let connections = match load {
        Load::Closed { connections, .. } | Load::Open { connections, .. } => *connections,
    };
    let clients = connect(target.addr, connections).await;
    // A short warm-up on every connection (not measured).
    for c in &clients {
        let mut c = c.clone();
        let _ = c.check(encoded_request("warm-up")).await;
    }
    tokio::task::block_in_place(|| hook(args.before_measure.as_deref(), target.pid));
    let cache_before = cache_counts(target).await;
    // The RSS series: (seconds since start, KiB), sampled by a thread until the measurement ends.
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(args.rss_every > 0.0));
    let sampler = {
        let (sampling, pid, every) = (sampling.clone(), target.pid, args.rss_every);
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut series = Vec::new();
            while sampling.load(Ordering::Acquire) {
                series.push((start.elapsed().as_secs_f64(), rss_kib(pid)));
                let next = Duration::from_secs_f64(every * series.len() as f64);
                while sampling.load(Ordering::Acquire) && start.elapsed() < next {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            series
        })
    };
    let client_before = ticked_cpu("self", ticks);
    let window = Window::start(target.pid);
    let stats = match load {
        Load::Closed { in_flight, .. } => closed_loop(&clients, *in_flight, source, duration).await,
        Load::Open { rate, .. } => open_loop(&clients, *rate, source, duration).await,
    };
    let (elapsed, server_cpu, steal) = window.finish();
    let client_cpu = ticked_cpu("self", ticks) - client_before;
    let cache = match (cache_before, cache_counts(target).await) {
        (Some(a), Some(b)) => Some(CacheCounts {
            hits: b.hits.saturating_sub(a.hits),
            misses: b.misses.saturating_sub(a.misses),
        }),
        _ => None,
    };
    sampling.store(false, Ordering::Release);
    let rss_series = sampler.join().unwrap_or_default();
    tokio::task::block_in_place(|| hook(args.after_measure.as_deref(), target.pid));
    Measurement {
        stats,
        elapsed,
        server_cpu,
        client_cpu,
        rss_kib: rss_kib(target.pid),
        rss_series,
        raw_decode: None,
        raw_spaced: None,
        cache,
        steal,
    }
}

async fn closed_loop(
    clients: &[Checker],
    in_flight: usize,
    source: Arc<Source>,
    duration: Duration,
) -> Stats {
    let deadline = Instant::now() + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..in_flight.max(1) {
        let mut client = clients[i % clients.len()].clone();
        let source = source.clone();
        tasks.spawn(async move {
            let mut stats = Stats::new();
            while Instant::now() < deadline {
                let Some(request) = source.next() else { break };
                let sent = Instant::now();
                let result = client.check(request).await;
                stats.record(&result, sent.elapsed().as_nanos() as u64);
            }
            stats
        });
    }
    let mut total = Stats::new();
    while let Some(stats) = tasks.join_next().await {
        total.merge(stats.unwrap());
    }
    total
}

/// Sends at a fixed rate whatever the responses do; each call's latency counts from its intended send
/// time, so a stalled server is charged for every call it delays (no coordinated omission).
async fn open_loop(
    clients: &[Checker],
    rate: u64,
    source: Arc<Source>,
    duration: Duration,
) -> Stats {
    let total = (rate as f64 * duration.as_secs_f64()).round() as u64;
    let stats = Arc::new(Mutex::new(Stats::new()));
    let done = Arc::new(AtomicU64::new(0));
    // The calls to wait for: `total`, or fewer if the source runs out first.
    let expected = Arc::new(AtomicU64::new(total));
    let all_done = Arc::new(tokio::sync::Notify::new());
    let handle = tokio::runtime::Handle::current();
    let clients: Vec<_> = clients.to_vec();
    let (s, d, e, n) = (
        stats.clone(),
        done.clone(),
        expected.clone(),
        all_done.clone(),
    );
    // The pacer is an OS thread: tokio's timer has a 1 ms granularity, far coarser than 100 µs.
    let pacer = std::thread::spawn(move || {
        let interval = Duration::from_secs_f64(1.0 / rate as f64);
        let start = Instant::now() + Duration::from_millis(5);
        for i in 0..total {
            let intended = start + interval.mul_f64(i as f64);
            let now = Instant::now();
            if intended > now {
                std::thread::sleep(intended - now);
            }
            let Some(request) = source.next() else {
                e.store(i, Ordering::Release);
                if d.load(Ordering::Acquire) >= i {
                    n.notify_one();
                }
                break;
            };
            let mut client = clients[(i as usize) % clients.len()].clone();
            let (s, d, e, n) = (s.clone(), d.clone(), e.clone(), n.clone());
            handle.spawn(async move {
                let sent = Instant::now();
                let result = client.check(request).await;
                let finished = Instant::now();
                {
                    let mut stats = s.lock().unwrap();
                    stats.record(&result, (finished - intended).as_nanos() as u64);
                    stats.lag_ns.saturating_record(
                        (sent.saturating_duration_since(intended)).as_nanos().max(1) as u64,
                    );
                }
                if d.fetch_add(1, Ordering::AcqRel) + 1 == e.load(Ordering::Acquire) {
                    n.notify_one();
                }
            });
        }
    });
    let waited =
        tokio::time::timeout(duration + Duration::from_secs(30), all_done.notified()).await;
    let _ = tokio::task::spawn_blocking(move || pacer.join()).await;
    if waited.is_err() {
        eprintln!("  warning: not every open-loop call completed in time");
    }
    let mut guard = stats.lock().unwrap();
    std::mem::replace(&mut *guard, Stats::new())
}

// ---------------------------------------------------------------------------------------------------
// The run.

/// The key and validation of the raw `jsonwebtoken` decode: signature, `exp`, `aud`, `iss`.
fn raw_decoder(dev: &DevIssuer) -> (jsonwebtoken::DecodingKey, jsonwebtoken::Validation) {
    let (n, e) = dev.public_key_components(&dev.current_kid()).unwrap();
    raw_decoder_of(&n, &e, &dev.v2_issuer(TENANT))
}

/// `raw_decoder` from the key's modulus and exponent and the issuer (as the decoding no-op gets them).
fn raw_decoder_of(
    n: &[u8],
    e: &[u8],
    issuer: &str,
) -> (jsonwebtoken::DecodingKey, jsonwebtoken::Validation) {
    let key = jsonwebtoken::DecodingKey::from_rsa_raw_components(n, e);
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&[AUDIENCE_GUID]);
    validation.set_issuer(&[issuer]);
    (key, validation)
}

/// Seconds of one raw decode (as `raw_decode_cpu`'s) when each follows a pause of `gap`: the median
/// wall time of up to 2,000 decodes, each timed alone. After a pause the code and data a decode needs
/// are no longer in the CPU's caches and predictors (the idle core ran other work or slept), so a
/// decode costs more than in a tight loop; a server at a moderate rate pays that on every cold Check.
fn raw_decode_spaced(dev: &DevIssuer, tokens: &[String], gap: Duration) -> f64 {
    let (key, validation) = raw_decoder(dev);
    let mut times: Vec<f64> = tokens
        .iter()
        .take(2000)
        .map(|t| {
            std::thread::sleep(gap);
            let started = Instant::now();
            std::hint::black_box(
                jsonwebtoken::decode::<serde_json::Value>(t, &key, &validation).is_ok(),
            );
            started.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times.get(times.len() / 2).copied().unwrap_or(f64::NAN)
}

/// CPU seconds per raw `jsonwebtoken` RS256 decode (signature, `exp`, `aud`, `iss`) into a
/// `serde_json::Value`, single thread, over distinct tokens of the kind the cold scenario sends. The
/// median of `batches` batches: other work on a shared machine disturbs single batches.
/// Batches of the raw decode measured around each round of the cold scenario (~0.6 s each time).
const ROUND_BATCHES: usize = 3;

fn raw_decode_cpu(dev: &DevIssuer, tokens: &[String], batches: usize) -> f64 {
    let (key, validation) = raw_decoder(dev);
    let sample = &tokens[..tokens.len().min(1000)];
    for t in sample.iter().take(100) {
        assert!(jsonwebtoken::decode::<serde_json::Value>(t, &key, &validation).is_ok());
    }
    // The scheduler's per-thread CPU time advances at scheduling events, so a batch must be long
    // (≥ 0.2 s) for its reading to be exact to a few per cent: repeat the sample until it is.
    let mut batches: Vec<f64> = (0..batches)
        .map(|_| {
            let before = thread_cpu();
            let started = Instant::now();
            let mut decoded = 0usize;
            while decoded < 1000 || started.elapsed() < Duration::from_millis(200) {
                for t in sample {
                    std::hint::black_box(
                        jsonwebtoken::decode::<serde_json::Value>(t, &key, &validation).is_ok(),
                    );
                }
                decoded += sample.len();
            }
            (thread_cpu() - before) / decoded as f64
        })
        .collect();
    batches.sort_by(f64::total_cmp);
    batches[batches.len() / 2]
}

async fn wait_ready(target: &Target, token: &str, patience: Duration) {
    let deadline = Instant::now() + patience;
    loop {
        if let Ok(mut client) = connect_one(target.addr).await
            && let Ok(r) = client.check(encoded_request(token)).await
            && r.get_ref().status.as_ref().is_some_and(|s| s.code == 0)
        {
            return;
        }
        if Instant::now() > deadline {
            let log = target
                .log
                .as_ref()
                .and_then(|l| std::fs::read_to_string(l).ok())
                .unwrap_or_default();
            panic!("{} never allowed a token; its log:\n{log}", target.name);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn connect_one(addr: SocketAddr) -> Result<Checker, tonic::transport::Error> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    Ok(Checker::new(channel))
}

struct Row {
    scenario: String,
    target: String,
    round: usize,
    m: Measurement,
}

fn print_row(r: &Row) {
    let m = &r.m;
    let lag = if m.stats.lag_ns.is_empty() {
        String::new()
    } else {
        format!(
            "  gen-lag p50/p99 {:.0}/{:.0} µs",
            m.stats.lag_ns.value_at_quantile(0.5) as f64 / 1e3,
            m.stats.lag_ns.value_at_quantile(0.99) as f64 / 1e3
        )
    };
    let cache = m.cache.map_or(String::new(), |c| {
        format!("  token cache hits/misses {}/{}", c.hits, c.misses)
    });
    let steal = m
        .steal
        .map_or(String::new(), |s| format!("  steal {:.0} %", s * 100.0));
    println!(
        "  {:<28} r{} {:>9.0} calls/s  p50 {:>7.1}  p90 {:>7.1}  p99 {:>7.1}  p99.9 {:>8.1} µs  \
         server {:>5.1} µs CPU/call  loadgen {:>5.1} µs CPU/call  RSS {:>6.1} MiB  grpc {:?}  decisions {:?}{cache}{lag}{steal}",
        r.target,
        r.round + 1,
        m.throughput(),
        m.p(0.5),
        m.p(0.9),
        m.p(0.99),
        m.p(0.999),
        m.server_us_per_call(),
        m.client_us_per_call(),
        m.rss_kib as f64 / 1024.0,
        m.stats.grpc,
        m.stats.decisions,
    );
    if !m.rss_series.is_empty() {
        let series: Vec<String> = m
            .rss_series
            .iter()
            .map(|(t, kib)| format!("{t:.0}s {:.1}", *kib as f64 / 1024.0))
            .collect();
        println!("    RSS MiB over time: {}", series.join(", "));
    }
}

async fn run(args: Args) {
    let duration = Duration::from_secs_f64(args.duration);
    let dev = DevIssuer::start(DevIssuerConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        tenants: vec![DevTenant {
            tenant_id: TENANT.to_owned(),
            clients: vec![app()],
        }],
        token_lifetime: Duration::from_secs(3 * 3600),
    })
    .await
    .unwrap();

    let wants = |s: &str| args.scenarios.iter().any(|x| x == s);
    let hot = mint(&dev, args.hot_tokens.max(1));
    let rounds = args.rounds.max(1);
    // The open-loop cold rounds send exactly rate x duration calls each.
    let cold_open_per_round = (args.cold_rate as f64 * args.duration).round() as usize;
    let closed_n = if wants("cold") { args.cold_tokens } else { 0 };
    let open_n = if wants("coldopen") {
        cold_open_per_round * rounds
    } else {
        0
    };
    let (cold, cold_open) = if closed_n + open_n > 0 {
        let started = Instant::now();
        let tokens = tokio::task::block_in_place(|| mint(&dev, closed_n + open_n));
        println!(
            "pre-signed {} cold tokens in {:.1} s",
            tokens.len(),
            started.elapsed().as_secs_f64()
        );
        let mut closed = tokens;
        let open = closed.split_off(closed_n.min(closed.len()));
        (closed, open)
    } else {
        (Vec::new(), Vec::new())
    };
    println!(
        "token: {} bytes (RS256, v2 app token); hot pool {} tokens",
        hot[0].len(),
        hot.len()
    );
    // The raw decode's sample: tokens of the kind the cold scenarios send.
    let samples: &[String] = [&cold, &cold_open, &hot]
        .into_iter()
        .find(|t| !t.is_empty())
        .map_or(&[], |t| t.as_slice());
    let raw_decode = tokio::task::block_in_place(|| raw_decode_cpu(&dev, samples, 5));
    println!(
        "raw jsonwebtoken RS256 decode: {:.1} µs CPU (single thread, this process)",
        raw_decode * 1e6
    );

    // Generous lifetime for the children: every scenario for every target, plus start-up.
    let scenario_count = args.scenarios.len() + args.rates.len();
    let lifetime = 60
        + (scenario_count as u64 + 1)
            * args.rounds.max(1) as u64
            * (args.log_levels.len() as u64 * (args.also_bin.len() as u64 + 1) + 1)
            * (args.duration as u64 + 35);
    let dir = tempfile::tempdir().unwrap();
    let mut targets: Vec<Target> = Vec::new();
    if !args.no_baseline {
        targets.push(start_noop(&args, lifetime, None));
        if args.decode_baseline {
            targets.push(start_noop(&args, lifetime, Some(&dev)));
        }
    }
    for level in &args.log_levels {
        for product in &products(&args) {
            targets.push(start_product(
                &args,
                &dev,
                dir.path(),
                product,
                level,
                lifetime,
            ));
        }
    }
    for t in &targets {
        // A server under `--wrap` (valgrind) starts far more slowly.
        let patience = Duration::from_secs(if args.wrap.is_some() { 300 } else { 30 });
        wait_ready(t, &hot[0], patience).await;
        println!(
            "{} ready on {} (pid {}, RSS {:.1} MiB)",
            t.name,
            t.addr,
            t.pid,
            rss_kib(t.pid) as f64 / 1024.0
        );
    }

    // (name, load, the cold tokens it shares out over its rounds: none for the hot pool).
    let mut scenarios: Vec<(String, Load, Option<ColdTokens>)> = Vec::new();
    if wants("closed1") {
        scenarios.push((
            "closed loop, 1 conn x 1 in flight, hot".to_owned(),
            Load::Closed {
                connections: 1,
                in_flight: 1,
            },
            None,
        ));
    }
    if wants("closed") {
        scenarios.push((
            closed_name(&args, "hot"),
            Load::Closed {
                connections: args.connections,
                in_flight: args.concurrency,
            },
            None,
        ));
    }
    if wants("open") {
        for &rate in &args.rates {
            scenarios.push((
                format!("open loop {rate}/s, {} conn, hot", args.connections),
                Load::Open {
                    rate,
                    connections: args.connections,
                },
                None,
            ));
        }
    }
    if wants("cold") {
        scenarios.push((
            closed_name(&args, "cold"),
            Load::Closed {
                connections: args.connections,
                in_flight: args.concurrency,
            },
            Some(ColdTokens {
                tokens: &cold,
                per_round: cold.len().div_ceil(rounds),
            }),
        ));
    }
    if wants("coldopen") {
        scenarios.push((
            cold_open_name(&args),
            Load::Open {
                rate: args.cold_rate,
                connections: args.connections,
            },
            Some(ColdTokens {
                tokens: &cold_open,
                per_round: cold_open_per_round,
            }),
        ));
    }

    let mut rows: Vec<Row> = Vec::new();
    for (name, load, cold_tokens) in &scenarios {
        println!(
            "\n== {name} ({:.0} s each, {rounds} round(s))",
            args.duration
        );
        for round in 0..rounds {
            let mut order: Vec<&Target> = targets.iter().collect();
            if round % 2 == 1 {
                order.reverse();
            }
            let raw_before = cold_tokens.is_some().then(|| {
                tokio::task::block_in_place(|| raw_decode_cpu(&dev, samples, ROUND_BATCHES))
            });
            let first = rows.len();
            for t in order {
                // The no-op does not look at tokens, so in the cold scenario it is the hot baseline,
                // measured at the same moment as the product's cold run; the decoding no-op decodes
                // every token it is sent, cold or hot.
                let source = if let Some(cold) = cold_tokens {
                    Source::new(cold.round(round), args.cold_cycle)
                } else {
                    Source::new(&hot, true)
                };
                let m = measure(&args, t, load, source, duration).await;
                let row = Row {
                    scenario: name.clone(),
                    target: t.name.clone(),
                    round,
                    m,
                };
                print_row(&row);
                rows.push(row);
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            if let Some(before) = raw_before {
                let after =
                    tokio::task::block_in_place(|| raw_decode_cpu(&dev, samples, ROUND_BATCHES));
                let raw = (before + after) / 2.0;
                println!(
                    "  raw jsonwebtoken RS256 decode   r{}  {:.1} µs CPU before, {:.1} µs after the round: {:.1} µs",
                    round + 1,
                    before * 1e6,
                    after * 1e6,
                    raw * 1e6
                );
                let spaced = match load {
                    Load::Open { rate, .. } => {
                        let gap = Duration::from_secs_f64(1.0 / (*rate).max(1) as f64);
                        let spaced =
                            tokio::task::block_in_place(|| raw_decode_spaced(&dev, samples, gap));
                        println!(
                            "  raw decode, each after a {:.0} µs pause   r{}  {:.1} µs (median)",
                            gap.as_secs_f64() * 1e6,
                            round + 1,
                            spaced * 1e6
                        );
                        Some(spaced)
                    }
                    Load::Closed { .. } => None,
                };
                for row in &mut rows[first..] {
                    row.m.raw_decode = Some(raw);
                    row.m.raw_spaced = spaced;
                }
            }
        }
    }

    if wants("envoy") {
        envoy_scenarios(&args, &targets, &hot, duration, &mut rows).await;
    }
    if wants("kidflood") {
        kidflood_scenarios(&args, &targets, &dev, &hot, duration).await;
    }

    let raw_after = tokio::task::block_in_place(|| raw_decode_cpu(&dev, samples, 5));
    println!(
        "\nraw jsonwebtoken RS256 decode, again after the scenarios: {:.1} µs CPU; the mean of both, {:.1} µs, is the baseline",
        raw_after * 1e6,
        (raw_decode + raw_after) * 0.5e6
    );
    let all: Vec<&Row> = rows.iter().collect();
    summary(&args, &all, (raw_decode + raw_after) / 2.0);
    if let Some(max) = args.max_steal {
        let kept: Vec<&Row> = rows
            .iter()
            .filter(|r| r.m.steal.is_none_or(|s| s * 100.0 <= max))
            .collect();
        println!(
            "\n== The same over the measurements that lost at most {max} % of the box to steal \
             ({} of {} kept; a round's ratio needs both of its measurements)",
            kept.len(),
            rows.len()
        );
        summary(&args, &kept, (raw_decode + raw_after) / 2.0);
    }
    for t in &targets {
        if let Some(log) = &t.log {
            let bytes = std::fs::metadata(log).map(|m| m.len()).unwrap_or(0);
            println!("{}: {} KiB of log", t.name, bytes / 1024);
        }
    }
    drop(targets);
    dev.shutdown().await;
}

/// A cold scenario's tokens: each round sends its own share, so that no product sees a token twice
/// (it would be a cache hit).
struct ColdTokens<'a> {
    tokens: &'a [String],
    per_round: usize,
}

impl ColdTokens<'_> {
    fn round(&self, round: usize) -> &[String] {
        self.tokens
            .chunks(self.per_round.max(1))
            .nth(round)
            .unwrap_or(&[])
    }
}

/// The `closed` (`tokens`: "hot") and `cold` ("cold") scenarios: closed loop at `--connections` x
/// `--concurrency`.
fn closed_name(args: &Args, tokens: &str) -> String {
    format!(
        "closed loop, {} conn x {} in flight, {tokens}",
        args.connections, args.concurrency
    )
}

/// The `coldopen` scenario: the product and the no-op open loop at the same rate, a new token per
/// call.
fn cold_open_name(args: &Args) -> String {
    format!(
        "cold, open loop {}/s, {} conn",
        args.cold_rate, args.connections
    )
}

/// Per-round figures of one product against the no-op: the median and the range over the rounds.
struct Figure {
    median: f64,
    min: f64,
    max: f64,
    rounds: usize,
}

impl Figure {
    fn of(mut values: Vec<f64>) -> Option<Figure> {
        values.retain(|v| v.is_finite());
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2.0
        };
        Some(Figure {
            median,
            min: values[0],
            max: values[n - 1],
            rounds: n,
        })
    }

    /// `1.23x (1.10-1.31x over 3 rounds)`, or the same with a signed unit.
    fn show(&self, precision: usize, unit: &str, signed: bool) -> String {
        let v = |x: f64| {
            if signed {
                format!("{x:+.precision$}{unit}")
            } else {
                format!("{x:.precision$}{unit}")
            }
        };
        if self.rounds == 1 {
            v(self.median)
        } else {
            format!(
                "{} ({} to {} over {} rounds)",
                v(self.median),
                v(self.min),
                v(self.max),
                self.rounds
            )
        }
    }
}

fn summary(args: &Args, rows: &[&Row], raw_decode: f64) {
    // The measurements of (scenario, target) by round, and figures over the rounds that have both.
    let of = |scenario: &str, target: &str| -> Vec<&Row> {
        rows.iter()
            .copied()
            .filter(|r| r.scenario.starts_with(scenario) && r.target == target)
            .collect()
    };
    let in_round = |scenario: &str, target: &str, round: usize| {
        of(scenario, target)
            .into_iter()
            .find(|r| r.round == round)
            .map(|r| &r.m)
    };
    // `f(target's, no-op's)` for each round that has both.
    let paired = |scenario: &str, target: &str, f: &dyn Fn(&Measurement, &Measurement) -> f64| {
        let values = of(scenario, target)
            .into_iter()
            .filter_map(|r| Some(f(&r.m, in_round(scenario, NOOP, r.round)?)))
            .collect();
        Figure::of(values)
    };
    // `f(target's, no-op's, decoding no-op's)` for each round that has all three (`--decode-baseline`).
    let paired3 = |scenario: &str,
                   target: &str,
                   f: &dyn Fn(&Measurement, &Measurement, &Measurement) -> f64| {
        let values = of(scenario, target)
            .into_iter()
            .filter_map(|r| {
                let b = in_round(scenario, NOOP, r.round)?;
                Some(f(&r.m, b, in_round(scenario, NOOP_DECODE, r.round)?))
            })
            .collect();
        Figure::of(values)
    };
    let each = |scenario: &str, target: &str, f: &dyn Fn(&Measurement) -> f64| {
        Figure::of(of(scenario, target).into_iter().map(|r| f(&r.m)).collect())
    };
    let products: Vec<String> = args
        .log_levels
        .iter()
        .flat_map(|l| {
            products(args)
                .into_iter()
                .map(move |(p, _)| product_name(&p, l))
        })
        .collect();
    println!(
        "\n== Against the no-op baseline, same run: the median over rounds of each round's ratio or \
         difference (absolute times on this box are noisy)"
    );
    println!(
        "| figure | s2s-authz (median) | no-op (median) | ratio / difference | target | met |"
    );
    println!("|---|---|---|---|---|---|");
    let closed = closed_name(args, "hot");
    let cold = closed_name(args, "cold");
    let cold_open = cold_open_name(args);
    let closed1 = "closed loop, 1 conn x 1 in flight";
    let median = |f: Option<Figure>| f.map_or(f64::NAN, |f| f.median);
    let cpu_added =
        |m: &Measurement, b: &Measurement| m.server_us_per_call() - b.server_us_per_call();
    // Each round's own raw decode, measured around it; the run's mean if there is none.
    let raw_us = |m: &Measurement| m.raw_decode.unwrap_or(raw_decode) * 1e6;
    let spaced_us = |m: &Measurement| m.raw_spaced.unwrap_or(f64::NAN) * 1e6;
    // What a Check adds over the no-op, in raw decodes: timed in a tight loop, and after pauses.
    let added = |m: &Measurement, b: &Measurement| cpu_added(m, b) / raw_us(m);
    let spaced = |m: &Measurement, b: &Measurement| cpu_added(m, b) / spaced_us(m);
    for p in &products {
        let throughput = |m: &Measurement, b: &Measurement| m.throughput() / b.throughput();
        let cpu =
            |m: &Measurement, b: &Measurement| m.server_us_per_call() / b.server_us_per_call();
        let p99 = |m: &Measurement, b: &Measurement| m.p(0.99) - b.p(0.99);
        if let Some(ratio) = paired(&closed, p, &throughput) {
            println!(
                "| {p}: throughput, hot, {} conn x {} | {:.0}/s | {:.0}/s | {} | >= 0.8x | {} |",
                args.connections,
                args.concurrency,
                median(each(&closed, p, &Measurement::throughput)),
                median(each(&closed, NOOP, &Measurement::throughput)),
                ratio.show(2, "x", false),
                yes(ratio.median >= 0.8)
            );
        }
        if let Some(ratio) = paired(&closed, p, &cpu) {
            println!(
                "| {p}: server CPU per Check, hot | {:.1} µs | {:.1} µs | {} | <= 1.3x | {} |",
                median(each(&closed, p, &Measurement::server_us_per_call)),
                median(each(&closed, NOOP, &Measurement::server_us_per_call)),
                ratio.show(2, "x", false),
                yes(ratio.median <= 1.3)
            );
        }
        if let Some(diff) = paired(&closed, p, &p99) {
            println!(
                "| {p}: p99 closed loop, hot | {:.0} µs | {:.0} µs | {} | (info) | |",
                median(each(&closed, p, &|m| m.p(0.99))),
                median(each(&closed, NOOP, &|m| m.p(0.99))),
                diff.show(0, " µs", true)
            );
        }
        if let Some(ratio) = paired(closed1, p, &throughput) {
            println!(
                "| {p}: throughput, 1 conn x 1 in flight | {:.0}/s | {:.0}/s | {} | (info) | |",
                median(each(closed1, p, &Measurement::throughput)),
                median(each(closed1, NOOP, &Measurement::throughput)),
                ratio.show(2, "x", false)
            );
        }
        if let Some(diff) = paired(closed1, p, &|m, b| m.p(0.5) - b.p(0.5)) {
            println!(
                "| {p}: p50 latency, 1 conn x 1 in flight | {:.0} µs | {:.0} µs | {} | (info) | |",
                median(each(closed1, p, &|m| m.p(0.5))),
                median(each(closed1, NOOP, &|m| m.p(0.5))),
                diff.show(0, " µs", true)
            );
        }
        for &rate in &args.rates {
            let name = format!("open loop {rate}/s");
            if let Some(diff) = paired(&name, p, &p99) {
                let (target, met) = if rate >= 1000 {
                    ("<= +100 µs", yes(diff.median <= 100.0))
                } else {
                    ("(info)", "")
                };
                println!(
                    "| {p}: p99 open loop {rate}/s (p50 {:.0} vs {:.0}) | {:.0} µs | {:.0} µs | {} | {target} | {met} |",
                    median(each(&name, p, &|m| m.p(0.5))),
                    median(each(&name, NOOP, &|m| m.p(0.5))),
                    median(each(&name, p, &|m| m.p(0.99))),
                    median(each(&name, NOOP, &|m| m.p(0.99))),
                    diff.show(0, " µs", true)
                );
            }
        }
        if let Some(ratio) = paired(&cold, p, &added) {
            println!(
                "| {p}: server CPU a cold Check adds over the no-op (same round) | {:.1} µs | raw decode {:.1} µs (same round) | {} | <= 1.2x | {} |",
                median(paired(&cold, p, &cpu_added)),
                median(each(&cold, p, &raw_us)),
                ratio.show(2, "x", false),
                yes(ratio.median <= 1.2)
            );
            println!(
                "| {p}: throughput, cold | {:.0}/s | {:.0}/s (hot) | {} | (info) | |",
                median(each(&cold, p, &Measurement::throughput)),
                median(each(&cold, NOOP, &Measurement::throughput)),
                paired(&cold, p, &throughput).map_or_else(String::new, |r| r.show(2, "x", false))
            );
        }
        if let Some(ratio) = paired(&cold_open, p, &added) {
            println!(
                "| {p}: server CPU a cold Check adds over the no-op, both open loop at {}/s (same round) | {:.1} µs | raw decode {:.1} µs (same round) | {} | <= 1.2x | {} |",
                args.cold_rate,
                median(paired(&cold_open, p, &cpu_added)),
                median(each(&cold_open, p, &raw_us)),
                ratio.show(2, "x", false),
                yes(ratio.median <= 1.2)
            );
            if let Some(ratio) = paired(&cold_open, p, &spaced) {
                println!(
                    "| {p}: the same, against the raw decode after a pause of the interval between calls | {:.1} µs | raw decode {:.1} µs (after {:.0} µs pauses) | {} | (info) | |",
                    median(paired(&cold_open, p, &cpu_added)),
                    median(each(&cold_open, p, &spaced_us)),
                    1e6 / args.cold_rate.max(1) as f64,
                    ratio.show(2, "x", false)
                );
            }
            if let Some(diff) = paired(&cold_open, p, &p99) {
                println!(
                    "| {p}: p99 open loop {}/s, cold (p50 {:.0} vs {:.0}) | {:.0} µs | {:.0} µs | {} | (info) | |",
                    args.cold_rate,
                    median(each(&cold_open, p, &|m| m.p(0.5))),
                    median(each(&cold_open, NOOP, &|m| m.p(0.5))),
                    median(each(&cold_open, p, &|m| m.p(0.99))),
                    median(each(&cold_open, NOOP, &|m| m.p(0.99))),
                    diff.show(0, " µs", true)
                );
            }
        }
        // Against the decoding no-op (`--decode-baseline`): what a cold Check adds over the no-op,
        // against what a raw decode adds over it inside a server, in the same round.
        for (scenario, label) in [(&cold, "closed loop"), (&cold_open, "open loop")] {
            let in_server = |m: &Measurement, b: &Measurement, d: &Measurement| {
                cpu_added(m, b) / cpu_added(d, b)
            };
            if let Some(ratio) = paired3(scenario, p, &in_server) {
                println!(
                    "| {p}: server CPU a cold Check adds over the no-op, against what {NOOP_DECODE}'s raw decode adds, cold {label} | {:.1} µs | {:.1} µs | {} | (info) | |",
                    median(paired(scenario, p, &cpu_added)),
                    median(paired(scenario, NOOP_DECODE, &cpu_added)),
                    ratio.show(2, "x", false)
                );
            }
        }
        if let Some(ratio) = paired3(&closed, p, &|m, _, d| {
            m.server_us_per_call() / d.server_us_per_call()
        }) {
            println!(
                "| {p}: server CPU per Check, hot, against {NOOP_DECODE} (a decode on every call, no cache) | {:.1} µs | {:.1} µs | {} | (info) | |",
                median(each(&closed, p, &Measurement::server_us_per_call)),
                median(each(&closed, NOOP_DECODE, &Measurement::server_us_per_call)),
                ratio.show(2, "x", false)
            );
        }
        // Every cold row, in the order run: the last one has the most tokens cached.
        let cold_rows = |target: &str| {
            let mut all = of(&cold, target);
            all.extend(of(&cold_open, target));
            all
        };
        if let Some(last) = cold_rows(p).last() {
            let cached: u64 = cold_rows(p).iter().map(|r| r.m.stats.allowed()).sum();
            println!(
                "| {p}: server RSS after the cold runs ({} tokens cached) | {:.1} MiB | {:.1} MiB | | (info) | |",
                cached.min(args.token_cache_entries as u64),
                last.m.rss_kib as f64 / 1024.0,
                cold_rows(NOOP)
                    .last()
                    .map_or(0.0, |r| r.m.rss_kib as f64 / 1024.0)
            );
        }
    }
    // The decoding no-op itself: a raw decode inside a server, against the same decode in a tight
    // loop (and after pauses) on one thread of the load generator.
    for (scenario, label) in [(&cold, "closed loop"), (&cold_open, "open loop")] {
        if let Some(ratio) = paired(scenario, NOOP_DECODE, &added) {
            println!(
                "| {NOOP_DECODE}: server CPU its raw decode adds over the no-op, cold {label} | {:.1} µs | raw decode {:.1} µs (tight loop, same round) | {} | (info) | |",
                median(paired(scenario, NOOP_DECODE, &cpu_added)),
                median(each(scenario, NOOP_DECODE, &raw_us)),
                ratio.show(2, "x", false)
            );
        }
        if let Some(ratio) = paired(scenario, NOOP_DECODE, &spaced) {
            println!(
                "| {NOOP_DECODE}: the same, against the raw decode after a pause of the interval between calls | | raw decode {:.1} µs | {} | (info) | |",
                median(each(scenario, NOOP_DECODE, &spaced_us)),
                ratio.show(2, "x", false)
            );
        }
    }
    envoy_summary(args, rows);
    // Only when the closed-loop scenario ran.
    if let Some(first) = products.first()
        && let (Some(product), Some(noop)) = (
            each(&closed, first, &Measurement::client_us_per_call),
            each(&closed, NOOP, &Measurement::client_us_per_call),
        )
    {
        println!(
            "| load generator CPU per call (closed loop, hot) | {:.1} µs | {:.1} µs | | (info) | |",
            product.median, noop.median
        );
    }
    steal_summary(rows);
}

/// The hypervisor's steal in each scenario (the median and the worst of its measurements), with a
/// warning where a measurement lost more than 5 % of the box: its rounds measured the neighbours too.
fn steal_summary(rows: &[&Row]) {
    let mut scenarios: Vec<&str> = Vec::new();
    for r in rows {
        if !scenarios.contains(&r.scenario.as_str()) {
            scenarios.push(&r.scenario);
        }
    }
    let mut lines = Vec::new();
    for scenario in scenarios {
        let steals = rows
            .iter()
            .filter(|r| r.scenario == scenario)
            .filter_map(|r| r.m.steal)
            .collect();
        let Some(Figure {
            median, max: worst, ..
        }) = Figure::of(steals)
        else {
            continue;
        };
        let warning = if worst > 0.05 {
            "  <- the host took over 5 % of the box: these rounds are not this box's alone"
        } else {
            ""
        };
        lines.push(format!(
            "  {scenario}: median {:.1} %, worst {:.1} %{warning}",
            median * 100.0,
            worst * 100.0
        ));
    }
    if !lines.is_empty() {
        println!(
            "\nCPU steal (the hypervisor's other guests, /proc/stat) during the measurements:"
        );
        for line in lines {
            println!("{line}");
        }
    }
}

fn yes(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

// ---------------------------------------------------------------------------------------------------
// The `envoy` scenario: what the ext_authz hop adds to a request through a real Envoy.
//
// One Envoy per target (the no-op and each product), one listener, two routes to the same upstream
// (an HTTP server in this process answering 200 at once): `/authz/…` runs the ext_authz filter against
// the target, `/direct/…` has it disabled per route. Same Envoy, same connection manager, same request
// (with its bearer token) on both, and the two routes' requests interleaved in time: the difference
// between the two routes is the ext_authz hop.

const ENVOY_AUTHZ_PATH: &str = "/authz/orders/42";
const ENVOY_DIRECT_PATH: &str = "/direct/orders/42";

fn envoy_bootstrap(authz: SocketAddr, upstream: SocketAddr) -> String {
    format!(
        r#"admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: 0 }}
static_resources:
  listeners:
  - name: ingress
    address:
      socket_address: {{ address: 127.0.0.1, port_value: 0 }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/direct/" }}
                route: {{ cluster: upstream }}
                typed_per_filter_config:
                  envoy.filters.http.ext_authz:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
                    disabled: true
              - match: {{ prefix: "/authz/" }}
                route: {{ cluster: upstream }}
          http_filters:
          - name: envoy.filters.http.ext_authz
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
              transport_api_version: V3
              failure_mode_allow: false
              grpc_service:
                envoy_grpc: {{ cluster_name: ext_authz }}
                timeout: 1s
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: ext_authz
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
    load_assignment:
      cluster_name: ext_authz
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: {authz_ip}, port_value: {authz_port} }}
  - name: upstream
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: {upstream_ip}, port_value: {upstream_port} }}
"#,
        authz_ip = authz.ip(),
        authz_port = authz.port(),
        upstream_ip = upstream.ip(),
        upstream_port = upstream.port(),
    )
}

/// A running Envoy, stopped when dropped.
struct EnvoyProcess {
    child: Child,
    listener: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for EnvoyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn envoy_bin(args: &Args) -> PathBuf {
    if let Some(p) = &args.envoy_bin {
        return p.clone();
    }
    if let Some(p) = std::env::var_os("S2S_ENVOY").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools/venv/bin/envoy")
}

async fn start_envoy(
    bin: &std::path::Path,
    authz: SocketAddr,
    upstream: SocketAddr,
) -> EnvoyProcess {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("envoy.yaml");
    let admin_path = dir.path().join("admin-address");
    let log_path = dir.path().join("envoy.log");
    std::fs::write(&config, envoy_bootstrap(authz, upstream)).unwrap();
    let log = std::fs::File::create(&log_path).unwrap();
    let child = Command::new(bin)
        .arg("-c")
        .arg(&config)
        .arg("--admin-address-path")
        .arg(&admin_path)
        .args([
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "-l",
            "warning",
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
    let mut envoy = EnvoyProcess {
        child,
        listener: "127.0.0.1:0".parse().unwrap(),
        _dir: dir,
    };
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    loop {
        if let Ok(Some(status)) = envoy.child.try_wait() {
            panic!("Envoy exited ({status}):\n{}", log());
        }
        assert!(Instant::now() < deadline, "Envoy did not start:\n{}", log());
        let admin = std::fs::read_to_string(&admin_path).unwrap_or_default();
        if let Ok(admin) = admin.trim().parse::<SocketAddr>()
            && let Ok(r) = client
                .get(format!("http://{admin}/listeners?format=json"))
                .send()
                .await
            && let Ok(body) = r.bytes().await
            && let Ok(listeners) = serde_json::from_slice::<serde_json::Value>(&body)
            && let Some(port) = listeners["listener_statuses"]
                .as_array()
                .and_then(|l| l.iter().find(|l| l["name"] == "ingress"))
                .and_then(|l| l["local_address"]["socket_address"]["port_value"].as_u64())
        {
            envoy.listener = SocketAddr::from(([127, 0, 0, 1], u16::try_from(port).unwrap()));
            return envoy;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The upstream behind Envoy: 200 at once, to every request.
async fn start_upstream() -> SocketAddr {
    use axum::serve::ListenerExt as _;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let router = axum::Router::new().fallback(|| async { "ok" });
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    addr
}

async fn http_get(client: &reqwest::Client, url: &str, authorization: &str) -> Result<u16, String> {
    match client
        .get(url)
        .header("authorization", authorization)
        .send()
        .await
    {
        Ok(r) => {
            let status = r.status().as_u16();
            r.bytes().await.map_err(|e| format!("{e}"))?;
            Ok(status)
        }
        Err(e) => Err(if e.is_timeout() {
            "timeout".to_owned()
        } else {
            "error".to_owned()
        }),
    }
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .http1_only()
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Closed loop, one request in flight, alternating between the two routes (`urls[0]`, `urls[1]`), each
/// on its own connection (`clients[0]`, `clients[1]`, warmed up): both routes see the same machine at
/// the same time, so the difference between them is the ext_authz hop and not a change in the
/// neighbours' load.
async fn http_closed1_pair(
    clients: &[reqwest::Client],
    urls: [&str; 2],
    authorization: &str,
    duration: Duration,
) -> [Stats; 2] {
    let deadline = Instant::now() + duration;
    let mut stats = [Stats::new(), Stats::new()];
    let mut i = 0;
    while Instant::now() < deadline {
        let sent = Instant::now();
        let result = http_get(&clients[i % 2], urls[i % 2], authorization).await;
        stats[i % 2].record_http(&result, sent.elapsed().as_nanos() as u64);
        i += 1;
    }
    stats
}

/// Open loop through Envoy at `rate` requests/s per route, the two routes interleaved (request `i` goes
/// to `urls[i % 2]`); latency from each request's intended send time, as in `open_loop`.
async fn http_open_pair(
    client: &reqwest::Client,
    urls: [&str; 2],
    authorization: &str,
    rate: u64,
    duration: Duration,
) -> [Stats; 2] {
    let client = client.clone();
    let total = (2.0 * rate as f64 * duration.as_secs_f64()).round() as u64;
    let stats = Arc::new(Mutex::new([Stats::new(), Stats::new()]));
    let done = Arc::new(AtomicU64::new(0));
    let all_done = Arc::new(tokio::sync::Notify::new());
    let handle = tokio::runtime::Handle::current();
    let (s, d, n) = (stats.clone(), done.clone(), all_done.clone());
    let urls = urls.map(str::to_owned);
    let authorization = authorization.to_owned();
    let pacer = std::thread::spawn(move || {
        let interval = Duration::from_secs_f64(1.0 / (2.0 * rate as f64));
        let start = Instant::now() + Duration::from_millis(5);
        for i in 0..total {
            let intended = start + interval.mul_f64(i as f64);
            let now = Instant::now();
            if intended > now {
                std::thread::sleep(intended - now);
            }
            let route = (i % 2) as usize;
            let (client, url, authorization) =
                (client.clone(), urls[route].clone(), authorization.clone());
            let (s, d, n) = (s.clone(), d.clone(), n.clone());
            handle.spawn(async move {
                let sent = Instant::now();
                let result = http_get(&client, &url, &authorization).await;
                let finished = Instant::now();
                {
                    let mut stats = s.lock().unwrap();
                    stats[route].record_http(&result, (finished - intended).as_nanos() as u64);
                    stats[route].lag_ns.saturating_record(
                        (sent.saturating_duration_since(intended)).as_nanos().max(1) as u64,
                    );
                }
                if d.fetch_add(1, Ordering::AcqRel) + 1 == total {
                    n.notify_one();
                }
            });
        }
    });
    let waited =
        tokio::time::timeout(duration + Duration::from_secs(30), all_done.notified()).await;
    let _ = tokio::task::spawn_blocking(move || pacer.join()).await;
    if waited.is_err() {
        eprintln!("  warning: not every open-loop request completed in time");
    }
    let mut guard = stats.lock().unwrap();
    std::mem::replace(&mut *guard, [Stats::new(), Stats::new()])
}

/// Runs the `envoy` scenarios for every target; rows are named `envoy … direct|authz`.
async fn envoy_scenarios(
    args: &Args,
    targets: &[Target],
    hot: &[String],
    duration: Duration,
    rows: &mut Vec<Row>,
) {
    let bin = envoy_bin(args);
    let upstream = start_upstream().await;
    let authorization = format!("Bearer {}", hot[0]);
    for t in targets {
        let envoy = start_envoy(&bin, t.addr, upstream).await;
        println!(
            "\n== through Envoy ({}), ext_authz against {} ({:.0} s each)",
            envoy.listener, t.name, args.duration
        );
        let mut loads: Vec<(String, Option<u64>)> = vec![("1 conn x 1 in flight".to_owned(), None)];
        loads.extend(
            args.envoy_rates
                .iter()
                .map(|r| (format!("open loop {r}/s"), Some(*r))),
        );
        for (load, rate) in &loads {
            let urls = [ENVOY_DIRECT_PATH, ENVOY_AUTHZ_PATH]
                .map(|p| format!("http://{}{p}", envoy.listener));
            let urls = [urls[0].as_str(), urls[1].as_str()];
            // The closed loop puts each route on its own connection; the open loop shares one pool.
            let clients = match rate {
                None => vec![http_client(), http_client()],
                Some(_) => vec![http_client()],
            };
            // Warm-up, outside the window: the connections to Envoy, and Envoy's to the upstream and
            // the ext_authz server.
            for _ in 0..20 {
                for (i, url) in urls.iter().enumerate() {
                    let _ = http_get(&clients[i % clients.len()], url, &authorization).await;
                }
            }
            tokio::task::block_in_place(|| hook(args.before_measure.as_deref(), t.pid));
            let window = Window::start(t.pid);
            let pair = match rate {
                None => http_closed1_pair(&clients, urls, &authorization, duration).await,
                Some(r) => http_open_pair(&clients[0], urls, &authorization, *r, duration).await,
            };
            let (elapsed, server_cpu, steal) = window.finish();
            tokio::task::block_in_place(|| hook(args.after_measure.as_deref(), t.pid));
            for (route, stats) in ["direct", "authz"].into_iter().zip(pair) {
                let row = Row {
                    scenario: format!("envoy {load} {route}"),
                    target: t.name.clone(),
                    round: 0,
                    m: Measurement {
                        elapsed,
                        // All of the target's CPU is the ext_authz route's: the other never reaches it.
                        server_cpu: if route == "authz" { server_cpu } else { 0.0 },
                        client_cpu: 0.0,
                        rss_kib: rss_kib(t.pid),
                        rss_series: Vec::new(),
                        raw_decode: None,
                        raw_spaced: None,
                        cache: None,
                        steal,
                        stats,
                    },
                };
                println!("  {load}, {route} route:");
                print_row(&row);
                rows.push(row);
            }
        }
    }
}

fn envoy_summary(args: &Args, rows: &[&Row]) {
    let find = |scenario: &str, target: &str| {
        rows.iter()
            .find(|r| r.scenario == scenario && r.target == target)
            .map(|r| &r.m)
    };
    let mut targets: Vec<&str> = Vec::new();
    for r in rows.iter().filter(|r| r.scenario.starts_with("envoy ")) {
        if !targets.contains(&r.target.as_str()) {
            targets.push(&r.target);
        }
    }
    if targets.is_empty() {
        return;
    }
    println!(
        "\n== The ext_authz hop through Envoy: route with the filter minus the same route without it, same Envoy, same run"
    );
    println!("| figure | ext_authz route | filter disabled | added by the hop |");
    println!("|---|---|---|---|");
    let mut loads = vec!["1 conn x 1 in flight".to_owned()];
    loads.extend(args.envoy_rates.iter().map(|r| format!("open loop {r}/s")));
    for t in targets {
        for load in &loads {
            let (Some(a), Some(d)) = (
                find(&format!("envoy {load} authz"), t),
                find(&format!("envoy {load} direct"), t),
            ) else {
                continue;
            };
            for (label, q) in [("p50", 0.5), ("p99", 0.99)] {
                println!(
                    "| {t}: {label}, {load} | {:.0} µs | {:.0} µs | {:+.0} µs |",
                    a.p(q),
                    d.p(q),
                    a.p(q) - d.p(q)
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// The `kidflood` scenario: what a burst of unknown `kid`s costs valid traffic.
//
// Per product and round, valid traffic (closed loop, 1 connection x 1 in flight, the hot pool) is
// measured three ways: alone for `--duration`; for as long as a burst of `--flood-requests` Check calls
// with random unknown kids lasts (on connections of their own, `--concurrency` in flight); and for as
// long as a burst of as many valid hot calls lasts, the control. On a shared 2-vCPU box any burst takes
// CPU from the valid traffic; the control says how much of the slow-down is just that.

/// A hot token's claims and signature under a header naming a random kid: what an attacker replaying
/// a token, or a misconfigured client, sends. The kid is looked up before the signature is checked.
fn unknown_kid_tokens(template: &str, n: usize) -> Vec<String> {
    use base64::Engine as _;
    let (_, rest) = template.split_once('.').unwrap();
    (0..n)
        .map(|_| {
            let header = serde_json::json!({
                "alg": "RS256",
                "typ": "JWT",
                "kid": uuid::Uuid::new_v4().simple().to_string(),
            });
            let header =
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(header.to_string());
            format!("{header}.{rest}")
        })
        .collect()
}

/// Valid traffic: one call in flight on `client` until `stop` is set.
async fn valid_until(
    mut client: Checker,
    source: Arc<Source>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Stats {
    let mut stats = Stats::new();
    while !stop.load(Ordering::Acquire) {
        let Some(request) = source.next() else { break };
        let sent = Instant::now();
        let result = client.check(request).await;
        stats.record(&result, sent.elapsed().as_nanos() as u64);
    }
    stats
}

struct FloodRun {
    /// The valid traffic; its `server_cpu` is the server's whole CPU time, burst included.
    valid: Measurement,
    /// The burst's own calls (empty when measured alone).
    burst: Stats,
    jwks_fetches: u64,
}

impl FloodRun {
    /// Server CPU per call, over the valid calls and the burst's.
    fn cpu_per_call_us(&self) -> f64 {
        self.valid.server_cpu * 1e6 / (self.valid.stats.calls() + self.burst.calls()).max(1) as f64
    }
}

/// Valid traffic alone (`burst` is `None`) or during a burst of `burst` tokens sent once each.
async fn flood_run(
    args: &Args,
    target: &Target,
    dev: &DevIssuer,
    hot: &[String],
    burst: Option<&[String]>,
    duration: Duration,
) -> FloodRun {
    let valid_client = connect(target.addr, 1).await.remove(0);
    let burst_clients = connect(target.addr, args.connections).await;
    for c in burst_clients.iter().chain([&valid_client]) {
        let _ = c.clone().check(encoded_request(&hot[0])).await;
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let fetches = dev.jwks_fetches();
    let window = Window::start(target.pid);
    let valid = tokio::spawn(valid_until(
        valid_client,
        Source::new(hot, true),
        stop.clone(),
    ));
    let burst_stats = match burst {
        Some(tokens) => {
            closed_loop(
                &burst_clients,
                args.concurrency,
                Source::new(tokens, false),
                // Ends when the burst's tokens run out; the bound only guards against a stall.
                Duration::from_secs(600),
            )
            .await
        }
        None => {
            tokio::time::sleep(duration).await;
            Stats::new()
        }
    };
    stop.store(true, Ordering::Release);
    let stats = valid.await.unwrap();
    let (elapsed, server_cpu, steal) = window.finish();
    FloodRun {
        valid: Measurement {
            stats,
            elapsed,
            server_cpu,
            client_cpu: 0.0,
            rss_kib: rss_kib(target.pid),
            rss_series: Vec::new(),
            raw_decode: None,
            raw_spaced: None,
            cache: None,
            steal,
        },
        burst: burst_stats,
        jwks_fetches: dev.jwks_fetches() - fetches,
    }
}

async fn kidflood_scenarios(
    args: &Args,
    targets: &[Target],
    dev: &DevIssuer,
    hot: &[String],
    duration: Duration,
) {
    let n = args.flood_requests.max(1);
    let control: Vec<String> = hot.iter().cycle().take(n).cloned().collect();
    let rounds = args.rounds.max(1);
    // Each product and round gets kids of its own, so no burst repeats one the product has seen.
    let mut results: Vec<(String, usize, [FloodRun; 3])> = Vec::new();
    for t in targets.iter().filter(|t| !is_baseline(&t.name)) {
        println!(
            "\n== kidflood against {}: valid traffic, 1 conn x 1 in flight, alone and during bursts of {n} \
             calls ({} conn x {} in flight)",
            t.name, args.connections, args.concurrency
        );
        for round in 0..rounds {
            let unknown = unknown_kid_tokens(&hot[0], n);
            let alone = flood_run(args, t, dev, hot, None, duration).await;
            let flood = flood_run(args, t, dev, hot, Some(&unknown), duration).await;
            let controlled = flood_run(args, t, dev, hot, Some(&control), duration).await;
            for (what, run) in [
                ("alone", &alone),
                ("during unknown-kid burst", &flood),
                ("during valid burst", &controlled),
            ] {
                let m = &run.valid;
                println!(
                    "  r{} {what:<25} valid {:>6.0} calls/s  p50 {:>7.1}  p90 {:>7.1}  p99 {:>7.1} µs  \
                     server {:>5.1} µs CPU per call (valid and burst)  grpc {:?}  decisions {:?}",
                    round + 1,
                    m.throughput(),
                    m.p(0.5),
                    m.p(0.9),
                    m.p(0.99),
                    run.cpu_per_call_us(),
                    m.stats.grpc,
                    m.stats.decisions,
                );
                if !run.burst.grpc.is_empty() {
                    println!(
                        "     burst: {} calls in {:.2} s ({:.0}/s), grpc {:?}, decisions {:?}, {} JWKS fetches",
                        run.burst.calls(),
                        m.elapsed.as_secs_f64(),
                        run.burst.calls() as f64 / m.elapsed.as_secs_f64(),
                        run.burst.grpc,
                        run.burst.decisions,
                        run.jwks_fetches
                    );
                }
            }
            results.push((t.name.clone(), round, [alone, flood, controlled]));
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    println!(
        "\n== Valid traffic during a burst of {n} calls, against the same traffic alone, same run (median of \
         per-round factors, with their range)"
    );
    println!(
        "| target | figure | alone | during {n} unknown kids | vs alone | during {n} valid calls (control) | vs alone | unknown kids vs control |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut names: Vec<&str> = results.iter().map(|(n, _, _)| n.as_str()).collect();
    names.dedup();
    for name in names {
        let runs: Vec<&[FloodRun; 3]> = results
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, _, r)| r)
            .collect();
        let figures: [(&str, &FloodFigure, &str); 4] = [
            ("valid throughput", &|r| r.valid.throughput(), "/s"),
            ("valid p50", &|r| r.valid.p(0.5), " µs"),
            ("valid p99", &|r| r.valid.p(0.99), " µs"),
            (
                "server CPU per call, valid and burst",
                &FloodRun::cpu_per_call_us,
                " µs",
            ),
        ];
        for (label, f, unit) in figures {
            let value = |i: usize| {
                Figure::of(runs.iter().map(|r| f(&r[i])).collect()).map_or(f64::NAN, |f| f.median)
            };
            let factor = |i: usize, of: usize| {
                Figure::of(runs.iter().map(|r| f(&r[i]) / f(&r[of])).collect())
                    .map_or_else(String::new, |f| f.show(2, "x", false))
            };
            println!(
                "| {name} | {label} | {:.1}{unit} | {:.1}{unit} | {} | {:.1}{unit} | {} | {} |",
                value(0),
                value(1),
                factor(1, 0),
                value(2),
                factor(2, 0),
                factor(1, 2)
            );
        }
        let fetches: Vec<u64> = runs.iter().map(|r| r[1].jwks_fetches).collect();
        let refused: u64 = runs
            .iter()
            .map(|r| r[1].burst.calls() - r[1].burst.decisions.get(&16).copied().unwrap_or(0))
            .sum();
        println!("| {name} | JWKS fetches during each unknown-kid burst | | {fetches:?} | | | | |");
        println!(
            "| {name} | unknown-kid calls not denied UNAUTHENTICATED (KEY_NOT_FOUND) | | {refused} | | | | |"
        );
    }
}

/// A figure read off one run (throughput, a latency quantile, CPU per call).
type FloodFigure = dyn Fn(&FloodRun) -> f64;
