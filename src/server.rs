//! Wires the service together: caches, the authorizer, the development issuer, and the three listeners
//! (decision port, admin port, metrics). Used by `main` and, in-process on `127.0.0.1:0`, by tests.

use crate::config::Settings;
use crate::devissuer::DevIssuer;
use crate::directory::IssuerDirectory;
use crate::engine::{Authorizer, Policy};
use crate::fetch::Fetcher;
use crate::grpc::admin::{AdminGuard, AdminPolicy};
use crate::grpc::{ext_authz::ExtAuthz, native::NativeApi, registry::RegistryApi};
use crate::jwks::JwksCache;
use crate::metrics::Metrics;
use crate::proto::envoy::service::auth::v3::authorization_server::AuthorizationServer;
use crate::proto::s2sauthz::v1::authorizer_server::AuthorizerServer;
use crate::proto::s2sauthz::v1::registry_server::RegistryServer;
use crate::registry::{Registry, Watcher};
use crate::store::{Location, Store};
use crate::tls::TlsEndpoint;
use crate::transport::Incoming;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// Service names whose health follows key readiness (besides the overall `""`).
pub const HEALTH_SERVICES: [&str; 3] = [
    "",
    "s2sauthz.v1.Authorizer",
    "envoy.service.auth.v3.Authorization",
];

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("starting the development issuer: {0}")]
    DevIssuer(#[from] crate::devissuer::DevIssuerError),
    #[error("{0}")]
    Fetcher(#[from] crate::fetch::FetchError),
    #[error("building reflection: {0}")]
    Reflection(String),
    #[error("opening the registry store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("the registry is inconsistent with the configuration: {0}")]
    Registry(#[from] crate::registry::RegistryOpError),
    #[error("opening the registry: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("TLS on {what}: {source}")]
    Tls {
        what: &'static str,
        source: crate::tls::TlsError,
    },
}

/// A running service. Dropping it does not stop it; call `shutdown`.
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub authorizer: Arc<Authorizer>,
    pub registry: Arc<Registry>,
    pub dev_issuer: Option<DevIssuer>,
    /// The TLS ports' material, re-read on change and by `reload_tls`.
    tls: Vec<Arc<TlsEndpoint>>,
    watcher: Option<Watcher>,
    /// Health of both ports; turned NOT_SERVING first thing at shutdown.
    health: HealthReporter,
    drain_timeout: Duration,
    stop: watch::Sender<bool>,
    /// The three listeners; each ends once its connections have closed.
    tasks: JoinSet<()>,
    /// Discovery, key refresh and the readiness follower; aborted at shutdown.
    background: JoinSet<()>,
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, addr, source })
}

/// A port's TLS endpoint, loaded now so that bad files stop the start with an error naming them.
fn tls_endpoint(
    what: &'static str,
    port: &'static str,
    files: Option<&crate::tls::TlsFiles>,
    metrics: &Arc<Metrics>,
) -> Result<Option<Arc<TlsEndpoint>>, StartError> {
    files
        .map(|files| TlsEndpoint::load(port, files.clone(), metrics.clone()))
        .transpose()
        .map_err(|source| StartError::Tls { what, source })
}

/// The port's connections: TLS through its endpoint when it has one, plain TCP otherwise.
fn incoming(
    listener: TcpListener,
    tls: Option<&Arc<TlsEndpoint>>,
    handshake_timeout: std::time::Duration,
) -> Incoming {
    match tls {
        Some(endpoint) => crate::transport::tls(listener, endpoint.clone(), handshake_timeout),
        None => crate::transport::plain(listener),
    }
}

