//! The registry over gRPC (admin port), in-process: every error code, live decisions as the registry
//! changes, durability across a restart, provisioned resources read-only, and a new tenant trusted when
//! its first entry is created.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use s2s_authz::config::{self, MctSettings, ServeArgs};
use s2s_authz::devissuer::{DevClient, TokenVersion};
use s2s_authz::proto::s2sauthz::v1::authorizer_client::AuthorizerClient;
use s2s_authz::proto::s2sauthz::v1::registry_client::RegistryClient;
use s2s_authz::proto::s2sauthz::v1::{self as pb, DecideRequest, DenyReason};
use s2s_authz::server::Running;
use std::path::Path;
use std::time::{Duration, Instant};
use tonic::Code;
use tonic::transport::Channel;

const TENANT: &str = "3f6b2a1e-8c4d-4e5f-9a7b-1c2d3e4f5a6b";
const TENANT2: &str = "7a7a7a7a-1b1b-4c2c-8d3d-4e4e4e4e4e4e";
const AUDIENCE: &str = "api://b7e3c1a2-4d5e-4f60-8a9b-0c1d2e3f4a5b";
const STRANGER: &str = "4d5e6f70-8192-4a3b-9c4d-5e6f7a8b9c0d";
const PARTNER: &str = "5b5b5b5b-6c6c-4d7d-8e8e-9f9f9f9f9f9f";

fn yaml(data_dir: &Path) -> String {
    let local = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/local/s2s-authz.yaml"
    ))
    .unwrap();
    let mut text = local
        .replace("127.0.0.1:50051", "127.0.0.1:0")
        .replace("127.0.0.1:50052", "127.0.0.1:0")
        .replace("127.0.0.1:9464", "127.0.0.1:0")
        .replace("127.0.0.1:8400", "127.0.0.1:0");
    // A second tenant the dev issuer serves but nobody trusts until an entry names it.
    text.push_str(&format!(
        "    - tenant_id: {TENANT2}\n      clients:\n        - client_id: {PARTNER}\n          client_secret: s\n          object_id: 6c6c6c6c-7d7d-4e8e-9f9f-0a0a0a0a0a0a\n          roles: [S2SAppRole]\n"
    ));
    format!(
        "data_dir: {}\nkeys: {{ min_refresh_interval_secs: 1 }}\n{text}",
        data_dir.display()
    )
}

async fn start(data_dir: &Path) -> (Running, RegistryClient<Channel>, AuthorizerClient<Channel>) {
    let file = config::parse_yaml(&yaml(data_dir), "test").unwrap();
    let settings = config::resolve(file, &ServeArgs::default(), &MctSettings::default()).unwrap();
    let running = s2s_authz::server::start(settings).await.unwrap();
    let admin = RegistryClient::connect(format!("http://{}", running.admin_addr))
        .await
        .unwrap();
    let decide = AuthorizerClient::connect(format!("http://{}", running.grpc_addr))
        .await
        .unwrap();
    (running, admin, decide)
}

fn client(id: &str, tenant: &str) -> (String, DevClient) {
    let c = DevClient {
        client_id: id.to_owned(),
        client_secret: "unused".to_owned(),
        object_id: "0f1e2d3c-4b5a-4968-8776-5a4b3c2d1e0f".to_owned(),
        roles: vec!["S2SAppRole".to_owned()],
        token_version: TokenVersion::V2,
    };
    (tenant.to_owned(), c)
}

/// Decides until the answer is not ISSUER_UNAVAILABLE (keys still loading), within a bound.
async fn decide(authz: &mut AuthorizerClient<Channel>, token: &str) -> pb::DecideResponse {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = authz
            .decide(DecideRequest {
                token: token.to_owned(),
                context: None,
            })
            .await
            .unwrap()
            .into_inner();
        if r.reason() != DenyReason::IssuerUnavailable || Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn stranger_entry() -> pb::CreateAppEntryRequest {
    pb::CreateAppEntryRequest {
        entry: Some(pb::AppEntry {
            name: "stranger".to_owned(),
            tenant_id: TENANT.to_owned(),
            client_app_id: STRANGER.to_owned(),
            kind: pb::AppEntryKind::ClientCredentials as i32,
            required_role: "S2SAppRole".to_owned(),
            enabled: true,
            ..Default::default()
        }),
        application_user_name: String::new(),
        security_role: "Stranger Role".to_owned(),
    }
}

fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
    let e = r.expect_err("expected an error");
    (e.code(), e.message().to_owned())
}

