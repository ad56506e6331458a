//! `JwksCache`: the signing keys of every trusted issuer, shared by all requests.
//!
//! One slot per `jwks_uri`. A slot's key set is swapped atomically, so readers never block. Refreshes
//! are single-flight per slot and never start more often than the minimum interval; a request whose
//! `kid` is unknown triggers (or joins) one and waits for it only a bounded time. A failed refresh
//! keeps the last good set, which serves until it is older than the staleness limit.

use crate::core::keys::KeySet;
use crate::fetch::Fetcher;
use crate::metrics::{FetchCounters, Metrics};
use arc_swap::ArcSwapOption;
use dashmap::DashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::Instrument as _;

#[derive(Clone, Debug)]
pub struct KeySettings {
    /// Background refresh period.
    pub refresh_interval: Duration,
    /// No slot is refreshed more often than this (bounds what unknown-`kid` floods can cost the issuer).
    pub min_refresh_interval: Duration,
    /// Last-known-good keys serve at most this long after their last successful fetch.
    pub max_staleness: Duration,
    /// How long a request with an unknown `kid` waits for the refresh it triggered or joined.
    pub unknown_kid_wait: Duration,
}

/// A key set and when it was fetched.
#[derive(Debug)]
pub struct LoadedKeys {
    pub set: KeySet,
    pub fetched_at: Instant,
}

#[derive(Debug, Default)]
struct RefreshState {
    in_flight: bool,
    last_started: Option<Instant>,
    last_error: Option<String>,
}

#[derive(Debug)]
struct KeySlot {
    uri: String,
    keys: ArcSwapOption<LoadedKeys>,
    state: Mutex<RefreshState>,
    /// Bumped when a refresh attempt ends, successful or not; waiters watch it.
    attempts: watch::Sender<u64>,
    /// The issuer whose discovery named this key set (`bind_issuer`), and its fetch counters.
    issuer: OnceLock<(String, FetchCounters)>,
}

#[derive(Debug)]
pub struct JwksCache {
    fetcher: Fetcher,
    settings: KeySettings,
    /// Keyed by JWKS URI; looked up on every decision, so hashed with [`crate::core::FastMap`]'s hasher.
    slots: DashMap<String, Arc<KeySlot>, hashbrown::DefaultHashBuilder>,
    metrics: Arc<Metrics>,
}

impl JwksCache {
    pub fn new(fetcher: Fetcher, settings: KeySettings, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(JwksCache {
            fetcher,
            settings,
            slots: DashMap::default(),
            metrics,
        })
    }

    pub fn settings(&self) -> &KeySettings {
        &self.settings
    }

    fn slot(&self, uri: &str) -> Arc<KeySlot> {
        if let Some(slot) = self.slots.get(uri) {
            return slot.clone();
        }
        self.slots
            .entry(uri.to_owned())
            .or_insert_with(|| {
                Arc::new(KeySlot {
                    uri: uri.to_owned(),
                    keys: ArcSwapOption::empty(),
                    state: Mutex::new(RefreshState::default()),
                    attempts: watch::Sender::new(0),
                    issuer: OnceLock::new(),
                })
            })
            .clone()
    }

    /// The usable key set of `uri`: loaded, and not older than the staleness limit.
    pub fn usable(&self, uri: &str) -> Option<Arc<LoadedKeys>> {
        let slot = self.slots.get(uri)?;
        self.fresh(&slot)
    }

    fn fresh(&self, slot: &KeySlot) -> Option<Arc<LoadedKeys>> {
        slot.keys
            .load_full()
            .filter(|k| k.fetched_at.elapsed() <= self.settings.max_staleness)
    }

    /// Names the issuer whose discovery document named `uri`, for the fetch metrics; the first
    /// issuer to name a key set keeps it. Called by discovery before the first fetch.
    pub fn bind_issuer(&self, uri: &str, issuer: &str) {
        let slot = self.slot(uri);
        slot.issuer
            .get_or_init(|| (issuer.to_owned(), self.metrics.jwks_fetch_counters(issuer)));
    }

    pub fn has_loaded(&self, uri: &str) -> bool {
        self.slots.get(uri).is_some_and(|s| s.keys.load().is_some())
    }

    /// The keys to verify a token naming `kid` with. When the set lacks that `kid` (or there is no usable
    /// set), a refresh is triggered or joined, within the minimum interval, and awaited at most
    /// `unknown_kid_wait`. `None` means no usable key set at all.
    pub async fn lookup(self: &Arc<Self>, uri: &str, kid: Option<&str>) -> Option<Arc<LoadedKeys>> {
        let slot = self.slot(uri);
        let current = self.fresh(&slot);
        if current.as_ref().is_some_and(|k| k.set.find(kid).is_some()) {
            return current;
        }
        let mut attempts = slot.attempts.subscribe();
        if self.trigger(&slot) {
            // Either we started a refresh or one is running: wait for it to end, within bounds.
            let _waiting = self.metrics.key_refresh_wait();
            let _ = tokio::time::timeout(self.settings.unknown_kid_wait, attempts.changed()).await;
            return self.fresh(&slot);
        }
        current
    }

