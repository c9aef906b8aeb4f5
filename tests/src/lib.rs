//! A whole mesh for end-to-end tests: a real nats-server, a real docker-registry as the build
//! registry, and the five service binaries as processes, each with its own config file and
//! captured log. Everything stops when the [`Mesh`] drops.
//!
//! The build registry is in token mode with the credential service as its token issuer, as in
//! `make run`: no registry password exists, every service gets tokens for exactly its
//! repository, and the test itself gets tokens and one-time logins as the operator
//! ([`Mesh::registry_credential`], [`Mesh::registry_login`]). Tests about Basic registries and
//! rejected passwords ask for [`BuildRegistryAuth::Basic`] (htpasswd, its password shared with
//! the services by `share_long_term_secret`).
//!
//! The helpers act as the default tenant, as a single-user client does ([`Mesh::submit`],
//! [`Mesh::events`], ...); their `_as` / `_of` variants name a tenant.
//!
//! By default the mesh is secured as deployed (`docs/security.md`): the server runs with TLS,
//! JetStream encryption and the authorization config rendered from the permission table; every
//! service instance connects with its own identity; the test itself is the operator, which
//! provisions the streams.
#![forbid(unsafe_code)]

pub mod probe;
pub mod tree;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::message::PublishMessage;
use futures::StreamExt;
use imagemesh_access::{Bundle, BundleSpec, Role};
use imagemesh_proto::v1::{
    BuildOptions, ContainerRequest, DeadLetter, ErrorCode, RequestKind, RequestState, StatusEvent,
};
use imagemesh_proto::{CONTENT_TYPE_PROTOBUF, DEFAULT_TENANT, RequestKey, TenantRequest};
use imagemesh_runtime::nats::NatsConfig;
use imagemesh_runtime::streams::{self, StreamOptions};
use imagemesh_runtime::subjects;
use imagemesh_testkit::token_server::TokenServer;
use imagemesh_testkit::{
    NatsCluster, NatsServer, Registry, RegistryAuth, ServiceProcess, eventually,
};
use prost::Message;

/// The five services, in start order.
pub const SERVICES: [&str; 5] = ["credential", "scheduler", "builder", "indexer", "mounter"];

/// The build registry's account.
pub const REGISTRY_USER: &str = "imagemesh-builder";
/// Its password: distinctive, so a leak is found by a plain substring search.
pub const REGISTRY_PASSWORD: &str = "pw-Zq8xK3vN1mT7";
/// Environment variable through which the credential service reads the password.
pub const PASSWORD_ENV: &str = "TEST_REGISTRY_PASSWORD";
/// The build registry's service name (token audience) in issuer mode.
pub const REGISTRY_SERVICE: &str = "imagemesh-build-registry";
/// The issuer name the build registry trusts in issuer mode.
pub const REGISTRY_ISSUER: &str = "imagemesh-credential";

/// How the build registry of a [`Mesh`] authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildRegistryAuth {
    /// Token mode; the credential service signs the tokens and serves the token endpoint.
    Issuer,
    /// htpasswd with [`REGISTRY_USER`] / [`REGISTRY_PASSWORD`], handed to the services because
    /// the credential service's entry sets `share_long_term_secret`.
    Basic,
}

/// The build registry's issuer in issuer mode: the signing key and the token endpoint's port.
struct IssuerSetup {
    key: imagemesh_testkit::issuer_keys::SigningKey,
    token_port: u16,
    _dir: tempfile::TempDir,
}

/// How to set the mesh up.
#[derive(Debug, Clone)]
pub struct MeshOptions {
    /// How the build registry authenticates (`Issuer` unless a test is about Basic).
    pub build_registry_auth: BuildRegistryAuth,
    /// The password the credential service holds in `Basic` mode (set it wrong to test
    /// rejection).
    pub credential_password: String,
    /// Services to start now; others can be started later with [`Mesh::start_service`].
    pub start: Vec<&'static str>,
    /// Deliveries before a request is given up (scheduler intake and workers).
    pub max_deliver: u32,
    /// Deliveries of the scheduler's intake when they differ from `max_deliver`. The workers'
    /// `max_deliver` × `ack_wait` must fit in the work streams' `max_age` (their services refuse
    /// to start otherwise); the intake has no such bound.
    pub intake_max_deliver: Option<u32>,
    /// How long JetStream waits for an ack before redelivering.
    pub ack_wait: Duration,
    /// Worker heartbeat period (and the scheduler's re-routing sweep).
    pub heartbeat: Duration,
    /// Extra environment for every service (e.g. `OTEL_*`).
    pub env: Vec<(String, String)>,
    /// The scheduler's `shared_repositories`: repositories of the build registry every tenant
    /// may pull from (the tests' base and test images live there).
    pub shared_repositories: Vec<String>,
    /// Identities, permissions and TLS as deployed (off: an open server, as on a laptop).
    pub secured: bool,
    /// Appended to the credential service's configuration (more registries, secrets). It reads
    /// `credential_password` from the environment variable [`PASSWORD_ENV`].
    pub credential_extra: String,
    /// Identities the test will use besides the five services' (`<service>` for instance
    /// `<service>`), known to the server from its start. One added later makes the server
    /// reload its configuration.
    pub identities: Vec<(String, Role)>,
    /// Run the mesh on a 3-node JetStream cluster instead of one server: every stream and
    /// bucket with 3 replicas (`streams.replicas = 3`), and every service given all three
    /// server URLs so it reconnects to a surviving node.
    pub cluster: bool,
}

/// Nodes of a [`MeshOptions::cluster`] mesh.
pub const CLUSTER_SIZE: usize = 3;

/// The identities every secured test mesh knows from the start: one per service, plus the
/// extra instances the tests start (a second scheduler, placed mounters).
fn standard_identities() -> Vec<(String, Role)> {
    let mounter = |id: &str| Role::Mounter {
        worker_id: id.into(),
    };
    vec![
        ("credential".into(), Role::Credential),
        ("scheduler".into(), Role::Scheduler),
        ("scheduler-2".into(), Role::Scheduler),
        ("indexer".into(), Role::Indexer),
        (
            "builder".into(),
            Role::Builder {
                worker_id: "builder".into(),
            },
        ),
        ("mounter".into(), mounter("mounter")),
        ("mounter-test-1".into(), mounter("mounter-test-1")),
        ("mounter-a".into(), mounter("mounter-a")),
        ("mounter-b".into(), mounter("mounter-b")),
    ]
}

