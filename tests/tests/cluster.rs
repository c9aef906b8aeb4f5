//! The mesh on a 3-node JetStream cluster (every stream and bucket with 3 replicas, services
//! given every node's URL), and NATS faults: a node killed with SIGKILL mid-stream, the leader
//! of the intake stream killed, the whole cluster restarted, and a single server restarted.
//!
//! Each scenario sends a paced stream of requests down the scheduler's dispatch path (credential
//! and scheduler running, a probe standing in for builders and mounters) while the fault
//! happens, then counts at the effect: a request is *completed* when it reached a work stream,
//! *failed* when it has a terminal `FAILED` status event, and *lost* when neither; a request is
//! *duplicated* when it was stored in a work stream more than once (a worker would have built or
//! mounted it twice). A redelivery of the same stored message to the probe is not a duplicate
//! (the probe's ack may be lost in the fault; a worker's de-duplication covers that).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, pull};
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use imagemesh_proto::v1::{ContainerRequest, RequestState};
use imagemesh_proto::{DEFAULT_TENANT, TenantRequest};
use imagemesh_runtime::{placement, streams, subjects};
use imagemesh_testkit::eventually;
use imagemesh_tests::mixed_request as request;
use imagemesh_tests::{Mesh, MeshOptions, describe, is_terminal};
use prost::Message;

/// Requests per scenario.
const COUNT: usize = 30;
/// Pace of the stream of requests, so the fault lands in its middle.
const PACE: Duration = Duration::from_millis(60);
/// How long anything may take to come back after a fault.
const WAIT: Duration = Duration::from_secs(60);

/// Where a request was stored: (work stream, stream sequence).
type Stored = BTreeSet<(String, u64)>;

/// What reached the work streams: per request (`<tenant>.<request id>`), where it was stored
/// and how many deliveries the probe got.
#[derive(Clone, Default)]
struct Dispatches {
    stored: Arc<Mutex<BTreeMap<String, Stored>>>,
    deliveries: Arc<Mutex<usize>>,
}

impl Dispatches {
    /// Consumes the shared build and mount queues (as builders and mounters would) for the rest
    /// of the test, through every fault: a broken subscription is opened again.
    async fn start(client: &async_nats::Client) -> Dispatches {
        let dispatches = Dispatches::default();
        let js = jetstream::new(client.clone());
        for kind in [placement::BUILD, placement::MOUNT] {
            let config = pull::Config {
                durable_name: Some(kind.durable.into()),
                filter_subject: kind.subject.into(),
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(2),
                ..Default::default()
            };
            let consumer: jetstream::consumer::PullConsumer =
                eventually(WAIT, "the probe's consumer", || async {
                    let stream = js.get_stream(kind.stream).await.ok()?;
                    stream
                        .get_or_create_consumer(kind.durable, config.clone())
                        .await
                        .ok()
                })
                .await;
            let dispatches = dispatches.clone();
            tokio::spawn(async move {
                loop {
                    let Ok(mut messages) = consumer.messages().await else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    while let Some(next) = messages.next().await {
                        let Ok(message) = next else { continue };
                        let Ok(info) = message.info().map(|i| i.stream_sequence) else {
                            continue;
                        };
                        let request = ContainerRequest::decode(message.payload.clone())
                            .expect("dispatched requests decode");
                        dispatches
                            .stored
                            .lock()
                            .unwrap()
                            .entry(request.key().message_id())
                            .or_default()
                            .insert((kind.stream.to_string(), info));
                        *dispatches.deliveries.lock().unwrap() += 1;
                        let _ = message.double_ack_with(AckKind::Ack).await;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        }
        dispatches
    }

    fn distinct(&self) -> usize {
        self.stored.lock().unwrap().len()
    }

    fn has(&self, key: &str) -> bool {
        self.stored.lock().unwrap().contains_key(key)
    }

    /// Requests stored in a work stream more than once.
    fn duplicated(&self) -> usize {
        self.stored
            .lock()
            .unwrap()
            .values()
            .filter(|stored| stored.len() > 1)
            .count()
    }

    /// Each request stored more than once, with how many `dispatched` events the scheduler
    /// stored for it and a description (where it was stored, its status events).
    async fn duplicates(&self, mesh: &Mesh) -> Vec<(usize, String)> {
        let duplicates: Vec<(String, Stored)> = self
            .stored
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, stored)| stored.len() > 1)
            .map(|(key, stored)| (key.clone(), stored.clone()))
            .collect();
        let mut out = Vec::new();
        for (key, stored) in duplicates {
            let id = key.split_once('.').map_or(key.as_str(), |(_, id)| id);
            let events = mesh.events(id).await;
            let dispatched = events
                .iter()
                .filter(|e| e.service == "scheduler" && e.phase == "dispatched")
                .count();
            out.push((
                dispatched,
                format!("{key} stored as {stored:?}:\n{}", describe(&events)),
            ));
        }
        out
    }

    /// Deliveries to the probe beyond one per stored message.
    fn redeliveries(&self) -> usize {
        let stored: usize = self
            .stored
            .lock()
            .unwrap()
            .values()
            .map(BTreeSet::len)
            .sum();
        self.deliveries.lock().unwrap().saturating_sub(stored)
    }
}

/// Submits `COUNT` requests one every [`PACE`], each until the intake stored it: a publish that
/// failed in a fault is sent again, and one refused because its subject already holds a message
/// was stored by an earlier attempt whose acknowledgement was lost. Returns how many the intake
/// took.
fn submit_paced(client: async_nats::Client, registry: String) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let js = jetstream::new(client);
        let mut accepted = 0;
        for index in 0..COUNT {
            let request = request(index, &registry);
            let subject = subjects::intake(DEFAULT_TENANT, &request.request_id);
            let payload: bytes::Bytes = request.encode_to_vec().into();
            let stored = eventually(WAIT, &format!("the intake to take {subject}"), || {
                let js = js.clone();
                let subject = subject.clone();
                let payload = payload.clone();
                async move {
                    let ack = tokio::time::timeout(Duration::from_secs(3), async {
                        js.publish(subject, payload).await?.await
                    })
                    .await;
                    match ack {
                        Ok(Ok(_)) => Some(true),
                        Ok(Err(err))
                            if err.to_string().contains("maximum messages per subject") =>
                        {
                            Some(true)
                        }
                        _ => None,
                    }
                }
            })
            .await;
            accepted += usize::from(stored);
            tokio::time::sleep(PACE).await;
        }
        accepted
    })
}

