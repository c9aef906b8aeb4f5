//! The credential service as the token issuer of a real docker-registry in token mode whose
//! `rootcertbundle` holds the issuer's certificate: tokens work for exactly their repository and
//! actions, are refused once expired, survive a key rotation until they expire, and a token
//! signed by a key the registry does not trust is refused. And skopeo, which does the registry's
//! challenge itself, gets its token at the service's HTTP token endpoint with a one-time login.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{CredentialService, can_pull, can_push, seconds_left, secret};
use imagemesh_proto::v1::AuthScheme;
use imagemesh_testkit::Registry;
use imagemesh_testkit::issuer_keys::{SigningKey, UNSERVED_REALM, registry_auth, write_bundle};
use tempfile::TempDir;

const SERVICE: &str = "imagemesh-build-registry";
const ISSUER: &str = "imagemesh-credential";
/// Short tokens for the expiry tests: min_lifetime must stay below the token lifetime.
const SHORT: &str = "[credential]\nmin_lifetime = \"2s\"\n[credential.cache]\nmargin = \"1s\"\nrefresh_ahead = \"1s\"\n";

/// A registry trusting the certificates of `keys`.
fn registry_trusting(dir: &Path, keys: &[&SigningKey]) -> Registry {
    let bundle = write_bundle(&dir.join(format!("bundle-{}.pem", keys.len())), keys);
    Registry::start(registry_auth(SERVICE, ISSUER, bundle, UNSERVED_REALM))
}

/// A credential service issuing tokens for `registry`, signed by `key`.
async fn issuing(
    registry: &Registry,
    key: &SigningKey,
    previous: &[&SigningKey],
    extra: &str,
    lifetime: &str,
) -> CredentialService {
    let previous: Vec<String> = previous
        .iter()
        .map(|k| format!("{:?}", k.certificate.display().to_string()))
        .collect();
    let config = format!(
        "{extra}[[credential.registries]]\nprovider = \"issuer\"\nhost = \"{}\"\nservice = \"{SERVICE}\"\nissuer = \"{ISSUER}\"\nsigning_key = {{ file = {:?} }}\ncertificate = {:?}\nprevious = [{}]\nlifetime = \"{lifetime}\"\n",
        registry.addr(),
        key.key.display().to_string(),
        key.certificate.display().to_string(),
        previous.join(", ")
    );
    CredentialService::start(&config, &[]).await
}

