//! Shared harness for `grpc_api.rs` and `key_cache.rs`: test configuration, an in-process server on
//! `127.0.0.1:0` with its development issuer, real gRPC clients, token crafting and bounded polling.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse, attribute_context,
};
use s2s_authz::config::{self, MctSettings, ServeArgs};
use s2s_authz::devissuer::{DevClient, DevIssuer, DevIssuerConfig, DevTenant, TokenVersion};
use s2s_authz::proto::s2sauthz::v1::authorizer_client::AuthorizerClient;
use s2s_authz::proto::s2sauthz::v1::{
    DecideRequest, DecideResponse, DenyReason, ExplainResponse, RequestContext,
};
use s2s_authz::server::{self, Running};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The development tenant (as in deploy/local/s2s-authz.yaml).
pub const TENANT: &str = "3f6b2a1e-8c4d-4e5f-9a7b-1c2d3e4f5a6b";
/// A tenant nobody trusts.
pub const FOREIGN_TENANT: &str = "e1e2e3e4-f5f6-4a7b-8c9d-0a1b2c3d4e5f";
/// The protected API: Application ID URI and the bare GUID that v2 tokens carry.
pub const API_GUID: &str = "b7e3c1a2-4d5e-4f60-8a9b-0c1d2e3f4a5b";
pub const AUDIENCE: &str = "api://b7e3c1a2-4d5e-4f60-8a9b-0c1d2e3f4a5b";
pub const APP_ROLE: &str = "S2SAppRole";

/// orders-service: client credentials, v2 tokens, role `Orders Integration` (may act on behalf).
pub const ORDERS_APP: &str = "6a1f0c2b-3d4e-4f5a-8b6c-7d8e9f0a1b2c";
pub const ORDERS_OID: &str = "9c8b7a6f-5e4d-4c3b-8a29-1f0e9d8c7b6a";
pub const ORDERS_USER_ID: &str = "0d7e3b52-1c4a-4f1e-9a77-4e1f00000001";
pub const ORDERS_USER_NAME: &str = "Orders Service (application user)";
pub const ORDERS_ROLE: &str = "Orders Integration";
/// legacy-reports: client credentials, v1 tokens, role `Reports Reader` (may not act on behalf).
pub const LEGACY_APP: &str = "2e4d6c8a-0b1c-4d2e-9f3a-5b6c7d8e9f01";
pub const LEGACY_OID: &str = "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d";
pub const LEGACY_USER_ID: &str = "0d7e3b52-1c4a-4f1e-9a77-4e1f00000002";
pub const LEGACY_ROLE: &str = "Reports Reader";
/// billing-service: on the allowlist, but its tokens carry no app role.
pub const BILLING_APP: &str = "8b9c0d1e-2f30-4a41-b5c6-d7e8f9a0b1c2";
pub const BILLING_OID: &str = "7f6e5d4c-3b2a-4918-8776-655443322110";
/// Not on the allowlist.
pub const STRANGER_APP: &str = "4d5e6f70-8192-4a3b-9c4d-5e6f7a8b9c0d";
pub const STRANGER_OID: &str = "0f1e2d3c-4b5a-4968-8776-5a4b3c2d1e0f";
/// retired-service: on the allowlist, disabled.
pub const DISABLED_APP: &str = "c3d4e5f6-a7b8-4c9d-8e0f-1a2b3c4d5e6f";
pub const DISABLED_OID: &str = "d4e5f6a7-b8c9-4d0e-9f1a-2b3c4d5e6f70";
/// A user applications may impersonate (role `Order Viewer`: read orders only).
pub const USER_OID: &str = "aa11bb22-cc33-4d44-8e55-ff6677889900";

/// How long any polled condition may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Names of the health services that follow key readiness.
pub const HEALTH_SERVICES: [&str; 3] = [
    "",
    "s2sauthz.v1.Authorizer",
    "envoy.service.auth.v3.Authorization",
];

/// What varies between the tests' configurations; everything else is the development setup.
#[derive(Clone, Debug, Default)]
pub struct Config {
    /// Lines of the `keys:` section.
    pub keys: Vec<(&'static str, u64)>,
    pub require_client_type: bool,
    /// Adds a route table (GET/POST/DELETE `/orders`).
    pub routes: bool,
    /// Use this issuer instead of starting the embedded development issuer.
    pub external_instance: Option<String>,
}

impl Config {
    pub fn new() -> Self {
        Config::default()
    }

