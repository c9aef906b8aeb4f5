//! Docker `config.json` with `auths`, `credHelpers` and `credsStore`, served by real
//! `docker-credential-<name>` executables (shell scripts on the service's PATH).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use base64::Engine;
use common::{CredentialService, assert_refused, secret};
use imagemesh_runtime::ErrorCode;

const HELPER_SECRET: &str = "helper-Secret-7hQ2";
const STORE_SECRET: &str = "store-Secret-3mV9";
const INLINE_PASSWORD: &str = "inline-Pw-5xK1";

/// Writes `docker-credential-<name>`: logs each action to `calls.<name>`, answers `get` from
/// `answers` (server -> (user, secret)), says "credentials not found" otherwise, and lists
/// `listed` servers.
fn write_helper(bin: &Path, name: &str, answers: &[(&str, &str, &str)], listed: &[&str]) {
    let mut cases = String::new();
    for (server, user, secret) in answers {
        cases.push_str(&format!(
            "    '{server}') printf '{{\"ServerURL\":\"%s\",\"Username\":\"{user}\",\"Secret\":\"{secret}\"}}' \"$server\" ;;\n"
        ));
    }
    let list: Vec<String> = listed.iter().map(|s| format!("\"{s}\":\"u\"")).collect();
    let script = format!(
        "#!/bin/sh\necho \"$1\" >> '{log}'\ncase \"$1\" in\n  get)\n    read -r server\n    case \"$server\" in\n{cases}    *) echo 'credentials not found in native keychain'; exit 1 ;;\n    esac ;;\n  list) printf '{{{list}}}' ;;\n  *) echo 'unknown action'; exit 1 ;;\nesac\n",
        log = bin.join(format!("calls.{name}")).display(),
        list = list.join(","),
    );
    let path = bin.join(format!("docker-credential-{name}"));
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn calls(bin: &Path, name: &str) -> Vec<String> {
    std::fs::read_to_string(bin.join(format!("calls.{name}")))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

async fn start(dir: &Path, share: bool) -> CredentialService {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    write_helper(
        &bin,
        "imtest-helper",
        &[("helper.example:5000", "helper-user", HELPER_SECRET)],
        &[],
    );
    write_helper(
        &bin,
        "imtest-store",
        &[
            ("https://store.example", "store-user", STORE_SECRET),
            ("empty.example", "empty-user", STORE_SECRET),
        ],
        &["https://store.example"],
    );
    let inline =
        base64::engine::general_purpose::STANDARD.encode(format!("inline:{INLINE_PASSWORD}"));
    let config_json = format!(
        r#"{{"auths": {{"static.example": {{"auth": "{inline}"}}, "empty.example": {{}}, "gone.example": {{}}}},
            "credHelpers": {{"helper.example:5000": "imtest-helper"}},
            "credsStore": "imtest-store"}}"#
    );
    let docker_config = dir.join("config.json");
    std::fs::write(&docker_config, config_json).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let config = format!(
        "[credential]\ndocker_config = [\"{}\"]\ndocker_config_share_long_term_secret = {share}\n",
        docker_config.display()
    );
    CredentialService::start(&config, &[("PATH", &path)]).await
}

#[tokio::test]
async fn cred_helpers_creds_store_and_inline_auths_each_serve_their_registries() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    let service = start(dir.path(), true).await;
    assert_eq!(
        calls(&bin, "imtest-store"),
        vec!["list"],
        "the store is listed once at startup"
    );

    let helped = service
        .mint("helper.example:5000", "team/app", &["pull"])
        .await
        .unwrap();
    let credential = helped.credential.as_ref().unwrap();
    assert_eq!(
        (credential.username.as_str(), secret(&helped)),
        ("helper-user", HELPER_SECRET)
    );
    assert!(
        credential.expires_at.is_none(),
        "helpers give no expiry; none is invented"
    );
    assert!(!helped.cached);
    let again = service
        .mint("helper.example:5000", "team/app", &["pull"])
        .await
        .unwrap();
    assert!(again.cached);
    assert_eq!(
        calls(&bin, "imtest-helper"),
        vec!["get"],
        "asked once, then cached"
    );

    let listed = service
        .mint("store.example", "team/app", &["pull"])
        .await
        .unwrap();
    assert_eq!(listed.credential.unwrap().username, "store-user");
    let empty_entry = service
        .mint("empty.example", "team/app", &["pull"])
        .await
        .unwrap();
    assert_eq!(secret(&empty_entry), STORE_SECRET);
    let inline = service
        .mint("static.example", "team/app", &["pull"])
        .await
        .unwrap();
    assert_eq!(secret(&inline), INLINE_PASSWORD);

    service.assert_no_secret_in_logs(&[HELPER_SECRET, STORE_SECRET, INLINE_PASSWORD]);
}

#[tokio::test]
async fn without_the_opt_in_docker_config_secrets_never_leave_and_helpers_are_not_asked() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    let service = start(dir.path(), false).await;
    for registry in ["helper.example:5000", "store.example", "static.example"] {
        let refused = service.mint(registry, "team/app", &["pull"]).await;
        let rejection = refused.expect_err("a long-term secret handed out without the opt-in");
        assert_eq!(rejection.code, ErrorCode::Forbidden, "{rejection}");
        assert!(
            rejection.message.contains("share_long_term_secret"),
            "{rejection}"
        );
    }
    assert!(
        calls(&bin, "imtest-helper").is_empty(),
        "the helper was asked"
    );
    service.assert_no_secret_in_logs(&[HELPER_SECRET, STORE_SECRET, INLINE_PASSWORD]);
}

#[tokio::test]
async fn helpers_are_never_asked_about_registries_they_do_not_serve() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    let service = start(dir.path(), true).await;
    for host in [
        "unknown.example",
        "helper.example:5000.attacker.net",
        "helper.example",
        "evil-store.example",
    ] {
        let result = service.mint(host, "team/app", &["pull"]).await;
        assert_refused(result, ErrorCode::NoCredentials, host);
    }
    assert!(calls(&bin, "imtest-helper").is_empty());
    assert_eq!(calls(&bin, "imtest-store"), vec!["list"]);

    // A store entry the store has nothing for: a clear NO_CREDENTIALS, asked again next time.
    for _ in 0..2 {
        let gone = service.mint("gone.example", "team/app", &["pull"]).await;
        assert_refused(gone, ErrorCode::NoCredentials, "gone.example");
    }
    assert_eq!(calls(&bin, "imtest-store"), vec!["list", "get", "get"]);
    service.assert_no_secret_in_logs(&[HELPER_SECRET, STORE_SECRET, INLINE_PASSWORD]);
}