/// Waits until the registry refuses `token` for pulling (it may grant some leeway past `exp`).
async fn refused_eventually(registry: &Registry, repository: &str, token: &str) -> Duration {
    let start = Instant::now();
    while can_pull(registry, repository, token).await {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the registry still accepts an expired token"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    start.elapsed()
}

fn keys() -> (TempDir, SigningKey) {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::generate(dir.path(), "current");
    (dir, key)
}

#[tokio::test]
async fn a_pull_token_pulls_only_its_repository_and_a_push_token_pushes() {
    let (dir, key) = keys();
    let registry = registry_trusting(dir.path(), &[&key]);
    let service = issuing(&registry, &key, &[], "", "5m").await;
    let addr = registry.addr();

    let pull = service.mint(addr, "team/app", &["pull"]).await.unwrap();
    let credential = pull.credential.as_ref().unwrap();
    assert_eq!(credential.scheme(), AuthScheme::Bearer);
    let left = seconds_left(&pull);
    assert!((295..=300).contains(&left), "a 5 min token has {left} s");
    assert!(can_pull(&registry, "team/app", secret(&pull)).await);
    assert!(
        !can_push(&registry, "team/app", secret(&pull)).await,
        "pull only"
    );
    assert!(
        !can_pull(&registry, "team/other", secret(&pull)).await,
        "exactly one repository"
    );

    let push = service
        .mint(addr, "team/app", &["pull", "push"])
        .await
        .unwrap();
    assert!(can_push(&registry, "team/app", secret(&push)).await);
    assert!(can_pull(&registry, "team/app", secret(&push)).await);
    assert!(!can_push(&registry, "team/other", secret(&push)).await);

    // The mounter's refresh endpoint gets a pull token too, served from the cache.
    let refreshed = service.refresh(addr, "team/app", &["pull"]).await.unwrap();
    assert!(refreshed.cached);
    assert!(can_pull(&registry, "team/app", secret(&refreshed)).await);

    let key_pem = key.key_pem();
    let key_body = key_pem.lines().nth(1).expect("a PEM body line");
    service.assert_no_secret_in_logs(&[key_body, secret(&pull), secret(&push)]);
}

#[tokio::test]
async fn a_token_is_refused_by_the_registry_after_it_expires_and_a_fresh_one_is_minted() {
    let (dir, key) = keys();
    let registry = registry_trusting(dir.path(), &[&key]);
    let service = issuing(&registry, &key, &[], SHORT, "3s").await;
    let first = service
        .mint(registry.addr(), "team/app", &["pull"])
        .await
        .unwrap();
    assert!(seconds_left(&first) <= 3);
    assert!(can_pull(&registry, "team/app", secret(&first)).await);
    let waited = refused_eventually(&registry, "team/app", secret(&first)).await;
    assert!(waited >= Duration::from_secs(1), "refused after {waited:?}");

    let second = service
        .mint(registry.addr(), "team/app", &["pull"])
        .await
        .unwrap();
    assert!(!second.cached, "an expired token is never handed out");
    assert_ne!(secret(&second), secret(&first));
    assert!(can_pull(&registry, "team/app", secret(&second)).await);
}

#[tokio::test]
async fn tokens_of_the_old_key_work_after_a_rotation_until_they_expire() {
    let dir = tempfile::tempdir().unwrap();
    let old = SigningKey::generate(dir.path(), "old");
    let new = SigningKey::generate(dir.path(), "new");
    // Step 1 of a rotation: the registry trusts both certificates.
    let registry = registry_trusting(dir.path(), &[&old, &new]);
    let before = issuing(&registry, &old, &[], SHORT, "4s").await;
    let old_token = before
        .mint(registry.addr(), "team/app", &["pull"])
        .await
        .unwrap();
    drop(before);
    // Step 2: the credential service signs with the new key, the old one listed as previous.
    let after = issuing(&registry, &new, &[&old], "", "5m").await;
    let new_token = after
        .mint(registry.addr(), "team/app", &["pull"])
        .await
        .unwrap();
    assert!(can_pull(&registry, "team/app", secret(&old_token)).await);
    assert!(can_pull(&registry, "team/app", secret(&new_token)).await);
    // Tokens of the old key live out their lifetime, then only the new key's work.
    refused_eventually(&registry, "team/app", secret(&old_token)).await;
    assert!(can_pull(&registry, "team/app", secret(&new_token)).await);

    // Step 3: the old certificate leaves the bundle.
    let trimmed = registry_trusting(dir.path(), &[&new]);
    assert!(can_pull(&trimmed, "team/app", secret(&new_token)).await);
}

#[tokio::test]
async fn a_token_signed_by_a_key_the_registry_does_not_trust_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let trusted = SigningKey::generate(dir.path(), "trusted");
    let unknown = SigningKey::generate(dir.path(), "unknown");
    let registry = registry_trusting(dir.path(), &[&trusted]);
    let service = issuing(&registry, &unknown, &[], "", "5m").await;
    let token = service
        .mint(registry.addr(), "team/app", &["pull", "push"])
        .await
        .unwrap();
    assert!(!can_pull(&registry, "team/app", secret(&token)).await);
    assert!(!can_push(&registry, "team/app", secret(&token)).await);
    let trusted_service = issuing(&registry, &trusted, &[], "", "5m").await;
    let good = trusted_service
        .mint(registry.addr(), "team/app", &["pull"])
        .await
        .unwrap();
    assert!(can_pull(&registry, "team/app", secret(&good)).await);
}

/// What the token endpoint answers a login (as HTTP Basic) for `scope`.
async fn exchange(
    realm: &str,
    service: &str,
    scope: &str,
    login: Option<&str>,
) -> reqwest::StatusCode {
    let mut request = reqwest::Client::new()
        .get(realm)
        .query(&[("service", service), ("scope", scope)]);
    if let Some(login) = login {
        request = request.basic_auth("imagemesh-login", Some(login));
    }
    request
        .send()
        .await
        .expect("token endpoint answers")
        .status()
}

