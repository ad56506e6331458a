//! `IssuerDirectory`: which issuers are trusted right now, found by OIDC discovery.
//!
//! For every trusted Entra tenant it fetches the v1 and v2 metadata documents under the configured
//! instance, takes the issuer strings and `jwks_uri`s from them (never from a token), loads the keys,
//! and publishes an immutable `TrustSnapshot`. Generic OIDC issuers are discovered the same way from
//! `{issuer}/.well-known/openid-configuration`. Tenants outside the trusted set are never fetched.

use crate::core::ids::{TenantId, is_guid};
use crate::core::trust::{IssuerProfile, OidcProfile, TrustSnapshot, TrustedIssuer};
use crate::fetch::Fetcher;
use crate::jwks::JwksCache;
use arc_swap::ArcSwap;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// A generic OIDC issuer to trust.
#[derive(Clone, Debug)]
pub struct OidcIssuer {
    pub issuer: String,
    pub profile: Arc<OidcProfile>,
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("fetching `{url}`: {source}")]
    Fetch {
        url: String,
        source: crate::fetch::FetchError,
    },
    #[error("`{0}` is not an OpenID metadata document with `issuer` and `jwks_uri`")]
    Document(String),
    #[error("metadata for `{requested}` names issuer `{issuer}`, which is not that tenant's")]
    WrongIssuer { requested: String, issuer: String },
    #[error("keys at `{uri}`: {error}")]
    Keys { uri: String, error: String },
}

#[derive(Deserialize)]
struct Metadata {
    issuer: String,
    jwks_uri: String,
}

#[derive(Clone, Debug)]
struct Discovered {
    issuers: Vec<TrustedIssuer>,
}

#[derive(Debug, Default)]
struct State {
    /// Trusted tenants (as configured: GUIDs or domain names) and generic issuers.
    wanted_tenants: BTreeSet<String>,
    discovered: BTreeMap<String, Discovered>,
    last_attempt: BTreeMap<String, Instant>,
}

#[derive(Debug)]
pub struct IssuerDirectory {
    fetcher: Fetcher,
    jwks: Arc<JwksCache>,
    /// Entra authority host, with trailing slash, e.g. `https://login.microsoftonline.com/`.
    instance: String,
    oidc: Vec<OidcIssuer>,
    /// Tenants named in configuration: health waits for these.
    configured: BTreeSet<String>,
    state: Mutex<State>,
    trust: ArcSwap<TrustSnapshot>,
    ready: watch::Sender<bool>,
}

impl IssuerDirectory {
    pub fn new(
        fetcher: Fetcher,
        jwks: Arc<JwksCache>,
        instance: &str,
        configured_tenants: BTreeSet<String>,
        oidc: Vec<OidcIssuer>,
    ) -> Arc<Self> {
        let mut instance = instance.trim().to_owned();
        if !instance.ends_with('/') {
            instance.push('/');
        }
        let directory = Arc::new(IssuerDirectory {
            fetcher,
            jwks,
            instance,
            oidc,
            configured: configured_tenants.clone(),
            state: Mutex::new(State {
                wanted_tenants: configured_tenants,
                ..State::default()
            }),
            trust: ArcSwap::from_pointee(TrustSnapshot::default()),
            ready: watch::Sender::new(false),
        });
        directory.publish();
        directory
    }

    pub fn trust(&self) -> Arc<TrustSnapshot> {
        self.trust.load_full()
    }

    pub fn jwks(&self) -> &Arc<JwksCache> {
        &self.jwks
    }

