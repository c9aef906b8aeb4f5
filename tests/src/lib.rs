//! A whole mesh for end-to-end tests: a real nats-server, a real htpasswd-protected
//! docker-registry as the build registry, and the five service binaries as processes, each with
//! its own config file and captured log. Everything stops when the [`Mesh`] drops.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull::OrderedConfig;
use async_nats::jetstream::message::PublishMessage;
use futures::StreamExt;
use imagemesh_proto::v1::{ContainerRequest, DeadLetter, RequestState, StatusEvent};
use imagemesh_runtime::{streams, subjects};
use imagemesh_testkit::{
    NatsServer, Registry, RegistryAuth, ServiceProcess, eventually, wait_for_service,
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

/// How to set the mesh up.
#[derive(Debug, Clone)]
pub struct MeshOptions {
    /// The password the credential service holds (set it wrong to test rejection).
    pub credential_password: String,
    /// Services to start now; others can be started later with [`Mesh::start_service`].
    pub start: Vec<&'static str>,
    /// Deliveries before a request is given up (scheduler intake and workers).
    pub max_deliver: u32,
}

impl Default for MeshOptions {
    fn default() -> Self {
        Self {
            credential_password: REGISTRY_PASSWORD.into(),
            start: SERVICES.to_vec(),
            max_deliver: 5,
        }
    }
}

/// A running mesh.
pub struct Mesh {
    pub nats: NatsServer,
    pub registry: Registry,
    pub client: async_nats::Client,
    pub options: MeshOptions,
    services: BTreeMap<&'static str, ServiceProcess>,
}

impl Mesh {
    /// Starts NATS, the registry and the services in `options.start`, and waits until each
    /// service answers `$SRV.PING`.
    pub async fn start(options: MeshOptions) -> Mesh {
        let nats = NatsServer::start();
        let registry = Registry::start(RegistryAuth::Htpasswd(vec![(
            REGISTRY_USER.into(),
            REGISTRY_PASSWORD.into(),
        )]));
        let client = nats.client().await;
        let mut mesh = Mesh {
            nats,
            registry,
            client,
            options: options.clone(),
            services: BTreeMap::new(),
        };
        for service in options.start {
            mesh.start_service(service).await;
        }
        mesh
    }

    /// Starts one service and waits until it is ready.
    pub async fn start_service(&mut self, service: &'static str) {
        let config = self.config(service);
        let binary = format!("imagemesh-{service}");
        let env = [(PASSWORD_ENV, self.options.credential_password.as_str())];
        let process = ServiceProcess::spawn(&binary, &config, &env);
        self.services.insert(service, process);
        wait_for_service(&self.client, service, Duration::from_secs(20)).await;
    }

    pub fn service(&mut self, service: &str) -> &mut ServiceProcess {
        self.services.get_mut(service).expect("service started")
    }

    /// The TOML config of `service` in this mesh.
    pub fn config(&self, service: &str) -> String {
        let nats = format!("[nats]\nurl = \"{}\"\n", self.nats.url());
        let worker = format!(
            "concurrency = 8\nmax_deliver = {}\nack_wait = \"10s\"\nretry_initial = \"100ms\"\nretry_max = \"400ms\"\nshutdown_grace = \"5s\"\n",
            self.options.max_deliver
        );
        let registry = self.registry.addr();
        let body = match service {
            "credential" => format!(
                "[[credential.registries]]\nprovider = \"basic\"\nhost = \"{registry}\"\nusername = \"{REGISTRY_USER}\"\npassword = {{ env = \"{PASSWORD_ENV}\" }}\n"
            ),
            "scheduler" => format!(
                "[scheduler]\nbuild_registry = \"{registry}\"\nbuild_repository = \"imagemesh/builds\"\ncredential_timeout = \"500ms\"\n[scheduler.intake]\n{worker}"
            ),
            other => format!("[{other}.worker]\n{worker}"),
        };
        format!("{nats}{body}")
    }

    /// Publishes a request to the intake as protobuf, with its id as message id.
    pub async fn submit(&self, request: &ContainerRequest) {
        self.publish_raw(request.encode_to_vec(), None, Some(&request.request_id))
            .await;
    }

    /// Publishes raw bytes to the intake with an optional content type and message id.
    pub async fn publish_raw(
        &self,
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
        js.send_publish(subjects::INTAKE, message)
            .await
            .expect("publish to intake")
            .await
            .expect("intake stored the request");
    }

    /// Every status event of a request so far, in order.
    pub async fn events(&self, request_id: &str) -> Vec<StatusEvent> {
        self.read_all(streams::STATUS, &subjects::status(request_id))
            .await
            .iter()
            .map(|payload| StatusEvent::decode(payload.as_slice()).expect("status event decodes"))
            .collect()
    }

    /// Waits until the request succeeded or failed; returns all its events.
    pub async fn wait_terminal(&self, request_id: &str, timeout: Duration) -> Vec<StatusEvent> {
        eventually(
            timeout,
            &format!("request {request_id} to finish"),
            || async {
                let events = self.events(request_id).await;
                events.iter().any(is_terminal).then_some(events)
            },
        )
        .await
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

    async fn read_all(&self, stream: &str, filter: &str) -> Vec<Vec<u8>> {
        let js = async_nats::jetstream::new(self.client.clone());
        let Ok(stream) = js.get_stream(stream).await else {
            return Vec::new();
        };
        let pending = stream
            .get_info()
            .await
            .map(|info| info.state.messages)
            .unwrap_or(0);
        if pending == 0 {
            return Vec::new();
        }
        let consumer = stream
            .create_consumer(OrderedConfig {
                filter_subject: filter.to_string(),
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .expect("ordered consumer");
        let info = consumer.cached_info().clone();
        let mut remaining = info.num_pending;
        let mut out = Vec::new();
        let mut messages = consumer.messages().await.expect("messages");
        while remaining > 0 {
            match tokio::time::timeout(Duration::from_secs(5), messages.next()).await {
                Ok(Some(Ok(message))) => {
                    out.push(message.payload.to_vec());
                    remaining -= 1;
                }
                _ => break,
            }
        }
        out
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

pub fn is_terminal(event: &StatusEvent) -> bool {
    matches!(
        event.state(),
        RequestState::Succeeded | RequestState::Failed
    )
}

/// The events of one service with one phase.
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