    pub fn key(mut self, name: &'static str, value: u64) -> Self {
        self.keys.push((name, value));
        self
    }

    pub fn require_client_type(mut self) -> Self {
        self.require_client_type = true;
        self
    }

    pub fn routes(mut self) -> Self {
        self.routes = true;
        self
    }

    pub fn external(mut self, instance: String) -> Self {
        self.external_instance = Some(instance);
        self
    }

    /// The YAML file, based on deploy/local/s2s-authz.yaml, with every listener on port 0.
    pub fn yaml(&self) -> String {
        let mut y = String::from(
            "grpc_addr: 127.0.0.1:0\nadmin_addr: 127.0.0.1:0\nmetrics_addr: 127.0.0.1:0\n",
        );
        y.push_str("auth:\n");
        if let Some(instance) = &self.external_instance {
            y.push_str(&format!("  instance: \"{instance}\"\n"));
        }
        y.push_str(&format!(
            "  tenants: [{TENANT}]\n  audiences: [\"{AUDIENCE}\"]\n  require_client_type: {}\n",
            self.require_client_type
        ));
        if self.keys.is_empty() {
            y.push_str("keys: {}\n");
        } else {
            y.push_str("keys:\n");
            for (k, v) in &self.keys {
                y.push_str(&format!("  {k}: {v}\n"));
            }
        }
        y.push_str(&format!(
            r#"security_roles:
  - name: {ORDERS_ROLE}
    act_on_behalf: true
    privileges:
      - resource: orders
        operations: [read, create, write]
  - name: {LEGACY_ROLE}
    privileges:
      - resource: orders
        operations: [read]
  - name: Order Viewer
    privileges:
      - resource: orders
        operations: [read]
app_entries:
  - name: orders-service
    tenant_id: {TENANT}
    client_app_id: {ORDERS_APP}
    kind: CLIENT_CREDENTIALS
    required_role: {APP_ROLE}
    application_user:
      id: {ORDERS_USER_ID}
      name: {ORDERS_USER_NAME}
      security_role: {ORDERS_ROLE}
  - name: legacy-reports
    tenant_id: {TENANT}
    client_app_id: {LEGACY_APP}
    required_role: {APP_ROLE}
    application_user:
      id: {LEGACY_USER_ID}
      security_role: {LEGACY_ROLE}
  - name: billing-service
    tenant_id: {TENANT}
    client_app_id: {BILLING_APP}
    required_role: {APP_ROLE}
    application_user:
      security_role: {ORDERS_ROLE}
  - name: retired-service
    tenant_id: {TENANT}
    client_app_id: {DISABLED_APP}
    required_role: {APP_ROLE}
    enabled: false
    application_user:
      security_role: {ORDERS_ROLE}
users:
  - object_id: {USER_OID}
    name: Ursula User
    security_role: Order Viewer
"#
        ));
        if self.routes {
            y.push_str(
                r#"routes:
  - method: GET
    path: /orders
    resource: orders
    operation: read
  - method: POST
    path: /orders
    resource: orders
    operation: create
  - method: DELETE
    path: /orders
    resource: orders
    operation: delete
"#,
            );
        }
        if self.external_instance.is_none() {
            y.push_str(&format!(
                r#"dev_issuer:
  addr: 127.0.0.1:0
  tenants:
    - tenant_id: {TENANT}
      clients:
        - client_id: {ORDERS_APP}
          client_secret: dev-secret-orders
          object_id: {ORDERS_OID}
          roles: [{APP_ROLE}]
          token_version: "2.0"
        - client_id: {LEGACY_APP}
          client_secret: dev-secret-reports
          object_id: {LEGACY_OID}
          roles: [{APP_ROLE}]
          token_version: "1.0"
"#
            ));
        }
        y
    }
}

/// The dev clients of the test tenant, for `mint_app_token` and for a self-started issuer.
pub fn dev_client(app: &str, oid: &str, roles: &[&str], version: TokenVersion) -> DevClient {
    DevClient {
        client_id: app.to_owned(),
        client_secret: format!("secret-{app}"),
        object_id: oid.to_owned(),
        roles: roles.iter().map(|r| (*r).to_owned()).collect(),
        token_version: version,
    }
}

pub fn orders_client() -> DevClient {
    dev_client(ORDERS_APP, ORDERS_OID, &[APP_ROLE], TokenVersion::V2)
}

pub fn legacy_client() -> DevClient {
    dev_client(LEGACY_APP, LEGACY_OID, &[APP_ROLE], TokenVersion::V1)
}

/// A development issuer for `TENANT`, started by the test itself (port 0, loopback).
pub async fn start_dev_issuer() -> DevIssuer {
    DevIssuer::start(DevIssuerConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        tenants: vec![DevTenant {
            tenant_id: TENANT.to_owned(),
            clients: vec![orders_client(), legacy_client()],
        }],
        token_lifetime: Duration::from_secs(3600),
    })
    .await
    .expect("dev issuer starts")
}

