//! A small HTTP health endpoint every service can serve (`--health-listen ADDR`, or
//! `IMAGEMESH_HEALTH_LISTEN`), for orchestrators' probes:
//!
//! - `GET /livez`: 200 while the process's runtime answers at all. A NATS outage does not make a
//!   service dead: restarting it would not bring NATS back, and a restarted mounter would drop
//!   every container's root filesystem.
//! - `GET /readyz`: 200 while the service is connected to NATS and serving, 503 with the reason
//!   otherwise (not yet started, reconnecting, shutting down), so traffic and rollouts wait.
//!
//! Plain HTTP on the address given (a pod-local port); it tells nothing but up or down.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use crate::Shutdown;

/// What readiness is made of. Served from before the NATS connection exists, so a probe
/// during a slow first connect sees "starting" rather than a refused connection.
#[derive(Clone)]
pub struct Health {
    /// Set once the service is connected and about to serve.
    client: Arc<OnceLock<async_nats::Client>>,
    shutdown: Shutdown,
}

impl Health {
    pub fn new(shutdown: Shutdown) -> Self {
        Self {
            client: Arc::new(OnceLock::new()),
            shutdown,
        }
    }

    /// The service is connected and about to serve with `client`.
    pub fn serving(&self, client: async_nats::Client) {
        let _ = self.client.set(client);
    }

    /// `Ok` when ready, else why not.
    pub fn ready(&self) -> Result<(), &'static str> {
        if self.shutdown.is_triggered() {
            return Err("shutting down");
        }
        let client = self.client.get().ok_or("starting")?;
        match client.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            _ => Err("not connected to NATS"),
        }
    }

    /// Binds `addr` now (so a taken port fails the start) and serves until shutdown.
    pub async fn serve(self, addr: SocketAddr) -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("health endpoint: cannot listen on {addr}: {e}"))?;
        tracing::info!(listen = %listener.local_addr()?, "health endpoint serving /livez and /readyz");
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                };
                let health = self.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let health = health.clone();
                        async move { Ok::<_, Infallible>(health.answer(&request)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(())
    }

    fn answer<B>(&self, request: &Request<B>) -> Response<Full<Bytes>> {
        let (status, body) = match request.uri().path() {
            "/livez" => (StatusCode::OK, "ok"),
            "/readyz" => match self.ready() {
                Ok(()) => (StatusCode::OK, "ready"),
                Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, reason),
            },
            _ => (StatusCode::NOT_FOUND, "not found: /livez or /readyz"),
        };
        let mut response = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
        *response.status_mut() = status;
        response
    }
}
