//! `s2s-authz registry …`: administer the registry over the admin API (gRPC), as an admin's tasks.
//!
//! Output is an aligned table by default and JSON with `--json`. `export` writes everything not
//! provisioned from configuration as YAML shaped like the config file's sections; `import` creates it
//! again, skipping what already exists.

use crate::proto::s2sauthz::v1 as pb;
use crate::proto::s2sauthz::v1::registry_client::RegistryClient;
use clap::{ArgGroup, Args, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

#[derive(Debug, Args)]
pub struct RegistryArgs {
    /// The admin API's address: host:port, http://host:port, or https://host:port for a TLS admin port
    /// (host:port is TLS too when a TLS option below is given).
    #[arg(
        long,
        env = "S2S_AUTHZ_ADMIN_ADDR",
        default_value = "127.0.0.1:50052",
        global = true
    )]
    pub admin_addr: String,
    /// Bearer token for admin calls (needed when the admin port requires one): an access token for the
    /// sidecar's audience whose `roles` hold the admin app role. Prefer the variable: flags show in `ps`.
    #[arg(
        long,
        env = "S2S_AUTHZ_ADMIN_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub token: Option<AdminToken>,
    /// CA certificates (PEM) that sign the admin port's TLS certificate [default: the system's roots].
    #[arg(long, env = "S2S_AUTHZ_ADMIN_CA", global = true)]
    pub admin_ca: Option<PathBuf>,
    /// Client certificate chain (PEM) for an admin port that requires mutual TLS; with
    /// `--admin-client-key`.
    #[arg(long, env = "S2S_AUTHZ_ADMIN_CLIENT_CERT", global = true)]
    pub admin_client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "S2S_AUTHZ_ADMIN_CLIENT_KEY", global = true)]
    pub admin_client_key: Option<PathBuf>,
    /// The name the admin port's certificate is checked against, when it is not the address's host.
    #[arg(long, env = "S2S_AUTHZ_ADMIN_SERVER_NAME", global = true)]
    pub admin_server_name: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: RegistryCommand,
}

