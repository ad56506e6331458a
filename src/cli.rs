//! The command line: `s2s-authz serve` (with logging set up and signals handled) and `s2s-authz registry`.

use crate::config::{self, LogFormat, MctSettings, ServeArgs};
use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "s2s-authz",
    version,
    about = "Service-to-service authorization sidecar (Entra ID app tokens)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve decisions (native API and Envoy ext_authz) until SIGTERM or SIGINT; SIGHUP reloads.
    Serve(Box<ServeArgs>),
    /// Administer the registry over the admin API
    Registry(Box<crate::registry_cli::RegistryArgs>),
}

pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Registry(args) => crate::registry_cli::run(*args),
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

fn load(args: &ServeArgs) -> Result<config::Settings, String> {
    let mct = MctSettings::from_env(|k| std::env::var(k).ok()).map_err(|e| e.to_string())?;
    config::load(args, &mct).map_err(|e| e.to_string())
}

fn serve(args: ServeArgs) -> ExitCode {
    init_logging(args.log_format);
    let settings = match load(&args) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        // Installed before the ports open: a signal that arrives during start-up must not take the
        // default action (SIGHUP would kill the process).
        let mut signals = match Signals::install() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot install signal handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
        let running = match crate::server::start(settings).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("cannot start: {e}");
                return ExitCode::FAILURE;
            }
        };
        signals.wait_for_stop(&running, &args).await;
        tracing::info!("shutting down: draining in-flight calls");
        running.shutdown().await;
        ExitCode::SUCCESS
    })
}

#[cfg(unix)]
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Returns on SIGTERM or SIGINT; reloads the configuration on SIGHUP.
    async fn wait_for_stop(&mut self, running: &crate::server::Running, args: &ServeArgs) {
        loop {
            tokio::select! {
                _ = self.term.recv() => return,
                _ = self.int.recv() => return,
                _ = self.hup.recv() => match load(args) {
                    Ok(settings) => {
                        if let Err(e) = running.reload(&settings).await {
                            tracing::error!("reload refused, keeping the current configuration: {e}");
                        }
                    }
                    // A bad edit must not take the allowlist down: keep serving the last good one.
                    Err(e) => tracing::error!("reload refused, keeping the current configuration: {e}"),
                },
            }
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn install() -> std::io::Result<Self> {
        Ok(Signals)
    }

    async fn wait_for_stop(&mut self, _running: &crate::server::Running, _args: &ServeArgs) {
        let _ = tokio::signal::ctrl_c().await;
    }
}
