//! The permission matrix against a real nats-server running the configuration rendered from
//! the table (`imagemesh-access`): every action the table does not grant is refused by the
//! server, for each identity, and the effect it aimed at does not happen. Each refusal is
//! paired with the same action by the identity that may do it, so a table that refused
//! everything, or a check that saw no refusal, fails the test.

use std::time::Duration;

use async_nats::Client;
use futures::StreamExt;
use imagemesh_access::Role;
use imagemesh_proto::v1::{Scope, TokenRequest};
use imagemesh_runtime::credentials::CredentialClient;
use imagemesh_runtime::{streams, subjects};
use imagemesh_testkit::eventually;
use imagemesh_tests::{Mesh, MeshOptions};
use prost::Message;

/// The identities of the matrix, connected.
struct Cast {
    operator: Client,
    scheduler: Client,
    builder: Client,
    other_builder: Client,
    indexer: Client,
    mounter: Client,
    client_a: Client,
    client_b: Client,
}

async fn cast(mesh: &mut Mesh) -> Cast {
    let builder = |id: &str| Role::Builder {
        worker_id: id.into(),
    };
    Cast {
        operator: mesh.client.clone(),
        scheduler: mesh.client_as("scheduler-1", Role::Scheduler).await,
        builder: mesh.client_as("builder-w1", builder("w1")).await,
        other_builder: mesh.client_as("builder-w2", builder("w2")).await,
        indexer: mesh.client_as("indexer-1", Role::Indexer).await,
        mounter: mesh
            .client_as(
                "mounter-m1",
                Role::Mounter {
                    worker_id: "m1".into(),
                },
            )
            .await,
        client_a: mesh.tenant_client("a").await,
        client_b: mesh.tenant_client("b").await,
    }
}

/// The nkey of identity `name`.
fn key_of(mesh: &Mesh, name: &str) -> String {
    let bundle = mesh.bundle().expect("secured mesh");
    bundle.identity(name).unwrap().public_key.clone()
}

/// Waits until the server has logged a refusal of `subject` for identity `name`.
async fn assert_refused(mesh: &Mesh, name: &str, subject: &str) {
    let key = key_of(mesh, name);
    let quoted = format!("\"{subject}\"");
    eventually(
        Duration::from_secs(5),
        &format!("the server to refuse {subject} to {name}"),
        || async {
            mesh.nats
                .log()
                .lines()
                .any(|l| l.contains(&key) && l.contains("Violation") && l.contains(&quoted))
                .then_some(())
        },
    )
    .await;
}

/// Whether the server ever refused anything to identity `name`.
fn was_refused_anything(mesh: &Mesh, name: &str) -> bool {
    let key = key_of(mesh, name);
    mesh.nats
        .log()
        .lines()
        .any(|l| l.contains(&key) && l.contains("Violation"))
}

/// Publishes and waits for the server to have read it (a flush is a round trip).
async fn publish(client: &Client, subject: &str, payload: &[u8]) {
    client
        .publish(subject.to_string(), payload.to_vec().into())
        .await
        .unwrap();
    client.flush().await.unwrap();
}

/// Publishes on `subject` from `from` until `subscription` receives it. A flush only writes
/// the socket, so the subscription may reach the server after a single publish would have.
async fn assert_reaches(from: &Client, subject: &str, subscription: &mut async_nats::Subscriber) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        from.publish(subject.to_string(), "hello".into())
            .await
            .unwrap();
        let wait = tokio::time::sleep(Duration::from_millis(200));
        tokio::select! {
            got = subscription.next() => {
                assert!(got.is_some(), "subscription to {subject} ended");
                return;
            }
            _ = wait => {}
        }
    }
    panic!("nothing published on {subject} arrived");
}

/// A pull-and-push token request for `repository` of the build registry.
fn token_request(mesh: &Mesh, repository: &str, actions: &[&str]) -> TokenRequest {
    TokenRequest {
        registry: mesh.registry.addr().to_string(),
        scope: Some(Scope {
            repository: repository.into(),
            actions: actions.iter().map(|a| a.to_string()).collect(),
        }),
        request_id: "perm".into(),
        ..Default::default()
    }
}