#[derive(Debug, Subcommand)]
pub enum RegistryCommand {
    /// App entries: the allowlisted calling applications.
    #[command(subcommand)]
    Entries(EntriesCommand),
    /// Application users: the users app entries act as.
    #[command(subcommand)]
    Users(UsersCommand),
    /// Custom security roles.
    #[command(subcommand)]
    Roles(RolesCommand),
    /// Write everything not provisioned from configuration as YAML (config file sections).
    Export {
        /// Write here instead of stdout.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Create everything in an export file, skipping what already exists.
    Import {
        #[arg(long)]
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum EntriesCommand {
    /// List every app entry.
    List,
    /// Allowlist an application, with its application user.
    Add(AddEntry),
    /// Change an entry (fetches the current one and updates it with its etag).
    Edit(EditEntry),
    /// Remove an entry and its application user.
    Remove { name: String },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Kind {
    ClientCredentials,
    ManagedIdentity,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("identity").required(true).multiple(true).args(["client_app_id", "object_id"])))]
pub struct AddEntry {
    #[arg(long)]
    pub name: String,
    #[arg(long)]
    pub tenant_id: String,
    #[arg(long)]
    pub client_app_id: Option<String>,
    #[arg(long)]
    pub object_id: Option<String>,
    /// Defaults to client-credentials with --client-app-id, else managed-identity.
    #[arg(long, value_enum)]
    pub kind: Option<Kind>,
    /// App role the token's `roles` must contain.
    #[arg(long)]
    pub required_role: Option<String>,
    /// Create the entry disabled.
    #[arg(long)]
    pub disabled: bool,
    /// The application user's security role.
    #[arg(long)]
    pub security_role: String,
    /// The application user's name (defaults to the entry's).
    #[arg(long)]
    pub user_name: Option<String>,
    /// SPIFFE id of a workload the application may call from (Envoy's `source.principal`), e.g.
    /// spiffe://cluster.local/ns/orders/sa/orders; repeatable. None: any workload.
    #[arg(long = "source-principal")]
    pub source_principals: Vec<String>,
}

#[derive(Debug, Args)]
pub struct EditEntry {
    pub name: String,
    #[arg(long, conflicts_with = "disable")]
    pub enable: bool,
    #[arg(long)]
    pub disable: bool,
    /// The app role tokens must carry; "" for none.
    #[arg(long)]
    pub required_role: Option<String>,
    #[arg(long)]
    pub client_app_id: Option<String>,
    #[arg(long)]
    pub object_id: Option<String>,
    /// Replace the workloads the application may call from with these SPIFFE ids; repeatable.
    #[arg(long = "source-principal", conflicts_with = "clear_source_principals")]
    pub source_principals: Vec<String>,
    /// Let the application call from any workload again.
    #[arg(long)]
    pub clear_source_principals: bool,
}

#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// List every application user.
    List,
    /// Give an application user another security role.
    SetRole {
        id: String,
        #[arg(long)]
        security_role: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum RolesCommand {
    /// List every security role.
    List,
    /// Create a security role.
    Add {
        #[arg(long)]
        name: String,
        /// `resource:op,op` with ops among read, create, write, delete; repeatable.
        #[arg(long = "privilege")]
        privileges: Vec<String>,
        /// May act on behalf of users.
        #[arg(long)]
        act_on_behalf: bool,
    },
    /// Delete a security role.
    Remove { name: String },
}

#[derive(Debug)]
enum CliError {
    Status(tonic::Status),
    Other(String),
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        CliError::Status(s)
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Status(s) => {
                write!(f, "{}: {}", code_name(s.code()), s.message())?;
                // A call that failed below gRPC (a TLS alert: no or an unknown client certificate)
                // says why only in its causes.
                let mut last = s.message().to_owned();
                let mut source = std::error::Error::source(s);
                while let Some(cause) = source {
                    let text = cause.to_string();
                    if text != last {
                        write!(f, ": {text}")?;
                        last = text;
                    }
                    source = cause.source();
                }
                Ok(())
            }
            CliError::Other(m) => f.write_str(m),
        }
    }
}

type Result<T> = std::result::Result<T, CliError>;

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Runs one `registry` command; gRPC errors print as `error: <code>: <message>` and exit 1.
pub fn run(args: RegistryArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// An admin bearer token; never printed.
#[derive(Clone)]
pub struct AdminToken(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl std::str::FromStr for AdminToken {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let token = crate::core::decision::bearer_token(s);
        format!("Bearer {token}")
            .parse()
            .map(AdminToken)
            .map_err(|_| "the token must be printable ASCII".to_owned())
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// Adds `authorization` to every admin call when a token is given.
#[derive(Clone, Debug)]
pub struct WithToken(Option<AdminToken>);

impl tonic::service::Interceptor for WithToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        if let Some(AdminToken(value)) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type Admin = RegistryClient<tonic::service::interceptor::InterceptedService<Channel, WithToken>>;

/// How to reach a TLS admin port.
#[derive(Debug, Default)]
pub struct AdminTls {
    pub ca: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub server_name: Option<String>,
}

impl AdminTls {
    fn given(&self) -> bool {
        self.ca.is_some()
            || self.client_cert.is_some()
            || self.client_key.is_some()
            || self.server_name.is_some()
    }

    /// rustls through tonic (aws-lc-rs): the CA file or the system's roots, and the client identity
    /// for mutual TLS.
    fn client_config(&self) -> Result<ClientTlsConfig> {
        let read = |path: &PathBuf| {
            std::fs::read(path)
                .map_err(|e| CliError::Other(format!("cannot read {}: {e}", path.display())))
        };
        let mut config = ClientTlsConfig::new();
        config = match &self.ca {
            Some(ca) => config.ca_certificate(Certificate::from_pem(read(ca)?)),
            None => config.with_native_roots(),
        };
        match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => {
                config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            (None, None) => {}
            _ => {
                return Err(CliError::Other(
                    "--admin-client-cert and --admin-client-key go together".to_owned(),
                ));
            }
        }
        if let Some(name) = &self.server_name {
            config = config.domain_name(name.clone());
        }
        Ok(config)
    }
}

/// An error with its causes, which is where TLS failures (an unknown CA, a name mismatch) are said.
fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text
}

/// The admin API's URL: `https` when asked for by scheme, or by TLS options for a bare host:port.
fn admin_url(addr: &str, tls: &AdminTls) -> Result<String> {
    match addr.split_once("://") {
        Some(("https", _)) => Ok(addr.to_owned()),
        Some(("http", _)) if tls.given() => Err(CliError::Other(format!(
            "the TLS options need an https:// admin address, not {addr}"
        ))),
        Some(("http", _)) => Ok(addr.to_owned()),
        Some((scheme, _)) => Err(CliError::Other(format!(
            "invalid admin address {addr}: the scheme must be http or https, not `{scheme}`"
        ))),
        None if tls.given() => Ok(format!("https://{addr}")),
        None => Ok(format!("http://{addr}")),
    }
}

async fn connect(addr: &str, token: Option<AdminToken>, tls: &AdminTls) -> Result<Admin> {
    let url = admin_url(addr, tls)?;
    let https = url.starts_with("https://");
    let mut endpoint = Endpoint::from_shared(url)
        .map_err(|e| CliError::Other(format!("invalid admin address {addr}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30));
    if https {
        endpoint = endpoint
            .tls_config(tls.client_config()?)
            .map_err(|e| CliError::Other(format!("TLS for {addr}: {}", with_causes(&e))))?;
    }
    let channel = endpoint.connect().await.map_err(|e| {
        CliError::Other(format!(
            "cannot connect to the admin API at {addr}: {}",
            with_causes(&e)
        ))
    })?;
    Ok(RegistryClient::with_interceptor(channel, WithToken(token)))
}

async fn execute(args: RegistryArgs) -> Result<()> {
    let tls = AdminTls {
        ca: args.admin_ca.clone(),
        client_cert: args.admin_client_cert.clone(),
        client_key: args.admin_client_key.clone(),
        server_name: args.admin_server_name.clone(),
    };
    let mut c = connect(&args.admin_addr, args.token.clone(), &tls).await?;
    let json = args.json;
    match args.command {
        RegistryCommand::Entries(cmd) => entries(&mut c, cmd, json).await,
        RegistryCommand::Users(cmd) => users(&mut c, cmd, json).await,
        RegistryCommand::Roles(cmd) => roles(&mut c, cmd, json).await,
        RegistryCommand::Export { file } => {
            let text = export(&mut c).await?;
            match file {
                Some(path) => std::fs::write(&path, text)
                    .map_err(|e| CliError::Other(format!("cannot write {}: {e}", path.display()))),
                None => {
                    print!("{text}");
                    Ok(())
                }
            }
        }
        RegistryCommand::Import { file } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| CliError::Other(format!("cannot read {}: {e}", file.display())))?;
            import(&mut c, &text).await
        }
    }
}

/// Every item of a List RPC, page by page.
macro_rules! list_all {
    ($client:expr, $method:ident, $field:ident) => {{
        let mut out = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = $client
                .$method(pb::ListRequest {
                    page_size: 1000,
                    page_token,
                })
                .await?
                .into_inner();
            out.extend(page.$field);
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        out
    }};
}

// ---- views (JSON and tables) ----

fn kind_str(kind: i32) -> &'static str {
    match pb::AppEntryKind::try_from(kind) {
        Ok(pb::AppEntryKind::ClientCredentials) => "CLIENT_CREDENTIALS",
        Ok(pb::AppEntryKind::ManagedIdentity) => "MANAGED_IDENTITY",
        _ => "UNSPECIFIED",
    }
}

fn kind_from_str(s: &str) -> Result<pb::AppEntryKind> {
    match s.trim().to_ascii_uppercase().replace('-', "_").as_str() {
        "CLIENT_CREDENTIALS" => Ok(pb::AppEntryKind::ClientCredentials),
        "MANAGED_IDENTITY" => Ok(pb::AppEntryKind::ManagedIdentity),
        _ => Err(CliError::Other(format!(
            "unknown kind `{s}` (client-credentials or managed-identity)"
        ))),
    }
}

fn op_str(op: i32) -> &'static str {
    match pb::Operation::try_from(op) {
        Ok(pb::Operation::Read) => "read",
        Ok(pb::Operation::Create) => "create",
        Ok(pb::Operation::Write) => "write",
        Ok(pb::Operation::Delete) => "delete",
        _ => "unspecified",
    }
}

fn op_from_str(s: &str) -> Result<pb::Operation> {
    match s.trim().to_ascii_lowercase().as_str() {
        "read" => Ok(pb::Operation::Read),
        "create" => Ok(pb::Operation::Create),
        "write" => Ok(pb::Operation::Write),
        "delete" => Ok(pb::Operation::Delete),
        _ => Err(CliError::Other(format!(
            "unknown operation `{s}` (read, create, write or delete)"
        ))),
    }
}

#[derive(Serialize)]
struct EntryView<'a> {
    name: &'a str,
    tenant_id: &'a str,
    client_app_id: &'a str,
    object_id: &'a str,
    kind: &'static str,
    required_role: &'a str,
    enabled: bool,
    source_principals: &'a [String],
    etag: &'a str,
    provisioned: bool,
}

impl<'a> From<&'a pb::AppEntry> for EntryView<'a> {
    fn from(e: &'a pb::AppEntry) -> Self {
        EntryView {
            name: &e.name,
            tenant_id: &e.tenant_id,
            client_app_id: &e.client_app_id,
            object_id: &e.object_id,
            kind: kind_str(e.kind),
            required_role: &e.required_role,
            enabled: e.enabled,
            source_principals: &e.source_principals,
            etag: &e.etag,
            provisioned: e.provisioned,
        }
    }
}

