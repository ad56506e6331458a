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

/// Every item of a List call, fetched one per page through `next_page_token`.
macro_rules! page_through {
    ($admin:expr, $call:ident, $items:ident) => {{
        let mut items = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = $admin
                .$call(pb::ListRequest {
                    page_size: 1,
                    page_token: page_token.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            assert!(
                page.$items.len() <= 1,
                "a page holds at most page_size items"
            );
            items.extend(page.$items);
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        items
    }};
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
    let names: Vec<String> = page_through!(admin, list_app_entries, app_entries)
        .into_iter()
        .map(|e| e.name)
        .collect();
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

/// A decision for `token` on `method path` with extra request headers.
async fn decide_on(
    authz: &mut AuthorizerClient<Channel>,
    token: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> pb::DecideResponse {
    authz
        .decide(DecideRequest {
            token: token.to_owned(),
            context: Some(pb::RequestContext {
                method: method.to_owned(),
                path: path.to_owned(),
                headers: headers
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
}

fn role(name: &str, operations: &[pb::Operation], act_on_behalf: bool) -> pb::SecurityRole {
    pb::SecurityRole {
        name: name.to_owned(),
        privileges: vec![pb::Privilege {
            resource: "orders".to_owned(),
            operations: operations.iter().map(|o| *o as i32).collect(),
        }],
        act_on_behalf,
        ..Default::default()
    }
}

fn route(method: &str, path: &str, operation: pb::Operation) -> pb::CreateRouteRequest {
    pb::CreateRouteRequest {
        route: Some(pb::Route {
            method: method.to_owned(),
            path: path.to_owned(),
            resource: "orders".to_owned(),
            operation: operation as i32,
            ..Default::default()
        }),
    }
}

#[track_caller]
fn assert_decision(r: &pb::DecideResponse, expected: Option<DenyReason>, what: &str) {
    match expected {
        None => assert!(r.allowed, "{what}: expected allow, got {r:?}"),
        Some(reason) => {
            assert!(!r.allowed, "{what}: expected {reason:?}, got an allow");
            assert_eq!(r.reason(), reason, "{what}: {}", r.message);
        }
    }
}

/// Every Registry call of every resource kind (Create, Get, List with paging, Update, Delete) with its
/// error codes, and the decisions that routes, roles and users drive changing at the very next call.
#[tokio::test]
async fn every_registry_call_and_live_routes_roles_and_impersonation() {
    use pb::Operation::{Create, Delete, Read, Write};
    const USER: &str = "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d";
    let dir = tempfile::tempdir().unwrap();
    let (running, mut admin, mut authz) = start(dir.path()).await;
    let dev = running.dev_issuer.as_ref().unwrap();
    let (tenant, stranger) = client(STRANGER, TENANT);
    let token = dev.mint_app_token(&tenant, &stranger, AUDIENCE).unwrap();

    // Security roles: create, duplicate, get, missing.
    let app_role = admin
        .create_security_role(pb::CreateSecurityRoleRequest {
            security_role: Some(role("Stranger Role", &[Read, Write], false)),
        })
        .await
        .unwrap()
        .into_inner();
    let reader = admin
        .create_security_role(pb::CreateSecurityRoleRequest {
            security_role: Some(role("Reader Only", &[Read], false)),
        })
        .await
        .unwrap()
        .into_inner();
    let again = pb::CreateSecurityRoleRequest {
        security_role: Some(role("Reader Only", &[Read], false)),
    };
    assert_eq!(
        code(admin.create_security_role(again).await).0,
        Code::AlreadyExists
    );
    let got = admin
        .get_security_role(pb::GetRequest {
            key: "Reader Only".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, reader);
    let missing = pb::GetRequest {
        key: "No Such Role".to_owned(),
    };
    assert_eq!(
        code(admin.get_security_role(missing).await).0,
        Code::NotFound
    );
    let roles = admin
        .list_security_roles(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner();
    for name in ["Orders Integration", "Reader Only", "Stranger Role"] {
        assert!(
            roles.security_roles.iter().any(|r| r.name == name),
            "{name}"
        );
    }

    // The app entry and the application user created with it.
    let entry = admin
        .create_app_entry(stranger_entry())
        .await
        .unwrap()
        .into_inner();
    let got = admin
        .get_app_entry(pb::GetRequest {
            key: "stranger".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, entry);
    let mut managed = stranger_entry();
    let managed_entry = managed.entry.as_mut().unwrap();
    managed_entry.name = "stranger-mi".to_owned();
    managed_entry.kind = pb::AppEntryKind::ManagedIdentity as i32;
    managed_entry.client_app_id = String::new();
    managed_entry.object_id = stranger.object_id.clone();
    let managed_created = admin
        .create_app_entry(managed.clone())
        .await
        .unwrap()
        .into_inner();
    managed.entry.as_mut().unwrap().name = "stranger-mi-again".to_owned();
    let (c, msg) = code(admin.create_app_entry(managed).await);
    assert_eq!(c, Code::AlreadyExists, "same (tenant, object id): {msg}");
    admin
        .delete_app_entry(pb::DeleteRequest {
            key: managed_created.name,
            etag: managed_created.etag,
        })
        .await
        .unwrap();

    let users = admin
        .list_application_users(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner();
    let app_user = users
        .application_users
        .into_iter()
        .find(|u| u.app_entry == "stranger")
        .unwrap();
    assert_eq!(app_user.security_role, "Stranger Role");
    let got = admin
        .get_application_user(pb::GetRequest {
            key: app_user.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, app_user);
    let second = pb::CreateApplicationUserRequest {
        application_user: Some(pb::ApplicationUser {
            name: "a second one".to_owned(),
            app_entry: "stranger".to_owned(),
            security_role: "Reader Only".to_owned(),
            ..Default::default()
        }),
    };
    assert_eq!(
        code(admin.create_application_user(second).await).0,
        Code::AlreadyExists,
        "exactly one application user per entry"
    );
    let delete_user = pb::DeleteRequest {
        key: app_user.id.clone(),
        etag: app_user.etag.clone(),
    };
    assert_eq!(
        code(admin.delete_application_user(delete_user).await).0,
        Code::FailedPrecondition,
        "an application user goes with its entry"
    );
    let r = decide_on(&mut authz, &token, "POST", "/orders", &[]).await;
    assert_decision(&r, None, "no route table: the role is only reported");
    assert_eq!(r.security_role.unwrap().name, "Stranger Role");

    // Routes: ids assigned on create; with any route, an unmatched request is denied.
    let read_route = admin
        .create_route(route("GET", "/orders", Read))
        .await
        .unwrap()
        .into_inner();
    let create_route = admin
        .create_route(route("POST", "/orders", Create))
        .await
        .unwrap()
        .into_inner();
    assert!(!read_route.id.is_empty() && read_route.id != create_route.id);
    let got = admin
        .get_route(pb::GetRequest {
            key: create_route.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, create_route);
    let mut ids: Vec<String> = page_through!(admin, list_routes, routes)
        .into_iter()
        .map(|r| r.id)
        .collect();
    ids.sort();
    let mut expected = vec![read_route.id.clone(), create_route.id.clone()];
    expected.sort();
    assert_eq!(ids, expected, "paging returns every route once");
    let bad_route = route("GET", "no-leading-slash", Read);
    assert_eq!(
        code(admin.create_route(bad_route).await).0,
        Code::InvalidArgument
    );

    let r = decide_on(&mut authz, &token, "GET", "/orders/42?x=1", &[]).await;
    assert_decision(&r, None, "read route, role grants read");
    let r = decide_on(&mut authz, &token, "POST", "/orders", &[]).await;
    assert_decision(
        &r,
        Some(DenyReason::PrivilegeMissing),
        "create route, role lacks create",
    );
    let r = decide_on(&mut authz, &token, "GET", "/invoices", &[]).await;
    assert_decision(
        &r,
        Some(DenyReason::PrivilegeMissing),
        "no route matches while routes exist",
    );

    // Updating the role grants create at the next decision; a stale etag is refused.
    let mut granted = app_role.clone();
    granted.privileges[0].operations.push(Create as i32);
    let mut stale = granted.clone();
    stale.etag = "999999".to_owned();
    assert_eq!(
        code(
            admin
                .update_security_role(pb::UpdateSecurityRoleRequest {
                    security_role: Some(stale)
                })
                .await
        )
        .0,
        Code::Aborted
    );
    let app_role = admin
        .update_security_role(pb::UpdateSecurityRoleRequest {
            security_role: Some(granted),
        })
        .await
        .unwrap()
        .into_inner();
    let r = decide_on(&mut authz, &token, "POST", "/orders", &[]).await;
    assert_decision(&r, None, "role now grants create");

    // Updating the route to need delete denies again.
    let mut needs_delete = create_route.clone();
    needs_delete.operation = Delete as i32;
    let needs_delete = admin
        .update_route(pb::UpdateRouteRequest {
            route: Some(needs_delete),
        })
        .await
        .unwrap()
        .into_inner();
    let r = decide_on(&mut authz, &token, "POST", "/orders", &[]).await;
    assert_decision(
        &r,
        Some(DenyReason::PrivilegeMissing),
        "route now needs delete",
    );

    // Users and impersonation.
    let user = admin
        .create_user(pb::CreateUserRequest {
            user: Some(pb::User {
                object_id: USER.to_owned(),
                name: "Dana".to_owned(),
                security_role: "Reader Only".to_owned(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let got = admin
        .get_user(pb::GetRequest {
            key: USER.to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, user);
    let listed = admin
        .list_users(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.users.iter().any(|u| u.object_id == USER));
    let orphan = pb::CreateUserRequest {
        user: Some(pb::User {
            object_id: "b1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d".to_owned(),
            name: "Eve".to_owned(),
            security_role: "No Such Role".to_owned(),
            ..Default::default()
        }),
    };
    assert_eq!(
        code(admin.create_user(orphan).await).0,
        Code::FailedPrecondition,
        "a user's role must exist"
    );
    let on_behalf = [("callerobjectid", USER)];
    let r = decide_on(&mut authz, &token, "GET", "/orders", &on_behalf).await;
    assert_decision(
        &r,
        Some(DenyReason::ImpersonationNotAllowed),
        "the application user's role may not act on behalf",
    );
    let mut delegate = app_role.clone();
    delegate.act_on_behalf = true;
    admin
        .update_security_role(pb::UpdateSecurityRoleRequest {
            security_role: Some(delegate),
        })
        .await
        .unwrap();
    let r = decide_on(&mut authz, &token, "GET", "/orders", &on_behalf).await;
    assert_decision(&r, None, "impersonation allowed once the role may");
    assert_eq!(r.effective_user_object_id, USER);

    // Effective privileges are the intersection: the app may write, the user may only read.
    let mut write_route = needs_delete.clone();
    write_route.operation = Write as i32;
    let write_route = admin
        .update_route(pb::UpdateRouteRequest {
            route: Some(write_route),
        })
        .await
        .unwrap()
        .into_inner();
    let r = decide_on(&mut authz, &token, "POST", "/orders", &[]).await;
    assert_decision(&r, None, "the app alone may write");
    let r = decide_on(&mut authz, &token, "POST", "/orders", &on_behalf).await;
    assert_decision(
        &r,
        Some(DenyReason::PrivilegeMissing),
        "the user may not write",
    );
    let mut promoted = user.clone();
    promoted.security_role = "Stranger Role".to_owned();
    let promoted = admin
        .update_user(pb::UpdateUserRequest {
            user: Some(promoted),
        })
        .await
        .unwrap()
        .into_inner();
    let r = decide_on(&mut authz, &token, "POST", "/orders", &on_behalf).await;
    assert_decision(&r, None, "the user's new role may write");
    let ghost = pb::UpdateUserRequest {
        user: Some(pb::User {
            object_id: "c1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d".to_owned(),
            name: "Ghost".to_owned(),
            security_role: "Reader Only".to_owned(),
            etag: "999999".to_owned(),
            ..Default::default()
        }),
    };
    assert_eq!(code(admin.update_user(ghost).await).0, Code::NotFound);
    admin
        .delete_user(pb::DeleteRequest {
            key: USER.to_owned(),
            etag: promoted.etag,
        })
        .await
        .unwrap();
    let r = decide_on(&mut authz, &token, "GET", "/orders", &on_behalf).await;
    assert_decision(
        &r,
        Some(DenyReason::ImpersonationNotAllowed),
        "a deleted user cannot be impersonated",
    );

    // Deleting the routes (a stale etag first) lifts route enforcement.
    let stale_delete = pb::DeleteRequest {
        key: read_route.id.clone(),
        etag: "999999".to_owned(),
    };
    assert_eq!(
        code(admin.delete_route(stale_delete).await).0,
        Code::Aborted
    );
    for (id, etag) in [
        (read_route.id, read_route.etag),
        (write_route.id, write_route.etag),
    ] {
        admin
            .delete_route(pb::DeleteRequest { key: id, etag })
            .await
            .unwrap();
    }
    let r = decide_on(&mut authz, &token, "DELETE", "/invoices", &[]).await;
    assert_decision(&r, None, "no routes left");

    // An unused role can be deleted; then it is gone.
    admin
        .delete_security_role(pb::DeleteRequest {
            key: "Reader Only".to_owned(),
            etag: reader.etag,
        })
        .await
        .unwrap();
    let gone = pb::GetRequest {
        key: "Reader Only".to_owned(),
    };
    assert_eq!(code(admin.get_security_role(gone).await).0, Code::NotFound);
    running.shutdown().await;
}
