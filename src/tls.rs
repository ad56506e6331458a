//! TLS material of the gRPC ports (rustls, aws-lc-rs): certificate chain, private key and optional client
//! CA bundle from PEM files, turned into a `rustls::ServerConfig` and re-read without a restart.
//!
//! Each TLS port has a `TlsEndpoint` holding its current configuration behind an `ArcSwap`: a handshake
//! takes whatever is current when the connection is accepted, so new material applies to new
//! connections while established ones keep theirs. The files are re-read when they change (`watch`, on
//! their directories, which also sees Kubernetes' symlink swaps of mounted Secrets) and on SIGHUP. A
//! replacement that does not load (bad PEM, a key that is not the certificate's, no usable CA) is
//! refused with an error log and the last good material keeps serving. Errors name the file and the
//! problem, never what the file holds.

use crate::metrics::Metrics;
use arc_swap::ArcSwap;
use notify::Watcher as _;
use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One port's TLS files, as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// The leaf's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates client certificates must chain to (PEM): mutual TLS.
    pub client_ca: Option<PathBuf>,
    /// Refuse clients that present no certificate (only with `client_ca`).
    pub require_client_cert: bool,
}

/// TLS on the decision and the admin port, each optional and configured on its own.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    pub decision: Option<TlsFiles>,
    pub admin: Option<TlsFiles>,
    /// How long a client may take to complete its handshake before the connection is dropped.
    pub handshake_timeout: Duration,
}

impl Default for TlsSettings {
    fn default() -> Self {
        TlsSettings {
            decision: None,
            admin: None,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Why a port's TLS material cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading `{path}`: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("`{path}`: {problem}")]
    Pem {
        path: PathBuf,
        problem: &'static str,
    },
    #[error("`{path}` holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("`{path}` holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: PathBuf },
    #[error("`{path}`: the certificate is not valid X.509: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    #[error("`{path}`: the private key cannot be used: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("`{key}` is not the private key of the certificate in `{cert}`")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("`{path}`: not a usable client CA bundle: {reason}")]
    ClientCa { path: PathBuf, reason: String },
    #[error("building the TLS configuration: {0}")]
    Config(rustls::Error),
}

/// The cryptography of every TLS port: aws-lc-rs, the provider the rest of the binary uses.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// What went wrong in a PEM file, without quoting it (a malformed line of a key file is key material).
fn pem_problem(e: &pem::Error) -> &'static str {
    match e {
        pem::Error::MissingSectionEnd { .. } => "a PEM section has no END line",
        pem::Error::IllegalSectionStart { .. } => "a PEM BEGIN line is malformed",
        pem::Error::Base64Decode(_) => "a PEM section is not valid base64",
        pem::Error::SectionTooLarge => "a PEM section is too large",
        _ => "cannot be read as PEM",
    }
}

fn certificates(path: &Path, bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            problem: pem_problem(&e),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn private_key(path: &Path, bytes: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_owned(),
        },
        e => TlsError::Pem {
            path: path.to_owned(),
            problem: pem_problem(&e),
        },
    })
}

/// The files' contents, read once: what a configuration is built from and what a reload compares.
struct Material {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl Material {
    fn read(files: &TlsFiles) -> Result<Self, TlsError> {
        Ok(Material {
            cert: read(&files.cert)?,
            key: read(&files.key)?,
            client_ca: files.client_ca.as_deref().map(read).transpose()?,
        })
    }

    fn same_as(&self, other: &Material) -> bool {
        self.cert == other.cert && self.key == other.key && self.client_ca == other.client_ca
    }

