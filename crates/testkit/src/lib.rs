//! Real servers for tests, on loopback, with ephemeral ports and temporary directories.
//!
//! Each server is a child process that is killed, and its directory removed, when the handle is
//! dropped, so a failing test cleans up too. Readiness is waited for by connecting with a
//! deadline, never by sleeping.
//!
//! - [`NatsServer`]: `nats-server` with JetStream; [`NatsCluster`]: three of them routed into a
//!   JetStream cluster, each node killable and restartable.
//! - [`Registry`]: Debian's `docker-registry` (distribution 2.8), open or htpasswd-protected.
//! - [`ServiceProcess`]: an imagemesh service binary with its config file and captured log.
//! - [`fault_proxy`]: a TCP proxy in front of a registry that injects 503s, dropped
//!   connections and stalls on command.
//! - [`eventually`]: poll a condition until it holds or a deadline passes.
//! - [`issuer_keys`]: signing keys and certificate bundles for the credential service as issuer.
//! - [`images`]: a busybox base image for build tests, and pulling built images back.
//! - [`oci_images`]: OCI test images built with umoci and pushed with skopeo.
#![forbid(unsafe_code)]

pub mod fault_proxy;
pub mod images;
pub mod issuer_keys;
pub mod moto;
mod nats;
pub mod oci_images;
pub mod otlp;
mod process;
mod registry;
pub mod token_server;
mod wait;

pub use nats::{NatsCluster, NatsServer};
pub use process::{ServiceProcess, bin_path};
pub use registry::{Registry, RegistryAuth};
pub use wait::{eventually, free_port, wait_for_endpoints, wait_for_service};
