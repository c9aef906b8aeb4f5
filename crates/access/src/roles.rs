//! Roles and identities: who connects to the bus.

use serde::{Deserialize, Serialize};

/// What an identity is for. The permission table ([`crate::table`]) says what each may do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Role {
    /// Runs the mesh: provisions streams and buckets, reads dead letters, calls mounter control
    /// subjects. Everything on the bus.
    Operator,
    /// Mints and refreshes registry tokens.
    Credential,
    /// Takes requests from the intake, attaches credentials, dispatches.
    Scheduler,
    /// Indexes pushed images.
    Indexer,
    /// Builds and pushes images; one identity per worker id.
    Builder { worker_id: String },
    /// Mounts images lazily; one identity per worker id.
    Mounter { worker_id: String },
    /// Submits requests and follows them, for one tenant.
    Client { tenant: String },
}

impl Role {
    /// The role's name in the permission matrix.
    pub fn kind(&self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Credential => "credential",
            Role::Scheduler => "scheduler",
            Role::Indexer => "indexer",
            Role::Builder { .. } => "builder",
            Role::Mounter { .. } => "mounter",
            Role::Client { .. } => "client",
        }
    }
}

/// One identity: a name (also its private inbox token), a role, and its nkey.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Unique on the bus; a subject token (`[A-Za-z0-9_-]`).
    pub name: String,
    #[serde(flatten)]
    pub role: Role,
    /// The nkey's public key (`U...`), which the server knows the identity by.
    pub public_key: String,
}

impl Identity {
    /// The inbox prefix this identity's connection uses (`custom_inbox_prefix`, derived from
    /// its key); only it may subscribe below it, so no identity reads another's replies.
    pub fn inbox_prefix(&self) -> String {
        imagemesh_runtime::nats::inbox_prefix(&self.public_key)
    }
}

/// Whether `name` can be an identity name (a single subject token).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_single_tokens() {
        assert!(valid_name("builder-w1"));
        assert!(!valid_name("a.b"));
        assert!(!valid_name("a*"));
        assert!(!valid_name(""));
        assert!(!valid_name(">"));
    }
}
