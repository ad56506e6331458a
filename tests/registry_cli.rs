//! `s2s-authz registry …` against an in-process server: the real binary adds, lists, edits and removes
//! over the admin API, errors exit 1 with the gRPC code, and export → import → export is lossless.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use s2s_authz::config::{self, MctSettings, ServeArgs};
use s2s_authz::devissuer::{DevClient, TokenVersion};
use s2s_authz::proto::s2sauthz::v1::authorizer_client::AuthorizerClient;
use s2s_authz::proto::s2sauthz::v1::registry_client::RegistryClient;
use s2s_authz::proto::s2sauthz::v1::{self as pb, DecideRequest, DenyReason};
use s2s_authz::server::Running;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

const TENANT: &str = "3f6b2a1e-8c4d-4e5f-9a7b-1c2d3e4f5a6b";
const AUDIENCE: &str = "api://b7e3c1a2-4d5e-4f60-8a9b-0c1d2e3f4a5b";
const STRANGER: &str = "4d5e6f70-8192-4a3b-9c4d-5e6f7a8b9c0d";

fn yaml(data_dir: &Path) -> String {
    let local = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/local/s2s-authz.yaml"
    ))
    .unwrap();
    let text = local
        .replace("127.0.0.1:50051", "127.0.0.1:0")
        .replace("127.0.0.1:50052", "127.0.0.1:0")
        .replace("127.0.0.1:9464", "127.0.0.1:0")
        .replace("127.0.0.1:8400", "127.0.0.1:0");
    format!(
        "data_dir: {}\nkeys: {{ min_refresh_interval_secs: 1 }}\n{text}",
        data_dir.display()
    )
}

async fn start(data_dir: &Path) -> Running {
    let file = config::parse_yaml(&yaml(data_dir), "test").unwrap();
    let settings = config::resolve(file, &ServeArgs::default(), &MctSettings::default()).unwrap();
    s2s_authz::server::start(settings).await.unwrap()
}

