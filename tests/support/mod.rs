//! Test harness shared by the black-box tests: finds the external clients (grpcurl, Envoy), starts the real
//! `s2s-authz` binary on loopback with every port 0, gets tokens from its development issuer, and kills
//! every process it started when the test ends (also on panic).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

pub mod pki;
mod prom;

pub use prom::metric;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long anything may take to become ready before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);
/// How often conditions are polled.
const POLL: Duration = Duration::from_millis(25);

/// The development issuer's tenant (deploy/local/s2s-authz.yaml).
pub const TENANT: &str = "3f6b2a1e-8c4d-4e5f-9a7b-1c2d3e4f5a6b";
/// The protected API's Application ID URI.
pub const AUDIENCE: &str = "api://b7e3c1a2-4d5e-4f60-8a9b-0c1d2e3f4a5b";

/// A client of the development issuer.
#[derive(Clone, Copy, Debug)]
pub struct DevClient {
    pub entry_name: &'static str,
    pub client_id: &'static str,
    pub secret: &'static str,
    pub object_id: &'static str,
}

/// On the allowlist, holds the app role, gets v2 tokens: allowed.
pub const ORDERS: DevClient = DevClient {
    entry_name: "orders-service",
    client_id: "6a1f0c2b-3d4e-4f5a-8b6c-7d8e9f0a1b2c",
    secret: "dev-secret-orders",
    object_id: "9c8b7a6f-5e4d-4c3b-8a29-1f0e9d8c7b6a",
};
/// On the allowlist, holds the app role, gets v1 tokens: allowed.
pub const LEGACY_REPORTS: DevClient = DevClient {
    entry_name: "legacy-reports",
    client_id: "2e4d6c8a-0b1c-4d2e-9f3a-5b6c7d8e9f01",
    secret: "dev-secret-reports",
    object_id: "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d",
};
/// On the allowlist without the app role: ROLE_MISSING.
pub const BILLING: DevClient = DevClient {
    entry_name: "billing-service",
    client_id: "8b9c0d1e-2f30-4a41-b5c6-d7e8f9a0b1c2",
    secret: "dev-secret-billing",
    object_id: "7f6e5d4c-3b2a-4918-8776-655443322110",
};
/// Not on the allowlist: APPLICATION_NOT_ALLOWED.
pub const STRANGER: DevClient = DevClient {
    entry_name: "",
    client_id: "4d5e6f70-8192-4a3b-9c4d-5e6f7a8b9c0d",
    secret: "dev-secret-stranger",
    object_id: "0f1e2d3c-4b5a-4968-8776-5a4b3c2d1e0f",
};
pub const ALL_CLIENTS: [DevClient; 4] = [ORDERS, LEGACY_REPORTS, BILLING, STRANGER];
/// Not on the allowlist, holds the admin app role `S2SAuthz.Admin`: may call the admin port.
pub const ADMIN: DevClient = DevClient {
    entry_name: "",
    client_id: "5a6b7c8d-9e0f-4a1b-8c2d-3e4f5a6b7c8d",
    secret: "dev-secret-admin",
    object_id: "6b7c8d9e-0f1a-4b2c-9d3e-4f5a6b7c8d9e",
};

// ---------------------------------------------------------------------------------------------------------
// External tools

/// Finds an external tool: `$<env_var>`, else `<repo>/.tools/venv/bin/<name>` (installed by `scripts/test`),
/// else `PATH`. When it is missing, a test either fails (`S2S_E2E_REQUIRED=1`, as `scripts/test` sets) or
/// prints a SKIP line and gets `None` (then it returns early).
pub fn find_tool(name: &str, env_var: &str, test: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(env_var).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        if is_executable(&path) {
            return Some(path);
        }
        return missing(
            name,
            test,
            &format!("{env_var}={} is not an executable", path.display()),
        );
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".tools/venv/bin")
        .join(name);
    if is_executable(&venv) {
        return Some(venv);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if is_executable(&candidate) {
                return Some(candidate);
            }
        }
    }
    missing(
        name,
        test,
        &format!("not found via {env_var}, .tools/venv/bin or PATH"),
    )
}

