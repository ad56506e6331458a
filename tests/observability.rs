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
