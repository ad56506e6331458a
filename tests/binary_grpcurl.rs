//! Black-box tests of the real `s2s-authz` binary driven by grpcurl 1.8.6, which speaks only server reflection
//! v1alpha: listing, describing and calling every service without proto files, health, decisions with real
//! tokens from the development issuer, Envoy's Check API, SIGHUP reload, SIGTERM and configuration errors.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use serde_json::{Value, json};
use std::time::{SystemTime, UNIX_EPOCH};
use support::{
    ALL_CLIENTS, BILLING, DEADLINE, Grpcurl, LEGACY_REPORTS, ORDERS, STRANGER, Sidecar, TENANT,
};

const AUTHORIZER: &str = "s2sauthz.v1.Authorizer";
const AUTHORIZATION: &str = "envoy.service.auth.v3.Authorization";
const HEALTH: &str = "grpc.health.v1.Health";
const DECIDE: &str = "s2sauthz.v1.Authorizer/Decide";
const EXPLAIN: &str = "s2sauthz.v1.Authorizer/Explain";
const CHECK: &str = "envoy.service.auth.v3.Authorization/Check";
const HEALTH_CHECK: &str = "grpc.health.v1.Health/Check";

/// The identity headers the sidecar sets on an allowed request (SPEC §2.2).
const IDENTITY_HEADERS: [&str; 6] = [
    "x-s2s-client-app-id",
    "x-s2s-tenant-id",
    "x-s2s-object-id",
    "x-s2s-application-user-id",
    "x-s2s-application-user-name",
    "x-s2s-security-role",
];

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// `reason` as grpcurl prints it: absent for the zero value.
fn reason(decision: &Value) -> &str {
    decision["reason"]
        .as_str()
        .unwrap_or("DENY_REASON_UNSPECIFIED")
}

fn allowed(decision: &Value) -> bool {
    decision["allowed"].as_bool().unwrap_or(false)
}

fn assert_denied(decision: &Value, expected: &str) {
    assert!(!allowed(decision), "expected a deny: {decision}");
    assert_eq!(reason(decision), expected, "{decision}");
    assert!(
        decision.get("applicationUser").is_none() && decision.get("securityRole").is_none(),
        "a deny resolves no application user: {decision}"
    );
}

/// The header options of an ext_authz response as (key, value, appendAction).
fn header_options(options: &Value) -> Vec<(String, String, String)> {
    options
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|o| {
            (
                o["header"]["key"].as_str().unwrap_or_default().to_owned(),
                o["header"]["value"].as_str().unwrap_or_default().to_owned(),
                o["appendAction"]
                    .as_str()
                    .unwrap_or("APPEND_IF_EXISTS_OR_ADD")
                    .to_owned(),
            )
        })
        .collect()
}

fn header_value<'a>(headers: &'a [(String, String, String)], key: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v, _)| v.as_str())
}

fn check_request(headers: Value) -> Value {
    json!({
        "attributes": {
            "request": {
                "http": {
                    "method": "GET",
                    "path": "/orders/42",
                    "host": "orders.internal",
                    "headers": headers,
                }
            }
        }
    })
}

