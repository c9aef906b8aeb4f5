//! Connecting to NATS.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::{Client, ConnectOptions};
use serde::{Deserialize, Serialize};

/// How a service reaches NATS. Every field can be overridden by `IMAGEMESH_NATS__<FIELD>`;
/// `url` also by `NATS_URL`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated, e.g. `nats://127.0.0.1:4222`.
    pub url: String,
    /// NATS credentials file (JWT + nkey seed) for decentralized auth.
    pub credentials_file: Option<PathBuf>,
    /// File holding this identity's nkey seed (`imagemesh nats-config` makes one per
    /// identity); the server knows the identity by the seed's public key. The connection's
    /// replies then come to the identity's private inbox ([`inbox_prefix`]).
    pub nkey_file: Option<PathBuf>,
    /// CA bundle to verify the server's certificate (enables TLS).
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate and key for mutual TLS.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Refuse to talk to a server without TLS.
    pub tls_required: bool,
    /// How long to keep trying to reach the server at startup.
    #[serde(with = "humantime_serde")]
    pub connect_wait: Duration,
    /// Default timeout of request/reply calls.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            credentials_file: None,
            nkey_file: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_required: false,
            connect_wait: Duration::from_secs(30),
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot read NATS credentials file {path}: {source}")]
    CredentialsFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot connect to NATS at {url} within {wait:?}: {source}")]
    Unreachable {
        url: String,
        wait: Duration,
        source: async_nats::ConnectError,
    },
    #[error("NATS client certificate needs both tls_cert_file and tls_key_file")]
    IncompleteClientCertificate,
    #[error("cannot read NATS nkey file {path}: {reason}")]
    NkeyFile { path: PathBuf, reason: String },
}

impl NatsConfig {
    async fn options(&self, client_name: &str) -> Result<ConnectOptions, ConnectError> {
        let mut options = ConnectOptions::new()
            .name(client_name)
            .request_timeout(Some(self.request_timeout))
            .connection_timeout(Duration::from_secs(2))
            .require_tls(self.tls_required);
        if let Some(path) = &self.credentials_file {
            options = options.credentials_file(path).await.map_err(|source| {
                ConnectError::CredentialsFile {
                    path: path.clone(),
                    source,
                }
            })?;
        }
        if let Some(path) = &self.nkey_file {
            let seed = read_seed(path)?;
            let public_key = nkeys::KeyPair::from_seed(&seed)
                .map_err(|_| ConnectError::NkeyFile {
                    path: path.clone(),
                    reason: "not a valid nkey seed".into(),
                })?
                .public_key();
            options = options
                .nkey(seed)
                .custom_inbox_prefix(inbox_prefix(&public_key));
        }
        if let Some(ca) = &self.tls_ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => {
                options = options.add_client_certificate(cert.clone(), key.clone());
            }
            (None, None) => {}
            _ => return Err(ConnectError::IncompleteClientCertificate),
        }
        Ok(options)
    }

    /// The server URLs of [`NatsConfig::url`]: every node of a cluster, so the connection
    /// starts on any that is up and fails over to the others.
    pub fn urls(&self) -> Vec<&str> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .collect()
    }

    /// Connects, retrying until `connect_wait` has passed so services may start before NATS.
    pub async fn connect(&self, client_name: &str) -> Result<Client, ConnectError> {
        let deadline = tokio::time::Instant::now() + self.connect_wait;
        let mut delay = Duration::from_millis(50);
        loop {
            let options = self.options(client_name).await?;
            match options.connect(self.urls()).await {
                Ok(client) => return Ok(client),
                Err(source) if tokio::time::Instant::now() + delay >= deadline => {
                    return Err(ConnectError::Unreachable {
                        url: self.url.clone(),
                        wait: self.connect_wait,
                        source,
                    });
                }
                Err(err) => {
                    tracing::debug!(url = %self.url, error = %err, "NATS not reachable yet");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

/// Reads an nkey seed file. Its content never appears in an error: only whether it looked like
/// a user seed.
fn read_seed(path: &std::path::Path) -> Result<String, ConnectError> {
    let failed = |reason: String| ConnectError::NkeyFile {
        path: path.to_path_buf(),
        reason,
    };
    let seed = std::fs::read_to_string(path).map_err(|e| failed(e.to_string()))?;
    let seed = seed.trim();
    if !seed.starts_with("SU") {
        return Err(failed("not an nkey user seed".into()));
    }
    Ok(seed.to_string())
}

/// The private inbox prefix of the identity with nkey `public_key`: with permissions on, only
/// that identity may subscribe below it, so no identity reads another's replies. Derived from
/// the key, so neither side can be configured into another's inbox.
pub fn inbox_prefix(public_key: &str) -> String {
    format!("_INBOX_{public_key}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_node_of_a_cluster_is_a_server_url() {
        let config = NatsConfig {
            url: "nats://127.0.0.1:4222, nats://127.0.0.1:4223,,nats://127.0.0.1:4224".into(),
            ..Default::default()
        };
        assert_eq!(
            config.urls(),
            [
                "nats://127.0.0.1:4222",
                "nats://127.0.0.1:4223",
                "nats://127.0.0.1:4224"
            ]
        );
        assert_eq!(NatsConfig::default().urls(), ["nats://127.0.0.1:4222"]);
    }
}
