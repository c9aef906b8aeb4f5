//! How a build step fails: a rejection, and whether trying again later may help.

use imagemesh_registry::RegistryError;
use imagemesh_runtime::worker::Outcome;
use imagemesh_runtime::{ErrorCode, Rejection};

/// A failed step. Converted to the worker's [`Outcome`] at the end of the handler.
#[derive(Debug, Clone)]
pub struct Failure {
    pub rejection: Rejection,
    pub retryable: bool,
}

impl Failure {
    /// Never going to work: fail the request.
    pub fn reject(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            rejection: Rejection::new(code, message),
            retryable: false,
        }
    }

    /// Might work later (NATS or the registry is unavailable): redeliver.
    pub fn retry(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            rejection: Rejection::new(code, message),
            retryable: true,
        }
    }

    /// A build error: the Dockerfile, its context or its time limit.
    pub fn build(message: impl Into<String>) -> Self {
        Self::reject(ErrorCode::BuildFailed, message)
    }

    /// The builder's own machinery failed (disk, NATS); retried.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::retry(ErrorCode::Internal, message)
    }
}

impl From<RegistryError> for Failure {
    fn from(err: RegistryError) -> Self {
        Self {
            retryable: err.is_retryable(),
            rejection: Rejection::new(err.error_code(), err.to_string()),
        }
    }
}

impl From<Failure> for Outcome {
    fn from(failure: Failure) -> Self {
        Outcome::failed(failure.rejection, failure.retryable)
    }
}
