//! Docker `config.json`: `auths` entries, `credHelpers` and `credsStore`.
//!
//! Which provider serves a registry, per file: its `credHelpers` entry; else its `auths` entry's
//! inline credential; else, with a `credsStore`, that store (for `auths` entries without an
//! inline credential and for every server the store's `list` names). Hosts are normalised and
//! matched exactly like everywhere else.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use imagemesh_registry::host;
use secrecy::SecretString;
use serde::Deserialize;

use super::{CredentialHelper, Provider, StaticBasic, helper};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DockerConfigFile {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(default)]
    cred_helpers: HashMap<String, String>,
    #[serde(default)]
    creds_store: Option<String>,
}

#[derive(Deserialize)]
struct AuthEntry {
    /// base64("user:password")
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

/// Why a docker config could not be used. Never quotes the file's contents.
#[derive(Debug, thiserror::Error)]
pub enum DockerConfigError {
    #[error("cannot read docker config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("docker config {path} is not valid JSON: line {line}, column {column}")]
    Json {
        path: String,
        line: usize,
        column: usize,
    },
    #[error("docker config {path}: entry for {registry} has no usable auth")]
    Entry { path: String, registry: String },
    #[error("docker config {path}: {reason}")]
    Helper { path: String, reason: String },
}

/// Reads a docker config file: normalised registry host -> provider.
pub async fn load_docker_config(
    path: &Path,
    helper_timeout: Duration,
) -> Result<HashMap<String, Provider>, DockerConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| DockerConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    // serde_json's error Display can quote input; report the position only.
    let file: DockerConfigFile =
        serde_json::from_str(&text).map_err(|e| DockerConfigError::Json {
            path: shown.clone(),
            line: e.line(),
            column: e.column(),
        })?;
    let helper_error = |reason: String| DockerConfigError::Helper {
        path: shown.clone(),
        reason,
    };
    let mut providers = HashMap::new();
    let mut for_store = Vec::new();
    for (registry, entry) in file.auths {
        match entry.credentials() {
            Some((username, password)) => {
                let credential = StaticBasic::new(username, SecretString::from(password));
                providers.insert(host::normalize(&registry), Provider::Static(credential));
            }
            None if file.creds_store.is_some() && entry.is_empty() => for_store.push(registry),
            None => {
                return Err(DockerConfigError::Entry {
                    path: shown.clone(),
                    registry,
                });
            }
        }
    }
    if let Some(store) = &file.creds_store {
        // The store may hold servers the file does not list; ask it once, at startup.
        let listed = helper::list(store, helper_timeout)
            .await
            .map_err(|e| helper_error(format!("credsStore {store}: {e}")))?;
        for server in for_store.into_iter().chain(listed) {
            let registry = host::normalize(&server);
            if providers.contains_key(&registry) {
                continue;
            }
            let helper = CredentialHelper::new(store, &server, helper_timeout)
                .map_err(|e| helper_error(e.to_string()))?;
            providers.insert(registry, Provider::Helper(helper));
        }
    }
    for (server, name) in file.cred_helpers {
        let helper = CredentialHelper::new(&name, &server, helper_timeout)
            .map_err(|e| helper_error(e.to_string()))?;
        providers.insert(host::normalize(&server), Provider::Helper(helper));
    }
    Ok(providers)
}

impl AuthEntry {
    fn is_empty(&self) -> bool {
        self.auth.is_none() && self.username.is_none() && self.password.is_none()
    }

    fn credentials(&self) -> Option<(String, String)> {
        if let (Some(user), Some(password)) = (&self.username, &self.password) {
            return Some((user.clone(), password.clone()));
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(self.auth.as_deref()?.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (user, password) = text.split_once(':')?;
        Some((user.to_string(), password.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use imagemesh_proto::v1::Scope;
    use secrecy::ExposeSecret;

    use super::*;

    const WAIT: Duration = Duration::from_secs(5);

    async fn mint(providers: &HashMap<String, Provider>, registry: &str) -> (String, String) {
        let minted = providers[registry]
            .mint(registry, &Scope::default())
            .await
            .unwrap();
        (minted.username, minted.secret.expose_secret().to_string())
    }

    #[tokio::test]
    async fn reads_auth_and_username_password_entries_with_normalised_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:pa:ss");
        std::fs::write(
            &path,
            format!(
                r#"{{"auths": {{
                    "https://index.docker.io/v1/": {{"auth": "{auth}"}},
                    "ghcr.io": {{"username": "bob", "password": "ghp_token"}}
                }}}}"#
            ),
        )
        .unwrap();
        let creds = load_docker_config(&path, WAIT).await.unwrap();
        assert_eq!(
            mint(&creds, "docker.io").await,
            ("alice".into(), "pa:ss".into())
        );
        assert_eq!(mint(&creds, "ghcr.io").await.0, "bob");
    }

    #[tokio::test]
    async fn errors_do_not_quote_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, r#"{"auths": {"r": {"auth": "c2VjcmV0"}}"#).unwrap();
        let err = load_docker_config(&path, WAIT)
            .await
            .unwrap_err()
            .to_string();
        assert!(!err.contains("c2VjcmV0"), "{err}");
        std::fs::write(&path, r#"{"auths": {"r": {"auth": "bm9jb2xvbg=="}}}"#).unwrap();
        let err = load_docker_config(&path, WAIT)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("entry for r"), "{err}");
    }

    #[tokio::test]
    async fn cred_helpers_win_over_inline_auths_and_names_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("inline:pw");
        std::fs::write(
            &path,
            format!(
                r#"{{"auths": {{"r.example": {{"auth": "{auth}"}}}},
                    "credHelpers": {{"r.example": "imagemesh-test-none"}}}}"#
            ),
        )
        .unwrap();
        let creds = load_docker_config(&path, WAIT).await.unwrap();
        assert_eq!(creds["r.example"].kind(), "helper");
        std::fs::write(&path, r#"{"credHelpers": {"r.example": "../../bin/sh"}}"#).unwrap();
        let err = load_docker_config(&path, WAIT)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("may only hold"), "{err}");
    }
}
