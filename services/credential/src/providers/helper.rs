//! Docker credential helpers: `docker-credential-<name>` executables on PATH.
//!
//! The protocol (docker/docker-credential-helpers): `get` reads a server URL on stdin and
//! prints `{"ServerURL", "Username", "Secret"}`; `list` prints `{serverURL: username}`. A failing
//! helper exits non-zero with its message on stdout; "credentials not found" means it has none.

use std::process::{Output, Stdio};
use std::time::Duration;

use imagemesh_proto::v1::AuthScheme;
use secrecy::SecretString;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::{Minted, ProviderError};

/// Docker stores OAuth identity tokens under this username; they are not registry passwords.
const IDENTITY_TOKEN_USERNAME: &str = "<token>";
/// How much of a failing helper's message is repeated in an error.
const MESSAGE_LIMIT: usize = 200;

/// Asks one helper for one server's credential.
#[derive(Debug, Clone)]
pub struct CredentialHelper {
    name: String,
    server_url: String,
    timeout: Duration,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HelperCredential {
    username: String,
    secret: SecretString,
}

impl CredentialHelper {
    /// A helper `docker-credential-<name>` asked for `server_url` (as the docker config names it).
    pub fn new(name: &str, server_url: &str, timeout: Duration) -> anyhow::Result<Self> {
        anyhow::ensure!(
            valid_name(name),
            "credential helper name {name:?} may only hold letters, digits, '-', '_' and '.'"
        );
        Ok(Self {
            name: name.to_string(),
            server_url: server_url.to_string(),
            timeout,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn program(&self) -> String {
        program(&self.name)
    }

    /// Runs `get` for the server.
    pub async fn get(&self) -> Result<Minted, ProviderError> {
        let input = format!("{}\n", self.server_url);
        let output = run(&self.program(), "get", input.as_bytes(), self.timeout).await?;
        if !output.status.success() {
            let message = first_line(&output.stdout);
            let error = format!(
                "{} get failed ({}): {message}",
                self.program(),
                output.status
            );
            return Err(if message.contains("credentials not found") {
                ProviderError::NotFound(format!(
                    "credential helper {} has no credentials for {}",
                    self.program(),
                    self.server_url
                ))
            } else {
                ProviderError::Unavailable(error)
            });
        }
        // serde_json's errors can quote input; report only that the answer was unreadable.
        let credential: HelperCredential =
            serde_json::from_slice(&output.stdout).map_err(|_| {
                ProviderError::Unavailable(format!(
                    "{} get printed unreadable JSON",
                    self.program()
                ))
            })?;
        if credential.username == IDENTITY_TOKEN_USERNAME {
            return Err(ProviderError::Rejected(format!(
                "{} holds an identity token for {}, which imagemesh cannot exchange; store a \
                 username and password or token instead",
                self.program(),
                self.server_url
            )));
        }
        Ok(Minted {
            scheme: AuthScheme::Basic,
            username: credential.username,
            secret: credential.secret,
            expires_at: None,
        })
    }
}

/// The server URLs a helper holds credentials for (`list`).
pub async fn list(name: &str, timeout: Duration) -> Result<Vec<String>, ProviderError> {
    let output = run(&program(name), "list", b"", timeout).await?;
    if !output.status.success() {
        return Err(ProviderError::Unavailable(format!(
            "{} list failed ({}): {}",
            program(name),
            output.status,
            first_line(&output.stdout)
        )));
    }
    let servers: std::collections::HashMap<String, String> = serde_json::from_slice(&output.stdout)
        .map_err(|_| {
            ProviderError::Unavailable(format!("{} list printed unreadable JSON", program(name)))
        })?;
    Ok(servers.into_keys().collect())
}

fn program(name: &str) -> String {
    format!("docker-credential-{name}")
}

/// Helper names become part of an executable name looked up on PATH: no paths, no tricks.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

async fn run(
    program: &str,
    action: &str,
    input: &[u8],
    timeout: Duration,
) -> Result<Output, ProviderError> {
    let mut child = Command::new(program)
        .arg(action)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        // A helper's diagnostics are its own business; they never reach our logs.
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                ProviderError::Unavailable(format!("credential helper {program} is not on PATH"))
            }
            _ => ProviderError::Unavailable(format!("cannot run {program}: {e}")),
        })?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let io = async move {
        // A helper that exits without reading its input is its own error, reported by its status.
        let _ = stdin.write_all(input).await;
        drop(stdin);
        child.wait_with_output().await
    };
    match tokio::time::timeout(timeout, io).await {
        Ok(Ok(output)) => Ok(output),
        Ok(Err(e)) => Err(ProviderError::Unavailable(format!(
            "{program} {action}: {e}"
        ))),
        Err(_) => Err(ProviderError::Unavailable(format!(
            "{program} {action} did not answer within {timeout:?}"
        ))),
    }
}

fn first_line(stdout: &[u8]) -> String {
    let text = String::from_utf8_lossy(stdout);
    let line = text.lines().next().unwrap_or("").trim();
    line.chars().take(MESSAGE_LIMIT).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helper_names_cannot_escape_path_lookup() {
        for good in ["pass", "ecr-login", "secret_service", "gcloud.v2"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in ["", "../sh", "a/b", "x y", ".hidden", "$(id)"] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert!(CredentialHelper::new("../../bin/sh", "r", Duration::from_secs(1)).is_err());
    }

    #[tokio::test]
    async fn a_missing_helper_is_reported_by_name() {
        let helper = CredentialHelper::new(
            "imagemesh-surely-not-installed",
            "r.example",
            Duration::from_secs(5),
        )
        .unwrap();
        let err = helper.get().await.unwrap_err().to_string();
        assert!(
            err.contains("docker-credential-imagemesh-surely-not-installed is not on PATH"),
            "{err}"
        );
    }
}
