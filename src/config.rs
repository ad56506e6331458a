//! Configuration: the YAML file, flags and environment variables (each flag has one), and the settings
//! of Microsoft Community Training's service auth (`ServiceAuth*`), resolved into one `Settings`.
//!
//! Precedence, highest first: flag or its `S2S_AUTHZ_*` variable, the MCT variables, the file, defaults.

use crate::core::DecisionSettings;
use crate::core::ids::{ClientAppId, ObjectId, SpiffeId, TenantId, is_guid};
use crate::core::registry::{
    AppEntry, AppEntryKind, ApplicationUser, Operation, RegistryError, RegistryParts,
    RegistrySnapshot, Route, SecurityRole, User,
};
use crate::core::trust::{AppOnlyRule, Audiences, OidcProfile};
use crate::devissuer::{DevClient, DevIssuerConfig, DevTenant, TokenVersion};
use crate::directory::OidcIssuer;
use crate::jwks::KeySettings;
use crate::store::DatabaseUrl;
use crate::tls::{TlsFiles, TlsSettings};
use jsonwebtoken::{Algorithm, AlgorithmFamily};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// The development setup the README's first command runs (`serve --dev-issuer` without `--config`).
pub const EMBEDDED_DEV_CONFIG: &str = include_str!("../deploy/local/s2s-authz.yaml");

pub const DEFAULT_GRPC_ADDR: &str = "127.0.0.1:50051";
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:50052";
/// The app role admin tokens must carry unless configured otherwise.
pub const DEFAULT_ADMIN_ROLE: &str = "S2SAuthz.Admin";
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";
pub const DEFAULT_DEV_ISSUER_ADDR: &str = "127.0.0.1:8400";
pub const DEFAULT_INSTANCE: &str = "https://login.microsoftonline.com/";
pub const DEFAULT_DATA_DIR: &str = "s2s-authz-data";
/// A decision waits at most `unknown_kid_wait` (100 ms) and an admin write one transaction, so 10 s is
/// ample for in-flight calls, and well inside Kubernetes' default 30 s termination grace period.
pub const DEFAULT_DRAIN_TIMEOUT_SECS: u64 = 10;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading `{path}`: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing `{path}`: {message}")]
    Yaml { path: String, message: String },
    #[error("`{field}`: {message}")]
    Invalid { field: String, message: String },
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// The YAML file. Every field is optional; unknown fields are errors (a typo must not silently weaken policy).
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    /// Directory of the registry store.
    pub data_dir: Option<PathBuf>,
    /// PostgreSQL URL of a registry store shared by a fleet (instead of SQLite in `data_dir`).
    pub database_url: Option<String>,
    /// How often a shared store is re-read in full, besides its change notices.
    pub registry_resync_secs: Option<u64>,
    /// On SIGTERM, how long in-flight calls may take to finish before their connections are cut.
    pub drain_timeout_secs: Option<u64>,
    pub grpc_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    /// TLS (and mutual TLS) on the decision port.
    pub grpc_tls: Option<TlsFile>,
    /// TLS (and mutual TLS) on the admin port, configured on its own.
    pub admin_tls: Option<TlsFile>,
    /// How long a client may take to finish its TLS handshake before the connection is dropped.
    pub tls_handshake_timeout_ms: Option<u64>,
    pub auth: AuthFile,
    pub admin: AdminFile,
    pub keys: KeysFile,
    pub token_cache: TokenCacheFile,
    pub oidc_issuers: Vec<OidcIssuerFile>,
    pub security_roles: Vec<RoleFile>,
    pub app_entries: Vec<AppEntryFile>,
    pub users: Vec<UserFile>,
    pub routes: Vec<RouteFile>,
    pub dev_issuer: Option<DevIssuerFile>,
    pub telemetry: TelemetryFile,
}

/// Span export. The standard `OTEL_*` variables apply too (README, Observability).
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryFile {
    /// The OTLP collector's gRPC endpoint (`http://host:4317`); export is off without one.
    pub otlp_endpoint: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthFile {
    pub enabled: Option<bool>,
    pub instance: Option<String>,
    pub tenants: Vec<String>,
    pub audiences: Vec<String>,
    pub require_client_type: Option<bool>,
    pub clock_skew_secs: Option<u64>,
    pub algorithms: Vec<String>,
    /// Every app entry must name its `source_principals`, and every request must come from one of them.
    pub require_source_principal: Option<bool>,
}

/// A port's TLS material: PEM files, re-read when they change and on SIGHUP.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsFile {
    /// The certificate chain, leaf first.
    pub cert_file: Option<PathBuf>,
    /// The private key of the leaf certificate (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// CA certificates that sign client certificates: turns on mutual TLS.
    pub client_ca_file: Option<PathBuf>,
    /// Refuse clients without a certificate [default: true when `client_ca_file` is set].
    pub require_client_cert: Option<bool>,
}