fn secured_mesh() -> MeshOptions {
    let mut options = MeshOptions {
        start: vec!["credential"],
        ..Default::default()
    };
    let builder = |id: &str| Role::Builder {
        worker_id: id.into(),
    };
    let mounter = |id: &str| Role::Mounter {
        worker_id: id.into(),
    };
    let client = |tenant: &str| Role::Client {
        tenant: tenant.into(),
    };
    options.identities.extend([
        ("scheduler-1".to_string(), Role::Scheduler),
        ("builder-w1".to_string(), builder("w1")),
        ("builder-w2".to_string(), builder("w2")),
        ("indexer-1".to_string(), Role::Indexer),
        ("mounter-m1".to_string(), mounter("m1")),
        ("mounter-m2".to_string(), mounter("m2")),
        ("client-a".to_string(), client("a")),
        ("client-b".to_string(), client("b")),
    ]);
    options
}

#[tokio::test]
async fn only_schedulers_mint_and_only_mounters_refresh() {
    let mut mesh = Mesh::start(secured_mesh()).await;
    let cast = cast(&mut mesh).await;
    let wait = Duration::from_secs(5);
    let request = token_request(&mesh, "imagemesh/builds", &["pull", "push"]);

    // The scheduler mints.
    let minted = CredentialClient::new(cast.scheduler.clone(), wait)
        .mint(&request)
        .await
        .expect("the scheduler may mint");
    assert!(minted.credential.is_some());

    // Nobody else reaches the mint endpoint.
    for (name, client) in [
        ("builder-w1", &cast.builder),
        ("indexer-1", &cast.indexer),
        ("mounter-m1", &cast.mounter),
        ("client-a", &cast.client_a),
    ] {
        publish(client, subjects::CREDENTIAL_MINT, &request.encode_to_vec()).await;
        assert_refused(&mesh, name, subjects::CREDENTIAL_MINT).await;
    }

    // Mounters refresh, pull only; push through the refresh endpoint is refused by the service.
    let pull = token_request(&mesh, "imagemesh/builds", &["pull"]);
    let mounter = CredentialClient::new(cast.mounter.clone(), wait);
    mounter
        .refresh(&pull)
        .await
        .expect("the mounter may refresh");
    let push = mounter.refresh(&request).await;
    assert!(push.is_err(), "refresh granted push: {push:?}");
    // Schedulers, builders and clients do not reach the refresh endpoint.
    for (name, client) in [
        ("scheduler-1", &cast.scheduler),
        ("builder-w1", &cast.builder),
        ("client-b", &cast.client_b),
    ] {
        publish(client, subjects::CREDENTIAL_REFRESH, &pull.encode_to_vec()).await;
        assert_refused(&mesh, name, subjects::CREDENTIAL_REFRESH).await;
    }
    assert!(!was_refused_anything(&mesh, "credential"));
}

