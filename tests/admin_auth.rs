//! Admin access through the real binary: with admin tokens required, a Registry call without a token,
//! with a bad one, or with one lacking the admin app role is refused (and logged, without the token); a
//! token holding `S2SAuthz.Admin` is admitted, through gRPC and through the CLI. Health and reflection
//! stay open.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use s2s_authz::proto::s2sauthz::v1::registry_client::RegistryClient;
use s2s_authz::proto::s2sauthz::v1::{ListRequest, ListSecurityRolesResponse};
use std::net::SocketAddr;
use support::{ADMIN, ORDERS, STRANGER, Sidecar, block_on, dev_config};

fn sidecar_requiring_tokens() -> Sidecar {
    Sidecar::start_with_config(&format!(
        "admin: {{ require_token: true }}\n{}",
        dev_config()
    ))
}

/// `ListSecurityRoles` with `authorization` set to `header` (none when `None`).
fn list_roles(
    addr: SocketAddr,
    header: Option<String>,
) -> Result<ListSecurityRolesResponse, tonic::Status> {
    block_on(async move {
        let mut admin = RegistryClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let mut request = tonic::Request::new(ListRequest::default());
        if let Some(header) = header {
            request
                .metadata_mut()
                .insert("authorization", header.parse().unwrap());
        }
        admin
            .list_security_roles(request)
            .await
            .map(tonic::Response::into_inner)
    })
}

#[test]
fn admin_calls_need_a_verified_token_with_the_admin_role() {
    let sidecar = sidecar_requiring_tokens();
    let addr = sidecar.admin_addr;

    let refused = list_roles(addr, None).unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");

    let refused = list_roles(addr, Some("Bearer not.a.jwt".to_owned())).unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains("TOKEN_MALFORMED"), "{refused:?}");

    // A valid, allowlisted caller without the admin role: authenticated, not authorised.
    let orders = sidecar.token(&ORDERS);
    let refused = list_roles(addr, Some(format!("Bearer {orders}"))).unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("S2SAuthz.Admin"), "{refused:?}");

    // A tampered admin token (signature no longer matches) is refused.
    let admin = sidecar.token(&ADMIN);
    let (head, sig) = admin.rsplit_once('.').unwrap();
    let flipped = if sig.starts_with('A') { "B" } else { "A" };
    let tampered = format!("{head}.{flipped}{}", &sig[1..]);
    let refused = list_roles(addr, Some(format!("Bearer {tampered}"))).unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(
        refused.message().contains("SIGNATURE_INVALID"),
        "{refused:?}"
    );

    // The admin app's token is admitted, though the app is not on the allowlist.
    let roles = list_roles(addr, Some(format!("Bearer {admin}"))).unwrap();
    assert!(
        roles
            .security_roles
            .iter()
            .any(|r| r.name == "Orders Integration"),
        "{roles:?}"
    );

    // Every refusal and admission is logged with the method; no token ever reaches the log.
    let refusal = sidecar.wait_for_log(&[
        "admin call refused",
        "ListSecurityRoles",
        "PermissionDenied",
    ]);
    assert!(refusal.contains("S2SAuthz.Admin"), "{refusal}");
    sidecar.wait_for_log(&["admin call admitted", ADMIN.client_id]);
    for line in sidecar.logs() {
        for token in [&orders, &admin, &tampered] {
            let signature = token.rsplit_once('.').unwrap().1;
            assert!(!line.contains(signature), "a token reached the log: {line}");
        }
    }
}

#[test]
fn the_cli_sends_the_admin_token_from_the_environment() {
    let sidecar = sidecar_requiring_tokens();
    let cli = |token: Option<&str>| {
        let mut cmd = support::binary();
        cmd.args(["registry", "roles", "list", "--json", "--admin-addr"])
            .arg(sidecar.admin_addr.to_string());
        if let Some(token) = token {
            cmd.env("S2S_AUTHZ_ADMIN_TOKEN", token);
        }
        cmd.output().unwrap()
    };
    let without = cli(None);
    assert!(!without.status.success());
    let stderr = String::from_utf8_lossy(&without.stderr);
    assert!(stderr.contains("UNAUTHENTICATED"), "{stderr}");

    let stranger = sidecar.token(&STRANGER);
    let refused = cli(Some(&stranger));
    assert!(!refused.status.success());

    let admin = sidecar.token(&ADMIN);
    let admitted = cli(Some(&admin));
    let stdout = String::from_utf8_lossy(&admitted.stdout);
    assert!(
        admitted.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&admitted.stderr)
    );
    assert!(stdout.contains("Orders Integration"), "{stdout}");
}

#[test]
fn health_and_reflection_stay_open_and_loopback_needs_no_token_by_default() {
    let sidecar = sidecar_requiring_tokens();
    if let Some(grpcurl) = support::Grpcurl::find("admin_auth") {
        let services = grpcurl.list(sidecar.admin_addr, None);
        assert!(
            services.iter().any(|s| s == "s2sauthz.v1.Registry"),
            "{services:?}"
        );
    }
    let health = block_on({
        let addr = sidecar.admin_addr;
        async move {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            health
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await
        }
    });
    assert!(health.is_ok(), "{health:?}");

    // The default development setup (admin port on loopback) admits calls without a token.
    let open = Sidecar::start();
    assert!(list_roles(open.admin_addr, None).is_ok());
}
