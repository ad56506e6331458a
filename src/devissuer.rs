//! Embedded development issuer: an Entra-ID-shaped OpenID provider served over HTTP on
//! loopback, so the sidecar can be tried without a cloud account and tests can drive an issuer
//! they fully control (key rotation, outages, fetch counting).
//!
//! It mimics the parts of Microsoft Entra ID that a resource server depends on: the v1 and v2
//! OpenID discovery documents, the JWKS endpoints, and the client-credentials token endpoints,
//! with tokens whose claims follow what Entra puts in app-only access tokens. It is a test
//! double, not an identity provider: it binds to loopback only and keeps everything in memory.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der, PublicKeyX509Der};
use aws_lc_rs::rsa::{KeyPair, KeySize, PublicKeyComponents};
use aws_lc_rs::signature::{KeyPair as _, RSA_PKCS1_SHA256};
use axum::Router;
use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Map, Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Token lifetime used when the configuration does not say otherwise (Entra's usual 1 hour).
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// Size of the `Oversized` fault body's padding: one byte more than 1 MiB, so that the whole
/// body is guaranteed to exceed any 1 MiB response cap a client enforces.
const OVERSIZED_PADDING: usize = 1024 * 1024 + 1;

/// How long `shutdown` waits for in-flight requests before cutting the server off, so a
/// stuck client cannot make a test hang.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The literal tenant placeholder Entra uses in the `issuer` member of its JWKS keys.
const TENANT_PLACEHOLDER: &str = "{tenantid}";

/// Errors of the development issuer.
#[derive(Debug, thiserror::Error)]
pub enum DevIssuerError {
    /// The development issuer hands out tokens to anyone who asks, so it must never be
    /// reachable from another host.
    #[error("dev issuer address {0} is not a loopback address")]
    NotLoopback(SocketAddr),
    #[error("failed to bind dev issuer to {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid dev issuer configuration: {0}")]
    InvalidConfig(String),
    #[error("failed to generate an rsa signing key")]
    KeyGeneration,
    #[error("failed to gather randomness")]
    Random,
    #[error("no signing key is published")]
    NoSigningKey,
    #[error("unknown key id {0:?}")]
    UnknownKey(String),
    #[error("failed to sign token")]
    Signing,
    #[error("failed to serialize token json: {0}")]
    Json(#[from] serde_json::Error),
}

/// Configuration of the development issuer.
#[derive(Clone, Debug)]
pub struct DevIssuerConfig {
    /// Listen address; must be loopback (use port 0 to let the OS choose).
    pub addr: SocketAddr,
    pub tenants: Vec<DevTenant>,
    /// Lifetime of minted tokens (`exp - iat`), also reported as `expires_in`.
    pub token_lifetime: Duration,
}

impl Default for DevIssuerConfig {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            tenants: Vec::new(),
            token_lifetime: DEFAULT_TOKEN_LIFETIME,
        }
    }
}

/// A tenant (directory) known to the development issuer.
#[derive(Clone, Debug)]
pub struct DevTenant {
    pub tenant_id: String,
    pub clients: Vec<DevClient>,
}

/// A calling application registered in a [`DevTenant`].
#[derive(Clone)]
pub struct DevClient {
    /// The calling app's application (client) id, a GUID.
    pub client_id: String,
    pub client_secret: String,
    /// Its service principal object id, a GUID (becomes `oid` and `sub`).
    pub object_id: String,
    /// App roles put in the `roles` claim, e.g. `["S2SAppRole"]`.
    pub roles: Vec<String>,
    /// Which token version this client's tokens get.
    pub token_version: TokenVersion,
}

// Hand-written so that printing a configuration can never leak a client secret.
impl fmt::Debug for DevClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevClient")
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("object_id", &self.object_id)
            .field("roles", &self.roles)
            .field("token_version", &self.token_version)
            .finish()
    }
}

/// Entra access token version (the `ver` claim).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub enum TokenVersion {
    #[serde(rename = "1.0")]
    V1,
    #[serde(rename = "2.0")]
    V2,
}

impl TokenVersion {
    fn as_str(self) -> &'static str {
        match self {
            TokenVersion::V1 => "1.0",
            TokenVersion::V2 => "2.0",
        }
    }
}

/// How the discovery and JWKS endpoints misbehave, to exercise the sidecar's failure handling.
/// The token endpoints are never affected, so tokens can still be minted during an "outage".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FaultMode {
    #[default]
    Normal,
    /// Every discovery/JWKS request answers 503.
    Unavailable,
    /// Requests never answer, until the mode changes or the issuer shuts down.
    Hang,
    /// 200 with a body that is not JSON (but claims to be).
    Garbage,
    /// 200 with the genuine JSON document padded to more than 1 MiB + 1 byte.
    Oversized,
}

/// One RSA key with everything derived from it computed once at generation time.
struct KeyEntry {
    kid: String,
    key_pair: KeyPair,
    n: Vec<u8>,
    e: Vec<u8>,
    pkcs8_der: Vec<u8>,
    spki_pem: String,
}

#[derive(Default)]
struct KeyRing {
    /// Published keys, oldest first.
    published: Vec<Arc<KeyEntry>>,
    /// Keys no longer published; kept so tests can still sign with a key the verifier has
    /// stopped trusting.
    retired: Vec<Arc<KeyEntry>>,
    signing: Option<Arc<KeyEntry>>,
}

impl KeyRing {
    fn find(&self, kid: &str) -> Option<Arc<KeyEntry>> {
        self.published
            .iter()
            .chain(self.retired.iter())
            .find(|k| k.kid == kid)
            .cloned()
    }
}

/// State shared between the [`DevIssuer`] handle and the HTTP handlers.
struct Inner {
    instance: String,
    tenants: Vec<DevTenant>,
    token_lifetime: Duration,
    keys: RwLock<KeyRing>,
    fault: watch::Sender<FaultMode>,
    shutdown: watch::Sender<bool>,
    jwks_fetches: AtomicU64,
    discovery_fetches: AtomicU64,
}

/// A running development issuer. Dropping it stops the server (without waiting);
/// [`DevIssuer::shutdown`] stops it and waits.
pub struct DevIssuer {
    inner: Arc<Inner>,
    local_addr: SocketAddr,
    server: Option<JoinHandle<()>>,
}

