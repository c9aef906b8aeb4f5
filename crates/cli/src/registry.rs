//! `imagemesh registry`: what an operator needs around a build registry whose token issuer is
//! the credential service (`provider = "issuer"`).
//!
//! - `login REGISTRY/REPOSITORY`: a one-time login from the credential service's mint endpoint,
//!   for a tool that does the registry's challenge itself (skopeo, buildah, `index cat`). It is
//!   written into a containers-auth.json (`--authfile`) or printed for `--password-stdin`;
//!   never put on a command line.
//! - `issuer-key DIR`: a P-256 signing key and its self-signed certificate (the registry's
//!   `rootcertbundle`).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use imagemesh_proto::v1::{AuthScheme, Scope, TokenRequest};
use imagemesh_registry::host;
use imagemesh_runtime::credentials::CredentialClient;

#[derive(Debug, clap::Args)]
pub struct RegistryArgs {
    #[command(subcommand)]
    command: RegistryCommand,
}

#[derive(Debug, clap::Subcommand)]
enum RegistryCommand {
    /// Get a one-time login for one repository of an issuer registry (operator identity).
    Login {
        /// `registry/repository`, e.g. `127.0.0.1:5000/imagemesh/base` (a tag is ignored).
        repository: String,
        /// Also push (default: pull only).
        #[arg(long)]
        push: bool,
        /// Add the login to this containers-auth.json (created 0600) instead of printing it.
        #[arg(long, value_name = "FILE")]
        authfile: Option<PathBuf>,
    },
    /// Generate a token-signing key (PKCS#8 PEM, P-256) and its self-signed certificate.
    IssuerKey {
        /// Writes `<name>.key.pem` (0600) and `<name>.crt.pem` here.
        dir: PathBuf,
        #[arg(long, default_value = "issuer")]
        name: String,
    },
}

/// Runs a `registry` command; `nats` connects, for the commands that need the mesh.
pub async fn run<F, Connect>(args: RegistryArgs, nats: F) -> anyhow::Result<ExitCode>
where
    F: FnOnce() -> Connect,
    Connect: std::future::Future<Output = anyhow::Result<async_nats::Client>>,
{
    match args.command {
        RegistryCommand::Login {
            repository,
            push,
            authfile,
        } => {
            let client = nats().await?;
            login(client, &repository, push, authfile.as_deref()).await
        }
        RegistryCommand::IssuerKey { dir, name } => issuer_key(&dir, &name),
    }
}

async fn login(
    client: async_nats::Client,
    target: &str,
    push: bool,
    authfile: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let reference: imagemesh_registry::Reference = target
        .parse()
        .with_context(|| format!("repository {target:?}"))?;
    let registry = host::normalize(reference.registry());
    let mut actions = vec!["pull".to_string()];
    if push {
        actions.push("push".to_string());
    }
    let request = TokenRequest {
        registry: registry.clone(),
        scope: Some(Scope {
            repository: reference.repository().to_string(),
            actions,
        }),
        request_id: format!("login-{}", uuid::Uuid::new_v4()),
        login: true,
        ..Default::default()
    };
    let credentials = CredentialClient::new(client, Duration::from_secs(10));
    let response = credentials
        .mint(&request)
        .await
        .map_err(|e| anyhow::anyhow!("the credential service refused a login: {e}"))?;
    let login = response
        .credential
        .filter(|c| c.scheme() == AuthScheme::Basic && !c.secret.is_empty())
        .context("the credential service answered without a login")?;
    match authfile {
        Some(path) => {
            add_to_authfile(path, &registry, &login.username, &login.secret)?;
            eprintln!(
                "one-time login for {registry}/{} written to {}",
                reference.repository(),
                path.display()
            );
        }
        None => println!("{}", login.secret),
    }
    Ok(ExitCode::SUCCESS)
}

/// Adds (or replaces) the registry's entry in a containers-auth.json, keeping it 0600.
fn add_to_authfile(
    path: &Path,
    registry: &str,
    username: &str,
    secret: &str,
) -> anyhow::Result<()> {
    let mut body: serde_json::Value = match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a containers-auth.json", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::json!({ "auths": {} }),
        Err(e) => bail!("cannot read {}: {e}", path.display()),
    };
    let pair = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{secret}"));
    body["auths"][registry] = serde_json::json!({ "auth": pair });
    let staged = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&staged)
        .with_context(|| format!("cannot write {}", staged.display()))?;
    file.write_all(body.to_string().as_bytes())?;
    std::fs::rename(&staged, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn issuer_key(dir: &Path, name: &str) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let key = rcgen::KeyPair::generate().context("generating a P-256 key")?;
    let params = rcgen::CertificateParams::new(vec![format!("imagemesh-{name}")])
        .context("certificate parameters")?;
    let certificate = params.self_signed(&key).context("self-signing")?;
    let key_path = dir.join(format!("{name}.key.pem"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .with_context(|| format!("cannot create {}", key_path.display()))?;
    file.write_all(key.serialize_pem().as_bytes())?;
    let certificate_path = dir.join(format!("{name}.crt.pem"));
    std::fs::write(&certificate_path, certificate.pem())
        .with_context(|| format!("cannot write {}", certificate_path.display()))?;
    println!("{}", key_path.display());
    println!("{}", certificate_path.display());
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn an_authfile_keeps_other_registries_and_stays_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth.json");
        add_to_authfile(&path, "a.example", "u", "one").unwrap();
        add_to_authfile(&path, "b.example", "imagemesh-login", "two").unwrap();
        add_to_authfile(&path, "a.example", "imagemesh-login", "three").unwrap();
        let body: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let decode = |registry: &str| {
            let auth = body["auths"][registry]["auth"].as_str().unwrap();
            String::from_utf8(
                base64::engine::general_purpose::STANDARD
                    .decode(auth)
                    .unwrap(),
            )
            .unwrap()
        };
        assert_eq!(decode("a.example"), "imagemesh-login:three");
        assert_eq!(decode("b.example"), "imagemesh-login:two");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn an_issuer_key_is_private_and_its_certificate_is_pem() {
        let dir = tempfile::tempdir().unwrap();
        issuer_key(dir.path(), "issuer").unwrap();
        let key = dir.path().join("issuer.key.pem");
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(
            std::fs::read_to_string(&key)
                .unwrap()
                .contains("BEGIN PRIVATE KEY")
        );
        let certificate = std::fs::read_to_string(dir.path().join("issuer.crt.pem")).unwrap();
        assert!(certificate.contains("BEGIN CERTIFICATE"));
        // Never overwritten: a second key would orphan the registry's trust in the first.
        assert!(issuer_key(dir.path(), "issuer").is_err());
    }
}