#[derive(Serialize)]
struct AppUserView<'a> {
    id: &'a str,
    name: &'a str,
    app_entry: &'a str,
    security_role: &'a str,
    etag: &'a str,
    provisioned: bool,
}

impl<'a> From<&'a pb::ApplicationUser> for AppUserView<'a> {
    fn from(u: &'a pb::ApplicationUser) -> Self {
        AppUserView {
            id: &u.id,
            name: &u.name,
            app_entry: &u.app_entry,
            security_role: &u.security_role,
            etag: &u.etag,
            provisioned: u.provisioned,
        }
    }
}

#[derive(Serialize)]
struct RoleView<'a> {
    name: &'a str,
    privileges: Vec<PrivilegeDoc>,
    act_on_behalf: bool,
    builtin: bool,
    etag: &'a str,
    provisioned: bool,
}

impl<'a> From<&'a pb::SecurityRole> for RoleView<'a> {
    fn from(r: &'a pb::SecurityRole) -> Self {
        RoleView {
            name: &r.name,
            privileges: privileges_doc(&r.privileges),
            act_on_behalf: r.act_on_behalf,
            builtin: r.builtin,
            etag: &r.etag,
            provisioned: r.provisioned,
        }
    }
}

fn privileges_doc(privileges: &[pb::Privilege]) -> Vec<PrivilegeDoc> {
    privileges
        .iter()
        .map(|p| PrivilegeDoc {
            resource: p.resource.clone(),
            operations: p.operations.iter().map(|o| op_str(*o).to_owned()).collect(),
        })
        .collect()
}

