//! Error codes and the one place where they become NATS service errors.
//!
//! A refused request carries an [`ErrorCode`] (the protobuf enum) and a message that never holds a
//! secret. Over request/reply it travels in the standard micro-service headers:
//! `Nats-Service-Error-Code` is an HTTP-like number any NATS tool understands and
//! `Nats-Service-Error` is `"<CODE_NAME>: <message>"`, so callers recover the exact code.

use async_nats::HeaderMap;
use async_nats::service::error::Error as ServiceError;
pub use imagemesh_proto::v1::ErrorCode;

/// A refusal: what kind, and why in words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code_name(*code))]
pub struct Rejection {
    pub code: ErrorCode,
    pub message: String,
}

impl Rejection {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// The NATS micro-service error this rejection is sent as.
    pub fn to_service_error(&self) -> ServiceError {
        ServiceError {
            status: self.to_string(),
            code: http_status(self.code),
        }
    }

    /// Reads a rejection back from a reply's service-error headers, if it has them.
    pub fn from_headers(headers: Option<&HeaderMap>) -> Option<Rejection> {
        let headers = headers?;
        let status = headers
            .get(async_nats::service::NATS_SERVICE_ERROR)?
            .as_str();
        let (name, message) = status.split_once(": ").unwrap_or(("", status));
        let code = ErrorCode::from_str_name(&format!("ERROR_CODE_{name}")).unwrap_or_else(|| {
            let numeric = headers
                .get(async_nats::service::NATS_SERVICE_ERROR_CODE)
                .and_then(|v| v.as_str().parse().ok())
                .unwrap_or(500);
            code_for_http_status(numeric)
        });
        Some(Rejection::new(code, message))
    }
}

/// `ERROR_CODE_NO_CREDENTIALS` -> `NO_CREDENTIALS`.
pub fn code_name(code: ErrorCode) -> &'static str {
    code.as_str_name()
        .strip_prefix("ERROR_CODE_")
        .unwrap_or("UNSPECIFIED")
}

fn http_status(code: ErrorCode) -> usize {
    match code {
        ErrorCode::MalformedRequest => 400,
        ErrorCode::CredentialRejected | ErrorCode::RegistryAuthRejected => 401,
        ErrorCode::Forbidden => 403,
        ErrorCode::NoCredentials | ErrorCode::NotFound => 404,
        ErrorCode::InvalidImage | ErrorCode::BuildFailed => 422,
        ErrorCode::RegistryUnavailable => 502,
        ErrorCode::CredentialUnavailable | ErrorCode::AtCapacity => 503,
        ErrorCode::Internal | ErrorCode::Unspecified => 500,
    }
}

fn code_for_http_status(status: usize) -> ErrorCode {
    match status {
        400 => ErrorCode::MalformedRequest,
        401 => ErrorCode::CredentialRejected,
        403 => ErrorCode::Forbidden,
        404 => ErrorCode::NotFound,
        502 => ErrorCode::RegistryUnavailable,
        503 => ErrorCode::CredentialUnavailable,
        _ => ErrorCode::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_survives_the_service_error_headers() {
        for raw in 1..=11 {
            let code = ErrorCode::try_from(raw).unwrap();
            let rejection = Rejection::new(code, "registry r.example: nope: really");
            let err = rejection.to_service_error();
            let mut headers = HeaderMap::new();
            headers.insert(async_nats::service::NATS_SERVICE_ERROR, err.status.as_str());
            headers.insert(
                async_nats::service::NATS_SERVICE_ERROR_CODE,
                err.code.to_string().as_str(),
            );
            assert_eq!(Rejection::from_headers(Some(&headers)), Some(rejection));
        }
    }

    #[test]
    fn foreign_errors_fall_back_to_the_numeric_code() {
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::service::NATS_SERVICE_ERROR, "no such thing");
        headers.insert(async_nats::service::NATS_SERVICE_ERROR_CODE, "404");
        let rejection = Rejection::from_headers(Some(&headers)).unwrap();
        assert_eq!(rejection.code, ErrorCode::NotFound);
        assert_eq!(rejection.message, "no such thing");
        assert_eq!(Rejection::from_headers(Some(&HeaderMap::new())), None);
        assert_eq!(Rejection::from_headers(None), None);
    }
}
