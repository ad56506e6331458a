//! The verified-token cache seen from outside, in-process: a cached token stops being accepted once its
//! key leaves the issuer's JWKS, and registry and settings changes apply to cached tokens at the next
//! decision (the cache keeps the verification, never the authorization).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use s2s_authz::config::{self, MctSettings, ServeArgs, Settings};
use s2s_authz::devissuer::{DevClient, DevIssuer, DevIssuerConfig, DevTenant, TokenVersion};
use s2s_authz::proto::s2sauthz::v1::{
    CheckOutcome, DecideRequest, DecideResponse, DenyReason, RequestContext,
    authorizer_client::AuthorizerClient,
};
use s2s_authz::server::Running;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

const TENANT: &str = "3f6b2a1e-8c4d-4e5f-9a7b-1c2d3e4f5a6b";
const AUDIENCE: &str = "api://b7e3c1a2-4d5e-4f60-8a9b-0c1d2e3f4a5b";
const APP: &str = "6a1f0c2b-3d4e-4f5a-8b6c-7d8e9f0a1b2c";
const APP_OID: &str = "9c8b7a6f-5e4d-4c3b-8a29-1f0e9d8c7b6a";

fn app() -> DevClient {
    DevClient {
        client_id: APP.to_owned(),
        client_secret: "s".to_owned(),
        object_id: APP_OID.to_owned(),
        roles: vec!["S2SAppRole".to_owned()],
        token_version: TokenVersion::V2,
    }
}

async fn dev_issuer() -> DevIssuer {
    DevIssuer::start(DevIssuerConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        tenants: vec![DevTenant {
            tenant_id: TENANT.to_owned(),
            clients: vec![app()],
        }],
        token_lifetime: Duration::from_secs(600),
    })
    .await
    .unwrap()
}

/// The service's settings against `dev`; `extra_auth` goes into the `auth` section, `enabled` is the
/// app entry's flag.
fn settings(dev: &DevIssuer, extra_auth: &str, enabled: bool) -> Settings {
    settings_for(dev, AUDIENCE, extra_auth, enabled)
}

fn settings_for(dev: &DevIssuer, audience: &str, extra_auth: &str, enabled: bool) -> Settings {
    let yaml = format!(
        r#"
grpc_addr: 127.0.0.1:0
admin_addr: 127.0.0.1:0
metrics_addr: 127.0.0.1:0
auth:
  instance: "{instance}"
  tenants: ["{TENANT}"]
  audiences: ["{audience}"]
  {extra_auth}
security_roles:
  - name: Orders Integration
    privileges: [{{ resource: orders, operations: [read] }}]
app_entries:
  - name: orders-service
    tenant_id: "{TENANT}"
    client_app_id: "{APP}"
    required_role: S2SAppRole
    enabled: {enabled}
    application_user: {{ security_role: Orders Integration }}
"#,
        instance = dev.instance()
    );
    config::resolve(
        config::parse_yaml(&yaml, "test").unwrap(),
        &ServeArgs::default(),
        &MctSettings::default(),
    )
    .unwrap()
}

fn request(token: &str, headers: &[(&str, &str)]) -> DecideRequest {
    DecideRequest {
        token: token.to_owned(),
        context: Some(RequestContext {
            method: "GET".to_owned(),
            path: "/orders".to_owned(),
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<HashMap<_, _>>(),
            ..Default::default()
        }),
    }
}

async fn decide(
    client: &mut AuthorizerClient<Channel>,
    token: &str,
    headers: &[(&str, &str)],
) -> DecideResponse {
    client
        .decide(request(token, headers))
        .await
        .unwrap()
        .into_inner()
}

