//! Distribution token auth against a real docker-registry configured with `auth.token` and a
//! token server the test runs: tokens work at the registry for exactly their scope, concurrent
//! requests collapse (counted at the token server), failures are not cached, short-lived tokens
//! get the minimum lifetime and are refreshed ahead of expiry.

mod common;

use std::time::Duration;

use common::{CredentialService, assert_refused, can_pull, can_push, seconds_left, secret};
use imagemesh_proto::v1::AuthScheme;
use imagemesh_runtime::ErrorCode;
use imagemesh_testkit::Registry;
use imagemesh_testkit::token_server::TokenServer;

const USER: &str = "imagemesh-svc";
const PASSWORD: &str = "tok-Pw-9vQ2xLm4Rt";

struct Setup {
    tokens: TokenServer,
    registry: Registry,
    service: CredentialService,
}

async fn setup(extra: &str) -> Setup {
    let tokens = TokenServer::start("imagemesh-test-registry", &[(USER, PASSWORD)]);
    let registry = Registry::start(tokens.registry_auth());
    let config = format!(
        "{extra}[[credential.registries]]\nprovider = \"token\"\nhost = \"{}\"\nusername = \"{USER}\"\npassword = {{ env = \"TEST_TOKEN_PASSWORD\" }}\n",
        registry.addr()
    );
    let service = CredentialService::start(&config, &[("TEST_TOKEN_PASSWORD", PASSWORD)]).await;
    Setup {
        tokens,
        registry,
        service,
    }
}

#[tokio::test]
async fn bearer_tokens_work_at_the_registry_for_exactly_their_scope() {
    let s = setup("").await;
    let registry = s.registry.addr();
    let push = s
        .service
        .mint(registry, "team/app", &["pull", "push"])
        .await
        .unwrap();
    let credential = push.credential.as_ref().unwrap();
    assert_eq!(credential.scheme(), AuthScheme::Bearer);
    let left = seconds_left(&push);
    assert!((290..=300).contains(&left), "expires_in 300 gives {left} s");
    assert!(can_push(&s.registry, "team/app", secret(&push)).await);
    assert!(can_pull(&s.registry, "team/app", secret(&push)).await);
    assert!(
        !can_pull(&s.registry, "team/other", secret(&push)).await,
        "scoped to one repository"
    );

    let pull = s
        .service
        .refresh(registry, "team/app", &["pull"])
        .await
        .unwrap();
    assert!(can_pull(&s.registry, "team/app", secret(&pull)).await);
    assert!(
        !can_push(&s.registry, "team/app", secret(&pull)).await,
        "pull-only token"
    );

    assert_eq!(
        s.tokens.scopes(),
        vec!["repository:team/app:pull,push", "repository:team/app:pull"]
    );
    s.service
        .assert_no_secret_in_logs(&[PASSWORD, secret(&push), secret(&pull)]);
}

#[tokio::test]
async fn a_hundred_concurrent_requests_make_one_token_server_call() {
    let s = setup("").await;
    let client = s.service.credentials();
    let request = common::token_request(s.registry.addr(), "team/app", &["pull", "push"]);
    let calls = (0..100).map(|_| {
        let client = client.clone();
        let request = request.clone();
        async move { client.mint(&request).await }
    });
    let responses = futures::future::join_all(calls).await;
    assert_eq!(s.tokens.requests(), 1, "counted at the token server");
    let first = secret(responses[0].as_ref().unwrap()).to_string();
    assert!(
        responses
            .iter()
            .all(|r| secret(r.as_ref().unwrap()) == first)
    );

    let other_scope = s
        .service
        .mint(s.registry.addr(), "team/app", &["pull"])
        .await
        .unwrap();
    assert!(!other_scope.cached, "another scope is another key");
    assert_eq!(s.tokens.requests(), 2);
    s.service
        .assert_no_secret_in_logs(&[PASSWORD, &first, secret(&other_scope)]);
}

