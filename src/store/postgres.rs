//! The fleet store: one PostgreSQL database shared by every sidecar.
//!
//! - Writers serialise on a transaction-level advisory lock, so the check-then-write of a registry change
//!   (uniqueness, role in use, etag) sees every committed change of every sidecar.
//! - A row trigger stamps each insert and update with the next value of one sequence (the etag), so a
//!   change made straight in the database by another tool still gets a new etag.
//! - A statement trigger sends `NOTIFY s2s_authz_registry` on every change, whoever makes it, with the
//!   database's clock at that statement as the payload (`<operation> <Unix seconds>`);
//!   `Subscription` is the listening end, and turns those stamps into this process's clock to measure
//!   how long a change took to be published here (`s2s_authz_registry_change_lag_seconds`).
//!
//! Connections are plain TCP (`sslmode=disable` semantics): TLS to the database is not built in yet, so
//! run the database on a trusted network or reach it through a local TLS proxy.

use super::{Kind, LOCK_TIMEOUT, Row, StoreError, Tx};
use ::postgres::fallible_iterator::FallibleIterator;
use ::postgres::{Client, NoTls};
use std::cell::RefCell;
use std::str::FromStr;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// The channel every change is announced on.
pub const CHANNEL: &str = "s2s_authz_registry";

/// The advisory lock key that serialises registry writers and migrations ("s2sauthz" in ASCII).
const LOCK_KEY: i64 = 0x7332_7361_7574_687a;

/// The migrations, in order; `s2s_authz_schema.version` records how many have been applied.
const MIGRATIONS: &[&str] = &[
    // 1: resources, the version sequence, the version stamp and the change notice.
    "CREATE SEQUENCE s2s_authz_version;
    CREATE TABLE s2s_authz_resources (
        kind TEXT NOT NULL,
        key TEXT NOT NULL,
        version BIGINT NOT NULL DEFAULT nextval('s2s_authz_version'),
        body JSONB NOT NULL,
        PRIMARY KEY (kind, key)
    );
    CREATE FUNCTION s2s_authz_stamp() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        NEW.version := nextval('s2s_authz_version');
        RETURN NEW;
    END $$;
    CREATE TRIGGER s2s_authz_stamp BEFORE INSERT OR UPDATE ON s2s_authz_resources
        FOR EACH ROW EXECUTE FUNCTION s2s_authz_stamp();
    CREATE FUNCTION s2s_authz_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('s2s_authz_registry', TG_OP);
        RETURN NULL;
    END $$;
    CREATE TRIGGER s2s_authz_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON s2s_authz_resources
        FOR EACH STATEMENT EXECUTE FUNCTION s2s_authz_notify();",
    // 2: the change notice carries the database's clock at the changing statement, so listeners can
    // tell how long the change took to reach them. (Distinct payloads are not folded into one notice
    // per transaction; a listener reads them all at once.)
    "CREATE OR REPLACE FUNCTION s2s_authz_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('s2s_authz_registry',
            TG_OP || ' ' || extract(epoch FROM clock_timestamp())::text);
        RETURN NULL;
    END $$;",
];

const SELECT_ALL: &str = "SELECT kind, key, body::text, version FROM s2s_authz_resources
     ORDER BY kind COLLATE \"C\", key COLLATE \"C\"";

/// A PostgreSQL connection URL (`postgres://user:password@host:port/db?options`). Its password never
/// appears in `Debug` or `Display`.
#[derive(Clone)]
pub struct DatabaseUrl {
    url: String,
    config: Box<::postgres::Config>,
}

impl DatabaseUrl {
    /// Parses and checks a URL. The error never repeats the URL (it may hold a password).
    pub fn parse(url: &str) -> Result<DatabaseUrl, String> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err("must be a postgres:// or postgresql:// URL".to_owned());
        }
        let mut config = ::postgres::Config::from_str(url)
            .map_err(|e| format!("is not a valid PostgreSQL URL ({e})"))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(LOCK_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("s2s-authz");
        }
        Ok(DatabaseUrl {
            url: url.to_owned(),
            config: Box::new(config),
        })
    }

    /// Host, port and database, without credentials: for logs.
    pub fn redacted(&self) -> String {
        let hosts: Vec<String> = self
            .config
            .get_hosts()
            .iter()
            .map(|h| match h {
                ::postgres::config::Host::Tcp(name) => name.clone(),
                ::postgres::config::Host::Unix(path) => path.display().to_string(),
            })
            .collect();
        let ports: Vec<String> = self
            .config
            .get_ports()
            .iter()
            .map(ToString::to_string)
            .collect();
        format!(
            "postgres://{}:{}/{}",
            hosts.join(","),
            ports.join(","),
            self.config.get_dbname().unwrap_or("")
        )
    }

    fn connect(&self) -> Result<Client, StoreError> {
        Ok(self.config.connect(NoTls)?)
    }
}

