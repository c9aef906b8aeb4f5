//! Handing credentials to buildah without a command line: a containers-auth.json file and a
//! registries.conf, both in the build's private directory.
//!
//! `--creds user:pass` would put the secret in `ps` output and in any log of the command line;
//! `--authfile` keeps it in a file only this process (mode 0600, root) can read, deleted with
//! the build. The auth file can only hold `user:secret` pairs: containers/image reads a bearer
//! registry token only from `SystemContext.DockerBearerRegistryToken` (skopeo's
//! `--registry-token` flag; buildah has no way to pass it), and the file's `identitytoken`
//! field is an OAuth2 refresh token that it exchanges at the token endpoint, not a registry
//! token. So bearer credentials never go to buildah: a bearer build token is used in-process
//! (`layout_push.rs`, source-image copies), and a base image needing one is refused clearly.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use imagemesh_proto::v1::{AuthScheme, RegistryCredential};
use imagemesh_registry::host;

/// Writes a containers-auth.json holding the basic credentials among `credentials`.
pub fn write_auth_file(path: &Path, credentials: &[&RegistryCredential]) -> std::io::Result<()> {
    let mut auths = serde_json::Map::new();
    for credential in credentials {
        if !credential.is_usable() || credential.scheme() != AuthScheme::Basic {
            continue;
        }
        // Formatted as user:secret here, at the last moment, and only into the file.
        let pair = format!("{}:{}", credential.username, credential.secret);
        let entry = serde_json::json!({ "auth": STANDARD.encode(pair) });
        auths.insert(host::normalize(&credential.registry), entry);
    }
    let body = serde_json::json!({ "auths": auths });
    write_private(path, &serde_json::to_vec(&body)?)
}

/// Writes a registries.conf that marks `insecure` registries as plain HTTP, per registry,
/// instead of `--tls-verify=false` for every registry a build touches.
pub fn write_registries_conf(path: &Path, insecure: &[String]) -> std::io::Result<()> {
    let mut conf = String::from("unqualified-search-registries = [\"docker.io\"]\n");
    for registry in insecure {
        let registry = registry.replace(['"', '\\', '\n'], "");
        conf.push_str(&format!(
            "\n[[registry]]\nlocation = \"{registry}\"\ninsecure = true\n"
        ));
    }
    write_private(path, conf.as_bytes())
}

/// Writes a new file only root can read (`0600`).
pub fn write_private(path: &Path, body: &[u8]) -> std::io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(body)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn cred(registry: &str, scheme: AuthScheme, secret: &str) -> RegistryCredential {
        RegistryCredential {
            registry: registry.into(),
            scheme: scheme as i32,
            username: "builder".into(),
            secret: secret.into(),
            ..Default::default()
        }
    }

    #[test]
    fn basic_credentials_are_written_privately_and_bearer_ones_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth.json");
        let basic = cred("127.0.0.1:5000", AuthScheme::Basic, "pw");
        let bearer = cred("r.example", AuthScheme::Bearer, "token");
        write_auth_file(&path, &[&basic, &bearer]).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(
            json["auths"]["127.0.0.1:5000"]["auth"],
            STANDARD.encode("builder:pw")
        );
        assert!(json["auths"].get("r.example").is_none());
    }
}
