//! A real, independent OpenID provider as a generic OIDC issuer, end to end: the npm package
//! `oidc-provider` (tests/oidc-provider/, pinned, installed by its install.sh) issues RS256 JWT access
//! tokens (RFC 9068) for a resource (RFC 8707) through the client-credentials grant; the real
//! `s2s-authz` binary, configured with that provider under `oidc_issuers`, discovers it, loads its JWKS
//! and decides — over `s2sauthz.v1.Authorizer/Decide` and `envoy.service.auth.v3.Authorization/Check`.
//!
//! Needs Node.js (`$S2S_NODE`, else `node` on PATH) and the installed fixture (`$S2S_OIDC_PROVIDER_DIR`,
//! else tests/oidc-provider once its install.sh has run). Without them the test prints SKIP and passes,
//! unless `S2S_E2E_REQUIRED=1`, when it fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse, attribute_context,
};
use s2s_authz::proto::s2sauthz::v1::authorizer_client::AuthorizerClient;
use s2s_authz::proto::s2sauthz::v1::{DecideRequest, DecideResponse, DenyReason};
use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use support::{ChildGuard, DEADLINE};

const TEST: &str = "oidc_provider_tokens_are_verified_and_decided_end_to_end";

/// The sidecar's API, as a resource indicator and so the tokens' `aud`.
const RESOURCE: &str = "api://s2s-authz-test";
/// A resource server of the same provider that is not this service.
const OTHER_RESOURCE: &str = "api://another-service";
/// The app role the allowlist entries require; the provider puts it in `roles` (tests/oidc-provider/server.js).
const APP_ROLE: &str = "S2SAppRole";
const SECURITY_ROLE: &str = "Orders Reader";

/// A client registered in tests/oidc-provider/server.js.
struct Client {
    id: &'static str,
    secret: &'static str,
}
/// On the allowlist, and its tokens carry the app role: allowed.
const ORDERS: Client = Client {
    id: "orders-service",
    secret: "orders-secret",
};
/// On the allowlist, but its tokens carry no role: ROLE_MISSING.
const BILLING: Client = Client {
    id: "billing-service",
    secret: "billing-secret",
};
/// Carries the app role but is on no allowlist: APPLICATION_NOT_ALLOWED.
const STRANGER: Client = Client {
    id: "stranger-service",
    secret: "stranger-secret",
};
const ORDERS_USER_NAME: &str = "Orders Service (oidc-provider)";

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oidc-provider")
}

/// The exact oidc-provider version tests/oidc-provider/package.json pins.
fn pinned_version(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("package.json"))
        .unwrap_or_else(|e| panic!("reading {}/package.json: {e}", dir.display()));
    let json: Value = serde_json::from_str(&text).expect("package.json is JSON");
    json["dependencies"]["oidc-provider"]
        .as_str()
        .expect("package.json depends on oidc-provider")
        .to_owned()
}

/// The fixture must be reproducible: package.json pins one exact version and the lockfile holds it.
#[test]
fn the_fixture_pins_one_exact_oidc_provider_version() {
    let dir = fixture_dir();
    let pinned = pinned_version(&dir);
    assert!(
        pinned.split('.').count() == 3 && pinned.chars().all(|c| c.is_ascii_digit() || c == '.'),
        "package.json must pin an exact version, not `{pinned}`"
    );
    let lock: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("package-lock.json")).expect("package-lock.json"),
    )
    .expect("package-lock.json is JSON");
    assert_eq!(
        lock["packages"][""]["dependencies"]["oidc-provider"], pinned,
        "package-lock.json is out of date with package.json"
    );
    assert_eq!(
        lock["packages"]["node_modules/oidc-provider"]["version"], pinned,
        "package-lock.json locks another oidc-provider"
    );
}

// ---------------------------------------------------------------------------------------------------------
// Finding Node.js and the installed fixture

fn required() -> bool {
    std::env::var("S2S_E2E_REQUIRED").as_deref() == Ok("1")
}

