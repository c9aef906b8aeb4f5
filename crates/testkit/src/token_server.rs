//! A distribution token server for registries configured with `auth.token`.
//!
//! It authenticates clients with HTTP Basic against its users, and answers
//! `GET /token?service=..&scope=repository:<name>:<actions>` with an ES256 JWT that
//! docker-registry 2.8 verifies: `iss` = its issuer, `aud` = the service (a string: 2.8 does not
//! read a list), `exp`/`nbf`/`iat`, `access` = the requested scopes, and an `x5c` header holding
//! its self-signed certificate, which is the registry's `rootcertbundle`. It counts the requests
//! it serves, and can be told to fail or to change the lifetimes it hands out.
//!
//! It runs on its own thread and runtime, so it serves whatever runtime (or none) a test uses.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tempfile::TempDir;

use crate::RegistryAuth;

/// The `expires_in` a token server answers with when not told otherwise.
pub const DEFAULT_EXPIRES_IN: u64 = 300;

/// A running token server.
pub struct TokenServer {
    addr: std::net::SocketAddr,
    state: Arc<State>,
    dir: TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct State {
    service: String,
    issuer: String,
    users: HashMap<String, String>,
    cert_der: Vec<u8>,
    key: EcdsaKeyPair,
    rng: SystemRandom,
    requests: AtomicUsize,
    issued: AtomicUsize,
    failing: AtomicBool,
    /// `None` = answer without `expires_in` (the JWT then lives 60 s, the spec's default).
    expires_in: Mutex<Option<u64>>,
    scopes: Mutex<Vec<String>>,
}

impl TokenServer {
    /// Starts a token server for `service` that accepts these (user, password) pairs.
    pub fn start(service: &str, users: &[(&str, &str)]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("imagemesh-token-server-")
            .tempdir()
            .expect("temp dir");
        let key = rcgen::KeyPair::generate().expect("generate P-256 key");
        let params = rcgen::CertificateParams::new(vec!["imagemesh-token-server".to_string()])
            .expect("certificate params");
        let cert = params.self_signed(&key).expect("self-signed certificate");
        std::fs::write(dir.path().join("root.pem"), cert.pem()).expect("write root cert");
        let state = Arc::new(State {
            service: service.to_string(),
            issuer: "imagemesh-test-issuer".to_string(),
            users: users
                .iter()
                .map(|(u, p)| (u.to_string(), p.to_string()))
                .collect(),
            cert_der: cert.der().to_vec(),
            key: EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &key.serialize_der())
                .expect("signing key"),
            rng: SystemRandom::new(),
            requests: AtomicUsize::new(0),
            issued: AtomicUsize::new(0),
            failing: AtomicBool::new(false),
            expires_in: Mutex::new(Some(DEFAULT_EXPIRES_IN)),
            scopes: Mutex::new(Vec::new()),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind token server");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("token server address");
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let serving = state.clone();
        let thread = std::thread::spawn(move || serve(listener, serving, stopped));
        Self {
            addr,
            state,
            dir,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The token endpoint URL (the registry's `auth.token.realm`).
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    pub fn service(&self) -> &str {
        &self.state.service
    }

    pub fn issuer(&self) -> &str {
        &self.state.issuer
    }

    /// The PEM certificate the registry must trust.
    pub fn root_cert_bundle(&self) -> PathBuf {
        self.dir.path().join("root.pem")
    }

    /// How to start a [`crate::Registry`] that trusts this server.
    pub fn registry_auth(&self) -> RegistryAuth {
        RegistryAuth::Token {
            realm: self.realm(),
            service: self.service().to_string(),
            issuer: self.issuer().to_string(),
            root_cert_bundle: self.root_cert_bundle(),
        }
    }

    /// Requests received on `/token`, whatever their outcome.
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Tokens issued.
    pub fn issued(&self) -> usize {
        self.state.issued.load(Ordering::SeqCst)
    }

    /// The scopes asked for, in order (one entry per `scope` parameter).
    pub fn scopes(&self) -> Vec<String> {
        self.state.scopes.lock().unwrap().clone()
    }

    /// While set, `/token` answers 503.
    pub fn set_failing(&self, failing: bool) {
        self.state.failing.store(failing, Ordering::SeqCst);
    }

    /// The `expires_in` of the next answers (`None`: leave it out).
    pub fn set_expires_in(&self, seconds: Option<u64>) {
        *self.state.expires_in.lock().unwrap() = seconds;
    }

    /// The directory holding the certificate (for configs that name files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(
    listener: std::net::TcpListener,
    state: Arc<State>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("token server runtime");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        loop {
            let stream = tokio::select! {
                _ = &mut stopped => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => continue,
                },
            };
            let state = state.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(handle(&state, &req)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

fn handle(state: &State, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() != "/token" {
        return reply(StatusCode::NOT_FOUND, json!({"error": "not found"}));
    }
    state.requests.fetch_add(1, Ordering::SeqCst);
    if state.failing.load(Ordering::SeqCst) {
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "failing on purpose"}),
        );
    }
    let Some(user) = authenticated_user(state, req) else {
        return reply(
            StatusCode::UNAUTHORIZED,
            json!({"error": "authentication required"}),
        );
    };
    let query = query_params(req.uri().query().unwrap_or(""));
    if query
        .iter()
        .any(|(k, v)| k == "service" && v != &state.service)
    {
        return reply(StatusCode::BAD_REQUEST, json!({"error": "unknown service"}));
    }
    let scopes: Vec<String> = query
        .iter()
        .filter(|(k, _)| k == "scope")
        .map(|(_, v)| v.clone())
        .collect();
    state.scopes.lock().unwrap().extend(scopes.iter().cloned());
    let expires_in = *state.expires_in.lock().unwrap();
    let token = sign(state, &user, &scopes, expires_in.unwrap_or(60));
    state.issued.fetch_add(1, Ordering::SeqCst);
    let mut body = json!({"token": token, "access_token": token});
    if let Some(seconds) = expires_in {
        body["expires_in"] = json!(seconds);
    }
    reply(StatusCode::OK, body)
}

fn authenticated_user(state: &State, req: &Request<Incoming>) -> Option<String> {
    let header = req
        .headers()
        .get(hyper::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let encoded = header.strip_prefix("Basic ")?;
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (user, password) = decoded.split_once(':')?;
    (state.users.get(user)? == password).then(|| user.to_string())
}

/// `repository:team/app:pull,push` -> access claim entries.
fn access(scopes: &[String]) -> Vec<serde_json::Value> {
    scopes
        .iter()
        .filter_map(|scope| {
            let (resource, actions) = scope.rsplit_once(':')?;
            let (kind, name) = resource.split_once(':')?;
            let actions: Vec<&str> = actions.split(',').filter(|a| !a.is_empty()).collect();
            Some(json!({"type": kind, "name": name, "actions": actions}))
        })
        .collect()
}

fn sign(state: &State, user: &str, scopes: &[String], lifetime: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let header = json!({"typ": "JWT", "alg": "ES256", "x5c": [STANDARD.encode(&state.cert_der)]});
    let claims = json!({
        "iss": state.issuer,
        "sub": user,
        "aud": state.service,
        "exp": now + lifetime,
        "nbf": now.saturating_sub(1),
        "iat": now,
        "jti": format!("{}-{}", now, state.issued.load(Ordering::SeqCst)),
        "access": access(scopes),
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = state
        .key
        .sign(&state.rng, signing_input.as_bytes())
        .expect("sign token");
    format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature.as_ref())
    )
}

fn query_params(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(input: &str) -> String {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| std::str::from_utf8(&bytes[i + 1..i + 3]).ok())
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (escaped, bytes[i]) {
            (Some(byte), _) => {
                out.push(byte);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, byte) => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("Content-Type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static response")
}
