//! Docker `config.json` `auths` entries.

use std::collections::HashMap;
use std::path::Path;

use base64::Engine;
use imagemesh_registry::host;
use secrecy::SecretString;
use serde::Deserialize;

use super::StaticBasic;

#[derive(Deserialize)]
struct DockerConfigFile {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
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
}

/// Reads the `auths` of a docker config file: normalised registry host -> static credential.
pub fn load_docker_config(path: &Path) -> Result<HashMap<String, StaticBasic>, DockerConfigError> {
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
    let mut credentials = HashMap::new();
    for (registry, entry) in file.auths {
        let (username, password) = entry
            .credentials()
            .ok_or_else(|| DockerConfigError::Entry {
                path: shown.clone(),
                registry: registry.clone(),
            })?;
        credentials.insert(
            host::normalize(&registry),
            StaticBasic::new(username, SecretString::from(password)),
        );
    }
    Ok(credentials)
}

impl AuthEntry {
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
    use secrecy::ExposeSecret;

    use super::*;

    #[test]
    fn reads_auth_and_username_password_entries_with_normalised_hosts() {
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
        let creds = load_docker_config(&path).unwrap();
        let hub = creds["docker.io"].mint();
        assert_eq!(hub.username, "alice");
        assert_eq!(hub.secret.expose_secret(), "pa:ss");
        assert_eq!(creds["ghcr.io"].mint().username, "bob");
    }

    #[test]
    fn errors_do_not_quote_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, r#"{"auths": {"r": {"auth": "c2VjcmV0"}}"#).unwrap();
        let err = load_docker_config(&path).unwrap_err().to_string();
        assert!(!err.contains("c2VjcmV0"), "{err}");
        std::fs::write(&path, r#"{"auths": {"r": {"auth": "bm9jb2xvbg=="}}}"#).unwrap();
        let err = load_docker_config(&path).unwrap_err().to_string();
        assert!(err.contains("entry for r"), "{err}");
    }
}