fn missing<T>(why: &str) -> Option<T> {
    if required() {
        panic!("{why}; run tests/oidc-provider/install.sh (scripts/test does)");
    }
    eprintln!("SKIP {TEST}: {why}; run tests/oidc-provider/install.sh to install it");
    None
}

/// `$S2S_OIDC_PROVIDER_DIR`, else tests/oidc-provider when its packages are installed.
fn find_fixture() -> Option<PathBuf> {
    let installed = |dir: &Path| {
        dir.join("server.js").is_file()
            && dir
                .join("node_modules/oidc-provider/package.json")
                .is_file()
    };
    match std::env::var_os("S2S_OIDC_PROVIDER_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if installed(&dir) {
                Some(dir)
            } else {
                missing(&format!(
                    "S2S_OIDC_PROVIDER_DIR={} has no server.js with node_modules/oidc-provider",
                    dir.display()
                ))
            }
        }
        None if installed(&fixture_dir()) => Some(fixture_dir()),
        None => {
            missing("the oidc-provider fixture is not installed (S2S_OIDC_PROVIDER_DIR is unset)")
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Processes

/// Collects a child's output lines for failure messages; stdout lines also go to `lines`.
fn drain(
    stream: impl Read + Send + 'static,
    sink: Arc<Mutex<Vec<String>>>,
    lines: Option<mpsc::Sender<String>>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if let Some(tx) = &lines {
                let _ = tx.send(line.clone());
            }
            sink.lock().unwrap().push(line);
        }
    });
}

/// `node server.js 0`: oidc-provider on 127.0.0.1 with a port of the kernel's choice.
struct OidcProvider {
    process: ChildGuard,
    /// Held open: the provider exits when its stdin closes, so it cannot outlive this test.
    _stdin: ChildStdin,
    /// `http://127.0.0.1:PORT`, as the provider announced it.
    issuer: String,
    version: String,
    output: Arc<Mutex<Vec<String>>>,
}

impl OidcProvider {
    fn start(node: &Path, dir: &Path) -> Self {
        let mut child = Command::new(node)
            .arg("server.js")
            .arg("0")
            .current_dir(dir)
            .env_remove("OIDC_PROVIDER_PORT")
            .env("NODE_ENV", "test")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} server.js: {e}", node.display()));
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let mut process = ChildGuard::new(child, "node server.js");
        let output = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        drain(stdout, output.clone(), Some(tx));
        drain(stderr, output.clone(), None);

        // The provider prints `READY <issuer> oidc-provider/<version>` once it listens.
        let deadline = Instant::now() + DEADLINE;
        let ready = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.starts_with("READY ") => break line,
                Ok(_) => {}
                Err(e) => panic!(
                    "oidc-provider did not print READY ({e}); exit: {:?}; output:\n{}",
                    process.try_wait(),
                    output.lock().unwrap().join("\n")
                ),
            }
        };
        let fields: Vec<&str> = ready.split_whitespace().collect();
        let [_, issuer, version] = fields[..] else {
            panic!("unexpected READY line `{ready}`")
        };
        let version = version
            .strip_prefix("oidc-provider/")
            .unwrap_or_else(|| panic!("unexpected READY line `{ready}`"));
        OidcProvider {
            process,
            _stdin: stdin,
            issuer: issuer.to_owned(),
            version: version.to_owned(),
            output,
        }
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }
}

