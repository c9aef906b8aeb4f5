//! Which credential a consumer presents to which registry.

use imagemesh_proto::v1::{ContainerRequest, RegistryCredential};

use crate::host;

/// The credential to present to `registry` for this request: the build-registry token when the
/// image lives in the build registry (the same token that pushed it), otherwise the image
/// credential when it is for that registry; `None` means anonymous (a public image).
pub fn credential_for<'a>(
    request: &'a ContainerRequest,
    registry: &str,
) -> Option<&'a RegistryCredential> {
    [&request.build_registry_creds, &request.image_credentials]
        .into_iter()
        .flatten()
        .find(|cred| host::same_registry(&cred.registry, registry))
}

/// The credential to pull `repository` from `registry` with: a base-image credential scoped to
/// exactly that repository, else [`credential_for`] the registry.
pub fn credential_for_image<'a>(
    request: &'a ContainerRequest,
    registry: &str,
    repository: &str,
) -> Option<&'a RegistryCredential> {
    request
        .base_image_credentials
        .iter()
        .find(|cred| {
            host::same_registry(&cred.registry, registry)
                && cred
                    .scope
                    .as_ref()
                    .is_some_and(|s| s.repository == repository)
        })
        .or_else(|| credential_for(request, registry))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cred(registry: &str, user: &str) -> Option<RegistryCredential> {
        Some(RegistryCredential {
            registry: registry.into(),
            username: user.into(),
            ..Default::default()
        })
    }

    #[test]
    fn build_registry_token_first_then_image_credential() {
        let request = ContainerRequest {
            build_registry_creds: cred("build.example:5000", "build"),
            image_credentials: cred("docker.io", "hub"),
            ..Default::default()
        };
        assert_eq!(
            credential_for(&request, "build.example:5000")
                .unwrap()
                .username,
            "build"
        );
        assert_eq!(
            credential_for(&request, "index.docker.io")
                .unwrap()
                .username,
            "hub"
        );
        assert!(credential_for(&request, "build.example:5000.evil").is_none());
    }

    #[test]
    fn a_base_image_credential_serves_only_its_own_repository() {
        let scoped = |registry: &str, repository: &str, user: &str| RegistryCredential {
            registry: registry.into(),
            username: user.into(),
            scope: Some(imagemesh_proto::v1::Scope {
                repository: repository.into(),
                actions: vec!["pull".into()],
            }),
            ..Default::default()
        };
        let request = ContainerRequest {
            build_registry_creds: cred("build.example:5000", "build"),
            base_image_credentials: vec![
                scoped("hub.example", "private/base", "base"),
                scoped("build.example:5000", "team/base", "team"),
            ],
            ..Default::default()
        };
        let user = |registry, repository| {
            credential_for_image(&request, registry, repository).map(|c| c.username.as_str())
        };
        assert_eq!(user("hub.example", "private/base"), Some("base"));
        assert_eq!(user("hub.example", "private/other"), None);
        assert_eq!(user("build.example:5000", "team/base"), Some("team"));
        assert_eq!(
            user("build.example:5000", "imagemesh/builds"),
            Some("build")
        );
    }
}
