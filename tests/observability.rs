//! Observability of the real binary, seen from outside as an operator sees it: the audit record of every
//! decision on stderr (JSON and text), the Prometheus metrics on `/metrics` moving as decisions, cache
//! hits, key fetches and registry changes happen, the Kubernetes probes, and spans exported over OTLP to
//! a collector run by the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, attribute_context,
};
use s2s_authz::proto::s2sauthz::v1::authorizer_client::AuthorizerClient;
use s2s_authz::proto::s2sauthz::v1::{DecideRequest, DecideResponse, RequestContext};
use serde_json::Value;
use std::collections::HashMap;
use std::net::SocketAddr;
use support::{BILLING, LogFormat, ORDERS, Options, Sidecar, TENANT, block_on, poll};

const AUDIT: &str = "s2s_authz::audit";

/// `Decide` over the native API, with request headers.
fn decide(addr: SocketAddr, token: &str, headers: &[(&str, &str)]) -> DecideResponse {
    let request = DecideRequest {
        token: token.to_owned(),
        context: Some(RequestContext {
            method: "GET".to_owned(),
            path: "/orders".to_owned(),
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Default::default()
        }),
    };
    block_on(async move {
        let mut client = AuthorizerClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        client.decide(request).await.unwrap().into_inner()
    })
}

/// Envoy's `Check` with `authorization: Bearer <token>`; returns whether it allowed.
fn check(addr: SocketAddr, token: &str) -> bool {
    let headers = HashMap::from([("authorization".to_owned(), format!("Bearer {token}"))]);
    block_on(async move {
        let mut client = AuthorizationClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let response = client
            .check(CheckRequest {
                attributes: Some(AttributeContext {
                    request: Some(attribute_context::Request {
                        time: None,
                        http: Some(attribute_context::HttpRequest {
                            method: "GET".to_owned(),
                            path: "/orders".to_owned(),
                            headers,
                            ..Default::default()
                        }),
                    }),
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner();
        response.status.is_some_and(|s| s.code == 0)
    })
}

/// The audit log's token hash, computed independently: SHA-256 of the token, first 8 bytes, hex.
fn token_hash(token: &str) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The token, or any sizeable piece of it, never appears in `line`.
fn assert_no_token(line: &str, token: &str) {
    assert!(!line.contains(token), "the token leaked into: {line}");
    for part in token.split('.').filter(|p| p.len() >= 16) {
        assert!(!line.contains(part), "a token segment leaked into: {line}");
    }
}

/// The audit records so far, waiting until there are at least `count`.
fn audit_records(sidecar: &Sidecar, format: LogFormat, count: usize) -> Vec<Value> {
    poll(&format!("{count} audit records"), || {
        let records: Vec<Value> = sidecar
            .records(format)
            .into_iter()
            .filter(|r| r["target"] == AUDIT)
            .collect();
        (records.len() >= count).then_some(records)
    })
}

/// The audit record with `api` and `token_hash`.
fn audit_of<'a>(records: &'a [Value], api: &str, hash: &str) -> &'a Value {
    records
        .iter()
        .map(|r| &r["fields"])
        .find(|f| f["api"] == api && f["token_hash"] == hash)
        .unwrap_or_else(|| {
            panic!("no audit record for {api} with token hash {hash:?} in {records:#?}")
        })
}

/// The fields every audit record carries, allow or deny, and what they must hold. `expected` names the
/// fields whose values are known; `latency_us` must be a whole number of microseconds (in JSON, a number).
fn assert_audit(record: &Value, format: LogFormat, expected: &[(&str, &str)]) {
    const FIELDS: [&str; 13] = [
        "message",
        "api",
        "decision",
        "reason",
        "token_hash",
        "tenant",
        "client_app_id",
        "application_user",
        "application_user_id",
        "role",
        "effective_user",
        "latency_us",
        "detail",
    ];
    for field in FIELDS {
        assert!(
            !record[field].is_null(),
            "audit field `{field}` missing: {record}"
        );
    }
    assert_eq!(record["message"], "decision", "{record}");
    for (field, value) in expected {
        assert_eq!(record[*field], *value, "audit field `{field}`: {record}");
    }
    let latency = &record["latency_us"];
    let whole = match format {
        LogFormat::Json => latency.is_u64(),
        LogFormat::Text => latency
            .as_str()
            .is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit())),
    };
    assert!(
        whole,
        "latency_us is a whole number of microseconds: {record}"
    );
}