/// The server name of the leader of `stream`'s RAFT group.
async fn leader_of(mesh: &Mesh, stream: &str) -> String {
    let js = jetstream::new(mesh.client.clone());
    eventually(WAIT, &format!("a leader of {stream}"), || async {
        let mut stream = js.get_stream(stream).await.ok()?;
        let info = stream.info().await.ok()?;
        info.cluster.as_ref()?.leader.clone()
    })
    .await
}

/// Waits until `expected` requests reached the work streams (the mesh keeps working).
async fn progress(dispatches: &Dispatches, expected: usize, what: &str) {
    eventually(WAIT, what, || async {
        (dispatches.distinct() >= expected).then_some(())
    })
    .await;
}

/// Counts what happened to the `sent` requests, prints one line, and asserts nothing was lost
/// and nothing stored twice beyond what `tolerance` allows.
async fn account(
    mesh: &Mesh,
    dispatches: &Dispatches,
    scenario: &str,
    sent: usize,
    tolerance: Tolerance,
) {
    assert_eq!(sent, COUNT, "the intake refused requests for good");
    let keys: Vec<(String, String)> = (0..COUNT)
        .map(|index| {
            let id = format!("req-{index:04}");
            (format!("{DEFAULT_TENANT}.{id}"), id)
        })
        .collect();
    // Every request ends dispatched or failed; give the mesh its time, then count.
    let mut failed: BTreeMap<String, String> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        for (key, id) in &keys {
            if dispatches.has(key) || failed.contains_key(id) {
                continue;
            }
            let events = mesh.events(id).await;
            if let Some(last) = events.iter().rev().find(|e| is_terminal(e))
                && last.state() == RequestState::Failed
            {
                failed.insert(
                    id.clone(),
                    format!("{:?}: {}", last.error_code(), last.message),
                );
            }
        }
        let open = keys
            .iter()
            .filter(|(key, id)| !dispatches.has(key) && !failed.contains_key(id))
            .count();
        if open == 0 || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    mesh.wait_intake_drained().await;
    let completed = keys.iter().filter(|(key, _)| dispatches.has(key)).count();
    let lost: Vec<&str> = keys
        .iter()
        .filter(|(key, id)| !dispatches.has(key) && !failed.contains_key(id))
        .map(|(_, id)| id.as_str())
        .collect();
    let duplicated = dispatches.duplicated();

    let reasons: BTreeSet<&str> = failed.values().map(String::as_str).collect();
    println!(
        "cluster scenario {scenario}: sent {sent} / completed {completed} / failed {} {reasons:?} \
         / lost {} / duplicated {duplicated} (redelivered to the probe: {})",
        failed.len(),
        lost.len(),
        dispatches.redeliveries()
    );
    assert_eq!(lost, Vec::<&str>::new(), "requests lost in {scenario}");
    if duplicated == 0 {
        return;
    }
    let duplicates = dispatches.duplicates(mesh).await;
    let described = || {
        duplicates
            .iter()
            .map(|(_, d)| d.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    };
    match tolerance {
        Tolerance::None => panic!("requests dispatched twice in {scenario}:\n{}", described()),
        // The server lost acknowledged writes: counted and printed, not held against the mesh.
        Tolerance::ServerKilled { unrecoverable } if !unrecoverable.is_empty() => {
            println!("cluster scenario {scenario}: the server could not load {unrecoverable:?}")
        }
        Tolerance::ServerKilled { .. } => {
            // Dispatched again although its `dispatched` event was stored: what the scheduler's
            // check exists to prevent.
            let after_the_event: Vec<&String> = duplicates
                .iter()
                .filter(|(dispatched, _)| *dispatched > 1)
                .map(|(_, d)| d)
                .collect();
            assert!(
                after_the_event.is_empty(),
                "requests dispatched again after their dispatched event was stored in {scenario}:\n{}",
                described()
            );
            println!(
                "cluster scenario {scenario}: {duplicated} stored twice, each killed between its \
                 work message and its dispatched event being stored:\n{}",
                described()
            );
        }
    }
}

/// What a scenario's fault may cost in requests stored twice.
enum Tolerance {
    /// Nothing.
    None,
    /// A single server killed with SIGKILL. A request may be stored twice only when the kill
    /// came after its work message was stored and before its `dispatched` event was (a few
    /// milliseconds): nothing then tells the scheduler it went out, and the work stream forgot
    /// its message id once the worker took it. One whose `dispatched` event was stored is never
    /// dispatched again. And nothing is held against the mesh when the server could not load a
    /// stream again (`unrecoverable`).
    ServerKilled { unrecoverable: Vec<String> },
}

/// The dispatch path on a secured mesh: credential and scheduler, as in the scheduler tests.
async fn dispatch_mesh(cluster: bool) -> (Mesh, Dispatches) {
    let mesh = Mesh::start(MeshOptions {
        start: vec!["credential", "scheduler"],
        ack_wait: Duration::from_secs(2),
        max_deliver: 50,
        cluster,
        ..Default::default()
    })
    .await;
    if cluster {
        // Every stream is replicated on all three nodes.
        let js = jetstream::new(mesh.client.clone());
        for name in streams::ALL {
            let mut stream = js.get_stream(name).await.expect("stream");
            let info = stream.info().await.expect("stream info");
            assert_eq!(info.config.num_replicas, 3, "{name}");
        }
    }
    let dispatches = Dispatches::start(&mesh.client).await;
    (mesh, dispatches)
}

#[tokio::test]
async fn a_node_killed_mid_stream_and_restarted_loses_nothing_and_duplicates_nothing() {
    let (mut mesh, dispatches) = dispatch_mesh(true).await;
    let submitter = submit_paced(mesh.client.clone(), mesh.registry.addr().to_string());
    progress(&dispatches, COUNT / 4, "the first requests").await;

    // The last node: not necessarily a leader of anything (the next test kills one).
    let victim = mesh.nats_node_count() - 1;
    let at_fault = dispatches.distinct();
    mesh.nats_node(victim).kill();
    progress(&dispatches, COUNT / 2, "requests with a node down").await;
    mesh.nats_node(victim).restart();

    let sent = submitter.await.expect("submitter");
    account(
        &mesh,
        &dispatches,
        &format!("(a) one node killed -9 at {at_fault}/{COUNT} dispatched"),
        sent,
        Tolerance::None,
    )
    .await;
}

#[tokio::test]
async fn the_intake_leader_killed_mid_stream_loses_nothing_and_duplicates_nothing() {
    let (mut mesh, dispatches) = dispatch_mesh(true).await;
    let submitter = submit_paced(mesh.client.clone(), mesh.registry.addr().to_string());
    progress(&dispatches, COUNT / 4, "the first requests").await;

    let leader = leader_of(&mesh, streams::INTAKE).await;
    let victim = mesh
        .nats_node_named(&leader)
        .unwrap_or_else(|| panic!("no node named {leader}"));
    let at_fault = dispatches.distinct();
    mesh.nats_node(victim).kill();
    // Another node takes over the stream, and requests flow again.
    let successor = leader_of(&mesh, streams::INTAKE).await;
    assert_ne!(successor, leader, "the killed node still leads the intake");
    progress(&dispatches, COUNT / 2, "requests after the leader died").await;
    mesh.nats_node(victim).restart();

    let sent = submitter.await.expect("submitter");
    account(
        &mesh,
        &dispatches,
        &format!(
            "(b) intake leader {leader} killed -9 at {at_fault}/{COUNT} dispatched \
             ({successor} took over)"
        ),
        sent,
        Tolerance::None,
    )
    .await;
}

#[tokio::test]
async fn the_whole_cluster_restarted_mid_stream_loses_nothing_and_duplicates_nothing() {
    let (mut mesh, dispatches) = dispatch_mesh(true).await;
    let submitter = submit_paced(mesh.client.clone(), mesh.registry.addr().to_string());
    progress(&dispatches, COUNT / 4, "the first requests").await;

    let at_fault = dispatches.distinct();
    for node in 0..mesh.nats_node_count() {
        mesh.nats_node(node).kill();
    }
    for node in 0..mesh.nats_node_count() {
        mesh.nats_node(node).restart();
    }

    let sent = submitter.await.expect("submitter");
    account(
        &mesh,
        &dispatches,
        &format!("(c) whole cluster killed -9 at {at_fault}/{COUNT} dispatched, restarted"),
        sent,
        Tolerance::None,
    )
    .await;
}

#[tokio::test]
async fn a_single_server_restarted_mid_stream_loses_nothing_and_duplicates_nothing() {
    let (mut mesh, dispatches) = dispatch_mesh(false).await;
    let submitter = submit_paced(mesh.client.clone(), mesh.registry.addr().to_string());
    progress(&dispatches, COUNT / 4, "the first requests").await;

    let at_fault = dispatches.distinct();
    mesh.nats.stop();
    mesh.nats.restart();

    let sent = submitter.await.expect("submitter");
    account(
        &mesh,
        &dispatches,
        &format!("(d) single server stopped (SIGTERM) at {at_fault}/{COUNT} dispatched, restarted"),
        sent,
        Tolerance::None,
    )
    .await;
}

/// SIGKILL on a single server: the server forgets the acks of its last moments, so the
/// scheduler is handed a request it had dispatched again as new, and the work stream no longer
/// remembers that message id once a worker consumed it. The scheduler's check of the request's
/// `dispatched` event keeps it from being dispatched twice (see [`Tolerance::ServerKilled`] for
/// the milliseconds it cannot cover).
#[tokio::test]
async fn a_single_server_killed_mid_stream_loses_nothing_and_redispatches_nothing_recorded() {
    let (mut mesh, dispatches) = dispatch_mesh(false).await;
    let submitter = submit_paced(mesh.client.clone(), mesh.registry.addr().to_string());
    progress(&dispatches, COUNT / 4, "the first requests").await;

    let at_fault = dispatches.distinct();
    mesh.nats.kill();
    mesh.nats.restart();

    let sent = submitter.await.expect("submitter");
    account(
        &mesh,
        &dispatches,
        &format!("(d') single server killed -9 at {at_fault}/{COUNT} dispatched, restarted"),
        sent,
        Tolerance::ServerKilled {
            unrecoverable: unrecoverable_streams(&mesh),
        },
    )
    .await;
    // How often the window opened (the server handed a dispatched request over again): not
    // asserted, it depends on when the kill lands.
    let caught = mesh
        .all_logs()
        .matches("dispatched before this delivery")
        .count();
    println!("(d') deliveries the scheduler recognised as dispatched already: {caught}");
}

/// Streams the server could not load again after it was killed, from its log. Some runs of a
/// server with encryption at rest killed with SIGKILL find a stream's state file corrupt and
/// leave the stream out (docs/reliability.md): what that stream held is gone, acknowledged
/// writes included, and nothing above the server can tell which requests went through it.
fn unrecoverable_streams(mesh: &Mesh) -> Vec<String> {
    mesh.nats_log()
        .lines()
        .filter(|line| line.contains("Error recreating stream"))
        .map(|line| line.trim().to_string())
        .collect()
}