impl fmt::Debug for DevIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevIssuer")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl DevIssuer {
    /// Binds, spawns the server on the current tokio runtime and returns once it is listening.
    pub async fn start(config: DevIssuerConfig) -> Result<DevIssuer, DevIssuerError> {
        // Checked before binding so a wrong address never opens a socket, even briefly.
        if !config.addr.ip().to_canonical().is_loopback() {
            return Err(DevIssuerError::NotLoopback(config.addr));
        }
        validate_tenants(&config.tenants)?;

        let first_key = Arc::new(generate_key()?);
        let listener = tokio::net::TcpListener::bind(config.addr)
            .await
            .map_err(|source| DevIssuerError::Bind {
                addr: config.addr,
                source,
            })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| DevIssuerError::Bind {
                addr: config.addr,
                source,
            })?;

        let inner = Arc::new(Inner {
            instance: format!("http://{local_addr}/"),
            tenants: config.tenants,
            token_lifetime: config.token_lifetime,
            keys: RwLock::new(KeyRing {
                published: vec![Arc::clone(&first_key)],
                retired: Vec::new(),
                signing: Some(first_key),
            }),
            fault: watch::Sender::new(FaultMode::Normal),
            shutdown: watch::Sender::new(false),
            jwks_fetches: AtomicU64::new(0),
            discovery_fetches: AtomicU64::new(0),
        });

        let app = router(Arc::clone(&inner));
        let mut shutdown_rx = inner.shutdown.subscribe();
        let server = tokio::spawn(async move {
            let signal = async move {
                // An error means the sender is gone, which also means "stop".
                let _ = shutdown_rx.wait_for(|stop| *stop).await;
            };
            if let Err(err) = axum::serve(listener, app)
                .with_graceful_shutdown(signal)
                .await
            {
                tracing::error!(error = %err, "dev issuer server failed");
            }
        });

        tracing::info!(
            addr = %local_addr,
            tenants = inner.tenants.len(),
            "dev issuer listening"
        );
        Ok(DevIssuer {
            inner,
            local_addr,
            server: Some(server),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `http://127.0.0.1:PORT/` (with trailing slash): the authority host, Entra's `{instance}`.
    pub fn instance(&self) -> String {
        self.inner.instance.clone()
    }

    /// The issuer of v1 tokens, exactly as Entra writes it (not the local address, because
    /// v1 tokens always name `sts.windows.net`).
    pub fn v1_issuer(&self, tenant: &str) -> String {
        v1_issuer(tenant)
    }

    /// The issuer of v2 tokens: `{instance}{tenant}/v2.0`.
    pub fn v2_issuer(&self, tenant: &str) -> String {
        v2_issuer(&self.inner.instance, tenant)
    }

    /// The kid of the current signing key, or an empty string if every key was removed.
    pub fn current_kid(&self) -> String {
        self.inner
            .read_keys()
            .signing
            .as_ref()
            .map(|k| k.kid.clone())
            .unwrap_or_default()
    }

    /// Generates a new RSA-2048 key, publishes it, makes it the signing key and keeps the old
    /// keys published (as Entra does during a rollover). Returns the new kid.
    ///
    /// Key generation practically cannot fail; if it does, the error is logged and the
    /// current kid is returned unchanged. Use [`DevIssuer::try_rotate_key`] to see the error.
    pub fn rotate_key(&self) -> String {
        self.try_rotate_key().unwrap_or_else(|err| {
            tracing::error!(error = %err, "dev issuer key rotation failed");
            self.current_kid()
        })
    }

    /// Fallible form of [`DevIssuer::rotate_key`].
    pub fn try_rotate_key(&self) -> Result<String, DevIssuerError> {
        let key = Arc::new(generate_key()?);
        let kid = key.kid.clone();
        let mut keys = self.inner.write_keys();
        keys.published.push(Arc::clone(&key));
        keys.signing = Some(key);
        tracing::info!(kid = %kid, "dev issuer rotated signing key");
        Ok(kid)
    }

    /// Publishes a new key without signing with it (as Entra pre-publishes the next key).
    /// Returns its kid; on the practically impossible generation failure, logs and returns an
    /// empty string. Use [`DevIssuer::try_add_key`] to see the error.
    pub fn add_key(&self) -> String {
        self.try_add_key().unwrap_or_else(|err| {
            tracing::error!(error = %err, "dev issuer key generation failed");
            String::new()
        })
    }

    /// Fallible form of [`DevIssuer::add_key`].
    pub fn try_add_key(&self) -> Result<String, DevIssuerError> {
        let key = Arc::new(generate_key()?);
        let kid = key.kid.clone();
        let mut keys = self.inner.write_keys();
        keys.published.push(key);
        tracing::info!(kid = %kid, "dev issuer published additional key");
        Ok(kid)
    }

    /// Stops publishing `kid`. If it was the signing key, the newest remaining published key
    /// becomes the signing key (none, if it was the last). Returns whether it was published.
    /// A removed key can still be used through [`DevIssuer::sign_raw_with_key`].
    pub fn remove_key(&self, kid: &str) -> bool {
        let mut keys = self.inner.write_keys();
        let Some(pos) = keys.published.iter().position(|k| k.kid == kid) else {
            return false;
        };
        let removed = keys.published.remove(pos);
        keys.retired.push(removed);
        if keys.signing.as_ref().is_some_and(|k| k.kid == kid) {
            keys.signing = keys.published.last().cloned();
        }
        tracing::info!(kid = %kid, "dev issuer unpublished key");
        true
    }

    /// Kids of all currently published keys, oldest first.
    pub fn published_kids(&self) -> Vec<String> {
        self.inner
            .read_keys()
            .published
            .iter()
            .map(|k| k.kid.clone())
            .collect()
    }

    pub fn set_fault(&self, mode: FaultMode) {
        let old = self.inner.fault.send_replace(mode);
        if old != mode {
            tracing::info!(?old, new = ?mode, "dev issuer fault mode changed");
        }
    }

    pub fn fault(&self) -> FaultMode {
        *self.inner.fault.borrow()
    }

    /// Count of JWKS requests received (any outcome, including faults and unknown tenants).
    pub fn jwks_fetches(&self) -> u64 {
        self.inner.jwks_fetches.load(Ordering::Relaxed)
    }

    /// Count of discovery-document requests received (any outcome).
    pub fn discovery_fetches(&self) -> u64 {
        self.inner.discovery_fetches.load(Ordering::Relaxed)
    }

    /// Signs a token with the current signing key, claims given as JSON; the header is
    /// `{"alg":"RS256","typ":"JWT","kid":<current>,"x5t":<kid>}`.
    pub fn sign(&self, claims: &Value) -> Result<String, DevIssuerError> {
        let key = self.signing_key()?;
        sign_with(
            &key,
            &standard_header(&key.kid)?,
            &serde_json::to_string(claims)?,
        )
    }

    /// Signs verbatim: base64url (no padding) of `header_json` and `claims_json` exactly as
    /// given — so tests can craft duplicate claims, `crit`, odd headers — with an RS256
    /// signature by the current signing key.
    pub fn sign_raw(&self, header_json: &str, claims_json: &str) -> Result<String, DevIssuerError> {
        let key = self.signing_key()?;
        sign_with(&key, header_json, claims_json)
    }

    /// Like [`DevIssuer::sign_raw`] but with the key `kid`, which may be published but not
    /// signing, or already removed (to forge tokens signed by an untrusted key).
    pub fn sign_raw_with_key(
        &self,
        kid: &str,
        header_json: &str,
        claims_json: &str,
    ) -> Result<String, DevIssuerError> {
        let key = self.key(kid)?;
        sign_with(&key, header_json, claims_json)
    }

    /// Mints an app-only access token the way Entra would for `client` of `tenant` for
    /// `audience`. `tenant` need not be configured (so tests can mint cross-tenant tokens).
    ///
    /// `audience` is the resource as requested (a trailing `/.default` is stripped). For v2
    /// tokens an `api://{guid}` audience becomes the bare `{guid}`, as Entra does; other
    /// application ID URIs are kept as they are, since there is no app registry to map them.
    pub fn mint_app_token(
        &self,
        tenant: &str,
        client: &DevClient,
        audience: &str,
    ) -> Result<String, DevIssuerError> {
        let claims = app_token_claims(
            &self.inner.instance,
            self.inner.token_lifetime,
            tenant,
            client,
            audience,
        )?;
        self.sign(&claims)
    }

    /// The RSA public key of `kid` (published or removed) as SPKI PEM
    /// (`-----BEGIN PUBLIC KEY-----`).
    pub fn public_key_pem(&self, kid: &str) -> Option<String> {
        self.inner.read_keys().find(kid).map(|k| k.spki_pem.clone())
    }

    /// The RSA public key of `kid` as `(n, e)` big-endian bytes.
    pub fn public_key_components(&self, kid: &str) -> Option<(Vec<u8>, Vec<u8>)> {
        self.inner
            .read_keys()
            .find(kid)
            .map(|k| (k.n.clone(), k.e.clone()))
    }

    /// The PKCS#8 DER of the private key `kid`, for tests that build attack tokens themselves.
    pub fn private_key_pkcs8_der(&self, kid: &str) -> Option<Vec<u8>> {
        self.inner
            .read_keys()
            .find(kid)
            .map(|k| k.pkcs8_der.clone())
    }

    /// Graceful stop: no new connections, in-flight requests (including hanging ones, which
    /// are released with 503) get a few seconds to finish.
    pub async fn shutdown(mut self) {
        self.inner.shutdown.send_replace(true);
        if let Some(mut server) = self.server.take() {
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => tracing::warn!(error = %err, "dev issuer server task failed"),
                Err(_) => {
                    tracing::warn!("dev issuer did not stop in time, aborting it");
                    server.abort();
                }
            }
        }
        tracing::info!(addr = %self.local_addr, "dev issuer stopped");
    }

    fn signing_key(&self) -> Result<Arc<KeyEntry>, DevIssuerError> {
        self.inner
            .read_keys()
            .signing
            .clone()
            .ok_or(DevIssuerError::NoSigningKey)
    }

    fn key(&self, kid: &str) -> Result<Arc<KeyEntry>, DevIssuerError> {
        self.inner
            .read_keys()
            .find(kid)
            .ok_or_else(|| DevIssuerError::UnknownKey(kid.to_owned()))
    }
}

