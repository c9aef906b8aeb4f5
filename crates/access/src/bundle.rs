//! A generated security bundle: every identity's nkey seed, a local CA with the server's (and,
//! for mutual TLS, each identity's) certificate, the JetStream encryption key, and the
//! nats-server authorization config rendered from the table. Made at setup (`imagemesh
//! nats-config`, `make run`, the tests); nothing in it is ever committed.
//!
//! ```text
//! <dir>/mesh.json                 identities (name, role, public key), tenants, TLS settings
//! <dir>/auth.conf                 authorization { users = [...] } for nats-server
//! <dir>/identities/<name>.nk      nkey seed (0600)
//! <dir>/tls/ca.pem                the local CA clients verify the server with
//! <dir>/tls/server.pem, server-key.pem
//! <dir>/tls/<name>.pem, <name>-key.pem   client certificates (mutual TLS only)
//! <dir>/jetstream.key             JetStream encryption-at-rest key (0600)
//! ```

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::render;
use crate::roles::{Identity, Role, valid_name};
use crate::table::MeshFacts;

/// Which identities to make.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BundleSpec {
    /// Tenants; each gets a client identity `client-<tenant>`.
    pub tenants: Vec<String>,
    /// Instances of the credential service, scheduler and indexer (identities `<role>-<n>`).
    pub credentials: usize,
    pub schedulers: usize,
    pub indexers: usize,
    /// Worker ids of builders and mounters (identities `builder-<id>`, `mounter-<id>`); a
    /// worker's identity may only take that worker's work and write its advertisement.
    pub builders: Vec<String>,
    pub mounters: Vec<String>,
    /// Names and addresses the server certificate is valid for.
    pub server_names: Vec<String>,
    /// Issue a client certificate per identity (the server then requires one).
    pub mutual_tls: bool,
}

impl Default for BundleSpec {
    fn default() -> Self {
        Self {
            tenants: vec!["default".into()],
            credentials: 1,
            schedulers: 1,
            indexers: 1,
            builders: vec!["builder-1".into()],
            mounters: vec!["mounter-1".into()],
            server_names: vec!["127.0.0.1".into(), "localhost".into()],
            mutual_tls: false,
        }
    }
}

/// What `mesh.json` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Manifest {
    spec: BundleSpec,
    identities: Vec<Identity>,
}

/// A bundle on disk.
#[derive(Debug, Clone)]
pub struct Bundle {
    dir: PathBuf,
    spec: BundleSpec,
    identities: Vec<Identity>,
}

impl Bundle {
    /// Generates a new bundle into `dir` (created; existing files are replaced).
    pub fn generate(dir: &Path, spec: BundleSpec) -> anyhow::Result<Bundle> {
        let roles = roles_of(&spec)?;
        fs::create_dir_all(dir.join("identities"))?;
        fs::create_dir_all(dir.join("tls"))?;
        let mut bundle = Bundle {
            dir: dir.to_path_buf(),
            spec,
            identities: Vec::with_capacity(roles.len()),
        };
        for (name, role) in roles {
            bundle.new_identity(name, role)?;
        }
        bundle.write_tls()?;
        write_private(&dir.join("jetstream.key"), &random_key())?;
        bundle.save()?;
        Ok(bundle)
    }

    /// Adds an identity to the bundle (a new instance joining the mesh) and saves it; the
    /// server knows it once it reloads the authorization config. An identity of that name and
    /// role that exists already is returned as it is.
    pub fn add_identity(&mut self, name: &str, role: Role) -> anyhow::Result<Identity> {
        if let Some(existing) = self.identities.iter().find(|i| i.name == name) {
            if existing.role != role {
                bail!("identity {name:?} exists with another role");
            }
            return Ok(existing.clone());
        }
        if !valid_name(name) {
            bail!("{name:?} cannot be an identity name (letters, digits, '-', '_')");
        }
        if let Role::Client { tenant } = &role
            && !self.spec.tenants.contains(tenant)
        {
            self.spec.tenants.push(tenant.clone());
        }
        let identity = self.new_identity(name.to_string(), role)?;
        if self.spec.mutual_tls {
            self.write_client_cert(&identity.name)?;
        }
        self.save()?;
        Ok(identity)
    }