pub async fn start(settings: Settings) -> Result<Running, StartError> {
    let metrics = Arc::new(Metrics::new());
    let decision_tls = tls_endpoint(
        "the decision port",
        "decision",
        settings.tls.decision.as_ref(),
        &metrics,
    )?;
    let admin_tls = tls_endpoint(
        "the admin port",
        "admin",
        settings.tls.admin.as_ref(),
        &metrics,
    )?;
    let dev_issuer = match settings.dev_issuer.clone() {
        Some(config) => Some(DevIssuer::start(config).await?),
        None => None,
    };
    // When the instance points at the development issuer, use its real address (it may have bound port 0).
    let instance = match &dev_issuer {
        Some(dev)
            if settings.instance
                == format!(
                    "http://{}/",
                    settings
                        .dev_issuer
                        .as_ref()
                        .map(|d| d.addr)
                        .unwrap_or(dev.local_addr())
                ) =>
        {
            dev.instance()
        }
        _ => settings.instance.clone(),
    };

    let fetcher = Fetcher::new(settings.fetch_timeout, settings.max_document_bytes)?;
    let jwks = JwksCache::new(fetcher.clone(), settings.keys.clone(), metrics.clone());
    let directory = IssuerDirectory::new(
        fetcher,
        jwks,
        &instance,
        settings.tenants.clone(),
        settings.oidc.clone(),
    );
    let policy = Policy {
        settings: settings.decision.clone(),
        registry: settings.registry.clone(),
    };
    let authorizer = Arc::new(Authorizer::new(
        policy,
        directory.clone(),
        metrics.clone(),
        settings.token_cache_entries,
    ));
    metrics.observe(&authorizer);
    // The registry publishes the merged allowlist (configuration + store) and its tenants at once.
    // Opening blocks (file or database I/O, migrations), so it runs off the async workers.
    let location = match &settings.database_url {
        Some(url) => Location::Postgres(url.clone()),
        None => Location::Sqlite(settings.data_dir.clone()),
    };
    let provisioned = settings.provisioned.clone();
    let publish_to = authorizer.clone();
    let registry = tokio::task::spawn_blocking(move || {
        let store = Store::open(&location)?;
        Ok::<_, StartError>(Registry::open(store, provisioned, publish_to)?)
    })
    .await??;
    let watcher = registry.spawn_watcher(settings.registry_resync);

    let grpc = bind("the decision port", settings.grpc_addr).await?;
    let admin = bind("the admin port", settings.admin_addr).await?;
    let metrics_listener = bind("the metrics port", settings.metrics_addr).await?;
    let local = |l: &TcpListener, addr| l.local_addr().unwrap_or(addr);
    let (grpc_addr, admin_addr, metrics_addr) = (
        local(&grpc, settings.grpc_addr),
        local(&admin, settings.admin_addr),
        local(&metrics_listener, settings.metrics_addr),
    );

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    for name in HEALTH_SERVICES {
        health_reporter
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }

    let (stop, _) = watch::channel(false);
    let stopped = |stop: &watch::Sender<bool>| {
        let mut rx = stop.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let mut tasks = JoinSet::new();
    let mut background = JoinSet::new();

    // Health follows readiness: NOT_SERVING until every configured tenant's keys have loaded once.
    let mut ready = directory.readiness();
    let reporter = health_reporter.clone();
    background.spawn(async move {
        if ready.wait_for(|r| *r).await.is_ok() {
            for name in HEALTH_SERVICES {
                reporter
                    .set_service_status(name, ServingStatus::Serving)
                    .await;
            }
            tracing::info!("signing keys loaded: serving");
        }
    });
    let discovery = directory.clone();
    background.spawn(async move {
        discovery.refresh_all(true).await;
        discovery.run_background().await;
    });
    let tls: Vec<Arc<TlsEndpoint>> = decision_tls.iter().chain(&admin_tls).cloned().collect();
    background.spawn(crate::tls::watch(tls.clone()));
    let handshake_timeout = settings.tls.handshake_timeout;

    let (reflection_v1, reflection_v1alpha) = reflection(&[
        "s2sauthz.v1.Authorizer",
        "envoy.service.auth.v3.Authorization",
    ])?;
    let decision_router = tonic::transport::Server::builder()
        .add_service(health_service.clone())
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(AuthorizerServer::new(NativeApi::new(authorizer.clone())))
        .add_service(AuthorizationServer::new(ExtAuthz::new(authorizer.clone())));
    let shutdown = stopped(&stop);
    tasks.spawn(async move {
        if let Err(e) = decision_router
            .serve_with_incoming_shutdown(
                incoming(grpc, decision_tls.as_ref(), handshake_timeout),
                shutdown,
            )
            .await
        {
            tracing::error!(error = %e, "decision port failed");
        }
    });

    let (admin_reflection_v1, admin_reflection_v1alpha) = reflection(&["s2sauthz.v1.Registry"])?;
    let admin_router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(admin_reflection_v1)
        .add_service(admin_reflection_v1alpha);
    let registry_api = RegistryServer::new(RegistryApi::new(registry.clone()));
    let admin_router = match &settings.admin_role {
        Some(role) => {
            tracing::info!(
                role,
                "admin calls need a bearer token with the admin app role"
            );
            let policy = AdminPolicy::new(authorizer.clone(), role.clone());
            admin_router.add_service(AdminGuard::new(registry_api, policy))
        }
        None => admin_router.add_service(registry_api),
    };
    let shutdown = stopped(&stop);
    tasks.spawn(async move {
        if let Err(e) = admin_router
            .serve_with_incoming_shutdown(
                incoming(admin, admin_tls.as_ref(), handshake_timeout),
                shutdown,
            )
            .await
        {
            tracing::error!(error = %e, "admin port failed");
        }
    });

    let router = crate::metrics::router(metrics, directory.readiness());
    let shutdown = stopped(&stop);
    tasks.spawn(async move {
        if let Err(e) = axum::serve(metrics_listener, router)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "metrics port failed");
        }
    });

    let (grpc_tls, admin_tls) = (
        tls_mode(settings.tls.decision.as_ref()),
        tls_mode(settings.tls.admin.as_ref()),
    );
    if grpc_tls == "off" && !grpc_addr.ip().is_loopback() {
        tracing::warn!(%grpc_addr, "the decision port is plaintext off loopback: anyone on the network can read its tokens (see `--grpc-tls-cert`)");
    }
    tracing::info!(%grpc_addr, %admin_addr, %metrics_addr, grpc_tls, admin_tls, %instance, "s2s-authz listening");
    Ok(Running {
        grpc_addr,
        admin_addr,
        metrics_addr,
        authorizer,
        registry,
        dev_issuer,
        tls,
        watcher,
        health: health_reporter,
        drain_timeout: settings.drain_timeout,
        stop,
        tasks,
        background,
    })
}

