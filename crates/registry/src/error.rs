//! Registry failures, classified for status events and retries.

use imagemesh_proto::v1::ErrorCode;
use oci_client::errors::{OciDistributionError, OciErrorCode};

/// What went wrong, as far as the caller must act on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryErrorKind {
    /// 401/403: the credential was refused. Not retryable.
    AuthRejected,
    /// The repository, manifest or blob does not exist.
    NotFound,
    /// Connection refused, timeout, 5xx, 429: retryable.
    Unavailable,
    /// The registry answered something we cannot use.
    Invalid,
}

/// A registry failure that names the registry and repository and never holds a secret.
#[derive(Debug, Clone, thiserror::Error)]
#[error("registry {registry} {what} for repository {repository}: {detail}")]
pub struct RegistryError {
    pub kind: RegistryErrorKind,
    pub registry: String,
    pub repository: String,
    what: &'static str,
    detail: String,
}

impl RegistryError {
    pub fn new(
        kind: RegistryErrorKind,
        registry: &str,
        repository: &str,
        detail: impl Into<String>,
    ) -> Self {
        let what = match kind {
            RegistryErrorKind::AuthRejected => "rejected the credential",
            RegistryErrorKind::NotFound => "has no such content",
            RegistryErrorKind::Unavailable => "is unavailable",
            RegistryErrorKind::Invalid => "gave an unusable answer",
        };
        Self {
            kind,
            registry: registry.to_string(),
            repository: repository.to_string(),
            what,
            detail: detail.into(),
        }
    }

    /// Classifies an oci-client error.
    pub fn from_oci(registry: &str, repository: &str, err: &OciDistributionError) -> Self {
        let (kind, detail) = classify(err);
        Self::new(kind, registry, repository, detail)
    }

    pub fn is_retryable(&self) -> bool {
        self.kind == RegistryErrorKind::Unavailable
    }

    /// The request error code this failure maps to.
    pub fn error_code(&self) -> ErrorCode {
        match self.kind {
            RegistryErrorKind::AuthRejected => ErrorCode::RegistryAuthRejected,
            RegistryErrorKind::NotFound => ErrorCode::NotFound,
            RegistryErrorKind::Unavailable => ErrorCode::RegistryUnavailable,
            RegistryErrorKind::Invalid => ErrorCode::InvalidImage,
        }
    }
}

fn classify(err: &OciDistributionError) -> (RegistryErrorKind, String) {
    use RegistryErrorKind::*;
    match err {
        OciDistributionError::UnauthorizedError { .. } => (AuthRejected, "HTTP 401".into()),
        OciDistributionError::AuthenticationFailure(_) => {
            // The token endpoint's body may echo request details; keep only the fact.
            (AuthRejected, "token endpoint refused the credential".into())
        }
        OciDistributionError::ServerError { code, .. } => match code {
            401 | 403 => (AuthRejected, format!("HTTP {code}")),
            404 => (NotFound, "HTTP 404".into()),
            429 | 500..=599 => (Unavailable, format!("HTTP {code}")),
            _ => (Invalid, format!("HTTP {code}")),
        },
        OciDistributionError::RegistryError { envelope, .. } => {
            let codes: Vec<_> = envelope.errors.iter().map(|e| &e.code).collect();
            let detail = envelope
                .errors
                .iter()
                .map(|e| format!("{:?}", e.code))
                .collect::<Vec<_>>()
                .join(", ");
            let kind = if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
            {
                AuthRejected
            } else if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::BlobUnknown
                        | OciErrorCode::NotFound
                )
            }) {
                NotFound
            } else if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Toomanyrequests))
            {
                Unavailable
            } else {
                Invalid
            };
            (kind, detail)
        }
        OciDistributionError::RequestError(e) => (Unavailable, describe_request_error(e)),
        OciDistributionError::ImageManifestNotFoundError(_) => {
            (NotFound, "manifest not found".into())
        }
        OciDistributionError::IoError(e) => (Unavailable, e.to_string()),
        other => (Invalid, other.to_string()),
    }
}

/// Describes a transport error without its URL (a token endpoint URL carries a query).
fn describe_request_error(err: &reqwest::Error) -> String {
    if err.is_connect() {
        "connection failed".into()
    } else if err.is_timeout() {
        "timed out".into()
    } else {
        "transport error".into()
    }
}