    fn new_identity(&mut self, name: String, role: Role) -> anyhow::Result<Identity> {
        let key = nkeys::KeyPair::new_user();
        let seed = key.seed().map_err(|e| anyhow::anyhow!("nkey seed: {e}"))?;
        write_private(&self.seed_file(&name), &seed)?;
        let identity = Identity {
            name,
            role,
            public_key: key.public_key(),
        };
        self.identities.push(identity.clone());
        Ok(identity)
    }

    fn save(&self) -> anyhow::Result<()> {
        let manifest = Manifest {
            spec: self.spec.clone(),
            identities: self.identities.clone(),
        };
        fs::write(
            self.dir.join("mesh.json"),
            serde_json::to_vec_pretty(&manifest)?,
        )?;
        fs::write(self.dir.join("auth.conf"), self.authorization())?;
        Ok(())
    }

    /// Loads a bundle generated before.
    pub fn load(dir: &Path) -> anyhow::Result<Bundle> {
        let path = dir.join("mesh.json");
        let text = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let manifest: Manifest =
            serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))?;
        Ok(Bundle {
            dir: dir.to_path_buf(),
            spec: manifest.spec,
            identities: manifest.identities,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn spec(&self) -> &BundleSpec {
        &self.spec
    }

    pub fn identities(&self) -> &[Identity] {
        &self.identities
    }

    pub fn facts(&self) -> MeshFacts {
        MeshFacts {
            tenants: self.spec.tenants.clone(),
        }
    }

    /// The identity called `name`.
    pub fn identity(&self, name: &str) -> anyhow::Result<&Identity> {
        self.identities
            .iter()
            .find(|i| i.name == name)
            .with_context(|| format!("no identity {name:?} in {}", self.dir.display()))
    }

    /// The first identity with `role` (e.g. the operator).
    pub fn first_of(&self, kind: &str) -> anyhow::Result<&Identity> {
        self.identities
            .iter()
            .find(|i| i.role.kind() == kind)
            .with_context(|| format!("no {kind} identity in {}", self.dir.display()))
    }

    pub fn seed_file(&self, name: &str) -> PathBuf {
        self.dir.join("identities").join(format!("{name}.nk"))
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("tls/ca.pem")
    }

    pub fn server_cert(&self) -> (PathBuf, PathBuf) {
        (
            self.dir.join("tls/server.pem"),
            self.dir.join("tls/server-key.pem"),
        )
    }

    /// The client certificate of `name`, when the bundle has mutual TLS.
    pub fn client_cert(&self, name: &str) -> Option<(PathBuf, PathBuf)> {
        self.spec.mutual_tls.then(|| {
            (
                self.dir.join(format!("tls/{name}.pem")),
                self.dir.join(format!("tls/{name}-key.pem")),
            )
        })
    }

    pub fn jetstream_key_file(&self) -> PathBuf {
        self.dir.join("jetstream.key")
    }

    /// The `authorization` block for nats-server.
    pub fn authorization(&self) -> String {
        render::authorization(&self.identities, &self.facts())
    }

    /// The `tls` block for nats-server (paths as in this bundle).
    pub fn tls_block(&self) -> String {
        let (cert, key) = self.server_cert();
        format!(
            "tls: {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: {}\n  timeout: 5\n}}\n",
            cert.display(),
            key.display(),
            self.ca_file().display(),
            self.spec.mutual_tls
        )
    }

    /// A whole single-server configuration: loopback `listen`, JetStream in `store_dir`
    /// encrypted at rest, TLS, and the authorization block.
    pub fn server_config(&self, listen: &str, store_dir: &Path) -> anyhow::Result<String> {
        let key = fs::read_to_string(self.jetstream_key_file())?;
        Ok(format!(
            "listen: \"{listen}\"\njetstream: {{\n  store_dir: \"{}\"\n  cipher: \"chachapoly\"\n  key: \"{}\"\n}}\n{}{}",
            store_dir.display(),
            key.trim(),
            self.tls_block(),
            self.authorization()
        ))
    }

    /// Environment that makes the `imagemesh` CLI connect as `name` (TLS included).
    pub fn cli_env(&self, name: &str) -> Vec<(String, String)> {
        let mut env = vec![
            (
                "NATS_NKEY_FILE".to_string(),
                self.seed_file(name).display().to_string(),
            ),
            (
                "NATS_CA_FILE".to_string(),
                self.ca_file().display().to_string(),
            ),
        ];
        if let Some((cert, key)) = self.client_cert(name) {
            env.push(("NATS_CERT_FILE".into(), cert.display().to_string()));
            env.push(("NATS_KEY_FILE".into(), key.display().to_string()));
        }
        env
    }

    /// Environment that makes a service connect as `name` (TLS included) to a mesh the
    /// operator provisions.
    pub fn env_for(&self, name: &str) -> Vec<(String, String)> {
        let mut env = vec![
            (
                "IMAGEMESH_NATS__NKEY_FILE".to_string(),
                self.seed_file(name).display().to_string(),
            ),
            (
                "IMAGEMESH_NATS__TLS_CA_FILE".to_string(),
                self.ca_file().display().to_string(),
            ),
            ("IMAGEMESH_NATS__TLS_REQUIRED".to_string(), "true".into()),
        ];
        // The credential service uses no stream; every other service looks its streams up.
        let uses_streams = self
            .identities
            .iter()
            .find(|i| i.name == name)
            .is_some_and(|i| i.role != Role::Credential);
        if uses_streams {
            env.push(("IMAGEMESH_STREAMS__PROVISION".to_string(), "false".into()));
        }
        if let Some((cert, key)) = self.client_cert(name) {
            env.push((
                "IMAGEMESH_NATS__TLS_CERT_FILE".into(),
                cert.display().to_string(),
            ));
            env.push((
                "IMAGEMESH_NATS__TLS_KEY_FILE".into(),
                key.display().to_string(),
            ));
        }
        env
    }

    /// A local CA (its key stays in the bundle, 0600, to issue certificates for identities
    /// added later), the server's certificate and, for mutual TLS, each identity's.
    fn write_tls(&self) -> anyhow::Result<()> {
        let tls = self.dir.join("tls");
        let ca_key = rcgen::KeyPair::generate()?;
        let ca_cert = ca_params()?.self_signed(&ca_key)?;
        fs::write(tls.join("ca.pem"), ca_cert.pem())?;
        write_private(&tls.join("ca-key.pem"), &ca_key.serialize_pem())?;
        let (cert, key) = self.leaf(
            self.spec.server_names.clone(),
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        fs::write(tls.join("server.pem"), cert)?;
        write_private(&tls.join("server-key.pem"), &key)?;
        if self.spec.mutual_tls {
            for identity in &self.identities {
                self.write_client_cert(&identity.name)?;
            }
        }
        Ok(())
    }

    fn write_client_cert(&self, name: &str) -> anyhow::Result<()> {
        let (cert, key) = self.leaf(
            vec![name.to_string()],
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        let tls = self.dir.join("tls");
        fs::write(tls.join(format!("{name}.pem")), cert)?;
        write_private(&tls.join(format!("{name}-key.pem")), &key)
    }

    /// A certificate for `names` signed by the bundle's CA: (certificate, key) as PEM.
    fn leaf(
        &self,
        names: Vec<String>,
        usage: rcgen::ExtendedKeyUsagePurpose,
    ) -> anyhow::Result<(String, String)> {
        let ca_key =
            rcgen::KeyPair::from_pem(&fs::read_to_string(self.dir.join("tls/ca-key.pem"))?)?;
        let issuer = rcgen::Issuer::new(ca_params()?, ca_key);
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(names)?;
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// The local CA's certificate parameters (the same each time, so a certificate issued later is
/// signed by the same issuer name).
fn ca_params() -> anyhow::Result<rcgen::CertificateParams> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "imagemesh local CA");
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

/// Every identity the spec asks for, with its role. The operator is always there.
fn roles_of(spec: &BundleSpec) -> anyhow::Result<Vec<(String, Role)>> {
    let mut roles = vec![("operator".to_string(), Role::Operator)];
    let numbered = |role: Role, count: usize| {
        (1..=count).map(move |n| (format!("{}-{n}", role.kind()), role.clone()))
    };
    roles.extend(numbered(Role::Credential, spec.credentials));
    roles.extend(numbered(Role::Scheduler, spec.schedulers));
    roles.extend(numbered(Role::Indexer, spec.indexers));
    for worker_id in &spec.builders {
        let role = Role::Builder {
            worker_id: worker_id.clone(),
        };
        roles.push((worker_identity("builder", worker_id), role));
    }
    for worker_id in &spec.mounters {
        let role = Role::Mounter {
            worker_id: worker_id.clone(),
        };
        roles.push((worker_identity("mounter", worker_id), role));
    }
    for tenant in &spec.tenants {
        let role = Role::Client {
            tenant: tenant.clone(),
        };
        roles.push((format!("client-{tenant}"), role));
    }
    let mut seen = std::collections::HashSet::new();
    for (name, _) in &roles {
        if !valid_name(name) {
            bail!("{name:?} cannot be an identity name (letters, digits, '-', '_')");
        }
        if !seen.insert(name.clone()) {
            bail!("identity {name:?} is named twice");
        }
    }
    Ok(roles)
}

/// The identity name of a worker: the worker id itself when it already says what it is.
pub fn worker_identity(service: &str, worker_id: &str) -> String {
    if worker_id.starts_with(service) {
        worker_id.to_string()
    } else {
        format!("{service}-{worker_id}")
    }
}

/// 32 random bytes, hex: the JetStream encryption key.
fn random_key() -> String {
    let a = uuid::Uuid::new_v4();
    let b = uuid::Uuid::new_v4();
    format!("{}{}", a.simple(), b.simple())
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = fs::remove_file(path);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(contents.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_and_loads_a_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let spec = BundleSpec {
            tenants: vec!["a".into(), "b".into()],
            mutual_tls: true,
            ..Default::default()
        };
        let bundle = Bundle::generate(dir.path(), spec).unwrap();
        let names: Vec<_> = bundle
            .identities()
            .iter()
            .map(|i| i.name.as_str())
            .collect();
        assert_eq!(
            names,
            [
                "operator",
                "credential-1",
                "scheduler-1",
                "indexer-1",
                "builder-1",
                "mounter-1",
                "client-a",
                "client-b"
            ]
        );
        let loaded = Bundle::load(dir.path()).unwrap();
        assert_eq!(loaded.identities(), bundle.identities());
        // Every seed is private and belongs to the public key the server knows.
        for identity in loaded.identities() {
            let path = loaded.seed_file(&identity.name);
            let mode = std::os::unix::fs::PermissionsExt::mode(
                &fs::metadata(&path).unwrap().permissions(),
            );
            assert_eq!(mode & 0o777, 0o600, "{}", path.display());
            let seed = fs::read_to_string(&path).unwrap();
            let key = nkeys::KeyPair::from_seed(&seed).unwrap();
            assert_eq!(key.public_key(), identity.public_key);
            assert!(loaded.client_cert(&identity.name).unwrap().0.exists());
        }
        let auth = loaded.authorization();
        assert!(auth.contains(&loaded.identity("client-a").unwrap().public_key));
        // No seed ever reaches the server config.
        for identity in loaded.identities() {
            let seed = fs::read_to_string(loaded.seed_file(&identity.name)).unwrap();
            assert!(!auth.contains(seed.trim()));
        }
    }

    #[test]
    fn refuses_names_that_are_not_tokens() {
        let spec = BundleSpec {
            builders: vec!["a.b".into()],
            ..Default::default()
        };
        assert!(roles_of(&spec).is_err());
        let spec = BundleSpec {
            mounters: vec!["x".into(), "x".into()],
            ..Default::default()
        };
        assert!(roles_of(&spec).is_err());
    }
}
