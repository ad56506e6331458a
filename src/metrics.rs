//! Prometheus metrics and the HTTP probe endpoints (`/metrics`, `/healthz`, `/readyz`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use tokio::sync::watch;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    decision: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FetchLabels {
    jwks_uri: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TlsLabels {
    port: &'static str,
    outcome: &'static str,
}

/// The service's metrics. Cheap to update from the hot path: label sets are static strings.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
    jwks_fetches: Family<FetchLabels, Counter>,
    tls_reloads: Family<TlsLabels, Counter>,
    tls_handshakes: Family<TlsLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("s2s_authz");
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Decisions by result and deny reason",
            decisions.clone(),
        );
        let jwks_fetches = Family::<FetchLabels, Counter>::default();
        registry.register(
            "jwks_fetches",
            "JWKS fetches by URI and outcome",
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
        Metrics {
            registry,
            decisions,
            jwks_fetches,
            tls_reloads,
            tls_handshakes,
        }
    }

    pub fn decision(&self, reason: Option<crate::core::DenyReason>) {
        let labels = match reason {
            None => DecisionLabels {
                decision: "allow",
                reason: "",
            },
            Some(r) => DecisionLabels {
                decision: "deny",
                reason: r.as_str(),
            },
        };
        self.decisions.get_or_create(&labels).inc();
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

    pub fn jwks_fetch(&self, uri: &str, outcome: &'static str) {
        self.jwks_fetches
            .get_or_create(&FetchLabels {
                jwks_uri: uri.to_owned(),
                outcome,
            })
            .inc();
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

/// Serves `/metrics`, `/healthz` (the process is up) and `/readyz` (keys of configured tenants loaded).
pub fn router(metrics: Arc<Metrics>, ready: watch::Receiver<bool>) -> axum::Router {
    use axum::http::{StatusCode, header};
    use axum::routing::get;
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
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = *ready.borrow();
                async move {
                    if ready {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "signing keys not loaded\n")
                    }
                }
            }),
        )
}