    /// Starts a refresh of `slot` unless one is running or the last began too recently.
    /// Returns whether a refresh is now in flight.
    fn trigger(self: &Arc<Self>, slot: &Arc<KeySlot>) -> bool {
        {
            let mut state = slot.state.lock().unwrap_or_else(PoisonError::into_inner);
            if state.in_flight {
                return true;
            }
            if state
                .last_started
                .is_some_and(|t| t.elapsed() < self.settings.min_refresh_interval)
            {
                return false;
            }
            state.in_flight = true;
            state.last_started = Some(Instant::now());
        }
        let cache = self.clone();
        let slot = slot.clone();
        // A child of whatever asked for it (a decision's key lookup, discovery, the background refresh).
        let span = tracing::info_span!(
            "jwks.fetch",
            issuer = self.issuer_of(&slot).0.as_str(),
            jwks_uri = slot.uri.as_str(),
            outcome = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        // Detached: the refresh completes even if every waiter has given up, so the next request benefits.
        tokio::spawn(async move { cache.run_refresh(&slot).await }.instrument(span));
        true
    }

    async fn run_refresh(&self, slot: &KeySlot) {
        let result = self.fetch_keys(&slot.uri).await;
        self.issuer_of(slot).1.record(result.is_ok());
        let span = tracing::Span::current();
        span.record("outcome", if result.is_ok() { "ok" } else { "error" });
        if result.is_err() {
            span.record("otel.status_code", "error");
        }
        let error = match result {
            Ok(set) => {
                tracing::debug!(jwks_uri = %slot.uri, keys = set.len(), skipped = set.skipped, "signing keys refreshed");
                slot.keys.store(Some(Arc::new(LoadedKeys {
                    set,
                    fetched_at: Instant::now(),
                })));
                None
            }
            Err(e) => {
                tracing::warn!(jwks_uri = %slot.uri, error = %e, "signing key refresh failed; keeping last good keys");
                Some(e)
            }
        };
        {
            let mut state = slot.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.in_flight = false;
            state.last_error = error;
        }
        slot.attempts.send_modify(|n| *n += 1);
    }

    /// The slot's issuer and fetch counters. A key set nobody's discovery named (only tests refresh
    /// such a one) goes by its URI.
    fn issuer_of<'s>(&self, slot: &'s KeySlot) -> &'s (String, FetchCounters) {
        slot.issuer.get_or_init(|| {
            (
                slot.uri.clone(),
                self.metrics.jwks_fetch_counters(&slot.uri),
            )
        })
    }

    async fn fetch_keys(&self, uri: &str) -> Result<KeySet, String> {
        let body = self.fetcher.get(uri).await.map_err(|e| e.to_string())?;
        KeySet::parse(&body).map_err(|e| e.to_string())
    }

    /// Refreshes `uri` now (or joins the refresh in flight) and waits for the outcome; used at start-up
    /// and by the background refresher. Respects the minimum interval unless `force` is set.
    pub async fn refresh(self: &Arc<Self>, uri: &str, force: bool) -> Result<(), String> {
        let slot = self.slot(uri);
        let mut attempts = slot.attempts.subscribe();
        if force {
            let mut state = slot.state.lock().unwrap_or_else(PoisonError::into_inner);
            if !state.in_flight {
                state.last_started = None;
            }
        }
        if self.trigger(&slot) {
            let _ = attempts.changed().await;
        }
        let state = slot.state.lock().unwrap_or_else(PoisonError::into_inner);
        match &state.last_error {
            Some(e) => Err(e.clone()),
            None if slot.keys.load().is_some() => Ok(()),
            None => Err("not loaded yet".to_owned()),
        }
    }

    /// How long ago `uri`'s key set was last loaded successfully; `None` when it never was.
    pub fn age(&self, uri: &str) -> Option<Duration> {
        let slot = self.slots.get(uri)?;
        slot.keys.load().as_ref().map(|k| k.fetched_at.elapsed())
    }

    /// Forgets slots no trusted issuer uses any more. A slot whose refresh is running is kept: it
    /// belongs to an issuer being discovered right now.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.slots.retain(|uri, slot| {
            keep(uri)
                || slot
                    .state
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .in_flight
        });
    }
}
