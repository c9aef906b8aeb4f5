//! Helpers on requests: id validation and secret scrubbing.
//!
//! Build args count as secrets: Dockerfiles take tokens through them, so their values are
//! removed from dead letters and never shown by `Debug`.

use std::fmt;

use crate::v1::{BuildOptions, ContainerRequest, IndexRequest, RegistryCredential};

/// Why a request id was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestIdError {
    #[error("request_id is empty")]
    Empty,
    #[error("request_id is longer than 128 characters")]
    TooLong,
    #[error("request_id may only hold A-Z, a-z, 0-9, '-' and '_'")]
    InvalidCharacter,
}

/// Request ids become NATS subject tokens (`imagemesh.status.<tenant>.<id>`), so they are
/// restricted to `[A-Za-z0-9_-]{1,128}`.
pub fn validate_request_id(id: &str) -> Result<(), RequestIdError> {
    if id.is_empty() {
        return Err(RequestIdError::Empty);
    }
    if id.len() > 128 {
        return Err(RequestIdError::TooLong);
    }
    let ok = id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok {
        return Err(RequestIdError::InvalidCharacter);
    }
    Ok(())
}

/// Image ids become image tags (`<build registry>/<repository>:<image id>`), so they follow the
/// OCI tag grammar: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn validate_image_id(id: &str) -> Result<(), String> {
    let mut bytes = id.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
    let rest_ok = bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    if first_ok && rest_ok && id.len() <= 128 {
        Ok(())
    } else {
        Err(format!(
            "image_id {id:?} is not a valid tag ([A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})"
        ))
    }
}

impl ContainerRequest {
    /// The request with every credential secret, every build arg's value and every env value
    /// removed (for dead letters); the names stay.
    pub fn without_secrets(&self) -> Self {
        let mut scrubbed = self.clone();
        for cred in scrubbed.credentials_mut() {
            cred.secret.clear();
        }
        if let Some(options) = scrubbed.build_options.as_mut() {
            options.build_args.values_mut().for_each(String::clear);
        }
        // A container's environment is where its secrets usually go: keep the names only.
        for entry in &mut scrubbed.env {
            if let Some(equals) = entry.find('=') {
                entry.truncate(equals + 1);
            }
        }
        scrubbed
    }

    /// Every credential the request carries.
    pub fn credentials(&self) -> impl Iterator<Item = &RegistryCredential> {
        [
            &self.build_registry_creds,
            &self.image_credentials,
            &self.prefetch_credential,
        ]
        .into_iter()
        .flatten()
        .chain(&self.base_image_credentials)
    }

    fn credentials_mut(&mut self) -> impl Iterator<Item = &mut RegistryCredential> {
        [
            &mut self.build_registry_creds,
            &mut self.image_credentials,
            &mut self.prefetch_credential,
        ]
        .into_iter()
        .flatten()
        .chain(&mut self.base_image_credentials)
    }
}

/// Like the derived `Debug`, with each build arg's value shown as `[redacted]`.
impl fmt::Debug for BuildOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&String> = self.build_args.keys().collect();
        names.sort();
        let build_args: std::collections::BTreeMap<_, _> =
            names.into_iter().map(|name| (name, "[redacted]")).collect();
        f.debug_struct("BuildOptions")
            .field("dockerfile", &self.dockerfile)
            .field("context_object", &self.context_object)
            .field("source_image", &self.source_image)
            .field("build_args", &build_args)
            .field("repository", &self.repository)
            .field("timeout_seconds", &self.timeout_seconds)
            .finish()
    }
}

impl IndexRequest {
    /// The request with the credential secret removed (for dead letters).
    pub fn without_secrets(&self) -> Self {
        let mut scrubbed = self.clone();
        if let Some(cred) = scrubbed.credential.as_mut() {
            cred.secret.clear();
        }
        scrubbed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_subject_safe() {
        assert_eq!(validate_request_id("abc-DEF_123"), Ok(()));
        assert_eq!(validate_request_id(""), Err(RequestIdError::Empty));
        assert_eq!(
            validate_request_id("a.b"),
            Err(RequestIdError::InvalidCharacter)
        );
        assert_eq!(
            validate_request_id("a>"),
            Err(RequestIdError::InvalidCharacter)
        );
        assert_eq!(
            validate_request_id(&"x".repeat(129)),
            Err(RequestIdError::TooLong)
        );
    }

    #[test]
    fn image_ids_are_valid_tags() {
        assert!(validate_image_id("v1.2_3-x").is_ok());
        assert!(validate_image_id("").is_err());
        assert!(validate_image_id("-x").is_err());
        assert!(validate_image_id("a:b").is_err());
        assert!(validate_image_id("a/b").is_err());
        assert!(validate_image_id(&"x".repeat(129)).is_err());
    }

    #[test]
    fn scrubbing_removes_every_secret_and_debug_redacts() {
        let cred = RegistryCredential {
            registry: "r.example".into(),
            username: "u".into(),
            secret: "hunter2-secret".into(),
            ..Default::default()
        };
        let req = ContainerRequest {
            request_id: "r1".into(),
            image_credentials: Some(cred.clone()),
            build_registry_creds: Some(cred.clone()),
            base_image_credentials: vec![cred.clone(), cred.clone()],
            prefetch_credential: Some(cred.clone()),
            ..Default::default()
        };
        assert_eq!(req.credentials().count(), 5);
        assert!(format!("{req:?}").contains("r.example"));
        assert!(!format!("{req:?}").contains("hunter2"));
        let scrubbed = req.without_secrets();
        assert_eq!(scrubbed.credentials().count(), 5);
        assert!(scrubbed.credentials().all(|c| c.secret.is_empty()));
    }

    #[test]
    fn build_args_keep_their_names_and_lose_their_values() {
        let mut options = BuildOptions {
            dockerfile: "FROM scratch".into(),
            ..Default::default()
        };
        options
            .build_args
            .insert("NPM_TOKEN".into(), "npm-Tk9-secret".into());
        let req = ContainerRequest {
            request_id: "r1".into(),
            build_options: Some(options),
            env: vec!["DB_PASSWORD=db-Pw7-secret".into(), "NO_VALUE".into()],
            ..Default::default()
        };
        let shown = format!("{req:?}");
        assert!(
            shown.contains("NPM_TOKEN") && shown.contains("[redacted]"),
            "{shown}"
        );
        assert!(!shown.contains("npm-Tk9"), "{shown}");
        let scrubbed = req.without_secrets();
        assert_eq!(
            scrubbed.env,
            ["DB_PASSWORD=", "NO_VALUE"],
            "env keeps its names only"
        );
        let args = &scrubbed.build_options.as_ref().unwrap().build_args;
        assert_eq!(args.get("NPM_TOKEN").map(String::as_str), Some(""));
        let encoded = prost::Message::encode_to_vec(&scrubbed);
        assert!(!String::from_utf8_lossy(&encoded).contains("npm-Tk9"));
        assert!(!String::from_utf8_lossy(&encoded).contains("db-Pw7"));
        assert_eq!(
            req.build_options.as_ref().unwrap().build_args["NPM_TOKEN"],
            "npm-Tk9-secret",
            "the request itself is untouched"
        );
    }
}
