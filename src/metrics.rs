//! Prometheus metrics and the HTTP probe endpoints (`/metrics`, `/healthz`, `/readyz`).
//!
//! The decision path pays for its metrics with a few relaxed atomic additions and nothing else: every
//! metric it touches is resolved once, at start, into a handle (a decision counter per reason, a latency
//! histogram per API), so no label set is built, hashed or allocated per call. Values that describe
//! state rather than events (key-set ages, cache and registry sizes) are read from the live caches when
//! Prometheus scrapes, so they cost nothing between scrapes and are never stale.

use crate::core::DenyReason;
use crate::engine::Authorizer;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;
use tokio::sync::watch;

/// Which API a decision was asked through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    /// `envoy.service.auth.v3.Authorization/Check`.
    ExtAuthz,
    /// `s2sauthz.v1.Authorizer` (`Decide`, `Explain`).
    Native,
}

impl Api {
    pub const ALL: [Api; 2] = [Api::ExtAuthz, Api::Native];

    pub fn as_str(self) -> &'static str {
        match self {
            Api::ExtAuthz => "ext_authz",
            Api::Native => "native",
        }
    }
}

/// Upper bounds (seconds) of the decision latency buckets: from a cache hit (about 2 µs) through a
/// cold RS256 verification (about 30 µs) and a wait for an unknown `kid`'s refresh (100 ms by default)
/// to Envoy's whole 200 ms check timeout.
pub const DECISION_BUCKETS: [f64; 16] = [
    0.000_002, 0.000_005, 0.000_01, 0.000_02, 0.000_05, 0.000_1, 0.000_2, 0.000_5, 0.001, 0.002,
    0.005, 0.01, 0.02, 0.05, 0.1, 0.2,
];

/// Upper bounds (seconds) of the registry change lag buckets: from a notice on loopback (milliseconds)
/// to a change healed by the periodic resync (30 s by default) and beyond.
pub const CHANGE_LAG_BUCKETS: [f64; 16] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// A histogram updated with two relaxed atomic additions per observation.
///
/// `prometheus_client`'s own `Histogram` takes a mutex on every observation; on the decision path, where
/// every core records every call, that lock would be the only point of contention. Bucket counts are kept
/// per bucket (not cumulative) and summed at scrape time, which also yields the total count, so a scrape
/// never sees more observations in `_count` than in the buckets.
#[derive(Clone, Debug)]
pub struct AtomicHistogram {
    inner: Arc<HistogramInner>,
}

#[derive(Debug)]
struct HistogramInner {
    /// Upper bounds in seconds, for the exposition.
    bounds: &'static [f64],
    /// The same bounds in nanoseconds, for the comparison on the hot path.
    bounds_nanos: Box<[u64]>,
    /// One count per bound, and one more for `+Inf`.
    counts: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
}