impl Default for MeshOptions {
    fn default() -> Self {
        Self {
            build_registry_auth: BuildRegistryAuth::Issuer,
            credential_password: REGISTRY_PASSWORD.into(),
            start: SERVICES.to_vec(),
            max_deliver: 5,
            intake_max_deliver: None,
            ack_wait: Duration::from_secs(10),
            heartbeat: Duration::from_millis(500),
            env: Vec::new(),
            shared_repositories: vec!["base".into(), "test".into()],
            secured: true,
            credential_extra: String::new(),
            identities: standard_identities(),
            cluster: false,
        }
    }
}

impl MeshOptions {
    /// The stream settings the mesh is provisioned with (replicas 3 on a cluster).
    pub fn stream_options(&self) -> StreamOptions {
        StreamOptions {
            replicas: if self.cluster { CLUSTER_SIZE } else { 1 },
            ..StreamOptions::default()
        }
    }
}

/// A running mesh.
pub struct Mesh {
    /// The server (on a cluster: its first node, `n1`).
    pub nats: NatsServer,
    /// The other nodes of a cluster (`n2`, `n3`); empty on a single server.
    pub nats_peers: Vec<NatsServer>,
    pub registry: Registry,
    pub client: async_nats::Client,
    pub options: MeshOptions,
    services: BTreeMap<&'static str, ServiceProcess>,
    /// The credential service's configuration when the test wrote it.
    credential_config: Option<String>,
    /// The build registry's issuer, in issuer mode.
    issuer: Option<IssuerSetup>,
    /// Where mounters of this mesh mount images; emptied of mounts on drop.
    mount_root: tempfile::TempDir,
    /// The mounters' node cache on disk; kept across mounter restarts within the mesh.
    node_cache: tempfile::TempDir,
    /// Where mounters put runtime bundles (overlays over their mounts); emptied on drop.
    bundle_root: tempfile::TempDir,
    /// Identities and TLS material of a secured mesh.
    access: Option<Access>,
}

/// The security bundle of a secured mesh, in its own temp dir.
pub struct Access {
    pub bundle: Bundle,
    /// Public keys of the identities service processes of this mesh run as.
    services: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Access {
    /// What the server refused to the services of this mesh: the permission table must grant
    /// everything the real flow does.
    fn refused_to_services(&self, log: &str) -> Vec<String> {
        log.lines()
            .filter(|l| l.contains("Violation"))
            .filter(|l| self.services.iter().any(|key| l.contains(key.as_str())))
            .map(str::to_string)
            .collect()
    }
}

impl Mesh {
    /// Starts NATS, the registry and the services in `options.start`, and waits until each
    /// service answers `$SRV.PING`.
    pub async fn start(options: MeshOptions) -> Mesh {
        match options.build_registry_auth {
            BuildRegistryAuth::Basic => {
                let registry = Registry::start(RegistryAuth::Htpasswd(vec![(
                    REGISTRY_USER.into(),
                    REGISTRY_PASSWORD.into(),
                )]));
                Self::start_inner(options, registry, None, None).await
            }
            BuildRegistryAuth::Issuer => {
                use imagemesh_testkit::issuer_keys::{SigningKey, registry_auth, write_bundle};
                let dir = tempfile::Builder::new()
                    .prefix("imagemesh-issuer-")
                    .tempdir()
                    .expect("issuer dir");
                let key = SigningKey::generate(dir.path(), "issuer");
                let bundle = write_bundle(&dir.path().join("bundle.pem"), &[&key]);
                let token_port = imagemesh_testkit::free_port();
                let realm = format!("http://127.0.0.1:{token_port}/token");
                let auth = registry_auth(REGISTRY_SERVICE, REGISTRY_ISSUER, bundle, &realm);
                let registry = Registry::start(auth);
                let issuer = IssuerSetup {
                    key,
                    token_port,
                    _dir: dir,
                };
                Self::start_inner(options, registry, None, Some(issuer)).await
            }
        }
    }

    /// Like [`Mesh::start`], with a build registry the test started (e.g. one with token auth)
    /// and, when given, `credential_config` as the credential service's whole configuration
    /// body (its `[credential]` tables) instead of the basic entry for the registry.
    pub async fn start_with_registry(
        options: MeshOptions,
        registry: Registry,
        credential_config: Option<String>,
    ) -> Mesh {
        Self::start_inner(options, registry, credential_config, None).await
    }

    async fn start_inner(
        options: MeshOptions,
        registry: Registry,
        credential_config: Option<String>,
        issuer: Option<IssuerSetup>,
    ) -> Mesh {
        let stream_options = options.stream_options();
        let (mut nodes, client, access) = if options.secured {
            let (nodes, access) = secured_server(&options.identities, options.cluster);
            let client = connect_as(&urls_of(&nodes), &access.bundle, "operator").await;
            let js = async_nats::jetstream::new(client.clone());
            let tenants = access.bundle.spec().tenants.clone();
            // A cluster may still be electing its JetStream meta leader.
            eventually(
                Duration::from_secs(30),
                "the operator to provision the mesh",
                || async {
                    streams::provision_all(&js, &stream_options, &tenants, options.heartbeat)
                        .await
                        .map_err(|e| eprintln!("provisioning: {e}"))
                        .ok()
                },
            )
            .await;
            (nodes, client, Some(access))
        } else {
            let nodes = if options.cluster {
                NatsCluster::start(CLUSTER_SIZE).nodes
            } else {
                vec![NatsServer::start()]
            };
            let urls = urls_of(&nodes);
            let client = async_nats::connect(urls.split(',').collect::<Vec<_>>())
                .await
                .expect("connect to test nats-server");
            if options.cluster {
                // Services provision themselves on an open mesh; wait until JetStream is up.
                let js = async_nats::jetstream::new(client.clone());
                eventually(Duration::from_secs(30), "JetStream to be ready", || async {
                    js.query_account().await.ok().map(|_| ())
                })
                .await;
            }
            (nodes, client, None)
        };
        let nats = nodes.remove(0);
        let mut mesh = Mesh {
            nats,
            nats_peers: nodes,
            registry,
            client,
            options: options.clone(),
            services: BTreeMap::new(),
            credential_config,
            issuer,
            mount_root: tempfile::Builder::new()
                .prefix("imagemesh-mounts-")
                .tempdir()
                .expect("mount root"),
            node_cache: tempfile::Builder::new()
                .prefix("imagemesh-node-cache-")
                .tempdir()
                .expect("node cache"),
            bundle_root: tempfile::Builder::new()
                .prefix("imagemesh-bundles-")
                .tempdir()
                .expect("bundle root"),
            access,
        };
        for service in options.start {
            mesh.start_service(service).await;
        }
        mesh
    }

    /// Starts one service and waits until it is ready.
    pub async fn start_service(&mut self, service: &'static str) {
        self.start_instance(service, service, &[]).await;
    }