pub fn now() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

/// The claims of a v2 app-only token as Entra writes them, for `app` of `TENANT`.
pub fn v2_claims(dev: &DevIssuer, app: &str, oid: &str, roles: &[&str]) -> Value {
    let now = now();
    json!({
        "aud": API_GUID,
        "iss": dev.v2_issuer(TENANT),
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "azp": app,
        "azpacr": "1",
        "idtyp": "app",
        "oid": oid,
        "sub": oid,
        "tid": TENANT,
        "roles": roles,
        "ver": "2.0",
    })
}

/// The claims of a v1 app-only token, for `app` of `TENANT`.
pub fn v1_claims(dev: &DevIssuer, app: &str, oid: &str, roles: &[&str]) -> Value {
    let now = now();
    json!({
        "aud": AUDIENCE,
        "iss": dev.v1_issuer(TENANT),
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "appid": app,
        "appidacr": "1",
        "idtyp": "app",
        "oid": oid,
        "sub": oid,
        "tid": TENANT,
        "roles": roles,
        "ver": "1.0",
    })
}

/// A valid v2 token of orders-service, signed with the current key.
pub fn orders_token(dev: &DevIssuer) -> String {
    dev.mint_app_token(TENANT, &orders_client(), AUDIENCE)
        .expect("mint")
}

/// `claims` signed with the current key under a header naming `kid` (which may be unknown).
pub fn sign_with_kid(dev: &DevIssuer, kid: &str, claims: &Value) -> String {
    let header = json!({"alg": "RS256", "typ": "JWT", "kid": kid}).to_string();
    dev.sign_raw(&header, &claims.to_string()).expect("sign")
}

/// `claims` signed with the key `kid` (published, or already removed), under that kid.
pub fn sign_with_key(dev: &DevIssuer, kid: &str, claims: &Value) -> String {
    let header = json!({"alg": "RS256", "typ": "JWT", "kid": kid}).to_string();
    dev.sign_raw_with_key(kid, &header, &claims.to_string())
        .expect("sign")
}

/// A made-up kid nobody publishes.
pub fn random_kid() -> String {
    format!("unknown-{}", uuid::Uuid::new_v4().simple())
}

/// A decoded token segment (0 header, 1 claims).
pub fn segment(token: &str, index: usize) -> Value {
    let part = token.split('.').nth(index).expect("segment");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64url")).expect("json")
}

/// Polls `probe` until it yields `Some`, failing the test after `DEADLINE`.
pub async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asserts a deny with `reason`, and that `caller` is present exactly when the signature was verified.
pub fn assert_denied(response: &DecideResponse, reason: DenyReason, verified: bool) {
    assert!(!response.allowed, "expected {reason:?}, got {response:?}");
    assert_eq!(response.reason(), reason, "{response:?}");
    assert_eq!(
        response.caller.is_some(),
        verified,
        "caller must be present only for verified tokens: {response:?}"
    );
    assert!(response.application_user.is_none(), "{response:?}");
    assert!(response.security_role.is_none(), "{response:?}");
    assert!(response.effective_user_object_id.is_empty(), "{response:?}");
    assert!(!response.message.is_empty(), "a deny explains itself");
}

pub fn assert_allowed(response: &DecideResponse) {
    assert!(response.allowed, "expected allowed, got {response:?}");
    assert_eq!(response.reason(), DenyReason::Unspecified, "{response:?}");
}

/// A running server with clients on its decision port.
pub struct TestServer {
    pub running: Running,
    pub channel: Channel,
}

impl TestServer {
    /// Starts the server in-process from `config`: YAML → `config::resolve` → `server::start`.
    pub async fn start(config: &Config) -> TestServer {
        let file = config::parse_yaml(&config.yaml(), "test configuration").expect("yaml parses");
        let settings = config::resolve(file, &ServeArgs::default(), &MctSettings::default())
            .expect("configuration resolves");
        let running = server::start(settings).await.expect("server starts");
        let channel = Endpoint::from_shared(format!("http://{}", running.grpc_addr))
            .unwrap()
            .connect()
            .await
            .expect("connect to the decision port");
        TestServer { running, channel }
    }

