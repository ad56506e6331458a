//! End-to-end tests with a real Envoy (1.40) in front of an upstream that echoes the request headers it got:
//! Envoy's ext_authz filter asks the real `s2s-authz` binary, which must let genuine callers through with
//! identity headers (never spoofable) and turn everyone else away with RFC 6750 challenges.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use axum::http::HeaderMap;
use serde_json::{Map, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use support::pki::{Ca, Leaf};
use support::{BILLING, ChildGuard, LEGACY_REPORTS, ORDERS, STRANGER, Sidecar, TENANT};

/// The end-to-end tests run one at a time: each starts an Envoy, a sidecar and its issuer, and on a
/// loaded two-core machine two such stacks at once can push a first check past its timeout.
static ONE_STACK_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Header every test request carries so the upstream's log shows which requests reached it.
const CASE: &str = "x-test-case";

/// A configuration shipped in `deploy/envoy/`, moved to loopback: Envoy's admin and its `listener` on port 0
/// (the real ports are read back from the admin API), the sidecar and the application where the test
/// runs them, and whatever else `more` replaces.
fn shipped_bootstrap(
    file: &str,
    listener: u16,
    sidecar_grpc: SocketAddr,
    upstream: SocketAddr,
    more: &[(String, String)],
) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/envoy")
        .join(file);
    let mut text = std::fs::read_to_string(&path).unwrap();
    let ports = [
        (
            format!("address: 0.0.0.0, port_value: {listener}"),
            "address: 127.0.0.1, port_value: 0".to_owned(),
        ),
        ("port_value: 9901".to_owned(), "port_value: 0".to_owned()),
        (
            "port_value: 50051".to_owned(),
            format!("port_value: {}", sidecar_grpc.port()),
        ),
        (
            "port_value: 8080".to_owned(),
            format!("port_value: {}", upstream.port()),
        ),
    ];
    for (from, to) in ports.iter().chain(more) {
        assert!(
            text.contains(from.as_str()),
            "{} has no `{from}`",
            path.display()
        );
        text = text.replace(from.as_str(), to);
    }
    text
}

/// A running Envoy; killed when dropped.
struct Envoy {
    _process: ChildGuard,
    listener: SocketAddr,
    _dir: tempfile::TempDir,
}

fn envoy_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("envoy.log")).unwrap_or_default()
}