/// Makes the same decisions in either format and checks their audit records.
fn audit_records_hold_every_field(format: LogFormat) {
    let options = Options {
        log_format: format,
        ..Options::default()
    };
    let sidecar = Sidecar::start_with(&support::dev_config(), &options);
    let addr = sidecar.grpc_addr;
    let orders = sidecar.token(&ORDERS);
    let billing = sidecar.token(&BILLING);
    let malformed = "not.a-token";

    assert!(decide(addr, &orders, &[]).allowed);
    assert!(check(addr, &orders));
    assert!(!decide(addr, &billing, &[]).allowed);
    assert!(!decide(addr, "", &[]).allowed);
    assert!(!decide(addr, malformed, &[]).allowed);

    let records = audit_records(&sidecar, format, 5);
    for record in &records {
        let time = record["timestamp"].as_str().unwrap_or_default();
        assert!(
            time.len() >= 20 && time.starts_with("20") && time.contains('T'),
            "every record has its time: {record}"
        );
        assert_eq!(record["level"], "INFO", "{record}");
        assert!(
            record.get("span").is_none() && record.get("spans").is_none(),
            "log lines carry no span context: {record}"
        );
    }
    let allowed = [
        ("decision", "allow"),
        ("reason", ""),
        ("tenant", TENANT),
        ("client_app_id", ORDERS.client_id),
        ("application_user", "Orders Service (application user)"),
        ("role", "Orders Integration"),
        ("effective_user", ""),
        ("detail", ""),
    ];
    for api in ["native", "ext_authz"] {
        let record = audit_of(&records, api, &token_hash(&orders));
        assert_audit(record, format, &allowed);
        let user_id = record["application_user_id"].as_str().unwrap_or_default();
        assert_eq!(user_id.len(), 36, "the application user's id: {record}");
    }

    let record = audit_of(&records, "native", &token_hash(&billing));
    assert_audit(
        record,
        format,
        &[
            ("decision", "deny"),
            ("reason", "ROLE_MISSING"),
            ("tenant", TENANT),
            ("client_app_id", BILLING.client_id),
            ("application_user", ""),
            ("role", ""),
        ],
    );
    assert!(
        record["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("S2SAppRole"),
        "a deny says why: {record}"
    );

    // No token: nothing to hash. A malformed one: hashed all the same, to correlate repeated attempts.
    let record = audit_of(&records, "native", "");
    assert_audit(
        record,
        format,
        &[
            ("reason", "TOKEN_MISSING"),
            ("tenant", ""),
            ("client_app_id", ""),
        ],
    );
    let record = audit_of(&records, "native", &token_hash(malformed));
    assert_audit(
        record,
        format,
        &[("reason", "TOKEN_MALFORMED"), ("tenant", "")],
    );

    for line in sidecar.logs() {
        assert_no_token(&line, &orders);
        assert_no_token(&line, &billing);
    }
}

#[test]
fn audit_records_in_json_hold_every_field_and_never_the_token() {
    audit_records_hold_every_field(LogFormat::Json);
}

#[test]
fn audit_records_in_text_hold_every_field_and_never_the_token() {
    audit_records_hold_every_field(LogFormat::Text);
}

// ---------------------------------------------------------------------------------------------------------
// OpenTelemetry

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use std::sync::{Arc, Mutex};

/// An OTLP/gRPC trace collector on 127.0.0.1:0 that keeps every export it receives; stops when dropped.
struct Collector {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Clone)]
struct Keep(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

#[tonic::async_trait]
impl TraceService for Keep {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    fn start() -> Self {
        let received = Arc::new(Mutex::new(Vec::new()));
        let service = TraceServiceServer::new(Keep(received.clone()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (bound, addr) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                bound.send(listener.local_addr().unwrap()).unwrap();
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::TcpListenerStream::new(listener),
                        async move {
                            let _ = stopped.await;
                        },
                    )
                    .await
                    .unwrap();
            });
        });
        Collector {
            addr: addr.recv().unwrap(),
            received,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Every span received so far, with its resource's attributes.
    fn spans(&self) -> Vec<(Vec<KeyValue>, Span)> {
        let mut out = Vec::new();
        for request in self.received.lock().unwrap().iter() {
            for resource_spans in &request.resource_spans {
                let resource = resource_spans
                    .resource
                    .as_ref()
                    .map(|r| r.attributes.clone())
                    .unwrap_or_default();
                for scope in &resource_spans.scope_spans {
                    for span in &scope.spans {
                        out.push((resource.clone(), span.clone()));
                    }
                }
            }
        }
        out
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A string attribute's value.
fn attr<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| match &v.value {
            Some(any_value::Value::StringValue(s)) => Some(s.as_str()),
            _ => None,
        })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn spans_go_to_an_otlp_collector_and_are_flushed_at_shutdown() {
    let collector = Collector::start();
    let options = Options {
        env: vec![
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
                format!("http://{}", collector.addr),
            ),
            ("OTEL_SERVICE_NAME".to_owned(), "s2s-authz-e2e".to_owned()),
            // Nothing goes out on the batch schedule within the test: what arrives was flushed at exit.
            ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "600000".to_owned()),
        ],
        ..Options::default()
    };
    let mut sidecar = Sidecar::start_with(&support::dev_config(), &options);
    sidecar.wait_for_log(&["exporting spans over OTLP"]);
    let addr = sidecar.grpc_addr;
    let orders = sidecar.token(&ORDERS);
    let billing = sidecar.token(&BILLING);

    // The caller's W3C trace context: the decision joins that trace.
    const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT_ID: &str = "00f067aa0ba902b7";
    let traceparent = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    assert!(decide(addr, &orders, &[("traceparent", &traceparent)]).allowed);
    assert!(decide(addr, &orders, &[]).allowed, "a token cache hit");
    assert!(!check(addr, &billing));
    assert!(
        collector.spans().iter().all(|(_, s)| s.name != "decision"),
        "no decision span is exported before shutdown on this schedule"
    );

    sidecar.signal("TERM");
    let status = sidecar
        .wait_exit(support::DEADLINE)
        .expect("s2s-authz exits after SIGTERM");
    assert!(status.success(), "{status:?}");

    // Export on, the log lines keep their shape: spans go to the collector, not into the logs.
    let audit: Vec<Value> = sidecar
        .records(LogFormat::Json)
        .into_iter()
        .filter(|r| r["target"] == AUDIT)
        .collect();
    assert_eq!(audit.len(), 3, "{audit:#?}");
    assert!(audit.iter().all(|r| r.get("spans").is_none()), "{audit:#?}");

    let spans = collector.spans();
    for (resource, span) in &spans {
        assert_eq!(
            attr(resource, "service.name"),
            Some("s2s-authz-e2e"),
            "{span:?}"
        );
        for kv in &span.attributes {
            let text = format!("{:?}", kv.value);
            assert_no_token(&text, &orders);
            assert_no_token(&text, &billing);
        }
    }
    let named = |name: &'static str| spans.iter().map(|(_, s)| s).filter(move |s| s.name == name);
    let decisions: Vec<&Span> = named("decision").collect();
    assert_eq!(decisions.len(), 3, "one span per decision: {decisions:#?}");

    let first = decisions
        .iter()
        .find(|s| hex(&s.trace_id) == TRACE_ID)
        .unwrap_or_else(|| panic!("the decision joined the caller's trace: {decisions:#?}"));
    assert_eq!(hex(&first.parent_span_id), PARENT_ID);
    let a = &first.attributes;
    assert_eq!(attr(a, "api"), Some("native"));
    assert_eq!(attr(a, "decision"), Some("allow"));
    assert_eq!(attr(a, "token_cache"), Some("miss"));
    assert_eq!(attr(a, "tenant"), Some(TENANT));
    assert_eq!(attr(a, "client_app_id"), Some(ORDERS.client_id));
    assert_eq!(attr(a, "token_hash"), Some(token_hash(&orders).as_str()));
    // Its stages are its children.
    for stage in [
        "decision.precheck",
        "decision.key_lookup",
        "decision.verify",
        "decision.authorize",
    ] {
        assert!(
            named(stage).any(|s| s.parent_span_id == first.span_id && s.trace_id == first.trace_id),
            "{stage} under the first decision: {spans:#?}"
        );
    }

    let hit = decisions
        .iter()
        .find(|s| attr(&s.attributes, "token_cache") == Some("hit"))
        .unwrap_or_else(|| panic!("the second decision was a cache hit: {decisions:#?}"));
    assert_ne!(
        hit.trace_id, first.trace_id,
        "a decision without context starts its own trace"
    );
    let denied = decisions
        .iter()
        .find(|s| attr(&s.attributes, "api") == Some("ext_authz"))
        .unwrap_or_else(|| panic!("the Check: {decisions:#?}"));
    assert_eq!(attr(&denied.attributes, "decision"), Some("deny"));
    assert_eq!(attr(&denied.attributes, "reason"), Some("ROLE_MISSING"));

    // Start-up discovered the tenant and fetched both of its key sets.
    assert!(
        named("issuer.discovery").any(|s| attr(&s.attributes, "tenant") == Some(TENANT)),
        "{spans:#?}"
    );
    let fetches: Vec<&Span> = named("jwks.fetch").collect();
    let v2_issuer = format!("{}{TENANT}/v2.0", sidecar.issuer_url());
    assert!(
        fetches.iter().any(
            |s| attr(&s.attributes, "issuer") == Some(v2_issuer.as_str())
                && attr(&s.attributes, "outcome") == Some("ok")
        ),
        "a key fetch of {v2_issuer}: {fetches:#?}"
    );
}