fn missing(name: &str, test: &str, why: &str) -> Option<PathBuf> {
    if std::env::var("S2S_E2E_REQUIRED").as_deref() == Ok("1") {
        panic!(
            "`{name}` is required ({why}); run `scripts/test`, which installs it into .tools/venv"
        );
    }
    eprintln!("SKIP {test}: `{name}` {why}; run `scripts/test` to install it");
    None
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// grpcurl 1.8.6 (reflection v1alpha only), run against plaintext loopback ports.
#[derive(Clone, Debug)]
pub struct Grpcurl {
    pub path: PathBuf,
}

/// What a grpcurl run returned.
#[derive(Debug)]
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Parses stdout as one JSON document.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("grpcurl stdout is not JSON ({e}): {self:?}"))
    }
}

impl Grpcurl {
    /// `None` (after printing SKIP) when grpcurl is not installed and not required.
    pub fn find(test: &str) -> Option<Self> {
        find_tool("grpcurl", "S2S_GRPCURL", test).map(|path| Grpcurl { path })
    }

    /// Runs `grpcurl -plaintext -max-time 20 <args>`.
    pub fn run(&self, args: &[&str]) -> Output {
        let output = Command::new(&self.path)
            .args(["-plaintext", "-max-time", "20"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", self.path.display()));
        Output {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Calls a unary method with a JSON request and returns the JSON response; fails on any gRPC error.
    pub fn call(
        &self,
        addr: SocketAddr,
        method: &str,
        request: &serde_json::Value,
    ) -> serde_json::Value {
        let out = self.run(&["-d", &request.to_string(), &addr.to_string(), method]);
        assert!(out.success(), "grpcurl {method} failed: {out:?}");
        out.json()
    }

    /// `grpcurl list [service]`: one name a line.
    pub fn list(&self, addr: SocketAddr, service: Option<&str>) -> Vec<String> {
        let mut args = vec![addr.to_string(), "list".to_owned()];
        args.extend(service.map(str::to_owned));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.run(&args);
        assert!(out.success(), "grpcurl list failed: {out:?}");
        out.stdout
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// `s2sauthz.v1.Authorizer/Decide` with just a token.
    pub fn decide(&self, addr: SocketAddr, token: &str) -> serde_json::Value {
        self.call(
            addr,
            "s2sauthz.v1.Authorizer/Decide",
            &serde_json::json!({ "token": token }),
        )
    }
}

// ---------------------------------------------------------------------------------------------------------
// Processes

/// A child process that is killed (and reaped) when dropped.
pub struct ChildGuard {
    child: Option<Child>,
    what: String,
}

impl ChildGuard {
    pub fn new(child: Child, what: impl Into<String>) -> Self {
        ChildGuard {
            child: Some(child),
            what: what.into(),
        }
    }

    pub fn id(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or_default()
    }

    /// Sends a signal by name (`TERM`, `HUP`, …) with the `kill` command.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.id().to_string())
            .status()
            .unwrap_or_else(|e| panic!("running kill: {e}"));
        assert!(status.success(), "kill -{signal} {} failed", self.what);
    }

    /// The exit status once the process has exited; `None` while it runs.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        child
            .try_wait()
            .unwrap_or_else(|e| panic!("waiting for {}: {e}", self.what))
    }

    /// Waits for the process to exit; `None` if it still runs after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// Polls `condition` until it returns `Some`, failing the test after `DEADLINE`.
pub fn poll<T>(what: &str, mut condition: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = condition() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {DEADLINE:?} waiting for {what}"
        );
        std::thread::sleep(POLL);
    }
}

/// The repository's development configuration with every listener on `127.0.0.1:0`.
pub fn dev_config() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/local/s2s-authz.yaml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut seen = Vec::new();
    let mut out = String::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        let key = ["grpc_addr:", "admin_addr:", "metrics_addr:", "addr:"]
            .into_iter()
            .find(|k| trimmed.starts_with(k));
        match key {
            Some(key) => {
                seen.push(key);
                out.push_str(&format!("{indent}{key} 127.0.0.1:0\n"));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    for key in ["grpc_addr:", "admin_addr:", "metrics_addr:", "addr:"] {
        assert!(
            seen.contains(&key),
            "deploy/local/s2s-authz.yaml has no `{key}` to move to port 0"
        );
    }
    out
}

/// Sets `enabled: false` on the app entry `name` of a configuration in the layout of the development one.
pub fn disable_entry(config: &str, name: &str) -> String {
    let marker = format!("- name: {name}");
    let mut out = String::new();
    let mut done = false;
    for line in config.lines() {
        out.push_str(line);
        out.push('\n');
        if !done && line.trim_start() == marker {
            let indent = line.len() - line.trim_start().len() + 2;
            out.push_str(&format!("{}enabled: false\n", " ".repeat(indent)));
            done = true;
        }
    }
    assert!(done, "no app entry `{name}` in the configuration");
    out
}

/// Adds `line` under the app entry `name` of a configuration in the layout of the development one.
pub fn add_to_entry(config: &str, name: &str, line: &str) -> String {
    let marker = format!("- name: {name}");
    let mut out = String::new();
    let mut done = false;
    for l in config.lines() {
        out.push_str(l);
        out.push('\n');
        if !done && l.trim_start() == marker {
            let indent = l.len() - l.trim_start().len() + 2;
            out.push_str(&format!("{}{line}\n", " ".repeat(indent)));
            done = true;
        }
    }
    assert!(done, "no app entry `{name}` in the configuration");
    out
}

/// The `s2s-authz` binary.
pub fn binary() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_s2s-authz"));
    // Settings from the environment running the tests must not leak into the sidecar.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if key.starts_with("S2S_AUTHZ_")
            || key.starts_with("OTEL_")
            || key.starts_with("ServiceAuth")
            || key == "ServiceObjectIds"
            || key == "ServiceApplicationIds"
        {
            cmd.env_remove(key);
        }
    }
    cmd.env("RUST_LOG", "info");
    cmd
}

/// Runs `s2s-authz serve --config <file>` to completion (it is expected to exit on its own).
pub fn run_to_exit(config: &Path) -> (ExitStatus, String) {
    let child = binary()
        .args(["serve", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting s2s-authz: {e}"));
    let mut guard = ChildGuard::new(child, "s2s-authz");
    let mut stderr = guard
        .child
        .as_mut()
        .and_then(|c| c.stderr.take())
        .expect("stderr is piped");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let status = guard
        .wait_exit(DEADLINE)
        .unwrap_or_else(|| panic!("s2s-authz did not exit within {DEADLINE:?}"));
    let text = reader.join().expect("stderr reader");
    (status, text)
}

/// A running `s2s-authz serve` with its development issuer, all on loopback with discovered ports.
pub struct Sidecar {
    pub process: ChildGuard,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// The embedded development issuer; `None` when the configuration has no `dev_issuer` (the test
    /// runs its own issuer and points `auth.instance` at it).
    pub issuer_addr: Option<SocketAddr>,
    /// The configuration file in use; edit it and `signal("HUP")` to reload.
    pub config_path: PathBuf,
    logs: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Sidecar {
    /// Starts the binary with the development configuration (ports 0) and waits until it is ready.
    pub fn start() -> Self {
        Self::start_with_config(&dev_config())
    }

    /// Starts the binary with `config` (which must use port 0) and waits until ready.
    pub fn start_with_config(config: &str) -> Self {
        Self::start_with(config, &Options::default())
    }

    /// Starts the binary with `config` and waits only until it has announced its listeners.
    pub fn spawn(config: &str) -> Self {
        Self::spawn_with(config, &Options::default())
    }

    /// `start_with_config` with other options (log format, environment).
    pub fn start_with(config: &str, options: &Options) -> Self {
        let sidecar = Self::spawn_with(config, options);
        poll("/readyz to answer 200 (signing keys loaded)", || {
            (http_get(sidecar.metrics_addr, "/readyz").map(|(status, _)| status) == Some(200))
                .then_some(())
        });
        sidecar
    }

    /// `spawn` with other options (log format, environment).
    pub fn spawn_with(config: &str, options: &Options) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("s2s-authz.yaml");
        // A registry store of its own, unless the test chose one: the default (./s2s-authz-data) would
        // be shared by every test that runs the binary, and one test's entries would decide another's.
        let config = if config.lines().any(|l| l.starts_with("data_dir:")) {
            config.to_owned()
        } else {
            format!("data_dir: {}\n{config}", dir.path().join("data").display())
        };
        std::fs::write(&config_path, &config).expect("writing the configuration");
        let format = options.log_format;
        let child = binary()
            .args(["serve", "--log-format", format.as_str(), "--config"])
            .arg(&config_path)
            .envs(options.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting s2s-authz: {e}"));
        let mut process = ChildGuard::new(child, "s2s-authz");
        let stderr = process
            .child
            .as_mut()
            .and_then(|c| c.stderr.take())
            .expect("stderr is piped");

        // Drain stderr for the life of the process; hand the lines to the startup wait as well.
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel::<serde_json::Value>();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(json) = parse_log_line(&line, format) {
                    let _ = tx.send(json);
                }
                sink.lock().unwrap().push(line);
            }
        });

        let deadline = Instant::now() + DEADLINE;
        let wants_issuer = config.lines().any(|l| l.starts_with("dev_issuer:"));
        let (mut issuer, mut listening) = (None, None);
        while (wants_issuer && issuer.is_none()) || listening.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(line) => line,
                Err(e) => panic!(
                    "s2s-authz did not announce its listeners ({e}); exit: {:?}; stderr:\n{}",
                    process.try_wait(),
                    logs.lock().unwrap().join("\n")
                ),
            };
            let fields = &line["fields"];
            match fields["message"].as_str() {
                Some("dev issuer listening") => issuer = Some(parse_addr(fields, "addr")),
                Some("s2s-authz listening") => {
                    listening = Some((
                        parse_addr(fields, "grpc_addr"),
                        parse_addr(fields, "admin_addr"),
                        parse_addr(fields, "metrics_addr"),
                    ))
                }
                _ => {}
            }
        }
        let (grpc_addr, admin_addr, metrics_addr) = listening.expect("listening line");
        Sidecar {
            process,
            grpc_addr,
            admin_addr,
            metrics_addr,
            issuer_addr: issuer,
            config_path,
            logs,
            _dir: dir,
        }
    }

    /// Sends a signal (`TERM`, `HUP`, …) to the process.
    pub fn signal(&self, signal: &str) {
        self.process.signal(signal);
    }

    /// Waits for the process to exit; `None` if it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.process.wait_exit(timeout)
    }

    /// Every stderr line so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Every log record so far, parsed (see `parse_log_line`), in the format the process was started with.
    pub fn records(&self, format: LogFormat) -> Vec<serde_json::Value> {
        self.logs()
            .iter()
            .filter_map(|l| parse_log_line(l, format))
            .collect()
    }

    /// Waits until a stderr line contains every one of `texts`, and returns it.
    pub fn wait_for_log(&self, texts: &[&str]) -> String {
        poll(&format!("a log line containing {texts:?}"), || {
            self.logs
                .lock()
                .unwrap()
                .iter()
                .find(|l| texts.iter().all(|t| l.contains(t)))
                .cloned()
        })
    }

    /// `http://127.0.0.1:PORT/`: the development issuer's authority host.
    pub fn issuer_url(&self) -> String {
        let addr = self
            .issuer_addr
            .expect("this sidecar runs the development issuer");
        format!("http://{addr}/")
    }

    /// Gets an access token for `client` from the development issuer's token endpoint
    /// (client-credentials grant, `scope=<audience>/.default`).
    pub fn token(&self, client: &DevClient) -> String {
        let url = format!("{}{TENANT}/oauth2/v2.0/token", self.issuer_url());
        let scope = format!("{AUDIENCE}/.default");
        let form = form_body(&[
            ("grant_type", "client_credentials"),
            ("client_id", client.client_id),
            ("client_secret", client.secret),
            ("scope", &scope),
        ]);
        let (status, body) = block_on(async move {
            let response = http_client()
                .post(&url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(form)
                .send()
                .await
                .unwrap_or_else(|e| panic!("POST {url}: {e}"));
            let status = response.status().as_u16();
            (status, response.text().await.expect("token response body"))
        });
        assert_eq!(status, 200, "token endpoint refused {client:?}: {body}");
        let json: serde_json::Value = serde_json::from_str(&body).expect("token response is JSON");
        assert_eq!(json["token_type"], "Bearer", "{json}");
        json["access_token"]
            .as_str()
            .expect("access_token")
            .to_owned()
    }
}