#[test]
fn reflection_lists_and_describes_every_service_without_proto_files() {
    let Some(grpcurl) = Grpcurl::find("reflection_lists_and_describes_every_service") else {
        return;
    };
    let sidecar = Sidecar::start();

    let services = grpcurl.list(sidecar.grpc_addr, None);
    for service in [AUTHORIZER, AUTHORIZATION, HEALTH] {
        assert!(
            services.iter().any(|s| s == service),
            "decision port lists {service}: {services:?}"
        );
    }
    // grpcurl 1.8.6 prints methods as `package.Service.Method`.
    let methods = grpcurl.list(sidecar.grpc_addr, Some(AUTHORIZER));
    for method in [DECIDE, EXPLAIN] {
        let dotted = method.replace('/', ".");
        assert!(methods.contains(&dotted), "{methods:?}");
    }
    let methods = grpcurl.list(sidecar.grpc_addr, Some(AUTHORIZATION));
    assert!(methods.contains(&CHECK.replace('/', ".")), "{methods:?}");

    let admin = grpcurl.list(sidecar.admin_addr, None);
    assert!(
        admin.iter().any(|s| s == HEALTH),
        "admin port lists health: {admin:?}"
    );

    let out = grpcurl.run(&[&sidecar.grpc_addr.to_string(), "describe", AUTHORIZER]);
    assert!(out.success(), "{out:?}");
    assert!(out.stdout.contains("is a service"), "{out:?}");
    assert!(
        out.stdout.contains("rpc Decide") && out.stdout.contains("rpc Explain"),
        "{out:?}"
    );

    let out = grpcurl.run(&[
        &sidecar.grpc_addr.to_string(),
        "describe",
        "envoy.service.auth.v3.CheckRequest",
    ]);
    assert!(out.success(), "{out:?}");
    assert!(out.stdout.contains("is a message"), "{out:?}");
    assert!(
        out.stdout
            .contains(".envoy.service.auth.v3.AttributeContext attributes = 1"),
        "{out:?}"
    );

    // The reason codes are part of the contract: names without a prefix, stable numbers.
    let out = grpcurl.run(&[
        &sidecar.grpc_addr.to_string(),
        "describe",
        "s2sauthz.v1.DenyReason",
    ]);
    assert!(out.success(), "{out:?}");
    for value in [
        "DENY_REASON_UNSPECIFIED = 0",
        "TOKEN_MISSING = 1",
        "APPLICATION_NOT_ALLOWED = 12",
        "ROLE_MISSING = 14",
        "ISSUER_UNAVAILABLE = 18",
    ] {
        assert!(
            out.stdout.contains(value),
            "DenyReason has {value}: {out:?}"
        );
    }
}

/// grpcurl users call what `list` shows: every service either port advertises through reflection must be
/// served on that port (not UNIMPLEMENTED).
#[test]
fn every_listed_service_is_served_on_the_port_that_lists_it() {
    let Some(grpcurl) = Grpcurl::find("every_listed_service_is_served") else {
        return;
    };
    let sidecar = Sidecar::start();
    let mut unserved = Vec::new();
    for (port, addr) in [
        ("decision", sidecar.grpc_addr),
        ("admin", sidecar.admin_addr),
    ] {
        for service in grpcurl.list(addr, None) {
            if service.starts_with("grpc.reflection.") {
                continue;
            }
            // Prefer a read-only method; an empty request is refused by anything that writes.
            let methods = grpcurl.list(addr, Some(&service));
            let read_only = |m: &&String| {
                let name = m.rsplit('.').next().unwrap_or_default();
                ["Get", "List", "Check", "Decide"]
                    .iter()
                    .any(|p| name.starts_with(p))
            };
            let method = methods
                .iter()
                .find(read_only)
                .or(methods.first())
                .unwrap_or_else(|| panic!("{service} lists no methods"));
            let out = grpcurl.run(&["-max-time", "5", "-d", "{}", &addr.to_string(), method]);
            if out.stderr.contains("Code: Unimplemented") {
                unserved.push(format!("{port} port: {method}"));
            }
        }
    }
    assert!(
        unserved.is_empty(),
        "advertised by reflection but answered UNIMPLEMENTED: {unserved:?}"
    );
}

#[test]
fn health_is_serving_once_keys_are_loaded() {
    let Some(grpcurl) = Grpcurl::find("health_is_serving_once_keys_are_loaded") else {
        return;
    };
    let sidecar = Sidecar::start();
    support::poll("overall health SERVING", || {
        let out = grpcurl.run(&[&sidecar.grpc_addr.to_string(), HEALTH_CHECK]);
        (out.success() && out.json()["status"] == "SERVING").then_some(())
    });
    for service in [AUTHORIZER, AUTHORIZATION] {
        let status = grpcurl.call(
            sidecar.grpc_addr,
            HEALTH_CHECK,
            &json!({ "service": service }),
        );
        assert_eq!(status["status"], "SERVING", "{service}: {status}");
    }
    let status = grpcurl.call(sidecar.admin_addr, HEALTH_CHECK, &json!({}));
    assert_eq!(status["status"], "SERVING", "admin port: {status}");

    let out = grpcurl.run(&[
        "-d",
        r#"{"service":"no.such.Service"}"#,
        &sidecar.grpc_addr.to_string(),
        HEALTH_CHECK,
    ]);
    assert!(!out.success(), "unknown service: {out:?}");
    assert!(out.stderr.contains("NotFound"), "{out:?}");
}

