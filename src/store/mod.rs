//! `Store`: the durable registry. Two backends behind one transaction API:
//!
//! - SQLite in a data directory (the embedded default: WAL, synchronous commits), for one sidecar;
//! - PostgreSQL, shared by a fleet of sidecars, which learn of each other's changes through
//!   `LISTEN`/`NOTIFY` (a trigger notifies on every change, whoever makes it) and heal a missed
//!   notification with a periodic resync (`Registry::spawn_watcher`).
//!
//! Resources are kept as JSON bodies keyed by (kind, key) so the schema stays small and a change of the
//! model is a data migration, not a table rewrite. Every write takes the next value of one global
//! sequence as the resource's version, so an etag never repeats, not even for a resource deleted and
//! created again. Migrations are versioned and applied at open, under a lock, so sidecars starting
//! together apply each one once.
//!
//! Every call blocks: callers on an async runtime use `spawn_blocking` (the PostgreSQL client runs its own
//! small runtime and must not be driven from inside another one).

mod postgres;
mod sqlite;

use crate::core::registry::{AppEntry, ApplicationUser, RegistryParts, Route, SecurityRole, User};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use self::postgres::{DatabaseUrl, Notices, Subscription};

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

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
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
    #[error("registry database (PostgreSQL): {}", postgres_message(.0))]
    Postgres(#[from] ::postgres::Error),
    #[error("stored {kind} `{key}` is unreadable: {message}")]
    Corrupt {
        kind: String,
        key: String,
        message: String,
    },
    #[error("registry database schema version {found} is newer than this build knows ({known})")]
    TooNew { found: usize, known: usize },
    #[error("registry database connection lost")]
    Disconnected,
}

/// The server's own message (its SQLSTATE and text, never row values), or the client-side cause; the
/// client error's `Display` alone says only "db error".
fn postgres_message(e: &::postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

impl StoreError {
    /// Whether the store is (perhaps briefly) out of reach or busy, rather than broken: worth a retry.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Disconnected => true,
            // No server answer at all (I/O, closed connection), or the writers' lock timed out.
            StoreError::Postgres(e) => {
                e.is_closed()
                    || e.as_db_error().is_none()
                    || e.code() == Some(&::postgres::error::SqlState::LOCK_NOT_AVAILABLE)
            }
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => matches!(
                e.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ),
            _ => false,
        }
    }
}

/// Versions of stored resources, by (kind, key): the etags.
pub type Etags = HashMap<(Kind, String), i64>;

/// Where the registry lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// `registry.db` in this directory.
    Sqlite(PathBuf),
    /// A PostgreSQL database shared by the fleet.
    Postgres(DatabaseUrl),
}

#[derive(Debug)]
enum Backend {
    Sqlite(sqlite::Sqlite),
    Postgres(Box<postgres::Postgres>),
}

#[derive(Debug)]
pub struct Store {
    backend: Backend,
}

impl Store {
    pub fn open(location: &Location) -> Result<Store, StoreError> {
        let backend = match location {
            Location::Sqlite(dir) => Backend::Sqlite(sqlite::Sqlite::open(dir)?),
            Location::Postgres(url) => Backend::Postgres(Box::new(postgres::Postgres::open(url)?)),
        };
        Ok(Store { backend })
    }

    /// Opens (creating if needed) the SQLite store in `dir`.
    pub fn open_dir(dir: &Path) -> Result<Store, StoreError> {
        Store::open(&Location::Sqlite(dir.to_owned()))
    }

    /// Runs `f` in one write transaction (serialised with every other writer, across processes and, for
    /// PostgreSQL, across the fleet); commits only if it succeeds.
    pub fn transact<R, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&Tx<'_>) -> Result<R, E>,
    ) -> Result<R, E> {
        match &self.backend {
            Backend::Sqlite(s) => s.transact(f),
            Backend::Postgres(p) => p.transact(f),
        }
    }

    /// Everything stored, with versions, read in one consistent snapshot.
    pub fn load(&self) -> Result<(RegistryParts, Etags), StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => s.transact(|tx| tx.load()),
            Backend::Postgres(p) => p.load(),
        }
    }

    /// A feed of other writers' changes, for stores shared by several processes (PostgreSQL); `None` for
    /// the embedded store, which only this process writes.
    pub fn subscribe(&self) -> Option<Result<Subscription, StoreError>> {
        match &self.backend {
            Backend::Sqlite(_) => None,
            Backend::Postgres(p) => Some(p.subscribe()),
        }
    }

    /// Whether other processes write this store too (so changes must be followed: `subscribe`).
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// A short name of the backend, for logs.
    pub fn backend_name(&self) -> &'static str {
        match &self.backend {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgresql",
        }
    }
}

