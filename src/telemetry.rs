//! Tracing spans exported with OpenTelemetry (OTLP over gRPC) when configured, and the W3C trace context
//! a checked request carries.
//!
//! Off by default. When off, no layer is interested in spans, so every span callsite is disabled once
//! and for all (`Interest::never`): a span on the decision path then costs a relaxed load or two, and
//! the log layer never sees spans (log lines keep their shape, and no span data is built for them).
//! When on, spans of this crate (`decision`, its stages, key fetches, discovery) go to an OTLP collector
//! through the SDK's batch processor, on its own thread; `Tracing::shutdown` flushes what is queued.

use crate::core::decision::Headers;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::{Level, Metadata, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer;
use tracing_subscriber::registry::LookupSpan;

/// The `service.name` spans carry unless `OTEL_SERVICE_NAME` (or `service.name` in
/// `OTEL_RESOURCE_ATTRIBUTES`) names another.
pub const DEFAULT_SERVICE_NAME: &str = "s2s-authz";

/// The OTLP/gRPC endpoint when export is asked for (`OTEL_TRACES_EXPORTER=otlp`) without one.
pub const DEFAULT_ENDPOINT: &str = "http://localhost:4317";

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("`{var}`: {message}")]
    Setting { var: &'static str, message: String },
    #[error("building the OTLP exporter: {0}")]
    Exporter(String),
}

/// Span export, as resolved from the configuration and the standard `OTEL_*` variables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtlpExport {
    /// The collector's gRPC endpoint: the configured one, else `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`, else the OTLP default `http://localhost:4317`.
    pub endpoint: String,
    /// `None` when the environment names the service (the SDK reads it).
    pub service_name: Option<String>,
}

fn setting(var: &'static str, message: impl Into<String>) -> TelemetryError {
    TelemetryError::Setting {
        var,
        message: message.into(),
    }
}