#[tokio::test]
async fn changes_reach_the_next_decision_and_errors_have_the_right_codes() {
    let dir = tempfile::tempdir().unwrap();
    let (running, mut admin, mut authz) = start(dir.path()).await;
    let dev = running.dev_issuer.as_ref().unwrap();
    let (tenant, stranger) = client(STRANGER, TENANT);
    let token = dev.mint_app_token(&tenant, &stranger, AUDIENCE).unwrap();
    assert_eq!(
        decide(&mut authz, &token).await.reason(),
        DenyReason::ApplicationNotAllowed
    );

    // A role must exist before an application user can hold it.
    let (c, msg) = code(admin.create_app_entry(stranger_entry()).await);
    assert_eq!(c, Code::FailedPrecondition, "{msg}");
    let role = pb::SecurityRole {
        name: "Stranger Role".to_owned(),
        privileges: vec![pb::Privilege {
            resource: "orders".to_owned(),
            operations: vec![pb::Operation::Read as i32],
        }],
        ..Default::default()
    };
    let role = admin
        .create_security_role(pb::CreateSecurityRoleRequest {
            security_role: Some(role),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!role.etag.is_empty());

    let entry = admin
        .create_app_entry(stranger_entry())
        .await
        .unwrap()
        .into_inner();
    assert!(!entry.provisioned);
    let allowed = decide(&mut authz, &token).await;
    assert!(allowed.allowed, "{}", allowed.message);
    let user = allowed.application_user.unwrap();
    assert_eq!(
        (user.name.as_str(), user.entry_name.as_str()),
        ("stranger", "stranger")
    );
    assert_eq!(allowed.security_role.unwrap().name, "Stranger Role");

    // Duplicates, stale etags, missing resources, bad input.
    assert_eq!(
        code(admin.create_app_entry(stranger_entry()).await).0,
        Code::AlreadyExists
    );
    let mut same_identity = stranger_entry();
    same_identity.entry.as_mut().unwrap().name = "stranger-again".to_owned();
    assert_eq!(
        code(admin.create_app_entry(same_identity).await).0,
        Code::AlreadyExists
    );
    let mut disabled = entry.clone();
    disabled.enabled = false;
    let mut stale = disabled.clone();
    stale.etag = "999999".to_owned();
    assert_eq!(
        code(
            admin
                .update_app_entry(pb::UpdateAppEntryRequest { entry: Some(stale) })
                .await
        )
        .0,
        Code::Aborted
    );
    let updated = admin
        .update_app_entry(pb::UpdateAppEntryRequest {
            entry: Some(disabled),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(updated.etag, entry.etag);
    assert_eq!(
        decide(&mut authz, &token).await.reason(),
        DenyReason::ApplicationDisabled
    );
    assert_eq!(
        code(
            admin
                .get_app_entry(pb::GetRequest {
                    key: "nobody".to_owned()
                })
                .await
        )
        .0,
        Code::NotFound
    );
    let mut bad = stranger_entry();
    bad.entry.as_mut().unwrap().client_app_id = "not-a-guid".to_owned();
    let (c, msg) = code(admin.create_app_entry(bad).await);
    assert_eq!(c, Code::InvalidArgument);
    assert!(msg.contains("client_app_id"), "{msg}");
    let mut empty = stranger_entry();
    empty.entry.as_mut().unwrap().name = " ".to_owned();
    assert!(code(admin.create_app_entry(empty).await).1.contains("name"));
    let mut huge = stranger_entry();
    huge.entry.as_mut().unwrap().name = "x".repeat(10_000);
    assert_eq!(
        code(admin.create_app_entry(huge).await).0,
        Code::InvalidArgument
    );

    // Builtin roles cannot be held by application users; a role in use cannot be deleted.
    let builtin = pb::SecurityRole {
        name: "System Administrator".to_owned(),
        builtin: true,
        ..Default::default()
    };
    admin
        .create_security_role(pb::CreateSecurityRoleRequest {
            security_role: Some(builtin),
        })
        .await
        .unwrap();
    let users = admin
        .list_application_users(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut app_user = users
        .application_users
        .into_iter()
        .find(|u| u.app_entry == "stranger")
        .unwrap();
    app_user.security_role = "System Administrator".to_owned();
    let update = pb::UpdateApplicationUserRequest {
        application_user: Some(app_user),
    };
    assert_eq!(
        code(admin.update_application_user(update).await).0,
        Code::InvalidArgument
    );
    let (c, msg) = code(
        admin
            .delete_security_role(pb::DeleteRequest {
                key: role.name.clone(),
                etag: role.etag.clone(),
            })
            .await,
    );
    assert_eq!(c, Code::FailedPrecondition, "{msg}");

    // Provisioned resources are read-only.
    let provisioned = admin
        .get_app_entry(pb::GetRequest {
            key: "orders-service".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(provisioned.provisioned);
    let delete = pb::DeleteRequest {
        key: "orders-service".to_owned(),
        etag: String::new(),
    };
    assert_eq!(
        code(admin.delete_app_entry(delete).await).0,
        Code::FailedPrecondition
    );

    // Deleting the entry deletes its application user and denies at once.
    admin
        .delete_app_entry(pb::DeleteRequest {
            key: "stranger".to_owned(),
            etag: updated.etag,
        })
        .await
        .unwrap();
    assert_eq!(
        decide(&mut authz, &token).await.reason(),
        DenyReason::ApplicationNotAllowed
    );
    let users = admin
        .list_application_users(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        users
            .application_users
            .iter()
            .all(|u| u.app_entry != "stranger")
    );

    // Listing pages through everything exactly once.
    let mut names = Vec::new();
    let mut token = String::new();
    loop {
        let page = admin
            .list_app_entries(pb::ListRequest {
                page_size: 1,
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.app_entries.len() <= 1);
        names.extend(page.app_entries.into_iter().map(|e| e.name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(
        names,
        ["billing-service", "legacy-reports", "orders-service"]
    );
    running.shutdown().await;
}

#[tokio::test]
async fn changes_are_durable_and_a_new_tenant_is_trusted_by_its_first_entry() {
    let dir = tempfile::tempdir().unwrap();
    let (running, mut admin, mut authz) = start(dir.path()).await;
    let (tenant2, partner) = client(PARTNER, TENANT2);
    let token = running
        .dev_issuer
        .as_ref()
        .unwrap()
        .mint_app_token(&tenant2, &partner, AUDIENCE)
        .unwrap();
    // Nobody trusts tenant 2 yet: denied without any discovery.
    assert_eq!(
        decide(&mut authz, &token).await.reason(),
        DenyReason::IssuerNotTrusted
    );

    let role = pb::SecurityRole {
        name: "Partner".to_owned(),
        ..Default::default()
    };
    admin
        .create_security_role(pb::CreateSecurityRoleRequest {
            security_role: Some(role),
        })
        .await
        .unwrap();
    let mut request = stranger_entry();
    let entry = request.entry.as_mut().unwrap();
    entry.name = "partner".to_owned();
    entry.tenant_id = TENANT2.to_owned();
    entry.client_app_id = PARTNER.to_owned();
    request.security_role = "Partner".to_owned();
    request.application_user_name = "Partner (application user)".to_owned();
    admin.create_app_entry(request).await.unwrap();
    // Its keys are discovered now; the decision follows within the bound.
    let allowed = decide(&mut authz, &token).await;
    assert!(allowed.allowed, "{}", allowed.message);
    running.shutdown().await;

    // Restart on the same data directory: the entry, its user and role are still there.
    let (running, mut admin, mut authz) = start(dir.path()).await;
    let entry = admin
        .get_app_entry(pb::GetRequest {
            key: "partner".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(entry.tenant_id, TENANT2);
    let token = running
        .dev_issuer
        .as_ref()
        .unwrap()
        .mint_app_token(&tenant2, &partner, AUDIENCE)
        .unwrap();
    let allowed = decide(&mut authz, &token).await;
    assert!(allowed.allowed, "{}", allowed.message);
    assert_eq!(
        allowed.application_user.unwrap().name,
        "Partner (application user)"
    );

    // Deleting the tenant's last entry stops trusting it.
    admin
        .delete_app_entry(pb::DeleteRequest {
            key: "partner".to_owned(),
            etag: entry.etag,
        })
        .await
        .unwrap();
    assert_eq!(
        decide(&mut authz, &token).await.reason(),
        DenyReason::IssuerNotTrusted
    );
    running.shutdown().await;
}
