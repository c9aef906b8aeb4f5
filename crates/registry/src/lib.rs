//! Registry access shared by every service that talks to a registry.
//!
//! - [`host`]: registry host normalisation and exact matching (Docker Hub aliases).
//! - [`client`]: an `oci-client` client built from one [`RegistryCredential`] (one client per
//!   credential: oci-client remembers the first auth it used for a registry), and an
//!   authenticated access check.
//! - [`error`]: registry failures classified into what a request status must say, with the
//!   registry named and no secret.
//!
//! [`RegistryCredential`]: imagemesh_proto::v1::RegistryCredential
#![forbid(unsafe_code)]

pub mod client;
pub mod error;
pub mod host;
pub mod select;

pub use client::{Access, RegistryClient, RegistrySettings};
pub use error::{RegistryError, RegistryErrorKind};
pub use oci_client::Reference;
pub use select::credential_for;