/// The sidecar's configuration: the provider as a generic OIDC issuer, and two app entries that name
/// the provider's issuer URL as their tenant.
fn sidecar_config(issuer: &str, data_dir: &Path) -> String {
    format!(
        r#"grpc_addr: 127.0.0.1:0
admin_addr: 127.0.0.1:0
metrics_addr: 127.0.0.1:0
data_dir: "{data_dir}"
auth:
  # Entra tokens are not used here; one global audience is required all the same.
  audiences: ["api://entra-unused"]
oidc_issuers:
  - issuer: "{issuer}"
    audiences: ["{RESOURCE}"]
    app_id_claim: client_id
    object_id_claim: sub
    roles_claim: roles
    app_only: sub_equals_app_id
    algorithms: [RS256]
security_roles:
  - name: {SECURITY_ROLE}
    privileges: [{{ resource: orders, operations: [read] }}]
app_entries:
  - name: {orders}
    tenant_id: "{issuer}"
    client_app_id: {orders}
    required_role: {APP_ROLE}
    application_user: {{ name: "{ORDERS_USER_NAME}", security_role: {SECURITY_ROLE} }}
  - name: {billing}
    tenant_id: "{issuer}"
    client_app_id: {billing}
    required_role: {APP_ROLE}
    application_user: {{ security_role: {SECURITY_ROLE} }}
"#,
        data_dir = data_dir.display(),
        orders = ORDERS.id,
        billing = BILLING.id,
    )
}

/// The real `s2s-authz serve` binary with a configuration file, every port 0, its store in a temporary
/// directory.
struct Sidecar {
    process: ChildGuard,
    grpc_addr: SocketAddr,
    metrics_addr: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Sidecar {
    /// Starts it and waits until `/readyz` says the provider's keys are loaded.
    fn start(issuer: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("s2s-authz.yaml");
        std::fs::write(&config, sidecar_config(issuer, &dir.path().join("data")))
            .expect("writing the configuration");
        let mut child = support::binary()
            .args(["serve", "--log-format", "json", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting s2s-authz: {e}"));
        let stderr = child.stderr.take().expect("stderr is piped");
        let mut process = ChildGuard::new(child, "s2s-authz");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        drain(stderr, logs.clone(), Some(tx));

        let deadline = Instant::now() + DEADLINE;
        let (grpc_addr, metrics_addr) = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).unwrap_or_else(|e| {
                panic!(
                    "s2s-authz did not announce its listeners ({e}); exit: {:?}; stderr:\n{}",
                    process.try_wait(),
                    logs.lock().unwrap().join("\n")
                )
            });
            let Ok(json) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            let fields = &json["fields"];
            if fields["message"] == "s2s-authz listening" {
                let addr = |name: &str| -> SocketAddr {
                    fields[name]
                        .as_str()
                        .and_then(|a| a.parse().ok())
                        .unwrap_or_else(|| panic!("`{name}` is not an address: {fields}"))
                };
                break (addr("grpc_addr"), addr("metrics_addr"));
            }
        };
        let sidecar = Sidecar {
            process,
            grpc_addr,
            metrics_addr,
            logs,
            _dir: dir,
        };
        support::poll("/readyz to answer 200 (the provider's keys loaded)", || {
            (support::http_get(sidecar.metrics_addr, "/readyz").map(|(status, _)| status)
                == Some(200))
            .then_some(())
        });
        sidecar
    }

    fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }
}

// ---------------------------------------------------------------------------------------------------------
// HTTP and token helpers

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

async fn get_json(url: &str) -> Value {
    let response = support::http_client()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert_eq!(response.status().as_u16(), 200, "GET {url}");
    let body = response.text().await.expect("body");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {url} is not JSON ({e}): {body}"))
}

/// POSTs a client-credentials request (client_secret_basic) to the token endpoint: status and JSON body.
async fn token_request(
    token_endpoint: &str,
    client: &Client,
    resource: &str,
    scope: &str,
) -> (u16, Value) {
    let form = support::form_body(&[
        ("grant_type", "client_credentials"),
        ("resource", resource),
        ("scope", scope),
    ]);
    let response = support::http_client()
        .post(token_endpoint)
        .basic_auth(client.id, Some(client.secret))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {token_endpoint}: {e}"));
    let status = response.status().as_u16();
    let body = response.text().await.expect("token response body");
    let json = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("token response is not JSON ({e}): {body}"));
    (status, json)
}

