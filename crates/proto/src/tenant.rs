//! Tenants: whom a request belongs to, and the key that names a request across the mesh.
//!
//! A tenant is never taken from a field a client fills: the scheduler reads it from the intake
//! subject (`imagemesh.intake.<tenant>.<request id>`), which the NATS server lets only that
//! tenant's clients publish to, and every later message carries it.

use crate::v1::{ContainerRequest, IndexRequest};

/// The tenant of a single-user mesh, and of the CLI when none is named.
pub const DEFAULT_TENANT: &str = "default";

/// Longest tenant name: short enough for a bucket-name suffix and a repository component.
const MAX_TENANT_LEN: usize = 32;

/// Why a tenant name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tenant {0:?} is not a valid name ([a-z0-9]([a-z0-9-]{{0,30}}[a-z0-9])?)")]
pub struct TenantError(pub String);

/// Tenant names are `[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?`: a NATS subject token (no `.`, `*`,
/// `>`), a JetStream bucket-name suffix, a KV key prefix and a lowercase repository path
/// component of the OCI grammar, all at once, without escaping.
pub fn validate_tenant(tenant: &str) -> Result<(), TenantError> {
    let bytes = tenant.as_bytes();
    let allowed = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let ok = !bytes.is_empty()
        && bytes.len() <= MAX_TENANT_LEN
        && bytes.first().is_some_and(allowed)
        && bytes.last().is_some_and(allowed)
        && bytes.iter().all(|b| allowed(b) || *b == b'-');
    if ok {
        Ok(())
    } else {
        Err(TenantError(tenant.to_string()))
    }
}

/// A request's name across the mesh. Request ids are unique per tenant only, so anything that
/// de-duplicates or addresses a request uses both parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestKey<'a> {
    pub tenant: &'a str,
    pub id: &'a str,
}

impl<'a> RequestKey<'a> {
    pub fn new(tenant: &'a str, id: &'a str) -> Self {
        Self { tenant, id }
    }

    /// `<tenant>.<request id>`: the JetStream message id of a request's work messages, so tenant
    /// B's request `x` is never taken for a duplicate of tenant A's `x`.
    pub fn message_id(&self) -> String {
        format!("{}.{}", self.tenant, self.id)
    }

    /// Reads a [`message_id`](Self::message_id) back. A `~...` suffix (a re-routed copy) is
    /// ignored; both parts must be valid.
    pub fn from_message_id(message_id: &'a str) -> Option<Self> {
        let original = message_id.split('~').next().unwrap_or_default();
        let (tenant, id) = original.split_once('.')?;
        let key = Self::new(tenant, id);
        key.is_valid().then_some(key)
    }

    /// Both parts can name subjects.
    pub fn is_valid(&self) -> bool {
        validate_tenant(self.tenant).is_ok() && crate::validate_request_id(self.id).is_ok()
    }
}

impl std::fmt::Display for RequestKey<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.tenant, self.id)
    }
}

/// A message that belongs to one request of one tenant.
pub trait TenantRequest {
    /// The request's tenant and id, as the message carries them.
    fn key(&self) -> RequestKey<'_>;

    /// Binds the message to `tenant` (the one its intake subject names).
    fn set_tenant(&mut self, tenant: &str);
}

impl TenantRequest for ContainerRequest {
    fn key(&self) -> RequestKey<'_> {
        RequestKey::new(&self.tenant, &self.request_id)
    }

    fn set_tenant(&mut self, tenant: &str) {
        self.tenant = tenant.to_string();
    }
}

impl TenantRequest for IndexRequest {
    fn key(&self) -> RequestKey<'_> {
        RequestKey::new(&self.tenant, &self.request_id)
    }

    fn set_tenant(&mut self, tenant: &str) {
        self.tenant = tenant.to_string();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_names_are_subject_bucket_and_repository_safe() {
        for good in [
            "default",
            "a",
            "a1",
            "team-a",
            "0",
            "x-y-z",
            &"a".repeat(32),
        ] {
            assert_eq!(validate_tenant(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "team_a",
            "a.b",
            "a*",
            "a>",
            "a/b",
            "a b",
            "é",
            &"a".repeat(33),
        ] {
            assert!(validate_tenant(bad).is_err(), "{bad:?}");
        }
        assert!(validate_tenant(DEFAULT_TENANT).is_ok());
    }

    #[test]
    fn message_ids_name_tenant_and_request() {
        let key = RequestKey::new("team-a", "req-1");
        assert_eq!(key.message_id(), "team-a.req-1");
        assert_eq!(RequestKey::from_message_id("team-a.req-1"), Some(key));
        assert_eq!(
            RequestKey::from_message_id("team-a.req-1~rerouted-7"),
            Some(key)
        );
        assert_ne!(
            RequestKey::new("team-b", "req-1").message_id(),
            key.message_id(),
            "the same id in two tenants is two messages"
        );
        for bad in ["req-1", "Team.req-1", "team-a.", ".req-1", "team-a.a.b"] {
            assert_eq!(RequestKey::from_message_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn messages_carry_their_key() {
        let mut request = ContainerRequest {
            request_id: "r".into(),
            tenant: "evil".into(),
            ..Default::default()
        };
        request.set_tenant("a");
        assert_eq!(request.key(), RequestKey::new("a", "r"));
        let index = IndexRequest {
            request_id: "r".into(),
            tenant: "b".into(),
            ..Default::default()
        };
        assert_eq!(index.key().tenant, "b");
    }
}
