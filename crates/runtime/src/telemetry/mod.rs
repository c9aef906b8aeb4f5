//! Logs, traces, metrics and trace context.
//!
//! - Logs go to stderr as text or JSON (`IMAGEMESH_LOG_FORMAT=json`), filtered by `RUST_LOG`.
//! - Traces: every service records spans with OpenTelemetry through `tracing`. They are exported
//!   over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set, with
//!   `OTEL_EXPORTER_OTLP_PROTOCOL` = `grpc` (default) or `http/protobuf`, batched, and flushed
//!   when the [`TelemetryGuard`] drops; `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` name
//!   the resource. Without an endpoint nothing is exported, but spans still get real ids so the
//!   trace context keeps flowing through a service that does not export.
//! - Metrics ([`metrics`]) are exported the same way when an endpoint is set
//!   (`OTEL_METRIC_EXPORT_INTERVAL`, default 60 s), with the process's resident memory, open
//!   descriptors and threads as gauges ([`process`]).
//! - Every NATS publish carries W3C trace context in its headers ([`inject`]) and every receive
//!   continues it ([`continue_trace`]), so one ContainerRequest is one trace across the mesh.

pub mod metrics;
pub mod process;
mod propagation;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
pub use propagation::{
    continue_trace, current_context, current_trace_id, extract, inject, set_parent,
};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Flushes and stops exporters when dropped; keep it alive for the life of `main`.
#[must_use = "dropping the guard stops telemetry export"]
pub struct TelemetryGuard {
    tracer_provider: SdkTracerProvider,
    meter_provider: Option<SdkMeterProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Err(err) = self.tracer_provider.shutdown() {
            eprintln!("trace export did not flush cleanly: {err}");
        }
        if let Some(provider) = self.meter_provider.take()
            && let Err(err) = provider.shutdown()
        {
            eprintln!("metric export did not flush cleanly: {err}");
        }
    }
}

fn configured(signal: &str) -> bool {
    let specific = format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT");
    ["OTEL_EXPORTER_OTLP_ENDPOINT", specific.as_str()]
        .iter()
        .any(|name| std::env::var(name).is_ok_and(|v| !v.is_empty()))
}

/// `grpc` or `http/protobuf`, from the signal-specific variable or the general one.
fn protocol(signal: &str) -> String {
    std::env::var(format!("OTEL_EXPORTER_OTLP_{signal}_PROTOCOL"))
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|_| "grpc".into())
}

fn resource(service_name: &str) -> opentelemetry_sdk::Resource {
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service_name.to_string());
    }
    resource.build()
}

fn tracer_provider(service_name: &str) -> anyhow::Result<SdkTracerProvider> {
    use opentelemetry_otlp::SpanExporter;
    let builder = SdkTracerProvider::builder().with_resource(resource(service_name));
    if !configured("TRACES") {
        return Ok(builder.build());
    }
    let exporter = match protocol("TRACES").as_str() {
        "grpc" => SpanExporter::builder().with_tonic().build()?,
        "http/protobuf" => SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .build()?,
        other => anyhow::bail!("unsupported OTEL_EXPORTER_OTLP_PROTOCOL {other:?}"),
    };
    Ok(builder.with_batch_exporter(exporter).build())
}

fn meter_provider(service_name: &str) -> anyhow::Result<Option<SdkMeterProvider>> {
    use opentelemetry_otlp::MetricExporter;
    if !configured("METRICS") {
        return Ok(None);
    }
    let exporter = match protocol("METRICS").as_str() {
        "grpc" => MetricExporter::builder().with_tonic().build()?,
        "http/protobuf" => MetricExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .build()?,
        other => anyhow::bail!("unsupported OTEL_EXPORTER_OTLP_PROTOCOL {other:?}"),
    };
    Ok(Some(
        SdkMeterProvider::builder()
            .with_periodic_exporter(exporter)
            .with_resource(resource(service_name))
            .build(),
    ))
}

/// Installs the global subscriber (logs + spans), the meter provider and the W3C propagator for
/// a service. Must run inside a Tokio runtime (the gRPC exporter's channel lives on it).
pub fn init(service_name: &str) -> TelemetryGuard {
    init_with_log_default(service_name, "info,async_nats=warn,oci_client=warn,h2=warn")
}

/// [`init`] for command-line tools: only warnings are logged unless `RUST_LOG` says otherwise.
pub fn init_cli(service_name: &str) -> TelemetryGuard {
    init_with_log_default(service_name, "warn")
}

fn init_with_log_default(service_name: &str, default_filter: &str) -> TelemetryGuard {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let log_filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let json = std::env::var("IMAGEMESH_LOG_FORMAT").is_ok_and(|v| v == "json");
    // Colours only on a terminal: log files and collectors get plain text (and it is cheaper:
    // span fields are formatted when each span opens).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let fmt = if json {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    };

    let mut errors = Vec::new();
    let tracer_provider = tracer_provider(service_name).unwrap_or_else(|err| {
        errors.push(format!("trace export disabled: {err}"));
        SdkTracerProvider::builder().build()
    });
    let meter_provider = meter_provider(service_name).unwrap_or_else(|err| {
        errors.push(format!("metric export disabled: {err}"));
        None
    });
    if let Some(provider) = &meter_provider {
        opentelemetry::global::set_meter_provider(provider.clone());
        process::register_gauges();
    }
    // Spans are kept at info and above whatever RUST_LOG says about logs.
    // Busy/idle timing, thread attributes and activating the OpenTelemetry context on every
    // poll of an instrumented future cost per-message CPU and nothing here reads them: context
    // is taken from the span itself when injected into NATS headers.
    let spans = tracing_opentelemetry::layer()
        .with_tracer(tracer_provider.tracer("imagemesh"))
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_context_activation(false)
        .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
    tracing_subscriber::registry()
        .with(fmt.with_filter(log_filter))
        .with(spans)
        .init();
    for error in errors {
        tracing::error!("{error}");
    }
    TelemetryGuard {
        tracer_provider,
        meter_provider,
    }
}
