//! Transport security of the real binary: TLS and mutual TLS on the decision and admin ports with real
//! clients (tonic, tokio-rustls, grpcurl, the registry CLI), certificates reloaded without a restart
//! (new connections get the new one, old connections keep working, broken replacements are refused),
//! bad files refused at start, handshakes that never hold up the accept loop, and the ext_authz
//! `source.principal` (SPIFFE id) bound to app entries. Certificates are made here with rcgen.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse, attribute_context, check_response,
};
use s2s_authz::proto::s2sauthz::v1::authorizer_client::AuthorizerClient;
use s2s_authz::proto::s2sauthz::v1::registry_client::RegistryClient;
use s2s_authz::proto::s2sauthz::v1::{self as pb, CheckOutcome, DecideRequest, RequestContext};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::pki::{self, Ca, Leaf};
use support::{LEGACY_REPORTS, ORDERS, Sidecar, add_to_entry, block_on, dev_config, poll};

const ORDERS_WORKLOAD: &str = "spiffe://cluster.local/ns/orders/sa/orders";
const BILLING_WORKLOAD: &str = "spiffe://cluster.local/ns/billing/sa/billing";

/// A port's TLS section of the configuration file.
fn tls_section(
    section: &str,
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
    require: bool,
) -> String {
    let mut s = format!(
        "{section}:\n  cert_file: {}\n  key_file: {}\n",
        cert.display(),
        key.display()
    );
    if let Some(ca) = client_ca {
        s.push_str(&format!(
            "  client_ca_file: {}\n  require_client_cert: {require}\n",
            ca.display()
        ));
    }
    s
}

async fn decide(
    channel: tonic::transport::Channel,
    token: &str,
) -> Result<pb::DecideResponse, String> {
    AuthorizerClient::new(channel)
        .decide(DecideRequest {
            token: token.to_owned(),
            context: None,
        })
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| format!("{}: {}", s.code(), pki::error_chain(&s)))
}

/// `Decide` over a fresh TLS connection: the handshake and the call, either of which may refuse.
async fn decide_over_tls(
    addr: SocketAddr,
    ca: &str,
    identity: Option<&Leaf>,
    token: &str,
) -> Result<pb::DecideResponse, String> {
    decide(pki::channel(addr, ca, identity).await?, token).await
}

async fn list_entries_over_tls(
    addr: SocketAddr,
    ca: &str,
    identity: Option<&Leaf>,
) -> Result<Vec<String>, String> {
    let channel = pki::channel(addr, ca, identity).await?;
    let listed = RegistryClient::new(channel)
        .list_app_entries(pb::ListRequest::default())
        .await
        .map_err(|s| format!("{}: {}", s.code(), pki::error_chain(&s)))?
        .into_inner();
    Ok(listed.app_entries.into_iter().map(|e| e.name).collect())
}