    /// Starts an instance of `service` known to the test as `instance`, with extra environment
    /// (e.g. `IMAGEMESH_MOUNTER__PLACEMENT__WORKER_ID`), and waits until it answers PING.
    pub async fn start_instance(
        &mut self,
        service: &'static str,
        instance: &'static str,
        env: &[(&str, &str)],
    ) {
        let all_env = self.instance_env(service, instance, env).await;
        let all_env: Vec<(&str, &str)> = all_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let config = self.config(service);
        let binary = format!("imagemesh-{service}");
        let before = count_instances(&self.client, service).await;
        let process = ServiceProcess::spawn(&binary, &config, &all_env);
        self.services.insert(instance, process);
        let what = format!("a new {service} instance to answer $SRV.PING");
        eventually(Duration::from_secs(20), &what, || async {
            (count_instances(&self.client, service).await > before).then_some(())
        })
        .await;
        if service == "credential" {
            let endpoints = ["mint", "refresh"];
            let timeout = Duration::from_secs(20);
            imagemesh_testkit::wait_for_endpoints(&self.client, service, &endpoints, timeout).await;
        }
    }

    /// The whole environment [`Mesh::start_instance`] gives instance `instance` of `service`
    /// besides its config: the registry password (credential service only), the mesh's extra
    /// environment, `env`, its identity on a secured mesh and the stream replicas on a cluster.
    /// For a test that runs the service its own way (e.g. from the image, `tests/tests/image.rs`).
    pub async fn instance_env(
        &mut self,
        service: &str,
        instance: &str,
        env: &[(&str, &str)],
    ) -> Vec<(String, String)> {
        let identity_env = self.identity_env(service, instance, env).await;
        let mut all_env: Vec<(String, String)> = self
            .password_env(service)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        all_env.extend(self.options.env.iter().cloned());
        all_env.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        all_env.extend(identity_env);
        all_env.extend(
            self.replicas_env(service)
                .into_iter()
                .map(|(k, v)| (k.to_string(), v)),
        );
        all_env
    }

    /// On a secured mesh, the environment that makes instance `instance` of `service` connect
    /// with its own identity (added to the bundle, and the server reloaded, when new). A
    /// builder's or mounter's identity is bound to its worker id: the one in `env`, else the
    /// instance name.
    async fn identity_env(
        &mut self,
        service: &str,
        instance: &str,
        env: &[(&str, &str)],
    ) -> Vec<(String, String)> {
        let Some(access) = &mut self.access else {
            return Vec::new();
        };
        let worker_var = format!("IMAGEMESH_{}__PLACEMENT__WORKER_ID", service.to_uppercase());
        let worker_id = env
            .iter()
            .find(|(k, _)| *k == worker_var)
            .map_or(instance.to_string(), |(_, v)| v.to_string());
        let (name, role) = match service {
            "builder" => (
                imagemesh_access::bundle::worker_identity(service, &worker_id),
                Role::Builder {
                    worker_id: worker_id.clone(),
                },
            ),
            "mounter" => (
                imagemesh_access::bundle::worker_identity(service, &worker_id),
                Role::Mounter {
                    worker_id: worker_id.clone(),
                },
            ),
            "credential" => (instance_name(service, instance), Role::Credential),
            "scheduler" => (instance_name(service, instance), Role::Scheduler),
            "indexer" => (instance_name(service, instance), Role::Indexer),
            other => panic!("unknown service {other}"),
        };
        let nodes: Vec<&NatsServer> = std::iter::once(&self.nats)
            .chain(&self.nats_peers)
            .collect();
        ensure_identity(&nodes, &mut access.bundle, &name, role).await;
        let key = access
            .bundle
            .identity(&name)
            .expect("identity")
            .public_key
            .clone();
        access.services.push(key);
        let mut identity_env = access.bundle.env_for(&name);
        if matches!(service, "builder" | "mounter") {
            identity_env.push((worker_var, worker_id));
        }
        identity_env
    }