/// How a port speaks, for the start-up line: `off`, `tls` or `mtls` (client certificates checked).
fn tls_mode(files: Option<&crate::tls::TlsFiles>) -> &'static str {
    match files {
        None => "off",
        Some(f) if f.client_ca.is_some() => "mtls",
        Some(_) => "tls",
    }
}

/// Reflection (v1 and v1alpha) advertising exactly the services a port serves, plus health.
fn reflection(
    services: &[&str],
) -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    StartError,
> {
    let builder = || {
        let mut builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health");
        for name in services {
            builder = builder.with_service_name(*name);
        }
        builder
    };
    let v1 = builder()
        .build_v1()
        .map_err(|e| StartError::Reflection(e.to_string()))?;
    let v1alpha = builder()
        .build_v1alpha()
        .map_err(|e| StartError::Reflection(e.to_string()))?;
    Ok((v1, v1alpha))
}

impl Running {
    /// Applies a reloaded configuration's policy (decision settings and provisioned registry) atomically,
    /// merged with the store. Listener addresses and key settings need a restart. A configuration that
    /// conflicts with the store is refused and the current policy keeps serving.
    pub async fn reload(
        &self,
        settings: &Settings,
    ) -> Result<(), crate::registry::RegistryOpError> {
        let registry = self.registry.clone();
        let (provisioned, decision) = (settings.provisioned.clone(), settings.decision.clone());
        tokio::task::spawn_blocking(move || registry.reprovision(provisioned, decision))
            .await
            .map_err(|e| crate::registry::RegistryOpError::FailedPrecondition(e.to_string()))??;
        tracing::info!(
            provisioned_entries = settings.provisioned.entries.len(),
            "configuration reloaded"
        );
        Ok(())
    }

    /// Re-reads every TLS port's certificate, key and client CA files (SIGHUP; they are also watched).
    /// New connections get what loads; a port whose files do not load keeps its current material.
    pub async fn reload_tls(&self) {
        crate::tls::reload_all(&self.tls).await;
    }

    /// Stops the way a load balancer expects. Health turns NOT_SERVING, which every open
    /// `Health/Watch` stream carries before it ends; the listeners close, so new connections are
    /// refused, and open connections get GOAWAY, so new calls on them fail with UNAVAILABLE and clients
    /// go elsewhere; calls in flight finish with their real answers. Returns when every connection has
    /// closed, or once the drain timeout has passed: then the listeners are dropped, and what is still
    /// open ends with the process (the binary exits right after).
    pub async fn shutdown(mut self) {
        // First, so that keys loading now cannot turn health back to SERVING.
        self.background.shutdown().await;
        for name in HEALTH_SERVICES {
            self.health
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
        let _ = self.stop.send(true);
        // A Watch stream never ends by itself: it would hold its connection, and so the drain, open
        // until the timeout. Dropping the statuses ends every such stream once it has sent NOT_SERVING;
        // a Check that still gets through on an old connection is answered NOT_FOUND, as unready.
        for name in HEALTH_SERVICES {
            self.health.clear_service_status(name).await;
        }
        let drained = tokio::time::timeout(self.drain_timeout, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                drain_timeout_secs = self.drain_timeout.as_secs_f64(),
                "calls still in flight after the drain timeout; closing their connections"
            );
            self.tasks.shutdown().await;
        }
        if let Some(watcher) = self.watcher.take() {
            let _ = tokio::task::spawn_blocking(move || watcher.stop()).await;
        }
        if let Some(dev) = self.dev_issuer.take() {
            dev.shutdown().await;
        }
    }
}
