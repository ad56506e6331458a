//! Criterion benches of one decision, without gRPC: warm (verified-token cache hit + `authorize`), cold
//! (`precheck` + RS256 `verify` + `authorize`) and, as the baseline measured in the same run, a raw
//! `jsonwebtoken::decode::<serde_json::Value>` RS256 of the same token with the same public key.
//!
//! The service runs in-process against an in-process development issuer, so the `Authorizer` under test
//! is the real one with real, fetched key sets. No tracing subscriber is installed, so the audit line is
//! off, as under `RUST_LOG=warn`, except in the three benches named `warm_decide_audit_*`, which measure
//! it (and the load generator measures it in the server). See `benches/README.md`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use criterion::{Criterion, criterion_group, criterion_main};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use s2s_authz::config::{self, MctSettings, ServeArgs};
use s2s_authz::core::decision::{self, KeyLookup, Request, Trace};
mod common;

use common::{APP, AUDIENCE, AUDIENCE_GUID, TENANT, app, mint};
use s2s_authz::devissuer::{DevIssuer, DevIssuerConfig, DevTenant};
use s2s_authz::engine::{Authorizer, Evaluation, unix_now};
use s2s_authz::log_format::TextFormat;
use s2s_authz::log_writer;
use s2s_authz::server::Running;
use s2s_authz::token_cache;
use std::collections::HashMap;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;

/// The token cache's hits and misses so far, from the service's metrics.
fn cache_counters(authorizer: &Authorizer) -> (u64, u64) {
    let text = authorizer.metrics().encode();
    let counter = |name: &str| common::prom::metric(&text, name, &[]).unwrap() as u64;
    (
        counter("s2s_authz_token_cache_hits_total"),
        counter("s2s_authz_token_cache_misses_total"),
    )
}

async fn service(dev: &DevIssuer, cache_entries: usize) -> Running {
    let yaml = format!(
        r#"
grpc_addr: 127.0.0.1:0
admin_addr: 127.0.0.1:0
metrics_addr: 127.0.0.1:0
auth: {{ instance: "{instance}", tenants: ["{TENANT}"], audiences: ["{AUDIENCE}"] }}
token_cache: {{ max_entries: {cache_entries} }}
security_roles:
  - name: Orders Integration
    privileges: [{{ resource: orders, operations: [read] }}]
app_entries:
  - name: orders-service
    tenant_id: "{TENANT}"
    client_app_id: "{APP}"
    required_role: S2SAppRole
    application_user: {{ security_role: Orders Integration }}
"#,
        instance = dev.instance()
    );
    let settings = config::resolve(
        config::parse_yaml(&yaml, "bench").unwrap(),
        &ServeArgs::default(),
        &MctSettings::default(),
    )
    .unwrap();
    s2s_authz::server::start(settings).await.unwrap()
}