fn print_json<T: Serialize + ?Sized>(value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| CliError::Other(format!("cannot encode JSON: {e}")))?;
    println!("{text}");
    Ok(())
}

/// Prints rows under headers, columns aligned, two spaces apart.
fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i > 0 {
                out.push_str("  ");
            }
            out.push_str(cell);
            let pad = w.saturating_sub(cell.chars().count());
            out.extend(std::iter::repeat_n(' ', pad));
        }
        println!("{}", out.trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_owned()
    } else {
        s.to_owned()
    }
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_owned()
}

fn show_entries(entries: &[pb::AppEntry], json: bool) -> Result<()> {
    if json {
        return print_json(&entries.iter().map(EntryView::from).collect::<Vec<_>>());
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                e.name.clone(),
                e.tenant_id.clone(),
                kind_str(e.kind).to_owned(),
                dash(&e.client_app_id),
                dash(&e.object_id),
                dash(&e.required_role),
                yes_no(e.enabled),
                yes_no(e.provisioned),
                dash(&e.source_principals.join(" ")),
            ]
        })
        .collect();
    print_table(
        &[
            "NAME",
            "TENANT",
            "KIND",
            "CLIENT APP ID",
            "OBJECT ID",
            "REQUIRED ROLE",
            "ENABLED",
            "PROVISIONED",
            "SOURCE PRINCIPALS",
        ],
        &rows,
    );
    Ok(())
}

fn show_users(users: &[pb::ApplicationUser], json: bool) -> Result<()> {
    if json {
        return print_json(&users.iter().map(AppUserView::from).collect::<Vec<_>>());
    }
    let rows: Vec<Vec<String>> = users
        .iter()
        .map(|u| {
            vec![
                u.id.clone(),
                u.name.clone(),
                u.app_entry.clone(),
                u.security_role.clone(),
                yes_no(u.provisioned),
            ]
        })
        .collect();
    print_table(
        &["ID", "NAME", "APP ENTRY", "SECURITY ROLE", "PROVISIONED"],
        &rows,
    );
    Ok(())
}