/// Who may call the admin port.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminFile {
    /// Require a bearer token on admin calls. Default: only when the admin port is not on loopback;
    /// it cannot be turned off there.
    pub require_token: Option<bool>,
    /// The app role an admin token's `roles` must contain.
    pub role: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeysFile {
    pub refresh_interval_secs: Option<u64>,
    pub min_refresh_interval_secs: Option<u64>,
    pub max_staleness_secs: Option<u64>,
    pub fetch_timeout_ms: Option<u64>,
    pub max_document_bytes: Option<usize>,
    pub unknown_kid_wait_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenCacheFile {
    pub max_entries: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcIssuerFile {
    pub issuer: String,
    #[serde(default)]
    pub audiences: Vec<String>,
    #[serde(default = "default_app_id_claim")]
    pub app_id_claim: String,
    #[serde(default = "default_object_id_claim")]
    pub object_id_claim: String,
    #[serde(default = "default_roles_claim")]
    pub roles_claim: String,
    #[serde(default = "default_app_only")]
    pub app_only: AppOnlyRule,
    #[serde(default)]
    pub algorithms: Vec<String>,
}

fn default_app_id_claim() -> String {
    "client_id".to_owned()
}
fn default_object_id_claim() -> String {
    "sub".to_owned()
}
fn default_roles_claim() -> String {
    "roles".to_owned()
}
fn default_app_only() -> AppOnlyRule {
    AppOnlyRule::SubEqualsAppId
}
fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleFile {
    pub name: String,
    #[serde(default)]
    pub privileges: Vec<PrivilegeFile>,
    #[serde(default)]
    pub act_on_behalf: bool,
    #[serde(default)]
    pub builtin: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivilegeFile {
    pub resource: String,
    pub operations: Vec<Operation>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppEntryFile {
    pub name: String,
    pub tenant_id: String,
    #[serde(default)]
    pub client_app_id: Option<String>,
    #[serde(default)]
    pub object_id: Option<String>,
    /// Defaults to CLIENT_CREDENTIALS when a client app id is given, else MANAGED_IDENTITY.
    #[serde(default)]
    pub kind: Option<AppEntryKind>,
    #[serde(default)]
    pub required_role: Option<String>,
    #[serde(default = "yes")]
    pub enabled: bool,
    /// SPIFFE ids of the workloads this application may call from (Envoy's `source.principal`).
    #[serde(default)]
    pub source_principals: Vec<String>,
    pub application_user: AppUserFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppUserFile {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    pub security_role: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserFile {
    pub object_id: String,
    pub name: String,
    pub security_role: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub method: Option<String>,
    pub path: String,
    pub resource: String,
    pub operation: Operation,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevIssuerFile {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub addr: Option<SocketAddr>,
    #[serde(default)]
    pub token_lifetime_secs: Option<u64>,
    pub tenants: Vec<DevTenantFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevTenantFile {
    pub tenant_id: String,
    pub clients: Vec<DevClientFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevClientFile {
    pub client_id: String,
    pub client_secret: String,
    pub object_id: String,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default = "default_version")]
    pub token_version: TokenVersion,
}

fn default_version() -> TokenVersion {
    TokenVersion::V2
}

/// Flags (and their `S2S_AUTHZ_*` variables) of `s2s-authz serve`.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ServeArgs {
    /// YAML configuration file.
    #[arg(long, env = "S2S_AUTHZ_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory of the registry store (SQLite, created if missing) [default: ./s2s-authz-data].
    #[arg(long, env = "S2S_AUTHZ_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// PostgreSQL URL of a registry store shared by a fleet of sidecars, instead of SQLite
    /// (postgres://user:password@host:port/database). Prefer the variable: flags show in `ps`.
    #[arg(long, env = "S2S_AUTHZ_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// How often a shared (PostgreSQL) registry is re-read in full, besides its change notices [default: 30].
    #[arg(long, env = "S2S_AUTHZ_REGISTRY_RESYNC_SECS")]
    pub registry_resync_secs: Option<u64>,
    /// On SIGTERM or SIGINT, how long in-flight calls may take to finish [default: 10].
    #[arg(long, env = "S2S_AUTHZ_DRAIN_TIMEOUT_SECS")]
    pub drain_timeout_secs: Option<u64>,
    /// Decision port: native API, Envoy ext_authz, health, reflection [default: 127.0.0.1:50051].
    #[arg(long, env = "S2S_AUTHZ_GRPC_ADDR")]
    pub grpc_addr: Option<SocketAddr>,
    /// Administration port (loopback by default) [default: 127.0.0.1:50052].
    #[arg(long, env = "S2S_AUTHZ_ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,
    /// Prometheus `/metrics`, `/healthz` and `/readyz` [default: 127.0.0.1:9464].
    #[arg(long, env = "S2S_AUTHZ_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Decision port TLS: certificate chain (PEM, leaf first). With `--grpc-tls-key`, turns TLS on.
    #[arg(long, env = "S2S_AUTHZ_GRPC_TLS_CERT")]
    pub grpc_tls_cert: Option<PathBuf>,
    /// Decision port TLS: the certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "S2S_AUTHZ_GRPC_TLS_KEY")]
    pub grpc_tls_key: Option<PathBuf>,
    /// Decision port mutual TLS: CA certificates (PEM) that client certificates must chain to.
    #[arg(long, env = "S2S_AUTHZ_GRPC_TLS_CLIENT_CA")]
    pub grpc_tls_client_ca: Option<PathBuf>,
    /// Decision port mutual TLS: refuse clients without a certificate [default: true with a client CA].
    #[arg(long, env = "S2S_AUTHZ_GRPC_TLS_REQUIRE_CLIENT_CERT")]
    pub grpc_tls_require_client_cert: Option<bool>,
    /// Admin port TLS: certificate chain (PEM, leaf first). With `--admin-tls-key`, turns TLS on.
    #[arg(long, env = "S2S_AUTHZ_ADMIN_TLS_CERT")]
    pub admin_tls_cert: Option<PathBuf>,
    /// Admin port TLS: the certificate's private key (PEM).
    #[arg(long, env = "S2S_AUTHZ_ADMIN_TLS_KEY")]
    pub admin_tls_key: Option<PathBuf>,
    /// Admin port mutual TLS: CA certificates (PEM) that client certificates must chain to.
    #[arg(long, env = "S2S_AUTHZ_ADMIN_TLS_CLIENT_CA")]
    pub admin_tls_client_ca: Option<PathBuf>,
    /// Admin port mutual TLS: refuse clients without a certificate [default: true with a client CA].
    #[arg(long, env = "S2S_AUTHZ_ADMIN_TLS_REQUIRE_CLIENT_CERT")]
    pub admin_tls_require_client_cert: Option<bool>,
    /// How long a client may take to complete its TLS handshake [default: 10000].
    #[arg(long, env = "S2S_AUTHZ_TLS_HANDSHAKE_TIMEOUT_MS")]
    pub tls_handshake_timeout_ms: Option<u64>,
    /// Start the built-in development issuer (loopback only). Without `--config`, the embedded
    /// development configuration (deploy/local/s2s-authz.yaml) is used.
    #[arg(long, env = "S2S_AUTHZ_DEV_ISSUER")]
    pub dev_issuer: bool,
    /// Address of the development issuer [default: 127.0.0.1:8400].
    #[arg(long, env = "S2S_AUTHZ_DEV_ISSUER_ADDR")]
    pub dev_issuer_addr: Option<SocketAddr>,
    /// Entra authority host [default: https://login.microsoftonline.com/].
    #[arg(long, env = "S2S_AUTHZ_INSTANCE")]
    pub instance: Option<String>,
    /// Trusted tenant ids (or domain names), `;` or `,` separated.
    #[arg(long, env = "S2S_AUTHZ_TENANTS")]
    pub tenants: Option<String>,
    /// Accepted audiences, `;` or `,` separated.
    #[arg(long, env = "S2S_AUTHZ_AUDIENCES")]
    pub audiences: Option<String>,
    /// Require header `clienttype: service` (always on under the MCT settings).
    #[arg(long, env = "S2S_AUTHZ_REQUIRE_CLIENT_TYPE")]
    pub require_client_type: Option<bool>,
    /// Require every app entry to name its source principals (SPIFFE ids) and every request to come
    /// from one of them (Envoy's `source.principal`) [default: false; entries that name source
    /// principals are always held to them].
    #[arg(long, env = "S2S_AUTHZ_REQUIRE_SOURCE_PRINCIPAL")]
    pub require_source_principal: Option<bool>,
    /// Allowed clock skew for `exp`/`nbf` [default: 300].
    #[arg(long, env = "S2S_AUTHZ_CLOCK_SKEW_SECS")]
    pub clock_skew_secs: Option<u64>,
    /// Background key refresh period [default: 3600].
    #[arg(long, env = "S2S_AUTHZ_KEY_REFRESH_SECS")]
    pub key_refresh_secs: Option<u64>,
    /// Minimum interval between refreshes of one issuer's keys [default: 30].
    #[arg(long, env = "S2S_AUTHZ_MIN_KEY_REFRESH_SECS")]
    pub min_key_refresh_secs: Option<u64>,
    /// How long last-known-good keys serve while the issuer is unreachable [default: 86400].
    #[arg(long, env = "S2S_AUTHZ_MAX_KEY_STALENESS_SECS")]
    pub max_key_staleness_secs: Option<u64>,
    /// Timeout of discovery and JWKS fetches [default: 5000].
    #[arg(long, env = "S2S_AUTHZ_FETCH_TIMEOUT_MS")]
    pub fetch_timeout_ms: Option<u64>,
    /// Largest discovery or JWKS document accepted [default: 1048576].
    #[arg(long, env = "S2S_AUTHZ_MAX_DOCUMENT_BYTES")]
    pub max_document_bytes: Option<usize>,
    /// How long a request with an unknown `kid` waits for a key refresh [default: 100].
    #[arg(long, env = "S2S_AUTHZ_UNKNOWN_KID_WAIT_MS")]
    pub unknown_kid_wait_ms: Option<u64>,
    /// Verified-token cache size [default: 100000].
    #[arg(long, env = "S2S_AUTHZ_TOKEN_CACHE_ENTRIES")]
    pub token_cache_entries: Option<usize>,
    /// Require a bearer token with the admin app role on admin calls [default: only when the admin port
    /// is not on loopback, where it cannot be turned off].
    #[arg(long, env = "S2S_AUTHZ_ADMIN_REQUIRE_TOKEN")]
    pub admin_require_token: Option<bool>,
    /// The app role admin tokens must carry [default: S2SAuthz.Admin].
    #[arg(long, env = "S2S_AUTHZ_ADMIN_ROLE")]
    pub admin_role: Option<String>,
    /// Export spans over OTLP/gRPC to this collector (`http://host:4317`) [default: off, unless
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set].
    #[arg(long, env = "S2S_AUTHZ_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Log format: `text` or `json` (filter with `RUST_LOG`) [default: text].
    #[arg(long, env = "S2S_AUTHZ_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The settings of Microsoft Community Training's service auth, read from the environment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MctSettings {
    pub enabled: Option<bool>,
    pub audience: Option<String>,
    pub tenant_id: Option<String>,
    pub tenant_name: Option<String>,
    pub object_ids: Vec<String>,
    pub application_ids: Vec<String>,
    pub role: Option<String>,
    pub instance: Option<String>,
}

impl MctSettings {
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |k: &str| {
            var(k)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let enabled = match get("ServiceAuthEnabled") {
            None => None,
            Some(v) => Some(
                parse_bool(&v)
                    .ok_or_else(|| invalid("ServiceAuthEnabled", "must be true or false"))?,
            ),
        };
        Ok(MctSettings {
            enabled,
            audience: get("ServiceAuthAudience"),
            tenant_id: get("ServiceAuthTenantId"),
            tenant_name: get("ServiceAuthTenantName"),
            object_ids: get("ServiceObjectIds")
                .map(|v| split_list(&v))
                .unwrap_or_default(),
            application_ids: get("ServiceApplicationIds")
                .map(|v| split_list(&v))
                .unwrap_or_default(),
            role: get("ServiceAuthRole"),
            instance: get("ServiceAuthInstance"),
        })
    }

    /// Whether an MCT deployment is configured (then `clienttype: service` is required).
    pub fn active(&self) -> bool {
        self.audience.is_some()
            || self.tenant_id.is_some()
            || self.tenant_name.is_some()
            || !self.object_ids.is_empty()
            || !self.application_ids.is_empty()
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Some(true),
        "false" | "0" | "no" => Some(false),
        _ => None,
    }
}

/// Splits a `;`- (MCT) or `,`-separated list.
pub fn split_list(v: &str) -> Vec<String> {
    v.split([';', ','])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Everything the service needs, resolved and validated.
#[derive(Debug)]
pub struct Settings {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// TLS on the decision and admin ports (each optional), and the handshake timeout.
    pub tls: TlsSettings,
    pub decision: DecisionSettings,
    pub instance: String,
    pub tenants: BTreeSet<String>,
    pub oidc: Vec<OidcIssuer>,
    pub keys: KeySettings,
    pub fetch_timeout: Duration,
    pub max_document_bytes: usize,
    pub token_cache_entries: usize,
    /// The provisioned part of the registry alone, validated.
    pub registry: RegistrySnapshot,
    /// What configuration provisions (file and MCT variables): re-applied at every start and reload,
    /// read-only through the registry API.
    pub provisioned: RegistryParts,
    /// Where the registry store (SQLite) lives, unless `database_url` is set.
    pub data_dir: PathBuf,
    /// A PostgreSQL registry store shared by a fleet.
    pub database_url: Option<DatabaseUrl>,
    /// How often a shared store is re-read in full, besides its change notices.
    pub registry_resync: Duration,
    /// On shutdown, how long in-flight calls may take to finish before their connections are cut.
    pub drain_timeout: Duration,
    /// The app role admin calls need, when they need a token at all (`None`: loopback, unauthenticated).
    pub admin_role: Option<String>,
    pub dev_issuer: Option<DevIssuerConfig>,
    pub log_format: LogFormat,
    /// The OTLP collector spans go to, from the flag or the file (the `OTEL_*` variables are resolved
    /// with it by `telemetry::otlp_export`).
    pub otlp_endpoint: Option<String>,
}

/// Reads the file (if any) and resolves it with flags and the MCT variables.
pub fn load(args: &ServeArgs, mct: &MctSettings) -> Result<Settings, ConfigError> {
    let file = match &args.config {
        Some(path) => read_file(path)?,
        None if args.dev_issuer => {
            parse_yaml(EMBEDDED_DEV_CONFIG, "embedded development configuration")?
        }
        None => FileConfig::default(),
    };
    resolve(file, args, mct)
}

pub fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_owned(),
        source,
    })?;
    parse_yaml(&text, &path.display().to_string())
}

pub fn parse_yaml(text: &str, origin: &str) -> Result<FileConfig, ConfigError> {
    if text.trim().is_empty() {
        return Ok(FileConfig::default());
    }
    // The parser's message quotes the surrounding source lines, which may hold a client secret: keep
    // only its first line (what is wrong, and where).
    serde_saphyr::from_str(text).map_err(|e| ConfigError::Yaml {
        path: origin.to_owned(),
        message: e.to_string().lines().next().unwrap_or_default().to_owned(),
    })
}

fn secs(flag: Option<u64>, file: Option<u64>, default: u64) -> Duration {
    Duration::from_secs(flag.or(file).unwrap_or(default))
}

fn millis(flag: Option<u64>, file: Option<u64>, default: u64) -> Duration {
    Duration::from_millis(flag.or(file).unwrap_or(default))
}

fn addr(
    flag: Option<SocketAddr>,
    file: Option<SocketAddr>,
    default: &str,
    field: &str,
) -> Result<SocketAddr, ConfigError> {
    match flag.or(file) {
        Some(a) => Ok(a),
        None => default
            .parse()
            .map_err(|_| invalid(field, "bad default address")),
    }
}

fn algorithms(names: &[String], field: &str) -> Result<Vec<Algorithm>, ConfigError> {
    if names.is_empty() {
        return Ok(vec![Algorithm::RS256]);
    }
    names
        .iter()
        .map(|n| match Algorithm::from_str(n) {
            Ok(a) if a.family() != AlgorithmFamily::Hmac => Ok(a),
            Ok(_) => Err(invalid(
                field,
                format!("`{n}`: HMAC algorithms are never accepted"),
            )),
            Err(_) => Err(invalid(
                field,
                format!("`{n}` is not a JWS signature algorithm"),
            )),
        })
        .collect()
}

pub fn resolve(
    file: FileConfig,
    args: &ServeArgs,
    mct: &MctSettings,
) -> Result<Settings, ConfigError> {
    let dev_issuer = dev_issuer(&file, args)?;
    let instance = args
        .instance
        .clone()
        .or_else(|| mct.instance.clone())
        .or_else(|| file.auth.instance.clone())
        .or_else(|| dev_issuer.as_ref().map(|d| format!("http://{}/", d.addr)))
        .unwrap_or_else(|| DEFAULT_INSTANCE.to_owned());
    crate::fetch::check_url(&instance).map_err(|e| invalid("auth.instance", e.to_string()))?;

    let mut tenants: BTreeSet<String> = match (&args.tenants, &mct.tenant_id, &mct.tenant_name) {
        (Some(list), _, _) => split_list(list).into_iter().collect(),
        (None, Some(id), _) => BTreeSet::from([id.clone()]),
        (None, None, Some(name)) => BTreeSet::from([name.clone()]),
        (None, None, None) => file.auth.tenants.iter().cloned().collect(),
    };
    tenants = tenants.into_iter().map(|t| normalise_tenant(&t)).collect();

    let audiences: Vec<String> = match (&args.audiences, &mct.audience) {
        (Some(list), _) => split_list(list),
        (None, Some(list)) => split_list(list),
        (None, None) => file.auth.audiences.clone(),
    };
    let audiences = Audiences::new(&audiences);
    if audiences.is_empty() {
        return Err(invalid(
            "auth.audiences",
            "at least one audience is required (or ServiceAuthAudience)",
        ));
    }

    let require_client_type = mct.active()
        || args
            .require_client_type
            .or(file.auth.require_client_type)
            .unwrap_or(false);
    let decision = DecisionSettings {
        service_auth_enabled: mct.enabled.or(file.auth.enabled).unwrap_or(true),
        require_client_type,
        clock_skew_secs: i64::try_from(
            args.clock_skew_secs
                .or(file.auth.clock_skew_secs)
                .unwrap_or(300),
        )
        .map_err(|_| invalid("auth.clock_skew_secs", "too large"))?,
        audiences,
        algorithms: algorithms(&file.auth.algorithms, "auth.algorithms")?,
        require_source_principal: args
            .require_source_principal
            .or(file.auth.require_source_principal)
            .unwrap_or(false),
    };

    let keys = KeySettings {
        refresh_interval: secs(args.key_refresh_secs, file.keys.refresh_interval_secs, 3600),
        min_refresh_interval: secs(
            args.min_key_refresh_secs,
            file.keys.min_refresh_interval_secs,
            30,
        ),
        max_staleness: secs(
            args.max_key_staleness_secs,
            file.keys.max_staleness_secs,
            86_400,
        ),
        unknown_kid_wait: millis(args.unknown_kid_wait_ms, file.keys.unknown_kid_wait_ms, 100),
    };
    if keys.refresh_interval.is_zero() {
        return Err(invalid("keys.refresh_interval_secs", "must be positive"));
    }

    let mut oidc = Vec::new();
    for (i, o) in file.oidc_issuers.iter().enumerate() {
        let field = format!("oidc_issuers[{i}]");
        crate::fetch::check_url(&o.issuer).map_err(|e| invalid(&field, e.to_string()))?;
        oidc.push(OidcIssuer {
            issuer: o.issuer.clone(),
            profile: Arc::new(OidcProfile {
                app_id_claim: o.app_id_claim.clone(),
                object_id_claim: o.object_id_claim.clone(),
                roles_claim: o.roles_claim.clone(),
                app_only: o.app_only,
                audiences: Audiences::new(&o.audiences),
                algorithms: algorithms(&o.algorithms, &format!("{field}.algorithms"))?,
            }),
        });
    }

    let provisioned = provisioned_registry(&file, mct)?;
    let registry = RegistrySnapshot::from_parts(provisioned.clone())?;
    let data_dir = args
        .data_dir
        .clone()
        .or_else(|| file.data_dir.clone())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    let database_url = args
        .database_url
        .as_deref()
        .or(file.database_url.as_deref())
        .filter(|url| !url.trim().is_empty())
        .map(|url| DatabaseUrl::parse(url.trim()).map_err(|e| invalid("database_url", e)))
        .transpose()?;
    let registry_resync = secs(args.registry_resync_secs, file.registry_resync_secs, 30);
    if registry_resync.is_zero() {
        return Err(invalid("registry_resync_secs", "must be positive"));
    }

    let admin_addr = addr(
        args.admin_addr,
        file.admin_addr,
        DEFAULT_ADMIN_ADDR,
        "admin_addr",
    )?;
    // The registry API changes who is allowed: off loopback, every admin call needs a bearer token
    // with the admin app role, and that cannot be turned off.
    let require_token = args
        .admin_require_token
        .or(file.admin.require_token)
        .unwrap_or(!admin_addr.ip().is_loopback());
    if !require_token && !admin_addr.ip().is_loopback() {
        return Err(invalid(
            "admin.require_token",
            "cannot be false when the admin port is not on a loopback address",
        ));
    }
    let admin_role = match args.admin_role.as_deref().or(file.admin.role.as_deref()) {
        Some(role) if role.trim().is_empty() => {
            return Err(invalid("admin.role", "must not be empty"));
        }
        Some(role) => role.trim().to_owned(),
        None => DEFAULT_ADMIN_ROLE.to_owned(),
    };
    let admin_role = require_token.then_some(admin_role);
    let tls = TlsSettings {
        decision: tls_files(
            "grpc_tls",
            "--grpc-tls",
            file.grpc_tls.as_ref(),
            TlsArgs {
                cert: &args.grpc_tls_cert,
                key: &args.grpc_tls_key,
                client_ca: &args.grpc_tls_client_ca,
                require_client_cert: args.grpc_tls_require_client_cert,
            },
        )?,
        admin: tls_files(
            "admin_tls",
            "--admin-tls",
            file.admin_tls.as_ref(),
            TlsArgs {
                cert: &args.admin_tls_cert,
                key: &args.admin_tls_key,
                client_ca: &args.admin_tls_client_ca,
                require_client_cert: args.admin_tls_require_client_cert,
            },
        )?,
        handshake_timeout: millis(
            args.tls_handshake_timeout_ms,
            file.tls_handshake_timeout_ms,
            10_000,
        ),
    };
    if tls.handshake_timeout.is_zero() {
        return Err(invalid("tls_handshake_timeout_ms", "must be positive"));
    }
    let otlp_endpoint = args
        .otlp_endpoint
        .as_deref()
        .or(file.telemetry.otlp_endpoint.as_deref())
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(otlp_endpoint)
        .transpose()?;
    Ok(Settings {
        grpc_addr: addr(
            args.grpc_addr,
            file.grpc_addr,
            DEFAULT_GRPC_ADDR,
            "grpc_addr",
        )?,
        admin_addr,
        metrics_addr: addr(
            args.metrics_addr,
            file.metrics_addr,
            DEFAULT_METRICS_ADDR,
            "metrics_addr",
        )?,
        tls,
        decision,
        instance,
        tenants,
        oidc,
        keys,
        fetch_timeout: millis(args.fetch_timeout_ms, file.keys.fetch_timeout_ms, 5000),
        max_document_bytes: args
            .max_document_bytes
            .or(file.keys.max_document_bytes)
            .unwrap_or(1 << 20),
        token_cache_entries: args
            .token_cache_entries
            .or(file.token_cache.max_entries)
            .unwrap_or(100_000),
        registry,
        provisioned,
        data_dir,
        database_url,
        registry_resync,
        drain_timeout: secs(
            args.drain_timeout_secs,
            file.drain_timeout_secs,
            DEFAULT_DRAIN_TIMEOUT_SECS,
        ),
        admin_role,
        dev_issuer,
        log_format: args.log_format,
        otlp_endpoint,
    })
}

/// One port's TLS flags (each overrides the file's field of the same meaning).
struct TlsArgs<'a> {
    cert: &'a Option<PathBuf>,
    key: &'a Option<PathBuf>,
    client_ca: &'a Option<PathBuf>,
    require_client_cert: Option<bool>,
}

/// A port's TLS files from its section and flags: none at all is plaintext; a certificate needs its key
/// (and the other way round); mutual TLS needs a certificate, and requiring client certificates needs a
/// CA to check them against. The files themselves are read when the port opens.
fn tls_files(
    section: &str,
    flag: &str,
    file: Option<&TlsFile>,
    args: TlsArgs<'_>,
) -> Result<Option<TlsFiles>, ConfigError> {
    let empty = TlsFile::default();
    let file = file.unwrap_or(&empty);
    let pick = |arg: &Option<PathBuf>, file: &Option<PathBuf>| {
        arg.clone()
            .or_else(|| file.clone())
            .filter(|p| !p.as_os_str().is_empty())
    };
    let cert = pick(args.cert, &file.cert_file);
    let key = pick(args.key, &file.key_file);
    let client_ca = pick(args.client_ca, &file.client_ca_file);
    let require = args.require_client_cert.or(file.require_client_cert);
    let (cert, key) = match (cert, key) {
        (None, None) => {
            if client_ca.is_some() || require == Some(true) {
                return Err(invalid(
                    format!("{section}.cert_file"),
                    format!(
                        "mutual TLS needs the port's own certificate and key (`{flag}-cert`, `{flag}-key`)"
                    ),
                ));
            }
            return Ok(None);
        }
        (Some(_), None) => {
            return Err(invalid(
                format!("{section}.key_file"),
                format!("is required with a certificate (`{flag}-key`)"),
            ));
        }
        (None, Some(_)) => {
            return Err(invalid(
                format!("{section}.cert_file"),
                format!("is required with a private key (`{flag}-cert`)"),
            ));
        }
        (Some(cert), Some(key)) => (cert, key),
    };
    let require_client_cert = require.unwrap_or(client_ca.is_some());
    if require_client_cert && client_ca.is_none() {
        return Err(invalid(
            format!("{section}.require_client_cert"),
            format!(
                "needs `client_ca_file` (`{flag}-client-ca`) to check client certificates against"
            ),
        ));
    }
    Ok(Some(TlsFiles {
        cert,
        key,
        client_ca,
        require_client_cert,
    }))
}

/// An OTLP/gRPC collector endpoint: a plain `http://` URL with a host (TLS to the collector is not built
/// in: keep the collector on the node or on a trusted network).
fn otlp_endpoint(endpoint: &str) -> Result<String, ConfigError> {
    let field = "telemetry.otlp_endpoint";
    let url = reqwest::Url::parse(endpoint)
        .map_err(|e| invalid(field, format!("`{endpoint}` is not a URL ({e})")))?;
    match url.scheme() {
        "http" if url.host_str().is_some() => Ok(endpoint.to_owned()),
        "https" => Err(invalid(
            field,
            "TLS to the collector is not built in: use `http://` to a collector on the node or a trusted network",
        )),
        _ => Err(invalid(
            field,
            format!("`{endpoint}` must be an `http://host:port` URL"),
        )),
    }
}

fn normalise_tenant(t: &str) -> String {
    if is_guid(t) {
        t.to_ascii_lowercase()
    } else {
        t.to_owned()
    }
}

fn dev_issuer(file: &FileConfig, args: &ServeArgs) -> Result<Option<DevIssuerConfig>, ConfigError> {
    let section = file
        .dev_issuer
        .as_ref()
        .filter(|d| d.enabled || args.dev_issuer);
    let Some(section) = section else {
        if args.dev_issuer {
            return Err(invalid(
                "dev_issuer",
                "`--dev-issuer` needs a `dev_issuer` section in the configuration file",
            ));
        }
        return Ok(None);
    };
    let addr = match args.dev_issuer_addr.or(section.addr) {
        Some(a) => a,
        None => DEFAULT_DEV_ISSUER_ADDR
            .parse()
            .map_err(|_| invalid("dev_issuer.addr", "bad default"))?,
    };
    if !addr.ip().is_loopback() {
        return Err(invalid(
            "dev_issuer.addr",
            "the development issuer listens on loopback only",
        ));
    }
    Ok(Some(DevIssuerConfig {
        addr,
        token_lifetime: Duration::from_secs(section.token_lifetime_secs.unwrap_or(3600)),
        tenants: section
            .tenants
            .iter()
            .map(|t| DevTenant {
                tenant_id: normalise_tenant(&t.tenant_id),
                clients: t
                    .clients
                    .iter()
                    .map(|c| DevClient {
                        client_id: c.client_id.clone(),
                        client_secret: c.client_secret.clone(),
                        object_id: c.object_id.clone(),
                        roles: c.roles.clone(),
                        token_version: c.token_version,
                    })
                    .collect(),
            })
            .collect(),
    }))
}

/// A stable application-user id derived from the entry, so it survives restarts and reloads.
fn derived_user_id(entry: &AppEntry) -> String {
    let key = format!(
        "{}/{}/{}",
        entry.tenant_id,
        entry
            .client_app_id
            .as_ref()
            .map(ClientAppId::as_str)
            .unwrap_or_default(),
        entry
            .object_id
            .as_ref()
            .map(ObjectId::as_str)
            .unwrap_or_default()
    );
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, key.as_bytes()).to_string()
}

fn guid_field(value: &str, field: &str) -> Result<(), ConfigError> {
    if is_guid(value.trim()) {
        Ok(())
    } else {
        Err(invalid(field, "must be a GUID"))
    }
}

/// The entries, users, roles and routes that configuration provisions (file and MCT variables).
pub fn provisioned_registry(
    file: &FileConfig,
    mct: &MctSettings,
) -> Result<RegistryParts, ConfigError> {
    let mut roles: BTreeMap<String, SecurityRole> = BTreeMap::new();
    for r in &file.security_roles {
        let mut privileges: HashMap<String, BTreeSet<Operation>> = HashMap::new();
        for p in &r.privileges {
            privileges
                .entry(p.resource.clone())
                .or_default()
                .extend(p.operations.iter().copied());
        }
        if roles
            .insert(
                r.name.clone(),
                SecurityRole {
                    name: r.name.clone(),
                    privileges,
                    act_on_behalf: r.act_on_behalf,
                    builtin: r.builtin,
                },
            )
            .is_some()
        {
            return Err(RegistryError::DuplicateRole(r.name.clone()).into());
        }
    }
    let mut entries = Vec::new();
    let mut app_users = Vec::new();
    for (i, e) in file.app_entries.iter().enumerate() {
        let field = format!("app_entries[{i}]");
        if e.name.trim().is_empty() {
            return Err(invalid(format!("{field}.name"), "must not be empty"));
        }
        // Entra tenants are GUIDs; a generic OIDC issuer's URL plays the tenant's part, and its client
        // and object ids are whatever strings that provider uses.
        let entra = is_guid(e.tenant_id.trim());
        if !entra && crate::fetch::check_url(e.tenant_id.trim()).is_err() {
            return Err(invalid(
                format!("{field}.tenant_id"),
                "must be a tenant GUID, or the URL of a configured OIDC issuer (https, or http on loopback)",
            ));
        }
        for (name, value) in [
            ("client_app_id", &e.client_app_id),
            ("object_id", &e.object_id),
        ] {
            let Some(value) = value else { continue };
            let field = format!("{field}.{name}");
            if entra {
                guid_field(value, &field)?;
            } else if value.trim().is_empty() || value.len() > 256 {
                return Err(invalid(field, "must be 1 to 256 characters"));
            }
        }
        let kind = e.kind.unwrap_or(if e.client_app_id.is_some() {
            AppEntryKind::ClientCredentials
        } else {
            AppEntryKind::ManagedIdentity
        });
        let mut source_principals: Vec<SpiffeId> = Vec::with_capacity(e.source_principals.len());
        for (j, p) in e.source_principals.iter().enumerate() {
            let id = SpiffeId::parse(p).map_err(|err| {
                invalid(format!("{field}.source_principals[{j}]"), err.to_string())
            })?;
            if !source_principals.contains(&id) {
                source_principals.push(id);
            }
        }
        let entry = AppEntry {
            name: e.name.clone(),
            tenant_id: TenantId::new(&e.tenant_id),
            client_app_id: e.client_app_id.as_deref().map(ClientAppId::new),
            object_id: e.object_id.as_deref().map(ObjectId::new),
            kind,
            required_role: e.required_role.clone(),
            enabled: e.enabled,
            source_principals,
        };
        app_users.push(ApplicationUser {
            id: e
                .application_user
                .id
                .clone()
                .unwrap_or_else(|| derived_user_id(&entry)),
            name: e
                .application_user
                .name
                .clone()
                .unwrap_or_else(|| e.name.clone()),
            entry_name: e.name.clone(),
            security_role: e.application_user.security_role.clone(),
        });
        entries.push(entry);
    }

    // MCT: each listed application id and object id becomes an entry with its own application user,
    // holding a custom role named after ServiceAuthRole.
    if !mct.application_ids.is_empty() || !mct.object_ids.is_empty() {
        let Some(tenant) = &mct.tenant_id else {
            return Err(invalid(
                "ServiceAuthTenantId",
                "is required with ServiceApplicationIds or ServiceObjectIds",
            ));
        };
        guid_field(tenant, "ServiceAuthTenantId")?;
        let role_name = mct.role.clone().unwrap_or_else(|| "S2SAppRole".to_owned());
        if mct.role.is_none() && !mct.application_ids.is_empty() {
            return Err(invalid(
                "ServiceAuthRole",
                "is required with ServiceApplicationIds",
            ));
        }
        roles
            .entry(role_name.clone())
            .or_insert_with(|| SecurityRole {
                name: role_name.clone(),
                privileges: HashMap::new(),
                act_on_behalf: false,
                builtin: false,
            });
        for app in &mct.application_ids {
            guid_field(app, "ServiceApplicationIds")?;
            let entry = AppEntry {
                name: format!("mct-app-{}", app.to_ascii_lowercase()),
                tenant_id: TenantId::new(tenant),
                client_app_id: Some(ClientAppId::new(app)),
                object_id: None,
                kind: AppEntryKind::ClientCredentials,
                required_role: mct.role.clone(),
                enabled: true,
                source_principals: Vec::new(),
            };
            app_users.push(ApplicationUser {
                id: derived_user_id(&entry),
                name: entry.name.clone(),
                entry_name: entry.name.clone(),
                security_role: role_name.clone(),
            });
            entries.push(entry);
        }
        for oid in &mct.object_ids {
            guid_field(oid, "ServiceObjectIds")?;
            let entry = AppEntry {
                name: format!("mct-mi-{}", oid.to_ascii_lowercase()),
                tenant_id: TenantId::new(tenant),
                client_app_id: None,
                object_id: Some(ObjectId::new(oid)),
                kind: AppEntryKind::ManagedIdentity,
                required_role: None,
                enabled: true,
                source_principals: Vec::new(),
            };
            app_users.push(ApplicationUser {
                id: derived_user_id(&entry),
                name: entry.name.clone(),
                entry_name: entry.name.clone(),
                security_role: role_name.clone(),
            });
            entries.push(entry);
        }
    }

    let users = file
        .users
        .iter()
        .enumerate()
        .map(|(i, u)| {
            guid_field(&u.object_id, &format!("users[{i}].object_id"))?;
            Ok(User {
                object_id: ObjectId::new(&u.object_id),
                name: u.name.clone(),
                security_role: u.security_role.clone(),
            })
        })
        .collect::<Result<Vec<_>, ConfigError>>()?;
    let routes = file
        .routes
        .iter()
        .enumerate()
        .map(|(i, r)| Route {
            id: r.id.clone().unwrap_or_else(|| format!("config-route-{i}")),
            method: r.method.as_ref().map(|m| m.to_ascii_uppercase()),
            path: r.path.clone(),
            resource: r.resource.clone(),
            operation: r.operation,
        })
        .collect();
    let parts = RegistryParts {
        entries,
        app_users,
        roles: roles.into_values().collect(),
        users,
        routes,
    };
    // Validate now, so a bad file is refused at start or reload rather than at the first registry change.
    RegistrySnapshot::from_parts(parts.clone())?;
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TENANT: &str = "8f3c1d2e-5b6a-4c7d-9e8f-0a1b2c3d4e5f";
    const APP: &str = "0b1c2d3e-4f50-4a6b-8c7d-9e0f1a2b3c4d";
    const MI: &str = "5e6f7a8b-9c0d-4e1f-8a2b-3c4d5e6f7a8b";

    fn mct() -> MctSettings {
        let env: HashMap<&str, &str> = HashMap::from([
            ("ServiceAuthAudience", "api://mct-service"),
            ("ServiceAuthTenantId", TENANT),
            ("ServiceApplicationIds", APP),
            ("ServiceObjectIds", MI),
            ("ServiceAuthRole", "S2SAppRole"),
        ]);
        MctSettings::from_env(|k| env.get(k).map(|v| (*v).to_owned())).unwrap()
    }

    #[test]
    fn mct_variables_work_on_their_own() {
        let settings = resolve(FileConfig::default(), &ServeArgs::default(), &mct()).unwrap();
        assert!(settings.decision.require_client_type);
        assert!(settings.decision.service_auth_enabled);
        assert!(settings.decision.audiences.accepts("api://mct-service"));
        assert_eq!(settings.tenants, BTreeSet::from([TENANT.to_owned()]));
        assert_eq!(settings.instance, DEFAULT_INSTANCE);
        let t = TenantId::new(TENANT);
        let app = settings
            .registry
            .find_entry(&t, Some(&ClientAppId::new(APP)), None)
            .unwrap();
        assert_eq!(app.kind, AppEntryKind::ClientCredentials);
        assert_eq!(app.required_role.as_deref(), Some("S2SAppRole"));
        let mi = settings
            .registry
            .find_entry(&t, None, Some(&ObjectId::new(MI)))
            .unwrap();
        assert_eq!(mi.required_role, None);
        let user = settings.registry.application_user(&mi.name).unwrap();
        assert_eq!(user.security_role, "S2SAppRole");
    }

    #[test]
    fn service_auth_disabled_is_honoured_and_bad_values_refused() {
        let off =
            MctSettings::from_env(|k| (k == "ServiceAuthEnabled").then(|| "false".to_owned()))
                .unwrap();
        assert_eq!(off.enabled, Some(false));
        assert!(
            MctSettings::from_env(|k| (k == "ServiceAuthEnabled").then(|| "maybe".to_owned()))
                .is_err()
        );
    }

    #[test]
    fn the_embedded_dev_config_resolves() {
        let args = ServeArgs {
            dev_issuer: true,
            ..ServeArgs::default()
        };
        let settings = load(&args, &MctSettings::default()).unwrap();
        let dev = settings.dev_issuer.unwrap();
        assert!(dev.addr.ip().is_loopback());
        assert_eq!(settings.instance, format!("http://{}/", dev.addr));
        assert!(!settings.tenants.is_empty());
        assert!(!settings.registry.entries().is_empty());
    }

    #[test]
    fn the_otlp_endpoint_comes_from_the_flag_or_the_file_and_is_plain_http() {
        let resolve_with = |yaml: &str, flag: Option<&str>| {
            let file = parse_yaml(yaml, "t").unwrap();
            let args = ServeArgs {
                otlp_endpoint: flag.map(str::to_owned),
                ..ServeArgs::default()
            };
            resolve(file, &args, &MctSettings::default())
        };
        let base = "auth: {audiences: [x]}\n";
        assert_eq!(resolve_with(base, None).unwrap().otlp_endpoint, None);
        let file = format!("{base}telemetry: {{otlp_endpoint: \"http://collector:4317\"}}");
        let settings = resolve_with(&file, None).unwrap();
        assert_eq!(
            settings.otlp_endpoint.as_deref(),
            Some("http://collector:4317")
        );
        let settings = resolve_with(&file, Some("http://127.0.0.1:4317")).unwrap();
        assert_eq!(
            settings.otlp_endpoint.as_deref(),
            Some("http://127.0.0.1:4317")
        );
        for bad in ["https://collector:4317", "collector:4317", "http://"] {
            let err = resolve_with(base, Some(bad)).unwrap_err();
            assert!(
                err.to_string().contains("telemetry.otlp_endpoint"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn off_loopback_the_admin_port_always_needs_a_token_with_the_admin_role() {
        let resolve_yaml = |yaml: &str| {
            let file = parse_yaml(yaml, "t").unwrap();
            resolve(file, &ServeArgs::default(), &MctSettings::default())
        };
        let settings = resolve_yaml("auth: {audiences: [x]}").unwrap();
        assert_eq!(settings.admin_role, None, "loopback: no token by default");
        let settings = resolve_yaml("admin_addr: 0.0.0.0:50052\nauth: {audiences: [x]}").unwrap();
        assert_eq!(settings.admin_role.as_deref(), Some(DEFAULT_ADMIN_ROLE));
        let err = resolve_yaml(
            "admin_addr: 0.0.0.0:50052\nadmin: {require_token: false}\nauth: {audiences: [x]}",
        )
        .unwrap_err();
        assert!(err.to_string().contains("admin.require_token"), "{err}");
        let settings =
            resolve_yaml("admin: {require_token: true, role: Ops.Admin}\nauth: {audiences: [x]}")
                .unwrap();
        assert_eq!(settings.admin_role.as_deref(), Some("Ops.Admin"));
        assert!(resolve_yaml("admin: {role: ' '}\nauth: {audiences: [x]}").is_err());
    }

    #[test]
    fn tls_needs_a_certificate_with_its_key_and_mutual_tls_a_client_ca() {
        let resolve_yaml = |yaml: &str| {
            let file = parse_yaml(&format!("auth: {{audiences: [x]}}\n{yaml}"), "t").unwrap();
            resolve(file, &ServeArgs::default(), &MctSettings::default())
        };
        let settings = resolve_yaml("").unwrap();
        assert!(settings.tls.decision.is_none() && settings.tls.admin.is_none());
        assert_eq!(settings.tls.handshake_timeout, Duration::from_secs(10));
        let settings =
            resolve_yaml("grpc_tls: {cert_file: a.crt, key_file: a.key, client_ca_file: ca.crt}")
                .unwrap();
        let decision = settings.tls.decision.unwrap();
        assert!(
            decision.require_client_cert,
            "a client CA requires certificates by default"
        );
        assert_eq!(decision.client_ca.as_deref(), Some(Path::new("ca.crt")));
        let settings = resolve_yaml(
            "admin_tls: {cert_file: a.crt, key_file: a.key, client_ca_file: ca.crt, require_client_cert: false}\ntls_handshake_timeout_ms: 250",
        )
        .unwrap();
        assert!(!settings.tls.admin.unwrap().require_client_cert);
        assert_eq!(settings.tls.handshake_timeout, Duration::from_millis(250));
        for (yaml, field) in [
            ("grpc_tls: {cert_file: a.crt}", "grpc_tls.key_file"),
            ("admin_tls: {key_file: a.key}", "admin_tls.cert_file"),
            ("grpc_tls: {client_ca_file: ca.crt}", "grpc_tls.cert_file"),
            (
                "grpc_tls: {cert_file: a.crt, key_file: a.key, require_client_cert: true}",
                "grpc_tls.require_client_cert",
            ),
            ("tls_handshake_timeout_ms: 0", "tls_handshake_timeout_ms"),
            ("grpc_tls: {cert: a.crt}", "unknown field"),
        ] {
            let err = match parse_yaml(&format!("auth: {{audiences: [x]}}\n{yaml}"), "t") {
                Err(e) => e,
                Ok(file) => {
                    resolve(file, &ServeArgs::default(), &MctSettings::default()).unwrap_err()
                }
            };
            assert!(err.to_string().contains(field), "{yaml}: {err}");
        }
        // Flags override the file, field by field.
        let args = ServeArgs {
            admin_tls_cert: Some(PathBuf::from("flag.crt")),
            admin_tls_key: Some(PathBuf::from("flag.key")),
            ..ServeArgs::default()
        };
        let file = parse_yaml(
            "auth: {audiences: [x]}\nadmin_tls: {cert_file: file.crt, key_file: file.key}",
            "t",
        )
        .unwrap();
        let admin = resolve(file, &args, &MctSettings::default())
            .unwrap()
            .tls
            .admin
            .unwrap();
        assert_eq!(admin.cert, PathBuf::from("flag.crt"));
    }

    #[test]
    fn source_principals_are_spiffe_ids() {
        let entry = |principals: &str| {
            format!(
                "auth: {{audiences: [x]}}\nsecurity_roles: [{{name: R}}]\napp_entries:\n  - name: e\n    tenant_id: {TENANT}\n    client_app_id: {APP}\n    source_principals: {principals}\n    application_user: {{security_role: R}}\n"
            )
        };
        let resolved = |yaml: String| {
            resolve(
                parse_yaml(&yaml, "t").unwrap(),
                &ServeArgs::default(),
                &MctSettings::default(),
            )
        };
        let settings = resolved(entry(
            "['spiffe://Cluster.Local/ns/a/sa/a', 'spiffe://cluster.local/ns/a/sa/a']",
        ))
        .unwrap();
        let e = &settings.registry.entries()[0];
        assert_eq!(
            e.source_principals,
            [SpiffeId::parse("spiffe://cluster.local/ns/a/sa/a").unwrap()]
        );
        let err = resolved(entry("['spiffe://cluster.local/ns/a/sa/a', 'orders']")).unwrap_err();
        assert!(
            err.to_string()
                .contains("app_entries[0].source_principals[1]"),
            "{err}"
        );
        assert!(!settings.decision.require_source_principal);
    }

    #[test]
    fn key_and_shutdown_defaults_are_the_documented_ones_and_configurable() {
        let resolve_yaml = |yaml: &str, args: &ServeArgs| {
            let file = parse_yaml(yaml, "t").unwrap();
            resolve(file, args, &MctSettings::default()).unwrap()
        };
        let defaults = resolve_yaml("auth: {audiences: [x]}", &ServeArgs::default());
        // SPEC §3: last-known-good keys kept up to 24 h, minimum refresh interval 30 s, 5 s fetches.
        assert_eq!(defaults.keys.max_staleness, Duration::from_secs(86_400));
        assert_eq!(defaults.keys.min_refresh_interval, Duration::from_secs(30));
        assert_eq!(defaults.keys.unknown_kid_wait, Duration::from_millis(100));
        assert_eq!(defaults.fetch_timeout, Duration::from_secs(5));
        assert_eq!(defaults.max_document_bytes, 1 << 20);
        assert_eq!(defaults.drain_timeout, Duration::from_secs(10));

        let file = "auth: {audiences: [x]}\nkeys: {max_staleness_secs: 60}\ndrain_timeout_secs: 3";
        let configured = resolve_yaml(file, &ServeArgs::default());
        assert_eq!(configured.keys.max_staleness, Duration::from_secs(60));
        assert_eq!(configured.drain_timeout, Duration::from_secs(3));
        let flags = ServeArgs {
            drain_timeout_secs: Some(0),
            max_key_staleness_secs: Some(7),
            ..ServeArgs::default()
        };
        let overridden = resolve_yaml(file, &flags);
        assert_eq!(overridden.drain_timeout, Duration::ZERO);
        assert_eq!(overridden.keys.max_staleness, Duration::from_secs(7));
    }

    #[test]
    fn refuses_typos_hmac_and_plain_http() {
        assert!(parse_yaml("auth: {audience: [x]}", "t").is_err());
        let file = parse_yaml("auth: {audiences: [x], algorithms: [HS256]}", "t").unwrap();
        assert!(resolve(file, &ServeArgs::default(), &MctSettings::default()).is_err());
        let file = parse_yaml(
            "auth: {audiences: [x], instance: 'http://login.example/'}",
            "t",
        )
        .unwrap();
        assert!(resolve(file, &ServeArgs::default(), &MctSettings::default()).is_err());
        let file = parse_yaml("auth: {audiences: [x]}", "t").unwrap();
        let settings = resolve(file, &ServeArgs::default(), &MctSettings::default()).unwrap();
        assert!(!settings.decision.require_client_type);
        assert_eq!(settings.keys.min_refresh_interval, Duration::from_secs(30));
        assert_eq!(settings.max_document_bytes, 1 << 20);
    }
}