/// Polls a decision once: a cache hit (and a cold decision whose keys are loaded) never waits, so this
/// measures the decision rather than an executor. Falls back to the runtime if it ever does wait.
fn decide_now(rt: &Runtime, authorizer: &Authorizer, request: &Request<'_>) -> Evaluation {
    let mut fut = pin!(authorizer.decide(request, false));
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(evaluation) => evaluation,
        Poll::Pending => rt.block_on(fut),
    }
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let _entered = rt.enter();
    let dev = rt
        .block_on(DevIssuer::start(DevIssuerConfig {
            addr: "127.0.0.1:0".parse().unwrap(),
            tenants: vec![DevTenant {
                tenant_id: TENANT.to_owned(),
                clients: vec![app()],
            }],
            token_lifetime: Duration::from_secs(3600),
        }))
        .unwrap();
    let warm = rt.block_on(service(&dev, 100_000));
    let cold = rt.block_on(service(&dev, 0));
    // As a server meets a flood of unique tokens: the cache on and full, and (nearly) every token new.
    // The pool cycles through 48 times as many tokens as the cache holds. S3-FIFO keeps a stable part
    // of a cycled pool, about entries / tokens of it (at 3 times, a third of the calls were hits), so the
    // pool is large against the cache, and the share of hits is checked below. Under `cargo test
    // --benches` (one pass, no `--bench`) a small pool keeps the setup short.
    let (full_entries, distinct) = if std::env::args().any(|a| a == "--bench") {
        (256, 12_288)
    } else {
        (4, 192)
    };
    let full = rt.block_on(service(&dev, full_entries));
    let fresh = mint(&dev, distinct);
    let token = dev.mint_app_token(TENANT, &app(), AUDIENCE).unwrap();
    let headers: HashMap<String, String> = HashMap::new();
    let request = Request {
        token: &token,
        method: "GET",
        path: "/orders",
        headers: &headers,
        source_principal: None,
    };

    // Wait (bounded) for discovery and keys, then make sure the warm cache holds the token.
    let deadline = Instant::now() + Duration::from_secs(20);
    for running in [&warm, &cold, &full] {
        while !rt
            .block_on(running.authorizer.decide(&request, false))
            .decision
            .is_allowed()
        {
            assert!(Instant::now() < deadline, "keys never loaded");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert_eq!(warm.authorizer.token_cache().len(), 1);
    assert_eq!(cold.authorizer.token_cache().len(), 0);

    eprintln!(
        "token: {} bytes, RS256, kid {}",
        token.len(),
        dev.current_kid()
    );

    let mut group = c.benchmark_group("decision");
    // (a) Warm: `Authorizer::decide` on a verified-token cache hit — SHA-256 of the token, cache lookup,
    // revalidation (issuer trusted, key still published), `authorize`, metrics counter.
    group.bench_function("warm_decide_cache_hit", |b| {
        b.iter(|| {
            let e = decide_now(&rt, &warm.authorizer, black_box(&request));
            debug_assert!(e.decision.is_allowed());
            e
        })
    });
    // The pure stage-3 part of it: `authorize` on the cached `VerifiedToken`.
    let policy = warm.authorizer.allowlist().load();
    let digest = token_cache::digest(&token);
    let entry = warm
        .authorizer
        .token_cache()
        .get(&digest, unix_now(), 300)
        .unwrap();
    group.bench_function("warm_authorize_only", |b| {
        b.iter(|| {
            decision::authorize(
                black_box(&entry.verified),
                &request,
                &policy.settings,
                &policy.registry,
                unix_now(),
                &mut Trace::disabled(),
            )
        })
    });
    group.bench_function("warm_sha256_of_token", |b| {
        b.iter(|| token_cache::digest(black_box(&token)))
    });
    // The same warm decision with the audit line on (`RUST_LOG=info`, text format) into the service's
    // block writer (its writer thread writing to a sink): through `tracing-subscriber`'s generic
    // formatter, and through the service's `TextFormat`, which writes the audit record directly, with
    // `tracing-subscriber`'s timestamp and with the service's (`UtcMicros`, the default).
    for (name, format) in [
        ("warm_decide_audit_generic_format", Audit::Generic),
        (
            "warm_decide_audit_text_format_system_time",
            Audit::SystemTime,
        ),
        ("warm_decide_audit_text_format", Audit::Text),
    ] {
        let (writer, _guard) = log_writer::spawn(std::io::sink);
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_ansi(false);
        let layer = match format {
            Audit::Generic => layer.boxed(),
            Audit::SystemTime => layer
                .event_format(TextFormat::with_timer(
                    tracing_subscriber::fmt::time::SystemTime,
                ))
                .boxed(),
            Audit::Text => layer.event_format(TextFormat::default()).boxed(),
        };
        let subscriber = tracing_subscriber::registry()
            .with(tracing_subscriber::EnvFilter::new("info"))
            .with(tracing_subscriber::filter::filter_fn(
                s2s_authz::telemetry::logged,
            ))
            .with(layer);
        tracing::subscriber::with_default(subscriber, || {
            group.bench_function(name, |b| {
                b.iter(|| decide_now(&rt, &warm.authorizer, black_box(&request)))
            });
        });
    }

    // (b) Cold: `Authorizer::decide` with the cache disabled — precheck (parse), key lookup, RS256
    // verify, authorize, metrics.
    group.bench_function("cold_decide_rs256", |b| {
        b.iter(|| {
            let e = decide_now(&rt, &cold.authorizer, black_box(&request));
            debug_assert!(e.decision.is_allowed());
            e
        })
    });
    // (b') Cold with the cache on and full, a new token each time: also the token's SHA-256, the cache's
    // miss, insert and eviction, and token bytes not yet in the CPU's caches.
    let mut next = 0usize;
    group.bench_function("cold_decide_rs256_new_token_cache_full", |b| {
        b.iter(|| {
            next = (next + 1) % fresh.len();
            let request = Request {
                token: &fresh[next],
                ..request
            };
            let e = decide_now(&rt, &full.authorizer, black_box(&request));
            debug_assert!(e.decision.is_allowed());
            e
        })
    });
    assert!(full.authorizer.token_cache().len() <= full_entries);
    let (hits, misses) = cache_counters(&full.authorizer);
    assert!(
        hits * 20 < hits + misses,
        "cold_decide_rs256_new_token_cache_full: {hits} hits and {misses} misses; a cold bench must miss"
    );

    // The pure core of it: precheck + verify + authorize over the same loaded key set.
    let trust = cold.authorizer.directory().trust();
    let issuer = trust.issuer(&dev.v2_issuer(TENANT)).unwrap().clone();
    let keys = cold
        .authorizer
        .directory()
        .jwks()
        .usable(&issuer.jwks_uri)
        .unwrap();
    let cold_policy = cold.authorizer.allowlist().load();
    group.bench_function("cold_core_precheck_verify_authorize", |b| {
        b.iter(|| {
            let mut trace = Trace::disabled();
            let pre = decision::precheck(
                black_box(&request),
                &cold_policy.settings,
                &trust,
                &mut trace,
            )
            .unwrap();
            let verified = decision::verify(pre, KeyLookup::Loaded(&keys.set), &mut trace).unwrap();
            decision::authorize(
                &verified,
                &request,
                &cold_policy.settings,
                &cold_policy.registry,
                unix_now(),
                &mut trace,
            )
        })
    });
    group.bench_function("cold_core_precheck_only", |b| {
        b.iter(|| {
            decision::precheck(
                black_box(&request),
                &cold_policy.settings,
                &trust,
                &mut Trace::disabled(),
            )
            .is_ok()
        })
    });

    // (c) Baseline: raw jsonwebtoken RS256 decode of the same token, same public key, validating
    // signature, `exp`, `aud` and `iss` into a `serde_json::Value`.
    let (n, e) = dev.public_key_components(&dev.current_kid()).unwrap();
    let key = DecodingKey::from_rsa_raw_components(&n, &e);
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[AUDIENCE_GUID]);
    validation.set_issuer(&[dev.v2_issuer(TENANT)]);
    assert!(jsonwebtoken::decode::<serde_json::Value>(&token, &key, &validation).is_ok());
    group.bench_function("baseline_jsonwebtoken_decode_rs256", |b| {
        b.iter(|| {
            jsonwebtoken::decode::<serde_json::Value>(black_box(&token), &key, &validation).is_ok()
        })
    });
    // The same decode over the pool of new tokens, as `cold_decide_rs256_new_token_cache_full` sees them.
    let mut next = 0usize;
    group.bench_function("baseline_jsonwebtoken_decode_rs256_new_token", |b| {
        b.iter(|| {
            next = (next + 1) % fresh.len();
            jsonwebtoken::decode::<serde_json::Value>(black_box(&fresh[next]), &key, &validation)
                .is_ok()
        })
    });
    group.finish();

    rt.block_on(async {
        warm.shutdown().await;
        cold.shutdown().await;
        full.shutdown().await;
        dev.shutdown().await;
    });
}

criterion_group!(decision_benches, benches);
criterion_main!(decision_benches);

/// How the `warm_decide_audit_*` benches format the audit line.
enum Audit {
    Generic,
    SystemTime,
    Text,
}