impl AtomicHistogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        let bounds_nanos = bounds
            .iter()
            .map(|b| Duration::from_secs_f64(*b).as_nanos())
            .map(|n| u64::try_from(n).unwrap_or(u64::MAX))
            .collect();
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        AtomicHistogram {
            inner: Arc::new(HistogramInner {
                bounds,
                bounds_nanos,
                counts,
                sum_nanos: AtomicU64::new(0),
            }),
        }
    }

    pub fn observe(&self, value: Duration) {
        let nanos = u64::try_from(value.as_nanos()).unwrap_or(u64::MAX);
        let inner = &*self.inner;
        // The first bucket whose bound is at least the value (`le` is inclusive); past all, `+Inf`.
        let index = inner.bounds_nanos.partition_point(|bound| *bound < nanos);
        if let Some(count) = inner.counts.get(index) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        inner.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// How many observations so far.
    pub fn count(&self) -> u64 {
        self.inner
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let inner = &*self.inner;
        let counts: Vec<u64> = inner
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let buckets: Vec<(f64, u64)> = inner
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(counts.iter().copied())
            .collect();
        let sum = Duration::from_nanos(inner.sum_nanos.load(Ordering::Relaxed)).as_secs_f64();
        encoder.encode_histogram::<NoLabelSet>(sum, counts.iter().sum(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    decision: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiLabels {
    api: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FetchLabels {
    issuer: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TlsLabels {
    port: &'static str,
    outcome: &'static str,
}

type HistogramFamily<L> = Family<L, AtomicHistogram, fn() -> AtomicHistogram>;

fn decision_histogram() -> AtomicHistogram {
    AtomicHistogram::new(&DECISION_BUCKETS)
}

/// The counters of one key set's fetches, resolved once per key set.
#[derive(Clone, Debug)]
pub struct FetchCounters {
    ok: Counter,
    error: Counter,
}

impl FetchCounters {
    pub fn record(&self, ok: bool) {
        if ok {
            self.ok.inc();
        } else {
            self.error.inc();
        }
    }
}

/// The service's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Index 0: allowed; index `1 + reason as usize`: denied for that reason.
    decisions: Box<[Counter]>,
    /// By `Api as usize`.
    latency: [AtomicHistogram; 2],
    token_cache_hits: Counter,
    token_cache_misses: Counter,
    jwks_fetches: Family<FetchLabels, Counter>,
    tls_reloads: Family<TlsLabels, Counter>,
    tls_handshakes: Family<TlsLabels, Counter>,
    registry_change_lag: AtomicHistogram,
    /// What the scrape-time gauges read; set once the authorizer exists (it holds these metrics, so
    /// the link back is weak).
    source: Arc<OnceLock<Weak<Authorizer>>>,
    key_refresh_waiters: Gauge,
}

/// One request waiting for a key refresh; counted in `key_refresh_waiters` until dropped (also when
/// the request is cancelled mid-wait).
#[derive(Debug)]
pub struct KeyRefreshWait<'a>(&'a Gauge);

impl Drop for KeyRefreshWait<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("s2s_authz");
        registry.register(
            "build",
            "Build information: the version of this s2s-authz",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );

        let decisions_family = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Decisions by result and deny reason (reason is empty for allow)",
            decisions_family.clone(),
        );
        // Every series exists from the start, at 0, so that `rate()` and alerts see a reason's first deny.
        let labels = std::iter::once(DecisionLabels {
            decision: "allow",
            reason: "",
        })
        .chain(DenyReason::ALL.iter().map(|r| DecisionLabels {
            decision: "deny",
            reason: r.as_str(),
        }));
        let decisions = labels
            .map(|l| decisions_family.get_or_create(&l).clone())
            .collect();

        let latency_family: HistogramFamily<ApiLabels> =
            Family::new_with_constructor(decision_histogram);
        registry.register_with_unit(
            "decision_duration",
            "Time to decide, from the request reaching the authorizer to its decision, by API",
            Unit::Seconds,
            latency_family.clone(),
        );
        let latency = Api::ALL.map(|api| {
            latency_family
                .get_or_create(&ApiLabels { api: api.as_str() })
                .clone()
        });

        let token_cache_hits = Counter::default();
        registry.register(
            "token_cache_hits",
            "Decisions that reused a cached token verification",
            token_cache_hits.clone(),
        );
        let token_cache_misses = Counter::default();
        registry.register(
            "token_cache_misses",
            "Token cache lookups that found no usable entry (absent, expired, or its key or issuer changed)",
            token_cache_misses.clone(),
        );

        let jwks_fetches = Family::<FetchLabels, Counter>::default();
        registry.register(
            "jwks_fetches",
            "JWKS fetches by issuer and outcome (ok, error)",
            jwks_fetches.clone(),
        );
        let tls_reloads = Family::<TlsLabels, Counter>::default();
        registry.register(
            "tls_reloads",
            "Reloads of a port's TLS files by outcome (reloaded, refused)",
            tls_reloads.clone(),
        );
        let tls_handshakes = Family::<TlsLabels, Counter>::default();
        registry.register(
            "tls_handshakes",
            "TLS handshakes by port and outcome (ok, failed, timeout, busy)",
            tls_handshakes.clone(),
        );

        let registry_change_lag = AtomicHistogram::new(&CHANGE_LAG_BUCKETS);
        registry.register_with_unit(
            "registry_change_lag",
            "Time from a registry change made elsewhere (another sidecar or a tool, in the shared \
             PostgreSQL store; stamped by the database's clock at the changing statement) to this sidecar \
             publishing it",
            Unit::Seconds,
            registry_change_lag.clone(),
        );

        let source = Arc::new(OnceLock::new());
        registry.register_collector(Box::new(StateCollector {
            source: source.clone(),
        }));
        let key_refresh_waiters = Gauge::default();
        registry.register(
            "key_refresh_waiters",
            "Requests now waiting for a key refresh (their token names a kid the cached set lacks)",
            key_refresh_waiters.clone(),
        );
        Metrics {
            registry,
            decisions,
            latency,
            token_cache_hits,
            token_cache_misses,
            jwks_fetches,
            tls_reloads,
            tls_handshakes,
            registry_change_lag,
            source,
            key_refresh_waiters,
        }
    }

    /// Links the scrape-time gauges (key-set ages, token cache and registry sizes) to the live caches.
    /// Only the first call has an effect.
    pub fn observe(&self, authorizer: &Arc<Authorizer>) {
        let _ = self.source.set(Arc::downgrade(authorizer));
    }

    pub fn tls_reload(&self, port: &'static str, outcome: &'static str) {
        self.tls_reloads
            .get_or_create(&TlsLabels { port, outcome })
            .inc();
    }

    pub fn tls_handshake(&self, port: &'static str, outcome: &'static str) {
        self.tls_handshakes
            .get_or_create(&TlsLabels { port, outcome })
            .inc();
    }

    /// Records one decision: its result and its latency.
    pub fn decision(&self, api: Api, reason: Option<DenyReason>, elapsed: Duration) {
        let index = reason.map_or(0, |r| 1 + r as usize);
        if let Some(counter) = self.decisions.get(index) {
            counter.inc();
        }
        self.latency[api as usize].observe(elapsed);
    }

    pub fn token_cache_hit(&self) {
        self.token_cache_hits.inc();
    }

    pub fn token_cache_miss(&self) {
        self.token_cache_misses.inc();
    }

    /// The fetch counters of the key set `issuer` names, created at 0 so its first failure shows as a change.
    pub fn jwks_fetch_counters(&self, issuer: &str) -> FetchCounters {
        let counter = |outcome| {
            self.jwks_fetches
                .get_or_create(&FetchLabels {
                    issuer: issuer.to_owned(),
                    outcome,
                })
                .clone()
        };
        FetchCounters {
            ok: counter("ok"),
            error: counter("error"),
        }
    }

    /// Records how long a change made elsewhere took to be published here.
    pub fn registry_change_lag(&self, lag: Duration) {
        self.registry_change_lag.observe(lag);
    }

    /// Counts the caller as waiting for a key refresh until the returned guard is dropped.
    pub fn key_refresh_wait(&self) -> KeyRefreshWait<'_> {
        self.key_refresh_waiters.inc();
        KeyRefreshWait(&self.key_refresh_waiters)
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail for well-formed metric names.
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// The gauges computed from the caches at scrape time. (Help texts end with a period here: the
/// registry adds one to those of registered metrics, but not to a collector's.)
#[derive(Debug)]
struct StateCollector {
    source: Arc<OnceLock<Weak<Authorizer>>>,
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(authorizer) = self.source.get().and_then(Weak::upgrade) else {
            return Ok(());
        };

        // One series per trusted issuer whose keys have loaded: an issuer that never loaded has no age
        // (its fetch errors count in `jwks_fetches_total`, and readiness waits for it).
        let trust = authorizer.directory().trust();
        let jwks = authorizer.directory().jwks();
        let mut ages: Vec<(&str, f64)> = trust
            .issuers()
            .filter_map(|i| {
                jwks.age(&i.jwks_uri)
                    .map(|age| (i.issuer.as_str(), age.as_secs_f64()))
            })
            .collect();
        ages.sort_by(|a, b| a.0.cmp(b.0));
        let mut family = encoder.encode_descriptor(
            "key_set_age",
            "Seconds since each trusted issuer's signing keys were last loaded successfully.",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?;
        for (issuer, age) in ages {
            family
                .encode_family(&[("issuer", issuer)])?
                .encode_gauge(&age)?;
        }

        let tokens = authorizer.token_cache();
        let len = u64::try_from(tokens.len()).unwrap_or(u64::MAX);
        encoder
            .encode_descriptor(
                "token_cache_entries",
                "Verified tokens in the token cache.",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&len)?;
        encoder
            .encode_descriptor(
                "token_cache_capacity_entries",
                "The token cache's bound on entries (0: the cache is off).",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&tokens.capacity())?;

        let policy = authorizer.allowlist().load();
        let mut family = encoder.encode_descriptor(
            "registry_resources",
            "Resources in the published registry (configuration and store), by kind.",
            None,
            MetricType::Gauge,
        )?;
        for (kind, count) in policy.registry.counts() {
            let count = u64::try_from(count).unwrap_or(u64::MAX);
            family
                .encode_family(&[("kind", kind)])?
                .encode_gauge(&count)?;
        }
        Ok(())
    }
}

/// Serves `/metrics`, `/healthz` (the process is up) and `/readyz` (keys of configured tenants loaded).
///
/// The probes answer as the kubelet expects: 200 when healthy or ready, 503 when not, a one-line
/// plain-text body either way, and no dependency on anything but the process itself (liveness) or key
/// readiness (readiness), so a slow identity provider never gets the pod restarted.
pub fn router(metrics: Arc<Metrics>, ready: watch::Receiver<bool>) -> axum::Router {
    use axum::http::{StatusCode, header};
    use axum::routing::get;
    const TEXT: (header::HeaderName, &str) = (header::CONTENT_TYPE, "text/plain; charset=utf-8");
    axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.encode(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { ([TEXT], "ok\n") }))
        .route(
            "/readyz",
            get(move || {
                let ready = *ready.borrow();
                async move {
                    if ready {
                        (StatusCode::OK, [TEXT], "ready\n")
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            [TEXT],
                            "signing keys not loaded\n",
                        )
                    }
                }
            }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample `name` whose labels include every one of `labels`.
    fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        text.lines().find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let has = |(k, v): &(&str, &str)| {
                series_labels
                    .split(',')
                    .any(|pair| pair == format!("{k}=\"{v}\""))
            };
            (series_name == name && labels.iter().all(has)).then(|| value.parse().ok())?
        })
    }

    #[test]
    fn decision_counters_are_indexed_by_reason() {
        // `1 + reason as usize` must name that reason's counter: the declaration order is ALL's order.
        for (i, reason) in DenyReason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i, "{reason:?}");
        }
        let metrics = Metrics::new();
        metrics.decision(Api::Native, Some(DenyReason::RoleMissing), Duration::ZERO);
        metrics.decision(Api::ExtAuthz, None, Duration::ZERO);
        metrics.decision(Api::ExtAuthz, None, Duration::ZERO);
        let text = metrics.encode();
        let decisions = |decision, reason| {
            value(
                &text,
                "s2s_authz_decisions_total",
                &[("decision", decision), ("reason", reason)],
            )
        };
        assert_eq!(decisions("deny", "ROLE_MISSING"), Some(1.0), "{text}");
        assert_eq!(decisions("allow", ""), Some(2.0));
        for reason in DenyReason::ALL {
            assert!(
                decisions("deny", reason.as_str()).is_some(),
                "every reason is exported from the start: {reason:?}"
            );
        }
        assert_eq!(decisions("deny", "TOKEN_MISSING"), Some(0.0));
    }

    #[test]
    fn histogram_buckets_are_inclusive_and_cumulative() {
        let metrics = Metrics::new();
        for micros in [1, 2, 3, 150_000, 250_000] {
            metrics.decision(Api::Native, None, Duration::from_micros(micros));
        }
        let text = metrics.encode();
        let name = "s2s_authz_decision_duration_seconds";
        let bucket = |le| {
            value(
                &text,
                &format!("{name}_bucket"),
                &[("api", "native"), ("le", le)],
            )
        };
        assert_eq!(
            bucket("0.000002"),
            Some(2.0),
            "1 µs and 2 µs are ≤ 2 µs:\n{text}"
        );
        assert_eq!(bucket("0.000005"), Some(3.0));
        assert_eq!(bucket("0.1"), Some(3.0));
        assert_eq!(bucket("0.2"), Some(4.0));
        assert_eq!(bucket("+Inf"), Some(5.0));
        let native = [("api", "native")];
        assert_eq!(value(&text, &format!("{name}_count"), &native), Some(5.0));
        let sum = value(&text, &format!("{name}_sum"), &native).unwrap_or_default();
        assert!((sum - 0.400_006).abs() < 1e-9, "{sum}");
        let ext_authz = [("api", "ext_authz")];
        assert_eq!(
            value(&text, &format!("{name}_count"), &ext_authz),
            Some(0.0)
        );
    }

    #[test]
    fn fetch_counters_exist_at_zero_once_resolved() {
        let metrics = Metrics::new();
        let issuer = "https://login.microsoftonline.com/t/v2.0";
        metrics.jwks_fetch_counters(issuer).record(true);
        let text = metrics.encode();
        let fetches = |outcome| {
            value(
                &text,
                "s2s_authz_jwks_fetches_total",
                &[("issuer", issuer), ("outcome", outcome)],
            )
        };
        assert_eq!(fetches("ok"), Some(1.0), "{text}");
        assert_eq!(fetches("error"), Some(0.0));
    }
}
