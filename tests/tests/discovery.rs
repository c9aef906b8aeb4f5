//! Every service registers with the NATS micro Services API, so standard tooling finds it.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use futures::StreamExt;
use imagemesh_tests::{Mesh, MeshOptions, SERVICES};

/// Sends `subject` and gathers every reply that arrives within `wait`.
async fn gather(
    client: &async_nats::Client,
    subject: &str,
    wait: Duration,
) -> Vec<serde_json::Value> {
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.unwrap();
    client
        .publish_with_reply(subject.to_string(), inbox, "".into())
        .await
        .unwrap();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline, replies.next()).await {
        out.push(serde_json::from_slice(&message.payload).unwrap());
    }
    out
}

fn names(replies: &[serde_json::Value]) -> BTreeSet<String> {
    replies
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn srv_info_lists_all_five_services() {
    let mesh = Mesh::start(MeshOptions::default()).await;
    let expected: BTreeSet<String> = SERVICES.iter().map(|s| s.to_string()).collect();

    let info = gather(&mesh.client, "$SRV.INFO", Duration::from_secs(1)).await;
    assert_eq!(names(&info), expected);
    let credential = info.iter().find(|i| i["name"] == "credential").unwrap();
    let subjects: BTreeSet<&str> = credential["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["subject"].as_str().unwrap())
        .collect();
    assert_eq!(
        subjects,
        BTreeSet::from(["imagemesh.credential.mint", "imagemesh.credential.refresh"])
    );

    let pings = gather(
        &mesh.client,
        "$SRV.PING.scheduler",
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(pings.len(), 1);
    let stats = gather(&mesh.client, "$SRV.STATS", Duration::from_secs(1)).await;
    assert_eq!(names(&stats), expected);
}

#[tokio::test]
async fn nats_py_discovers_all_five_services() {
    let mesh = Mesh::start(MeshOptions::default()).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/srv_info.py");
    let url = mesh.nats.url();
    // Discovery is the operator's: no other role may ask every service for its stats.
    let env = mesh.cli_env_as("operator");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .arg(url)
            .envs(env)
            .output()
    })
    .await
    .unwrap()
    .expect("python3 runs (make deps installs nats-py)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let expected: BTreeSet<String> = SERVICES.iter().map(|s| s.to_string()).collect();
    assert_eq!(names(report["info"].as_array().unwrap()), expected);
    assert_eq!(names(report["stats"].as_array().unwrap()), expected);
}
