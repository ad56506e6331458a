//! The command line: `s2s-authz serve` (with logging set up and signals handled) and `s2s-authz registry`.

use crate::config::{self, LogFormat, MctSettings, ServeArgs};
use crate::telemetry::{self, OtlpExport, TelemetryError, Tracing};
use crate::{log_format, log_writer};
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

/// Logs (and the audit line of every decision) go to stderr through `log_writer`: a request thread
/// formats its line and copies it into a shared buffer, and a thread of its own writes the buffer in
/// blocks, at most 20 ms after a line came. Written straight to stderr, every decision cost one
/// `write(2)` on the request path (about 7 µs of server CPU per hot Check, benches/README.md). Past
/// 8 MiB waiting, request threads wait rather than drop audit records. The returned guard writes the
/// rest when dropped: keep it until the process ends.
///
/// With `export`, spans also go to an OpenTelemetry collector (`telemetry`); that must be set up inside
/// the Tokio runtime the service runs on. Without it, spans are disabled at their callsites and the log
/// layer is filtered globally, exactly as it is without telemetry at all.
fn init_logging(
    format: LogFormat,
    export: Option<&OtlpExport>,
) -> (
    log_writer::LogGuard,
    Result<Option<Tracing>, TelemetryError>,
) {
    use tracing_subscriber::filter::{FilterExt as _, filter_fn};
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::{Layer as _, Registry};
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = log_writer::stderr();
    let Some(export) = export else {
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(filter_fn(telemetry::logged))
            .with(log_layer(format, writer, ansi))
            .try_init();
        return (guard, Ok(None));
    };
    let logs = log_layer::<Registry>(format, writer, ansi)
        .with_filter(filter.and(filter_fn(telemetry::logged)));
    match telemetry::layer::<Registry>(export) {
        Ok((spans, tracing)) => {
            let _ = tracing_subscriber::registry()
                .with(vec![logs.boxed(), spans.boxed()])
                .try_init();
            (guard, Ok(Some(tracing)))
        }
        Err(e) => {
            let _ = tracing_subscriber::registry().with(logs).try_init();
            (guard, Err(e))
        }
    }
}

/// The log lines, in `format`, to `writer`.
fn log_layer<S>(
    format: LogFormat,
    writer: log_writer::BlockWriter,
    ansi: bool,
) -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::Layer as _;
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => fmt.event_format(log_format::TextFormat::default()).boxed(),
        // The same timestamps as tracing-subscriber's default (`SystemTime`), the date formatted once
        // per second and thread.
        LogFormat::Json => fmt.json().with_timer(log_format::UtcMicros).boxed(),
    }
}

fn load(args: &ServeArgs) -> Result<config::Settings, String> {
    let mct = MctSettings::from_env(|k| std::env::var(k).ok()).map_err(|e| e.to_string())?;
    config::load(args, &mct).map_err(|e| e.to_string())
}

fn serve(args: ServeArgs) -> ExitCode {
    // Configuration comes first: it says whether spans are exported, which logging must know. Reading it
    // logs nothing, so nothing is lost before logging is set up; its errors are logged right after.
    let settings = load(&args);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build();
    let export = match &settings {
        Ok(s) => telemetry::otlp_export(s.otlp_endpoint.as_deref(), |k| std::env::var(k).ok())
            .map_err(|e| e.to_string()),
        Err(_) => Ok(None),
    };
    let (_log_writer, tracing) = {
        // The exporter's gRPC channel spawns its connection task on the runtime it is built in.
        let _runtime = runtime.as_ref().ok().map(tokio::runtime::Runtime::enter);
        let export = runtime
            .as_ref()
            .ok()
            .and_then(|_| export.as_ref().ok().cloned().flatten());
        init_logging(args.log_format, export.as_ref())
    };
    let (settings, export, tracing) = match (settings, export, tracing) {
        (Ok(s), Ok(export), Ok(tracing)) => (s, export, tracing),
        (Err(e), _, _) | (_, Err(e), _) => {
            tracing::error!("configuration error: {e}");
            return ExitCode::from(2);
        }
        (_, _, Err(e)) => {
            tracing::error!("configuration error: cannot export spans: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let exporting = export.filter(|_| tracing.is_some());
    let code = runtime.block_on(async move {
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
        if let Some(export) = exporting {
            tracing::info!(endpoint = %export.endpoint, "exporting spans over OTLP");
        }
        signals.wait_for_stop(&running, &args).await;
        tracing::info!(
            "shutting down: health NOT_SERVING, listeners closed, draining in-flight calls"
        );
        running.shutdown().await;
        tracing::info!("stopped");
        ExitCode::SUCCESS
    });
    // The spans still queued go out now, while the runtime that drives the exporter's connection is
    // alive; then the runtime, and last the log writer, which flushes every line of the run.
    if let Some(tracing) = tracing
        && let Err(e) = tracing.shutdown()
    {
        tracing::warn!("exporting the last spans failed: {e}");
    }
    // Connections cut at the drain timeout end here. Dropping the runtime would instead wait without
    // bound for any blocking task still running (a store call stuck on an unreachable database).
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
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
                _ = self.hup.recv() => {
                    // Certificates are re-read whatever becomes of the configuration file: their
                    // paths come from the start, and their reload has its own last-good rule.
                    running.reload_tls().await;
                    match load(args) {
                        Ok(settings) => {
                            if let Err(e) = running.reload(&settings).await {
                                tracing::error!("reload refused, keeping the current configuration: {e}");
                            }
                        }
                        // A bad edit must not take the allowlist down: keep serving the last good one.
                        Err(e) => tracing::error!("reload refused, keeping the current configuration: {e}"),
                    }
                }
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
