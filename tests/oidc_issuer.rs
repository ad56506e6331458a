//! A generic OpenID provider as issuer, end to end in-process: discovery from the issuer URL, JWKS,
//! configurable claim names, the RFC 9068 app-only rule, and the issuer URL as the entry's tenant.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use s2s_authz::config::{self, MctSettings, ServeArgs};
use s2s_authz::devissuer::{DevClient, DevIssuer, DevIssuerConfig, DevTenant, TokenVersion};
use s2s_authz::proto::s2sauthz::v1::{
    DecideRequest, DenyReason, authorizer_client::AuthorizerClient,
};
use serde_json::json;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const TENANT: &str = "0c0ffee0-1111-4222-8333-444455556666";
const CLIENT: &str = "orders-cli";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test]
async fn a_generic_oidc_issuer_is_trusted_with_its_own_claim_names() {
    let dev = DevIssuer::start(DevIssuerConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        tenants: vec![DevTenant {
            tenant_id: TENANT.to_owned(),
            clients: vec![DevClient {
                client_id: CLIENT.to_owned(),
                client_secret: "s".to_owned(),
                object_id: "not-the-client".to_owned(),
                roles: vec!["S2SAppRole".to_owned()],
                token_version: TokenVersion::V2,
            }],
        }],
        token_lifetime: Duration::from_secs(600),
    })
    .await
    .unwrap();
    // The dev issuer's v2 metadata lives at `{issuer}/.well-known/openid-configuration`, as OIDC requires.
    let issuer = dev.v2_issuer(TENANT);
    let yaml = format!(
        r#"
grpc_addr: 127.0.0.1:0
admin_addr: 127.0.0.1:0
metrics_addr: 127.0.0.1:0
auth: {{ audiences: ["api://unused"] }}
oidc_issuers:
  - issuer: "{issuer}"
    audiences: ["https://orders.example"]
    app_id_claim: client_id
    object_id_claim: sub
    roles_claim: permissions
    app_only: sub_equals_app_id
security_roles:
  - name: Reader
    privileges: [{{ resource: orders, operations: [read] }}]
app_entries:
  - name: cli
    tenant_id: "{issuer}"
    client_app_id: {CLIENT}
    required_role: orders.read
    application_user: {{ security_role: Reader }}
"#
    );
    let settings = config::resolve(
        config::parse_yaml(&yaml, "test").unwrap(),
        &ServeArgs::default(),
        &MctSettings::default(),
    )
    .unwrap();
    let running = s2s_authz::server::start(settings).await.unwrap();
    let mut client = AuthorizerClient::connect(format!("http://{}", running.grpc_addr))
        .await
        .unwrap();

    let claims = |sub: &str, aud: &str| {
        json!({"iss": issuer, "aud": aud, "exp": now() + 600, "iat": now(), "client_id": CLIENT, "sub": sub,
               "permissions": ["orders.read"]})
    };
    let decide = |token: String| DecideRequest {
        token,
        context: None,
    };

    // Wait (bounded) until discovery and keys have loaded: the first decisions may be ISSUER_UNAVAILABLE.
    let good = dev.sign(&claims(CLIENT, "https://orders.example")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let allowed = loop {
        let r = client
            .decide(decide(good.clone()))
            .await
            .unwrap()
            .into_inner();
        if r.allowed || Instant::now() > deadline {
            break r;
        }
        assert_eq!(r.reason(), DenyReason::IssuerUnavailable, "{}", r.message);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(allowed.allowed, "{}", allowed.message);
    let caller = allowed.caller.unwrap();
    assert_eq!(caller.tenant_id, issuer);
    assert_eq!(caller.client_app_id, CLIENT);
    assert_eq!(allowed.application_user.unwrap().entry_name, "cli");

    // `sub` is not the client: a user's token, not an app's (RFC 9068).
    let user = dev
        .sign(&claims("alice", "https://orders.example"))
        .unwrap();
    let r = client.decide(decide(user)).await.unwrap().into_inner();
    assert_eq!(r.reason(), DenyReason::NotAppToken);

    // The issuer's own audiences apply, not the global ones.
    let other = dev.sign(&claims(CLIENT, "api://unused")).unwrap();
    let r = client.decide(decide(other)).await.unwrap().into_inner();
    assert_eq!(r.reason(), DenyReason::AudienceMismatch);

    // The configured roles claim decides the app role.
    let mut no_perm = claims(CLIENT, "https://orders.example");
    no_perm["permissions"] = json!([]);
    no_perm["roles"] = json!(["orders.read"]);
    let r = client
        .decide(decide(dev.sign(&no_perm).unwrap()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.reason(), DenyReason::RoleMissing);

    running.shutdown().await;
    dev.shutdown().await;
}