#[tokio::test]
async fn failures_are_not_cached_and_a_wrong_password_is_a_clear_rejection() {
    let s = setup("").await;
    let registry = s.registry.addr();
    s.tokens.set_failing(true);
    let down = s.service.mint(registry, "team/app", &["pull"]).await;
    assert_refused(down, ErrorCode::CredentialUnavailable, registry);
    s.tokens.set_failing(false);
    let up = s
        .service
        .mint(registry, "team/app", &["pull"])
        .await
        .unwrap();
    assert!(!up.cached);
    assert_eq!(s.tokens.requests(), 2, "the failure was not cached");

    let wrong = CredentialService::start(
        &format!(
            "[[credential.registries]]\nprovider = \"token\"\nhost = \"{registry}\"\nusername = \"{USER}\"\npassword = {{ env = \"TEST_TOKEN_PASSWORD\" }}\n"
        ),
        &[("TEST_TOKEN_PASSWORD", "wrong-Pw-4kd8")],
    )
    .await;
    let rejected = wrong.mint(registry, "team/app", &["pull"]).await;
    let rejection = rejected.as_ref().expect_err("rejected");
    assert!(rejection.message.contains("401"), "{rejection}");
    assert_refused(rejected, ErrorCode::CredentialRejected, registry);
    let again = wrong.mint(registry, "team/app", &["pull"]).await;
    assert_refused(again, ErrorCode::CredentialRejected, registry);
    assert_eq!(s.tokens.requests(), 4, "rejections are not cached either");
    wrong.assert_no_secret_in_logs(&["wrong-Pw-4kd8"]);
    s.service.assert_no_secret_in_logs(&[PASSWORD, secret(&up)]);
}

#[tokio::test]
async fn tokens_without_or_with_a_tiny_lifetime_are_not_refreshed_in_a_loop() {
    let s = setup("").await;
    let registry = s.registry.addr();
    // No expires_in: the spec's 60 s.
    s.tokens.set_expires_in(None);
    let default = s.service.mint(registry, "team/a", &["pull"]).await.unwrap();
    let left = seconds_left(&default);
    assert!((55..=60).contains(&left), "{left}");
    // Already expired on arrival: raised to min_lifetime (60 s), served from the cache.
    s.tokens.set_expires_in(Some(0));
    let expired = s.service.mint(registry, "team/b", &["pull"]).await.unwrap();
    let left = seconds_left(&expired);
    assert!((55..=61).contains(&left), "{left}");
    for _ in 0..20 {
        assert!(
            s.service
                .mint(registry, "team/b", &["pull"])
                .await
                .unwrap()
                .cached
        );
    }
    assert_eq!(s.tokens.requests(), 2);
}

#[tokio::test]
async fn tokens_are_refreshed_in_the_background_before_they_expire() {
    // 10 s tokens, 1 s margin, refresh from 5 s: requests keep being served from the cache
    // while the token is replaced behind them.
    let s = setup(
        "[credential]\nmin_lifetime = \"2s\"\n[credential.cache]\nmargin = \"1s\"\nrefresh_ahead = \"4s\"\n",
    )
    .await;
    s.tokens.set_expires_in(Some(10));
    let registry = s.registry.addr();
    let first = s
        .service
        .mint(registry, "team/app", &["pull"])
        .await
        .unwrap();
    let first_secret = secret(&first).to_string();
    let mut served = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let replaced = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no background refresh happened"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let response = s
            .service
            .mint(registry, "team/app", &["pull"])
            .await
            .unwrap();
        served.push(response.cached);
        if secret(&response) != first_secret {
            break response;
        }
    };
    assert!(
        served.iter().all(|cached| *cached),
        "no request waited for the refresh"
    );
    assert!(replaced.cached);
    assert_eq!(s.tokens.requests(), 2);
    assert!(can_pull(&s.registry, "team/app", secret(&replaced)).await);
    s.service
        .assert_no_secret_in_logs(&[PASSWORD, &first_secret, secret(&replaced)]);
}

/// A repository name is a token scope's middle part: a name that is not one could widen the
/// scope (`*`, a `:`, a second `repository:` clause) and is refused before any upstream call,
/// on mint and on refresh alike.
#[tokio::test]
async fn scope_injection_is_refused_and_never_reaches_the_token_server() {
    let s = setup("").await;
    let registry = s.registry.addr();
    let attempts = [
        "",
        "*",
        "team/app:pull,push",
        "team/app:pull repository:other/app:push",
        "team/app,other/app",
        "team app",
        "Team/App",
        "team/../other",
    ];
    for repository in attempts {
        let minted = s.service.mint(registry, repository, &["pull"]).await;
        let rejection = minted.expect_err(repository);
        assert_eq!(
            rejection.code,
            ErrorCode::MalformedRequest,
            "{repository:?}: {rejection}"
        );
        let refreshed = s.service.refresh(registry, repository, &["pull"]).await;
        let rejection = refreshed.expect_err(repository);
        assert_eq!(
            rejection.code,
            ErrorCode::MalformedRequest,
            "{repository:?}: {rejection}"
        );
    }
    assert_eq!(
        s.tokens.requests(),
        0,
        "the token server saw an injected scope"
    );
    // A valid name still gets exactly its scope upstream.
    s.service
        .mint(registry, "team/app", &["pull"])
        .await
        .unwrap();
    assert_eq!(s.tokens.scopes(), ["repository:team/app:pull"]);
}
