//! The embedded store: SQLite in a data directory, WAL with synchronous (FULL) commits.

use super::{LOCK_TIMEOUT, Row, StoreError, Tx};
use crate::store::Kind;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

/// The migrations, in order; `user_version` records how many have been applied.
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

pub(super) struct Sqlite {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl std::fmt::Debug for Sqlite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sqlite")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Sqlite {
    /// Opens (creating if needed) `registry.db` in `dir` and applies pending migrations.
    pub(super) fn open(dir: &Path) -> Result<Sqlite, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join("registry.db");
        let mut conn = Connection::open(&path)?;
        // First, so that even the pragmas below wait for another process's lock instead of failing.
        conn.busy_timeout(LOCK_TIMEOUT)?;
        // WAL lets readers proceed during a write; FULL makes each commit durable when it returns.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        migrate(&mut conn)?;
        Ok(Sqlite {
            conn: Mutex::new(conn),
            path,
        })
    }

    /// Runs `f` in one immediate (write-locking) transaction; commits only if it succeeds.
    pub(super) fn transact<R, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&Tx<'_>) -> Result<R, E>,
    ) -> Result<R, E> {
        let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(StoreError::from)?;
        let result = f(&Tx::Sqlite(&tx))?;
        tx.commit().map_err(StoreError::from)?;
        Ok(result)
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
        tracing::info!(version = applied + 1, "registry schema migrated (sqlite)");
    }
}

pub(super) fn get(
    tx: &rusqlite::Transaction<'_>,
    kind: Kind,
    key: &str,
) -> Result<Option<(String, i64)>, StoreError> {
    Ok(tx
        .query_row(
            "SELECT body, version FROM resources WHERE kind = ?1 AND key = ?2",
            params![kind.as_str(), key],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?)
}

pub(super) fn put(
    tx: &rusqlite::Transaction<'_>,
    kind: Kind,
    key: &str,
    body: &str,
) -> Result<i64, StoreError> {
    let version: i64 = tx.query_row(
        "UPDATE sequence SET value = value + 1 WHERE id = 1 RETURNING value",
        [],
        |r| r.get(0),
    )?;
    tx.execute(
        "INSERT INTO resources (kind, key, version, body) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (kind, key) DO UPDATE SET version = excluded.version, body = excluded.body",
        params![kind.as_str(), key, version, body],
    )?;
    Ok(version)
}

pub(super) fn delete(
    tx: &rusqlite::Transaction<'_>,
    kind: Kind,
    key: &str,
) -> Result<bool, StoreError> {
    let n = tx.execute(
        "DELETE FROM resources WHERE kind = ?1 AND key = ?2",
        params![kind.as_str(), key],
    )?;
    Ok(n > 0)
}

pub(super) fn rows(tx: &rusqlite::Transaction<'_>) -> Result<Vec<Row>, StoreError> {
    let mut stmt =
        tx.prepare_cached("SELECT kind, key, body, version FROM resources ORDER BY kind, key")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
    Ok(rows.collect::<Result<Vec<Row>, _>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::ids::TenantId;
    use crate::core::registry::AppEntry;
    use crate::core::registry::AppEntryKind;
    use crate::store::Store;

    fn entry(name: &str) -> AppEntry {
        AppEntry {
            name: name.to_owned(),
            tenant_id: TenantId::new("3f6b2a1e-8c4d-4e5f-9a7b-1c2d3e4f5a6b"),
            client_app_id: None,
            object_id: None,
            kind: AppEntryKind::ManagedIdentity,
            required_role: None,
            enabled: true,
            source_principals: Vec::new(),
        }
    }

    #[test]
    fn writes_survive_reopening_and_versions_never_repeat() {
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let store = Store::open_dir(dir.path()).unwrap();
            let v = store
                .transact(|tx| tx.put(Kind::AppEntry, "a", &entry("a")))
                .unwrap();
            store.transact(|tx| tx.delete(Kind::AppEntry, "a")).unwrap();
            store
                .transact(|tx| tx.put(Kind::AppEntry, "a", &entry("a")))
                .unwrap();
            v
        };
        let store = Store::open_dir(dir.path()).unwrap();
        let (parts, etags) = store.load().unwrap();
        assert_eq!(parts.entries, vec![entry("a")]);
        assert!(etags[&(Kind::AppEntry, "a".to_owned())] > first);
    }

    #[test]
    fn a_failed_transaction_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_dir(dir.path()).unwrap();
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
        drop(Store::open_dir(dir.path()).unwrap());
        let conn = Connection::open(dir.path().join("registry.db")).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        assert!(matches!(
            Store::open_dir(dir.path()),
            Err(StoreError::TooNew { found: 99, .. })
        ));
    }
}
