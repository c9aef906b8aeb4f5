//! Long-term credentials are read at startup from the environment or a file; a missing one stops
//! the service with an error naming where it was looked for.

use std::time::Duration;

use imagemesh_testkit::{NatsServer, ServiceProcess, eventually};

async fn exits_with(config_body: &str, env: &[(&str, &str)]) -> String {
    let nats = NatsServer::start();
    let config = format!("[nats]\nurl = \"{}\"\n{config_body}", nats.url());
    let mut process = ServiceProcess::spawn("imagemesh-credential", &config, env);
    eventually(Duration::from_secs(20), "the service to exit", || {
        let running = process.is_running();
        async move { (!running).then_some(()) }
    })
    .await;
    process.logs()
}

#[tokio::test]
async fn a_missing_secret_stops_the_service_naming_the_variable() {
    let logs = exits_with(
        "[[credential.registries]]\nprovider = \"basic\"\nhost = \"r.example\"\nusername = \"u\"\npassword = { env = \"IMAGEMESH_TEST_UNSET_PASSWORD\" }\n",
        &[],
    )
    .await;
    assert!(
        logs.contains("IMAGEMESH_TEST_UNSET_PASSWORD is not set"),
        "{logs}"
    );
    assert!(logs.contains("registry r.example"), "{logs}");
}

#[tokio::test]
async fn a_margin_that_would_loop_is_refused_at_startup() {
    let logs = exits_with(
        "[credential]\nmin_lifetime = \"5s\"\n[credential.cache]\nmargin = \"10s\"\n",
        &[],
    )
    .await;
    assert!(logs.contains("min_lifetime"), "{logs}");
}

#[tokio::test]
async fn an_unreadable_secret_file_names_the_file_not_a_value() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ecr-secret");
    let logs = exits_with(
        &format!(
            "[[credential.registries]]\nprovider = \"ecr\"\nhost = \"123456789012.dkr.ecr.us-east-1.amazonaws.com\"\naccess_key_id = {{ value = \"AKIAINLINE000000\" }}\nsecret_access_key = {{ file = \"{}\" }}\n",
            file.display()
        ),
        &[],
    )
    .await;
    assert!(logs.contains(&file.display().to_string()), "{logs}");
    assert!(!logs.contains("AKIAINLINE000000"), "{logs}");
}

#[tokio::test]
async fn sigterm_ends_the_service_while_nats_is_unreachable() {
    let mut nats = NatsServer::start();
    let config = format!("[nats]\nurl = \"{}\"\n", nats.url());
    let mut process = ServiceProcess::spawn("imagemesh-credential", &config, &[]);
    let client = nats.client().await;
    imagemesh_testkit::wait_for_service(&client, "credential", Duration::from_secs(20)).await;
    nats.kill();
    // terminate() waits for the exit; a service stuck waiting for NATS would never give it.
    let exited = tokio::task::spawn_blocking(move || {
        let clean = process.terminate();
        (clean, process.logs())
    });
    let (clean, logs) = tokio::time::timeout(Duration::from_secs(30), exited)
        .await
        .expect("the service exits within 30 s of SIGTERM")
        .unwrap();
    assert!(clean, "{logs}");
    assert!(logs.contains("credential stopped"), "{logs}");
}