impl Drop for DevIssuer {
    fn drop(&mut self) {
        // Without this a dropped handle would leave the server running until the runtime ends.
        self.inner.shutdown.send_replace(true);
    }
}

impl Inner {
    // A panic while holding the lock cannot leave the key ring half-updated (every update is
    // a single push/remove/assignment), so a poisoned lock is still safe to use.
    fn read_keys(&self) -> std::sync::RwLockReadGuard<'_, KeyRing> {
        self.keys.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_keys(&self) -> std::sync::RwLockWriteGuard<'_, KeyRing> {
        self.keys.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn tenant(&self, tenant_id: &str) -> Option<&DevTenant> {
        self.tenants.iter().find(|t| t.tenant_id == tenant_id)
    }
}

fn validate_tenants(tenants: &[DevTenant]) -> Result<(), DevIssuerError> {
    for (i, tenant) in tenants.iter().enumerate() {
        // The tenant id is a path segment of every URL and part of the issuer.
        if tenant.tenant_id.is_empty() || tenant.tenant_id.contains(['/', '?', '#']) {
            return Err(DevIssuerError::InvalidConfig(format!(
                "tenant id {:?} is not a single path segment",
                tenant.tenant_id
            )));
        }
        if tenants[..i].iter().any(|t| t.tenant_id == tenant.tenant_id) {
            return Err(DevIssuerError::InvalidConfig(format!(
                "tenant {} is configured twice",
                tenant.tenant_id
            )));
        }
        for (j, client) in tenant.clients.iter().enumerate() {
            if tenant.clients[..j]
                .iter()
                .any(|c| c.client_id == client.client_id)
            {
                return Err(DevIssuerError::InvalidConfig(format!(
                    "client {} is configured twice in tenant {}",
                    client.client_id, tenant.tenant_id
                )));
            }
        }
    }
    Ok(())
}

fn v1_issuer(tenant: &str) -> String {
    format!("https://sts.windows.net/{tenant}/")
}

fn v2_issuer(instance: &str, tenant: &str) -> String {
    format!("{instance}{tenant}/v2.0")
}

fn random_bytes<const N: usize>() -> Result<[u8; N], DevIssuerError> {
    let mut buf = [0u8; N];
    aws_lc_rs::rand::fill(&mut buf).map_err(|_| DevIssuerError::Random)?;
    Ok(buf)
}

fn generate_key() -> Result<KeyEntry, DevIssuerError> {
    let key_pair =
        KeyPair::generate(KeySize::Rsa2048).map_err(|_| DevIssuerError::KeyGeneration)?;
    // 20 random bytes give a 27 character kid, the length of Entra's (SHA-1 thumbprint) kids.
    let kid = URL_SAFE_NO_PAD.encode(random_bytes::<20>()?);
    let components = PublicKeyComponents::<Vec<u8>>::from(key_pair.public_key());
    let pkcs8: Pkcs8V1Der<'static> = key_pair
        .as_der()
        .map_err(|_| DevIssuerError::KeyGeneration)?;
    let spki: PublicKeyX509Der<'static> = key_pair
        .public_key()
        .as_der()
        .map_err(|_| DevIssuerError::KeyGeneration)?;
    Ok(KeyEntry {
        kid,
        n: components.n,
        e: components.e,
        pkcs8_der: pkcs8.as_ref().to_vec(),
        spki_pem: pem_encode("PUBLIC KEY", spki.as_ref()),
        key_pair,
    })
}

/// RFC 7468 textual encoding; small enough that a dependency is not worth it.
fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for (i, c) in b64.chars().enumerate() {
        if i > 0 && i % 64 == 0 {
            out.push('\n');
        }
        out.push(c);
    }
    out.push_str(&format!("\n-----END {label}-----\n"));
    out
}

fn standard_header(kid: &str) -> Result<String, DevIssuerError> {
    Ok(serde_json::to_string(&json!({
        "alg": "RS256",
        "typ": "JWT",
        "kid": kid,
        "x5t": kid,
    }))?)
}

fn sign_with(
    key: &KeyEntry,
    header_json: &str,
    claims_json: &str,
) -> Result<String, DevIssuerError> {
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header_json),
        URL_SAFE_NO_PAD.encode(claims_json)
    );
    let mut signature = vec![0u8; key.key_pair.public_modulus_len()];
    key.key_pair
        .sign(
            &RSA_PKCS1_SHA256,
            &aws_lc_rs::rand::SystemRandom::new(),
            signing_input.as_bytes(),
            &mut signature,
        )
        .map_err(|_| DevIssuerError::Signing)?;
    Ok(format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature)
    ))
}