/// The sidecar's `--log-format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Json,
    Text,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Json => "json",
            LogFormat::Text => "text",
        }
    }
}

/// How to start a sidecar, besides its configuration.
#[derive(Clone, Debug, Default)]
pub struct Options {
    pub log_format: LogFormat,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
}

/// One log line as JSON, in the shape of the JSON format (`timestamp`, `level`, `target`, and `fields`
/// with `message`). A text line (`<time> <LEVEL> <target>: <message> k=v k="v" …`, values quoted when the
/// code logged a string) is parsed into the same shape, its values as strings. `None` for lines that are
/// not log records.
pub fn parse_log_line(line: &str, format: LogFormat) -> Option<serde_json::Value> {
    match format {
        LogFormat::Json => serde_json::from_str(line).ok(),
        LogFormat::Text => {
            let (timestamp, rest) = line.split_once(' ')?;
            let (level, rest) = rest.trim_start().split_once(' ')?;
            let (target, rest) = rest.trim_start().split_once(": ")?;
            let (message, mut pairs) = split_message(rest);
            let mut fields = serde_json::Map::new();
            fields.insert("message".to_owned(), message.into());
            while let Some((key, value, after)) = next_pair(pairs) {
                fields.insert(key, value.into());
                pairs = after;
            }
            Some(serde_json::json!({
                "timestamp": timestamp,
                "level": level,
                "target": target,
                "fields": fields,
            }))
        }
    }
}