#[tokio::test]
async fn work_in_flight_is_read_only_by_its_role_and_worker() {
    let mut mesh = Mesh::start(secured_mesh()).await;
    let cast = cast(&mut mesh).await;

    // A client cannot listen to the work subjects (tokens travel there) nor to the stream.
    let _ = cast.client_a.subscribe("imagemesh.work.>").await;
    assert_refused(&mesh, "client-a", "imagemesh.work.>").await;
    publish(
        &cast.client_a,
        "$JS.API.CONSUMER.CREATE.IMAGEMESH_BUILD",
        b"{}",
    )
    .await;
    assert_refused(&mesh, "client-a", "$JS.API.CONSUMER.CREATE.IMAGEMESH_BUILD").await;

    // A builder cannot bind the mounters' consumer, nor another builder's.
    let mounters = "$JS.API.CONSUMER.MSG.NEXT.IMAGEMESH_MOUNT.mounter";
    publish(&cast.builder, mounters, b"{}").await;
    assert_refused(&mesh, "builder-w1", mounters).await;
    let create = "$JS.API.CONSUMER.CREATE.IMAGEMESH_BUILD.builder-w2.imagemesh.work.build.w2";
    publish(&cast.builder, create, b"{}").await;
    assert_refused(&mesh, "builder-w1", create).await;
    // ... while the worker itself may.
    let own = async_nats::jetstream::new(cast.other_builder.clone());
    let stream = own
        .get_stream(streams::BUILD)
        .await
        .expect("builder-w2 looks its stream up");
    stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("builder-w2".into()),
            filter_subject: "imagemesh.work.build.w2".into(),
            ..Default::default()
        })
        .await
        .expect("builder-w2 makes its own consumer");

    // No service may create or change a stream: one that could would capture other
    // identities' subjects (their inboxes, where tokens arrive).
    for (name, client) in [
        ("builder-w1", &cast.builder),
        ("scheduler-1", &cast.scheduler),
    ] {
        let update = format!("$JS.API.STREAM.UPDATE.{}", streams::BUILD);
        publish(client, &update, b"{}").await;
        assert_refused(&mesh, name, &update).await;
        let create = "$JS.API.STREAM.CREATE.CAPTURE";
        publish(client, create, b"{}").await;
        assert_refused(&mesh, name, create).await;
    }
}

#[tokio::test]
async fn nobody_reads_another_identitys_replies() {
    let mut mesh = Mesh::start(secured_mesh()).await;
    let cast = cast(&mut mesh).await;
    let scheduler_inbox = format!(
        "{}.>",
        imagemesh_runtime::nats::inbox_prefix(&key_of(&mesh, "scheduler-1"))
    );
    for (name, client) in [("client-a", &cast.client_a), ("mounter-m1", &cast.mounter)] {
        let _ = client.subscribe(scheduler_inbox.clone()).await;
        assert_refused(&mesh, name, &scheduler_inbox).await;
        let _ = client.subscribe("_INBOX.>").await;
        assert_refused(&mesh, name, "_INBOX.>").await;
    }
    // The scheduler's own inbox is its own: its replies arrive there.
    let inbox = cast.scheduler.new_inbox();
    assert!(inbox.starts_with(&scheduler_inbox[..scheduler_inbox.len() - 2]));
    let mut replies = cast.scheduler.subscribe(inbox.clone()).await.unwrap();
    assert_reaches(&cast.operator, &inbox, &mut replies).await;
}

#[tokio::test]
async fn only_status_publishers_publish_status_and_only_a_worker_advertises_itself() {
    let mut mesh = Mesh::start(secured_mesh()).await;
    let cast = cast(&mut mesh).await;

    // A client forges a status event: refused, and nothing is stored.
    let forged = format!("{}.a.victim", subjects::STATUS_PREFIX);
    publish(&cast.client_a, &forged, b"forged").await;
    assert_refused(&mesh, "client-a", &forged).await;
    assert!(
        mesh.events_raw(&forged).await.is_empty(),
        "a forged event was stored"
    );
    // The builder may report status.
    let js = async_nats::jetstream::new(cast.builder.clone());
    js.publish(forged.clone(), "from the builder".into())
        .await
        .unwrap()
        .await
        .expect("the builder reports status");
    assert_eq!(mesh.events_raw(&forged).await.len(), 1);

    // A builder writes its own advertisement, and no other key.
    let workers = async_nats::jetstream::new(cast.builder.clone())
        .get_key_value(imagemesh_runtime::placement::WORKERS_BUCKET)
        .await
        .unwrap();
    workers
        .put("build.w1", "me".into())
        .await
        .expect("builder-w1 advertises itself");
    for key in ["build.w2", "mount.w1"] {
        let subject = format!("$KV.{}.{key}", imagemesh_runtime::placement::WORKERS_BUCKET);
        publish(&cast.builder, &subject, b"impostor").await;
        assert_refused(&mesh, "builder-w1", &subject).await;
    }
    let operator_view = async_nats::jetstream::new(cast.operator.clone())
        .get_key_value(imagemesh_runtime::placement::WORKERS_BUCKET)
        .await
        .unwrap();
    assert!(operator_view.get("build.w2").await.unwrap().is_none());
}

