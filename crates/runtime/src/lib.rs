//! Plumbing every imagemesh service shares, written once.
//!
//! - [`config`]: TOML file + `IMAGEMESH_*` environment overrides, loaded into each service's
//!   own `Config` type.
//! - [`nats`]: connecting to NATS (URL, credentials file, TLS) from [`nats::NatsConfig`].
//! - [`subjects`] and [`streams`]: every subject and JetStream stream of the mesh, in one place.
//! - [`service`]: registration with the NATS micro Services API (`$SRV.PING/INFO/STATS`).
//! - [`worker`]: the durable pull-consumer loop that decodes, dispatches to a handler, acks,
//!   retries with backoff, terminates, reports status and dead-letters.
//! - [`status`]: status events and dead letters.
//! - [`poison`]: ending work that exhausted `max_deliver` because its handler crashed or hung.
//! - [`telemetry`]: structured logs, OpenTelemetry export and W3C trace context in NATS headers.
//! - [`shutdown`]: SIGTERM/SIGINT handling.
//! - [`app`]: the `main` of every service binary.
#![forbid(unsafe_code)]

pub mod app;
pub mod config;
pub mod credentials;
pub mod error;
pub mod health;
pub mod nats;
pub mod placement;
pub mod poison;
pub mod service;
pub mod shutdown;
pub mod status;
pub mod streams;
pub mod subjects;
pub mod telemetry;
pub mod worker;

pub use error::{ErrorCode, Rejection};
pub use shutdown::Shutdown;
