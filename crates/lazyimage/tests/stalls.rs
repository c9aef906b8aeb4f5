//! Deadlines on registry calls: a registry that accepts connections and never answers, or that
//! stops in the middle of a body, fails the call as unavailable (retryable) instead of hanging
//! it, and the reader that waited gets an error it can report.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use imagemesh_lazyimage::RegistryBlobSource;
use imagemesh_registry::{RegistryClient, RegistrySettings};

/// A registry impostor on loopback: each connection is read from, then answered with the start
/// of `reply` and held open until the test ends.
fn stalling_server(reply: &'static [u8]) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
            let _ = stream.write_all(reply);
            held.push(stream);
        }
    });
    addr
}

fn settings() -> RegistrySettings {
    RegistrySettings {
        connect_timeout: Duration::from_secs(2),
        read_timeout: Duration::from_millis(500),
        ..Default::default()
    }
}

/// Runs `call` with a guard far beyond the deadline: a hang fails the test instead of
/// blocking it.
async fn guarded<T>(call: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), call)
        .await
        .expect("the registry call never returned: no deadline")
}

async fn source(addr: &str) -> RegistryBlobSource {
    let client = Arc::new(RegistryClient::new(addr, None, &settings()));
    let image = format!("{addr}/team/app:1").parse().unwrap();
    RegistryBlobSource::new(client, &image).await
}

const DIGEST: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

#[tokio::test]
async fn a_registry_that_never_answers_fails_the_read_as_unavailable() {
    let silent = imagemesh_testkit::fault_proxy::FaultProxy::black_hole();
    let addr = silent.addr().to_string();
    let source = source(&addr).await;
    let err = guarded(source.fetch(DIGEST, 0..100))
        .await
        .expect_err("a read from a silent registry succeeded");
    assert!(err.is_retryable(), "{err}");
    assert!(err.to_string().contains(&addr), "{err}");
}

#[tokio::test]
async fn a_registry_that_stops_mid_body_fails_the_read_as_unavailable() {
    let addr = stalling_server(
        b"HTTP/1.1 206 Partial Content\r\nContent-Length: 100\r\nContent-Range: bytes 0-99/1000\r\n\r\n0123456789",
    );
    let source = source(&addr).await;
    let err = guarded(source.fetch(DIGEST, 0..100))
        .await
        .expect_err("a read from a registry that stopped mid-body succeeded");
    assert!(err.is_retryable(), "{err}");
}
