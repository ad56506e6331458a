//! Crash safety of the registry store: writers get N changes acknowledged, the real binary is killed
//! with SIGKILL while they keep writing, and after a restart on the same data directory every
//! acknowledged change is there and the store opens cleanly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use s2s_authz::proto::s2sauthz::v1::registry_client::RegistryClient;
use s2s_authz::proto::s2sauthz::v1::{CreateSecurityRoleRequest, ListRequest, SecurityRole};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use support::{Sidecar, block_on, dev_config};

const WRITERS: usize = 4;
/// Acknowledged writes before the kill; the writers go on past it, into the crash.
const BEFORE_KILL: usize = 60;

fn config(data_dir: &std::path::Path) -> String {
    format!("data_dir: {}\n{}", data_dir.display(), dev_config())
}

#[test]
fn acknowledged_registry_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let sidecar = Sidecar::start_with_config(&config(dir.path()));
    let acked = Arc::new(Mutex::new(BTreeSet::new()));

    let admin_addr = sidecar.admin_addr;
    let writer_acks = acked.clone();
    let writers = std::thread::spawn(move || {
        block_on(async move {
            let admin = RegistryClient::connect(format!("http://{admin_addr}"))
                .await
                .unwrap();
            let mut writers = tokio::task::JoinSet::new();
            for w in 0..WRITERS {
                let mut admin = admin.clone();
                let acked = writer_acks.clone();
                writers.spawn(async move {
                    // Bounded: each writer stops at its first failure (the crash) or after 10,000 writes.
                    for i in 0..10_000 {
                        let name = format!("crash-{w}-{i:05}");
                        let role = SecurityRole {
                            name: name.clone(),
                            ..Default::default()
                        };
                        let request = CreateSecurityRoleRequest {
                            security_role: Some(role),
                        };
                        if admin.create_security_role(request).await.is_err() {
                            return;
                        }
                        acked.lock().unwrap().insert(name);
                    }
                });
            }
            while writers.join_next().await.is_some() {}
        })
    });
    // Kill mid-stream, once enough writes are acknowledged, while the writers are still going.
    support::poll("acknowledged writes before the kill", || {
        (acked.lock().unwrap().len() >= BEFORE_KILL).then_some(())
    });
    sidecar.signal("KILL");
    writers.join().unwrap();
    drop(sidecar);
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= BEFORE_KILL);

    // Restart on the same data directory: it opens cleanly, and every acknowledged write is there.
    let sidecar = Sidecar::start_with_config(&config(dir.path()));
    let admin_addr = sidecar.admin_addr;
    let stored: BTreeSet<String> = block_on(async move {
        let mut admin = RegistryClient::connect(format!("http://{admin_addr}"))
            .await
            .unwrap();
        let mut names = BTreeSet::new();
        let mut token = String::new();
        loop {
            let page = admin
                .list_security_roles(ListRequest {
                    page_size: 1000,
                    page_token: token.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            names.extend(
                page.security_roles
                    .into_iter()
                    .map(|r| r.name)
                    .filter(|n| n.starts_with("crash-")),
            );
            if page.next_page_token.is_empty() {
                break names;
            }
            token = page.next_page_token;
        }
    });
    let lost: Vec<_> = acked.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "acknowledged but lost after SIGKILL: {lost:?}"
    );
}
