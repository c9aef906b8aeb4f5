//! A named credential (`[credential.secrets.<name>]`): a registry entry bound to the tenants
//! that may use it and, optionally, to the repositories it may be used for.

use imagemesh_proto::validate_tenant;
use imagemesh_registry::repository::within;
use imagemesh_runtime::{ErrorCode, Rejection};
use serde::{Deserialize, Serialize};

use super::RegistryConfig;

/// What `tenants` holds to let any tenant use a credential.
pub const ANY_TENANT: &str = "*";

/// One named credential.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NamedCredential {
    /// Tenants whose requests may name it (`TokenRequest.tenant`, which the scheduler takes from
    /// the intake subject); `["*"]` lets every tenant use it. Required: a credential nobody was
    /// explicitly given to is nobody's.
    pub tenants: Vec<String>,
    /// Repositories it may be used for: this prefix and the repositories below it (by whole path
    /// components). Unset: any repository of its host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository_prefix: Option<String>,
    /// The registry and provider, as in `[[credential.registries]]`.
    #[serde(flatten)]
    pub registry: RegistryConfig,
}

impl NamedCredential {
    /// Refuses bindings that would say something other than what they seem to.
    pub fn validate(&self, name: &str) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.tenants.is_empty(),
            "credential.secrets.{name}.tenants is empty: list the tenants that may use it, or \
             [\"*\"] for every tenant"
        );
        if self.tenants.iter().any(|t| t == ANY_TENANT) {
            anyhow::ensure!(
                self.tenants.len() == 1,
                "credential.secrets.{name}.tenants mixes \"*\" with named tenants"
            );
        } else {
            for tenant in &self.tenants {
                validate_tenant(tenant)
                    .map_err(|e| anyhow::anyhow!("credential.secrets.{name}.tenants: {e}"))?;
            }
        }
        if let Some(prefix) = &self.repository_prefix {
            anyhow::ensure!(
                !prefix.trim_matches('/').is_empty(),
                "credential.secrets.{name}.repository_prefix is empty (leave it out for any \
                 repository)"
            );
        }
        Ok(())
    }

    /// Whether a request of `tenant` for `repository` may use the credential `name`.
    pub fn check(&self, name: &str, tenant: &str, repository: &str) -> Result<(), Rejection> {
        let bound = self
            .tenants
            .iter()
            .any(|allowed| allowed == ANY_TENANT || allowed == tenant);
        if !bound {
            return Err(Rejection::new(
                ErrorCode::Forbidden,
                format!("credential {name:?} is not for tenant {tenant:?}"),
            ));
        }
        match &self.repository_prefix {
            Some(prefix) if !within(repository, prefix) => Err(Rejection::new(
                ErrorCode::Forbidden,
                format!("credential {name:?} is not for repository {repository:?}"),
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::SecretRef;

    fn named(tenants: &[&str], prefix: Option<&str>) -> NamedCredential {
        NamedCredential {
            tenants: tenants.iter().map(|t| t.to_string()).collect(),
            repository_prefix: prefix.map(str::to_string),
            registry: RegistryConfig::Basic {
                host: "registry.team.example".into(),
                username: "u".into(),
                password: SecretRef::value("p"),
                share_long_term_secret: false,
            },
        }
    }

    #[test]
    fn only_the_bound_tenants_may_use_a_credential() {
        let secret = named(&["team-a", "team-c"], None);
        secret.check("hub", "team-a", "x/y").unwrap();
        secret.check("hub", "team-c", "x/y").unwrap();
        let err = secret.check("hub", "team-b", "x/y").unwrap_err();
        assert_eq!(err.code, ErrorCode::Forbidden);
        assert!(err.message.contains("team-b"), "{err}");
        assert!(secret.check("hub", "", "x/y").is_err());
        assert!(
            secret.check("hub", "*", "x/y").is_err(),
            "a star asks for nothing"
        );
        named(&["*"], None).check("hub", "anyone", "x/y").unwrap();
    }

    #[test]
    fn a_prefix_limits_the_repositories() {
        let secret = named(&["team-a"], Some("team/app"));
        secret.check("hub", "team-a", "team/app").unwrap();
        secret.check("hub", "team-a", "team/app/web").unwrap();
        for outside in ["team/apple", "team", "other/team/app", ""] {
            let err = secret.check("hub", "team-a", outside).unwrap_err();
            assert_eq!(err.code, ErrorCode::Forbidden, "{outside}");
        }
    }

    #[test]
    fn bindings_are_validated() {
        named(&["team-a"], Some("team/app")).validate("x").unwrap();
        named(&["*"], None).validate("x").unwrap();
        for bad in [
            named(&[], None),
            named(&["*", "team-a"], None),
            named(&["Team_A"], None),
            named(&["team-a"], Some("/")),
        ] {
            assert!(bad.validate("x").is_err(), "{bad:?}");
        }
    }
}