#[tokio::test]
async fn skopeo_pushes_with_a_one_time_login_at_the_token_endpoint_and_nothing_else_gets_a_token() {
    let (dir, key) = keys();
    let port = imagemesh_testkit::free_port();
    let realm = format!("http://127.0.0.1:{port}/token");
    let bundle = write_bundle(&dir.path().join("bundle.pem"), &[&key]);
    let registry = Registry::start(registry_auth(SERVICE, ISSUER, bundle, &realm));
    let endpoint = format!("[credential.token_endpoint]\nlisten = \"127.0.0.1:{port}\"\n");
    let service = issuing(&registry, &key, &[], &endpoint, "5m").await;
    let addr = registry.addr().to_string();
    let login = |repository: &'static str, actions: &'static [&'static str]| {
        let service = &service;
        let addr = addr.clone();
        async move {
            let mut request = common::token_request(&addr, repository, actions);
            request.login = true;
            let response = service.credentials().mint(&request).await.unwrap();
            response.credential.unwrap()
        }
    };

    // skopeo: registry challenge -> our realm with the login -> token -> push.
    let push = login("team/app", &["pull", "push"]).await;
    assert_eq!(push.scheme(), AuthScheme::Basic);
    assert_eq!(push.username, "imagemesh-login");
    let left = push.expires_at_unix().unwrap() - common::now_unix();
    assert!(
        (100..=120).contains(&left),
        "a login lives 2 min, this one {left} s"
    );
    let (user, secret) = (push.username.clone(), push.secret.clone());
    let pushed = {
        let addr = addr.clone();
        tokio::task::spawn_blocking(move || {
            imagemesh_testkit::images::try_push_busybox(&addr, "team/app:v1", &user, &secret)
        })
    };
    pushed.await.unwrap().expect("skopeo pushes with the login");

    // The same login a second time: refused, by skopeo's run and by a direct request.
    let again = {
        let (addr, user, secret) = (addr.clone(), push.username.clone(), push.secret.clone());
        tokio::task::spawn_blocking(move || {
            imagemesh_testkit::images::try_push_busybox(&addr, "team/app:v2", &user, &secret)
        })
    };
    let err = again.await.unwrap().expect_err("a login works once");
    assert!(
        err.to_lowercase().contains("unauthorized") || err.contains("401"),
        "{err}"
    );
    let scope = "repository:team/app:pull,push";
    assert_eq!(
        exchange(&realm, SERVICE, scope, Some(&push.secret)).await,
        reqwest::StatusCode::UNAUTHORIZED
    );

    // A pull login buys no push, another repository, another service; none is not a login.
    let pull = login("team/app", &["pull"]).await;
    for (service_name, scope, expected) in [
        (
            SERVICE,
            "repository:team/app:push",
            reqwest::StatusCode::FORBIDDEN,
        ),
        (
            SERVICE,
            "repository:other/app:pull",
            reqwest::StatusCode::FORBIDDEN,
        ),
        (
            "another-registry",
            "repository:team/app:pull",
            reqwest::StatusCode::FORBIDDEN,
        ),
    ] {
        assert_eq!(
            exchange(&realm, service_name, scope, Some(&pull.secret)).await,
            expected,
            "{service_name} {scope}"
        );
    }
    assert_eq!(
        exchange(&realm, SERVICE, "repository:team/app:pull", None).await,
        reqwest::StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        exchange(
            &realm,
            SERVICE,
            "repository:team/app:pull",
            Some("forged.login")
        )
        .await,
        reqwest::StatusCode::UNAUTHORIZED
    );
    // The refusals did not use the login up: it still buys its pull token, which pulls.
    let answer: serde_json::Value = reqwest::Client::new()
        .get(&realm)
        .query(&[
            ("service", SERVICE),
            ("scope", "repository:team/app:pull,push"),
        ])
        .basic_auth("imagemesh-login", Some(&pull.secret))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = answer["token"].as_str().expect("a token");
    assert!(!can_pull(&registry, "other/app", token).await);
    assert_eq!(
        registry
            .answer_with_token(reqwest::Method::GET, "team/app/tags/list", token)
            .await,
        reqwest::StatusCode::OK
    );
    assert!(!can_push(&registry, "team/app", token).await);

    // A login exists only for issuer registries, and only the scheduler's mint endpoint (NATS
    // permissions) hands them out; the mounter's refresh endpoint does not.
    let mut refresh = common::token_request(&addr, "team/app", &["pull"]);
    refresh.login = true;
    let refused = service.credentials().refresh(&refresh).await;
    assert!(refused.is_err(), "refresh handed out a login");
    service.assert_no_secret_in_logs(&[&push.secret, &pull.secret, token]);
}