/// Runs the real binary with `registry <args> --admin-addr <addr>`.
async fn cli(running: &Running, args: &[&str]) -> Output {
    let mut all: Vec<String> = vec!["registry".to_owned()];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    all.push("--admin-addr".to_owned());
    all.push(running.admin_addr.to_string());
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_s2s-authz"))
            .args(&all)
            .env_remove("S2S_AUTHZ_ADMIN_ADDR")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Decides until the answer is not ISSUER_UNAVAILABLE (keys still loading), within a bound.
async fn decide(
    authz: &mut AuthorizerClient<tonic::transport::Channel>,
    token: &str,
) -> pb::DecideResponse {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_administers_the_registry_and_round_trips_an_export() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path()).await;
    let mut authz = AuthorizerClient::connect(format!("http://{}", running.grpc_addr))
        .await
        .unwrap();

    ok(&cli(
        &running,
        &[
            "roles",
            "add",
            "--name",
            "Stranger Role",
            "--privilege",
            "orders:read,write",
            "--privilege",
            "invoices:read",
        ],
    )
    .await);
    let roles = ok(&cli(&running, &["roles", "list"]).await);
    assert!(roles.contains("Stranger Role"), "{roles}");
    assert!(roles.contains("orders:read,write"), "{roles}");

    ok(&cli(
        &running,
        &[
            "entries",
            "add",
            "--name",
            "stranger",
            "--tenant-id",
            TENANT,
            "--client-app-id",
            STRANGER,
            "--required-role",
            "S2SAppRole",
            "--security-role",
            "Stranger Role",
            "--user-name",
            "Stranger (application user)",
        ],
    )
    .await);

    // JSON: ours is not provisioned, the configuration's are.
    let listed: serde_json::Value =
        serde_json::from_str(&ok(&cli(&running, &["entries", "list", "--json"]).await)).unwrap();
    let listed = listed.as_array().unwrap();
    let ours = listed.iter().find(|e| e["name"] == "stranger").unwrap();
    assert_eq!(ours["provisioned"], false);
    assert_eq!(ours["enabled"], true);
    assert_eq!(ours["kind"], "CLIENT_CREDENTIALS");
    assert_eq!(ours["client_app_id"], STRANGER);
    let provisioned = listed
        .iter()
        .find(|e| e["name"] == "orders-service")
        .unwrap();
    assert_eq!(provisioned["provisioned"], true);

    // The table: a header and one aligned line per entry.
    let table = ok(&cli(&running, &["entries", "list"]).await);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("NAME"), "{table}");
    assert!(lines.iter().any(|l| l.starts_with("stranger ")), "{table}");
    let tenant_col = lines[0].find("TENANT").unwrap();
    for l in &lines[1..] {
        assert_eq!(&l[tenant_col..tenant_col + TENANT.len()], TENANT, "{table}");
    }

    let users = ok(&cli(&running, &["users", "list"]).await);
    assert!(users.contains("Stranger (application user)"), "{users}");

    // The entry decides; disabled, it is denied.
    let dev = running.dev_issuer.as_ref().unwrap();
    let stranger = DevClient {
        client_id: STRANGER.to_owned(),
        client_secret: "unused".to_owned(),
        object_id: "0f1e2d3c-4b5a-4968-8776-5a4b3c2d1e0f".to_owned(),
        roles: vec!["S2SAppRole".to_owned()],
        token_version: TokenVersion::V2,
    };
    let token = dev.mint_app_token(TENANT, &stranger, AUDIENCE).unwrap();
    let allowed = decide(&mut authz, &token).await;
    assert!(allowed.allowed, "{}", allowed.message);
    let edited = ok(&cli(
        &running,
        &["entries", "edit", "stranger", "--disable", "--json"],
    )
    .await);
    let edited: serde_json::Value = serde_json::from_str(&edited).unwrap();
    assert_eq!(edited[0]["enabled"], false);
    assert_eq!(
        decide(&mut authz, &token).await.reason(),
        DenyReason::ApplicationDisabled
    );

    // Source principals: validated, the trust domain folded to lower case, replaced as a whole.
    let bad = cli(
        &running,
        &[
            "entries",
            "edit",
            "stranger",
            "--source-principal",
            "stranger",
        ],
    )
    .await;
    assert_eq!(bad.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.starts_with("error: INVALID_ARGUMENT: `source_principals[0]` must be a SPIFFE id"),
        "{stderr}"
    );
    let edited = ok(&cli(
        &running,
        &[
            "entries",
            "edit",
            "stranger",
            "--source-principal",
            "spiffe://Cluster.Local/ns/stranger/sa/stranger",
            "--source-principal",
            "spiffe://cluster.local/ns/stranger/sa/stranger-canary",
            "--json",
        ],
    )
    .await);
    let edited: serde_json::Value = serde_json::from_str(&edited).unwrap();
    assert_eq!(
        edited[0]["source_principals"],
        serde_json::json!([
            "spiffe://cluster.local/ns/stranger/sa/stranger",
            "spiffe://cluster.local/ns/stranger/sa/stranger-canary"
        ])
    );
    let table = ok(&cli(&running, &["entries", "list"]).await);
    assert!(
        table.contains("SOURCE PRINCIPALS")
            && table.contains("spiffe://cluster.local/ns/stranger/sa/stranger-canary"),
        "{table}"
    );

    // A duplicate: exit 1, the gRPC code on stderr.
    let dup = cli(
        &running,
        &[
            "roles",
            "add",
            "--name",
            "Stranger Role",
            "--privilege",
            "orders:read",
        ],
    )
    .await;
    assert_eq!(dup.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&dup.stderr);
    assert!(stderr.starts_with("error: ALREADY_EXISTS: "), "{stderr}");

    // Add and remove a managed identity entry.
    let mi = "11111111-2222-4333-8444-555555555555";
    ok(&cli(
        &running,
        &[
            "entries",
            "add",
            "--name",
            "temporary",
            "--tenant-id",
            TENANT,
            "--object-id",
            mi,
            "--security-role",
            "Stranger Role",
        ],
    )
    .await);
    ok(&cli(&running, &["entries", "remove", "temporary"]).await);
    let gone = cli(&running, &["entries", "remove", "temporary"]).await;
    assert_eq!(gone.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&gone.stderr).starts_with("error: NOT_FOUND: "));

    // A user and a route (through the API) so the export has every section.
    let mut admin = RegistryClient::connect(format!("http://{}", running.admin_addr))
        .await
        .unwrap();
    ok(&cli(
        &running,
        &["roles", "add", "--name", "Delegate", "--act-on-behalf"],
    )
    .await);
    admin
        .create_user(pb::CreateUserRequest {
            user: Some(pb::User {
                object_id: "22222222-3333-4444-8555-666666666666".to_owned(),
                name: "Ada".to_owned(),
                security_role: "Stranger Role".to_owned(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    admin
        .create_route(pb::CreateRouteRequest {
            route: Some(pb::Route {
                method: "GET".to_owned(),
                path: "/orders/*".to_owned(),
                resource: "orders".to_owned(),
                operation: pb::Operation::Read as i32,
                ..Default::default()
            }),
        })
        .await
        .unwrap();

    // Export → import into a fresh server → export again: the same document.
    let file = dir.path().join("export.yaml");
    ok(&cli(&running, &["export", "--file", file.to_str().unwrap()]).await);
    let first = std::fs::read_to_string(&file).unwrap();
    let stdout_export = ok(&cli(&running, &["export"]).await);
    assert_eq!(first, stdout_export);
    for needle in [
        "security_roles:",
        "app_entries:",
        "application_user:",
        "Stranger (application user)",
        "users:",
        "routes:",
        "/orders/*",
        "enabled: false",
        "source_principals:",
        "spiffe://cluster.local/ns/stranger/sa/stranger-canary",
    ] {
        assert!(first.contains(needle), "{needle} missing from\n{first}");
    }
    assert!(
        !first.contains("orders-service"),
        "provisioned exported:\n{first}"
    );
    // Shaped like the config file's sections: the config parser reads it.
    let parsed = config::parse_yaml(&first, "export").unwrap();
    assert_eq!(
        (
            parsed.security_roles.len(),
            parsed.app_entries.len(),
            parsed.users.len(),
            parsed.routes.len()
        ),
        (2, 1, 1, 1),
        "{first}"
    );
    assert_eq!(parsed.app_entries[0].source_principals.len(), 2, "{first}");

    let dir2 = tempfile::tempdir().unwrap();
    let second = start(dir2.path()).await;
    ok(&cli(&second, &["import", "--file", file.to_str().unwrap()]).await);
    let again = ok(&cli(&second, &["export"]).await);
    assert_eq!(first, again);

    // Importing again skips everything that exists.
    let out = cli(&second, &["import", "--file", file.to_str().unwrap()]).await;
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("skipped entry stranger: already exists"),
        "{stderr}"
    );
    assert!(!stderr.contains("created"), "{stderr}");

    // Connection failures name the address.
    let out = tokio::task::spawn_blocking(|| {
        std::process::Command::new(env!("CARGO_BIN_EXE_s2s-authz"))
            .args(["registry", "roles", "list", "--admin-addr", "127.0.0.1:1"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("127.0.0.1:1"));

    second.shutdown().await;
    running.shutdown().await;
}