fn show_roles(roles: &[pb::SecurityRole], json: bool) -> Result<()> {
    if json {
        return print_json(&roles.iter().map(RoleView::from).collect::<Vec<_>>());
    }
    let rows: Vec<Vec<String>> = roles
        .iter()
        .map(|r| {
            let privileges = privileges_doc(&r.privileges)
                .iter()
                .map(|p| format!("{}:{}", p.resource, p.operations.join(",")))
                .collect::<Vec<_>>()
                .join(" ");
            vec![
                r.name.clone(),
                dash(&privileges),
                yes_no(r.act_on_behalf),
                yes_no(r.builtin),
                yes_no(r.provisioned),
            ]
        })
        .collect();
    print_table(
        &[
            "NAME",
            "PRIVILEGES",
            "ACT ON BEHALF",
            "BUILTIN",
            "PROVISIONED",
        ],
        &rows,
    );
    Ok(())
}

fn removed(kind: &str, key: &str, json: bool) -> Result<()> {
    if json {
        print_json(&serde_json::json!({ "removed": kind, "key": key }))
    } else {
        println!("removed {kind} {key}");
        Ok(())
    }
}

// ---- commands ----

async fn get_entry(c: &mut Admin, name: &str) -> Result<pb::AppEntry> {
    Ok(c.get_app_entry(pb::GetRequest {
        key: name.to_owned(),
    })
    .await?
    .into_inner())
}

async fn entries(c: &mut Admin, cmd: EntriesCommand, json: bool) -> Result<()> {
    match cmd {
        EntriesCommand::List => {
            let all = list_all!(c, list_app_entries, app_entries);
            show_entries(&all, json)
        }
        EntriesCommand::Add(a) => {
            let kind = match a.kind {
                Some(Kind::ClientCredentials) => pb::AppEntryKind::ClientCredentials,
                Some(Kind::ManagedIdentity) => pb::AppEntryKind::ManagedIdentity,
                None if a.client_app_id.is_some() => pb::AppEntryKind::ClientCredentials,
                None => pb::AppEntryKind::ManagedIdentity,
            };
            let entry = pb::AppEntry {
                name: a.name,
                tenant_id: a.tenant_id,
                client_app_id: a.client_app_id.unwrap_or_default(),
                object_id: a.object_id.unwrap_or_default(),
                kind: kind as i32,
                required_role: a.required_role.unwrap_or_default(),
                enabled: !a.disabled,
                source_principals: a.source_principals,
                ..Default::default()
            };
            let created = c
                .create_app_entry(pb::CreateAppEntryRequest {
                    entry: Some(entry),
                    application_user_name: a.user_name.unwrap_or_default(),
                    security_role: a.security_role,
                })
                .await?
                .into_inner();
            show_entries(&[created], json)
        }
        EntriesCommand::Edit(e) => {
            let mut entry = get_entry(c, &e.name).await?;
            if e.enable {
                entry.enabled = true;
            }
            if e.disable {
                entry.enabled = false;
            }
            if let Some(r) = e.required_role {
                entry.required_role = r;
            }
            if let Some(a) = e.client_app_id {
                entry.client_app_id = a;
            }
            if let Some(o) = e.object_id {
                entry.object_id = o;
            }
            if e.clear_source_principals {
                entry.source_principals.clear();
            } else if !e.source_principals.is_empty() {
                entry.source_principals = e.source_principals;
            }
            let updated = c
                .update_app_entry(pb::UpdateAppEntryRequest { entry: Some(entry) })
                .await?
                .into_inner();
            show_entries(&[updated], json)
        }
        EntriesCommand::Remove { name } => {
            let entry = get_entry(c, &name).await?;
            c.delete_app_entry(pb::DeleteRequest {
                key: name.clone(),
                etag: entry.etag,
            })
            .await?;
            removed("entry", &name, json)
        }
    }
}

