//! `Registry`: the live, durable allowlist — what configuration provisions plus what administrators
//! created through the API (kept in the `Store`), validated as a whole and published to the
//! allowlist cache after every change, so the very next decision sees it.
//!
//! A change is validated inside its write transaction: if the resulting registry would be invalid (a
//! duplicate identity, a role still in use, a builtin role on an application user), nothing is
//! committed. Provisioned resources are read-only here.
//!
//! A store shared by a fleet (PostgreSQL) also changes under other sidecars' hands: `spawn_watcher`
//! follows its change feed and resyncs on every notice and periodically (healing a missed notice or a
//! lost connection), publishing whenever the stored registry differs from what was last published.

use crate::core::ids::is_guid;
use crate::core::registry::{
    AppEntry, ApplicationUser, RegistryError, RegistryParts, RegistrySnapshot, Route, SecurityRole,
    User,
};
use crate::engine::{Authorizer, Policy};
use crate::store::{Etags, Kind, Store, StoreError, Tx};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum RegistryOpError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("etag `{given}` is stale: {what} has changed since (current etag `{current}`)")]
    StaleEtag {
        what: String,
        given: String,
        current: String,
    },
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<RegistryError> for RegistryOpError {
    fn from(e: RegistryError) -> Self {
        let message = e.to_string();
        match e {
            RegistryError::DuplicateEntryName(_)
            | RegistryError::DuplicateIdentity { .. }
            | RegistryError::DuplicateRole(_)
            | RegistryError::DuplicateUser(_)
            | RegistryError::DuplicateRoute(_) => RegistryOpError::AlreadyExists(message),
            RegistryError::InvalidEntry(..)
            | RegistryError::BuiltinRole { .. }
            | RegistryError::InvalidRoute(_) => RegistryOpError::InvalidArgument(message),
            RegistryError::UnknownRole { .. }
            | RegistryError::UnknownUserRole { .. }
            | RegistryError::ApplicationUserCount(_)
            | RegistryError::OrphanApplicationUser(_) => {
                RegistryOpError::FailedPrecondition(message)
            }
        }
    }
}

/// A registry resource kind: how to key it and where it lives in `RegistryParts`.
pub trait Resource: Clone + Serialize + DeserializeOwned + Send + 'static {
    const KIND: Kind;
    const NAME: &'static str;
    fn key(&self) -> String;
    fn of(parts: &RegistryParts) -> &[Self];
}

impl Resource for AppEntry {
    const KIND: Kind = Kind::AppEntry;
    const NAME: &'static str = "app entry";
    fn key(&self) -> String {
        self.name.clone()
    }
    fn of(parts: &RegistryParts) -> &[Self] {
        &parts.entries
    }
}

impl Resource for ApplicationUser {
    const KIND: Kind = Kind::ApplicationUser;
    const NAME: &'static str = "application user";
    fn key(&self) -> String {
        self.id.clone()
    }
    fn of(parts: &RegistryParts) -> &[Self] {
        &parts.app_users
    }
}

impl Resource for SecurityRole {
    const KIND: Kind = Kind::SecurityRole;
    const NAME: &'static str = "security role";
    fn key(&self) -> String {
        self.name.clone()
    }
    fn of(parts: &RegistryParts) -> &[Self] {
        &parts.roles
    }
}

impl Resource for User {
    const KIND: Kind = Kind::User;
    const NAME: &'static str = "user";
    fn key(&self) -> String {
        self.object_id.to_string()
    }
    fn of(parts: &RegistryParts) -> &[Self] {
        &parts.users
    }
}

impl Resource for Route {
    const KIND: Kind = Kind::Route;
    const NAME: &'static str = "route";
    fn key(&self) -> String {
        self.id.clone()
    }
    fn of(parts: &RegistryParts) -> &[Self] {
        &parts.routes
    }
}

/// A resource as the API shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct Record<T> {
    pub value: T,
    /// Empty for provisioned resources, which cannot be changed here.
    pub etag: String,
    pub provisioned: bool,
}

