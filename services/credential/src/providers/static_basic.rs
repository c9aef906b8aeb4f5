//! A static username + password/token, presented as HTTP Basic.

use imagemesh_proto::v1::AuthScheme;
use secrecy::SecretString;

use super::Minted;

/// Hands out the credential it holds. Used for htpasswd registries, docker config `auths`
/// entries and the static access tokens of GHCR, Docker Hub, NGC and GAR.
#[derive(Debug, Clone)]
pub struct StaticBasic {
    username: String,
    password: SecretString,
}

impl StaticBasic {
    pub fn new(username: impl Into<String>, password: SecretString) -> Self {
        Self {
            username: username.into(),
            password,
        }
    }

    pub fn username(&self) -> &str {
        &self.username
    }

    pub fn mint(&self) -> Minted {
        Minted {
            scheme: AuthScheme::Basic,
            username: self.username.clone(),
            secret: self.password.clone(),
            expires_at: None,
        }
    }
}
