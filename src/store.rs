//! `Store`: the durable registry — SQLite in a data directory, WAL with synchronous commits, versioned
//! migrations applied at open. Resources are kept as JSON bodies keyed by (kind, key) so the schema stays
//! small and a change of the model is a data migration, not a table rewrite.
//!
//! Every write takes the next value of one global sequence as the resource's version, so an etag never
//! repeats, not even for a resource deleted and created again.

use crate::core::registry::{AppEntry, ApplicationUser, RegistryParts, Route, SecurityRole, User};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

/// The migrations, in order; `schema_version` records how many have been applied.
const MIGRATIONS: &[&str] = &[
    // 1: resources and the version sequence.
    "CREATE TABLE resources (
        kind TEXT NOT NULL,
        key TEXT NOT NULL,
        version INTEGER NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (kind, key)
    ) WITHOUT ROWID;
    CREATE TABLE sequence (id INTEGER PRIMARY KEY CHECK (id = 1), value INTEGER NOT NULL);
    INSERT INTO sequence (id, value) VALUES (1, 0);",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    AppEntry,
    ApplicationUser,
    SecurityRole,
    User,
    Route,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::AppEntry,
        Kind::ApplicationUser,
        Kind::SecurityRole,
        Kind::User,
        Kind::Route,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::AppEntry => "app_entry",
            Kind::ApplicationUser => "application_user",
            Kind::SecurityRole => "security_role",
            Kind::User => "user",
            Kind::Route => "route",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("creating data directory `{path}`: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("registry database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored {kind} `{key}` is unreadable: {message}")]
    Corrupt {
        kind: &'static str,
        key: String,
        message: String,
    },
    #[error("registry database schema version {found} is newer than this build knows ({known})")]
    TooNew { found: usize, known: usize },
}

/// Versions of stored resources, by (kind, key): the etags.
pub type Etags = HashMap<(Kind, String), i64>;

pub struct Store {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if needed) `registry.db` in `dir` and applies pending migrations.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join("registry.db");
        let mut conn = Connection::open(&path)?;
        // First, so that even the pragmas below wait for another process's lock instead of failing.
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // WAL lets readers proceed during a write; FULL makes each commit durable when it returns.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        migrate(&mut conn)?;
        Ok(Store {
            conn: Mutex::new(conn),
            path,
        })
    }

    /// Runs `f` in one immediate (write-locking) transaction; commits only if it succeeds.
    pub fn transact<R, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&Tx<'_>) -> Result<R, E>,
    ) -> Result<R, E> {
        let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(StoreError::from)?;
        let result = f(&Tx { tx: &tx })?;
        tx.commit().map_err(StoreError::from)?;
        Ok(result)
    }

    pub fn load(&self) -> Result<(RegistryParts, Etags), StoreError> {
        self.transact(|tx| tx.load())
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    loop {
        // Read the version under the write lock, so that two processes opening a new store at once
        // cannot both apply the same migration.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let applied: i64 = tx.pragma_query_value(None, "user_version", |row| row.get(0))?;
        let applied = usize::try_from(applied).unwrap_or(usize::MAX);
        if applied > MIGRATIONS.len() {
            return Err(StoreError::TooNew {
                found: applied,
                known: MIGRATIONS.len(),
            });
        }
        let Some(sql) = MIGRATIONS.get(applied) else {
            return Ok(());
        };
        tx.execute_batch(sql)?;
        tx.pragma_update(
            None,
            "user_version",
            i64::try_from(applied + 1).unwrap_or(i64::MAX),
        )?;
        tx.commit()?;
        tracing::info!(version = applied + 1, "registry schema migrated");
    }
}

/// A write transaction.
pub struct Tx<'c> {
    tx: &'c rusqlite::Transaction<'c>,
}

