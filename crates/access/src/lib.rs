//! Who may do what on the imagemesh bus.
//!
//! - [`roles`]: the roles (operator, credential, scheduler, indexer, builder, mounter, client of
//!   a tenant) and identities (an nkey and a private inbox prefix each).
//! - [`grants`]: what "consume a work queue", "read a KV key" or "serve a micro endpoint" means
//!   in NATS subjects, written once.
//! - [`table`]: THE permission table, one function per role.
//! - [`render`]: the table as nats-server's `authorization` block and as a Markdown matrix.
//! - [`bundle`]: generating and loading identities, TLS material and the server config.
#![forbid(unsafe_code)]

pub mod bundle;
pub mod grants;
pub mod render;
pub mod roles;
pub mod table;

pub use bundle::{Bundle, BundleSpec};
pub use grants::Permissions;
pub use roles::{Identity, Role};
pub use table::{MeshFacts, permissions};
