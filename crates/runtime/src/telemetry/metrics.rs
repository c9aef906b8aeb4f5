//! The mesh's OpenTelemetry metrics, created once per process.
//!
//! Without an OTLP endpoint the global meter is a no-op, so recording costs next to nothing.

use std::sync::OnceLock;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};

/// Every instrument the mesh records.
pub struct Metrics {
    /// Work items settled, by `service` and `outcome` (done, retry, rejected).
    pub requests: Counter<u64>,
    /// Time to settle a work item, seconds, by `service` and `outcome`.
    pub duration: Histogram<f64>,
    /// Tokens minted upstream (ECR, token endpoints), by `registry`.
    pub tokens_minted: Counter<u64>,
    /// Token requests answered, by `endpoint` (mint, refresh) and `cached`.
    pub token_requests: Counter<u64>,
    /// Compressed bytes read from registries, by `service`.
    pub bytes_fetched: Counter<u64>,
}

/// The process-wide instruments.
pub fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let meter = opentelemetry::global::meter("imagemesh");
        Metrics {
            requests: meter
                .u64_counter("imagemesh.requests")
                .with_description("work items settled")
                .build(),
            duration: meter
                .f64_histogram("imagemesh.request.duration")
                .with_unit("s")
                .with_description("time to settle a work item")
                .build(),
            tokens_minted: meter
                .u64_counter("imagemesh.tokens.minted")
                .with_description("tokens minted upstream")
                .build(),
            token_requests: meter
                .u64_counter("imagemesh.token.requests")
                .with_description("token requests answered")
                .build(),
            bytes_fetched: meter
                .u64_counter("imagemesh.registry.bytes_fetched")
                .with_unit("By")
                .with_description("compressed bytes read from registries")
                .build(),
        }
    })
}

/// Attribute helper.
pub fn attr(key: &'static str, value: impl Into<opentelemetry::Value>) -> KeyValue {
    KeyValue::new(key, value)
}