async fn users(c: &mut Admin, cmd: UsersCommand, json: bool) -> Result<()> {
    match cmd {
        UsersCommand::List => {
            let all = list_all!(c, list_application_users, application_users);
            show_users(&all, json)
        }
        UsersCommand::SetRole { id, security_role } => {
            let mut user = c
                .get_application_user(pb::GetRequest { key: id })
                .await?
                .into_inner();
            user.security_role = security_role;
            let updated = c
                .update_application_user(pb::UpdateApplicationUserRequest {
                    application_user: Some(user),
                })
                .await?
                .into_inner();
            show_users(&[updated], json)
        }
    }
}

/// Parses `resource:op,op`.
fn privilege(spec: &str) -> Result<pb::Privilege> {
    let (resource, ops) = spec.split_once(':').ok_or_else(|| {
        CliError::Other(format!(
            "privilege `{spec}` must look like resource:read,write"
        ))
    })?;
    let operations = ops
        .split(',')
        .filter(|o| !o.trim().is_empty())
        .map(|o| op_from_str(o).map(|o| o as i32))
        .collect::<Result<Vec<_>>>()?;
    Ok(pb::Privilege {
        resource: resource.trim().to_owned(),
        operations,
    })
}

async fn roles(c: &mut Admin, cmd: RolesCommand, json: bool) -> Result<()> {
    match cmd {
        RolesCommand::List => {
            let all = list_all!(c, list_security_roles, security_roles);
            show_roles(&all, json)
        }
        RolesCommand::Add {
            name,
            privileges,
            act_on_behalf,
        } => {
            let privileges = privileges
                .iter()
                .map(|p| privilege(p))
                .collect::<Result<Vec<_>>>()?;
            let created = c
                .create_security_role(pb::CreateSecurityRoleRequest {
                    security_role: Some(pb::SecurityRole {
                        name,
                        privileges,
                        act_on_behalf,
                        ..Default::default()
                    }),
                })
                .await?
                .into_inner();
            show_roles(&[created], json)
        }
        RolesCommand::Remove { name } => {
            let role = c
                .get_security_role(pb::GetRequest { key: name.clone() })
                .await?
                .into_inner();
            c.delete_security_role(pb::DeleteRequest {
                key: name.clone(),
                etag: role.etag,
            })
            .await?;
            removed("role", &name, json)
        }
    }
}

// ---- export / import ----