    /// Becomes true once every configured tenant and issuer has loaded its keys once.
    pub fn readiness(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Replaces the set of trusted tenants (configured ones plus the registry's). New tenants are
    /// discovered in the background; removed ones stop being trusted at once.
    pub fn set_tenants(self: &Arc<Self>, tenants: BTreeSet<String>) {
        let added: Vec<String> = {
            let mut state = self.lock();
            let mut wanted = self.configured.clone();
            wanted.extend(tenants);
            let added = wanted.difference(&state.wanted_tenants).cloned().collect();
            state.discovered.retain(|t, _| wanted.contains(t));
            state.wanted_tenants = wanted;
            added
        };
        self.publish();
        // Keys of tenants no longer trusted are dropped; the rest stay warm.
        let trust = self.trust();
        let in_use: HashSet<&str> = trust.issuers().map(|i| i.jwks_uri.as_str()).collect();
        // The closure must not touch the cache itself: `retain` holds its shards' locks.
        self.jwks.retain(|uri| in_use.contains(uri));
        for tenant in added {
            let directory = self.clone();
            tokio::spawn(async move {
                if let Err(e) = directory.discover_tenant(&tenant).await {
                    tracing::warn!(tenant = %tenant, error = %e, "tenant discovery failed; will retry");
                }
            });
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Discovers every wanted tenant and issuer not yet known, and refreshes the known ones' keys.
    /// `force` ignores the minimum interval (start-up and the periodic refresh).
    pub async fn refresh_all(self: &Arc<Self>, force: bool) {
        let (tenants, discovered) = {
            let state = self.lock();
            (state.wanted_tenants.clone(), state.discovered.clone())
        };
        let min = self.jwks.settings().min_refresh_interval;
        let mut tasks = tokio::task::JoinSet::new();
        for tenant in tenants {
            let directory = self.clone();
            let known = discovered.get(&tenant).cloned();
            tasks.spawn(async move {
                let result = match known {
                    Some(d) if !force => directory.refresh_unloaded(&d).await,
                    _ => {
                        if !force && !directory.due(&tenant, min) {
                            return;
                        }
                        directory.discover_tenant(&tenant).await
                    }
                };
                if let Err(e) = result {
                    tracing::warn!(tenant = %tenant, error = %e, "issuer refresh failed");
                }
            });
        }
        for oidc in self.oidc.clone() {
            let directory = self.clone();
            let known = discovered.get(&oidc.issuer).cloned();
            tasks.spawn(async move {
                let result = match known {
                    Some(d) if !force => directory.refresh_unloaded(&d).await,
                    _ => {
                        if !force && !directory.due(&oidc.issuer, min) {
                            return;
                        }
                        directory.discover_oidc(&oidc).await
                    }
                };
                if let Err(e) = result {
                    tracing::warn!(issuer = %oidc.issuer, error = %e, "issuer refresh failed");
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    }

    fn due(&self, key: &str, min: Duration) -> bool {
        let mut state = self.lock();
        let due = state
            .last_attempt
            .get(key)
            .is_none_or(|t| t.elapsed() >= min);
        if due {
            state.last_attempt.insert(key.to_owned(), Instant::now());
        }
        due
    }

    /// Between full refreshes, only key sets that never loaded are retried.
    async fn refresh_unloaded(
        self: &Arc<Self>,
        discovered: &Discovered,
    ) -> Result<(), DiscoveryError> {
        if discovered
            .issuers
            .iter()
            .all(|i| self.jwks.has_loaded(&i.jwks_uri))
        {
            return Ok(());
        }
        let result = self.refresh_keys(discovered).await;
        self.publish();
        result
    }

    async fn refresh_keys(self: &Arc<Self>, discovered: &Discovered) -> Result<(), DiscoveryError> {
        let uris: BTreeSet<&str> = discovered
            .issuers
            .iter()
            .map(|i| i.jwks_uri.as_str())
            .collect();
        let mut result = Ok(());
        for uri in uris {
            if let Err(error) = self.jwks.refresh(uri, false).await {
                result = Err(DiscoveryError::Keys {
                    uri: uri.to_owned(),
                    error,
                });
            }
        }
        result
    }

    async fn fetch_metadata(&self, url: &str) -> Result<Metadata, DiscoveryError> {
        let body = self
            .fetcher
            .get(url)
            .await
            .map_err(|source| DiscoveryError::Fetch {
                url: url.to_owned(),
                source,
            })?;
        let meta: Metadata =
            serde_json::from_slice(&body).map_err(|_| DiscoveryError::Document(url.to_owned()))?;
        crate::fetch::check_url(&meta.jwks_uri).map_err(|source| DiscoveryError::Fetch {
            url: meta.jwks_uri.clone(),
            source,
        })?;
        Ok(meta)
    }

    #[tracing::instrument(name = "issuer.discovery", skip_all, fields(tenant = tenant))]
    async fn discover_tenant(self: &Arc<Self>, tenant: &str) -> Result<(), DiscoveryError> {
        self.lock()
            .last_attempt
            .insert(tenant.to_owned(), Instant::now());
        let v1_url = format!("{}{tenant}/.well-known/openid-configuration", self.instance);
        let v2_url = format!(
            "{}{tenant}/v2.0/.well-known/openid-configuration",
            self.instance
        );
        let (v1, v2) = tokio::join!(self.fetch_metadata(&v1_url), self.fetch_metadata(&v2_url));
        let (v1, v2) = (v1?, v2?);
        // The documents name the tenant GUID in `issuer`; a tenant configured by domain name resolves here.
        let tid = tenant_of(&v2.issuer).ok_or_else(|| DiscoveryError::WrongIssuer {
            requested: tenant.to_owned(),
            issuer: v2.issuer.clone(),
        })?;
        for meta in [&v1, &v2] {
            let names_tid = tenant_of(&meta.issuer).is_some_and(|t| t == tid);
            let matches_config = !is_guid(tenant) || TenantId::new(tenant) == tid;
            if !names_tid || !matches_config {
                return Err(DiscoveryError::WrongIssuer {
                    requested: tenant.to_owned(),
                    issuer: meta.issuer.clone(),
                });
            }
        }
        let issuers: Vec<TrustedIssuer> = [v1, v2]
            .into_iter()
            .map(|m| TrustedIssuer {
                issuer: m.issuer,
                tenant: tid.clone(),
                profile: IssuerProfile::Entra,
                jwks_uri: m.jwks_uri,
            })
            .collect();
        self.finish_discovery(tenant, issuers).await
    }

    #[tracing::instrument(name = "issuer.discovery", skip_all, fields(issuer = oidc.issuer.as_str()))]
    async fn discover_oidc(self: &Arc<Self>, oidc: &OidcIssuer) -> Result<(), DiscoveryError> {
        self.lock()
            .last_attempt
            .insert(oidc.issuer.clone(), Instant::now());
        let url = format!(
            "{}/.well-known/openid-configuration",
            oidc.issuer.trim_end_matches('/')
        );
        let meta = self.fetch_metadata(&url).await?;
        // OpenID Connect Discovery §4.3: the document's issuer must be exactly the one configured.
        if meta.issuer != oidc.issuer {
            return Err(DiscoveryError::WrongIssuer {
                requested: oidc.issuer.clone(),
                issuer: meta.issuer,
            });
        }
        let issuer = TrustedIssuer {
            issuer: meta.issuer,
            tenant: TenantId::new(&oidc.issuer),
            profile: IssuerProfile::Oidc(oidc.profile.clone()),
            jwks_uri: meta.jwks_uri,
        };
        self.finish_discovery(&oidc.issuer, vec![issuer]).await
    }

    async fn finish_discovery(
        self: &Arc<Self>,
        key: &str,
        issuers: Vec<TrustedIssuer>,
    ) -> Result<(), DiscoveryError> {
        for issuer in &issuers {
            self.jwks.bind_issuer(&issuer.jwks_uri, &issuer.issuer);
        }
        let discovered = Discovered { issuers };
        let result = self.refresh_keys(&discovered).await;
        {
            let mut state = self.lock();
            let still_wanted =
                state.wanted_tenants.contains(key) || self.oidc.iter().any(|o| o.issuer == key);
            if still_wanted {
                state.discovered.insert(key.to_owned(), discovered);
            }
        }
        self.publish();
        if result.is_ok() {
            tracing::info!(tenant = %key, "issuer discovered and keys loaded");
        }
        result
    }

    /// Rebuilds the trust snapshot and readiness from the current state.
    fn publish(&self) {
        let state = self.lock();
        let mut issuers = Vec::new();
        let mut pending_tenants = HashSet::new();
        let mut pending_issuers = HashSet::new();
        let mut ready = true;
        for tenant in &state.wanted_tenants {
            match state.discovered.get(tenant) {
                Some(d) => issuers.extend(d.issuers.iter().cloned()),
                None => {
                    pending_tenants.insert(TenantId::new(tenant));
                }
            }
        }
        for oidc in &self.oidc {
            match state.discovered.get(&oidc.issuer) {
                Some(d) => issuers.extend(d.issuers.iter().cloned()),
                None => {
                    pending_issuers.insert(oidc.issuer.clone());
                }
            }
        }
        let configured_keys = self
            .configured
            .iter()
            .chain(self.oidc.iter().map(|o| &o.issuer));
        for key in configured_keys {
            let loaded = state
                .discovered
                .get(key)
                .is_some_and(|d| d.issuers.iter().all(|i| self.jwks.has_loaded(&i.jwks_uri)));
            ready &= loaded;
        }
        drop(state);
        self.trust.store(Arc::new(TrustSnapshot::new(
            issuers,
            pending_tenants,
            pending_issuers,
        )));
        self.ready.send_if_modified(|r| {
            let changed = *r != ready;
            *r = ready;
            changed
        });
    }

    /// Runs forever: periodic refresh, and quicker retries while something is not loaded.
    pub async fn run_background(self: Arc<Self>) {
        let settings = self.jwks.settings().clone();
        let mut last_full = Instant::now();
        loop {
            let pending = !*self.ready.borrow() || self.has_pending();
            // A floor on the retry pace: with a minimum interval of 0 a down issuer would otherwise be
            // asked hundreds of times a second.
            let retry = settings
                .min_refresh_interval
                .max(Duration::from_millis(500));
            let wait = if pending {
                retry
            } else {
                settings.refresh_interval
            };
            tokio::time::sleep(wait.min(settings.refresh_interval)).await;
            let full = last_full.elapsed() >= settings.refresh_interval;
            if full {
                last_full = Instant::now();
            }
            self.refresh_all(full).await;
        }
    }

    fn has_pending(&self) -> bool {
        let state = self.lock();
        state
            .wanted_tenants
            .iter()
            .any(|t| !state.discovered.contains_key(t))
            || self
                .oidc
                .iter()
                .any(|o| !state.discovered.contains_key(&o.issuer))
    }
}

/// The tenant GUID an Entra issuer names: the first GUID-shaped path segment.
fn tenant_of(issuer: &str) -> Option<TenantId> {
    let url = reqwest::Url::parse(issuer).ok()?;
    let segment = url.path_segments()?.find(|s| is_guid(s))?;
    Some(TenantId::new(segment))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_tenant_in_v1_and_v2_issuers() {
        let t = "72f988bf-86f1-41af-91ab-2d7cd011db47";
        assert_eq!(
            tenant_of(&format!("https://sts.windows.net/{t}/")),
            Some(TenantId::new(t))
        );
        assert_eq!(
            tenant_of(&format!("https://login.microsoftonline.com/{t}/v2.0")),
            Some(TenantId::new(t))
        );
        assert_eq!(
            tenant_of("https://login.microsoftonline.com/common/v2.0"),
            None
        );
    }
}