    /// Starts and waits until health says SERVING (keys loaded).
    pub async fn start_ready(config: &Config) -> TestServer {
        let server = TestServer::start(config).await;
        server.wait_serving().await;
        server
    }

    /// The embedded development issuer.
    pub fn dev(&self) -> &DevIssuer {
        self.running
            .dev_issuer
            .as_ref()
            .expect("the configuration starts the development issuer")
    }

    pub fn native(&self) -> AuthorizerClient<Channel> {
        AuthorizerClient::new(self.channel.clone())
    }

    pub fn envoy(&self) -> AuthorizationClient<Channel> {
        AuthorizationClient::new(self.channel.clone())
    }

    pub fn health_client(&self) -> HealthClient<Channel> {
        HealthClient::new(self.channel.clone())
    }

    pub async fn health(&self, service: &str) -> ServingStatus {
        let response = self
            .health_client()
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .expect("health check answers")
            .into_inner();
        response.status()
    }

    pub async fn wait_serving(&self) {
        for service in HEALTH_SERVICES {
            eventually(&format!("health of {service:?} is SERVING"), || async {
                (self.health(service).await == ServingStatus::Serving).then_some(())
            })
            .await;
        }
    }

    pub fn request(
        token: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> DecideRequest {
        DecideRequest {
            token: token.to_owned(),
            context: Some(RequestContext {
                method: method.to_owned(),
                path: path.to_owned(),
                headers: headers
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                ..Default::default()
            }),
        }
    }

    /// `Decide` for `GET /orders` without extra headers.
    pub async fn decide(&self, token: &str) -> DecideResponse {
        self.decide_with(token, "GET", "/orders", &[]).await
    }

    pub async fn decide_with(
        &self,
        token: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> DecideResponse {
        let response = self
            .native()
            .decide(Self::request(token, method, path, headers))
            .await
            .expect("Decide returns OK")
            .into_inner();
        assert_no_token_in(&response.message, token);
        response
    }

    pub async fn explain(&self, token: &str) -> ExplainResponse {
        let response = self
            .native()
            .explain(Self::request(token, "GET", "/orders", &[]))
            .await
            .expect("Explain returns OK")
            .into_inner();
        for step in &response.trace {
            assert_no_token_in(&step.detail, token);
        }
        if let Some(decision) = &response.decision {
            assert_no_token_in(&decision.message, token);
        }
        response
    }

    /// Envoy's `Check` with the given request headers (lower-case keys, as Envoy sends them).
    pub async fn check(&self, headers: &[(&str, &str)]) -> CheckResponse {
        let headers: HashMap<String, String> = headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.check_http(attribute_context::HttpRequest {
            method: "GET".to_owned(),
            path: "/orders".to_owned(),
            host: "orders.internal".to_owned(),
            scheme: "https".to_owned(),
            protocol: "HTTP/1.1".to_owned(),
            headers,
            ..Default::default()
        })
        .await
    }

    pub async fn check_http(&self, http: attribute_context::HttpRequest) -> CheckResponse {
        self.envoy()
            .check(CheckRequest {
                attributes: Some(AttributeContext {
                    request: Some(attribute_context::Request {
                        time: None,
                        http: Some(http),
                    }),
                    ..Default::default()
                }),
            })
            .await
            .expect("the Check RPC itself always returns OK")
            .into_inner()
    }

    /// The body of `GET http://<metrics_addr><path>` and its status.
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        let response = reqwest::get(format!("http://{}{path}", self.running.metrics_addr))
            .await
            .expect("metrics port answers");
        let status = response.status().as_u16();
        (status, response.text().await.expect("body"))
    }

    pub async fn shutdown(self) {
        drop(self.channel);
        self.running.shutdown().await;
    }
}

/// Human text must never carry the token or any sizeable piece of it.
pub fn assert_no_token_in(text: &str, token: &str) {
    let token = token.trim();
    if token.is_empty() {
        return;
    }
    assert!(!text.contains(token), "the token leaked into {text:?}");
    for part in token.split(['.', ' ']).filter(|p| p.len() >= 16) {
        assert!(!text.contains(part), "a token segment leaked into {text:?}");
    }
}
