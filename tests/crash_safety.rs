//! Crash safety of the registry store: writers get changes acknowledged — creates, updates and deletes —
//! the real binary is killed with SIGKILL while they keep writing, and after a restart on the same data
//! directory every acknowledged change is there (the one change in flight at the kill may or may not be)
//! and the store opens cleanly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use s2s_authz::proto::s2sauthz::v1::registry_client::RegistryClient;
use s2s_authz::proto::s2sauthz::v1::{
    CreateSecurityRoleRequest, DeleteRequest, ListRequest, Operation, Privilege, SecurityRole,
    UpdateSecurityRoleRequest,
};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use support::{Sidecar, block_on, dev_config};

const WRITERS: usize = 4;
/// Acknowledged writes before the kill; the writers go on past it, into the crash.
const BEFORE_KILL: usize = 90;

fn config(data_dir: &std::path::Path) -> String {
    format!("data_dir: {}\n{}", data_dir.display(), dev_config())
}

/// A role as stored: absent, or present with these operations on `orders`.
type Stored = Option<Vec<i32>>;

fn role(name: &str, operations: &[Operation], etag: &str) -> SecurityRole {
    SecurityRole {
        name: name.to_owned(),
        privileges: vec![Privilege {
            resource: "orders".to_owned(),
            operations: operations.iter().map(|o| *o as i32).collect(),
        }],
        etag: etag.to_owned(),
        ..Default::default()
    }
}

/// What the writers know: per role, the last acknowledged state, and the change in flight, if any.
#[derive(Default)]
struct Ledger {
    acked: BTreeMap<String, Stored>,
    in_flight: BTreeMap<String, Stored>,
    count: usize,
}

#[test]
fn acknowledged_registry_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let sidecar = Sidecar::start_with_config(&config(dir.path()));
    let ledger = Arc::new(Mutex::new(Ledger::default()));

    let admin_addr = sidecar.admin_addr;
    let writer_ledger = ledger.clone();
    let writers = std::thread::spawn(move || {
        block_on(async move {
            let admin = RegistryClient::connect(format!("http://{admin_addr}"))
                .await
                .unwrap();
            let mut writers = tokio::task::JoinSet::new();
            for w in 0..WRITERS {
                let mut admin = admin.clone();
                let ledger = writer_ledger.clone();
                writers.spawn(async move {
                    // Each role is created, updated, then deleted; about a third of them are left in each
                    // state. Bounded: a writer stops at its first failure (the crash) or after 10,000 roles.
                    for i in 0..10_000 {
                        let name = format!("crash-{w}-{i:05}");
                        let mut etag = String::new();
                        let keep = i % 3;
                        for step in 0..=keep {
                            let expected: Stored = match step {
                                0 => Some(vec![Operation::Read as i32]),
                                1 => Some(vec![Operation::Read as i32, Operation::Write as i32]),
                                _ => None,
                            };
                            ledger
                                .lock()
                                .unwrap()
                                .in_flight
                                .insert(name.clone(), expected.clone());
                            let result = match step {
                                0 => admin
                                    .create_security_role(CreateSecurityRoleRequest {
                                        security_role: Some(role(&name, &[Operation::Read], "")),
                                    })
                                    .await
                                    .map(|r| r.into_inner().etag),
                                1 => admin
                                    .update_security_role(UpdateSecurityRoleRequest {
                                        security_role: Some(role(
                                            &name,
                                            &[Operation::Read, Operation::Write],
                                            &etag,
                                        )),
                                    })
                                    .await
                                    .map(|r| r.into_inner().etag),
                                _ => admin
                                    .delete_security_role(DeleteRequest {
                                        key: name.clone(),
                                        etag: etag.clone(),
                                    })
                                    .await
                                    .map(|_| String::new()),
                            };
                            let Ok(new_etag) = result else { return };
                            etag = new_etag;
                            let mut ledger = ledger.lock().unwrap();
                            ledger.in_flight.remove(&name);
                            ledger.acked.insert(name.clone(), expected);
                            ledger.count += 1;
                        }
                    }
                });
            }
            while writers.join_next().await.is_some() {}
        })
    });
    // Kill mid-stream, once enough writes are acknowledged, while the writers are still going.
    support::poll("acknowledged writes before the kill", || {
        (ledger.lock().unwrap().count >= BEFORE_KILL).then_some(())
    });
    sidecar.signal("KILL");
    writers.join().unwrap();
    drop(sidecar);
    let ledger = Arc::into_inner(ledger).unwrap().into_inner().unwrap();
    assert!(ledger.count >= BEFORE_KILL);
    assert!(
        ledger.acked.values().any(Option::is_none) && ledger.acked.values().any(Option::is_some),
        "deletes and live roles were acknowledged"
    );

    // Restart on the same data directory: it opens cleanly, and every acknowledged write is there.
    let sidecar = Sidecar::start_with_config(&config(dir.path()));
    let admin_addr = sidecar.admin_addr;
    let stored: BTreeMap<String, Stored> = block_on(async move {
        let mut admin = RegistryClient::connect(format!("http://{admin_addr}"))
            .await
            .unwrap();
        let mut roles = BTreeMap::new();
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
            roles.extend(
                page.security_roles
                    .into_iter()
                    .filter(|r| r.name.starts_with("crash-"))
                    .map(|r| (r.name, Some(r.privileges[0].operations.clone()))),
            );
            if page.next_page_token.is_empty() {
                break roles;
            }
            token = page.next_page_token;
        }
    });
    let mut lost = Vec::new();
    for (name, acked) in &ledger.acked {
        let found = stored.get(name).cloned().flatten();
        let in_flight = ledger.in_flight.get(name);
        if found != *acked && in_flight != Some(&found) {
            lost.push(format!("{name}: acknowledged {acked:?}, stored {found:?}"));
        }
    }
    // Nothing the writers never asked for appears either.
    for name in stored.keys() {
        if !ledger.acked.contains_key(name) && !ledger.in_flight.contains_key(name) {
            lost.push(format!("{name}: stored, never written"));
        }
    }
    assert!(
        lost.is_empty(),
        "acknowledged writes lost after SIGKILL: {lost:?}"
    );
}
