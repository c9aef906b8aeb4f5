//! Logs, traces and trace context.
//!
//! Logs go to stderr as text or JSON (`IMAGEMESH_LOG_FORMAT=json`), filtered by `RUST_LOG`.
//! Traces are exported over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or the traces-specific
//! variable) is set, using `OTEL_EXPORTER_OTLP_PROTOCOL` (`grpc` or `http/protobuf`), and
//! `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES`; nothing is exported otherwise.
//! Every NATS publish carries W3C trace context in its headers ([`inject`]) and every receive
//! continues it ([`extract`]), so one ContainerRequest is one trace across the mesh.

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Flushes and stops exporters when dropped; keep it alive for the life of `main`.
#[must_use = "dropping the guard stops trace export"]
pub struct TelemetryGuard {
    tracer_provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.tracer_provider.take() {
            if let Err(err) = provider.shutdown() {
                eprintln!("trace export did not flush cleanly: {err}");
            }
        }
    }
}

fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|name| std::env::var(name).is_ok_and(|v| !v.is_empty()))
}

fn build_tracer_provider(service_name: &str) -> Result<SdkTracerProvider, anyhow::Error> {
    use opentelemetry_otlp::{SpanExporter, WithExportConfig};
    let protocol = std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|_| "grpc".into());
    let exporter = match protocol.as_str() {
        "grpc" => SpanExporter::builder().with_tonic().build()?,
        "http/protobuf" => SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .build()?,
        other => anyhow::bail!("unsupported OTEL_EXPORTER_OTLP_PROTOCOL {other:?}"),
    };
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service_name.to_string());
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// Installs the global subscriber (logs + optional OTLP traces) and the W3C propagator.
pub fn init(service_name: &str) -> TelemetryGuard {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,async_nats=warn,oci_client=warn,h2=warn"));
    let json = std::env::var("IMAGEMESH_LOG_FORMAT").is_ok_and(|v| v == "json");
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    };

    let mut tracer_provider = None;
    let mut setup_error = None;
    let otel_layer = if otlp_configured() {
        match build_tracer_provider(service_name) {
            Ok(provider) => {
                let tracer = provider.tracer("imagemesh");
                tracer_provider = Some(provider);
                Some(tracing_opentelemetry::layer().with_tracer(tracer))
            }
            Err(err) => {
                setup_error = Some(err);
                None
            }
        }
    } else {
        None
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel_layer)
        .init();
    if let Some(err) = setup_error {
        tracing::error!(error = %err, "OTLP export disabled: exporter setup failed");
    }
    TelemetryGuard { tracer_provider }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_ref()).collect()
    }
}

/// Writes the current span's trace context (`traceparent`, `tracestate`) into `headers`.
pub fn inject(headers: &mut HeaderMap) {
    let context = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&context, &mut HeaderInjector(headers));
}

/// Reads the trace context a message carries.
pub fn extract(headers: Option<&HeaderMap>) -> opentelemetry::Context {
    match headers {
        Some(headers) => TraceContextPropagator::new().extract(&HeaderExtractor(headers)),
        None => opentelemetry::Context::new(),
    }
}

/// Makes `span` a child of the trace the message carries (no-op when it carries none).
pub fn continue_trace(span: &tracing::Span, headers: Option<&HeaderMap>) {
    let parent = extract(headers);
    if parent.span().span_context().is_valid() {
        // Only fails when the span is disabled, in which case there is nothing to link.
        let _ = span.set_parent(parent);
    }
}

/// The trace id of the current span, when traces are being recorded.
pub fn current_trace_id() -> Option<String> {
    let context = tracing::Span::current().context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}
