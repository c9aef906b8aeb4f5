//! The mount keeper: what lets a mount outlive the mounter process serving it.
//!
//! A FUSE mount lives as long as some process holds its `/dev/fuse` descriptor; the kernel
//! queues requests while nobody reads them. The keeper (`imagemesh-mount-keeper`, a small
//! process of its own that neither reads nor writes FUSE requests) holds a duplicate of every
//! live mount's descriptor, with the facts needed to serve that mount again ([`KeptMount`]).
//! When the mounter stops (SIGTERM for an upgrade), crashes or is OOM-killed, the mounts stay
//! mounted and reads block; the next mounter asks the keeper for the descriptors
//! (`SCM_RIGHTS`), rebuilds each file system from its index and resumes serving, then has the
//! kernel resend the requests the dead process had taken but not answered (`handover.rs`).
//!
//! The protocol is JSON over a `SOCK_SEQPACKET` unix socket, one packet per message, every
//! connection a short exchange: `keep` (with the descriptor) and `drop` answer `ok`; `list`
//! answers one `kept` packet per mount, each with a duplicate of its descriptor, then `end`.
//! The keeper holds short-lived pull credentials in memory only; its socket is 0600 in a 0700
//! directory, so only the mounter's user can talk to it.

use std::collections::BTreeMap;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use imagemesh_proto::v1::RegistryCredential;
use imagemesh_registry::Reference;
use prost::Message as _;

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketType,
};
use serde::{Deserialize, Serialize};

use crate::mounts::MountInfo;

/// Largest packet either side sends (a mount's facts are well under 8 KiB).
const MAX_PACKET: usize = 64 << 10;
/// How long the mounter waits for the keeper before going on without it.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// What a new mounter needs to serve a mount again. The credential is the one the mount reads
/// with (prost-encoded, base64): it lets the next process read at once, and its refresh task
/// renews it as before.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct KeptMount {
    pub id: String,
    pub tenant: String,
    pub request_id: String,
    /// The reference the request named (shown on the mounts endpoint).
    pub image_ref: String,
    /// `registry/repository@digest` of the image manifest the mount serves: resolved again
    /// by digest, so the next process serves exactly the same image.
    pub pinned_ref: String,
    pub image_digest: String,
    pub index_digest: String,
    pub mountpoint: PathBuf,
    /// The runtime bundle over the mount (its overlay outlives the process on its own).
    #[serde(default)]
    pub bundle: Option<PathBuf>,
    pub mounted_at_unix_ms: u64,
    pub credential: Option<String>,
}

impl KeptMount {
    /// The facts of a mount just made from `pinned` (the image manifest's reference by digest).
    pub fn of(
        info: &MountInfo,
        pinned: &Reference,
        credential: Option<&RegistryCredential>,
    ) -> Self {
        let mounted_at = info
            .mounted_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            id: info.id.clone(),
            tenant: info.tenant.clone(),
            request_id: info.request_id.clone(),
            image_ref: info.image_ref.clone(),
            pinned_ref: pinned.to_string(),
            image_digest: info.image_digest.clone(),
            index_digest: info.index_digest.clone(),
            mountpoint: info.mountpoint.clone(),
            bundle: info.bundle.clone(),
            mounted_at_unix_ms: u64::try_from(mounted_at.as_millis()).unwrap_or(u64::MAX),
            credential: credential.map(|c| BASE64.encode(c.encode_to_vec())),
        }
    }

    /// The credential the mount read with, if it had one.
    pub fn credential(&self) -> std::io::Result<Option<RegistryCredential>> {
        let Some(encoded) = &self.credential else {
            return Ok(None);
        };
        let bytes = BASE64
            .decode(encoded)
            .map_err(|_| protocol("a kept credential is not base64"))?;
        RegistryCredential::decode(bytes.as_slice())
            .map(Some)
            .map_err(|_| protocol("a kept credential does not decode"))
    }

    pub fn mounted_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.mounted_at_unix_ms)
    }
}