/// The message of a text record and the `k=v` pairs after it: the message ends at the first space
/// that is followed by `word=`.
fn split_message(rest: &str) -> (&str, &str) {
    let mut at = 0;
    while let Some(i) = rest[at..].find(' ') {
        let start = at + i + 1;
        let word: String = rest[start..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '.')
            .collect();
        if !word.is_empty() && rest[start + word.len()..].starts_with('=') {
            return (&rest[..at + i], &rest[start..]);
        }
        at = start;
    }
    (rest, "")
}

/// The next `key=value` or `key="value"` of a text record, with what follows it.
fn next_pair(text: &str) -> Option<(String, String, &str)> {
    let text = text.trim_start();
    let (key, after) = text.split_once('=')?;
    if let Some(quoted) = after.strip_prefix('"') {
        let mut value = String::new();
        let mut chars = quoted.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => value.extend(chars.next().map(|(_, c)| c)),
                '"' => return Some((key.to_owned(), value, &quoted[i + 1..])),
                c => value.push(c),
            }
        }
        None
    } else {
        let end = after.find(' ').unwrap_or(after.len());
        Some((key.to_owned(), after[..end].to_owned(), &after[end..]))
    }
}

fn parse_addr(fields: &serde_json::Value, name: &str) -> SocketAddr {
    fields[name]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("log field `{name}` is not an address: {fields}"))
}