fn unix_now() -> u64 {
    // A clock before 1970 is a broken machine; 0 yields tokens that are visibly wrong.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The `aud` Entra writes for a requested resource.
fn token_audience(audience: &str, version: TokenVersion) -> String {
    let audience = audience.strip_suffix("/.default").unwrap_or(audience);
    if version == TokenVersion::V2
        && let Some(guid) = audience.strip_prefix("api://")
        && uuid::Uuid::try_parse(guid).is_ok()
    {
        return guid.to_owned();
    }
    audience.to_owned()
}

fn app_token_claims(
    instance: &str,
    lifetime: Duration,
    tenant: &str,
    client: &DevClient,
    audience: &str,
) -> Result<Value, DevIssuerError> {
    let now = unix_now();
    let version = client.token_version;
    let iss = match version {
        TokenVersion::V1 => v1_issuer(tenant),
        TokenVersion::V2 => v2_issuer(instance, tenant),
    };
    let mut claims = Map::new();
    claims.insert("aud".into(), token_audience(audience, version).into());
    claims.insert("iss".into(), iss.clone().into());
    claims.insert("iat".into(), now.into());
    claims.insert("nbf".into(), now.into());
    claims.insert("exp".into(), now.saturating_add(lifetime.as_secs()).into());
    // Opaque Entra-internal claims; only their presence and shape matter to a verifier.
    claims.insert(
        "aio".into(),
        URL_SAFE_NO_PAD.encode(random_bytes::<48>()?).into(),
    );
    match version {
        TokenVersion::V1 => {
            claims.insert("appid".into(), client.client_id.clone().into());
            claims.insert("appidacr".into(), "1".into());
            // Entra v1 app tokens name the issuing tenant as identity provider.
            claims.insert("idp".into(), iss.into());
        }
        TokenVersion::V2 => {
            claims.insert("azp".into(), client.client_id.clone().into());
            claims.insert("azpacr".into(), "1".into());
        }
    }
    claims.insert("idtyp".into(), "app".into());
    claims.insert("oid".into(), client.object_id.clone().into());
    claims.insert(
        "rh".into(),
        format!("0.{}.", URL_SAFE_NO_PAD.encode(random_bytes::<45>()?)).into(),
    );
    if !client.roles.is_empty() {
        claims.insert("roles".into(), client.roles.clone().into());
    }
    claims.insert("sub".into(), client.object_id.clone().into());
    claims.insert("tid".into(), tenant.into());
    claims.insert(
        "uti".into(),
        URL_SAFE_NO_PAD.encode(random_bytes::<16>()?).into(),
    );
    claims.insert("ver".into(), version.as_str().into());
    Ok(Value::Object(claims))
}

// ---------------------------------------------------------------------------------------------
// HTTP surface
// ---------------------------------------------------------------------------------------------

type Shared = Arc<Inner>;

fn router(inner: Shared) -> Router {
    Router::new()
        .route(
            "/{tenant}/.well-known/openid-configuration",
            get(discovery_v1),
        )
        .route(
            "/{tenant}/v2.0/.well-known/openid-configuration",
            get(discovery_v2),
        )
        .route("/{tenant}/discovery/keys", get(jwks_v1))
        .route("/{tenant}/discovery/v2.0/keys", get(jwks_v2))
        .route("/{tenant}/oauth2/token", post(token_v1))
        .route("/{tenant}/oauth2/v2.0/token", post(token_v2))
        .fallback(not_found)
        .with_state(inner)
}

/// An Entra-like error body (`error`, `error_description` with an AADSTS code, ids).
fn entra_error(status: StatusCode, error: &str, code: u32, description: String) -> Response {
    let trace_id = uuid::Uuid::new_v4().to_string();
    let correlation_id = uuid::Uuid::new_v4().to_string();
    let body = json!({
        "error": error,
        "error_description": format!(
            "AADSTS{code}: {description} Trace ID: {trace_id} Correlation ID: {correlation_id}"
        ),
        "error_codes": [code],
        "trace_id": trace_id,
        "correlation_id": correlation_id,
    });
    no_store((status, axum::Json(body)).into_response())
}

fn unknown_tenant(tenant: &str) -> Response {
    entra_error(
        StatusCode::BAD_REQUEST,
        "invalid_tenant",
        90002,
        format!("Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID."),
    )
}

fn no_store(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-store, no-cache"),
    );
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

async fn not_found() -> Response {
    entra_error(
        StatusCode::NOT_FOUND,
        "invalid_request",
        900561,
        "The endpoint does not exist in the dev issuer.".to_owned(),
    )
}

/// What the current fault mode asks a discovery/JWKS handler to do.
enum Fault {
    Serve,
    Oversize,
    Respond(Response),
}

async fn current_fault(inner: &Inner) -> Fault {
    let mut fault_rx = inner.fault.subscribe();
    let mut shutdown_rx = inner.shutdown.subscribe();
    loop {
        let mode = *fault_rx.borrow_and_update();
        match mode {
            FaultMode::Normal => return Fault::Serve,
            FaultMode::Oversized => return Fault::Oversize,
            FaultMode::Unavailable => return Fault::Respond(unavailable()),
            FaultMode::Garbage => {
                // Labelled JSON on purpose, so the client's parser (not a content-type check)
                // has to catch it — like an error page behind a misconfigured proxy.
                let body = "<html><head><title>502 Bad Gateway</title></head>\
                            <body>upstream said: {\"keys\": [</body></html>";
                return Fault::Respond(
                    (
                        StatusCode::OK,
                        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
                        body,
                    )
                        .into_response(),
                );
            }
            FaultMode::Hang => {
                tokio::select! {
                    changed = fault_rx.changed() => {
                        if changed.is_err() {
                            return Fault::Respond(unavailable());
                        }
                        // Re-evaluate the new mode on the next turn.
                    }
                    // Released at shutdown so a hanging client cannot block a graceful stop.
                    _ = shutdown_rx.wait_for(|stop| *stop) => {
                        return Fault::Respond(unavailable());
                    }
                }
            }
        }
    }
}

fn unavailable() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, "1")],
        "Service Unavailable",
    )
        .into_response()
}

/// Serves `doc`, or the same document padded past 1 MiB in `Oversized` mode.
fn json_document(mut doc: Value, fault: &Fault) -> Response {
    if matches!(fault, Fault::Oversize)
        && let Value::Object(map) = &mut doc
    {
        map.insert("x_padding".into(), "A".repeat(OVERSIZED_PADDING).into());
    }
    (StatusCode::OK, axum::Json(doc)).into_response()
}

async fn discovery_v1(State(inner): State<Shared>, Path(tenant): Path<String>) -> Response {
    discovery(&inner, &tenant, TokenVersion::V1).await
}

async fn discovery_v2(State(inner): State<Shared>, Path(tenant): Path<String>) -> Response {
    discovery(&inner, &tenant, TokenVersion::V2).await
}