#[test]
fn health_stays_not_serving_while_a_configured_tenant_has_no_keys() {
    let Some(grpcurl) = Grpcurl::find("health_stays_not_serving") else {
        return;
    };
    // A second configured tenant the development issuer does not know: its discovery keeps failing.
    const UNKNOWN: &str = "0a0b0c0d-0e0f-4a1b-8c2d-3e4f5a6b7c8d";
    let base = support::dev_config();
    let config = base.replace(
        &format!("tenants: [{TENANT}]"),
        &format!("tenants: [{TENANT}, {UNKNOWN}]"),
    );
    assert_ne!(
        config, base,
        "the development configuration names its tenant"
    );
    let sidecar = Sidecar::spawn(&config);
    sidecar.wait_for_log(&[UNKNOWN, "failed"]);

    for service in ["", AUTHORIZER, AUTHORIZATION] {
        let status = grpcurl.call(
            sidecar.grpc_addr,
            HEALTH_CHECK,
            &json!({ "service": service }),
        );
        assert_eq!(status["status"], "NOT_SERVING", "{service:?}: {status}");
    }
    let readyz = support::http_get(sidecar.metrics_addr, "/readyz").map(|(s, _)| s);
    assert_eq!(readyz, Some(503), "/readyz while keys are missing");
    let healthz = support::http_get(sidecar.metrics_addr, "/healthz").map(|(s, _)| s);
    assert_eq!(healthz, Some(200), "/healthz: the process is up");

    // The tenant that did load keeps deciding.
    support::poll("the loaded tenant's tokens to be allowed", || {
        allowed(&grpcurl.decide(sidecar.grpc_addr, &sidecar.token(&ORDERS))).then_some(())
    });
}

