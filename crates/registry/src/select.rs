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
}
