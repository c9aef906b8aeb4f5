//! Why an index request failed, and what the work loop does about it.

use imagemesh_registry::RegistryError;
use imagemesh_runtime::worker::Outcome;
use imagemesh_runtime::{ErrorCode, Rejection};

/// A failure while indexing. Messages never hold a secret: registry errors are classified
/// without URLs or bodies, and layer errors name digests and offsets only.
#[derive(Debug)]
pub enum Failure {
    /// The registry refused or could not serve something; retried when it is unavailable.
    Registry(RegistryError),
    /// The image itself is unusable (corrupt layer, digest mismatch, unsupported media type):
    /// retrying cannot help.
    Invalid(String),
    /// The request itself cannot be served (no credential, bad reference).
    Refused(Rejection),
    /// Our own infrastructure failed (NATS KV, a task): worth retrying.
    Internal(String),
}

impl Failure {
    pub fn invalid(message: impl Into<String>) -> Self {
        Failure::Invalid(message.into())
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Failure::Internal(message.into())
    }

    /// The work loop's verdict.
    pub fn into_outcome(self) -> Outcome {
        match self {
            Failure::Registry(err) => {
                let retryable = err.is_retryable();
                Outcome::failed(Rejection::new(err.error_code(), err.to_string()), retryable)
            }
            Failure::Invalid(message) => {
                Outcome::Reject(Rejection::new(ErrorCode::InvalidImage, message))
            }
            Failure::Refused(rejection) => Outcome::Reject(rejection),
            Failure::Internal(message) => {
                Outcome::Retry(Rejection::new(ErrorCode::Internal, message))
            }
        }
    }
}

impl From<RegistryError> for Failure {
    fn from(err: RegistryError) -> Self {
        Failure::Registry(err)
    }
}

#[cfg(test)]
mod tests {
    use imagemesh_registry::RegistryErrorKind;

    use super::*;

    #[test]
    fn bad_images_are_rejected_and_an_unavailable_registry_is_retried() {
        let invalid = Failure::invalid("layer sha256:aa is not a valid layer").into_outcome();
        assert!(matches!(invalid, Outcome::Reject(r) if r.code == ErrorCode::InvalidImage));
        let down = RegistryError::new(RegistryErrorKind::Unavailable, "r:5000", "a/b", "HTTP 503");
        let outcome = Failure::from(down).into_outcome();
        assert!(matches!(outcome, Outcome::Retry(r) if r.code == ErrorCode::RegistryUnavailable));
        let denied =
            RegistryError::new(RegistryErrorKind::AuthRejected, "r:5000", "a/b", "HTTP 401");
        let outcome = Failure::from(denied).into_outcome();
        assert!(matches!(outcome, Outcome::Reject(r) if r.code == ErrorCode::RegistryAuthRejected));
    }
}