/// The Entra tenants app entries make trusted. Entries of generic OIDC issuers name the issuer URL as
/// their tenant; those issuers are trusted (and discovered) through `oidc_issuers`, not here.
pub fn entra_tenants(snapshot: &RegistrySnapshot) -> BTreeSet<String> {
    snapshot
        .entry_tenants()
        .into_iter()
        .filter(|t| is_guid(t.as_str()))
        .map(|t| t.to_string())
        .collect()
}

pub struct Registry {
    store: Store,
    provisioned: Mutex<RegistryParts>,
    /// The stored part of the registry as last published.
    published: Mutex<RegistryParts>,
    /// Held from a change's transaction through its publication, so snapshots are published in commit order.
    publishing: Mutex<()>,
    authorizer: Arc<Authorizer>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

fn validate(
    provisioned: &RegistryParts,
    stored: &RegistryParts,
) -> Result<RegistrySnapshot, RegistryOpError> {
    Ok(RegistrySnapshot::from_parts(provisioned.merged(stored))?)
}

impl Registry {
    /// Opens the registry over `store` and publishes the merged allowlist.
    pub fn open(
        store: Store,
        provisioned: RegistryParts,
        authorizer: Arc<Authorizer>,
    ) -> Result<Arc<Self>, RegistryOpError> {
        let registry = Arc::new(Registry {
            store,
            provisioned: Mutex::new(provisioned),
            published: Mutex::new(RegistryParts::default()),
            publishing: Mutex::new(()),
            authorizer,
        });
        let _order = registry
            .publishing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (stored, _) = registry.store.load()?;
        let snapshot = validate(&registry.provisioned(), &stored)?;
        registry.publish(snapshot, stored);
        drop(_order);
        Ok(registry)
    }

    /// Re-reads the store and publishes it if it changed since the last publication (another
    /// sidecar's change, or one made straight in the database). Returns whether it published. A stored
    /// registry that does not validate is refused; the last good one keeps serving.
    pub fn resync(&self) -> Result<bool, RegistryOpError> {
        let _order = self
            .publishing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (stored, _) = self.store.load()?;
        if *self
            .published
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            == stored
        {
            return Ok(false);
        }
        let snapshot = validate(&self.provisioned(), &stored)?;
        self.publish(snapshot, stored);
        Ok(true)
    }

    /// Follows a shared store's changes on a thread of its own: resyncs at every change notice, after
    /// every (re)connection of the feed, and every `every` in any case. `None` for a store only this
    /// process writes.
    pub fn spawn_watcher(self: &Arc<Self>, every: Duration) -> Option<Watcher> {
        if !self.store.is_shared() {
            return None;
        }
        let registry = Arc::downgrade(self);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("s2s-authz-registry-watch".to_owned())
            .spawn(move || watch(&registry, &flag, every));
        match thread {
            Ok(thread) => Some(Watcher {
                stop,
                thread: Some(thread),
            }),
            Err(e) => {
                tracing::error!(error = %e, "could not start the registry watcher; relying on restarts");
                None
            }
        }
    }