impl Envoy {
    /// Starts Envoy with `config` and waits until it is live and its listener's port is known.
    async fn start(binary: PathBuf, config: String) -> Envoy {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("envoy.yaml");
        let admin_path = dir.path().join("admin-address");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("envoy.log")).unwrap();
        let child = Command::new(&binary)
            .arg("-c")
            .arg(&config_path)
            .arg("--admin-address-path")
            .arg(&admin_path)
            // No shared memory or domain socket: Envoys of parallel tests cannot collide.
            .arg("--disable-hot-restart")
            .args(["--concurrency", "1", "-l", "warning"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let mut process = ChildGuard::new(child, "envoy");

        let (process, admin, dir) = tokio::task::spawn_blocking(move || {
            let admin: SocketAddr = support::poll("Envoy's admin address", || {
                if let Some(status) = process.try_wait() {
                    panic!("Envoy exited ({status}):\n{}", envoy_log(dir.path()));
                }
                std::fs::read_to_string(&admin_path)
                    .ok()
                    .and_then(|a| a.trim().parse().ok())
            });
            support::poll("Envoy to be LIVE", || {
                if let Some(status) = process.try_wait() {
                    panic!("Envoy exited ({status}):\n{}", envoy_log(dir.path()));
                }
                support::http_get(admin, "/ready")
                    .filter(|(status, body)| *status == 200 && body.contains("LIVE"))
            });
            (process, admin, dir)
        })
        .await
        .unwrap();

        let listeners: Value = get_json(&format!("http://{admin}/listeners?format=json")).await;
        let port = listeners["listener_statuses"]
            .as_array()
            .and_then(|l| l.iter().find(|l| l["name"] == "ingress"))
            .and_then(|l| l["local_address"]["socket_address"]["port_value"].as_u64())
            .unwrap_or_else(|| panic!("no ingress listener port in {listeners}"));
        let listener = SocketAddr::from(([127, 0, 0, 1], u16::try_from(port).unwrap()));
        Envoy {
            _process: process,
            listener,
            _dir: dir,
        }
    }
}

async fn get_json(url: &str) -> Value {
    let response = support::http_client()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let text = response.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {url} is not JSON ({e}): {text}"))
}

/// Request headers as the upstream received them: name → every value, in order.
type Seen = Map<String, Value>;

fn to_json(headers: &HeaderMap) -> Seen {
    let mut seen = Map::new();
    for name in headers.keys() {
        let values: Vec<Value> = headers
            .get_all(name)
            .iter()
            .map(|v| Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        seen.insert(name.as_str().to_owned(), Value::Array(values));
    }
    seen
}

/// An upstream on 127.0.0.1:0 that answers every request with the headers it received as JSON, and keeps
/// a record of them.
async fn echo_upstream() -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let record = seen.clone();
    let app = axum::Router::new().fallback(move |headers: HeaderMap| {
        let record = record.clone();
        async move {
            let json = to_json(&headers);
            record.lock().unwrap().push(json.clone());
            axum::Json(Value::Object(json))
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, seen)
}

struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }
}

async fn send(envoy: &Envoy, case: &str, headers: &[(&str, &str)]) -> Reply {
    send_to(envoy, "/orders/42", case, headers).await
}

async fn send_to(envoy: &Envoy, path: &str, case: &str, headers: &[(&str, &str)]) -> Reply {
    let mut request = support::http_client()
        .get(format!("http://{}{path}", envoy.listener))
        .header(CASE, case);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{case}: request through Envoy: {e}"));
    Reply {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        body: response.text().await.unwrap(),
    }
}

fn values<'a>(seen: &'a Seen, name: &str) -> Vec<&'a str> {
    seen.get(name)
        .and_then(Value::as_array)
        .map(|v| v.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn reached_upstream(seen: &Mutex<Vec<Seen>>, case: &str) -> bool {
    seen.lock()
        .unwrap()
        .iter()
        .any(|h| values(h, CASE).contains(&case))
}

/// A deny as the caller sees it through Envoy.
fn assert_deny(reply: &Reply, case: &str, status: u16, challenge: &str, reason: &str) {
    assert_eq!(reply.status, status, "{case}: status; body {}", reply.body);
    assert_eq!(
        reply.header("www-authenticate"),
        Some(challenge),
        "{case}: challenge"
    );
    assert_eq!(
        reply.header("x-s2s-deny-reason"),
        Some(reason),
        "{case}: deny reason header"
    );
    let body = reply.json();
    assert_eq!(body["reason"], reason, "{case}: body {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_enforces_sidecar_decisions_end_to_end() {
    let Some(envoy_bin) = support::find_tool(
        "envoy",
        "S2S_ENVOY",
        "envoy_enforces_sidecar_decisions_end_to_end",
    ) else {
        return;
    };
    let _one = ONE_STACK_AT_A_TIME.lock().await;
    let (upstream, seen) = echo_upstream().await;
    let mut sidecar = tokio::task::spawn_blocking(Sidecar::start).await.unwrap();
    let config = shipped_bootstrap("envoy.yaml", 10000, sidecar.grpc_addr, upstream, &[]);
    let envoy = Envoy::start(envoy_bin, config).await;
    let orders_token = sidecar.token(&ORDERS);
    let legacy_token = sidecar.token(&LEGACY_REPORTS);
    let stranger_token = sidecar.token(&STRANGER);
    let billing_token = sidecar.token(&BILLING);

    // (a) A genuine caller gets through; the upstream sees who it is and nothing the caller made up.
    let bearer = format!("Bearer {orders_token}");
    let reply = send(
        &envoy,
        "allowed-v2",
        &[
            ("authorization", &bearer),
            ("x-s2s-tenant-id", "evil"),
            ("x-s2s-whatever", "1"),
            (
                "x-s2s-effective-user",
                "00000000-0000-4000-8000-000000000000",
            ),
        ],
    )
    .await;
    assert_eq!(reply.status, 200, "allowed: {}", reply.body);
    let echoed = reply.json();
    let echoed = echoed.as_object().expect("echo body is an object");
    assert_eq!(values(echoed, "x-s2s-client-app-id"), [ORDERS.client_id]);
    assert_eq!(
        values(echoed, "x-s2s-tenant-id"),
        [TENANT],
        "the spoofed tenant is overwritten, not appended"
    );
    assert_eq!(values(echoed, "x-s2s-object-id"), [ORDERS.object_id]);
    assert_eq!(
        values(echoed, "x-s2s-application-user-name"),
        ["Orders Service (application user)"]
    );
    assert_eq!(
        values(echoed, "x-s2s-security-role"),
        ["Orders Integration"]
    );
    assert_eq!(values(echoed, "x-s2s-application-user-id").len(), 1);
    assert!(
        !echoed.contains_key("x-s2s-whatever"),
        "unknown x-s2s-* headers are stripped: {echoed:?}"
    );
    assert!(
        !echoed.contains_key("x-s2s-effective-user"),
        "a caller cannot claim to impersonate: {echoed:?}"
    );
    assert!(
        echoed
            .values()
            .flat_map(|v| v.as_array().cloned().unwrap_or_default())
            .all(|v| v != "evil"),
        "the spoofed value never reaches the upstream: {echoed:?}"
    );
    assert!(reached_upstream(&seen, "allowed-v2"));

    let bearer = format!("Bearer {legacy_token}");
    let reply = send(&envoy, "allowed-v1", &[("authorization", &bearer)]).await;
    assert_eq!(reply.status, 200, "v1 token: {}", reply.body);
    let echoed = reply.json();
    let echoed = echoed.as_object().expect("echo body is an object");
    assert_eq!(
        values(echoed, "x-s2s-client-app-id"),
        [LEGACY_REPORTS.client_id]
    );

    // (b) No credentials: a bare challenge, and the upstream is never called.
    let reply = send(&envoy, "no-token", &[]).await;
    assert_deny(&reply, "no token", 401, "Bearer", "TOKEN_MISSING");
    assert!(!reached_upstream(&seen, "no-token"));

    // (c) A token that is not one.
    let reply = send(
        &envoy,
        "bad-token",
        &[("authorization", "Bearer abc.def.ghi")],
    )
    .await;
    assert_deny(
        &reply,
        "bad token",
        401,
        r#"Bearer error="invalid_token""#,
        "TOKEN_MALFORMED",
    );
    assert_eq!(reply.json()["error"], "invalid_token");
    assert!(!reached_upstream(&seen, "bad-token"));

    // (d) Genuine tokens of applications that may not call: 403 insufficient_scope.
    let bearer = format!("Bearer {stranger_token}");
    let reply = send(&envoy, "stranger", &[("authorization", &bearer)]).await;
    assert_deny(
        &reply,
        "stranger",
        403,
        r#"Bearer error="insufficient_scope""#,
        "APPLICATION_NOT_ALLOWED",
    );
    assert_eq!(reply.json()["error"], "insufficient_scope");
    assert!(!reached_upstream(&seen, "stranger"));

    let bearer = format!("Bearer {billing_token}");
    let reply = send(&envoy, "billing", &[("authorization", &bearer)]).await;
    assert_deny(
        &reply,
        "billing",
        403,
        r#"Bearer error="insufficient_scope""#,
        "ROLE_MISSING",
    );
    assert!(!reached_upstream(&seen, "billing"));

    // The probe route of the shipped configuration skips the check, and only that exact path does.
    let reply = send_to(&envoy, "/healthz", "probe", &[]).await;
    assert_eq!(reply.status, 200, "probe: {}", reply.body);
    assert!(reached_upstream(&seen, "probe"));
    let reply = send_to(&envoy, "/healthz/more", "probe-escape", &[]).await;
    assert_deny(&reply, "probe escape", 401, "Bearer", "TOKEN_MISSING");
    assert!(!reached_upstream(&seen, "probe-escape"));

    assert_eq!(
        seen.lock().unwrap().len(),
        3,
        "only the two allowed requests and the probe reached the upstream"
    );

    // Fail closed: with the sidecar gone, even a genuine caller is turned away.
    sidecar.signal("TERM");
    let exited = tokio::task::spawn_blocking(move || sidecar.wait_exit(support::DEADLINE))
        .await
        .unwrap();
    assert_eq!(exited.and_then(|s| s.code()), Some(0), "sidecar exit");
    let bearer = format!("Bearer {orders_token}");
    let reply = send(&envoy, "sidecar-down", &[("authorization", &bearer)]).await;
    assert_eq!(
        reply.status, 503,
        "no decision, no access (status_on_error): {}",
        reply.body
    );
    assert!(!reached_upstream(&seen, "sidecar-down"));
}

const ORDERS_WORKLOAD: &str = "spiffe://cluster.local/ns/orders/sa/orders";
const BILLING_WORKLOAD: &str = "spiffe://cluster.local/ns/billing/sa/billing";

/// `deploy/envoy/envoy-mtls.yaml` as shipped, moved to loopback ports and a directory of test certificates.
fn mtls_bootstrap(tls_dir: &Path, sidecar_grpc: SocketAddr, upstream: SocketAddr) -> String {
    shipped_bootstrap(
        "envoy-mtls.yaml",
        10443,
        sidecar_grpc,
        upstream,
        &[("/etc/envoy/tls".to_owned(), tls_dir.display().to_string())],
    )
}

/// An HTTPS client of Envoy's mTLS listener that trusts `ca` and presents `workload`'s certificate.
fn workload_client(ca: &Ca, workload: &Leaf) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(support::DEADLINE)
        .tls_certs_only([reqwest::Certificate::from_pem(ca.cert_pem.as_bytes()).unwrap()])
        .identity(reqwest::Identity::from_pem(workload.identity_pem().as_bytes()).unwrap())
        .build()
        .unwrap()
}

/// Mutual TLS all the way, with the shipped `deploy/envoy/envoy-mtls.yaml`: workloads prove who they
/// are to Envoy with SPIFFE certificates, Envoy asks the sidecar over mTLS, and the sidecar holds the
/// workload's SPIFFE id (`source.principal`) to the app entry's `source_principals`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_over_mutual_tls_hands_the_workload_identity_to_the_sidecar() {
    let Some(envoy_bin) = support::find_tool(
        "envoy",
        "S2S_ENVOY",
        "envoy_over_mutual_tls_hands_the_workload_identity_to_the_sidecar",
    ) else {
        return;
    };
    let _one = ONE_STACK_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (envoy_tls, sidecar_tls) = (dir.path().join("envoy"), dir.path().join("sidecar"));
    std::fs::create_dir_all(&envoy_tls).unwrap();
    std::fs::create_dir_all(&sidecar_tls).unwrap();
    let ca = Ca::new("mesh CA");
    ca.write(&envoy_tls, "ca");
    let sidecar_ca = ca.write(&sidecar_tls, "ca");
    ca.server("envoy ingress").write(&envoy_tls, "ingress");
    ca.workload("spiffe://cluster.local/ns/orders/sa/envoy")
        .write(&envoy_tls, "authz-client");
    let (cert, key) = ca.server("s2s-authz").write(&sidecar_tls, "tls");

    let config = format!(
        "{}grpc_tls:\n  cert_file: {}\n  key_file: {}\n  client_ca_file: {}\n",
        support::add_to_entry(
            &support::dev_config(),
            "orders-service",
            &format!("source_principals: [\"{ORDERS_WORKLOAD}\"]"),
        ),
        cert.display(),
        key.display(),
        sidecar_ca.display()
    );
    let (upstream, seen) = echo_upstream().await;
    let sidecar = tokio::task::spawn_blocking(move || Sidecar::start_with_config(&config))
        .await
        .unwrap();
    let envoy = Envoy::start(
        envoy_bin,
        mtls_bootstrap(&envoy_tls, sidecar.grpc_addr, upstream),
    )
    .await;
    let bearer = format!("Bearer {}", sidecar.token(&ORDERS));
    let url = format!("https://{}/orders/42", envoy.listener);

    // The orders workload with the orders app's token: through, with its identity headers.
    let orders = workload_client(&ca, &ca.workload(ORDERS_WORKLOAD));
    let response = orders
        .get(&url)
        .header("authorization", &bearer)
        .header(CASE, "orders-workload")
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response.text().await.unwrap();
    assert_eq!(status, 200, "{body}");
    let echoed: Value = serde_json::from_str(&body).unwrap();
    let echoed = echoed.as_object().unwrap();
    assert_eq!(values(echoed, "x-s2s-client-app-id"), [ORDERS.client_id]);
    assert!(reached_upstream(&seen, "orders-workload"));

    // The same token from another workload: the token is genuine, the caller is not the one it was
    // issued to run on.
    let billing = workload_client(&ca, &ca.workload(BILLING_WORKLOAD));
    let response = billing
        .get(&url)
        .header("authorization", &bearer)
        .header(CASE, "billing-workload")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 403);
    assert_eq!(
        response
            .headers()
            .get("x-s2s-deny-reason")
            .and_then(|v| v.to_str().ok()),
        Some("APPLICATION_NOT_ALLOWED")
    );
    assert!(!reached_upstream(&seen, "billing-workload"));

    // Envoy reached the sidecar over TLS with its client certificate (the port requires one).
    let (_, metrics) = support::http_get(sidecar.metrics_addr, "/metrics").unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l
                .starts_with(r#"s2s_authz_tls_handshakes_total{port="decision",outcome="ok"}"#)),
        "{metrics}"
    );
}
