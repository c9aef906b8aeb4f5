//! The bus a bench runs on: by default a secured nats-server as a deployment has it (a generated
//! bundle, TLS on the client port, JetStream encrypted at rest, every party connecting with its
//! own nkey identity and only its permissions), or, with `IMAGEMESH_BENCH_SECURED=0`, the open
//! server of before (no TLS, no authorization) for comparison. The system under test and its
//! baseline run on the same bus, so both pay the same TLS and authorization costs.

use std::time::Duration;

use anyhow::Context;
use async_nats::Client;
use imagemesh_access::grants::Grants;
use imagemesh_access::{Bundle, BundleSpec, Role};
use imagemesh_runtime::nats::{NatsConfig, inbox_prefix};
use imagemesh_runtime::streams::StreamOptions;
use imagemesh_testkit::NatsServer;
use serde_json::{Value, json};
use tempfile::TempDir;

/// The environment variable that selects the open bus (`0`, `false`, `no`, `off`).
pub const SECURED_ENV: &str = "IMAGEMESH_BENCH_SECURED";

/// The identity that provisions streams and does the bench's own bookkeeping (purging,
/// counting, creating the baseline's streams).
pub const OPERATOR: &str = "operator";

/// Whether this run is secured (the default) or open (`IMAGEMESH_BENCH_SECURED=0`).
pub fn secured_from_env() -> bool {
    !matches!(
        std::env::var(SECURED_ENV)
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase()
            .as_str(),
        "0" | "false" | "no" | "off"
    )
}

/// A party of the bench that is no mesh role (a baseline responder, a load generator for the
/// baseline, a probe): its name and exactly what it may do.
pub struct Party {
    pub name: &'static str,
    /// Its grants besides receiving replies in its own inbox.
    pub grants: fn(&mut Grants),
    /// Whether it answers the requests it receives, as a micro service does (the server then
    /// tracks each request's reply permission, which the service under test pays too).
    pub responds: bool,
}

/// A running nats-server and how each party connects to it.
pub struct Bus {
    nats: NatsServer,
    /// The bundle and its directory, when secured.
    secured: Option<(Bundle, TempDir)>,
}

impl Bus {
    /// Starts the bus. Secured: a bundle with the operator, an identity per `roles` entry and
    /// one per `parties` entry; open: a plain nats-server where names are only client names.
    pub fn start(secured: bool, roles: &[(&str, Role)], parties: &[Party]) -> anyhow::Result<Bus> {
        if !secured {
            return Ok(Bus {
                nats: NatsServer::start(),
                secured: None,
            });
        }
        let dir = tempfile::Builder::new()
            .prefix("imagemesh-bench-bundle-")
            .tempdir()?;
        let spec = BundleSpec {
            tenants: Vec::new(),
            credentials: 0,
            schedulers: 0,
            indexers: 0,
            builders: Vec::new(),
            mounters: Vec::new(),
            ..Default::default()
        };
        let mut bundle = Bundle::generate(dir.path(), spec)?;
        for (name, role) in roles {
            bundle.add_identity(name, role.clone())?;
        }
        let authorization = authorization(&bundle, parties)?;
        let mut failure = None;
        let nats = NatsServer::start_configured(|store| {
            let rendered = bundle
                .server_config("127.0.0.1:4222", store)
                .and_then(|text| {
                    let table = bundle.authorization();
                    anyhow::ensure!(
                        text.ends_with(&table),
                        "the server config no longer ends with the authorization block"
                    );
                    Ok(format!(
                        "{}{authorization}",
                        &text[..text.len() - table.len()]
                    ))
                });
            match rendered {
                Ok(text) => text,
                Err(err) => {
                    failure = Some(err);
                    String::new()
                }
            }
        });
        if let Some(err) = failure {
            return Err(err.context("rendering the server config"));
        }
        Ok(Bus {
            nats,
            secured: Some((bundle, dir)),
        })
    }

    pub fn secured(&self) -> bool {
        self.secured.is_some()
    }

    /// What this run measured on, for the report.
    pub fn mode(&self) -> &'static str {
        if self.secured() {
            "secured (TLS, nkey identity per party, permissions, JetStream encrypted at rest)"
        } else {
            "open (no TLS, no authorization; IMAGEMESH_BENCH_SECURED=0)"
        }
    }

    pub fn url(&self) -> String {
        self.nats.url()
    }

    /// How identity `name` connects (TLS and its nkey when secured).
    pub fn nats_config(&self, name: &str) -> NatsConfig {
        let mut config = NatsConfig {
            url: self.url(),
            connect_wait: Duration::from_secs(10),
            ..Default::default()
        };
        if let Some((bundle, _)) = &self.secured {
            config.nkey_file = Some(bundle.seed_file(name));
            config.tls_ca_file = Some(bundle.ca_file());
            config.tls_required = true;
        }
        config
    }

    /// Connects as identity `name`.
    pub async fn connect(&self, name: &str) -> anyhow::Result<Client> {
        self.nats_config(name)
            .connect(name)
            .await
            .with_context(|| format!("connecting as {name}"))
    }

    /// Stream options for a service: on the secured bus only the operator provisions.
    pub fn stream_options(&self) -> StreamOptions {
        StreamOptions {
            provision: !self.secured(),
            ..Default::default()
        }
    }

    /// Permission violations the server logged so far (none expected: a denied subject would
    /// make the bench wait or time out rather than measure).
    pub fn violations(&self) -> Vec<String> {
        self.nats
            .log()
            .lines()
            .filter(|line| line.contains("Violation"))
            .map(str::to_string)
            .collect()
    }
}

/// The bundle's authorization block with a user for each party: a fresh nkey (its seed in the
/// bundle, 0600) and the permissions its grants give.
fn authorization(bundle: &Bundle, parties: &[Party]) -> anyhow::Result<String> {
    let rendered = bundle.authorization();
    let (head, block) = rendered
        .split_once("authorization: ")
        .context("the rendered authorization has no block")?;
    let mut block: Value = serde_json::from_str(block.trim())?;
    let users = block["users"]
        .as_array_mut()
        .context("the rendered authorization has no users")?;
    // Responding parties answer as the table's responders (micro services) do.
    let responses = users
        .iter()
        .find_map(|user| user["permissions"].get("allow_responses").cloned());
    for party in parties {
        let key = nkeys::KeyPair::new_user();
        let seed = key.seed().map_err(|e| anyhow::anyhow!("nkey seed: {e}"))?;
        write_private(&bundle.seed_file(party.name), &seed)?;
        let mut grants = Grants::new(&inbox_prefix(&key.public_key()));
        (party.grants)(&mut grants);
        let permissions = grants.build();
        let mut user = json!({
            "nkey": key.public_key(),
            "permissions": {
                "publish": { "allow": permissions.publish },
                "subscribe": { "allow": permissions.subscribe },
            },
        });
        if party.responds {
            user["permissions"]["allow_responses"] = responses.clone().with_context(|| {
                format!(
                    "{} answers requests, but no identity of the table does to copy how",
                    party.name
                )
            })?;
        }
        users.push(user);
    }
    Ok(format!(
        "{head}authorization: {}\n",
        serde_json::to_string_pretty(&block)?
    ))
}

fn write_private(path: &std::path::Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(contents.as_bytes())?;
    Ok(())
}