#[test]
fn span_export_that_is_not_built_in_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("s2s-authz.yaml");
    std::fs::write(&config, support::dev_config()).unwrap();
    for (args, env, expected) in [
        (
            vec!["--otlp-endpoint", "https://collector:4317"],
            vec![],
            "TLS to the collector is not built in",
        ),
        (
            vec![],
            vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ],
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
    ] {
        let output = support::binary()
            .args(["serve", "--config"])
            .arg(&config)
            .args(&args)
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?} {env:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?} {env:?}: {stderr}");
    }
}

// ---------------------------------------------------------------------------------------------------------
// Metrics and probes

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use s2s_authz::proto::s2sauthz::v1::registry_client::RegistryClient;
use s2s_authz::proto::s2sauthz::v1::{AppEntry, AppEntryKind, CreateAppEntryRequest};
use support::{STRANGER, metric};

/// One sample of a scrape, 0 when the series does not exist.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(text, name, labels).unwrap_or(0.0)
}

/// `token` with its header replaced by one naming `kid` (so its signature no longer matters: the key
/// lookup comes first).
fn with_kid(token: &str, kid: &str) -> String {
    let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": kid}).to_string();
    let (_, rest) = token.split_once('.').unwrap();
    format!("{}.{rest}", URL_SAFE_NO_PAD.encode(header))
}