    /// A rustls configuration for the port: HTTP/2 only (gRPC), TLS 1.2 and 1.3, the client verifier
    /// when a client CA is given. The key must be the leaf certificate's.
    fn server_config(&self, files: &TlsFiles) -> Result<ServerConfig, TlsError> {
        let provider = provider();
        let chain = certificates(&files.cert, &self.cert)?;
        let key = private_key(&files.key, &self.key)?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?;
        let builder = match (&files.client_ca, &self.client_ca) {
            (Some(path), Some(bytes)) => {
                let client_ca = |reason: String| TlsError::ClientCa {
                    path: path.clone(),
                    reason,
                };
                let mut roots = RootCertStore::empty();
                for cert in certificates(path, bytes)? {
                    roots
                        .add(cert)
                        .map_err(|e| client_ca(format!("a CA certificate is not valid: {e}")))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
                let verifier = if files.require_client_cert {
                    verifier
                } else {
                    verifier.allow_unauthenticated()
                };
                builder.with_client_cert_verifier(
                    verifier.build().map_err(|e| client_ca(e.to_string()))?,
                )
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(chain, key).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
                cert: files.cert.clone(),
                key: files.key.clone(),
            },
            rustls::Error::InvalidCertificate(reason) => TlsError::BadCertificate {
                path: files.cert.clone(),
                reason: format!("{reason:?}"),
            },
            other => TlsError::BadKey {
                path: files.key.clone(),
                reason: other.to_string(),
            },
        })?;
        // gRPC is HTTP/2; clients that check ALPN (grpc-go, Envoy) need it offered.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    /// A short, stable name for the leaf certificate in logs: the start of its SHA-256.
    fn certificate_id(&self) -> String {
        let leaf = CertificateDer::pem_slice_iter(&self.cert)
            .next()
            .and_then(Result::ok);
        leaf.map(|c| fingerprint(c.as_ref())).unwrap_or_default()
    }
}

/// The first 16 hex digits of a SHA-256: enough to tell certificates apart in logs.
pub fn fingerprint(der: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What a reload did.
#[derive(Debug)]
pub enum Reload {
    /// The files hold what is already serving.
    Unchanged,
    /// New material serves new connections.
    Reloaded,
    /// The files could not be used; the last good material keeps serving.
    Refused(TlsError),
}

/// One TLS port's current configuration and the files it comes from.
pub struct TlsEndpoint {
    port: &'static str,
    files: TlsFiles,
    config: ArcSwap<ServerConfig>,
    /// What `config` was built from; reloads are serialised by this lock.
    loaded: Mutex<Material>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for TlsEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsEndpoint")
            .field("port", &self.port)
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl TlsEndpoint {
    /// Loads the port's material; at start, a failure stops the service.
    pub fn load(
        port: &'static str,
        files: TlsFiles,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, TlsError> {
        let material = Material::read(&files)?;
        let config = material.server_config(&files)?;
        tracing::info!(
            port,
            certificate = material.certificate_id(),
            client_ca = files.client_ca.is_some(),
            require_client_cert = files.require_client_cert,
            "TLS certificate loaded"
        );
        Ok(Arc::new(TlsEndpoint {
            port,
            files,
            config: ArcSwap::from_pointee(config),
            loaded: Mutex::new(material),
            metrics,
        }))
    }

    pub fn port(&self) -> &'static str {
        self.port
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The configuration for a connection accepted now.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.config.load_full()
    }

    /// Re-reads the files and, when they changed and load, serves them to new connections. Blocking
    /// file I/O: call it off the async workers.
    pub fn reload(&self) -> Reload {
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        let outcome = Material::read(&self.files).and_then(|material| {
            if material.same_as(&loaded) {
                return Ok(None);
            }
            let config = material.server_config(&self.files)?;
            Ok(Some((material, config)))
        });
        match outcome {
            Ok(None) => Reload::Unchanged,
            Ok(Some((material, config))) => {
                self.config.store(Arc::new(config));
                // Counted before it is logged, so that whoever sees the line sees the count.
                self.metrics.tls_reload(self.port, "reloaded");
                tracing::info!(
                    port = self.port,
                    certificate = material.certificate_id(),
                    "TLS certificate reloaded: new connections use it"
                );
                *loaded = material;
                Reload::Reloaded
            }
            Err(e) => {
                self.metrics.tls_reload(self.port, "refused");
                tracing::error!(
                    port = self.port,
                    error = %e,
                    "TLS reload refused, the current certificate keeps serving"
                );
                Reload::Refused(e)
            }
        }
    }
}

/// Reloads every endpoint off the async workers.
pub async fn reload_all(endpoints: &[Arc<TlsEndpoint>]) {
    if endpoints.is_empty() {
        return;
    }
    let endpoints = endpoints.to_vec();
    let _ = tokio::task::spawn_blocking(move || {
        for endpoint in &endpoints {
            endpoint.reload();
        }
    })
    .await;
}

/// How long a burst of file events may take before the files are read: a copy truncates and then
/// writes, and a certificate and its key are two files, usually replaced one after the other.
const SETTLE: Duration = Duration::from_millis(200);
/// When the kernel's file events are not available, how often the files are polled instead.
const POLL_INTERVAL: Duration = Duration::from_secs(5);

/// Whether a file event may mean new contents (reads, including this module's own, do not).
fn changes_contents(kind: &notify::EventKind) -> bool {
    !matches!(kind, notify::EventKind::Access(_))
}

/// Watches the directories of every endpoint's files and reloads on change, until the task is dropped.
/// Directories rather than files: editors and Kubernetes replace files by renaming, which a watch on
/// the old file would not see.
pub async fn watch(endpoints: Vec<Arc<TlsEndpoint>>) {
    if endpoints.is_empty() {
        return;
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let handler = move |event: notify::Result<notify::Event>| match event {
        Ok(event) if changes_contents(&event.kind) => {
            // A full channel already holds a wake-up: this event is covered by it.
            let _ = tx.try_send(());
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "watching TLS files"),
    };
    let mut watcher: Box<dyn notify::Watcher + Send> = match notify::RecommendedWatcher::new(
        handler.clone(),
        notify::Config::default(),
    ) {
        Ok(w) => Box::new(w),
        Err(e) => {
            tracing::warn!(error = %e, "file events unavailable: polling the TLS files");
            let config = notify::Config::default()
                .with_poll_interval(POLL_INTERVAL)
                .with_compare_contents(true);
            match notify::PollWatcher::new(handler, config) {
                Ok(w) => Box::new(w),
                Err(e) => {
                    tracing::error!(error = %e, "cannot watch the TLS files: reload them with SIGHUP");
                    return;
                }
            }
        }
    };
    let mut dirs: Vec<PathBuf> = endpoints
        .iter()
        .flat_map(|e| {
            let files = e.files();
            [
                Some(&files.cert),
                Some(&files.key),
                files.client_ca.as_ref(),
            ]
        })
        .flatten()
        .map(|path| match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
            _ => PathBuf::from("."),
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    for dir in &dirs {
        if let Err(e) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch a TLS directory: reload with SIGHUP");
        }
    }
    while rx.recv().await.is_some() {
        tokio::time::sleep(SETTLE).await;
        while rx.try_recv().is_ok() {}
        reload_all(&endpoints).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec![format!("{name}.test")]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn reloads_new_material_and_refuses_what_does_not_load() {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles {
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
            client_ca: None,
            require_client_cert: false,
        };
        let write = |(cert, key): &(String, String)| {
            std::fs::write(&files.cert, cert).unwrap();
            std::fs::write(&files.key, key).unwrap();
        };
        let first = pair("first");
        write(&first);
        let endpoint =
            TlsEndpoint::load("decision", files.clone(), Arc::new(Metrics::new())).unwrap();
        assert_eq!(endpoint.current().alpn_protocols, [b"h2".to_vec()]);
        assert!(matches!(endpoint.reload(), Reload::Unchanged));

        let serving = endpoint.current();
        let second = pair("second");
        write(&second);
        assert!(matches!(endpoint.reload(), Reload::Reloaded));
        assert!(!Arc::ptr_eq(&serving, &endpoint.current()));

        // Each refusal keeps what serves, and says which file and what is wrong, never its contents.
        let serving = endpoint.current();
        let third = pair("third");
        let key_body: String = second
            .1
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        for (cert, key, expect) in [
            (
                third.0.as_str(),
                second.1.as_str(),
                "is not the private key of the certificate in",
            ),
            ("garbage", second.1.as_str(), "holds no PEM certificate"),
            (second.0.as_str(), "", "holds no PEM private key"),
            (
                second.0.as_str(),
                "-----BEGIN PRIVATE KEY-----\nAAAAsecret\n",
                "a PEM section has no END line",
            ),
        ] {
            std::fs::write(&files.cert, cert).unwrap();
            std::fs::write(&files.key, key).unwrap();
            let Reload::Refused(e) = endpoint.reload() else {
                panic!("`{expect}` must be refused");
            };
            let text = e.to_string();
            assert!(text.contains(expect), "{text}");
            assert!(text.contains("tls."), "names the file: {text}");
            assert!(
                !text.contains("AAAAsecret") && !text.contains(&key_body[..32]),
                "{text}"
            );
            assert!(Arc::ptr_eq(&serving, &endpoint.current()));
        }
        std::fs::remove_file(&files.key).unwrap();
        assert!(matches!(
            endpoint.reload(),
            Reload::Refused(TlsError::Read { .. })
        ));

        // A client CA without certificates is refused at load.
        write(&third);
        let ca = dir.path().join("ca.crt");
        std::fs::write(&ca, "").unwrap();
        let mtls = TlsFiles {
            client_ca: Some(ca),
            require_client_cert: true,
            ..files
        };
        let err = TlsEndpoint::load("admin", mtls, Arc::new(Metrics::new())).unwrap_err();
        assert!(
            err.to_string().contains("ca.crt` holds no PEM certificate"),
            "{err}"
        );
    }
}