/// Reading a request's last status event by subject (which the scheduler does before it
/// dispatches) is the schedulers' alone: it reads any tenant's events, so no worker and no
/// client may (a client follows its own tenant's events through its filtered consumer).
#[tokio::test]
async fn only_schedulers_read_status_events_by_subject() {
    let mut mesh = Mesh::start(secured_mesh()).await;
    let cast = cast(&mut mesh).await;
    let subject = format!("{}.b.secret-plans", subjects::STATUS_PREFIX);
    async_nats::jetstream::new(cast.operator.clone())
        .publish(subject.clone(), "tenant b's event".into())
        .await
        .unwrap()
        .await
        .unwrap();
    // A direct get of the last message on the subject, and the stream API's message get.
    let direct = format!("$JS.API.DIRECT.GET.{}.{subject}", streams::STATUS);
    let get = format!("$JS.API.STREAM.MSG.GET.{}", streams::STATUS);
    let last_by_subject = format!("{{\"last_by_subj\":\"{subject}\"}}");
    for (name, client) in [
        ("client-a", &cast.client_a),
        ("builder-w1", &cast.builder),
        ("mounter-m1", &cast.mounter),
        ("indexer-1", &cast.indexer),
    ] {
        publish(client, &direct, b"").await;
        assert_refused(&mesh, name, &direct).await;
        publish(client, &get, last_by_subject.as_bytes()).await;
        assert_refused(&mesh, name, &get).await;
    }
    // The scheduler has the direct get only.
    publish(&cast.scheduler, &get, last_by_subject.as_bytes()).await;
    assert_refused(&mesh, "scheduler-1", &get).await;
    let last = async_nats::jetstream::new(cast.scheduler.clone())
        .get_stream_no_info(streams::STATUS)
        .await
        .unwrap()
        .direct_get_last_for_subject(&subject)
        .await
        .expect("the scheduler reads the last event of a request");
    assert_eq!(last.payload.as_ref(), b"tenant b's event");
}

#[tokio::test]
async fn mounter_control_is_the_operators() {
    let mut mesh = Mesh::start(secured_mesh()).await;
    let cast = cast(&mut mesh).await;
    let unmount = format!("{}.unmount", subjects::mounter_control_prefix("m1"));
    for (name, client) in [
        ("client-a", &cast.client_a),
        ("scheduler-1", &cast.scheduler),
        ("builder-w1", &cast.builder),
        ("mounter-m1", &cast.mounter),
    ] {
        if name != "mounter-m1" {
            publish(client, &unmount, b"container-1").await;
            assert_refused(&mesh, name, &unmount).await;
        }
    }
    // Only mounter m1 listens on its control subjects; another mounter may not.
    let mut listening = cast.mounter.subscribe(unmount.clone()).await.unwrap();
    assert_reaches(&cast.operator, &unmount, &mut listening).await;
    let other = mesh
        .client_as(
            "mounter-m2",
            Role::Mounter {
                worker_id: "m2".into(),
            },
        )
        .await;
    let _ = other.subscribe(unmount.clone()).await;
    assert_refused(&mesh, "mounter-m2", &unmount).await;
}