/// A write transaction.
pub enum Tx<'c> {
    Sqlite(&'c rusqlite::Transaction<'c>),
    Postgres(std::cell::RefCell<::postgres::Transaction<'c>>),
}

impl Tx<'_> {
    /// The resource and its version, if stored.
    pub fn get<T: DeserializeOwned>(
        &self,
        kind: Kind,
        key: &str,
    ) -> Result<Option<(T, i64)>, StoreError> {
        let row = match self {
            Tx::Sqlite(tx) => sqlite::get(tx, kind, key)?,
            Tx::Postgres(tx) => postgres::get(&mut tx.borrow_mut(), kind, key)?,
        };
        row.map(|(body, version)| decode(kind.as_str(), key, &body).map(|v| (v, version)))
            .transpose()
    }

    /// Writes `value` under `key` and returns its new version.
    pub fn put<T: Serialize>(&self, kind: Kind, key: &str, value: &T) -> Result<i64, StoreError> {
        let body = serde_json::to_string(value).map_err(|e| StoreError::Corrupt {
            kind: kind.as_str().to_owned(),
            key: key.to_owned(),
            message: e.to_string(),
        })?;
        match self {
            Tx::Sqlite(tx) => sqlite::put(tx, kind, key, &body),
            Tx::Postgres(tx) => postgres::put(&mut tx.borrow_mut(), kind, key, &body),
        }
    }

    pub fn delete(&self, kind: Kind, key: &str) -> Result<bool, StoreError> {
        match self {
            Tx::Sqlite(tx) => sqlite::delete(tx, kind, key),
            Tx::Postgres(tx) => postgres::delete(&mut tx.borrow_mut(), kind, key),
        }
    }

    /// Everything stored, with versions, as this transaction sees it.
    pub fn load(&self) -> Result<(RegistryParts, Etags), StoreError> {
        match self {
            Tx::Sqlite(tx) => assemble(sqlite::rows(tx)?),
            Tx::Postgres(tx) => assemble(postgres::rows(&mut *tx.borrow_mut())?),
        }
    }
}

/// One stored resource: kind, key, JSON body, version.
type Row = (String, String, String, i64);

/// Builds the registry from stored rows. A row of an unknown kind or with an unreadable body (a store
/// edited by hand, or by a newer build) is an error, never skipped silently.
fn assemble(rows: Vec<Row>) -> Result<(RegistryParts, Etags), StoreError> {
    let mut parts = RegistryParts::default();
    let mut etags = Etags::new();
    for (kind_name, key, body, version) in rows {
        let Some(kind) = Kind::parse(&kind_name) else {
            return Err(StoreError::Corrupt {
                kind: kind_name,
                key,
                message: "unknown kind".to_owned(),
            });
        };
        let name = kind.as_str();
        match kind {
            Kind::AppEntry => parts.entries.push(decode::<AppEntry>(name, &key, &body)?),
            Kind::ApplicationUser => parts
                .app_users
                .push(decode::<ApplicationUser>(name, &key, &body)?),
            Kind::SecurityRole => parts.roles.push(decode::<SecurityRole>(name, &key, &body)?),
            Kind::User => parts.users.push(decode::<User>(name, &key, &body)?),
            Kind::Route => parts.routes.push(decode::<Route>(name, &key, &body)?),
        }
        etags.insert((kind, key), version);
    }
    Ok((parts, etags))
}

fn decode<T: DeserializeOwned>(kind: &str, key: &str, body: &str) -> Result<T, StoreError> {
    serde_json::from_str(body).map_err(|e| StoreError::Corrupt {
        kind: kind.to_owned(),
        key: key.to_owned(),
        message: e.to_string(),
    })
}

/// How long a store waits for another writer's lock before giving up.
const LOCK_TIMEOUT: Duration = Duration::from_secs(5);