impl Tx<'_> {
    /// The resource and its version, if stored.
    pub fn get<T: DeserializeOwned>(
        &self,
        kind: Kind,
        key: &str,
    ) -> Result<Option<(T, i64)>, StoreError> {
        let row: Option<(String, i64)> = self
            .tx
            .query_row(
                "SELECT body, version FROM resources WHERE kind = ?1 AND key = ?2",
                params![kind.as_str(), key],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        row.map(|(body, version)| decode(kind, key, &body).map(|v| (v, version)))
            .transpose()
    }

    /// Writes `value` under `key` and returns its new version.
    pub fn put<T: Serialize>(&self, kind: Kind, key: &str, value: &T) -> Result<i64, StoreError> {
        let body = serde_json::to_string(value).map_err(|e| StoreError::Corrupt {
            kind: kind.as_str(),
            key: key.to_owned(),
            message: e.to_string(),
        })?;
        let version: i64 = self.tx.query_row(
            "UPDATE sequence SET value = value + 1 WHERE id = 1 RETURNING value",
            [],
            |r| r.get(0),
        )?;
        self.tx.execute(
            "INSERT INTO resources (kind, key, version, body) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (kind, key) DO UPDATE SET version = excluded.version, body = excluded.body",
            params![kind.as_str(), key, version, body],
        )?;
        Ok(version)
    }

    pub fn delete(&self, kind: Kind, key: &str) -> Result<bool, StoreError> {
        let n = self.tx.execute(
            "DELETE FROM resources WHERE kind = ?1 AND key = ?2",
            params![kind.as_str(), key],
        )?;
        Ok(n > 0)
    }

    fn all<T: DeserializeOwned>(
        &self,
        kind: Kind,
        etags: &mut Etags,
    ) -> Result<Vec<T>, StoreError> {
        let mut stmt = self.tx.prepare_cached(
            "SELECT key, body, version FROM resources WHERE kind = ?1 ORDER BY key",
        )?;
        let rows = stmt.query_map(params![kind.as_str()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (key, body, version) = row?;
            out.push(decode(kind, &key, &body)?);
            etags.insert((kind, key), version);
        }
        Ok(out)
    }

    /// Everything stored, with versions.
    pub fn load(&self) -> Result<(RegistryParts, Etags), StoreError> {
        let mut etags = Etags::new();
        let parts = RegistryParts {
            entries: self.all::<AppEntry>(Kind::AppEntry, &mut etags)?,
            app_users: self.all::<ApplicationUser>(Kind::ApplicationUser, &mut etags)?,
            roles: self.all::<SecurityRole>(Kind::SecurityRole, &mut etags)?,
            users: self.all::<User>(Kind::User, &mut etags)?,
            routes: self.all::<Route>(Kind::Route, &mut etags)?,
        };
        Ok((parts, etags))
    }
}

fn decode<T: DeserializeOwned>(kind: Kind, key: &str, body: &str) -> Result<T, StoreError> {
    serde_json::from_str(body).map_err(|e| StoreError::Corrupt {
        kind: kind.as_str(),
        key: key.to_owned(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::ids::TenantId;
    use crate::core::registry::AppEntryKind;

    fn entry(name: &str) -> AppEntry {
        AppEntry {
            name: name.to_owned(),
            tenant_id: TenantId::new("3f6b2a1e-8c4d-4e5f-9a7b-1c2d3e4f5a6b"),
            client_app_id: None,
            object_id: None,
            kind: AppEntryKind::ManagedIdentity,
            required_role: None,
            enabled: true,
        }
    }

    #[test]
    fn writes_survive_reopening_and_versions_never_repeat() {
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let store = Store::open(dir.path()).unwrap();
            let v = store
                .transact(|tx| tx.put(Kind::AppEntry, "a", &entry("a")))
                .unwrap();
            store.transact(|tx| tx.delete(Kind::AppEntry, "a")).unwrap();
            store
                .transact(|tx| tx.put(Kind::AppEntry, "a", &entry("a")))
                .unwrap();
            v
        };
        let store = Store::open(dir.path()).unwrap();
        let (parts, etags) = store.load().unwrap();
        assert_eq!(parts.entries, vec![entry("a")]);
        assert!(etags[&(Kind::AppEntry, "a".to_owned())] > first);
    }

    #[test]
    fn a_failed_transaction_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let result: Result<(), StoreError> = store.transact(|tx| {
            tx.put(Kind::AppEntry, "a", &entry("a"))?;
            Err(StoreError::TooNew { found: 0, known: 0 })
        });
        assert!(result.is_err());
        assert!(store.load().unwrap().0.entries.is_empty());
    }

    #[test]
    fn refuses_a_schema_from_the_future() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path()).unwrap());
        let conn = Connection::open(dir.path().join("registry.db")).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::TooNew { found: 99, .. })
        ));
    }
}