#[test]
fn metrics_move_with_decisions_cache_hits_key_fetches_and_registry_changes() {
    // No minimum interval between key refreshes: a token naming an unknown `kid` fetches at once. A
    // store of its own: this test creates an entry.
    let data = tempfile::tempdir().unwrap();
    let config = format!(
        "data_dir: {}\n{}keys:\n  min_refresh_interval_secs: 0\n",
        data.path().display(),
        support::dev_config()
    );
    let sidecar = Sidecar::start_with_config(&config);
    let addr = sidecar.grpc_addr;
    let v1 = format!("https://sts.windows.net/{TENANT}/");
    let v2 = format!("{}{TENANT}/v2.0", sidecar.issuer_url());

    let before = sidecar.metrics();
    assert!(before.ends_with("# EOF\n"), "OpenMetrics text:\n{before}");
    assert_eq!(
        metric(
            &before,
            "s2s_authz_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0),
        "{before}"
    );
    for issuer in [&v1, &v2] {
        let labels = [("issuer", issuer.as_str()), ("outcome", "ok")];
        assert!(
            sample(&before, "s2s_authz_jwks_fetches_total", &labels) >= 1.0,
            "start-up fetched {issuer}'s keys:\n{before}"
        );
        assert!(
            metric(
                &before,
                "s2s_authz_key_set_age_seconds",
                &[("issuer", issuer)]
            )
            .is_some_and(|age| age >= 0.0),
            "{before}"
        );
    }
    assert_eq!(
        sample(&before, "s2s_authz_token_cache_capacity_entries", &[]),
        100_000.0
    );
    assert_eq!(sample(&before, "s2s_authz_token_cache_entries", &[]), 0.0);
    for (kind, count) in [
        ("app_entry", 3.0),
        ("application_user", 3.0),
        ("security_role", 1.0),
        ("user", 0.0),
        ("route", 0.0),
    ] {
        assert_eq!(
            metric(&before, "s2s_authz_registry_resources", &[("kind", kind)]),
            Some(count),
            "{kind}:\n{before}"
        );
    }
    assert_eq!(
        sample(&before, "s2s_authz_registry_change_lag_seconds_count", &[]),
        0.0,
        "an embedded store has no changes made elsewhere"
    );

    // Decisions: allowed (verified, then twice from the cache, once through Envoy's API), and denied.
    let orders = sidecar.token(&ORDERS);
    let billing = sidecar.token(&BILLING);
    assert!(decide(addr, &orders, &[]).allowed);
    assert!(decide(addr, &orders, &[]).allowed);
    assert!(check(addr, &orders));
    assert!(!decide(addr, &billing, &[]).allowed);
    let after = sidecar.metrics();
    let delta = |name: &str, labels: &[(&str, &str)]| {
        sample(&after, name, labels) - sample(&before, name, labels)
    };
    let decisions = "s2s_authz_decisions_total";
    assert_eq!(
        delta(decisions, &[("decision", "allow"), ("reason", "")]),
        3.0
    );
    assert_eq!(
        delta(
            decisions,
            &[("decision", "deny"), ("reason", "ROLE_MISSING")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            decisions,
            &[("decision", "deny"), ("reason", "TOKEN_MISSING")]
        ),
        0.0
    );
    assert_eq!(
        delta("s2s_authz_token_cache_hits_total", &[]),
        2.0,
        "{after}"
    );
    assert_eq!(delta("s2s_authz_token_cache_misses_total", &[]), 2.0);
    assert_eq!(sample(&after, "s2s_authz_token_cache_entries", &[]), 2.0);
    let duration = "s2s_authz_decision_duration_seconds";
    for (api, count) in [("native", 3.0), ("ext_authz", 1.0)] {
        let labels = [("api", api)];
        assert_eq!(delta(&format!("{duration}_count"), &labels), count, "{api}");
        let inf = [("api", api), ("le", "+Inf")];
        assert_eq!(delta(&format!("{duration}_bucket"), &inf), count, "{api}");
        let sum = sample(&after, &format!("{duration}_sum"), &labels);
        assert!(sum > 0.0 && sum < 20.0, "{api}: {sum} s");
        // Buckets are cumulative: never fewer below a larger bound.
        let mut last = 0.0;
        for le in s2s_authz::metrics::DECISION_BUCKETS {
            let bucket = [("api", api), ("le", &le.to_string())];
            let n = metric(&after, &format!("{duration}_bucket"), &bucket)
                .unwrap_or_else(|| panic!("bucket le={le} of {api}:\n{after}"));
            assert!(n >= last, "{api} le={le}: {n} < {last}");
            last = n;
        }
    }

    // A token naming a `kid` the key set lacks makes the sidecar fetch the keys again: one more fetch,
    // and the key set's age starts over.
    let age = |text: &str| {
        metric(text, "s2s_authz_key_set_age_seconds", &[("issuer", &v2)])
            .unwrap_or_else(|| panic!("key set age of {v2}:\n{text}"))
    };
    let aged = poll("the v2 key set to be 1.5 s old", || {
        let text = sidecar.metrics();
        (age(&text) >= 1.5).then_some(text)
    });
    let fetched = [("issuer", v2.as_str()), ("outcome", "ok")];
    let fetches = sample(&aged, "s2s_authz_jwks_fetches_total", &fetched);
    let reason = decide(addr, &with_kid(&orders, "unpublished-kid"), &[]).reason();
    assert_eq!(
        reason,
        s2s_authz::proto::s2sauthz::v1::DenyReason::KeyNotFound
    );
    let refreshed = poll("a JWKS fetch after the unknown kid", || {
        let text = sidecar.metrics();
        (sample(&text, "s2s_authz_jwks_fetches_total", &fetched) > fetches).then_some(text)
    });
    assert_eq!(
        sample(&refreshed, "s2s_authz_jwks_fetches_total", &fetched),
        fetches + 1.0
    );
    assert!(
        age(&refreshed) < age(&aged),
        "the age restarts at the fetch: {} s, before {} s",
        age(&refreshed),
        age(&aged)
    );

    // A registry change: an app entry (and its application user) created through the admin API.
    let admin = sidecar.admin_addr;
    block_on(async move {
        let mut client = RegistryClient::connect(format!("http://{admin}"))
            .await
            .unwrap();
        client
            .create_app_entry(CreateAppEntryRequest {
                entry: Some(AppEntry {
                    name: "stranger".to_owned(),
                    tenant_id: TENANT.to_owned(),
                    client_app_id: STRANGER.client_id.to_owned(),
                    kind: AppEntryKind::ClientCredentials as i32,
                    enabled: true,
                    ..Default::default()
                }),
                security_role: "Orders Integration".to_owned(),
                ..Default::default()
            })
            .await
            .unwrap();
    });
    let changed = sidecar.metrics();
    for (kind, count) in [("app_entry", 4.0), ("application_user", 4.0)] {
        assert_eq!(
            metric(&changed, "s2s_authz_registry_resources", &[("kind", kind)]),
            Some(count),
            "{kind}:\n{changed}"
        );
    }
}

/// `GET http://addr/path`: status, `content-type` and body.
fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let url = format!("http://{addr}{path}");
    block_on(async move {
        let response = support::http_client().get(&url).send().await.unwrap();
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        (status, content_type, response.text().await.unwrap())
    })
}

#[test]
fn probes_answer_as_kubernetes_expects() {
    // A second configured tenant the development issuer does not know: never ready, always live.
    const UNKNOWN: &str = "0a0b0c0d-0e0f-4a1b-8c2d-3e4f5a6b7c8d";
    let base = support::dev_config();
    let never_ready = base.replace(
        &format!("tenants: [{TENANT}]"),
        &format!("tenants: [{TENANT}, {UNKNOWN}]"),
    );
    assert_ne!(never_ready, base);
    let stuck = Sidecar::spawn(&never_ready);
    stuck.wait_for_log(&[UNKNOWN, "failed"]);
    let ready = Sidecar::start();

    for sidecar in [&stuck, &ready] {
        let (status, content_type, body) = get(sidecar.metrics_addr, "/healthz");
        assert_eq!((status, body.as_str()), (200, "ok\n"), "liveness");
        assert!(content_type.starts_with("text/plain"), "{content_type}");
    }
    let (status, content_type, body) = get(stuck.metrics_addr, "/readyz");
    assert_eq!(
        (status, body.as_str()),
        (503, "signing keys not loaded\n"),
        "not ready while a configured tenant has no keys"
    );
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let (status, _, body) = get(ready.metrics_addr, "/readyz");
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    let (status, content_type, _) = get(ready.metrics_addr, "/metrics");
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let (status, _, _) = get(ready.metrics_addr, "/no-such-path");
    assert_eq!(status, 404);
}