/// A reqwest client that never goes through a proxy (everything here is loopback).
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(DEADLINE)
        .build()
        .expect("reqwest client")
}

/// Runs a future to completion on its own thread and runtime, so it can be used from sync and async tests.
pub fn block_on<F>(future: F) -> F::Output
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(future)
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// `application/x-www-form-urlencoded` body.
pub fn form_body(fields: &[(&str, &str)]) -> String {
    fn encode(s: &str) -> String {
        let mut out = String::new();
        for b in s.bytes() {
            match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    out.push(char::from(b))
                }
                b' ' => out.push('+'),
                _ => out.push_str(&format!("%{b:02X}")),
            }
        }
        out
    }
    fields
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// A minimal blocking `GET` over HTTP/1.1 (`Connection: close`): status and body, `None` when the port
/// does not answer. Used for readiness polling, where a whole client runtime is not needed.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

// ---------------------------------------------------------------------------------------------------------
// Metrics

impl Sidecar {
    /// The body of `GET /metrics`; fails the test when the port does not answer 200.
    pub fn metrics(&self) -> String {
        let (status, body) = http_get(self.metrics_addr, "/metrics")
            .unwrap_or_else(|| panic!("/metrics of {} does not answer", self.metrics_addr));
        assert_eq!(status, 200, "/metrics: {body}");
        body
    }

