//! Registry access shared by every service that talks to a registry.
//!
//! - [`host`]: registry host normalisation and exact matching (Docker Hub aliases).
//! - [`client`]: an `oci-client` client built from one [`RegistryCredential`] (one client per
//!   credential: oci-client remembers the first auth it used for a registry), and an
//!   authenticated access check.
//! - [`error`]: registry failures classified into what a request status must say, with the
//!   registry named and no secret.
//! - [`manifest`]: a reference resolved to one platform's image manifest.
//! - [`dockerfile`]: the images a Dockerfile starts from.
//! - [`select`]: which of a request's credentials goes to which registry and repository.
//! - [`repository`]: which repositories a prefix covers (tenant prefixes, shared repositories,
//!   credentials bound to a prefix).
//!
//! The lazy index stored next to an image, and reading files through it, are
//! `imagemesh-lazyimage`'s: this crate knows registries, not the index format.
//!
//! [`RegistryCredential`]: imagemesh_proto::v1::RegistryCredential
#![forbid(unsafe_code)]

pub mod client;
pub mod dockerfile;
pub mod error;
pub mod host;
pub mod manifest;
pub mod reference;
pub mod repository;
pub mod select;

pub use client::{Access, RegistryClient, RegistrySettings};
pub use error::{RegistryError, RegistryErrorKind};
pub use manifest::{MANIFEST_MEDIA_TYPES, PlatformSpec, ResolvedImage};
pub use oci_client::Reference;
pub use reference::parse_reference;
pub use select::{credential_for, credential_for_image};
