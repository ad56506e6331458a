//! `Authorizer`: runs one decision end to end — the pure core's three stages, with the key cache's
//! I/O between them — and records it (metrics, an audit log line with a token hash, never the token).
//!
//! It also owns the allowlist cache: the registry snapshot and decision settings, swapped atomically
//! on reload so that a decision always sees one consistent policy.

use crate::core::decision::{self, KeyLookup, Request};
use crate::core::registry::RegistrySnapshot;
use crate::core::{Decision, DecisionSettings, Trace, TraceStep};
use crate::directory::IssuerDirectory;
use crate::metrics::Metrics;
use arc_swap::ArcSwap;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The policy a decision is made against: settings and registry, always replaced together.
#[derive(Debug)]
pub struct Policy {
    pub settings: DecisionSettings,
    pub registry: RegistrySnapshot,
}

/// The allowlist cache: one atomically swapped `Policy`.
#[derive(Debug)]
pub struct AllowlistCache {
    current: ArcSwap<Policy>,
}

impl AllowlistCache {
    pub fn new(policy: Policy) -> Self {
        AllowlistCache {
            current: ArcSwap::from_pointee(policy),
        }
    }

    pub fn load(&self) -> Arc<Policy> {
        self.current.load_full()
    }

    pub fn replace(&self, policy: Policy) {
        self.current.store(Arc::new(policy));
    }
}

/// A decision and, for `Explain`, its trace.
#[derive(Debug)]
pub struct Evaluation {
    pub decision: Decision,
    pub trace: Vec<TraceStep>,
}

#[derive(Debug)]
pub struct Authorizer {
    allowlist: AllowlistCache,
    directory: Arc<IssuerDirectory>,
    metrics: Arc<Metrics>,
}

impl Authorizer {
    pub fn new(policy: Policy, directory: Arc<IssuerDirectory>, metrics: Arc<Metrics>) -> Self {
        Authorizer {
            allowlist: AllowlistCache::new(policy),
            directory,
            metrics,
        }
    }

    pub fn allowlist(&self) -> &AllowlistCache {
        &self.allowlist
    }

    pub fn directory(&self) -> &Arc<IssuerDirectory> {
        &self.directory
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub async fn decide(&self, request: &Request<'_>, explain: bool) -> Evaluation {
        let started = Instant::now();
        let mut trace = if explain {
            Trace::enabled()
        } else {
            Trace::disabled()
        };
        let decision = self.evaluate(request, &mut trace).await;
        self.metrics.decision(decision.reason());
        audit(request, &decision, started);
        Evaluation {
            decision,
            trace: trace.finish(),
        }
    }

    async fn evaluate(&self, request: &Request<'_>, trace: &mut Trace) -> Decision {
        let policy = self.allowlist.load();
        let trust = self.directory.trust();
        let pre = match decision::precheck(request, &policy.settings, &trust, trace) {
            Ok(pre) => pre,
            Err(denied) => return Decision::Deny(denied),
        };
        let loaded = self
            .directory
            .jwks()
            .lookup(&pre.issuer.jwks_uri, pre.kid())
            .await;
        let keys = match &loaded {
            Some(k) => KeyLookup::Loaded(&k.set),
            None => KeyLookup::Unavailable,
        };
        let verified = match decision::verify(pre, keys, trace) {
            Ok(v) => v,
            Err(denied) => return Decision::Deny(denied),
        };
        decision::authorize(
            &verified,
            request,
            &policy.settings,
            &policy.registry,
            unix_now(),
            trace,
        )
    }
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A short, non-reversible token fingerprint for correlating log lines: SHA-256, first 8 bytes, hex.
pub fn token_hash(token: &str) -> String {
    let digest = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        decision::bearer_token(token).as_bytes(),
    );
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn audit(request: &Request<'_>, decision: &Decision, started: Instant) {
    if !tracing::enabled!(target: "s2s_authz::audit", tracing::Level::INFO) {
        return;
    }
    let micros = started.elapsed().as_micros() as u64;
    let hash = token_hash(request.token);
    match decision {
        Decision::Allow(a) => tracing::info!(
            target: "s2s_authz::audit",
            decision = "allow",
            token_hash = %hash,
            tenant = %a.caller.tenant_id,
            client_app_id = a.caller.client_app_id.as_ref().map(|c| c.as_str()).unwrap_or(""),
            application_user = %a.application_user_name,
            role = %a.security_role,
            micros,
            "decision"
        ),
        Decision::Deny(d) => tracing::info!(
            target: "s2s_authz::audit",
            decision = "deny",
            token_hash = %hash,
            reason = d.reason.as_str(),
            tenant = d.caller.as_ref().map(|c| c.tenant_id.as_str()).unwrap_or(""),
            client_app_id = d.caller.as_ref().and_then(|c| c.client_app_id.as_ref()).map(|c| c.as_str()).unwrap_or(""),
            message = %d.message,
            micros,
            "decision"
        ),
    }
}