#[test]
fn decide_allows_and_denies_real_tokens_with_stable_reasons() {
    let Some(grpcurl) = Grpcurl::find("decide_allows_and_denies_real_tokens") else {
        return;
    };
    let sidecar = Sidecar::start();
    let addr = sidecar.grpc_addr;
    let orders = sidecar.token(&ORDERS);

    let mut user_ids = Vec::new();
    for token in [orders.clone(), format!("Bearer {orders}")] {
        let d = grpcurl.decide(addr, &token);
        assert!(allowed(&d), "orders-service is allowed: {d}");
        assert_eq!(reason(&d), "DENY_REASON_UNSPECIFIED", "{d}");
        let caller = &d["caller"];
        assert_eq!(caller["tenantId"], TENANT, "{d}");
        assert_eq!(caller["clientAppId"], ORDERS.client_id, "{d}");
        assert_eq!(caller["objectId"], ORDERS.object_id, "{d}");
        assert_eq!(caller["tokenVersion"], "2.0", "{d}");
        // int64 is a JSON string in the proto3 JSON mapping.
        let expires: i64 = caller["expiresAt"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("expiresAt is Unix seconds: {d}"));
        assert!(
            expires > now() && expires <= now() + 2 * 3600,
            "expiresAt {expires} is the token's exp: {d}"
        );
        let user = &d["applicationUser"];
        let id = user["id"].as_str().unwrap_or_default();
        assert!(!id.is_empty(), "application user id: {d}");
        user_ids.push(id.to_owned());
        assert_eq!(user["name"], "Orders Service (application user)", "{d}");
        assert_eq!(user["entryName"], "orders-service", "{d}");
        assert_eq!(d["securityRole"]["name"], "Orders Integration", "{d}");
        assert!(
            !d["message"].as_str().unwrap_or_default().contains(&orders),
            "messages never carry the token: {d}"
        );
    }
    assert_eq!(
        user_ids[0], user_ids[1],
        "the same caller resolves to the same application user"
    );

    let legacy = sidecar.token(&LEGACY_REPORTS);
    let d = grpcurl.decide(addr, &legacy);
    assert!(allowed(&d), "legacy-reports (v1 token) is allowed: {d}");
    assert_eq!(d["caller"]["tokenVersion"], "1.0", "{d}");
    assert_eq!(d["caller"]["clientAppId"], LEGACY_REPORTS.client_id, "{d}");
    assert_eq!(d["applicationUser"]["entryName"], "legacy-reports", "{d}");
    assert_eq!(d["securityRole"]["name"], "Orders Integration", "{d}");

    let stranger = sidecar.token(&STRANGER);
    let d = grpcurl.decide(addr, &stranger);
    assert_denied(&d, "APPLICATION_NOT_ALLOWED");
    // The signature was verified, so the caller's claims are reported.
    assert_eq!(d["caller"]["clientAppId"], STRANGER.client_id, "{d}");
    assert_eq!(d["caller"]["tenantId"], TENANT, "{d}");

    let billing = sidecar.token(&BILLING);
    let d = grpcurl.decide(addr, &billing);
    assert_denied(&d, "ROLE_MISSING");
    assert_eq!(d["caller"]["clientAppId"], BILLING.client_id, "{d}");

    let d = grpcurl.decide(addr, "garbage");
    assert_denied(&d, "TOKEN_MALFORMED");
    assert!(d.get("caller").is_none(), "no verified claims: {d}");

    let d = grpcurl.decide(addr, "");
    assert_denied(&d, "TOKEN_MISSING");
    assert!(d.get("caller").is_none(), "{d}");

    // A genuine token with a tampered signature: nothing in it may be reported.
    let mut tampered = orders.clone().into_bytes();
    let last = tampered.len() - 10;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let d = grpcurl.decide(addr, &tampered);
    assert_denied(&d, "SIGNATURE_INVALID");
    assert!(d.get("caller").is_none(), "unverified claims leak: {d}");

    // Decisions are logged, but never with a token or a client secret.
    sidecar.wait_for_log(&["decision", "token_hash", "SIGNATURE_INVALID"]);
    let logs = sidecar.logs().join("\n");
    for token in [&orders, &legacy, &stranger, &billing, &tampered] {
        let signature = token.rsplit('.').next().unwrap();
        assert!(!logs.contains(signature), "a token reached the logs");
    }
    for client in ALL_CLIENTS {
        assert!(
            !logs.contains(client.secret),
            "a client secret reached the logs"
        );
    }
}

#[test]
fn explain_returns_the_ordered_trace_of_checks() {
    let Some(grpcurl) = Grpcurl::find("explain_returns_the_ordered_trace") else {
        return;
    };
    let sidecar = Sidecar::start();
    let outcome = |trace: &Value, check: &str| -> (usize, String) {
        let steps = trace.as_array().expect("trace is a list");
        let (i, step) = steps
            .iter()
            .enumerate()
            .find(|(_, s)| s["check"] == check)
            .unwrap_or_else(|| panic!("no `{check}` step in {trace}"));
        (
            i,
            step["outcome"]
                .as_str()
                .unwrap_or("CHECK_OUTCOME_UNSPECIFIED")
                .to_owned(),
        )
    };

    let e = grpcurl.call(
        sidecar.grpc_addr,
        EXPLAIN,
        &json!({ "token": sidecar.token(&ORDERS) }),
    );
    assert!(allowed(&e["decision"]), "{e}");
    assert_eq!(
        e["decision"]["applicationUser"]["entryName"],
        "orders-service"
    );
    let (sig, sig_outcome) = outcome(&e["trace"], "signature");
    let (allow, allow_outcome) = outcome(&e["trace"], "allowlist");
    assert_eq!(sig_outcome, "PASSED", "{e}");
    assert_eq!(allow_outcome, "PASSED", "{e}");
    assert!(
        sig < allow,
        "signature is checked before the allowlist: {e}"
    );
    for step in e["trace"].as_array().unwrap() {
        assert_ne!(
            step["outcome"], "FAILED",
            "an allow has no failed check: {e}"
        );
    }

    let e = grpcurl.call(
        sidecar.grpc_addr,
        EXPLAIN,
        &json!({ "token": sidecar.token(&STRANGER) }),
    );
    assert_denied(&e["decision"], "APPLICATION_NOT_ALLOWED");
    assert_eq!(outcome(&e["trace"], "signature").1, "PASSED", "{e}");
    assert_eq!(outcome(&e["trace"], "allowlist").1, "FAILED", "{e}");
    let failed: Vec<&Value> = e["trace"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["outcome"] == "FAILED")
        .collect();
    assert_eq!(failed.len(), 1, "the first failure ends the checks: {e}");

    let e = grpcurl.call(sidecar.grpc_addr, EXPLAIN, &json!({ "token": "garbage" }));
    assert_denied(&e["decision"], "TOKEN_MALFORMED");
    assert_ne!(outcome(&e["trace"], "signature").1, "PASSED", "{e}");
}