    fn provisioned(&self) -> RegistryParts {
        self.provisioned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn publish(&self, snapshot: RegistrySnapshot, stored: RegistryParts) {
        *self
            .published
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = stored;
        let tenants = entra_tenants(&snapshot);
        let current = self.authorizer.allowlist().load();
        self.authorizer.allowlist().replace(Policy {
            settings: current.settings.clone(),
            registry: snapshot,
        });
        self.authorizer.directory().set_tenants(tenants);
    }

    /// Re-applies configuration (start and reload): new provisioned parts and decision settings.
    pub fn reprovision(
        &self,
        provisioned: RegistryParts,
        settings: crate::core::DecisionSettings,
    ) -> Result<(), RegistryOpError> {
        let _order = self
            .publishing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (stored, _) = self.store.load()?;
        let snapshot = validate(&provisioned, &stored)?;
        *self
            .provisioned
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = provisioned;
        *self
            .published
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = stored;
        let tenants = entra_tenants(&snapshot);
        self.authorizer.allowlist().replace(Policy {
            settings,
            registry: snapshot,
        });
        self.authorizer.directory().set_tenants(tenants);
        Ok(())
    }

    /// Runs one change in a transaction, validates the result, commits, and publishes it.
    fn change<R>(
        &self,
        f: impl FnOnce(&Tx<'_>, &RegistryParts) -> Result<R, RegistryOpError>,
    ) -> Result<R, RegistryOpError> {
        let _order = self
            .publishing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let provisioned = self.provisioned();
        let (result, snapshot, stored) = self.store.transact(|tx| {
            let result = f(tx, &provisioned)?;
            let (stored, _) = tx.load()?;
            let snapshot = validate(&provisioned, &stored)?;
            Ok::<_, RegistryOpError>((result, snapshot, stored))
        })?;
        self.publish(snapshot, stored);
        Ok(result)
    }

    /// Every resource of a kind, provisioned first, then stored; sorted by key within each.
    pub fn list<T: Resource>(&self) -> Result<Vec<Record<T>>, RegistryOpError> {
        let provisioned = self.provisioned();
        let (stored, etags) = self.store.load()?;
        let mut out: Vec<Record<T>> = T::of(&provisioned)
            .iter()
            .map(|v| Record {
                value: v.clone(),
                etag: String::new(),
                provisioned: true,
            })
            .collect();
        out.sort_by_key(|r| r.value.key());
        out.extend(T::of(&stored).iter().map(|v| Record {
            etag: etag_of(&etags, T::KIND, &v.key()),
            value: v.clone(),
            provisioned: false,
        }));
        Ok(out)
    }

    pub fn get<T: Resource>(&self, key: &str) -> Result<Record<T>, RegistryOpError> {
        if let Some(v) = T::of(&self.provisioned()).iter().find(|v| v.key() == key) {
            return Ok(Record {
                value: v.clone(),
                etag: String::new(),
                provisioned: true,
            });
        }
        let found = self.store.transact(|tx| tx.get::<T>(T::KIND, key))?;
        match found {
            Some((value, version)) => Ok(Record {
                value,
                etag: version.to_string(),
                provisioned: false,
            }),
            None => Err(RegistryOpError::NotFound(format!("{} `{key}`", T::NAME))),
        }
    }

    pub fn create<T: Resource>(&self, value: T) -> Result<Record<T>, RegistryOpError> {
        self.create_with(value, None::<ApplicationUser>)
    }

    /// Creates an app entry together with its application user.
    pub fn create_entry(
        &self,
        entry: AppEntry,
        user: ApplicationUser,
    ) -> Result<Record<AppEntry>, RegistryOpError> {
        self.create_with(entry, Some(user))
    }

    fn create_with<T: Resource>(
        &self,
        value: T,
        companion: Option<ApplicationUser>,
    ) -> Result<Record<T>, RegistryOpError> {
        let key = value.key();
        self.change(|tx, provisioned| {
            if T::of(provisioned).iter().any(|v| v.key() == key)
                || tx.get::<T>(T::KIND, &key)?.is_some()
            {
                return Err(RegistryOpError::AlreadyExists(format!(
                    "{} `{key}`",
                    T::NAME
                )));
            }
            let version = tx.put(T::KIND, &key, &value)?;
            if let Some(user) = &companion {
                if tx
                    .get::<ApplicationUser>(Kind::ApplicationUser, &user.id)?
                    .is_some()
                {
                    return Err(RegistryOpError::AlreadyExists(format!(
                        "application user `{}`",
                        user.id
                    )));
                }
                tx.put(Kind::ApplicationUser, &user.id, user)?;
            }
            Ok(Record {
                value,
                etag: version.to_string(),
                provisioned: false,
            })
        })
    }

    pub fn update<T: Resource>(&self, value: T, etag: &str) -> Result<Record<T>, RegistryOpError> {
        let key = value.key();
        self.change(|tx, provisioned| {
            check_current::<T>(tx, provisioned, &key, etag)?;
            let version = tx.put(T::KIND, &key, &value)?;
            Ok(Record {
                value,
                etag: version.to_string(),
                provisioned: false,
            })
        })
    }

    pub fn delete<T: Resource>(&self, key: &str, etag: &str) -> Result<(), RegistryOpError> {
        self.change(|tx, provisioned| {
            check_current::<T>(tx, provisioned, key, etag)?;
            tx.delete(T::KIND, key)?;
            if T::KIND == Kind::AppEntry {
                // An entry's application user goes with it.
                let (stored, _) = tx.load()?;
                for user in stored.app_users.iter().filter(|u| u.entry_name == key) {
                    tx.delete(Kind::ApplicationUser, &user.id)?;
                }
            }
            Ok(())
        })
    }
}

fn etag_of(etags: &Etags, kind: Kind, key: &str) -> String {
    etags
        .get(&(kind, key.to_owned()))
        .map(ToString::to_string)
        .unwrap_or_default()
}

/// Refuses changes to provisioned resources, to missing ones, and with a stale etag.
fn check_current<T: Resource>(
    tx: &Tx<'_>,
    provisioned: &RegistryParts,
    key: &str,
    etag: &str,
) -> Result<(), RegistryOpError> {
    if T::of(provisioned).iter().any(|v| v.key() == key) {
        return Err(RegistryOpError::FailedPrecondition(format!(
            "{} `{key}` is provisioned from configuration and read-only here",
            T::NAME
        )));
    }
    let Some((_, version)) = tx.get::<T>(T::KIND, key)? else {
        return Err(RegistryOpError::NotFound(format!("{} `{key}`", T::NAME)));
    };
    if etag != version.to_string() {
        return Err(RegistryOpError::StaleEtag {
            what: format!("{} `{key}`", T::NAME),
            given: etag.to_owned(),
            current: version.to_string(),
        });
    }
    Ok(())
}

/// The running registry watcher; `stop` ends it.
#[derive(Debug)]
pub struct Watcher {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watcher {
    /// Asks the watcher to end and waits for it (it notices within one poll interval).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

/// How often the watcher looks up from waiting on the feed, to notice `stop` and the resync deadline.
const WATCH_POLL: Duration = Duration::from_millis(200);
/// The longest pause between attempts to reconnect the change feed.
const MAX_FEED_BACKOFF: Duration = Duration::from_secs(5);

fn watch(registry: &Weak<Registry>, stop: &AtomicBool, every: Duration) {
    let mut feed = None;
    let mut backoff = WATCH_POLL;
    let mut reconnect_at = Instant::now();
    let mut resync_at = Instant::now() + every;
    // The earliest change made elsewhere that has been heard of but not yet published.
    let mut unpublished: Option<Instant> = None;
    while !stop.load(Ordering::Acquire) {
        let Some(this) = registry.upgrade() else {
            return;
        };
        let mut due = Instant::now() >= resync_at;
        if feed.is_none() && Instant::now() >= reconnect_at {
            match this.store.subscribe() {
                Some(Ok(subscription)) => {
                    feed = Some(subscription);
                    backoff = WATCH_POLL;
                    // Notices sent while there was no feed are gone: read the store again.
                    due = true;
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis(), "registry change feed unavailable");
                    reconnect_at = Instant::now() + backoff;
                    backoff = (backoff * 2).min(MAX_FEED_BACKOFF);
                }
                None => return,
            }
        }
        let notified = match feed.as_mut() {
            Some(subscription) => match subscription.wait(WATCH_POLL) {
                Ok(notices) => {
                    unpublished = match (unpublished, notices.earliest_foreign) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    notices.any
                }
                Err(e) => {
                    tracing::warn!(error = %e, "registry change feed lost; resyncing when it is back");
                    feed = None;
                    reconnect_at = Instant::now();
                    false
                }
            },
            None => {
                std::thread::park_timeout(WATCH_POLL);
                false
            }
        };
        if (due || notified) && !stop.load(Ordering::Acquire) {
            resync_at = Instant::now() + every;
            match this.resync() {
                Ok(true) => {
                    if let Some(changed) = unpublished.take() {
                        this.authorizer
                            .metrics()
                            .registry_change_lag(changed.elapsed());
                    }
                    tracing::info!("registry changed in the shared store: published");
                }
                // Nothing new (the notices were of changes already published): nothing to measure.
                Ok(false) => unpublished = None,
                Err(e) => {
                    tracing::warn!(error = %e, "registry resync failed; the last good registry keeps serving")
                }
            }
        }
    }
}
