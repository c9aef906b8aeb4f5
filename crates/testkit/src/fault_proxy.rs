//! A TCP proxy in front of a real server (a registry) that injects faults on command: HTTP 503
//! answers, connections closed without an answer, answers that never come; and passes everything through again
//! when told to recover. Changing the fault also breaks the connections open at that moment, so
//! pooled keep-alive connections see it too.
//!
//! It can also stand for a slower link ([`FaultProxy::start_limited`]): what the upstream sends
//! is paced to a bandwidth shared by every connection, and counted.
//!
//! Plain threads, no runtime: it serves whatever runtime (or none) a test uses.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the proxy does with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Pass through to the upstream.
    None,
    /// Answer every request with `503 Service Unavailable`.
    ServerError,
    /// Close the connection without answering.
    Close,
    /// Read the request and never answer.
    Stall,
}

impl Fault {
    fn code(self) -> usize {
        match self {
            Fault::None => 0,
            Fault::ServerError => 1,
            Fault::Close => 2,
            Fault::Stall => 3,
        }
    }

    fn from_code(code: usize) -> Self {
        match code {
            1 => Fault::ServerError,
            2 => Fault::Close,
            3 => Fault::Stall,
            _ => Fault::None,
        }
    }
}

struct State {
    upstream: String,
    fault: AtomicUsize,
    /// Bumped on every change: open connections from before close.
    generation: AtomicU64,
    connections: AtomicUsize,
    stopped: AtomicBool,
    /// Bytes per second from the upstream to clients, all connections together; none: as fast
    /// as loopback goes.
    rate: Option<u64>,
    /// When the link is free again (the pacing of [`State::rate`]).
    link_free_at: Mutex<Instant>,
    /// Bytes sent from the upstream to clients.
    downstream: AtomicU64,
}

impl State {
    /// Waits until `bytes` more fit through the link.
    fn pace(&self, bytes: usize) {
        self.downstream.fetch_add(bytes as u64, Ordering::Relaxed);
        let Some(rate) = self.rate else { return };
        let wait = {
            let mut free_at = self.link_free_at.lock().unwrap();
            let now = Instant::now();
            let start = (*free_at).max(now);
            *free_at = start + Duration::from_secs_f64(bytes as f64 / rate as f64);
            start - now
        };
        std::thread::sleep(wait);
    }
}

/// A running proxy on 127.0.0.1.
pub struct FaultProxy {
    addr: String,
    state: Arc<State>,
}

impl FaultProxy {
    /// Proxies to `upstream` (`host:port`), passing everything through until told otherwise.
    pub fn start(upstream: &str) -> Self {
        Self::start_limited(upstream, None)
    }

    /// Like [`FaultProxy::start`], sending what the upstream answers at no more than
    /// `bits_per_second` over all connections together.
    pub fn start_limited(upstream: &str, bits_per_second: Option<u64>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fault proxy");
        let addr = listener.local_addr().expect("proxy address").to_string();
        let state = Arc::new(State {
            upstream: upstream.to_string(),
            fault: AtomicUsize::new(0),
            generation: AtomicU64::new(0),
            connections: AtomicUsize::new(0),
            stopped: AtomicBool::new(false),
            rate: bits_per_second.map(|bits| (bits / 8).max(1)),
            link_free_at: Mutex::new(Instant::now()),
            downstream: AtomicU64::new(0),
        });
        let serving = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if serving.stopped.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                serving.connections.fetch_add(1, Ordering::SeqCst);
                let state = serving.clone();
                std::thread::spawn(move || handle(stream, &state));
            }
        });
        Self { addr, state }
    }

    /// A "registry" that accepts connections, reads what is sent and never answers: a client
    /// without a read deadline hangs there until its process dies.
    pub fn black_hole() -> Self {
        // Port 9 (discard) on loopback: nothing is ever forwarded while the fault holds.
        let proxy = Self::start("127.0.0.1:9");
        proxy.set(Fault::Stall);
        proxy
    }

    /// `127.0.0.1:<port>`: use it where the upstream's address would go.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Injects `fault` from now on (and closes the connections open now).
    pub fn set(&self, fault: Fault) {
        self.state.fault.store(fault.code(), Ordering::SeqCst);
        self.state.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Bytes the upstream sent to clients through the proxy so far.
    pub fn bytes_downstream(&self) -> u64 {
        self.state.downstream.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.state.stopped.store(true, Ordering::SeqCst);
        self.state.generation.fetch_add(1, Ordering::SeqCst);
        // Wakes the accept loop so it sees `stopped`.
        let _ = TcpStream::connect(&self.addr);
    }
}

fn handle(mut client: TcpStream, state: &State) {
    let generation = state.generation.load(Ordering::SeqCst);
    match Fault::from_code(state.fault.load(Ordering::SeqCst)) {
        Fault::None => pass_through(client, state, generation),
        Fault::ServerError => {
            let mut request = [0u8; 8192];
            let _ = client.read(&mut request);
            let _ = client.write_all(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
        Fault::Close => {
            // Read the request, then close without a word: the client's connection ends before
            // any answer.
            let mut request = [0u8; 8192];
            let _ = client.read(&mut request);
            let _ = client.shutdown(Shutdown::Both);
        }
        Fault::Stall => {
            let mut request = [0u8; 8192];
            let _ = client.read(&mut request);
            while state.generation.load(Ordering::SeqCst) == generation {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Copies both ways until either side closes or the fault changes.
fn pass_through(client: TcpStream, state: &State, generation: u64) {
    let Ok(upstream) = TcpStream::connect(&state.upstream) else {
        return;
    };
    std::thread::scope(|scope| {
        for (from, to, paced) in [(&client, &upstream, false), (&upstream, &client, true)] {
            scope.spawn(move || copy_until_changed(from, to, state, generation, paced));
        }
    });
}

fn copy_until_changed(
    mut from: &TcpStream,
    mut to: &TcpStream,
    state: &State,
    generation: u64,
    paced: bool,
) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buffer = [0u8; 64 << 10];
    while state.generation.load(Ordering::SeqCst) == generation {
        match from.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => {
                if paced {
                    state.pace(n);
                }
                if to.write_all(&buffer[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}
