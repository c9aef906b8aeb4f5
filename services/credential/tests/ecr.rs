//! ECR through a real moto_server: tokens from static keys and from the default AWS credential
//! chain, the region taken from the host, moto's already-expired tokens, collapse of concurrent
//! requests (counted by moto's request recorder), and exact host matching.

mod common;

use common::{CredentialService, assert_refused, seconds_left, secret};
use imagemesh_proto::v1::AuthScheme;
use imagemesh_runtime::ErrorCode;
use imagemesh_testkit::moto::Moto;

const ECR_HOST: &str = "123456789012.dkr.ecr.eu-west-1.amazonaws.com";
const OPERATION: &str = "GetAuthorizationToken";
/// moto's registry password: base64-decoded `AWS:123456789012-auth-token`.
const MOTO_PASSWORD: &str = "123456789012-auth-token";
const KEY_ID: &str = "AKIAIMAGEMESHTEST01";
const SECRET_KEY: &str = "moto-Secret-Kz81vQx4LbN2";

fn static_keys_config(moto: &Moto) -> String {
    format!(
        "[[credential.registries]]\nprovider = \"ecr\"\nhost = \"{ECR_HOST}\"\nendpoint_url = \"{}\"\naccess_key_id = {{ env = \"TEST_ECR_KEY_ID\" }}\nsecret_access_key = {{ env = \"TEST_ECR_SECRET\" }}\n",
        moto.endpoint()
    )
}

/// Keeps the default chain away from this machine's own AWS files and metadata service.
const ISOLATED_AWS: [(&str, &str); 3] = [
    ("AWS_EC2_METADATA_DISABLED", "true"),
    ("AWS_CONFIG_FILE", "/nonexistent/imagemesh-aws-config"),
    (
        "AWS_SHARED_CREDENTIALS_FILE",
        "/nonexistent/imagemesh-aws-credentials",
    ),
];

async fn start_with_static_keys(moto: &Moto) -> CredentialService {
    let mut env = vec![("TEST_ECR_KEY_ID", KEY_ID), ("TEST_ECR_SECRET", SECRET_KEY)];
    env.extend(ISOLATED_AWS);
    CredentialService::start(&static_keys_config(moto), &env).await
}

#[tokio::test]
async fn a_hundred_concurrent_requests_make_one_get_authorization_token_call() {
    let moto = Moto::start();
    let service = start_with_static_keys(&moto).await;
    let client = service.credentials();
    let request = common::token_request(ECR_HOST, "team/app", &["pull", "push"]);
    let calls = (0..100).map(|_| {
        let client = client.clone();
        let request = request.clone();
        async move { client.mint(&request).await }
    });
    let responses = futures::future::join_all(calls).await;

    assert_eq!(
        moto.calls(OPERATION),
        1,
        "one upstream call for 100 requests"
    );
    for response in &responses {
        let response = response.as_ref().expect("token");
        let credential = response.credential.as_ref().unwrap();
        assert_eq!(credential.username, "AWS");
        assert_eq!(credential.secret, MOTO_PASSWORD);
        assert_eq!(credential.scheme(), AuthScheme::Basic);
        assert_eq!(credential.registry, ECR_HOST);
    }
    // The keys from the config were used, in the region named by the host.
    assert_eq!(
        moto.signers(OPERATION),
        vec![(KEY_ID.to_string(), "eu-west-1".to_string())]
    );

    let again = service
        .mint(ECR_HOST, "team/app", &["push", "pull"])
        .await
        .unwrap();
    assert!(again.cached, "served from the cache");
    assert_eq!(moto.calls(OPERATION), 1);

    service.assert_no_secret_in_logs(&[SECRET_KEY, MOTO_PASSWORD]);
}

#[tokio::test]
async fn moto_tokens_expired_in_2015_live_min_lifetime_and_cause_no_refresh_loop() {
    let moto = Moto::start();
    let service = start_with_static_keys(&moto).await;
    let first = service.mint(ECR_HOST, "team/app", &["pull"]).await.unwrap();
    assert!(!first.cached);
    // The 2015 expiry is reported as the default min_lifetime (60 s) from now.
    let left = seconds_left(&first);
    assert!((55..=61).contains(&left), "{left} s left");
    for _ in 0..20 {
        let again = service.mint(ECR_HOST, "team/app", &["pull"]).await.unwrap();
        assert!(again.cached);
        assert_eq!(
            again.credential.unwrap().expires_at,
            first.credential.as_ref().unwrap().expires_at
        );
    }
    assert_eq!(moto.calls(OPERATION), 1, "no refresh loop");
    service.assert_no_secret_in_logs(&[SECRET_KEY, MOTO_PASSWORD]);
}

#[tokio::test]
async fn the_default_aws_credential_chain_is_used_without_static_keys() {
    let moto = Moto::start();
    let config = format!(
        "[[credential.registries]]\nprovider = \"ecr\"\nhost = \"{ECR_HOST}\"\nendpoint_url = \"{}\"\n",
        moto.endpoint()
    );
    let mut env = vec![
        ("AWS_ACCESS_KEY_ID", "AKIACHAINTEST0000002"),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
    ];
    env.extend(ISOLATED_AWS);
    let service = CredentialService::start(&config, &env).await;
    let response = service.mint(ECR_HOST, "team/app", &["pull"]).await.unwrap();
    assert_eq!(secret(&response), MOTO_PASSWORD);
    assert_eq!(
        moto.signers(OPERATION),
        vec![("AKIACHAINTEST0000002".to_string(), "eu-west-1".to_string())]
    );
    service.assert_no_secret_in_logs(&[SECRET_KEY, MOTO_PASSWORD]);
}

#[tokio::test]
async fn look_alike_hosts_get_nothing_and_reach_no_upstream() {
    let moto = Moto::start();
    let service = start_with_static_keys(&moto).await;
    for host in [
        "evil-amazonaws.com.example",
        "123456789012.dkr.ecr.eu-west-1.amazonaws.com.attacker.net",
        "registry.example.com.attacker.net",
        "dkr.ecr.eu-west-1.amazonaws.com",
        "123456789012.dkr.ecr.eu-west-1.amazonaws.com:5000",
    ] {
        let result = service.mint(host, "team/app", &["pull"]).await;
        assert_refused(result, ErrorCode::NoCredentials, host);
    }
    assert_eq!(moto.calls(OPERATION), 0);
    // The exact host, written with a scheme and in capitals, is the same registry.
    let upper = format!("https://{}", ECR_HOST.to_uppercase());
    assert!(service.mint(&upper, "team/app", &["pull"]).await.is_ok());
    service.assert_no_secret_in_logs(&[SECRET_KEY, MOTO_PASSWORD]);
}

#[tokio::test]
async fn the_refresh_endpoint_hands_out_pull_only() {
    let moto = Moto::start();
    let service = start_with_static_keys(&moto).await;
    let pull = service
        .refresh(ECR_HOST, "team/app", &["pull"])
        .await
        .unwrap();
    assert_eq!(
        pull.credential.unwrap().scope.unwrap().actions,
        vec!["pull"]
    );
    let push = service
        .refresh(ECR_HOST, "team/app", &["pull", "push"])
        .await;
    let rejection = push.expect_err("push refused on refresh");
    assert_eq!(rejection.code, ErrorCode::Forbidden);
    assert!(rejection.message.contains("pull only"), "{rejection}");
}
