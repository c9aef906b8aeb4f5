//! Signing keys for a registry whose token issuer is the credential service (`provider =
//! "issuer"`): a P-256 key as PKCS#8 PEM with its self-signed certificate, and the certificate
//! bundle a registry started in token mode trusts.

use std::path::{Path, PathBuf};

use crate::RegistryAuth;

/// A realm nothing serves, for registries whose clients all get their tokens over NATS.
pub const UNSERVED_REALM: &str = "http://127.0.0.1:9/token";

/// A key and its certificate, written as PEM files.
pub struct SigningKey {
    /// `<name>.key.pem`: PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
    pub key: PathBuf,
    /// `<name>.crt.pem`: the self-signed certificate of `key`.
    pub certificate: PathBuf,
}

impl SigningKey {
    /// Generates a key and its certificate into `dir`.
    pub fn generate(dir: &Path, name: &str) -> Self {
        let key_pair = rcgen::KeyPair::generate().expect("generate P-256 key");
        let params = rcgen::CertificateParams::new(vec![format!("imagemesh-issuer-{name}")])
            .expect("certificate params");
        let cert = params
            .self_signed(&key_pair)
            .expect("self-signed certificate");
        let key = dir.join(format!("{name}.key.pem"));
        let certificate = dir.join(format!("{name}.crt.pem"));
        std::fs::write(&key, key_pair.serialize_pem()).expect("write key");
        std::fs::write(&certificate, cert.pem()).expect("write certificate");
        Self { key, certificate }
    }

    /// The key's PEM text (to check it never appears in a log).
    pub fn key_pem(&self) -> String {
        std::fs::read_to_string(&self.key).expect("read key")
    }
}

/// Writes the certificates of `keys` into one PEM bundle at `path` (a registry's
/// `rootcertbundle`) and returns `path`.
pub fn write_bundle(path: &Path, keys: &[&SigningKey]) -> PathBuf {
    let bundle: String = keys
        .iter()
        .map(|k| std::fs::read_to_string(&k.certificate).expect("read certificate"))
        .collect();
    std::fs::write(path, bundle).expect("write bundle");
    path.to_path_buf()
}

/// How to start a [`crate::Registry`] that trusts tokens with this `service` (audience) and
/// `issuer`, signed by a key whose certificate is in `bundle`, and sends clients that do the
/// challenge themselves to `realm` (the credential service's token endpoint).
pub fn registry_auth(service: &str, issuer: &str, bundle: PathBuf, realm: &str) -> RegistryAuth {
    RegistryAuth::Token {
        realm: realm.to_string(),
        service: service.to_string(),
        issuer: issuer.to_string(),
        root_cert_bundle: bundle,
    }
}