/// Starts the service and waits (bounded) until `token` is allowed: discovery and keys have loaded.
async fn start(dev: &DevIssuer, token: &str) -> (Running, AuthorizerClient<Channel>) {
    let running = s2s_authz::server::start(settings(dev, "", true))
        .await
        .unwrap();
    let mut client = AuthorizerClient::connect(format!("http://{}", running.grpc_addr))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = decide(&mut client, token, &[]).await;
        if r.allowed {
            break;
        }
        assert_eq!(r.reason(), DenyReason::IssuerUnavailable, "{}", r.message);
        assert!(Instant::now() < deadline, "keys never loaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (running, client)
}

fn jwks_uri(running: &Running, dev: &DevIssuer) -> String {
    running
        .authorizer
        .directory()
        .trust()
        .issuer(&dev.v2_issuer(TENANT))
        .unwrap()
        .jwks_uri
        .clone()
}

#[tokio::test]
async fn a_cached_token_is_refused_once_its_key_leaves_the_jwks() {
    let dev = dev_issuer().await;
    let old_kid = dev.current_kid();
    let token = dev.mint_app_token(TENANT, &app(), AUDIENCE).unwrap();
    let (running, mut client) = start(&dev, &token).await;
    let cache = running.authorizer.token_cache();
    assert_eq!(cache.len(), 1, "the allowed token is cached");
    // Served again (from the cache), still allowed.
    assert!(decide(&mut client, &token, &[]).await.allowed);
    assert_eq!(cache.len(), 1);

    // The issuer rolls over to a new key and stops publishing the old one; the service refreshes.
    let new_kid = dev.rotate_key();
    assert!(dev.remove_key(&old_kid));
    running
        .authorizer
        .directory()
        .jwks()
        .refresh(&jwks_uri(&running, &dev), true)
        .await
        .unwrap();

    let r = decide(&mut client, &token, &[]).await;
    assert!(!r.allowed);
    assert_eq!(r.reason(), DenyReason::KeyNotFound, "{}", r.message);
    assert_eq!(
        cache.len(),
        0,
        "the stale entry was dropped, the failure not cached"
    );
    // Asking again changes nothing: a failure is never cached as a success.
    let r = decide(&mut client, &token, &[]).await;
    assert_eq!(r.reason(), DenyReason::KeyNotFound, "{}", r.message);

    // Tokens signed with the new key are verified and cached as usual.
    let fresh = dev.mint_app_token(TENANT, &app(), AUDIENCE).unwrap();
    assert_eq!(dev.current_kid(), new_kid);
    assert!(decide(&mut client, &fresh, &[]).await.allowed);
    assert_eq!(cache.len(), 1);

    running.shutdown().await;
    dev.shutdown().await;
}

#[tokio::test]
async fn a_key_set_refresh_that_keeps_the_key_keeps_the_entry() {
    let dev = dev_issuer().await;
    let token = dev.mint_app_token(TENANT, &app(), AUDIENCE).unwrap();
    let (running, mut client) = start(&dev, &token).await;
    // A new key is published beside the old one (as Entra pre-publishes the next key).
    dev.add_key();
    running
        .authorizer
        .directory()
        .jwks()
        .refresh(&jwks_uri(&running, &dev), true)
        .await
        .unwrap();
    assert!(decide(&mut client, &token, &[]).await.allowed);
    assert_eq!(running.authorizer.token_cache().len(), 1);
    running.shutdown().await;
    dev.shutdown().await;
}

#[tokio::test]
async fn registry_and_settings_changes_apply_to_a_cached_token_at_once() {
    let dev = dev_issuer().await;
    let token = dev.mint_app_token(TENANT, &app(), AUDIENCE).unwrap();
    let (running, mut client) = start(&dev, &token).await;
    assert_eq!(running.authorizer.token_cache().len(), 1);

    // The app entry is disabled: the very next decision says so.
    running.reload(&settings(&dev, "", false)).await.unwrap();
    let r = decide(&mut client, &token, &[]).await;
    assert_eq!(r.reason(), DenyReason::ApplicationDisabled, "{}", r.message);
    assert_eq!(r.caller.unwrap().client_app_id, APP);

    // Enabled again: allowed again, still from the same cached verification.
    running.reload(&settings(&dev, "", true)).await.unwrap();
    assert!(decide(&mut client, &token, &[]).await.allowed);

    // Checks `precheck` makes on the request and settings still apply to a cached token.
    running
        .reload(&settings(&dev, "require_client_type: true", true))
        .await
        .unwrap();
    let r = decide(&mut client, &token, &[]).await;
    assert_eq!(r.reason(), DenyReason::ClientTypeMissing, "{}", r.message);
    assert!(
        decide(&mut client, &token, &[("clienttype", "Service")])
            .await
            .allowed
    );

    running
        .reload(&settings(&dev, "algorithms: [RS384]", true))
        .await
        .unwrap();
    let r = decide(&mut client, &token, &[]).await;
    assert_eq!(r.reason(), DenyReason::AlgorithmNotAllowed, "{}", r.message);

    running
        .reload(&settings(&dev, "enabled: false", true))
        .await
        .unwrap();
    let r = decide(&mut client, &token, &[]).await;
    assert!(!r.allowed, "service auth off denies every call");

    running
        .reload(&settings_for(&dev, "api://another", "", true))
        .await
        .unwrap();
    let r = decide(&mut client, &token, &[]).await;
    assert_eq!(r.reason(), DenyReason::AudienceMismatch, "{}", r.message);

    running.reload(&settings(&dev, "", true)).await.unwrap();
    assert!(decide(&mut client, &token, &[]).await.allowed);
    assert_eq!(running.authorizer.token_cache().len(), 1);

    running.shutdown().await;
    dev.shutdown().await;
}

#[tokio::test]
async fn explain_shows_every_check_even_for_a_cached_token() {
    let dev = dev_issuer().await;
    let token = dev.mint_app_token(TENANT, &app(), AUDIENCE).unwrap();
    let (running, mut client) = start(&dev, &token).await;
    let r = client
        .explain(request(&token, &[]))
        .await
        .unwrap()
        .into_inner();
    let decision = r.decision.unwrap();
    assert!(decision.allowed, "{}", decision.message);
    let signature = r
        .trace
        .iter()
        .find(|s| s.check == "signature")
        .expect("a signature step");
    assert_eq!(signature.outcome(), CheckOutcome::Passed, "{signature:?}");
    running.shutdown().await;
    dev.shutdown().await;
}