async fn discovery(inner: &Inner, tenant: &str, version: TokenVersion) -> Response {
    inner.discovery_fetches.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(tenant, ?version, "dev issuer discovery request");
    let fault = current_fault(inner).await;
    if let Fault::Respond(response) = fault {
        return response;
    }
    if inner.tenant(tenant).is_none() {
        return unknown_tenant(tenant);
    }
    let base = format!("{}{tenant}", inner.instance);
    let (issuer, jwks_uri, token_endpoint, authorization_endpoint) = match version {
        TokenVersion::V1 => (
            v1_issuer(tenant),
            format!("{base}/discovery/keys"),
            format!("{base}/oauth2/token"),
            format!("{base}/oauth2/authorize"),
        ),
        TokenVersion::V2 => (
            v2_issuer(&inner.instance, tenant),
            format!("{base}/discovery/v2.0/keys"),
            format!("{base}/oauth2/v2.0/token"),
            format!("{base}/oauth2/v2.0/authorize"),
        ),
    };
    let doc = json!({
        "issuer": issuer,
        "jwks_uri": jwks_uri,
        "token_endpoint": token_endpoint,
        "authorization_endpoint": authorization_endpoint,
        "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
        "response_types_supported": ["code", "id_token", "code id_token", "token id_token", "token"],
        "response_modes_supported": ["query", "fragment", "form_post"],
        "subject_types_supported": ["pairwise"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "scopes_supported": ["openid", "profile", "email", "offline_access"],
        "tenant_region_scope": "NA",
        "cloud_instance_name": "dev.local",
    });
    json_document(doc, &fault)
}

async fn jwks_v1(State(inner): State<Shared>, Path(tenant): Path<String>) -> Response {
    jwks(&inner, &tenant).await
}

async fn jwks_v2(State(inner): State<Shared>, Path(tenant): Path<String>) -> Response {
    jwks(&inner, &tenant).await
}

async fn jwks(inner: &Inner, tenant: &str) -> Response {
    inner.jwks_fetches.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(tenant, "dev issuer jwks request");
    let fault = current_fault(inner).await;
    if let Fault::Respond(response) = fault {
        return response;
    }
    if inner.tenant(tenant).is_none() {
        return unknown_tenant(tenant);
    }
    // Entra publishes the multi-tenant issuer template, placeholder included, on every key.
    let key_issuer = v2_issuer(&inner.instance, TENANT_PLACEHOLDER);
    let keys: Vec<Value> = inner
        .read_keys()
        .published
        .iter()
        .map(|k| {
            json!({
                "kty": "RSA",
                "use": "sig",
                "kid": k.kid,
                "x5t": k.kid,
                "n": URL_SAFE_NO_PAD.encode(&k.n),
                "e": URL_SAFE_NO_PAD.encode(&k.e),
                "issuer": key_issuer,
            })
        })
        .collect();
    json_document(json!({ "keys": keys }), &fault)
}

/// Which token endpoint a request came in on; they differ only in how the audience is named.
#[derive(Clone, Copy, Debug)]
enum Endpoint {
    /// `resource=<audience>`
    V1,
    /// `scope=<audience>/.default`
    V2,
}

async fn token_v1(
    State(inner): State<Shared>,
    Path(tenant): Path<String>,
    form: Result<Form<HashMap<String, String>>, FormRejection>,
) -> Response {
    token(&inner, &tenant, Endpoint::V1, form)
}

async fn token_v2(
    State(inner): State<Shared>,
    Path(tenant): Path<String>,
    form: Result<Form<HashMap<String, String>>, FormRejection>,
) -> Response {
    token(&inner, &tenant, Endpoint::V2, form)
}

fn missing_parameter(name: &str) -> Response {
    entra_error(
        StatusCode::BAD_REQUEST,
        "invalid_request",
        900144,
        format!("The request body must contain the following parameter: '{name}'."),
    )
}

fn token(
    inner: &Inner,
    tenant_id: &str,
    endpoint: Endpoint,
    form: Result<Form<HashMap<String, String>>, FormRejection>,
) -> Response {
    let Some(tenant) = inner.tenant(tenant_id) else {
        return unknown_tenant(tenant_id);
    };
    let Ok(Form(form)) = form else {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900144,
            "The request body must be application/x-www-form-urlencoded.".to_owned(),
        );
    };
    let param = |name: &str| form.get(name).map(String::as_str).filter(|v| !v.is_empty());

    let Some(grant_type) = param("grant_type") else {
        return missing_parameter("grant_type");
    };
    if grant_type != "client_credentials" {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70003,
            "The app requested an unsupported grant type; the dev issuer only supports \
             'client_credentials'."
                .to_owned(),
        );
    }
    let Some(client_id) = param("client_id") else {
        return missing_parameter("client_id");
    };
    let Some(client) = tenant.clients.iter().find(|c| c.client_id == client_id) else {
        tracing::warn!(tenant = tenant_id, client_id, "dev issuer: unknown client");
        return entra_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            700016,
            format!(
                "Application with identifier '{client_id}' was not found in the directory \
                 '{tenant_id}'."
            ),
        );
    };
    let secret_ok = param("client_secret").is_some_and(|given| {
        aws_lc_rs::constant_time::verify_slices_are_equal(
            given.as_bytes(),
            client.client_secret.as_bytes(),
        )
        .is_ok()
    });
    if !secret_ok {
        tracing::warn!(
            tenant = tenant_id,
            client_id,
            "dev issuer: invalid client secret"
        );
        return entra_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000215,
            "Invalid client secret provided. Ensure the secret being sent in the request is \
             the client secret value, not the client secret ID."
                .to_owned(),
        );
    }

    let audience = match endpoint {
        Endpoint::V1 => match param("resource") {
            Some(resource) => resource.to_owned(),
            None => return missing_parameter("resource"),
        },
        Endpoint::V2 => {
            let Some(scope) = param("scope") else {
                return missing_parameter("scope");
            };
            // Client credentials take exactly one `<resource>/.default` scope.
            match scope.trim().strip_suffix("/.default") {
                Some(resource) if !resource.is_empty() && !resource.contains(' ') => {
                    resource.to_owned()
                }
                _ => {
                    return entra_error(
                        StatusCode::BAD_REQUEST,
                        "invalid_scope",
                        1002012,
                        format!(
                            "The provided value for scope {scope} is not valid. Client \
                             credential flows must have a scope value with /.default suffixed \
                             to the resource identifier (application ID URI)."
                        ),
                    );
                }
            }
        }
    };

    let minted = app_token_claims(
        &inner.instance,
        inner.token_lifetime,
        tenant_id,
        client,
        &audience,
    )
    .and_then(|claims| {
        let key = inner
            .read_keys()
            .signing
            .clone()
            .ok_or(DevIssuerError::NoSigningKey)?;
        sign_with(
            &key,
            &standard_header(&key.kid)?,
            &serde_json::to_string(&claims)?,
        )
    });
    let access_token = match minted {
        Ok(token) => token,
        Err(err) => {
            tracing::error!(error = %err, tenant = tenant_id, client_id, "dev issuer could not mint token");
            return entra_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "temporarily_unavailable",
                50000,
                format!("The dev issuer could not issue a token: {err}."),
            );
        }
    };
    tracing::info!(
        tenant = tenant_id,
        client_id,
        audience = %audience,
        ?endpoint,
        "dev issuer issued app token"
    );

    let lifetime = inner.token_lifetime.as_secs();
    let mut body = json!({
        "token_type": "Bearer",
        "expires_in": lifetime,
        "ext_expires_in": lifetime,
        "access_token": access_token,
    });
    if let (Endpoint::V1, Value::Object(map)) = (endpoint, &mut body) {
        // The v1 endpoint also reports these, as strings, like Entra.
        let now = unix_now();
        map.insert(
            "expires_on".into(),
            now.saturating_add(lifetime).to_string().into(),
        );
        map.insert("not_before".into(), now.to_string().into());
        map.insert("resource".into(), audience.into());
    }
    no_store((StatusCode::OK, axum::Json(body)).into_response())
}

