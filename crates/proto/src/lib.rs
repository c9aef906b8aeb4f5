//! imagemesh wire messages.
//!
//! The types are generated from `protos/imagemesh/v1/*.proto` by prost. [`codec`] reads a message
//! as protobuf or, when the NATS message says `Content-Type: application/json`, as the proto3 JSON
//! mapping, so anyone with any NATS client can publish a request by hand.
//!
//! [`v1::RegistryCredential`] has a hand-written `Debug` that never prints the secret.
//!
//! [`tenant`] holds tenant names and [`RequestKey`], the (tenant, request id) pair that names a
//! request across the mesh; [`TenantRequest`] gives it to every message that belongs to one.
#![forbid(unsafe_code)]

pub mod codec;
mod credential;
#[doc(hidden)]
pub mod fuzzing;
mod request;
pub mod tenant;

pub mod v1 {
    //! Generated from `protos/imagemesh/v1`.
    #![allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]
    include!(concat!(env!("OUT_DIR"), "/imagemesh.v1.rs"));
}

pub use codec::{CONTENT_TYPE_JSON, CONTENT_TYPE_PROTOBUF, DecodeError};
pub use request::{RequestIdError, validate_image_id, validate_request_id};
pub use tenant::{DEFAULT_TENANT, RequestKey, TenantError, TenantRequest, validate_tenant};