/// The value of a counter line of `/metrics`, 0 when absent.
fn counter(sidecar: &Sidecar, series: &str) -> u64 {
    let (_, body) = support::http_get(sidecar.metrics_addr, "/metrics").unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

#[test]
fn tls_and_mutual_tls_on_both_ports_with_real_clients() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("s2s-authz test CA");
    let rogue = Ca::new("rogue CA");
    let ca_path = ca.write(dir.path(), "ca");
    let (cert, key) = ca.server("s2s-authz").write(dir.path(), "server");
    let workload = ca.workload(ORDERS_WORKLOAD);
    let (workload_cert, workload_key) = workload.write(dir.path(), "workload");
    let impostor = rogue.workload(ORDERS_WORKLOAD);
    let rogue_server_trust = rogue.cert_pem.clone();

    // Decision port: TLS with optional client certificates; admin port: mutual TLS, required.
    let config = format!(
        "{}{}{}",
        dev_config(),
        tls_section("grpc_tls", &cert, &key, Some(&ca_path), false),
        tls_section("admin_tls", &cert, &key, Some(&ca_path), true),
    );
    let sidecar = Sidecar::start_with_config(&config);
    let line = sidecar.wait_for_log(&["s2s-authz listening"]);
    assert!(
        line.contains(r#""grpc_tls":"mtls""#) && line.contains(r#""admin_tls":"mtls""#),
        "{line}"
    );
    let token = sidecar.token(&ORDERS);
    let (grpc, admin, ca_pem) = (sidecar.grpc_addr, sidecar.admin_addr, ca.cert_pem.clone());

    let (t, c) = (token.clone(), ca_pem.clone());
    let (w, i) = (workload.clone(), impostor.clone());
    block_on(async move {
        // Decision port: with or without a client certificate of the CA, allowed.
        let allowed = decide_over_tls(grpc, &c, None, &t).await.unwrap();
        assert!(allowed.allowed, "{}", allowed.message);
        let allowed = decide_over_tls(grpc, &c, Some(&w), &t).await.unwrap();
        assert!(allowed.allowed, "{}", allowed.message);
        // A certificate from another CA is refused even where certificates are optional.
        let refused = decide_over_tls(grpc, &c, Some(&i), &t).await;
        assert!(
            refused.is_err(),
            "a client certificate of an unknown CA: {refused:?}"
        );
        // A client that does not trust the sidecar's CA stops at the handshake.
        let distrust = decide_over_tls(grpc, &rogue_server_trust, None, &t)
            .await
            .unwrap_err();
        assert!(
            distrust.contains("UnknownIssuer") || distrust.contains("certificate"),
            "{distrust}"
        );
        // Plaintext gRPC to a TLS port gets nowhere.
        let plain = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
            .unwrap()
            .timeout(Duration::from_secs(5))
            .connect()
            .await;
        if let Ok(channel) = plain {
            assert!(decide(channel, &t).await.is_err(), "plaintext answered");
        }

        // Admin port: only with a client certificate of the CA.
        let names = list_entries_over_tls(admin, &c, Some(&w)).await.unwrap();
        assert!(names.contains(&"orders-service".to_owned()), "{names:?}");
        let no_cert = list_entries_over_tls(admin, &c, None).await;
        assert!(no_cert.is_err(), "no client certificate: {no_cert:?}");
        let impostor = list_entries_over_tls(admin, &c, Some(&i)).await;
        assert!(impostor.is_err(), "an impostor's certificate: {impostor:?}");
    });
    sidecar.wait_for_log(&["TLS handshake failed", r#""port":"admin""#]);

    // The registry CLI over mutual TLS: https:// with a CA and a client certificate; a bare host:port
    // with TLS options means TLS too; without the client certificate it fails, and says so.
    let cli = |args: &[&str]| {
        support::binary()
            .arg("registry")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let https = format!("https://{admin}");
    let (ca_arg, cert_arg, key_arg) = (
        ca_path.to_str().unwrap(),
        workload_cert.to_str().unwrap(),
        workload_key.to_str().unwrap(),
    );
    let out = cli(&[
        "entries",
        "list",
        "--json",
        "--admin-addr",
        &https,
        "--admin-ca",
        ca_arg,
        "--admin-client-cert",
        cert_arg,
        "--admin-client-key",
        key_arg,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "orders-service"),
        "{listed}"
    );
    let bare = admin.to_string();
    let out = cli(&[
        "roles",
        "list",
        "--admin-addr",
        &bare,
        "--admin-ca",
        ca_arg,
        "--admin-client-cert",
        cert_arg,
        "--admin-client-key",
        key_arg,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Orders Integration"));
    let out = cli(&[
        "roles",
        "list",
        "--admin-addr",
        &https,
        "--admin-ca",
        ca_arg,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Under TLS 1.3 the refusal arrives as an alert after the handshake; whether the CLI reads it
    // (`CertificateRequired`) before the connection closes is a race, so only the failure is certain.
    assert!(
        stderr.starts_with("error: ") && !stderr.contains("orders-service"),
        "{stderr}"
    );
    let out = cli(&[
        "roles",
        "list",
        "--admin-addr",
        &format!("http://{admin}"),
        "--admin-ca",
        ca_arg,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("need an https:// admin address"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // grpcurl, the way the README shows it: reflection and a call over TLS, and over mutual TLS.
    if let Some(grpcurl) =
        support::Grpcurl::find("tls_and_mutual_tls_on_both_ports_with_real_clients")
    {
        let run = |args: &[&str]| {
            Command::new(&grpcurl.path)
                .args(["-max-time", "20"])
                .args(args)
                .stdin(Stdio::null())
                .output()
                .unwrap()
        };
        let out = run(&["-cacert", ca_arg, &grpc.to_string(), "list"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("envoy.service.auth.v3.Authorization")
        );
        let body = serde_json::json!({ "token": token }).to_string();
        let out = run(&[
            "-cacert",
            ca_arg,
            "-d",
            &body,
            &grpc.to_string(),
            "s2sauthz.v1.Authorizer/Decide",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains(r#""allowed": true"#));
        let out = run(&[
            "-cacert",
            ca_arg,
            "-cert",
            cert_arg,
            "-key",
            key_arg,
            &admin.to_string(),
            "s2sauthz.v1.Registry/ListAppEntries",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("orders-service"));
        let out = run(&["-cacert", ca_arg, &admin.to_string(), "list"]);
        assert!(
            !out.status.success(),
            "the admin port answered without a client certificate"
        );
    }
}

#[test]
fn certificates_are_reloaded_without_a_restart_and_broken_ones_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("s2s-authz test CA");
    let first = ca.server("first");
    let (cert, key) = first.write(dir.path(), "server");
    let config = format!(
        "{}{}",
        dev_config(),
        tls_section("grpc_tls", &cert, &key, None, false)
    );
    let sidecar = Sidecar::start_with_config(&config);
    let token = sidecar.token(&ORDERS);
    let (grpc, ca_pem) = (sidecar.grpc_addr, ca.cert_pem.clone());
    // Every handshake this test completes, to compare with the server's count.
    let completed = std::cell::Cell::new(0u64);
    let served = |ca_pem: &str| {
        let ca_pem = ca_pem.to_owned();
        let served = block_on(async move { pki::served_certificate(grpc, &ca_pem).await });
        if served.is_ok() {
            completed.set(completed.get() + 1);
        }
        served
    };
    assert_eq!(served(&ca_pem).unwrap(), first.der);

    // A connection made now, used before and after the reload.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let old = runtime.block_on(pki::channel(grpc, &ca_pem, None)).unwrap();
    completed.set(completed.get() + 1);
    let answer = runtime.block_on(decide(old.clone(), &token)).unwrap();
    assert!(answer.allowed, "{}", answer.message);

    // Replaced the way deploy tools do it: key, then certificate, each renamed into place.
    let second = ca.server("second");
    pki::replace(&key, &second.key_pem);
    pki::replace(&cert, &second.cert_pem);
    poll("a new connection to be served the new certificate", || {
        (served(&ca_pem).ok()? == second.der).then_some(())
    });
    sidecar.wait_for_log(&["TLS certificate reloaded"]);
    // The server counts a handshake when it has read the client's last message, which may be just
    // after the client is done: wait until it has counted all of ours.
    let handshakes = r#"s2s_authz_tls_handshakes_total{port="decision",outcome="ok"}"#;
    poll("the server to count every completed handshake", || {
        (counter(&sidecar, handshakes) == completed.get()).then_some(())
    });
    let answer = runtime.block_on(decide(old.clone(), &token)).unwrap();
    assert!(
        answer.allowed,
        "the old connection still works: {}",
        answer.message
    );
    assert_eq!(
        counter(&sidecar, handshakes),
        completed.get(),
        "it was served on the connection made before the reload, not a new one"
    );

    // Not PEM: refused, the error names the file, and the current certificate keeps serving.
    pki::replace(
        &cert,
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
    );
    let refused = sidecar.wait_for_log(&["TLS reload refused", "server.crt"]);
    assert!(refused.contains("not valid base64"), "{refused}");
    assert_eq!(served(&ca_pem).unwrap(), second.der);

    // A certificate whose key is not the one in the key file: refused too.
    let third = ca.server("third");
    pki::replace(&cert, &third.cert_pem);
    sidecar.wait_for_log(&[
        "TLS reload refused",
        "is not the private key of the certificate",
    ]);
    assert_eq!(served(&ca_pem).unwrap(), second.der);

    // The matching key arrives: the pair loads.
    pki::replace(&key, &third.key_pem);
    poll("the repaired pair to be served", || {
        (served(&ca_pem).ok()? == third.der).then_some(())
    });
    let answer = runtime.block_on(decide(old, &token)).unwrap();
    assert!(answer.allowed, "{}", answer.message);
    assert!(
        counter(
            &sidecar,
            r#"s2s_authz_tls_reloads_total{port="decision",outcome="refused"}"#
        ) >= 2
    );
    assert!(
        counter(
            &sidecar,
            r#"s2s_authz_tls_reloads_total{port="decision",outcome="reloaded"}"#
        ) >= 2
    );

    // No key material in any log line.
    for leaf in [&first, &second, &third] {
        let body: String = leaf
            .key_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        for line in sidecar.logs() {
            assert!(!line.contains(&body[..40]), "key material logged: {line}");
        }
    }
}

#[test]
fn bad_tls_files_stop_the_start_with_errors_that_name_them() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("s2s-authz test CA");
    let (cert, key) = ca.server("one").write(dir.path(), "one");
    let (_, other_key) = ca.server("two").write(dir.path(), "two");
    let secret_line = "c2VjcmV0LWtleS1tYXRlcmlhbC10aGF0LW11c3Qtbm90LWxlYWs=";
    let broken_key = dir.path().join("broken.key");
    std::fs::write(
        &broken_key,
        format!("-----BEGIN PRIVATE KEY-----\n{secret_line}\n"),
    )
    .unwrap();
    let missing = dir.path().join("missing.crt");
    let client_ca_not_a_ca = dir.path().join("empty-ca.crt");
    std::fs::write(&client_ca_not_a_ca, "no certificates here\n").unwrap();

    let start = |tls: String| {
        let path = dir.path().join("s2s-authz.yaml");
        std::fs::write(&path, format!("{}{tls}", dev_config())).unwrap();
        let (status, stderr) = support::run_to_exit(&path);
        (status.code(), stderr)
    };
    let cases: [(String, Option<i32>, Vec<String>); 5] = [
        (
            tls_section("grpc_tls", &cert, &other_key, None, false),
            Some(1),
            vec![
                "TLS on the decision port".to_owned(),
                format!(
                    "`{}` is not the private key of the certificate in `{}`",
                    other_key.display(),
                    cert.display()
                ),
            ],
        ),
        (
            tls_section("admin_tls", &missing, &key, None, false),
            Some(1),
            vec![
                "TLS on the admin port".to_owned(),
                format!("reading `{}`", missing.display()),
            ],
        ),
        (
            tls_section("grpc_tls", &cert, &broken_key, None, false),
            Some(1),
            vec![format!(
                "`{}`: a PEM section has no END line",
                broken_key.display()
            )],
        ),
        (
            tls_section("grpc_tls", &cert, &key, Some(&client_ca_not_a_ca), true),
            Some(1),
            vec![format!(
                "`{}` holds no PEM certificate",
                client_ca_not_a_ca.display()
            )],
        ),
        (
            format!("grpc_tls:\n  cert_file: {}\n", cert.display()),
            Some(2),
            vec!["`grpc_tls.key_file`: is required with a certificate".to_owned()],
        ),
    ];
    for (tls, code, expected) in cases {
        let (exit, stderr) = start(tls.clone());
        assert_eq!(exit, code, "{tls}\n{stderr}");
        for text in expected {
            assert!(
                stderr.contains(&text),
                "`{text}` missing for\n{tls}\n{stderr}"
            );
        }
        assert!(
            !stderr.contains(secret_line),
            "key material in the error: {stderr}"
        );
    }
}

#[test]
fn handshakes_never_hold_up_the_accept_loop_and_time_out() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("s2s-authz test CA");
    let (cert, key) = ca.server("s2s-authz").write(dir.path(), "server");
    let config = format!(
        "{}{}tls_handshake_timeout_ms: 500\n",
        dev_config(),
        tls_section("grpc_tls", &cert, &key, None, false)
    );
    let sidecar = Sidecar::start_with_config(&config);
    let token = sidecar.token(&ORDERS);
    let grpc = sidecar.grpc_addr;

    // Clients that connect and never say hello, and one that speaks plaintext HTTP to the TLS port.
    let mut stalled: Vec<TcpStream> = (0..8).map(|_| TcpStream::connect(grpc).unwrap()).collect();
    let mut garbage = TcpStream::connect(grpc).unwrap();
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();

    // Meanwhile a real client is served at once.
    let (ca_pem, t) = (ca.cert_pem.clone(), token.clone());
    let answer = block_on(async move { decide_over_tls(grpc, &ca_pem, None, &t).await }).unwrap();
    assert!(answer.allowed, "{}", answer.message);

    // The stalled ones are cut off after the timeout (bounded here by a generous read timeout).
    for stream in &mut stalled {
        stream.set_read_timeout(Some(support::DEADLINE)).unwrap();
        let started = Instant::now();
        let mut buf = [0u8; 1];
        match stream.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!("the server sent {n} bytes to a client that never said hello"),
            Err(e) => assert!(
                matches!(e.kind(), std::io::ErrorKind::ConnectionReset),
                "not closed by the server within {:?}: {e}",
                started.elapsed()
            ),
        }
    }
    sidecar.wait_for_log(&["TLS handshake timed out", r#""port":"decision""#]);
    sidecar.wait_for_log(&["TLS handshake failed", r#""port":"decision""#]);
    // Counted before the server closes the connection (and before it logs why), so already there.
    assert!(
        counter(
            &sidecar,
            r#"s2s_authz_tls_handshakes_total{port="decision",outcome="timeout"}"#
        ) >= 8
    );
    assert!(
        counter(
            &sidecar,
            r#"s2s_authz_tls_handshakes_total{port="decision",outcome="failed"}"#
        ) >= 1
    );

    // And it goes on serving.
    let ca_pem = ca.cert_pem.clone();
    let answer =
        block_on(async move { decide_over_tls(grpc, &ca_pem, None, &token).await }).unwrap();
    assert!(answer.allowed, "{}", answer.message);
}

async fn check(addr: SocketAddr, token: &str, principal: Option<&str>) -> CheckResponse {
    let mut client = AuthorizationClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let request = CheckRequest {
        attributes: Some(AttributeContext {
            source: principal.map(|p| attribute_context::Peer {
                principal: p.to_owned(),
                ..Default::default()
            }),
            request: Some(attribute_context::Request {
                time: None,
                http: Some(attribute_context::HttpRequest {
                    method: "GET".to_owned(),
                    path: "/orders".to_owned(),
                    headers: [("authorization".to_owned(), format!("Bearer {token}"))]
                        .into_iter()
                        .collect(),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }),
    };
    client.check(request).await.unwrap().into_inner()
}

/// `None` when allowed, else the HTTP status and `x-s2s-deny-reason`.
fn denial(response: &CheckResponse) -> Option<(i32, String)> {
    match &response.http_response {
        Some(check_response::HttpResponse::OkResponse(_)) => None,
        Some(check_response::HttpResponse::DeniedResponse(d)) => {
            let reason = d
                .headers
                .iter()
                .filter_map(|h| h.header.as_ref())
                .find(|h| h.key == "x-s2s-deny-reason")
                .map(|h| h.value.clone())
                .unwrap_or_default();
            Some((
                d.status.as_ref().map(|s| s.code).unwrap_or_default(),
                reason,
            ))
        }
        other => panic!("not an allow or a deny: {other:?}"),
    }
}

#[test]
fn ext_authz_source_principal_must_be_one_of_the_entry_s_workloads() {
    let config = add_to_entry(
        &dev_config(),
        "orders-service",
        &format!("source_principals: [\"{ORDERS_WORKLOAD}\"]"),
    );
    let sidecar = Sidecar::start_with_config(&config);
    let orders = sidecar.token(&ORDERS);
    let legacy = sidecar.token(&LEGACY_REPORTS);
    let (grpc, admin) = (sidecar.grpc_addr, sidecar.admin_addr);

    let (o, l) = (orders.clone(), legacy.clone());
    block_on(async move {
        assert_eq!(denial(&check(grpc, &o, Some(ORDERS_WORKLOAD)).await), None);
        assert_eq!(
            denial(&check(grpc, &o, Some("spiffe://CLUSTER.local/ns/orders/sa/orders")).await),
            None,
            "the trust domain is case-insensitive"
        );
        let forbidden = Some((403, "APPLICATION_NOT_ALLOWED".to_owned()));
        assert_eq!(
            denial(&check(grpc, &o, Some(BILLING_WORKLOAD)).await),
            forbidden
        );
        assert_eq!(denial(&check(grpc, &o, None).await), forbidden);
        // An entry that names no workloads takes calls from any (the requirement is off by default).
        assert_eq!(denial(&check(grpc, &l, Some(BILLING_WORKLOAD)).await), None);
        assert_eq!(denial(&check(grpc, &l, None).await), None);

        // The native API carries it too, and Explain shows the check right after the allowlist.
        let mut native = AuthorizerClient::connect(format!("http://{grpc}"))
            .await
            .unwrap();
        let explain = |principal: &str| DecideRequest {
            token: o.clone(),
            context: Some(RequestContext {
                source_principal: principal.to_owned(),
                ..Default::default()
            }),
        };
        let allowed = native
            .explain(explain(ORDERS_WORKLOAD))
            .await
            .unwrap()
            .into_inner();
        assert!(allowed.decision.unwrap().allowed);
        let names: Vec<&str> = allowed.trace.iter().map(|s| s.check.as_str()).collect();
        let at = names.iter().position(|n| *n == "source_principal").unwrap();
        assert_eq!(names[at - 1], "allowlist");
        assert_eq!(allowed.trace[at].outcome(), CheckOutcome::Passed);
        assert_eq!(allowed.trace[at].detail, ORDERS_WORKLOAD);
        let denied = native
            .explain(explain(BILLING_WORKLOAD))
            .await
            .unwrap()
            .into_inner();
        let decision = denied.decision.unwrap();
        assert_eq!(decision.reason(), pb::DenyReason::ApplicationNotAllowed);
        assert!(
            decision
                .message
                .contains("is not one app entry `orders-service` may call from"),
            "{}",
            decision.message
        );
        assert_eq!(denied.trace[at].outcome(), CheckOutcome::Failed);
        assert_eq!(denied.trace[at + 1].outcome(), CheckOutcome::Skipped);

        // The registry validates them and hands them back normalised.
        let mut registry = RegistryClient::connect(format!("http://{admin}"))
            .await
            .unwrap();
        let entry = |principals: Vec<&str>| pb::CreateAppEntryRequest {
            entry: Some(pb::AppEntry {
                name: "stranger".to_owned(),
                tenant_id: support::TENANT.to_owned(),
                client_app_id: support::STRANGER.client_id.to_owned(),
                kind: pb::AppEntryKind::ClientCredentials as i32,
                enabled: true,
                source_principals: principals.into_iter().map(str::to_owned).collect(),
                ..Default::default()
            }),
            security_role: "Orders Integration".to_owned(),
            ..Default::default()
        };
        let bad = registry
            .create_app_entry(entry(vec![ORDERS_WORKLOAD, "spiffe://cluster.local"]))
            .await
            .unwrap_err();
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
        assert!(
            bad.message().contains("`source_principals[1]`"),
            "{}",
            bad.message()
        );
        let created = registry
            .create_app_entry(entry(vec![
                "spiffe://Cluster.Local/ns/stranger/sa/stranger",
                "spiffe://cluster.local/ns/stranger/sa/stranger",
            ]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            created.source_principals,
            ["spiffe://cluster.local/ns/stranger/sa/stranger"]
        );
    });

    // Required for every entry (after a reload): legacy-reports names none, so it is refused.
    let text = std::fs::read_to_string(&sidecar.config_path).unwrap();
    let text = text.replacen("auth:\n", "auth:\n  require_source_principal: true\n", 1);
    std::fs::write(&sidecar.config_path, text).unwrap();
    sidecar.signal("HUP");
    sidecar.wait_for_log(&["configuration reloaded"]);
    let (o, l) = (orders, legacy);
    block_on(async move {
        assert_eq!(
            denial(&check(grpc, &l, Some(BILLING_WORKLOAD)).await),
            Some((403, "APPLICATION_NOT_ALLOWED".to_owned()))
        );
        assert_eq!(denial(&check(grpc, &o, Some(ORDERS_WORKLOAD)).await), None);
    });
}
