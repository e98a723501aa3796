//! qatflow-telemetry: one call that sets up `tracing` for a qatflow binary.
//!
//! [`init`] installs a subscriber with human-readable logs on stderr (filtered by
//! `QATFLOW_LOG`, then `RUST_LOG`, else the configured level) and, when an OTLP endpoint
//! is configured, a `tracing-opentelemetry` layer that exports spans over OTLP/gRPC (the
//! protocol Jaeger accepts on port 4317) under the configured service name and resource
//! attributes. Each layer has its own filter: the stderr level never decides what is
//! traced (the trace filter is `QATFLOW_TRACE`, else the configured trace level, `info`).
//! It also installs the W3C trace-context propagator, without which nothing crosses a
//! process boundary.
//!
//! The OTLP exporter's gRPC channel runs on a small runtime owned by the returned
//! [`TelemetryGuard`], not on the caller's: the batch exporter deadlocks on single-threaded
//! runtimes such as actix's. Dropping the guard flushes pending spans and shuts the
//! exporter down, off any async runtime.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;

/// The environment variable that enables OTLP export (standard OpenTelemetry name).
pub const OTLP_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// Errors setting up telemetry.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The log filter does not parse.
    #[error("invalid log filter {filter:?}: {message}; use a level (info, debug) or a tracing directive such as qatflow=debug")]
    Filter {
        /// The filter text.
        filter: String,
        /// Parser message.
        message: String,
    },
    /// The OTLP exporter could not be built.
    #[error("cannot set up OTLP export to {endpoint}: {message}; check the endpoint URL (for Jaeger: http://HOST:4317)")]
    Otlp {
        /// The endpoint.
        endpoint: String,
        /// What failed.
        message: String,
    },
    /// A global subscriber is already installed.
    #[error("tracing is already initialised in this process")]
    AlreadyInitialised,
}

/// How to set up tracing.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// `service.name` of exported spans (e.g. `qatflow-cli`, `qatflow-spark`).
    pub service_name: String,
    /// OTLP/gRPC endpoint (e.g. `http://127.0.0.1:4317`); `None` disables export.
    pub otlp_endpoint: Option<String>,
    /// Default log level or directive, used when no environment filter is set.
    pub log_level: String,
    /// Level or directive of the spans exported over OTLP (overridden by
    /// `QATFLOW_TRACE`); independent of `log_level`.
    pub trace_level: String,
    /// More resource attributes of exported spans (`node.name`, `node.role`, …).
    pub resource: Vec<(String, String)>,
    /// Colours in the stderr log.
    pub ansi: bool,
}

impl TelemetryConfig {
    /// A config for `service_name`: log and trace level `info`, OTLP enabled when
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` is set, no extra resource attributes.
    pub fn new(service_name: impl Into<String>) -> TelemetryConfig {
        TelemetryConfig {
            service_name: service_name.into(),
            otlp_endpoint: std::env::var(OTLP_ENDPOINT_ENV)
                .ok()
                .filter(|s| !s.is_empty()),
            log_level: "info".into(),
            trace_level: "info".into(),
            resource: Vec::new(),
            ansi: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        }
    }
}

/// Keeps the exporter alive; dropping it flushes and shuts export down.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl TelemetryGuard {
    /// True when spans are exported over OTLP.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes pending spans now.
    pub fn flush(&self) {
        if let Some(p) = &self.provider {
            if let Err(e) = p.force_flush() {
                eprintln!("qatflow: flushing traces failed: {e}");
            }
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            // Shut down on a plain thread: never inside an async runtime.
            let handle = std::thread::spawn(move || provider.shutdown());
            if let Ok(Err(e)) = handle.join() {
                eprintln!("qatflow: shutting down trace export failed: {e}");
            }
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(std::time::Duration::from_secs(2));
        }
    }
}

fn env_filter(default: &str) -> Result<EnvFilter, TelemetryError> {
    filter_from(&["QATFLOW_LOG", "RUST_LOG"], default)
}

/// The filter of the first non-empty variable of `vars`, else of `default`.
fn filter_from(vars: &[&str], default: &str) -> Result<EnvFilter, TelemetryError> {
    let text = vars
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| default.to_string());
    EnvFilter::try_new(&text).map_err(|e| TelemetryError::Filter {
        filter: text,
        message: e.to_string(),
    })
}

/// Builds an OTLP/gRPC tracer provider on its own runtime.
fn otlp_provider(
    endpoint: &str,
    service_name: &str,
    attributes: &[(String, String)],
) -> Result<(SdkTracerProvider, tokio::runtime::Runtime), TelemetryError> {
    let otlp_err = |message: String| TelemetryError::Otlp {
        endpoint: endpoint.to_string(),
        message,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("qatflow-otlp")
        .enable_all()
        .build()
        .map_err(|e| otlp_err(e.to_string()))?;
    let exporter = {
        let _enter = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| otlp_err(e.to_string()))?
    };
    let resource = Resource::builder()
        .with_attributes(
            std::iter::once(KeyValue::new("service.name", service_name.to_string())).chain(
                attributes
                    .iter()
                    .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
            ),
        )
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    Ok((provider, runtime))
}

/// Installs the global subscriber; see the module docs.
pub fn init(config: &TelemetryConfig) -> Result<TelemetryGuard, TelemetryError> {
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let filter = env_filter(&config.log_level)?;
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(config.ansi)
        .with_target(false)
        .with_filter(filter);
    let (otel_layer, provider, runtime) = match &config.otlp_endpoint {
        Some(endpoint) => {
            let trace_filter = filter_from(&["QATFLOW_TRACE"], &config.trace_level)?;
            let (provider, runtime) =
                otlp_provider(endpoint, &config.service_name, &config.resource)?;
            let tracer = provider.tracer("qatflow");
            opentelemetry::global::set_tracer_provider(provider.clone());
            (
                Some(
                    tracing_opentelemetry::layer()
                        .with_tracer(tracer)
                        .with_filter(trace_filter),
                ),
                Some(provider),
                Some(runtime),
            )
        }
        None => (None, None, None),
    };
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel_layer)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInitialised)?;
    Ok(TelemetryGuard { provider, runtime })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_filters_are_clear_errors() {
        let err = env_filter("info,qatflow=[[[").unwrap_err().to_string();
        assert!(err.starts_with("invalid log filter"), "{err}");
    }

    #[test]
    fn a_bad_endpoint_is_a_clear_error() {
        let err = otlp_provider("not a url", "t", &[])
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("cannot set up OTLP export to not a url"),
            "{err}"
        );
    }
}