impl std::fmt::Debug for KeptMount {
    // Never the credential.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeptMount")
            .field("id", &self.id)
            .field("image_ref", &self.image_ref)
            .field("pinned_ref", &self.pinned_ref)
            .field("mountpoint", &self.mountpoint)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Request {
    /// Keep the descriptor sent along, under `id` (replacing what was kept under it).
    Keep { mount: Box<KeptMount> },
    /// Close what is kept under `id` (the mount was unmounted).
    Drop { id: String },
    /// Send back everything kept.
    List,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Reply {
    Ok,
    Error { message: String },
    Kept { mount: Box<KeptMount> },
    End,
}

/// The mounter's side: every call is one short connection, so a restarted keeper needs no
/// reconnection and a missing one costs one failed connect.
#[derive(Debug, Clone)]
pub struct KeeperClient {
    socket: PathBuf,
}

impl KeeperClient {
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Hands the keeper a duplicate of `fuse` (the mount's /dev/fuse descriptor) and its facts.
    pub fn keep(&self, mount: &KeptMount, fuse: BorrowedFd<'_>) -> std::io::Result<()> {
        let conn = self.connect()?;
        let request = Request::Keep {
            mount: Box::new(mount.clone()),
        };
        send(&conn, &request, Some(fuse))?;
        expect_ok(recv::<Reply>(&conn)?.0)
    }

    /// Tells the keeper a mount is gone, so it closes its descriptor.
    pub fn drop_mount(&self, id: &str) -> std::io::Result<()> {
        let conn = self.connect()?;
        send(&conn, &Request::Drop { id: id.to_string() }, None)?;
        expect_ok(recv::<Reply>(&conn)?.0)
    }

    /// Every mount the keeper holds, each with a descriptor of its FUSE connection.
    pub fn list(&self) -> std::io::Result<Vec<(KeptMount, OwnedFd)>> {
        let conn = self.connect()?;
        send(&conn, &Request::List, None)?;
        let mut kept = Vec::new();
        loop {
            match recv::<Reply>(&conn)? {
                (Reply::Kept { mount }, Some(fd)) => kept.push((*mount, fd)),
                (Reply::Kept { mount }, None) => {
                    return Err(protocol(format!(
                        "{} came without its descriptor",
                        mount.id
                    )));
                }
                (Reply::End, _) => return Ok(kept),
                (Reply::Error { message }, _) => return Err(protocol(message)),
                (other, _) => return Err(protocol(format!("unexpected {other:?}"))),
            }
        }
    }

    fn connect(&self) -> std::io::Result<OwnedFd> {
        let conn = rustix::net::socket(AddressFamily::UNIX, SocketType::SEQPACKET, None)?;
        rustix::net::sockopt::set_socket_timeout(
            &conn,
            rustix::net::sockopt::Timeout::Recv,
            Some(CLIENT_TIMEOUT),
        )?;
        rustix::net::sockopt::set_socket_timeout(
            &conn,
            rustix::net::sockopt::Timeout::Send,
            Some(CLIENT_TIMEOUT),
        )?;
        rustix::net::connect(&conn, &SocketAddrUnix::new(&self.socket)?)?;
        Ok(conn)
    }
}

fn expect_ok(reply: Reply) -> std::io::Result<()> {
    match reply {
        Reply::Ok => Ok(()),
        Reply::Error { message } => Err(protocol(message)),
        other => Err(protocol(format!("unexpected {other:?}"))),
    }
}

fn protocol(message: impl Into<String>) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("mount keeper: {}", message.into()),
    )
}

fn send<T: Serialize>(
    conn: impl AsFd,
    message: &T,
    fd: Option<BorrowedFd<'_>>,
) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(message).map_err(|e| protocol(e.to_string()))?;
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds;
    if let Some(fd) = fd {
        fds = [fd];
        control.push(SendAncillaryMessage::ScmRights(&fds));
    }
    rustix::net::sendmsg(
        conn,
        &[IoSlice::new(&bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    Ok(())
}

/// One packet and the descriptor that came with it, if any. `None` message: the peer closed.
fn recv_packet(conn: impl AsFd) -> std::io::Result<Option<(Vec<u8>, Option<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_PACKET];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = rustix::net::recvmsg(
        conn,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fd = None;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = message {
            // Keep the first; any other is closed as it drops.
            for received in fds {
                fd.get_or_insert(received);
            }
        }
    }
    if received.bytes == 0 {
        return Ok(None);
    }
    buf.truncate(received.bytes);
    Ok(Some((buf, fd)))
}

fn recv<T: for<'de> Deserialize<'de>>(conn: impl AsFd) -> std::io::Result<(T, Option<OwnedFd>)> {
    let (bytes, fd) =
        recv_packet(conn)?.ok_or_else(|| protocol("the connection closed mid-exchange"))?;
    let message = serde_json::from_slice(&bytes).map_err(|e| protocol(e.to_string()))?;
    Ok((message, fd))
}

/// The keeper process: serves `socket` until killed.
pub fn serve(socket: &Path) -> std::io::Result<()> {
    let listener = listen(socket)?;
    tracing::info!(socket = %socket.display(), "mount keeper listening");
    let kept: Arc<Mutex<BTreeMap<String, (KeptMount, OwnedFd)>>> = Arc::default();
    loop {
        let conn = match rustix::net::accept(&listener) {
            Ok(conn) => conn,
            Err(rustix::io::Errno::INTR) => continue,
            Err(err) => return Err(err.into()),
        };
        let kept = kept.clone();
        // One thread per exchange: a stuck client never holds up the next mounter.
        std::thread::spawn(move || {
            if let Err(err) = exchange(&conn, &kept) {
                tracing::warn!(error = %err, "keeper exchange failed");
            }
        });
    }
}

/// Binds `socket` for the mounter's user only (0700 directory, 0600 socket).
pub fn listen(socket: &Path) -> std::io::Result<OwnedFd> {
    if let Some(dir) = socket.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    match std::fs::remove_file(socket) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(err),
        _ => {}
    }
    let listener = rustix::net::socket(AddressFamily::UNIX, SocketType::SEQPACKET, None)?;
    rustix::net::bind(&listener, &SocketAddrUnix::new(socket)?)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    rustix::net::listen(&listener, 64)?;
    Ok(listener)
}

type Kept = Mutex<BTreeMap<String, (KeptMount, OwnedFd)>>;

fn exchange(conn: &OwnedFd, kept: &Kept) -> std::io::Result<()> {
    while let Some((bytes, fd)) = recv_packet(conn)? {
        let request: Request = match serde_json::from_slice(&bytes) {
            Ok(request) => request,
            Err(err) => {
                let message = format!("malformed request: {err}");
                return send(conn, &Reply::Error { message }, None);
            }
        };
        match request {
            Request::Keep { mount } => {
                let Some(fd) = fd else {
                    let message = format!("keep {} came without a descriptor", mount.id);
                    send(conn, &Reply::Error { message }, None)?;
                    continue;
                };
                tracing::info!(mount_id = %mount.id, mountpoint = %mount.mountpoint.display(), "keeping");
                let id = mount.id.clone();
                kept.lock().expect("kept lock").insert(id, (*mount, fd));
                send(conn, &Reply::Ok, None)?;
            }
            Request::Drop { id } => {
                if kept.lock().expect("kept lock").remove(&id).is_some() {
                    tracing::info!(mount_id = %id, "dropped");
                }
                send(conn, &Reply::Ok, None)?;
            }
            Request::List => {
                // Duplicates, so the keeper holds on until the new mounter has taken over.
                let listed: Vec<(KeptMount, OwnedFd)> = {
                    let kept = kept.lock().expect("kept lock");
                    kept.values()
                        .map(|(mount, fd)| Ok((mount.clone(), fd.try_clone()?)))
                        .collect::<std::io::Result<_>>()?
                };
                for (mount, fd) in &listed {
                    let reply = Reply::Kept {
                        mount: Box::new(mount.clone()),
                    };
                    send(conn, &reply, Some(fd.as_fd()))?;
                }
                send(conn, &Reply::End, None)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(id: &str) -> KeptMount {
        KeptMount {
            id: id.into(),
            tenant: "t".into(),
            request_id: "r".into(),
            image_ref: "reg/x:1".into(),
            pinned_ref: "reg/x@sha256:00".into(),
            image_digest: "sha256:00".into(),
            index_digest: "sha256:11".into(),
            mountpoint: PathBuf::from("/m").join(id),
            bundle: None,
            mounted_at_unix_ms: 1,
            credential: Some("c2VjcmV0".into()),
        }
    }

    #[test]
    fn descriptors_and_facts_go_to_the_keeper_and_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("keeper/keeper.sock");
        let server = socket.clone();
        std::thread::spawn(move || serve(&server));
        let client = KeeperClient::new(&socket);
        let file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut &file, b"kept").unwrap();
        let connected = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(20));
            client.keep(&mount("a"), file.as_fd()).is_ok()
        });
        assert!(connected, "the keeper answers");
        client.keep(&mount("b"), file.as_fd()).unwrap();
        assert_eq!(
            std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777,
            0o600
        );

        let listed = client.list().unwrap();
        let ids: Vec<&str> = listed.iter().map(|(m, _)| m.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(listed[0].0, mount("a"));
        // The descriptor that came back is the same open file (same offset, same contents).
        let back = std::fs::File::from(listed[0].1.try_clone().unwrap());
        let mut text = String::new();
        std::io::Seek::seek(&mut &back, std::io::SeekFrom::Start(0)).unwrap();
        std::io::Read::read_to_string(&mut &back, &mut text).unwrap();
        assert_eq!(text, "kept");

        client.drop_mount("a").unwrap();
        let ids: Vec<String> = client
            .list()
            .unwrap()
            .into_iter()
            .map(|(m, _)| m.id)
            .collect();
        assert_eq!(ids, ["b"]);
        assert!(
            !format!("{:?}", mount("a")).contains("c2VjcmV0"),
            "no credential in Debug"
        );
    }

    #[test]
    fn a_missing_keeper_is_an_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let client = KeeperClient::new(&dir.path().join("none.sock"));
        assert!(client.list().is_err());
    }
}
