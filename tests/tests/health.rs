//! Every service serves `/livez` and `/readyz` when asked (`--health-listen`), for Kubernetes
//! probes: ready while connected to NATS and serving, not ready (but alive) while NATS is away,
//! ready again once it is back.

use std::time::Duration;

use imagemesh_testkit::{eventually, free_port};
use imagemesh_tests::{Mesh, MeshOptions, SERVICES};

const WAIT: Duration = Duration::from_secs(60);

/// Status and body of `GET http://addr/path`.
async fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let response = reqwest::Client::new()
        .get(format!("http://{addr}{path}"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.unwrap_or_default()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_is_alive_and_ready_and_not_ready_while_nats_is_away() {
    let mut mesh = Mesh::start(MeshOptions {
        start: Vec::new(),
        ..Default::default()
    })
    .await;
    let mut health = Vec::new();
    for service in SERVICES {
        let addr = format!("127.0.0.1:{}", free_port());
        mesh.start_instance(service, service, &[("IMAGEMESH_HEALTH_LISTEN", &addr)])
            .await;
        health.push((service, addr));
    }
    for (service, addr) in &health {
        assert_eq!(
            get(addr, "/livez").await,
            Some((200, "ok\n".into())),
            "{service}"
        );
        assert_eq!(
            get(addr, "/readyz").await,
            Some((200, "ready\n".into())),
            "{service}"
        );
        assert_eq!(
            get(addr, "/other").await.map(|(s, _)| s),
            Some(404),
            "{service}"
        );
    }

    mesh.nats.kill();
    for (service, addr) in &health {
        let what = format!("{service} to be not ready without NATS");
        let body = eventually(WAIT, &what, || async {
            match get(addr, "/readyz").await {
                Some((503, body)) => Some(body),
                _ => None,
            }
        })
        .await;
        assert_eq!(body, "not connected to NATS\n", "{service}");
        assert_eq!(
            get(addr, "/livez").await.map(|(s, _)| s),
            Some(200),
            "{service}"
        );
    }

    mesh.nats.restart();
    for (service, addr) in &health {
        let what = format!("{service} to be ready again");
        eventually(WAIT, &what, || async {
            (get(addr, "/readyz").await.map(|(s, _)| s) == Some(200)).then_some(())
        })
        .await;
    }
}