/// Whether and where to export spans. `configured` is the endpoint from `--otlp-endpoint` or the file;
/// `var` reads the environment. Export is on when an endpoint is configured, when
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` is set, or when
/// `OTEL_TRACES_EXPORTER=otlp`; `OTEL_TRACES_EXPORTER=none` and `OTEL_SDK_DISABLED=true` turn it off.
/// Only the gRPC protocol is built in: another `OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL` is an error rather
/// than spans silently lost.
pub fn otlp_export(
    configured: Option<&str>,
    var: impl Fn(&str) -> Option<String>,
) -> Result<Option<OtlpExport>, TelemetryError> {
    let get = |k: &str| {
        var(k)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    if get("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    let exporter = get("OTEL_TRACES_EXPORTER").map(|v| v.to_ascii_lowercase());
    match exporter.as_deref() {
        None | Some("otlp") => {}
        Some("none") => return Ok(None),
        Some(other) => {
            return Err(setting(
                "OTEL_TRACES_EXPORTER",
                format!("`{other}` is not supported: use `otlp` or `none`"),
            ));
        }
    }
    let endpoint = configured
        .map(str::to_owned)
        .or_else(|| get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        .or_else(|| get("OTEL_EXPORTER_OTLP_ENDPOINT"));
    let endpoint = match (endpoint, exporter) {
        (Some(endpoint), _) => endpoint,
        (None, Some(_)) => DEFAULT_ENDPOINT.to_owned(),
        (None, None) => return Ok(None),
    };
    for key in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Some(protocol) = get(key).filter(|p| p != "grpc") {
            return Err(setting(
                key,
                format!("`{protocol}` is not supported: s2s-authz exports over `grpc`"),
            ));
        }
    }
    let named = get("OTEL_SERVICE_NAME").is_some()
        || get("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| {
            a.split(',')
                .any(|kv| kv.trim().starts_with("service.name="))
        });
    Ok(Some(OtlpExport {
        endpoint,
        service_name: (!named).then(|| DEFAULT_SERVICE_NAME.to_owned()),
    }))
}

/// The running span export. Dropping it without `shutdown` loses what is still queued.
#[derive(Debug)]
pub struct Tracing {
    provider: SdkTracerProvider,
}

impl Tracing {
    /// Exports what is queued and stops the exporter. Blocks until done (bounded by the exporter's
    /// timeout, `OTEL_EXPORTER_OTLP_TIMEOUT`, 10 s by default): call it off the async workers.
    pub fn shutdown(self) -> Result<(), TelemetryError> {
        self.provider
            .shutdown()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))
    }
}

/// The layer that turns this crate's spans into OpenTelemetry spans, and the export behind it. Must run
/// inside a Tokio runtime (the gRPC channel's connection task is spawned on it), which must outlive it.
pub fn layer<S>(
    export: &OtlpExport,
) -> Result<(impl Layer<S> + Send + Sync + 'static, Tracing), TelemetryError>
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(export.endpoint.clone())
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if let Some(name) = &export.service_name {
        resource = resource.with_service_name(name.clone());
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer("s2s-authz");
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_threads(false)
        .with_location(false)
        .with_filter(tracing_subscriber::filter::filter_fn(exported));
    Ok((layer, Tracing { provider }))
}

/// What reaches the collector: this crate's spans at INFO and above, and its warnings and errors (as
/// events of the span they happen in). Decided once per callsite.
fn exported(metadata: &Metadata<'_>) -> bool {
    let ours = metadata.target().starts_with("s2s_authz");
    let level = *metadata.level();
    ours && if metadata.is_span() {
        level <= Level::INFO
    } else {
        level <= Level::WARN
    }
}

/// What the log layer sees: everything but spans, so that logs look the same with export on or off.
pub fn logged(metadata: &Metadata<'_>) -> bool {
    !metadata.is_span()
}

/// Makes the request's W3C trace context (`traceparent`, `tracestate`, as the caller or Envoy sent them)
/// the parent of `span`, so that a decision shows up in the trace of the request it decided. Only worth
/// calling when `span` is enabled.
pub fn adopt_remote_parent(span: &tracing::Span, headers: &dyn Headers) {
    if headers.header("traceparent").is_none() {
        return;
    }
    let context = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    // Fails only without the OpenTelemetry layer, when the span would not be exported anyway.
    let _ = span.set_parent(context);
}

/// The request's headers as the propagator reads them.
struct HeaderExtractor<'a>(&'a dyn Headers);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.header(&key.to_ascii_lowercase())
    }

    fn keys(&self) -> Vec<&str> {
        ["traceparent", "tracestate"]
            .into_iter()
            .filter(|k| self.0.header(k).is_some())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(key, _)| *key == k)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn export_is_off_unless_asked_for() {
        assert_eq!(otlp_export(None, env(&[])).unwrap(), None);
        assert_eq!(
            otlp_export(None, env(&[("OTEL_SERVICE_NAME", "x")])).unwrap(),
            None
        );
    }

    #[test]
    fn an_endpoint_anywhere_turns_it_on() {
        let configured = otlp_export(Some("http://127.0.0.1:4317"), env(&[])).unwrap();
        assert_eq!(
            configured,
            Some(OtlpExport {
                endpoint: "http://127.0.0.1:4317".to_owned(),
                service_name: Some(DEFAULT_SERVICE_NAME.to_owned()),
            })
        );
        for var in [
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        ] {
            let export = otlp_export(None, env(&[(var, "http://collector:4317")])).unwrap();
            assert_eq!(
                export,
                Some(OtlpExport {
                    endpoint: "http://collector:4317".to_owned(),
                    service_name: Some(DEFAULT_SERVICE_NAME.to_owned()),
                }),
                "{var}"
            );
        }
        let named = otlp_export(
            None,
            env(&[
                ("OTEL_TRACES_EXPORTER", "otlp"),
                ("OTEL_SERVICE_NAME", "authz-eu"),
            ]),
        )
        .unwrap();
        assert_eq!(
            named,
            Some(OtlpExport {
                endpoint: DEFAULT_ENDPOINT.to_owned(),
                service_name: None,
            }),
            "the SDK reads OTEL_SERVICE_NAME itself"
        );
        let attributes = otlp_export(
            Some("http://c:4317"),
            env(&[("OTEL_RESOURCE_ATTRIBUTES", "team=id, service.name=authz")]),
        )
        .unwrap();
        assert_eq!(attributes.and_then(|e| e.service_name), None);
    }

    #[test]
    fn the_configured_endpoint_comes_first_then_the_traces_one() {
        let vars = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://general:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317"),
        ];
        let endpoint = |configured| {
            otlp_export(configured, env(&vars))
                .unwrap()
                .map(|e| e.endpoint)
        };
        assert_eq!(
            endpoint(Some("http://flag:4317")).as_deref(),
            Some("http://flag:4317")
        );
        assert_eq!(endpoint(None).as_deref(), Some("http://traces:4317"));
    }

    #[test]
    fn the_standard_switches_turn_it_off() {
        for (var, value) in [
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ] {
            let export = otlp_export(
                Some("http://c:4317"),
                env(&[
                    (var, value),
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ]),
            )
            .unwrap();
            assert_eq!(export, None, "{var}={value}");
        }
    }

    #[test]
    fn what_is_not_built_in_is_an_error() {
        let err = otlp_export(None, env(&[("OTEL_TRACES_EXPORTER", "zipkin")])).unwrap_err();
        assert!(err.to_string().contains("OTEL_TRACES_EXPORTER"), "{err}");
        let err = otlp_export(
            Some("http://c:4318"),
            env(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("`http/protobuf`"), "{err}");
        assert!(
            otlp_export(
                Some("http://c:4317"),
                env(&[("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc")])
            )
            .is_ok()
        );
    }
}