    /// Spawns `service` (instance `service`) with a configuration the test wrote and `env`, as
    /// its identity on a secured mesh, with the build registry's password in its environment;
    /// the test owns the process (it is not one of the mesh's services).
    pub async fn spawn_with_config(
        &mut self,
        service: &'static str,
        config: &str,
        env: &[(&str, &str)],
    ) -> ServiceProcess {
        let identity = self.identity_env(service, service, env).await;
        let mut all_env = self.password_env(service);
        all_env.extend_from_slice(env);
        all_env.extend(identity.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let replicas = self.replicas_env(service);
        all_env.extend(replicas.iter().map(|(k, v)| (*k, v.as_str())));
        ServiceProcess::spawn(&format!("imagemesh-{service}"), config, &all_env)
    }

    /// On a cluster, `streams.replicas` for every service that uses streams (the credential
    /// service uses none).
    fn replicas_env(&self, service: &str) -> Vec<(&'static str, String)> {
        if !self.options.cluster || service == "credential" {
            return Vec::new();
        }
        let replicas = self.options.stream_options().replicas.to_string();
        vec![("IMAGEMESH_STREAMS__REPLICAS", replicas)]
    }

    /// The registry password, for the credential service only: no other service may hold it.
    fn password_env(&self, service: &str) -> Vec<(&'static str, &str)> {
        match service {
            "credential" => vec![(PASSWORD_ENV, self.options.credential_password.as_str())],
            _ => Vec::new(),
        }
    }

    /// A client of `tenant` (its identity `client-<tenant>` added when new), connected over
    /// TLS.
    pub async fn tenant_client(&mut self, tenant: &str) -> async_nats::Client {
        let role = Role::Client {
            tenant: tenant.to_string(),
        };
        self.client_as(&format!("client-{tenant}"), role).await
    }

    /// A connection as identity `name` with `role` (added when new), over TLS.
    pub async fn client_as(&mut self, name: &str, role: Role) -> async_nats::Client {
        let urls = self.nats_urls();
        let access = self.access.as_mut().expect("a secured mesh");
        let nodes: Vec<&NatsServer> = std::iter::once(&self.nats)
            .chain(&self.nats_peers)
            .collect();
        ensure_identity(&nodes, &mut access.bundle, name, role).await;
        connect_as(&urls, &access.bundle, name).await
    }

    /// Every server URL of the mesh, comma-separated (one on a single server, each node's on a
    /// cluster): what services get as `nats.url`.
    pub fn nats_urls(&self) -> String {
        urls_of(std::iter::once(&self.nats).chain(&self.nats_peers))
    }

    /// Node `index` of the mesh's servers (0: [`Mesh::nats`]).
    pub fn nats_node(&mut self, index: usize) -> &mut NatsServer {
        match index {
            0 => &mut self.nats,
            other => &mut self.nats_peers[other - 1],
        }
    }

    /// How many servers the mesh runs on.
    pub fn nats_node_count(&self) -> usize {
        1 + self.nats_peers.len()
    }

    /// The node of a cluster whose `server_name` is `name` (as JetStream names leaders).
    pub fn nats_node_named(&self, name: &str) -> Option<usize> {
        std::iter::once(&self.nats)
            .chain(&self.nats_peers)
            .position(|n| n.server_name() == Some(name))
    }

    /// What every server of the mesh logged.
    pub fn nats_log(&self) -> String {
        std::iter::once(&self.nats)
            .chain(&self.nats_peers)
            .map(NatsServer::log)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The security bundle of a secured mesh.
    pub fn bundle(&self) -> Option<&Bundle> {
        self.access.as_ref().map(|a| &a.bundle)
    }

    /// Environment for the `imagemesh` CLI: the server, and on a secured mesh the identity of
    /// the default tenant's client.
    pub fn cli_env(&self) -> Vec<(String, String)> {
        self.cli_env_as("client-default")
    }

    /// Environment for the `imagemesh` CLI (or nats-py) connecting as identity `name`.
    pub fn cli_env_as(&self, name: &str) -> Vec<(String, String)> {
        let mut env = vec![("NATS_URL".to_string(), self.nats_urls())];
        if let Some(access) = &self.access {
            env.extend(access.bundle.cli_env(name));
        }
        env
    }

    /// The process of a service (or named instance).
    pub fn service(&mut self, instance: &str) -> &mut ServiceProcess {
        self.services.get_mut(instance).expect("service started")
    }

    /// The TOML config of `service` in this mesh.
    pub fn config(&self, service: &str) -> String {
        let nats = format!("[nats]\nurl = \"{}\"\n", self.nats_urls());
        let worker = format!(
            "concurrency = 8\nmax_deliver = {}\nack_wait = \"{}ms\"\nretry_initial = \"100ms\"\nretry_max = \"400ms\"\nshutdown_grace = \"5s\"\n",
            self.options.max_deliver,
            self.options.ack_wait.as_millis()
        );
        let heartbeat = format!("heartbeat = \"{}ms\"\n", self.options.heartbeat.as_millis());
        let registry = self.registry.addr();
        let body = match service {
            "credential" if self.credential_config.is_some() => {
                let written = self.credential_config.clone().unwrap_or_default();
                format!("{written}{}", self.options.credential_extra)
            }
            "credential" => {
                (match &self.issuer {
                    Some(issuer) => format!(
                        "[credential.token_endpoint]\nlisten = \"127.0.0.1:{}\"\n[[credential.registries]]\nprovider = \"issuer\"\nhost = \"{registry}\"\nservice = \"{REGISTRY_SERVICE}\"\nissuer = \"{REGISTRY_ISSUER}\"\nsigning_key = {{ file = {:?} }}\ncertificate = {:?}\n",
                        issuer.token_port,
                        issuer.key.key.display().to_string(),
                        issuer.key.certificate.display().to_string(),
                    ),
                    None => format!(
                        "[[credential.registries]]\nprovider = \"basic\"\nhost = \"{registry}\"\nusername = \"{REGISTRY_USER}\"\npassword = {{ env = \"{PASSWORD_ENV}\" }}\nshare_long_term_secret = true\n"
                    ),
                }) + &self.options.credential_extra
            }
            "scheduler" => {
                let intake = match self.options.intake_max_deliver {
                    Some(deliveries) => worker.replace(
                        &format!("max_deliver = {}\n", self.options.max_deliver),
                        &format!("max_deliver = {deliveries}\n"),
                    ),
                    None => worker.clone(),
                };
                format!(
                    "[scheduler]\nbuild_registry = \"{registry}\"\nbuild_repository = \"imagemesh/builds\"\nshared_repositories = {:?}\ncredential_timeout = \"500ms\"\n{heartbeat}[scheduler.intake]\n{intake}",
                    self.options.shared_repositories
                )
            }
            "mounter" => format!(
                "[mounter]\nmount_root = \"{}\"\nbundle_root = \"{}\"\n[mounter.worker]\n{worker}[mounter.placement]\n{heartbeat}[mounter.cache]\ndisk_dir = \"{}\"\n",
                self.mount_root.path().display(),
                self.bundle_root.path().display(),
                self.node_cache.path().display()
            ),
            "builder" => {
                format!("[{service}.worker]\n{worker}[{service}.placement]\n{heartbeat}")
            }
            other => format!("[{other}.worker]\n{worker}"),
        };
        format!("{nats}{body}")
    }

    /// Uploads a build context (a tar holding `files`) to the default tenant's contexts object
    /// store as `name`.
    pub async fn upload_context(&self, name: &str, files: &[(&str, &[u8])]) {
        self.upload_context_as(DEFAULT_TENANT, name, files).await
    }

    /// Uploads a build context to `tenant`'s contexts object store as `name`.
    pub async fn upload_context_as(&self, tenant: &str, name: &str, files: &[(&str, &[u8])]) {
        let mut tar = tar::Builder::new(Vec::new());
        for (path, data) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            tar.append_data(&mut header, path, *data).unwrap();
        }
        let bytes = tar.into_inner().unwrap();
        let js = async_nats::jetstream::new(self.client.clone());
        let store = streams::contexts(&js, tenant, &StreamOptions::default())
            .await
            .unwrap();
        store.put(name, &mut bytes.as_slice()).await.unwrap();
    }

    /// Publishes a request to the intake as protobuf, on its own subject in the default tenant,
    /// the way `imagemesh submit` does.
    pub async fn submit(&self, request: &ContainerRequest) {
        self.submit_as(DEFAULT_TENANT, request).await
    }

    /// Publishes a request to the intake of `tenant` (as a client of that tenant would; the
    /// payload's own `tenant` field is sent as it is).
    pub async fn submit_as(&self, tenant: &str, request: &ContainerRequest) {
        self.publish_raw_as(tenant, request.encode_to_vec(), None, &request.request_id)
            .await;
    }

    /// Publishes a request to the default tenant's intake like [`Mesh::submit`], returning the
    /// intake's refusal (full, or the request too large) as the message a client shows, instead
    /// of panicking.
    pub async fn try_submit(&self, request: &ContainerRequest) -> Result<(), String> {
        let subject = subjects::intake(DEFAULT_TENANT, &request.request_id);
        let js = async_nats::jetstream::new(self.client.clone());
        let mut headers = HeaderMap::new();
        headers.insert(subjects::CONTENT_TYPE_HEADER, CONTENT_TYPE_PROTOBUF);
        let message = PublishMessage::build()
            .payload(request.encode_to_vec().into())
            .headers(headers);
        let confirmed = match js.send_publish(subject.clone(), message).await {
            Ok(ack) => ack.await,
            Err(err) => Err(err),
        };
        confirmed
            .map(|_| ())
            .map_err(|err| match streams::intake_refusal(&err) {
                Some(refusal) => {
                    format!("{refusal}: request {} was not accepted", request.request_id)
                }
                None => format!("{subject} not stored: {err}"),
            })
    }

    /// Publishes raw bytes to the default tenant's intake subject of `request_id` with an
    /// optional content type.
    pub async fn publish_raw(
        &self,
        payload: Vec<u8>,
        content_type: Option<&str>,
        request_id: &str,
    ) {
        self.publish_raw_as(DEFAULT_TENANT, payload, content_type, request_id)
            .await
    }

    /// Publishes raw bytes to `tenant`'s intake subject of `request_id`.
    pub async fn publish_raw_as(
        &self,
        tenant: &str,
        payload: Vec<u8>,
        content_type: Option<&str>,
        request_id: &str,
    ) {
        let subject = subjects::intake(tenant, request_id);
        self.publish_to(&subject, payload, content_type, None).await;
    }

    /// Publishes `message` as protobuf to a work subject (`imagemesh.work.*`) the way a service
    /// does (message id `<tenant>.<request id>`; a message naming no tenant is the default
    /// tenant's), and waits until the stream stored it.
    pub async fn publish_work<M: Message + TenantRequest + Clone>(
        &self,
        subject: &str,
        message: &M,
    ) {
        let mut message = message.clone();
        if message.key().tenant.is_empty() {
            message.set_tenant(DEFAULT_TENANT);
        }
        let id = message.key().message_id();
        let payload = message.encode_to_vec();
        self.publish_to(subject, payload, Some(CONTENT_TYPE_PROTOBUF), Some(&id))
            .await;
    }

    async fn publish_to(
        &self,
        subject: &str,
        payload: Vec<u8>,
        content_type: Option<&str>,
        id: Option<&str>,
    ) {
        let js = async_nats::jetstream::new(self.client.clone());
        let mut headers = HeaderMap::new();
        if let Some(content_type) = content_type {
            headers.insert(subjects::CONTENT_TYPE_HEADER, content_type);
        }
        let mut message = PublishMessage::build()
            .payload(payload.into())
            .headers(headers);
        if let Some(id) = id {
            message = message.message_id(id);
        }
        let confirmed = match js.send_publish(subject.to_string(), message).await {
            Ok(ack) => ack.await,
            Err(err) => Err(err),
        };
        if let Err(err) = confirmed {
            // A refusal of the stream's limits says so (the intake full, a request too large).
            match streams::intake_refusal(&err) {
                Some(refusal) => panic!("{subject} not stored: {refusal}"),
                None => panic!("{subject} not stored: {err}"),
            }
        }
    }

    /// Every status event of a request of the default tenant so far, in order.
    pub async fn events(&self, request_id: &str) -> Vec<StatusEvent> {
        self.events_of(DEFAULT_TENANT, request_id).await
    }

    /// Every status event of `tenant`'s request so far, in order (what a client of that tenant
    /// may read: its own status subject).
    pub async fn events_of(&self, tenant: &str, request_id: &str) -> Vec<StatusEvent> {
        let subject = subjects::status(RequestKey::new(tenant, request_id));
        self.read_all(streams::STATUS, &subject)
            .await
            .iter()
            .map(|payload| StatusEvent::decode(payload.as_slice()).expect("status event decodes"))
            .collect()
    }

    /// Waits until the default tenant's request succeeded or failed; returns all its events.
    pub async fn wait_terminal(&self, request_id: &str, timeout: Duration) -> Vec<StatusEvent> {
        self.wait_terminal_of(DEFAULT_TENANT, request_id, timeout)
            .await
    }

    /// Waits until `tenant`'s request succeeded or failed; returns all its events.
    pub async fn wait_terminal_of(
        &self,
        tenant: &str,
        request_id: &str,
        timeout: Duration,
    ) -> Vec<StatusEvent> {
        eventually(
            timeout,
            &format!("request {tenant}/{request_id} to finish"),
            || async {
                let events = self.events_of(tenant, request_id).await;
                events.iter().any(is_terminal).then_some(events)
            },
        )
        .await
    }

    /// Every stored message on the status subject(s) `filter`, as bytes.
    pub async fn events_raw(&self, filter: &str) -> Vec<Vec<u8>> {
        self.read_all(streams::STATUS, filter).await
    }

    /// Every dead letter published so far.
    pub async fn dead_letters(&self) -> Vec<DeadLetter> {
        let filter = format!("{}.>", subjects::DEAD_LETTER_PREFIX);
        self.read_all(streams::DEAD_LETTER, &filter)
            .await
            .iter()
            .map(|payload| DeadLetter::decode(payload.as_slice()).expect("dead letter decodes"))
            .collect()
    }

    /// Reads every stored message on `filter` by direct sequence lookups (no consumers, so
    /// polling in a loop leaves nothing behind on the server).
    async fn read_all(&self, stream: &str, filter: &str) -> Vec<Vec<u8>> {
        let js = async_nats::jetstream::new(self.client.clone());
        let Ok(stream) = js.get_stream(stream).await else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut next = 1;
        loop {
            let found = stream
                .raw_message_builder()
                .sequence(next)
                .next_by_subject(filter.to_string())
                .send()
                .await;
            match found {
                Ok(message) => {
                    next = message.sequence + 1;
                    out.push(message.payload.to_vec());
                }
                Err(_) => return out,
            }
        }
    }

    /// Waits until the schedulers' intake consumer has every message acked, then one more ack
    /// wait, so a late redelivery (and a duplicate dispatch it would make) would show.
    pub async fn wait_intake_drained(&self) {
        let js = async_nats::jetstream::new(self.client.clone());
        eventually(Duration::from_secs(120), "the intake to drain", || async {
            let stream = js.get_stream(streams::INTAKE).await.ok()?;
            let mut consumer: async_nats::jetstream::consumer::PullConsumer =
                stream.get_consumer("scheduler").await.ok()?;
            let info = consumer.info().await.ok()?;
            (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
        })
        .await;
        tokio::time::sleep(self.options.ack_wait + Duration::from_millis(500)).await;
    }

    /// Waits until every request of `sent` (default tenant) has ended and counts the stream at
    /// the effect: `effect` is the status phase of the request's effect (`pushed`, `stored`,
    /// `mounted`), which a success must show exactly once. A failure must carry its reason.
    pub async fn tally(&self, sent: &[String], effect: &str) -> Tally {
        let mut tally = Tally {
            sent: sent.len(),
            ..Default::default()
        };
        for id in sent {
            let events = self.wait_terminal(id, Duration::from_secs(120)).await;
            tally.retries += events.iter().filter(|e| e.phase == "retrying").count();
            let effects = events.iter().filter(|e| e.phase == effect).count();
            let terminals = events.iter().filter(|e| is_terminal(e)).count();
            tally.duplicated += effects.saturating_sub(1) + terminals.saturating_sub(1);
            let last = events
                .iter()
                .rfind(|e| is_terminal(e))
                .expect("a terminal event");
            if last.state() == RequestState::Succeeded {
                assert_eq!(effects, 1, "{id} succeeded without its {effect} event");
                tally.completed += 1;
            } else {
                assert!(!last.message.is_empty(), "{id} failed without a reason");
                tally.failed.push((id.clone(), last.message.clone()));
            }
        }
        tally
    }

    /// Every message still stored in any stream, bucket or object store of the mesh.
    pub async fn everything_stored(&self) -> Vec<Vec<u8>> {
        let js = async_nats::jetstream::new(self.client.clone());
        let names: Vec<String> = js
            .stream_names()
            .filter_map(|name| async move { name.ok() })
            .collect()
            .await;
        let mut out = Vec::new();
        for name in names {
            out.extend(self.read_all(&name, ">").await);
        }
        out
    }

    /// Waits until mounter `worker_id` (started or restarted) answers its `mounts` endpoint.
    pub async fn wait_mounter_serving(&self, worker_id: &str, timeout: Duration) {
        let subject = format!("{}.mounts", subjects::mounter_control_prefix(worker_id));
        eventually(timeout, "the mounter to serve", || async {
            let reply = tokio::time::timeout(
                Duration::from_millis(500),
                self.client.request(subject.clone(), "".into()),
            )
            .await;
            matches!(reply, Ok(Ok(r)) if r.status.is_none()).then_some(())
        })
        .await;
    }

    /// The mounters' node cache directory (a temp dir of this mesh).
    pub fn node_cache(&self) -> &Path {
        self.node_cache.path()
    }

    /// The mounters' mount root (a temp dir of this mesh).
    pub fn mount_root(&self) -> &Path {
        self.mount_root.path()
    }

    /// The mounters' bundle root (a temp dir of this mesh).
    pub fn bundle_root(&self) -> &Path {
        self.bundle_root.path()
    }

    /// The bundles' overlay root filesystems mounted under the bundle root.
    pub fn bundles_mounted(&self) -> Vec<PathBuf> {
        mounts_below(self.bundle_root.path())
    }

    /// Containers' mount points under the mount root, as `/proc/mounts` lists them now (the
    /// images' shared lazy mounts under `.images` left out: [`Mesh::images_mounted`]).
    pub fn mounted(&self) -> Vec<PathBuf> {
        mounts_below(self.mount_root.path())
            .into_iter()
            .filter(|path| !path.components().any(|c| c.as_os_str() == ".images"))
            .collect()
    }

    /// The images' lazy FUSE mounts, which containers of one image share
    /// (`<mount_root>/.images/<lazy id>`).
    pub fn images_mounted(&self) -> Vec<PathBuf> {
        mounts_below(&self.mount_root.path().join(".images"))
    }

    /// Pushes a small busybox image to the default tenant's repository
    /// `imagemesh/builds/default:<tag>` in the build registry and has the indexer index it (the
    /// indexer must be running), so runtime requests can mount it. Returns its reference.
    pub async fn push_indexed_image(&self, tag: &str) -> String {
        self.push_indexed_image_as(DEFAULT_TENANT, tag).await
    }

    /// Like [`Mesh::push_indexed_image`], into `tenant`'s repository
    /// `imagemesh/builds/<tenant>:<tag>`, recorded as `tenant`'s image id `tag`.
    pub async fn push_indexed_image_as(&self, tenant: &str, tag: &str) -> String {
        let registry = self.registry.addr().to_string();
        let repository = format!("imagemesh/builds/{tenant}");
        let repository_tag = format!("{repository}:{tag}");
        let pushed = repository_tag.clone();
        let (username, password) = self.registry_login(&repository, true).await;
        tokio::task::spawn_blocking(move || {
            imagemesh_testkit::images::push_busybox(&registry, &pushed, &username, &password)
        })
        .await
        .expect("push the image");
        let image_ref = format!("{}/{repository_tag}", self.registry.addr());
        self.index_image_as(tenant, tag, &image_ref).await;
        image_ref
    }

    /// Has the indexer index `image_ref`, an image already pushed to `tenant`'s repository
    /// `imagemesh/builds/<tenant>`, recorded as `tenant`'s image id `tag`, and waits until it
    /// succeeded.
    pub async fn index_image_as(&self, tenant: &str, tag: &str, image_ref: &str) {
        let repository = format!("imagemesh/builds/{tenant}");
        let image_ref = image_ref.to_string();
        let request = imagemesh_proto::v1::IndexRequest {
            request_id: format!("index-{tag}"),
            tenant: tenant.to_string(),
            image_id: tag.to_string(),
            image_ref: image_ref.clone(),
            // The indexer stores the index next to the image: the build's pull,push token.
            credential: Some(self.registry_credential(&repository, true).await),
            ..Default::default()
        };
        self.publish_work(subjects::INDEX, &request).await;
        let events = self
            .wait_terminal_of(tenant, &request.request_id, Duration::from_secs(120))
            .await;
        let last = events.last().expect("events");
        assert_eq!(
            last.state(),
            RequestState::Succeeded,
            "indexing {image_ref}: {}",
            describe(&events)
        );
    }

    /// What a tool that does the registry's challenge itself (skopeo) logs in to the build
    /// registry with, for `repository`: in issuer mode a one-time login from the credential
    /// service (asked as the operator), good for one skopeo run; in Basic mode the account.
    pub async fn registry_login(&self, repository: &str, push: bool) -> (String, String) {
        if self.issuer.is_none() {
            return (REGISTRY_USER.into(), REGISTRY_PASSWORD.into());
        }
        let login = self.operator_mint(repository, push, true).await;
        (login.username, login.secret)
    }

    /// A credential for `repository` of the build registry that imagemesh's own registry client
    /// presents directly: in issuer mode a bearer token from the credential service (asked as
    /// the operator), in Basic mode the account.
    pub async fn registry_credential(
        &self,
        repository: &str,
        push: bool,
    ) -> imagemesh_proto::v1::RegistryCredential {
        if self.issuer.is_none() {
            return imagemesh_proto::v1::RegistryCredential {
                registry: self.registry.addr().to_string(),
                scheme: imagemesh_proto::v1::AuthScheme::Basic as i32,
                username: REGISTRY_USER.into(),
                secret: REGISTRY_PASSWORD.into(),
                ..Default::default()
            };
        }
        self.operator_mint(repository, push, false).await
    }

    async fn operator_mint(
        &self,
        repository: &str,
        push: bool,
        login: bool,
    ) -> imagemesh_proto::v1::RegistryCredential {
        let mut actions = vec!["pull".to_string()];
        if push {
            actions.push("push".to_string());
        }
        let request = imagemesh_proto::v1::TokenRequest {
            registry: self.registry.addr().to_string(),
            scope: Some(imagemesh_proto::v1::Scope {
                repository: repository.to_string(),
                actions,
            }),
            request_id: "test-operator".into(),
            login,
            ..Default::default()
        };
        let credentials = imagemesh_runtime::credentials::CredentialClient::new(
            self.client.clone(),
            Duration::from_secs(20),
        );
        let response = credentials
            .mint(&request)
            .await
            .unwrap_or_else(|e| panic!("the credential service refused the operator: {e:?}"));
        response.credential.expect("a credential")
    }

    /// Everything every service logged.
    pub fn all_logs(&self) -> String {
        self.services
            .iter()
            .map(|(name, process)| format!("==== {name} ====\n{}", process.logs()))
            .collect()
    }

    /// Panics if any service log, status event text or dead letter holds one of `secrets`.
    pub async fn assert_no_secret_leaked(&self, request_ids: &[&str], secrets: &[&str]) {
        let mut haystack = self.all_logs();
        for id in request_ids {
            for event in self.events(id).await {
                haystack.push_str(&format!("{event:?}"));
                haystack.push_str(&String::from_utf8_lossy(&event.encode_to_vec()));
            }
        }
        for letter in self.dead_letters().await {
            haystack.push_str(&String::from_utf8_lossy(&letter.encode_to_vec()));
        }
        for secret in secrets {
            assert!(
                !haystack.contains(secret),
                "secret {secret:?} leaked into logs, status or dead letters"
            );
        }
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let refused = match &self.access {
            Some(access) => access.refused_to_services(&self.nats_log()),
            None => Vec::new(),
        };
        if std::thread::panicking() {
            // What a failed test most needs to explain itself: what the server refused, and
            // what each service said.
            let violations: Vec<_> = self
                .nats_log()
                .lines()
                .filter(|l| l.contains("Violation") || l.contains("Authorization"))
                .map(str::to_string)
                .collect();
            eprintln!("==== nats-server refused ====\n{}", violations.join("\n"));
            eprintln!("{}", self.all_logs());
        }
        // Services first (a killed mounter leaves dead FUSE mounts), then detach whatever is
        // still mounted: a stale mount would break later tests that walk /tmp.
        self.services.clear();
        // Overlays first: they sit on the FUSE mounts.
        for mountpoint in self
            .bundles_mounted()
            .into_iter()
            .chain(self.mounted())
            .chain(self.images_mounted())
        {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&mountpoint)
                .status();
        }
        assert!(
            refused.is_empty() || std::thread::panicking(),
            "the permission table refused the mesh's own services:\n{}",
            refused.join("\n")
        );
    }
}

/// Mount points strictly below `root`, from /proc/mounts.
fn mounts_below(root: &Path) -> Vec<PathBuf> {
    let canonical = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    let table = std::fs::read_to_string("/proc/mounts").expect("/proc/mounts");
    table
        .lines()
        .filter_map(|line| line.split(' ').nth(1))
        .map(|field| PathBuf::from(field.replace("\\040", " ")))
        .filter(|path| {
            (path.starts_with(root) && path != root)
                || (path.starts_with(&canonical) && *path != canonical)
        })
        .collect()
}

/// The client URLs of `nodes`, comma-separated.
fn urls_of<'a>(nodes: impl IntoIterator<Item = &'a NatsServer>) -> String {
    nodes
        .into_iter()
        .map(NatsServer::url)
        .collect::<Vec<_>>()
        .join(",")
}

/// A nats-server (or, with `cluster`, a 3-node cluster whose nodes share the authorization,
/// TLS and JetStream encryption key) configured from a new bundle (operator and the default
/// tenant's client).
fn secured_server(identities: &[(String, Role)], cluster: bool) -> (Vec<NatsServer>, Access) {
    let dir = tempfile::Builder::new()
        .prefix("imagemesh-access-")
        .tempdir()
        .expect("bundle dir");
    let spec = BundleSpec {
        credentials: 0,
        schedulers: 0,
        indexers: 0,
        builders: Vec::new(),
        mounters: Vec::new(),
        ..Default::default()
    };
    let mut bundle = Bundle::generate(dir.path(), spec).expect("generate the security bundle");
    for (name, role) in identities {
        bundle
            .add_identity(name, role.clone())
            .expect("add identity");
    }
    let render = |store: &Path| {
        bundle
            .server_config("127.0.0.1:4222", store)
            .expect("server config")
    };
    let nodes = if cluster {
        NatsCluster::start_configured(CLUSTER_SIZE, render).nodes
    } else {
        vec![NatsServer::start_configured(render)]
    };
    let access = Access {
        bundle,
        services: Vec::new(),
        _dir: dir,
    };
    (nodes, access)
}

/// Adds identity `name` to the bundle when it is new, has every running server reload its
/// authorization config, and waits until the identity is known.
async fn ensure_identity(nodes: &[&NatsServer], bundle: &mut Bundle, name: &str, role: Role) {
    let known = bundle.identities().iter().any(|i| i.name == name);
    bundle.add_identity(name, role).expect("add identity");
    if known {
        return;
    }
    for nats in nodes.iter().filter(|n| n.is_running()) {
        let config = bundle
            .server_config("127.0.0.1:4222", &nats.store_dir())
            .expect("server config");
        nats.reconfigure(&config);
    }
    let urls = urls_of(nodes.iter().copied());
    eventually(
        Duration::from_secs(10),
        &format!("the server to know identity {name}"),
        || async {
            nats_config(&urls, bundle, name)
                .connect("imagemesh-tests")
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await;
}

/// How identity `name` of `bundle` connects to the servers at `urls` (comma-separated).
fn nats_config(urls: &str, bundle: &Bundle, name: &str) -> NatsConfig {
    NatsConfig {
        url: urls.to_string(),
        nkey_file: Some(bundle.seed_file(name)),
        tls_ca_file: Some(bundle.ca_file()),
        tls_required: true,
        connect_wait: Duration::from_millis(200),
        ..Default::default()
    }
}

/// Connects as identity `name` of `bundle` to the servers at `urls` (comma-separated).
pub async fn connect_as(urls: &str, bundle: &Bundle, name: &str) -> async_nats::Client {
    NatsConfig {
        connect_wait: Duration::from_secs(10),
        ..nats_config(urls, bundle, name)
    }
    .connect("imagemesh-tests")
    .await
    .unwrap_or_else(|e| panic!("connect as {name}: {e}"))
}

/// An identity name for an instance: the instance name when it already names the service.
fn instance_name(service: &str, instance: &str) -> String {
    imagemesh_access::bundle::worker_identity(service, instance)
}

/// How many instances of `service` answer `$SRV.PING.<service>` within a short wait.
pub async fn count_instances(client: &async_nats::Client, service: &str) -> usize {
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.expect("subscribe");
    let subject = format!("$SRV.PING.{service}");
    client
        .publish_with_reply(subject, inbox, "".into())
        .await
        .expect("publish");
    let deadline = tokio::time::Instant::now() + Duration::from_millis(150);
    let mut count = 0;
    while let Ok(Some(reply)) = tokio::time::timeout_at(deadline, replies.next()).await {
        // With nobody subscribed the server itself answers "no responders" (status 503).
        if reply.status != Some(async_nats::StatusCode::NO_RESPONDERS) {
            count += 1;
        }
    }
    count
}

/// A Dockerfile build request for image `img-<id>` from the uploaded context `context`.
pub fn build_request(id: &str, dockerfile: &str, context: &str) -> ContainerRequest {
    ContainerRequest {
        request_id: id.into(),
        image_id: format!("img-{id}"),
        kind: RequestKind::Build as i32,
        build_options: Some(BuildOptions {
            dockerfile: dockerfile.into(),
            context_object: context.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// How a stream of requests ended ([`Mesh::tally`]).
#[derive(Debug, Default)]
pub struct Tally {
    pub sent: usize,
    pub completed: usize,
    /// (request id, reason) of each request that failed.
    pub failed: Vec<(String, String)>,
    /// Requests with their effect, or their end, reported more than once.
    pub duplicated: usize,
    /// `retrying` events over all requests.
    pub retries: usize,
}

impl Tally {
    /// Requests that neither completed nor failed with a reason.
    pub fn lost(&self) -> usize {
        self.sent - self.completed - self.failed.len()
    }

    pub fn has_failed(&self, id: &str) -> bool {
        self.failed.iter().any(|(failed, _)| failed == id)
    }

    /// Prints the scenario's line (and each failure's reason), then asserts nothing was lost
    /// or duplicated.
    pub fn report(&self, scenario: &str) {
        eprintln!(
            "{scenario}: sent {} / completed {} / failed with a reason {} / lost {} / duplicated {} ({} retries)",
            self.sent,
            self.completed,
            self.failed.len(),
            self.lost(),
            self.duplicated,
            self.retries
        );
        for (id, reason) in &self.failed {
            eprintln!("  {id}: {reason}");
        }
        assert_eq!(self.lost(), 0, "{scenario}: requests lost");
        assert_eq!(self.duplicated, 0, "{scenario}: effects duplicated");
    }
}

/// Request `index` of a mixed stream: builds (`FROM scratch`) at even indexes, runtime requests
/// of the default tenant's image `img-<index>` in `registry` at odd ones. For the stream tests
/// that count what a fault loses or doubles.
pub fn mixed_request(index: usize, registry: &str) -> ContainerRequest {
    let id = format!("req-{index:04}");
    if index.is_multiple_of(2) {
        build_request(&id, "FROM scratch\n", "")
    } else {
        ContainerRequest {
            request_id: id,
            kind: RequestKind::Runtime as i32,
            image_ref: format!("{registry}/imagemesh/builds/{DEFAULT_TENANT}:img-{index}"),
            ..Default::default()
        }
    }
}

/// A token server that knows the mesh's account, for `service`, and a docker-registry with
/// distribution token auth that trusts it.
pub fn token_registry(service: &str) -> (TokenServer, Registry) {
    let tokens = TokenServer::start(service, &[(REGISTRY_USER, REGISTRY_PASSWORD)]);
    let registry = Registry::start(tokens.registry_auth());
    (tokens, registry)
}

/// The credential service's entry for a build registry with distribution token auth, whose
/// token server knows the build registry's account.
pub fn token_registry_config(registry: &str) -> String {
    format!(
        "[[credential.registries]]\nprovider = \"token\"\nhost = \"{registry}\"\n\
         username = \"{REGISTRY_USER}\"\npassword = {{ env = \"{PASSWORD_ENV}\" }}\n"
    )
}

pub fn is_terminal(event: &StatusEvent) -> bool {
    matches!(
        event.state(),
        RequestState::Succeeded | RequestState::Failed
    )
}

/// The terminal event of a finished request. Not simply the last event: progress events (the
/// scheduler's `dispatched`) are published without waiting for the stream, so under load one can
/// be stored after a fast worker's final event.
pub fn terminal(events: &[StatusEvent]) -> &StatusEvent {
    events
        .iter()
        .rev()
        .find(|e| is_terminal(e))
        .unwrap_or_else(|| panic!("no terminal event:\n{}", describe(events)))
}

/// The terminal event of a finished request, which must have succeeded.
pub fn assert_succeeded(events: &[StatusEvent]) -> &StatusEvent {
    let last = terminal(events);
    assert_eq!(
        last.state(),
        RequestState::Succeeded,
        "{}",
        describe(events)
    );
    last
}

/// The terminal event of a finished request, which must be a failure by `service` with `code`.
pub fn assert_failed<'a>(
    events: &'a [StatusEvent],
    service: &str,
    code: ErrorCode,
) -> &'a StatusEvent {
    let last = terminal(events);
    assert_eq!(last.state(), RequestState::Failed, "{}", describe(events));
    assert_eq!(last.service, service, "{}", describe(events));
    assert_eq!(last.error_code(), code, "{}", describe(events));
    last
}

/// Like [`assert_failed`], for a request that was retried (it reported `retrying`) and given
/// up after `attempts` deliveries.
pub fn assert_gave_up<'a>(
    events: &'a [StatusEvent],
    service: &str,
    code: ErrorCode,
    attempts: u32,
) -> &'a StatusEvent {
    let last = assert_failed(events, service, code);
    let gave_up = format!("gave up after {attempts} attempts");
    assert!(last.message.contains(&gave_up), "{}", last.message);
    assert!(
        events.iter().any(|e| e.phase == "retrying"),
        "{}",
        describe(events)
    );
    last
}

pub fn find<'a>(events: &'a [StatusEvent], service: &str, phase: &str) -> Option<&'a StatusEvent> {
    events
        .iter()
        .find(|e| e.service == service && e.phase == phase)
}

/// Events as readable lines, for assertion messages.
pub fn describe(events: &[StatusEvent]) -> String {
    events
        .iter()
        .map(|e| format!("{} {:?} {}: {}\n", e.service, e.state(), e.phase, e.message))
        .collect()
}
