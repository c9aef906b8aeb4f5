//! Access checks against a real htpasswd-protected docker-registry.

use imagemesh_proto::v1::{AuthScheme, RegistryCredential};
use imagemesh_registry::{Access, RegistryClient, RegistryErrorKind, RegistrySettings};
use imagemesh_testkit::{Registry, RegistryAuth};
use oci_client::RegistryOperation;

fn basic(registry: &str, user: &str, secret: &str) -> RegistryCredential {
    RegistryCredential {
        registry: registry.into(),
        scheme: AuthScheme::Basic as i32,
        username: user.into(),
        secret: secret.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn the_registry_accepts_the_right_credential_and_rejects_a_wrong_one() {
    let registry = Registry::start(RegistryAuth::Htpasswd(vec![(
        "builder".into(),
        "s3cret-pw".into(),
    )]));
    let addr = registry.addr();
    let settings = RegistrySettings::default();

    let good = RegistryClient::new(addr, Some(&basic(addr, "builder", "s3cret-pw")), &settings);
    let reference = good.reference(&format!("{addr}/team/app:v1")).unwrap();
    let access = good
        .check_access(&reference, RegistryOperation::Pull)
        .await
        .unwrap();
    assert_eq!(access, Access::NoManifest);

    let bad = RegistryClient::new(addr, Some(&basic(addr, "builder", "wrong-pw")), &settings);
    let err = bad
        .check_access(&reference, RegistryOperation::Pull)
        .await
        .unwrap_err();
    assert_eq!(err.kind, RegistryErrorKind::AuthRejected);
    let message = err.to_string();
    assert!(
        message.contains(addr) && message.contains("team/app"),
        "{message}"
    );
    assert!(!message.contains("wrong-pw"), "{message}");

    let anonymous = RegistryClient::new(addr, None, &settings);
    let err = anonymous
        .check_access(&reference, RegistryOperation::Pull)
        .await
        .unwrap_err();
    assert_eq!(err.kind, RegistryErrorKind::AuthRejected);
}

#[tokio::test]
async fn a_stopped_registry_is_unavailable_and_retryable() {
    let mut registry = Registry::start(RegistryAuth::Open);
    let addr = registry.addr().to_string();
    registry.stop();
    let client = RegistryClient::new(&addr, None, &RegistrySettings::default());
    let reference = client.reference(&format!("{addr}/team/app:v1")).unwrap();
    let err = client
        .check_access(&reference, RegistryOperation::Pull)
        .await
        .unwrap_err();
    assert_eq!(err.kind, RegistryErrorKind::Unavailable, "{err}");
    assert!(err.is_retryable());
}

#[test]
fn references_must_name_the_clients_registry() {
    let client = RegistryClient::new("r.example:5000", None, &RegistrySettings::default());
    assert!(client.reference("r.example:5000/a/b:1").is_ok());
    let err = client.reference("other.example/a/b:1").unwrap_err();
    assert_eq!(err.kind, RegistryErrorKind::Invalid);
}