#[tokio::test]
async fn a_tenant_reaches_only_its_own_subjects() {
    let mut mesh = Mesh::start(secured_mesh()).await;
    let cast = cast(&mut mesh).await;
    let b = &cast.client_b;
    // Submitting under another tenant.
    let foreign_intake = format!("{}.a.x", subjects::INTAKE_PREFIX);
    publish(b, &foreign_intake, b"").await;
    assert_refused(&mesh, "client-b", &foreign_intake).await;
    // Reading another tenant's build logs.
    let foreign_log = format!("{}.a.>", subjects::BUILD_LOG_PREFIX);
    let _ = b.subscribe(foreign_log.clone()).await;
    assert_refused(&mesh, "client-b", &foreign_log).await;
    // Following another tenant's status: the consumer's filter is in the subject.
    let foreign_watch = format!(
        "$JS.API.CONSUMER.CREATE.{}.w.{}.a.x",
        streams::STATUS,
        subjects::STATUS_PREFIX
    );
    publish(b, &foreign_watch, b"{}").await;
    assert_refused(&mesh, "client-b", &foreign_watch).await;
    // ... and an unfiltered consumer on the status stream.
    let unfiltered = format!("$JS.API.CONSUMER.CREATE.{}", streams::STATUS);
    publish(b, &unfiltered, b"{}").await;
    assert_refused(&mesh, "client-b", &unfiltered).await;
    // Uploading into another tenant's contexts, naming another tenant's image secrets.
    let foreign_context = format!("$O.{}.M.x", streams::contexts_bucket("a"));
    publish(b, &foreign_context, b"").await;
    assert_refused(&mesh, "client-b", &foreign_context).await;
    let foreign_secret = format!("$KV.{}.a.app", streams::IMAGE_SECRETS_BUCKET);
    publish(b, &foreign_secret, b"team-hub").await;
    assert_refused(&mesh, "client-b", &foreign_secret).await;

    // Tenant a does each of these under its own name.
    let a = &cast.client_a;
    let own_log = format!("{}.a.>", subjects::BUILD_LOG_PREFIX);
    let mut log = a.subscribe(own_log).await.unwrap();
    let line = format!("{}.a.r1", subjects::BUILD_LOG_PREFIX);
    assert_reaches(&cast.operator, &line, &mut log).await;
    let secrets = async_nats::jetstream::new(a.clone())
        .get_key_value(streams::IMAGE_SECRETS_BUCKET)
        .await
        .unwrap();
    secrets
        .put("a.app", "team-hub".into())
        .await
        .expect("tenant a names its own image's secret");
    assert!(!was_refused_anything(&mesh, "client-a"));
}

/// Without an identity nothing gets in: no anonymous connection, no plaintext, no unknown nkey.
#[tokio::test]
async fn only_known_identities_connect_and_only_over_tls() {
    let mesh = Mesh::start(MeshOptions {
        start: Vec::new(),
        ..Default::default()
    })
    .await;
    let bundle = mesh.bundle().expect("secured mesh");
    let attempt = |config: imagemesh_runtime::nats::NatsConfig| async move {
        imagemesh_runtime::nats::NatsConfig {
            connect_wait: Duration::from_millis(300),
            ..config
        }
        .connect("imagemesh-tests")
        .await
    };
    let url = mesh.nats.url();
    let tls = |nkey_file| imagemesh_runtime::nats::NatsConfig {
        url: url.clone(),
        nkey_file,
        tls_ca_file: Some(bundle.ca_file()),
        tls_required: true,
        ..Default::default()
    };
    // Anonymous, over TLS.
    assert!(
        attempt(tls(None)).await.is_err(),
        "an anonymous client got in"
    );
    // A key the server does not know.
    let stranger = tempfile::NamedTempFile::new().unwrap();
    let seed = nkeys::KeyPair::new_user().seed().unwrap();
    std::fs::write(stranger.path(), seed).unwrap();
    assert!(
        attempt(tls(Some(stranger.path().to_path_buf())))
            .await
            .is_err(),
        "an unknown nkey got in"
    );
    // A known identity without TLS.
    let plain = imagemesh_runtime::nats::NatsConfig {
        url: url.clone(),
        nkey_file: Some(bundle.seed_file("client-default")),
        ..Default::default()
    };
    assert!(attempt(plain).await.is_err(), "a plaintext client got in");
    // The identity over TLS does.
    attempt(tls(Some(bundle.seed_file("client-default"))))
        .await
        .expect("client-default connects over TLS");
}