/// An access token for `client` and `resource` with scope `orders.read`.
async fn token(token_endpoint: &str, client: &Client, resource: &str) -> String {
    let (status, json) = token_request(token_endpoint, client, resource, "orders.read").await;
    assert_eq!(status, 200, "token endpoint refused {}: {json}", client.id);
    assert_eq!(json["token_type"], "Bearer", "{json}");
    assert_eq!(json["scope"], "orders.read", "{json}");
    json["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no access_token: {json}"))
        .to_owned()
}

/// The decoded header and claims of a compact JWS (no verification: that is the sidecar's job).
fn decode(token: &str) -> (Value, Value) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "a compact JWS has three segments");
    let part = |s: &str| -> Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(s).expect("base64url")).expect("JSON")
    };
    (part(parts[0]), part(parts[1]))
}

/// The token with its claims replaced by `claims`, header and signature untouched.
fn with_claims(token: &str, claims: &Value) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("claims serialise"));
    format!("{}.{payload}.{}", parts[0], parts[2])
}

async fn decide(
    client: &mut AuthorizerClient<tonic::transport::Channel>,
    token: &str,
) -> DecideResponse {
    client
        .decide(DecideRequest {
            token: format!("Bearer {token}"),
            context: None,
        })
        .await
        .expect("Decide")
        .into_inner()
}

fn assert_denied(response: &DecideResponse, reason: DenyReason, case: &str) {
    assert!(!response.allowed, "{case}: must be denied: {response:?}");
    assert_eq!(response.reason(), reason, "{case}: {response:?}");
}

async fn check(
    client: &mut AuthorizationClient<tonic::transport::Channel>,
    token: &str,
) -> CheckResponse {
    let headers = HashMap::from([
        ("authorization".to_owned(), format!("Bearer {token}")),
        ("x-s2s-tenant-id".to_owned(), "spoofed".to_owned()),
    ]);
    client
        .check(CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(attribute_context::Request {
                    time: None,
                    http: Some(attribute_context::HttpRequest {
                        method: "GET".to_owned(),
                        path: "/orders".to_owned(),
                        host: "orders.internal".to_owned(),
                        scheme: "https".to_owned(),
                        protocol: "HTTP/1.1".to_owned(),
                        headers,
                        ..Default::default()
                    }),
                }),
                ..Default::default()
            }),
        })
        .await
        .expect("the Check RPC itself returns OK")
        .into_inner()
}

/// The headers Check sets (allowed) or sends back (denied), by lower-case name.
fn check_headers(response: &CheckResponse) -> (bool, HashMap<String, String>) {
    let (allowed, headers) = match &response.http_response {
        Some(HttpResponse::OkResponse(ok)) => (true, &ok.headers),
        Some(HttpResponse::DeniedResponse(denied)) => (false, &denied.headers),
        other => panic!("Check answered neither ok nor denied: {other:?}"),
    };
    let headers = headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .map(|h| (h.key.to_ascii_lowercase(), h.value.clone()))
        .collect();
    (allowed, headers)
}