#[test]
fn envoy_check_api_sets_identity_headers_and_strips_spoofed_ones() {
    let Some(grpcurl) = Grpcurl::find("envoy_check_api_sets_identity_headers") else {
        return;
    };
    let sidecar = Sidecar::start();
    let token = sidecar.token(&ORDERS);
    let response = grpcurl.call(
        sidecar.grpc_addr,
        CHECK,
        &check_request(json!({
            "authorization": format!("Bearer {token}"),
            "x-s2s-tenant-id": "evil",
            "x-s2s-custom": "x",
        })),
    );
    assert_eq!(
        response["status"]["code"].as_i64().unwrap_or(0),
        0,
        "status OK: {response}"
    );
    assert!(response.get("deniedResponse").is_none(), "{response}");
    let ok = &response["okResponse"];
    let headers = header_options(&ok["headers"]);
    for name in IDENTITY_HEADERS {
        let (_, value, action) = headers
            .iter()
            .find(|(k, _, _)| k == name)
            .unwrap_or_else(|| panic!("{name} is set: {response}"));
        assert!(!value.is_empty(), "{name}: {response}");
        assert_eq!(
            action, "OVERWRITE_IF_EXISTS_OR_ADD",
            "{name} overwrites, never appends: {response}"
        );
    }
    assert_eq!(
        header_value(&headers, "x-s2s-client-app-id"),
        Some(ORDERS.client_id)
    );
    assert_eq!(header_value(&headers, "x-s2s-tenant-id"), Some(TENANT));
    assert_eq!(
        header_value(&headers, "x-s2s-object-id"),
        Some(ORDERS.object_id)
    );
    assert_eq!(
        header_value(&headers, "x-s2s-application-user-name"),
        Some("Orders Service (application user)")
    );
    assert_eq!(
        header_value(&headers, "x-s2s-security-role"),
        Some("Orders Integration")
    );
    assert!(
        headers
            .iter()
            .all(|(_, v, _)| v != "evil" && !v.contains(&token)),
        "{response}"
    );
    let removed: Vec<&str> = ok["headersToRemove"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for name in ["x-s2s-custom", "x-s2s-effective-user"] {
        assert!(removed.contains(&name), "{name} is removed: {removed:?}");
    }
    for name in IDENTITY_HEADERS {
        assert!(
            !removed.contains(&name),
            "{name} is set, not removed: {removed:?}"
        );
    }
    let metadata = &response["dynamicMetadata"];
    assert_eq!(metadata["client_app_id"], ORDERS.client_id, "{response}");
    assert_eq!(metadata["tenant_id"], TENANT, "{response}");

    // Token problems: 401 with the RFC 6750 invalid_token challenge.
    let response = grpcurl.call(
        sidecar.grpc_addr,
        CHECK,
        &check_request(json!({ "authorization": "Bearer not.a.token" })),
    );
    assert!(response.get("okResponse").is_none(), "{response}");
    assert_eq!(
        response["status"]["code"], 16,
        "UNAUTHENTICATED: {response}"
    );
    let denied = &response["deniedResponse"];
    assert_eq!(denied["status"]["code"], "Unauthorized", "{response}");
    let headers = header_options(&denied["headers"]);
    assert_eq!(
        header_value(&headers, "www-authenticate"),
        Some(r#"Bearer error="invalid_token""#)
    );
    assert_eq!(
        header_value(&headers, "x-s2s-deny-reason"),
        Some("TOKEN_MALFORMED")
    );
    let body: Value = serde_json::from_str(denied["body"].as_str().unwrap_or_default())
        .unwrap_or_else(|e| panic!("deny body is JSON ({e}): {response}"));
    assert_eq!(body["reason"], "TOKEN_MALFORMED");
    assert_eq!(body["error"], "invalid_token");

    // No credentials: a bare challenge.
    let response = grpcurl.call(sidecar.grpc_addr, CHECK, &check_request(json!({})));
    let denied = &response["deniedResponse"];
    assert_eq!(denied["status"]["code"], "Unauthorized", "{response}");
    let headers = header_options(&denied["headers"]);
    assert_eq!(header_value(&headers, "www-authenticate"), Some("Bearer"));
    assert_eq!(
        header_value(&headers, "x-s2s-deny-reason"),
        Some("TOKEN_MISSING")
    );

    // Authorization problems: 403 with insufficient_scope.
    let response = grpcurl.call(
        sidecar.grpc_addr,
        CHECK,
        &check_request(json!({
            "authorization": format!("Bearer {}", sidecar.token(&STRANGER)),
        })),
    );
    assert_eq!(
        response["status"]["code"], 7,
        "PERMISSION_DENIED: {response}"
    );
    let denied = &response["deniedResponse"];
    assert_eq!(denied["status"]["code"], "Forbidden", "{response}");
    let headers = header_options(&denied["headers"]);
    assert_eq!(
        header_value(&headers, "www-authenticate"),
        Some(r#"Bearer error="insufficient_scope""#)
    );
    assert_eq!(
        header_value(&headers, "x-s2s-deny-reason"),
        Some("APPLICATION_NOT_ALLOWED")
    );
}

#[test]
fn sighup_reloads_the_allowlist_and_a_broken_file_keeps_the_last_good_one() {
    let Some(grpcurl) = Grpcurl::find("sighup_reloads_the_allowlist") else {
        return;
    };
    let sidecar = Sidecar::start();
    let orders = sidecar.token(&ORDERS);
    let legacy = sidecar.token(&LEGACY_REPORTS);
    assert!(allowed(&grpcurl.decide(sidecar.grpc_addr, &orders)));

    let config = std::fs::read_to_string(&sidecar.config_path).unwrap();
    std::fs::write(
        &sidecar.config_path,
        support::disable_entry(&config, "orders-service"),
    )
    .unwrap();
    sidecar.signal("HUP");
    let d = support::poll("Decide to answer APPLICATION_DISABLED after SIGHUP", || {
        let d = grpcurl.decide(sidecar.grpc_addr, &orders);
        (reason(&d) == "APPLICATION_DISABLED").then_some(d)
    });
    assert!(!allowed(&d), "{d}");
    assert!(
        allowed(&grpcurl.decide(sidecar.grpc_addr, &legacy)),
        "other entries are unaffected by the reload"
    );

    // A broken edit is refused; the last good configuration keeps serving.
    std::fs::write(&sidecar.config_path, "app_entries: [oops\n  - {").unwrap();
    sidecar.signal("HUP");
    sidecar.wait_for_log(&["reload refused"]);
    let mut sidecar = sidecar;
    assert!(
        sidecar.process.try_wait().is_none(),
        "a bad reload must not stop the process"
    );
    assert_eq!(
        reason(&grpcurl.decide(sidecar.grpc_addr, &orders)),
        "APPLICATION_DISABLED"
    );
    assert!(allowed(&grpcurl.decide(sidecar.grpc_addr, &legacy)));
    let health = grpcurl.call(sidecar.grpc_addr, HEALTH_CHECK, &json!({}));
    assert_eq!(health["status"], "SERVING", "{health}");
}

#[test]
fn sigterm_exits_cleanly() {
    let Some(grpcurl) = Grpcurl::find("sigterm_exits_cleanly") else {
        return;
    };
    let mut sidecar = Sidecar::start();
    // Serving requests proves start-up (signal handlers included) is complete.
    let health = grpcurl.call(sidecar.grpc_addr, HEALTH_CHECK, &json!({}));
    assert_eq!(health["status"], "SERVING", "{health}");
    sidecar.signal("TERM");
    let status = sidecar
        .wait_exit(DEADLINE)
        .unwrap_or_else(|| panic!("s2s-authz still runs {DEADLINE:?} after SIGTERM"));
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}"
    );
    let out = grpcurl.run(&[
        "-connect-timeout",
        "2",
        &sidecar.grpc_addr.to_string(),
        "list",
    ]);
    assert!(!out.success(), "the decision port is closed: {out:?}");
}

#[test]
fn bad_configuration_exits_2_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let base = support::dev_config();
    let cases = [
        (
            "unknown field",
            base.replace(
                "  require_client_type: false\n",
                "  require_client_type: false\n  audience_typo: [x]\n",
            ),
            "audience_typo",
        ),
        (
            "non-loopback development issuer",
            base.replace("  addr: 127.0.0.1:0\n", "  addr: 10.1.2.3:0\n"),
            "dev_issuer.addr",
        ),
        (
            "not a GUID",
            base.replace(
                "    client_app_id: 6a1f0c2b-3d4e-4f5a-8b6c-7d8e9f0a1b2c\n",
                "    client_app_id: orders\n",
            ),
            "app_entries[0].client_app_id",
        ),
        (
            // Refused before anything is bound, so the test never listens off loopback.
            "admin port off loopback without admin tokens",
            base.replace("admin_addr: 127.0.0.1:0\n", "admin_addr: 0.0.0.0:0\n")
                + "admin: { require_token: false }\n",
            "admin.require_token",
        ),
    ];
    for (what, config, field) in cases {
        assert_ne!(config, base, "{what}: the edit applies");
        let path = dir.path().join("bad.yaml");
        std::fs::write(&path, config).unwrap();
        let (status, stderr) = support::run_to_exit(&path);
        assert_eq!(
            status.code(),
            Some(2),
            "{what}: exit status; stderr: {stderr}"
        );
        assert!(
            stderr.contains(field),
            "{what}: the error names `{field}`: {stderr}"
        );
    }

    let missing = dir.path().join("missing.yaml");
    let (status, stderr) = support::run_to_exit(&missing);
    assert_eq!(status.code(), Some(2), "missing file; stderr: {stderr}");
    assert!(stderr.contains("missing.yaml"), "{stderr}");
}

/// SPEC §4: errors never contain a secret, even when the mistake sits next to one.
#[test]
fn configuration_errors_do_not_echo_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let base = support::dev_config();
    let config = base.replace(
        "          client_secret: dev-secret-reports\n",
        "          client_secret: dev-secret-reports\n          secret_typo: 1\n",
    );
    assert_ne!(config, base);
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, config).unwrap();
    let (status, stderr) = support::run_to_exit(&path);
    assert_eq!(status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("secret_typo"), "{stderr}");
    for client in ALL_CLIENTS {
        assert!(
            !stderr.contains(client.secret),
            "the error output echoes a client secret: {stderr}"
        );
    }
}

#[test]
fn sidecar_exits_when_killed_by_the_harness() {
    // The harness itself: dropping a Sidecar kills the process (no stray sidecars after a test).
    let sidecar = Sidecar::start();
    let pid = sidecar.process.id();
    drop(sidecar);
    let alive = std::process::Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(!alive, "process {pid} survived its guard");
}