/// With mutual TLS the server also wants the identity's certificate from the bundle's CA.
#[tokio::test]
async fn mutual_tls_requires_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let spec = imagemesh_access::BundleSpec {
        mutual_tls: true,
        ..Default::default()
    };
    let bundle = imagemesh_access::Bundle::generate(dir.path(), spec).unwrap();
    let nats = imagemesh_testkit::NatsServer::start_configured(|store| {
        bundle.server_config("127.0.0.1:4222", store).unwrap()
    });
    let config = |with_certificate: bool| {
        let (cert, key) = bundle.client_cert("client-default").unwrap();
        imagemesh_runtime::nats::NatsConfig {
            url: nats.url(),
            nkey_file: Some(bundle.seed_file("client-default")),
            tls_ca_file: Some(bundle.ca_file()),
            tls_required: true,
            tls_cert_file: with_certificate.then_some(cert),
            tls_key_file: with_certificate.then_some(key),
            connect_wait: Duration::from_millis(300),
            ..Default::default()
        }
    };
    assert!(
        config(false).connect("imagemesh-tests").await.is_err(),
        "a client without a certificate got in"
    );
    config(true)
        .connect("imagemesh-tests")
        .await
        .expect("the identity with its certificate connects");
}

/// Ending a poison message (`imagemesh_runtime::poison`) is the schedulers': hearing that a
/// consumer gave up on a message, reading a work message by its sequence, deleting it. Not the
/// workers' (a builder reading by sequence would read the requests placed on other builders),
/// not a client's.
#[tokio::test]
async fn only_schedulers_end_poison_messages() {
    let mut mesh = Mesh::start(secured_mesh()).await;
    let cast = cast(&mut mesh).await;
    let js = async_nats::jetstream::new(cast.operator.clone());
    let sequence = js
        .publish(subjects::BUILD, "work".into())
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence;
    let by_sequence = format!("{{\"seq\":{sequence}}}");
    let advisory = imagemesh_runtime::poison::advisory_subject(streams::BUILD, "builder");
    let get = format!("$JS.API.STREAM.MSG.GET.{}", streams::BUILD);
    let delete = format!("$JS.API.STREAM.MSG.DELETE.{}", streams::BUILD);
    for (name, client) in [
        ("builder-w1", &cast.builder),
        ("mounter-m1", &cast.mounter),
        ("indexer-1", &cast.indexer),
        ("client-a", &cast.client_a),
    ] {
        let _ = client.subscribe(advisory.clone()).await;
        assert_refused(&mesh, name, &advisory).await;
        for api in [&get, &delete] {
            publish(client, api, by_sequence.as_bytes()).await;
            assert_refused(&mesh, name, api).await;
        }
    }
    // Not even from the queue a worker consumes, and the scheduler only from the work streams.
    let index_delete = format!("$JS.API.STREAM.MSG.DELETE.{}", streams::INDEX);
    publish(&cast.indexer, &index_delete, b"{\"seq\":1}").await;
    assert_refused(&mesh, "indexer-1", &index_delete).await;
    let status_delete = format!("$JS.API.STREAM.MSG.DELETE.{}", streams::STATUS);
    publish(&cast.scheduler, &status_delete, b"{\"seq\":1}").await;
    assert_refused(&mesh, "scheduler-1", &status_delete).await;
    let stream = js.get_stream_no_info(streams::BUILD).await.unwrap();
    stream
        .get_raw_message(sequence)
        .await
        .expect("the message is still there");

    // The scheduler hears the advisory, reads the message and deletes it.
    let mut heard = cast.scheduler.subscribe(advisory.clone()).await.unwrap();
    assert_reaches(&cast.operator, &advisory, &mut heard).await;
    let scheduler = async_nats::jetstream::new(cast.scheduler.clone())
        .get_stream_no_info(streams::BUILD)
        .await
        .unwrap();
    let message = scheduler
        .get_raw_message(sequence)
        .await
        .expect("the scheduler reads it by sequence");
    assert_eq!(message.payload.as_ref(), b"work");
    assert!(
        scheduler
            .delete_message(sequence)
            .await
            .expect("the scheduler deletes it")
    );
    assert!(stream.get_raw_message(sequence).await.is_err());
}