// ---------------------------------------------------------------------------------------------------------
// The test

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_provider_tokens_are_verified_and_decided_end_to_end() {
    let Some(node) = support::find_tool("node", "S2S_NODE", TEST) else {
        return;
    };
    let Some(dir) = find_fixture() else {
        return;
    };
    let pinned = pinned_version(&dir);
    let (provider, sidecar) = {
        let (node, dir) = (node.clone(), dir.clone());
        tokio::task::spawn_blocking(move || {
            let provider = OidcProvider::start(&node, &dir);
            let sidecar = Sidecar::start(&provider.issuer);
            (provider, sidecar)
        })
        .await
        .unwrap()
    };
    let issuer = provider.issuer.clone();
    assert_eq!(
        provider.version, pinned,
        "installed oidc-provider is not the pinned one: rerun tests/oidc-provider/install.sh"
    );
    assert!(issuer.starts_with("http://127.0.0.1:"), "{issuer}");

    // Discovery: the provider's metadata names itself, its JWKS and a token endpoint for client credentials.
    let metadata = get_json(&format!("{issuer}/.well-known/openid-configuration")).await;
    assert_eq!(metadata["issuer"], issuer.as_str());
    let jwks_uri = metadata["jwks_uri"].as_str().expect("jwks_uri").to_owned();
    let token_endpoint = metadata["token_endpoint"]
        .as_str()
        .expect("token_endpoint")
        .to_owned();
    assert!(
        metadata["grant_types_supported"]
            .as_array()
            .expect("grant_types_supported")
            .iter()
            .any(|g| g == "client_credentials"),
        "{metadata}"
    );
    let jwks = get_json(&jwks_uri).await;
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter_map(|k| k["kid"].as_str())
        .collect();
    assert!(!kids.is_empty(), "{jwks}");

    // The sidecar found the same: it discovered the issuer and fetched its keys (counted under the
    // issuer whose discovery named the key set).
    let logs = sidecar.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("issuer discovered and keys loaded") && l.contains(&issuer)),
        "no discovery log line for {issuer}:\n{logs}"
    );
    let (status, metrics) =
        support::http_get(sidecar.metrics_addr, "/metrics").expect("metrics port answers");
    assert_eq!(status, 200);
    let fetched = support::metric(
        &metrics,
        "s2s_authz_jwks_fetches_total",
        &[("issuer", &issuer), ("outcome", "ok")],
    );
    assert!(
        fetched.is_some_and(|n| n >= 1.0),
        "no JWKS fetch for {issuer} in /metrics:\n{metrics}"
    );

    // A token as a client-credentials app gets it: RS256, `at+jwt`, signed with a published key, with
    // the claims the sidecar maps.
    let orders = token(&token_endpoint, &ORDERS, RESOURCE).await;
    let (header, claims) = decode(&orders);
    assert_eq!(header["alg"], "RS256", "{header}");
    assert_eq!(header["typ"], "at+jwt", "{header}");
    assert!(
        kids.contains(&header["kid"].as_str().expect("kid")),
        "{header} {jwks}"
    );
    assert_eq!(claims["iss"], issuer.as_str(), "{claims}");
    assert_eq!(claims["aud"], RESOURCE, "{claims}");
    assert_eq!(claims["client_id"], ORDERS.id, "{claims}");
    assert_eq!(
        claims["sub"], ORDERS.id,
        "RFC 9068: sub is the client: {claims}"
    );
    assert_eq!(claims["roles"], serde_json::json!([APP_ROLE]), "{claims}");
    let exp = claims["exp"].as_i64().expect("exp");
    let iat = claims["iat"].as_i64().expect("iat");
    assert!(iat <= now() + 5 && exp > now(), "{claims}");

    let mut authorizer = AuthorizerClient::connect(format!("http://{}", sidecar.grpc_addr))
        .await
        .expect("connecting to the decision port");

    // Allowed, as the right caller and application user.
    let r = decide(&mut authorizer, &orders).await;
    assert!(r.allowed, "{r:?}\nsidecar:\n{}", sidecar.logs());
    assert_eq!(r.reason(), DenyReason::Unspecified);
    let caller = r.caller.as_ref().expect("caller");
    assert_eq!(caller.tenant_id, issuer, "the issuer URL plays the tenant");
    assert_eq!(caller.client_app_id, ORDERS.id);
    assert_eq!(caller.object_id, ORDERS.id, "object id from `sub`");
    assert_eq!(caller.expires_at, exp);
    let user = r.application_user.as_ref().expect("application user");
    assert_eq!(user.entry_name, ORDERS.id);
    assert_eq!(user.name, ORDERS_USER_NAME);
    assert!(!user.id.is_empty());
    assert_eq!(r.security_role.as_ref().expect("role").name, SECURITY_ROLE);

    // A genuine token of the same client for another resource server: AUDIENCE_MISMATCH (its
    // signature verified, so the caller is reported).
    let other = token(&token_endpoint, &ORDERS, OTHER_RESOURCE).await;
    assert_eq!(decode(&other).1["aud"], OTHER_RESOURCE);
    let r = decide(&mut authorizer, &other).await;
    assert_denied(
        &r,
        DenyReason::AudienceMismatch,
        "token for another resource",
    );
    assert_eq!(r.caller.as_ref().expect("caller").client_app_id, ORDERS.id);

    // A client of the trusted provider that no app entry names: APPLICATION_NOT_ALLOWED.
    let stranger = token(&token_endpoint, &STRANGER, RESOURCE).await;
    let r = decide(&mut authorizer, &stranger).await;
    assert_denied(
        &r,
        DenyReason::ApplicationNotAllowed,
        "client not on the allowlist",
    );
    assert_eq!(
        r.caller.as_ref().expect("caller").client_app_id,
        STRANGER.id
    );

    // On the allowlist, but the provider gave it no app role: ROLE_MISSING.
    let billing = token(&token_endpoint, &BILLING, RESOURCE).await;
    assert_eq!(decode(&billing).1["roles"], serde_json::json!([]));
    let r = decide(&mut authorizer, &billing).await;
    assert_denied(&r, DenyReason::RoleMissing, "client without the app role");

    // The same token with the role written in by hand: SIGNATURE_INVALID, and no caller is reported.
    let mut escalated = decode(&billing).1;
    escalated["roles"] = serde_json::json!([APP_ROLE]);
    let tampered = with_claims(&billing, &escalated);
    let r = decide(&mut authorizer, &tampered).await;
    assert_denied(&r, DenyReason::SignatureInvalid, "tampered claims");
    assert!(
        r.caller.is_none(),
        "an unverified token names no caller: {r:?}"
    );

    // A resource the provider does not serve is refused by the provider itself (RFC 8707 invalid_target).
    let (status, json) = token_request(
        &token_endpoint,
        &ORDERS,
        "api://unknown-resource",
        "orders.read",
    )
    .await;
    assert_eq!(status, 400, "{json}");
    assert_eq!(json["error"], "invalid_target", "{json}");

    // Envoy's ext_authz Check: the allowed token gets identity headers (the spoofed tenant replaced),
    // the tampered one a 401 with the reason.
    let mut envoy = AuthorizationClient::connect(format!("http://{}", sidecar.grpc_addr))
        .await
        .expect("connecting to the decision port");
    let response = check(&mut envoy, &orders).await;
    assert_eq!(
        response.status.as_ref().expect("status").code,
        0,
        "{response:?}"
    );
    let (allowed, headers) = check_headers(&response);
    assert!(allowed, "{response:?}");
    assert_eq!(headers["x-s2s-client-app-id"], ORDERS.id);
    assert_eq!(headers["x-s2s-tenant-id"], issuer);
    assert_eq!(headers["x-s2s-object-id"], ORDERS.id);
    assert_eq!(headers["x-s2s-application-user-name"], ORDERS_USER_NAME);
    assert_eq!(headers["x-s2s-security-role"], SECURITY_ROLE);

    let response = check(&mut envoy, &tampered).await;
    let (allowed, headers) = check_headers(&response);
    assert!(!allowed, "{response:?}");
    assert_eq!(
        headers["x-s2s-deny-reason"], "SIGNATURE_INVALID",
        "{response:?}"
    );
    match &response.http_response {
        Some(HttpResponse::DeniedResponse(denied)) => {
            assert_eq!(denied.status.as_ref().expect("http status").code, 401)
        }
        other => panic!("expected a denied_response, got {other:?}"),
    }

    // Neither process has died along the way.
    let (mut provider, mut sidecar) = (provider, sidecar);
    assert!(
        provider.process.try_wait().is_none(),
        "oidc-provider exited:\n{}",
        provider.output()
    );
    assert!(
        sidecar.process.try_wait().is_none(),
        "s2s-authz exited:\n{}",
        sidecar.logs()
    );
}