#[cfg(test)]
// Tests fail loudly on purpose; the crate-wide deny is for production code.
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
    const V2_CLIENT: &str = "11111111-2222-3333-4444-555555555555";
    const V1_CLIENT: &str = "66666666-7777-8888-9999-000000000000";
    const OBJECT_ID: &str = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";
    const API_GUID: &str = "deadbeef-0000-4000-8000-000000000001";

    fn v2_client() -> DevClient {
        DevClient {
            client_id: V2_CLIENT.into(),
            client_secret: "v2-secret".into(),
            object_id: OBJECT_ID.into(),
            roles: vec!["S2SAppRole".into()],
            token_version: TokenVersion::V2,
        }
    }

    fn v1_client() -> DevClient {
        DevClient {
            client_id: V1_CLIENT.into(),
            client_secret: "v1-secret".into(),
            object_id: OBJECT_ID.into(),
            roles: Vec::new(),
            token_version: TokenVersion::V1,
        }
    }

    async fn start() -> DevIssuer {
        DevIssuer::start(DevIssuerConfig {
            tenants: vec![DevTenant {
                tenant_id: TENANT.into(),
                clients: vec![v2_client(), v1_client()],
            }],
            ..DevIssuerConfig::default()
        })
        .await
        .expect("dev issuer starts")
    }

    fn http() -> reqwest::Client {
        reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client")
    }

    async fn get_json(url: &str) -> (reqwest::StatusCode, Value) {
        let resp = http().get(url).send().await.expect("request");
        let status = resp.status();
        let text = resp.text().await.expect("body");
        (status, serde_json::from_str(&text).expect("json body"))
    }

    async fn post_form(url: &str, form: &[(&str, &str)]) -> (reqwest::StatusCode, Value) {
        let body = form
            .iter()
            .map(|(k, v)| format!("{k}={}", urlencode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let resp = http()
            .post(url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .expect("request");
        let status = resp.status();
        let text = resp.text().await.expect("body");
        (status, serde_json::from_str(&text).expect("json body"))
    }

    fn urlencode(s: &str) -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    }

    fn decode_part(token: &str, index: usize) -> Value {
        let part = token.split('.').nth(index).expect("token part");
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64url")).expect("json")
    }

    /// Verifies `token` against the JWKS the issuer serves, with jsonwebtoken as an independent
    /// RS256 implementation.
    async fn verify_with_jwks(issuer: &DevIssuer, token: &str, aud: &str, iss: &str) -> Value {
        let kid = decode_part(token, 0)["kid"]
            .as_str()
            .expect("kid")
            .to_owned();
        let (_, jwks) = get_json(&format!(
            "{}{TENANT}/discovery/v2.0/keys",
            issuer.instance()
        ))
        .await;
        let jwk = jwks["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .find(|k| k["kid"] == kid.as_str())
            .expect("signing key is published")
            .clone();
        let key = jsonwebtoken::DecodingKey::from_rsa_components(
            jwk["n"].as_str().expect("n"),
            jwk["e"].as_str().expect("e"),
        )
        .expect("rsa components");
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
        validation.set_audience(&[aud]);
        validation.set_issuer(&[iss]);
        jsonwebtoken::decode::<Value>(token, &key, &validation)
            .expect("token verifies")
            .claims
    }

    #[tokio::test]
    async fn serves_v1_and_v2_discovery() {
        let issuer = start().await;
        let instance = issuer.instance();
        assert_eq!(instance, format!("http://{}/", issuer.local_addr()));
        assert!(instance.starts_with("http://127.0.0.1:") && instance.ends_with('/'));

        let (status, v1) = get_json(&format!(
            "{instance}{TENANT}/.well-known/openid-configuration"
        ))
        .await;
        assert_eq!(status, 200);
        assert_eq!(v1["issuer"], format!("https://sts.windows.net/{TENANT}/"));
        assert_eq!(v1["issuer"], issuer.v1_issuer(TENANT));
        assert_eq!(v1["jwks_uri"], format!("{instance}{TENANT}/discovery/keys"));
        assert_eq!(
            v1["token_endpoint"],
            format!("{instance}{TENANT}/oauth2/token")
        );
        assert_eq!(
            v1["id_token_signing_alg_values_supported"],
            json!(["RS256"])
        );
        for field in [
            "authorization_endpoint",
            "response_types_supported",
            "subject_types_supported",
            "tenant_region_scope",
        ] {
            assert!(!v1[field].is_null(), "v1 lacks {field}");
        }

        let (status, v2) = get_json(&format!(
            "{instance}{TENANT}/v2.0/.well-known/openid-configuration"
        ))
        .await;
        assert_eq!(status, 200);
        assert_eq!(v2["issuer"], format!("{instance}{TENANT}/v2.0"));
        assert_eq!(v2["issuer"], issuer.v2_issuer(TENANT));
        assert_eq!(
            v2["jwks_uri"],
            format!("{instance}{TENANT}/discovery/v2.0/keys")
        );
        assert_eq!(
            v2["token_endpoint"],
            format!("{instance}{TENANT}/oauth2/v2.0/token")
        );
        assert_eq!(issuer.discovery_fetches(), 2);
        assert_eq!(issuer.jwks_fetches(), 0);

        let (status, err) = get_json(&format!(
            "{instance}not-a-tenant/v2.0/.well-known/openid-configuration"
        ))
        .await;
        assert_eq!(status, 400);
        assert_eq!(err["error"], "invalid_tenant");
        assert_eq!(issuer.discovery_fetches(), 3);
        issuer.shutdown().await;
    }

    #[tokio::test]
    async fn serves_jwks_matching_the_signing_key() {
        let issuer = start().await;
        let kid = issuer.current_kid();
        assert_eq!(kid.len(), 27);
        let (n, e) = issuer.public_key_components(&kid).expect("components");
        assert_eq!(n.len(), 256, "rsa-2048 modulus");
        for path in ["discovery/keys", "discovery/v2.0/keys"] {
            let (status, jwks) = get_json(&format!("{}{TENANT}/{path}", issuer.instance())).await;
            assert_eq!(status, 200);
            let keys = jwks["keys"].as_array().expect("keys");
            assert_eq!(keys.len(), 1);
            let key = &keys[0];
            assert_eq!(key["kty"], "RSA");
            assert_eq!(key["use"], "sig");
            assert_eq!(key["kid"], kid.as_str());
            assert_eq!(key["x5t"], kid.as_str());
            assert_eq!(key["n"], URL_SAFE_NO_PAD.encode(&n));
            assert_eq!(key["e"], URL_SAFE_NO_PAD.encode(&e));
            assert_eq!(
                key["issuer"],
                format!("{}{{tenantid}}/v2.0", issuer.instance())
            );
        }
        assert_eq!(issuer.jwks_fetches(), 2);

        let pem = issuer.public_key_pem(&kid).expect("pem");
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\n"));
        assert!(pem.ends_with("-----END PUBLIC KEY-----\n"));
        assert!(pem.lines().all(|l| l.len() <= 64));
        let der = STANDARD
            .decode(
                pem.lines()
                    .filter(|l| !l.starts_with("-----"))
                    .collect::<String>(),
            )
            .expect("pem base64");
        let token = issuer.sign(&json!({"hello": "world"})).expect("sign");
        let (input, sig) = token.rsplit_once('.').expect("three parts");
        aws_lc_rs::signature::UnparsedPublicKey::new(
            &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256,
            der,
        )
        .verify(input.as_bytes(), &URL_SAFE_NO_PAD.decode(sig).expect("sig"))
        .expect("spki pem verifies the signature");
        let pkcs8 = issuer.private_key_pkcs8_der(&kid).expect("private key");
        assert!(KeyPair::from_pkcs8(&pkcs8).is_ok());
        assert!(issuer.public_key_pem("nope").is_none());
        issuer.shutdown().await;
    }

    #[tokio::test]
    async fn issues_v2_token_via_client_credentials() {
        let issuer = start().await;
        let scope = format!("api://{API_GUID}/.default");
        let (status, body) = post_form(
            &format!("{}{TENANT}/oauth2/v2.0/token", issuer.instance()),
            &[
                ("grant_type", "client_credentials"),
                ("client_id", V2_CLIENT),
                ("client_secret", "v2-secret"),
                ("scope", &scope),
            ],
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["expires_in"], 3600);
        assert_eq!(body["ext_expires_in"], 3600);
        let token = body["access_token"].as_str().expect("access_token");

        let header = decode_part(token, 0);
        assert_eq!(header["alg"], "RS256");
        assert_eq!(header["typ"], "JWT");
        assert_eq!(header["kid"], issuer.current_kid().as_str());
        assert_eq!(header["x5t"], header["kid"]);

        let claims = decode_part(token, 1);
        assert_eq!(claims["iss"], issuer.v2_issuer(TENANT));
        assert_eq!(
            claims["aud"], API_GUID,
            "api://{{guid}} becomes the bare guid in v2"
        );
        assert_eq!(claims["azp"], V2_CLIENT);
        assert_eq!(claims["azpacr"], "1");
        assert!(claims.get("appid").is_none());
        assert_eq!(claims["ver"], "2.0");
        assert_eq!(claims["roles"], json!(["S2SAppRole"]));
        assert_eq!(claims["oid"], OBJECT_ID);
        assert_eq!(claims["sub"], OBJECT_ID);
        assert_eq!(claims["tid"], TENANT);
        assert_eq!(claims["idtyp"], "app");
        assert!(claims["uti"].is_string() && claims["rh"].is_string());
        let iat = claims["iat"].as_u64().expect("iat");
        assert_eq!(claims["nbf"].as_u64(), Some(iat));
        assert_eq!(claims["exp"].as_u64(), Some(iat + 3600));

        let verified = verify_with_jwks(&issuer, token, API_GUID, &issuer.v2_issuer(TENANT)).await;
        assert_eq!(verified["azp"], V2_CLIENT);
        issuer.shutdown().await;
    }

    #[tokio::test]
    async fn issues_v1_token_via_resource() {
        let issuer = start().await;
        let resource = format!("api://{API_GUID}");
        let (status, body) = post_form(
            &format!("{}{TENANT}/oauth2/token", issuer.instance()),
            &[
                ("grant_type", "client_credentials"),
                ("client_id", V1_CLIENT),
                ("client_secret", "v1-secret"),
                ("resource", &resource),
            ],
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["expires_in"], 3600);
        let token = body["access_token"].as_str().expect("access_token");
        let claims = decode_part(token, 1);
        assert_eq!(claims["iss"], format!("https://sts.windows.net/{TENANT}/"));
        assert_eq!(
            claims["aud"],
            resource.as_str(),
            "v1 keeps the resource as requested"
        );
        assert_eq!(claims["appid"], V1_CLIENT);
        assert_eq!(claims["appidacr"], "1");
        assert!(claims.get("azp").is_none());
        assert_eq!(claims["ver"], "1.0");
        assert!(claims.get("roles").is_none(), "empty roles are omitted");
        verify_with_jwks(&issuer, token, &resource, &issuer.v1_issuer(TENANT)).await;
        issuer.shutdown().await;
    }

    #[tokio::test]
    async fn token_endpoint_rejects_bad_requests() {
        let issuer = start().await;
        let v2 = format!("{}{TENANT}/oauth2/v2.0/token", issuer.instance());
        let scope = format!("api://{API_GUID}/.default");
        type Case<'a> = (&'a [(&'a str, &'a str)], u16, &'a str);
        let cases: [Case<'_>; 5] = [
            (
                &[
                    ("grant_type", "client_credentials"),
                    ("client_id", V2_CLIENT),
                    ("client_secret", "wrong"),
                    ("scope", &scope),
                ],
                401,
                "invalid_client",
            ),
            (
                &[
                    ("grant_type", "client_credentials"),
                    ("client_id", "99999999-9999-9999-9999-999999999999"),
                    ("client_secret", "v2-secret"),
                    ("scope", &scope),
                ],
                401,
                "invalid_client",
            ),
            (
                &[
                    ("grant_type", "client_credentials"),
                    ("client_id", V2_CLIENT),
                    ("client_secret", "v2-secret"),
                    ("scope", "api://whatever"),
                ],
                400,
                "invalid_scope",
            ),
            (
                &[
                    ("grant_type", "password"),
                    ("client_id", V2_CLIENT),
                    ("client_secret", "v2-secret"),
                    ("scope", &scope),
                ],
                400,
                "unsupported_grant_type",
            ),
            (
                &[
                    ("grant_type", "client_credentials"),
                    ("client_id", V2_CLIENT),
                    ("scope", &scope),
                ],
                401,
                "invalid_client",
            ),
        ];
        for (form, status, error) in cases {
            let (got, body) = post_form(&v2, form).await;
            assert_eq!(got, status, "{form:?} -> {body}");
            assert_eq!(body["error"], error, "{form:?}");
            assert!(body["error_description"].is_string());
        }
        let (got, body) = post_form(
            &format!("{}other-tenant/oauth2/v2.0/token", issuer.instance()),
            &[("grant_type", "client_credentials")],
        )
        .await;
        assert_eq!(got, 400);
        assert_eq!(body["error"], "invalid_tenant");
        issuer.shutdown().await;
    }

    #[tokio::test]
    async fn rotation_keeps_old_key_and_removal_unpublishes() {
        let issuer = start().await;
        let jwks_url = format!("{}{TENANT}/discovery/keys", issuer.instance());
        let kids = |jwks: &Value| -> Vec<String> {
            jwks["keys"]
                .as_array()
                .expect("keys")
                .iter()
                .map(|k| k["kid"].as_str().expect("kid").to_owned())
                .collect()
        };

        let old = issuer.current_kid();
        let new = issuer.rotate_key();
        assert_ne!(old, new);
        assert_eq!(issuer.current_kid(), new);
        let (_, jwks) = get_json(&jwks_url).await;
        assert_eq!(kids(&jwks), vec![old.clone(), new.clone()]);
        let token = issuer.sign(&json!({"a": 1})).expect("sign");
        assert_eq!(decode_part(&token, 0)["kid"], new.as_str());

        let spare = issuer.add_key();
        assert_eq!(
            issuer.current_kid(),
            new,
            "add_key does not switch signing key"
        );
        assert_eq!(
            issuer.published_kids(),
            vec![old.clone(), new.clone(), spare.clone()]
        );

        assert!(issuer.remove_key(&old));
        assert!(!issuer.remove_key(&old));
        let (_, jwks) = get_json(&jwks_url).await;
        assert_eq!(kids(&jwks), vec![new.clone(), spare.clone()]);
        // A removed key can still forge tokens for negative tests.
        let forged = issuer
            .sign_raw_with_key(&old, r#"{"alg":"RS256"}"#, "{}")
            .expect("sign with retired key");
        assert_eq!(forged.split('.').count(), 3);

        assert!(issuer.remove_key(&new));
        assert_eq!(
            issuer.current_kid(),
            spare,
            "newest remaining key takes over"
        );
        assert!(issuer.remove_key(&spare));
        assert_eq!(issuer.current_kid(), "");
        assert!(matches!(
            issuer.sign(&json!({})),
            Err(DevIssuerError::NoSigningKey)
        ));
        let (_, jwks) = get_json(&jwks_url).await;
        assert!(kids(&jwks).is_empty());
        issuer.shutdown().await;
    }

    #[tokio::test]
    async fn sign_raw_keeps_bytes_verbatim() {
        let issuer = start().await;
        let header = format!(
            r#"{{"alg":"RS256","kid":"{}","crit":["x"]}}"#,
            issuer.current_kid()
        );
        let claims = r#"{"aud":"a","aud":"b"}"#;
        let token = issuer.sign_raw(&header, claims).expect("sign_raw");
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(
            URL_SAFE_NO_PAD.decode(parts[0]).expect("b64"),
            header.as_bytes()
        );
        assert_eq!(
            URL_SAFE_NO_PAD.decode(parts[1]).expect("b64"),
            claims.as_bytes()
        );
        let (n, e) = issuer
            .public_key_components(&issuer.current_kid())
            .expect("key");
        aws_lc_rs::signature::RsaPublicKeyComponents { n: &n, e: &e }
            .verify(
                &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256,
                format!("{}.{}", parts[0], parts[1]).as_bytes(),
                &URL_SAFE_NO_PAD.decode(parts[2]).expect("sig"),
            )
            .expect("signature verifies");
        issuer.shutdown().await;
    }

    #[tokio::test]
    async fn fault_modes_change_discovery_and_jwks_only() {
        let issuer = start().await;
        let jwks_url = format!("{}{TENANT}/discovery/v2.0/keys", issuer.instance());
        let disco_url = format!(
            "{}{TENANT}/v2.0/.well-known/openid-configuration",
            issuer.instance()
        );

        issuer.set_fault(FaultMode::Unavailable);
        assert_eq!(issuer.fault(), FaultMode::Unavailable);
        for url in [&jwks_url, &disco_url] {
            let resp = http().get(url).send().await.expect("request");
            assert_eq!(resp.status(), 503);
        }
        // The token endpoint keeps working during an outage.
        let scope = format!("api://{API_GUID}/.default");
        let (status, _) = post_form(
            &format!("{}{TENANT}/oauth2/v2.0/token", issuer.instance()),
            &[
                ("grant_type", "client_credentials"),
                ("client_id", V2_CLIENT),
                ("client_secret", "v2-secret"),
                ("scope", &scope),
            ],
        )
        .await;
        assert_eq!(status, 200);

        issuer.set_fault(FaultMode::Garbage);
        let resp = http().get(&jwks_url).send().await.expect("request");
        assert_eq!(resp.status(), 200);
        let text = resp.text().await.expect("body");
        assert!(serde_json::from_str::<Value>(&text).is_err());

        issuer.set_fault(FaultMode::Oversized);
        for url in [&jwks_url, &disco_url] {
            let resp = http().get(url).send().await.expect("request");
            assert_eq!(resp.status(), 200);
            let bytes = resp.bytes().await.expect("body");
            assert!(bytes.len() > 1024 * 1024 + 1, "{} bytes", bytes.len());
            assert!(serde_json::from_slice::<Value>(&bytes).is_ok());
        }

        issuer.set_fault(FaultMode::Hang);
        let timed_out = http()
            .get(&jwks_url)
            .timeout(Duration::from_millis(200))
            .send()
            .await;
        assert!(timed_out.is_err_and(|e| e.is_timeout()));
        // A hanging request is released when the mode changes.
        let pending = tokio::spawn({
            let url = jwks_url.clone();
            async move { http().get(&url).send().await.map(|r| r.status()) }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!pending.is_finished());
        issuer.set_fault(FaultMode::Normal);
        let status = pending.await.expect("join").expect("request");
        assert_eq!(status, 200);

        let (status, _) = get_json(&jwks_url).await;
        assert_eq!(status, 200);
        assert_eq!(issuer.jwks_fetches(), 6);
        assert_eq!(issuer.discovery_fetches(), 2);
        issuer.shutdown().await;
    }

    #[tokio::test]
    async fn shutdown_releases_hanging_requests() {
        let issuer = start().await;
        issuer.set_fault(FaultMode::Hang);
        let url = format!("{}{TENANT}/discovery/keys", issuer.instance());
        let pending =
            tokio::spawn(async move { http().get(&url).send().await.map(|r| r.status()) });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = std::time::Instant::now();
        issuer.shutdown().await;
        assert!(started.elapsed() < SHUTDOWN_GRACE);
        let status = pending.await.expect("join").expect("request");
        assert_eq!(status, 503);
    }

    #[tokio::test]
    async fn mint_app_token_follows_client_version() {
        let issuer = start().await;
        let v2 = issuer
            .mint_app_token(TENANT, &v2_client(), &format!("api://{API_GUID}"))
            .expect("mint");
        let claims = decode_part(&v2, 1);
        assert_eq!(claims["aud"], API_GUID);
        assert_eq!(claims["ver"], "2.0");
        let other = issuer
            .mint_app_token(TENANT, &v2_client(), "https://contoso.example/api/.default")
            .expect("mint");
        assert_eq!(decode_part(&other, 1)["aud"], "https://contoso.example/api");
        let v1 = issuer
            .mint_app_token(
                "some-other-tenant",
                &v1_client(),
                &format!("api://{API_GUID}"),
            )
            .expect("mint");
        let claims = decode_part(&v1, 1);
        assert_eq!(claims["aud"], format!("api://{API_GUID}"));
        assert_eq!(claims["iss"], "https://sts.windows.net/some-other-tenant/");
        assert_eq!(claims["tid"], "some-other-tenant");
        assert_eq!(claims["idp"], claims["iss"]);
        issuer.shutdown().await;
    }

    #[tokio::test]
    async fn refuses_non_loopback_and_bad_config() {
        for addr in ["0.0.0.0:0", "10.1.2.3:8080", "[::]:0"] {
            let addr: SocketAddr = addr.parse().expect("addr");
            let err = DevIssuer::start(DevIssuerConfig {
                addr,
                ..DevIssuerConfig::default()
            })
            .await
            .expect_err("non-loopback refused");
            assert!(matches!(err, DevIssuerError::NotLoopback(a) if a == addr));
        }
        let dup = DevTenant {
            tenant_id: TENANT.into(),
            clients: Vec::new(),
        };
        let err = DevIssuer::start(DevIssuerConfig {
            tenants: vec![dup.clone(), dup],
            ..DevIssuerConfig::default()
        })
        .await
        .expect_err("duplicate tenant refused");
        assert!(matches!(err, DevIssuerError::InvalidConfig(_)));
    }

    #[test]
    fn debug_redacts_client_secret() {
        let printed = format!("{:?}", v2_client());
        assert!(!printed.contains("v2-secret"));
        assert!(printed.contains("<redacted>"));
    }
}