/// The config file's registry sections.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExportDoc {
    pub security_roles: Vec<RoleDoc>,
    pub app_entries: Vec<EntryDoc>,
    pub users: Vec<UserDoc>,
    pub routes: Vec<RouteDoc>,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleDoc {
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub privileges: Vec<PrivilegeDoc>,
    #[serde(default)]
    pub act_on_behalf: bool,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivilegeDoc {
    pub resource: String,
    pub operations: Vec<String>,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntryDoc {
    pub name: String,
    pub tenant_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_app_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub required_role: Option<String>,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_principals: Vec<String>,
    pub application_user: AppUserDoc,
}

fn yes() -> bool {
    true
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppUserDoc {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub security_role: String,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserDoc {
    pub object_id: String,
    pub name: String,
    pub security_role: String,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteDoc {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    pub path: String,
    pub resource: String,
    pub operation: String,
}

fn some(s: String) -> Option<String> {
    Some(s).filter(|s| !s.is_empty())
}

async fn export(c: &mut Admin) -> Result<String> {
    let mut roles = list_all!(c, list_security_roles, security_roles);
    let mut entries = list_all!(c, list_app_entries, app_entries);
    let app_users = list_all!(c, list_application_users, application_users);
    let mut users = list_all!(c, list_users, users);
    let mut routes = list_all!(c, list_routes, routes);
    roles.sort_by(|a, b| a.name.cmp(&b.name));
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    users.sort_by(|a, b| a.object_id.cmp(&b.object_id));
    routes.sort_by(|a, b| a.id.cmp(&b.id));

    let mut doc = ExportDoc::default();
    for r in roles.into_iter().filter(|r| !r.provisioned && !r.builtin) {
        doc.security_roles.push(RoleDoc {
            privileges: privileges_doc(&r.privileges),
            name: r.name,
            act_on_behalf: r.act_on_behalf,
        });
    }
    for e in entries.into_iter().filter(|e| !e.provisioned) {
        let user = app_users
            .iter()
            .find(|u| u.app_entry == e.name)
            .ok_or_else(|| CliError::Other(format!("entry {} has no application user", e.name)))?;
        doc.app_entries.push(EntryDoc {
            kind: Some(kind_str(e.kind).to_owned()),
            name: e.name,
            tenant_id: e.tenant_id,
            client_app_id: some(e.client_app_id),
            object_id: some(e.object_id),
            required_role: some(e.required_role),
            enabled: e.enabled,
            source_principals: e.source_principals,
            application_user: AppUserDoc {
                name: some(user.name.clone()),
                security_role: user.security_role.clone(),
            },
        });
    }
    for u in users.into_iter().filter(|u| !u.provisioned) {
        doc.users.push(UserDoc {
            object_id: u.object_id,
            name: u.name,
            security_role: u.security_role,
        });
    }
    for r in routes.into_iter().filter(|r| !r.provisioned) {
        doc.routes.push(RouteDoc {
            operation: op_str(r.operation).to_owned(),
            id: some(r.id),
            method: some(r.method),
            path: r.path,
            resource: r.resource,
        });
    }
    serde_saphyr::to_string(&doc).map_err(|e| CliError::Other(format!("cannot encode YAML: {e}")))
}

/// Creates one resource; an ALREADY_EXISTS answer is reported and skipped.
async fn create<T>(
    what: &str,
    key: &str,
    call: impl std::future::Future<Output = std::result::Result<T, tonic::Status>>,
) -> Result<()> {
    match call.await {
        Ok(_) => {
            eprintln!("created {what} {key}");
            Ok(())
        }
        Err(s) if s.code() == tonic::Code::AlreadyExists => {
            eprintln!("skipped {what} {key}: already exists");
            Ok(())
        }
        Err(s) => Err(CliError::Other(format!(
            "{what} {key}: {}",
            CliError::Status(s)
        ))),
    }
}

async fn import(c: &mut Admin, text: &str) -> Result<()> {
    let doc: ExportDoc = serde_saphyr::from_str(text)
        .map_err(|e| CliError::Other(format!("cannot parse the import file: {e}")))?;
    for r in doc.security_roles {
        let privileges = r
            .privileges
            .iter()
            .map(|p| {
                Ok(pb::Privilege {
                    resource: p.resource.clone(),
                    operations: p
                        .operations
                        .iter()
                        .map(|o| op_from_str(o).map(|o| o as i32))
                        .collect::<Result<Vec<_>>>()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let role = pb::SecurityRole {
            name: r.name.clone(),
            privileges,
            act_on_behalf: r.act_on_behalf,
            ..Default::default()
        };
        let call = c.create_security_role(pb::CreateSecurityRoleRequest {
            security_role: Some(role),
        });
        create("role", &r.name, call).await?;
    }
    for e in doc.app_entries {
        let kind = match &e.kind {
            Some(k) => kind_from_str(k)?,
            None if e.client_app_id.is_some() => pb::AppEntryKind::ClientCredentials,
            None => pb::AppEntryKind::ManagedIdentity,
        };
        let entry = pb::AppEntry {
            name: e.name.clone(),
            tenant_id: e.tenant_id,
            client_app_id: e.client_app_id.unwrap_or_default(),
            object_id: e.object_id.unwrap_or_default(),
            kind: kind as i32,
            required_role: e.required_role.unwrap_or_default(),
            enabled: e.enabled,
            source_principals: e.source_principals,
            ..Default::default()
        };
        let call = c.create_app_entry(pb::CreateAppEntryRequest {
            entry: Some(entry),
            application_user_name: e.application_user.name.unwrap_or_default(),
            security_role: e.application_user.security_role,
        });
        create("entry", &e.name, call).await?;
    }
    for u in doc.users {
        let key = u.object_id.clone();
        let call = c.create_user(pb::CreateUserRequest {
            user: Some(pb::User {
                object_id: u.object_id,
                name: u.name,
                security_role: u.security_role,
                ..Default::default()
            }),
        });
        create("user", &key, call).await?;
    }
    for r in doc.routes {
        let key =
            r.id.clone()
                .unwrap_or_else(|| format!("{} {}", r.method.as_deref().unwrap_or("*"), r.path));
        let call = c.create_route(pb::CreateRouteRequest {
            route: Some(pb::Route {
                id: r.id.unwrap_or_default(),
                method: r.method.unwrap_or_default(),
                path: r.path,
                resource: r.resource,
                operation: op_from_str(&r.operation)? as i32,
                ..Default::default()
            }),
        });
        create("route", &key, call).await?;
    }
    Ok(())
}
