//! Secret-safe behaviour of the credential message.

use std::fmt;

use crate::v1::{AuthScheme, RegistryCredential};

impl fmt::Debug for RegistryCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryCredential")
            .field("registry", &self.registry)
            .field("scheme", &self.scheme())
            .field("username", &self.username)
            .field(
                "secret",
                &if self.secret.is_empty() {
                    ""
                } else {
                    "[redacted]"
                },
            )
            .field("expires_at", &self.expires_at)
            .field("scope", &self.scope)
            .finish()
    }
}

impl RegistryCredential {
    /// The same credential with the secret removed, for dead letters and diagnostics.
    pub fn without_secret(&self) -> Self {
        Self {
            secret: String::new(),
            ..self.clone()
        }
    }

    /// Seconds since the Unix epoch when this credential expires, if it has an expiry.
    pub fn expires_at_unix(&self) -> Option<i64> {
        self.expires_at.as_ref().map(|t| t.seconds)
    }

    /// How it is presented, for status details: `basic`, `bearer` or `none`.
    pub fn scheme_name(&self) -> &'static str {
        match self.scheme() {
            AuthScheme::Basic => "basic",
            AuthScheme::Bearer => "bearer",
            AuthScheme::Unspecified => "none",
        }
    }

    /// True when the credential carries a usable secret.
    pub fn is_usable(&self) -> bool {
        !self.secret.is_empty() && self.scheme() != AuthScheme::Unspecified
    }
}