impl PartialEq for DatabaseUrl {
    fn eq(&self, other: &Self) -> bool {
        self.url == other.url
    }
}

impl Eq for DatabaseUrl {}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl std::fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

pub(super) struct Postgres {
    url: DatabaseUrl,
    /// `None` after a failed reconnect; reconnected at the next call.
    client: Mutex<Option<Client>>,
    /// The server process of `client`: notices it sent are this process's own changes, which were
    /// published when they committed.
    writer_pid: Arc<AtomicI32>,
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let client = self
            .client
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop_off_runtime(client);
    }
}

/// The client owns a small tokio runtime, which may not be dropped from inside another runtime's
/// worker; dropping it on a thread of its own is always safe.
fn drop_off_runtime(client: Option<Client>) {
    if let Some(client) = client {
        let _ = std::thread::Builder::new()
            .name("s2s-authz-pg-close".to_owned())
            .spawn(move || drop(client));
    }
}

impl Postgres {
    pub(super) fn open(url: &DatabaseUrl) -> Result<Postgres, StoreError> {
        let mut client = url.connect()?;
        migrate(&mut client)?;
        let writer_pid = Arc::new(AtomicI32::new(backend_pid(&mut client)?));
        tracing::info!(database = %url, "registry store: postgresql");
        Ok(Postgres {
            url: url.clone(),
            client: Mutex::new(Some(client)),
            writer_pid,
        })
    }

    /// The connection, checked with a round trip and replaced if it was lost (a server restart, an
    /// idle timeout, a terminated backend) — before anything of the caller's work is sent, so nothing
    /// is retried that might have been applied.
    fn client(&self) -> Result<MutexGuard<'_, Option<Client>>, StoreError> {
        let mut guard = self.client.lock().unwrap_or_else(PoisonError::into_inner);
        let alive = guard
            .as_mut()
            .is_some_and(|c| !c.is_closed() && c.batch_execute("").is_ok());
        if !alive {
            drop_off_runtime(guard.take());
            let mut client = self.url.connect()?;
            self.writer_pid
                .store(backend_pid(&mut client)?, Ordering::Relaxed);
            *guard = Some(client);
            tracing::info!(database = %self.url, "registry store: reconnected");
        }
        Ok(guard)
    }

    pub(super) fn transact<R, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&Tx<'_>) -> Result<R, E>,
    ) -> Result<R, E> {
        let mut guard = self.client()?;
        let Some(client) = guard.as_mut() else {
            return Err(StoreError::Disconnected.into());
        };
        let mut tx = client.transaction().map_err(StoreError::from)?;
        lock(&mut tx)?;
        let tx = Tx::Postgres(RefCell::new(tx));
        let result = f(&tx)?;
        if let Tx::Postgres(tx) = tx {
            tx.into_inner().commit().map_err(StoreError::from)?;
        }
        Ok(result)
    }

    /// One statement, so one consistent snapshot, without taking the writers' lock.
    pub(super) fn load(&self) -> Result<(super::RegistryParts, super::Etags), StoreError> {
        let mut guard = self.client()?;
        let Some(client) = guard.as_mut() else {
            return Err(StoreError::Disconnected);
        };
        super::assemble(rows(client)?)
    }

    pub(super) fn subscribe(&self) -> Result<Subscription, StoreError> {
        let mut client = self.url.connect()?;
        client.batch_execute(&format!("LISTEN {CHANNEL}"))?;
        Ok(Subscription {
            client: Some(client),
            writer_pid: self.writer_pid.clone(),
        })
    }
}

fn backend_pid(client: &mut Client) -> Result<i32, StoreError> {
    Ok(client.query_one("SELECT pg_backend_pid()", &[])?.get(0))
}

/// Takes the writers' advisory lock for the rest of the transaction, waiting at most `LOCK_TIMEOUT`.
fn lock(tx: &mut ::postgres::Transaction<'_>) -> Result<(), StoreError> {
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = {}",
        LOCK_TIMEOUT.as_millis()
    ))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])?;
    Ok(())
}

fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let mut tx = client.transaction()?;
    lock(&mut tx)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS s2s_authz_schema (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            version INTEGER NOT NULL
        );
        INSERT INTO s2s_authz_schema (id, version) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;",
    )?;
    let applied: i32 = tx
        .query_one("SELECT version FROM s2s_authz_schema WHERE id = 1", &[])?
        .get(0);
    let applied = usize::try_from(applied).unwrap_or(usize::MAX);
    if applied > MIGRATIONS.len() {
        return Err(StoreError::TooNew {
            found: applied,
            known: MIGRATIONS.len(),
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        tx.batch_execute(sql)?;
        let version = i32::try_from(i + 1).unwrap_or(i32::MAX);
        tx.execute(
            "UPDATE s2s_authz_schema SET version = $1 WHERE id = 1",
            &[&version],
        )?;
        tracing::info!(version, "registry schema migrated (postgresql)");
    }
    tx.commit()?;
    Ok(())
}

pub(super) fn get(
    tx: &mut ::postgres::Transaction<'_>,
    kind: Kind,
    key: &str,
) -> Result<Option<(String, i64)>, StoreError> {
    let row = tx.query_opt(
        "SELECT body::text, version FROM s2s_authz_resources WHERE kind = $1 AND key = $2",
        &[&kind.as_str(), &key],
    )?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

pub(super) fn put(
    tx: &mut ::postgres::Transaction<'_>,
    kind: Kind,
    key: &str,
    body: &str,
) -> Result<i64, StoreError> {
    // The stamp trigger sets `version` on both paths.
    let row = tx.query_one(
        "INSERT INTO s2s_authz_resources (kind, key, body) VALUES ($1, $2, $3::text::jsonb)
         ON CONFLICT (kind, key) DO UPDATE SET body = excluded.body
         RETURNING version",
        &[&kind.as_str(), &key, &body],
    )?;
    Ok(row.get(0))
}

pub(super) fn delete(
    tx: &mut ::postgres::Transaction<'_>,
    kind: Kind,
    key: &str,
) -> Result<bool, StoreError> {
    let n = tx.execute(
        "DELETE FROM s2s_authz_resources WHERE kind = $1 AND key = $2",
        &[&kind.as_str(), &key],
    )?;
    Ok(n > 0)
}

pub(super) fn rows(client: &mut impl ::postgres::GenericClient) -> Result<Vec<Row>, StoreError> {
    Ok(client
        .query(SELECT_ALL, &[])?
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect())
}

/// The listening end of the change channel: its own connection, `LISTEN`ing.
pub struct Subscription {
    client: Option<Client>,
    writer_pid: Arc<AtomicI32>,
}

/// What one wait on the change feed heard.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Notices {
    /// At least one change notice arrived.
    pub any: bool,
    /// When the earliest change made by someone else (another sidecar, a tool) happened, on this
    /// process's monotonic clock. The database stamps each notice with its own clock; the age of the
    /// stamp is computed against the database's clock too, right after the notices are read, so the
    /// hosts' clocks need not agree. `None` when every notice came from this process's own writes or
    /// carried no stamp.
    pub earliest_foreign: Option<Instant>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}

impl Subscription {
    /// Waits up to `timeout` for change notices and consumes every pending one; an error when the
    /// connection is lost (subscribe again, then resync: notices sent meanwhile are gone).
    pub fn wait(&mut self, timeout: Duration) -> Result<Notices, StoreError> {
        let Some(client) = self.client.as_mut() else {
            return Err(StoreError::Disconnected);
        };
        let Some(first) = client.notifications().timeout_iter(timeout).next()? else {
            return if client.is_closed() {
                Err(StoreError::Disconnected)
            } else {
                Ok(Notices::default())
            };
        };
        let own = self.writer_pid.load(Ordering::Relaxed);
        let stamp = |n: &::postgres::Notification| {
            (n.process_id() != own)
                .then(|| n.payload().split_once(' '))
                .flatten()
                .and_then(|(_, at)| at.parse::<f64>().ok())
                .filter(|at| at.is_finite())
        };
        let mut earliest = stamp(&first);
        {
            let mut notifications = client.notifications();
            let mut pending = notifications.iter();
            while let Some(n) = pending.next()? {
                earliest = match (earliest, stamp(&n)) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
        }
        let earliest_foreign = match earliest {
            None => None,
            Some(at) => {
                let now: f64 = client
                    .query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[])?
                    .get(0);
                let local_now = Instant::now();
                let age = Duration::try_from_secs_f64(now - at).unwrap_or(Duration::ZERO);
                Some(local_now.checked_sub(age).unwrap_or(local_now))
            }
        };
        Ok(Notices {
            any: true,
            earliest_foreign,
        })
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        drop_off_runtime(self.client.take());
    }
}