    /// One sample of `/metrics` (see `metric`), 0 when the series does not exist (yet).
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric(&self.metrics(), name, labels).unwrap_or(0.0)
    }
}

// ---------------------------------------------------------------------------------------------------------
// PostgreSQL

/// A database of its own for one test, in the server at `$S2S_POSTGRES_URL` (started by `scripts/test`);
/// dropped with the guard. `None` (SKIP) when the variable is unset, unless `S2S_E2E_REQUIRED=1`.
pub struct PgDatabase {
    pub url: String,
    admin_url: String,
    name: String,
}

impl PgDatabase {
    pub fn create(test: &str) -> Option<Self> {
        let Some(admin_url) = std::env::var("S2S_POSTGRES_URL")
            .ok()
            .filter(|u| !u.is_empty())
        else {
            missing(
                "PostgreSQL",
                test,
                "is not running (S2S_POSTGRES_URL is unset)",
            )?;
            return None;
        };
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let name = format!(
            "s2s_test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        // One at a time: CREATE DATABASE copies template1 and fails while another copy is under way.
        static CREATING: Mutex<()> = Mutex::new(());
        let _one = CREATING.lock().unwrap_or_else(|e| e.into_inner());
        let mut admin = Self::connect(&admin_url);
        for sql in [
            format!("DROP DATABASE IF EXISTS {name}"),
            format!("CREATE DATABASE {name}"),
        ] {
            admin
                .batch_execute(&sql)
                .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        }
        let (base, _) = admin_url
            .rsplit_once('/')
            .expect("S2S_POSTGRES_URL ends in /<database>");
        Some(PgDatabase {
            url: format!("{base}/{name}"),
            admin_url,
            name,
        })
    }

    /// A plain client of this database: what "another tool" editing it directly would use.
    pub fn client(&self) -> postgres::Client {
        Self::connect(&self.url)
    }

    fn connect(url: &str) -> postgres::Client {
        // The sync client runs its own runtime: keep it off any async test's thread.
        let url = url.to_owned();
        std::thread::spawn(move || postgres::Client::connect(&url, postgres::NoTls))
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("connecting to PostgreSQL: {e}"))
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let (url, name) = (self.admin_url.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            if let Ok(mut admin) = postgres::Client::connect(&url, postgres::NoTls) {
                let _ =
                    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
            }
        })
        .join();
    }
}
