//! Where a long-term secret comes from: the environment or a file (an inline value only for local
//! development). Never from a request.

use std::path::PathBuf;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

/// Where a secret comes from. Exactly one field must be set.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecretRef {
    /// Name of an environment variable holding the secret.
    pub env: Option<String>,
    /// Path of a file holding the secret (trailing newline ignored).
    pub file: Option<PathBuf>,
    /// The secret itself (development only). Never serialized back out.
    #[serde(skip_serializing)]
    pub value: Option<SecretString>,
}

/// Why a secret could not be read. Names where it was looked for, never its value.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret for {0}: set exactly one of env, file, value")]
    Ambiguous(String),
    #[error("secret for {owner}: environment variable {var} is not set")]
    MissingEnv { owner: String, var: String },
    #[error("secret for {owner}: cannot read {path}: {source}")]
    File {
        owner: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("secret for {owner} is empty")]
    Empty { owner: String },
}

impl SecretRef {
    /// A reference to an inline value (tests and local development).
    pub fn value(secret: impl Into<String>) -> Self {
        Self {
            value: Some(SecretString::from(secret.into())),
            ..Default::default()
        }
    }

    /// Reads the secret. `owner` names what it is for, in errors.
    pub fn resolve(&self, owner: &str) -> Result<SecretString, SecretError> {
        let secret = match (&self.env, &self.file, &self.value) {
            (Some(var), None, None) => {
                std::env::var(var)
                    .map(SecretString::from)
                    .map_err(|_| SecretError::MissingEnv {
                        owner: owner.into(),
                        var: var.clone(),
                    })
            }
            (None, Some(path), None) => std::fs::read_to_string(path)
                .map(|s| SecretString::from(s.trim_end_matches(['\n', '\r']).to_string()))
                .map_err(|source| SecretError::File {
                    owner: owner.into(),
                    path: path.clone(),
                    source,
                }),
            (None, None, Some(value)) => Ok(value.clone()),
            _ => Err(SecretError::Ambiguous(owner.into())),
        }?;
        // An empty secret would be sent as if it were one; refuse it at startup instead.
        if secrecy::ExposeSecret::expose_secret(&secret).is_empty() {
            return Err(SecretError::Empty {
                owner: owner.into(),
            });
        }
        Ok(secret)
    }
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    #[test]
    fn file_env_and_errors_never_show_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret-file\n").unwrap();
        let from_file = SecretRef {
            file: Some(path),
            ..Default::default()
        };
        assert_eq!(
            from_file.resolve("r").unwrap().expose_secret(),
            "s3cret-file"
        );
        let missing = SecretRef {
            env: Some("IMAGEMESH_TEST_SURELY_UNSET_VAR".into()),
            ..Default::default()
        };
        let err = missing.resolve("registry r").unwrap_err().to_string();
        assert!(err.contains("IMAGEMESH_TEST_SURELY_UNSET_VAR"), "{err}");
        let both = SecretRef {
            env: Some("X".into()),
            value: Some(SecretString::from("inline-v4lue")),
            ..Default::default()
        };
        let err = both.resolve("registry r").unwrap_err();
        assert!(!format!("{err} {err:?} {both:?}").contains("inline-v4lue"));
        assert!(SecretRef::value("").resolve("r").is_err());
    }
}
