//! What a tenant may do in the build registry, decided from the request's tenant (which the
//! worker took from the intake subject) and the configuration, never from a request field.
//!
//! A tenant owns `<build_repository>/<tenant>` and everything below it: its builds push only
//! there, and its requests get build-registry credentials only for images there or in one of
//! the shared repositories (base images every tenant may pull).

use imagemesh_registry::repository::within;
use imagemesh_runtime::{ErrorCode, Rejection};

/// The build registry's repositories as one tenant sees them.
#[derive(Debug, Clone, Copy)]
pub struct Tenancy<'a> {
    /// `scheduler.build_repository`: tenants' repositories lie below it.
    pub build_repository: &'a str,
    /// `scheduler.shared_repositories`: prefixes every tenant may pull from.
    pub shared: &'a [String],
    pub tenant: &'a str,
}

impl Tenancy<'_> {
    /// `<build_repository>/<tenant>`: the tenant's own prefix, and the default repository of its
    /// builds.
    pub fn prefix(&self) -> String {
        format!(
            "{}/{}",
            self.build_repository.trim_end_matches('/'),
            self.tenant
        )
    }

    /// The repository a build pushes to: the tenant's prefix when the request names none, the
    /// named one when it lies within the prefix. Anything else is `FORBIDDEN`.
    pub fn build_repository(&self, requested: &str) -> Result<String, Rejection> {
        let prefix = self.prefix();
        if requested.is_empty() {
            return Ok(prefix);
        }
        if within(requested, &prefix) {
            return Ok(requested.to_string());
        }
        Err(Rejection::new(
            ErrorCode::Forbidden,
            format!(
                "repository {requested:?} is outside tenant {}'s repositories ({prefix}/...)",
                self.tenant
            ),
        ))
    }

    /// Whether the tenant may pull `repository` of the build registry: its own, or a shared one.
    pub fn may_pull(&self, repository: &str) -> bool {
        within(repository, &self.prefix())
            || self.shared.iter().any(|shared| within(repository, shared))
    }

    /// [`may_pull`](Self::may_pull), as the refusal a request reports.
    pub fn check_pull(&self, image: &str, repository: &str) -> Result<(), Rejection> {
        if self.may_pull(repository) {
            return Ok(());
        }
        Err(Rejection::new(
            ErrorCode::Forbidden,
            format!(
                "{image} is in the build registry outside tenant {}'s repositories ({}/...) and \
                 the shared repositories",
                self.tenant,
                self.prefix()
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenancy<'a>(tenant: &'a str, shared: &'a [String]) -> Tenancy<'a> {
        Tenancy {
            build_repository: "imagemesh/builds",
            shared,
            tenant,
        }
    }

    #[test]
    fn builds_push_under_the_tenant_prefix_only() {
        let a = tenancy("team-a", &[]);
        assert_eq!(a.prefix(), "imagemesh/builds/team-a");
        assert_eq!(a.build_repository("").unwrap(), "imagemesh/builds/team-a");
        assert_eq!(
            a.build_repository("imagemesh/builds/team-a/app").unwrap(),
            "imagemesh/builds/team-a/app"
        );
        for outside in [
            "imagemesh/builds",
            "imagemesh/builds/team-b",
            "imagemesh/builds/team-ab",
            "imagemesh/base",
            "elsewhere/team-a",
        ] {
            let err = a.build_repository(outside).unwrap_err();
            assert_eq!(err.code, ErrorCode::Forbidden, "{outside}");
            assert!(err.message.contains("imagemesh/builds/team-a/"), "{err}");
        }
        let slash = Tenancy {
            build_repository: "imagemesh/builds/",
            ..a
        };
        assert_eq!(slash.prefix(), "imagemesh/builds/team-a");
    }

    #[test]
    fn pulls_reach_the_tenant_prefix_and_the_shared_repositories() {
        let shared = vec!["imagemesh/base".to_string(), "library/".to_string()];
        let a = tenancy("team-a", &shared);
        assert!(a.may_pull("imagemesh/builds/team-a"));
        assert!(a.may_pull("imagemesh/builds/team-a/app"));
        assert!(a.may_pull("imagemesh/base"));
        assert!(a.may_pull("imagemesh/base/busybox"));
        assert!(a.may_pull("library/alpine"));
        assert!(!a.may_pull("imagemesh/builds/team-b"));
        assert!(!a.may_pull("imagemesh/builds"));
        assert!(!a.may_pull("imagemesh/baseline"));
        let err = a.check_pull("r/imagemesh/builds/team-b:x", "imagemesh/builds/team-b");
        assert_eq!(err.unwrap_err().code, ErrorCode::Forbidden);
        assert!(
            tenancy("team-a", &[])
                .check_pull("i", "imagemesh/base")
                .is_err()
        );
    }
}
