//! Waiting without sleeping blindly.

use std::future::Future;
use std::net::TcpListener;
use std::time::Duration;

use async_nats::Client;

/// Polls `check` every 20 ms until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (for servers that cannot report the
/// port they bound themselves).
///
/// Picked at random below Linux's ephemeral range (32768 and up), not with `bind(:0)`: every
/// server that binds port 0 and every outgoing connection takes its port from that range, so
/// a port picked from it could be taken by another test's server between this check and the
/// child binding it (seen: a credential instance's token endpoint refused with "Address
/// already in use"). Below the range only other picks compete, and rarely.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, RandomState};
    const LOW: u64 = 20_000;
    const HIGH: u64 = 32_768;
    let seed = RandomState::new().hash_one(std::process::id());
    for attempt in 0..64u64 {
        let port = (LOW + seed.wrapping_add(attempt.wrapping_mul(7_919)) % (HIGH - LOW)) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// Waits until the micro service `name` answers `$SRV.PING.<name>`.
pub async fn wait_for_service(client: &Client, name: &str, timeout: Duration) {
    let subject = format!("$SRV.PING.{name}");
    eventually(timeout, &format!("service {name} to answer PING"), || {
        ask(client, subject.clone())
    })
    .await;
}

/// The answer to one request on `subject`, if one comes within half a second.
async fn ask(client: &Client, subject: String) -> Option<async_nats::Message> {
    tokio::time::timeout(
        Duration::from_millis(500),
        client.request(subject, "".into()),
    )
    .await
    .ok()?
    .ok()
}

/// Waits until the micro service `name` lists every endpoint of `endpoints` in
/// `$SRV.INFO.<name>`. PING is answered as soon as a service exists, a moment before its
/// endpoints are added: a request sent in that moment finds no responder.
pub async fn wait_for_endpoints(
    client: &Client,
    name: &str,
    endpoints: &[&str],
    timeout: Duration,
) {
    let subject = format!("$SRV.INFO.{name}");
    let what = format!("service {name} to serve {endpoints:?}");
    eventually(timeout, &what, || async {
        let reply = ask(client, subject.clone()).await?;
        let info: serde_json::Value = serde_json::from_slice(&reply.payload).ok()?;
        let served: Vec<&str> = info["endpoints"]
            .as_array()?
            .iter()
            .filter_map(|e| e["name"].as_str())
            .collect();
        endpoints.iter().all(|e| served.contains(e)).then_some(())
    })
    .await
}

#[cfg(test)]
mod tests {
    #[test]
    fn free_ports_are_bindable_and_below_the_ephemeral_range() {
        let ports: Vec<u16> = (0..32).map(|_| super::free_port()).collect();
        for port in &ports {
            assert!((20_000..32_768).contains(port), "{port}");
            std::net::TcpListener::bind(("127.0.0.1", *port)).unwrap();
        }
        // Picked at random, not one port over and over.
        let distinct: std::collections::HashSet<_> = ports.iter().collect();
        assert!(distinct.len() > 16, "{ports:?}");
    }
}
