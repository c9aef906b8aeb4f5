//! The read-only FUSE filesystem of one image.
//!
//! Metadata (lookup, getattr, readdir, readlink, xattrs) is answered from the in-memory inode
//! table on the FUSE thread. A `read` must not block that thread on the registry: it moves its
//! reply into a task on the service's tokio runtime (through a [`Handle`]), which fetches and
//! inflates (in the blocking pool) and replies when done; the kernel allows many reads in flight
//! (`FUSE_ASYNC_READ`). The image never changes, so the kernel may cache attributes, entries and
//! file pages for long.

pub mod inodes;

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::Duration;

use fuser::{
    Errno, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, LockOwner, OpenAccMode,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyXattr, Request,
};
use imagemesh_lazyindex::EntryKind;
use tokio::runtime::Handle;

use crate::source::MountSource;
use imagemesh_lazyimage::ImageReader;
use inodes::{Inodes, file_type};

/// How long the kernel may trust what it was told: the image is immutable.
const TTL: Duration = Duration::from_secs(3600);

/// The reader of a mount: the shared caching reader over the mount's registry source.
pub type MountReader = ImageReader<Arc<MountSource>>;

/// One mounted image.
pub struct ImageFs {
    pub inodes: Arc<Inodes>,
    pub reader: Arc<MountReader>,
    pub runtime: Handle,
    /// For logs: which mount a failed read belongs to.
    pub mount_id: String,
}

impl Filesystem for ImageFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = name
            .to_str()
            .and_then(|name| self.inodes.lookup(parent.0, name))
            .and_then(|ino| self.inodes.attr(ino));
        match found {
            Some(attr) => reply.entry(&TTL, &attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.inodes.attr(ino.0) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.inodes.get(ino.0).map(|n| &n.entry) {
            Some(e) if e.kind == EntryKind::Symlink => {
                reply.data(e.link_target.as_deref().unwrap_or_default().as_bytes())
            }
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        match self.inodes.get(ino.0) {
            // Keep the page cache across opens: the file cannot change under it.
            Some(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(entry) = self.inodes.get(ino.0).map(|n| &n.entry) else {
            return reply.error(Errno::ENOENT);
        };
        let Some(data) = entry.data else {
            return match entry.kind {
                EntryKind::Dir => reply.error(Errno::EISDIR),
                // Empty files have no data reference.
                _ => reply.data(&[]),
            };
        };
        let file_size = entry.size;
        let reader = self.reader.clone();
        let mount_id = self.mount_id.clone();
        self.runtime.spawn(async move {
            match reader.read(data, file_size, offset, u64::from(size)).await {
                Ok(bytes) => reply.data(&bytes),
                Err(err) => {
                    tracing::warn!(mount_id, inode = ino.0, offset, error = %err, "read failed");
                    reply.error(Errno::EIO);
                }
            }
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(node) = self.inodes.get(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        if node.entry.kind != EntryKind::Dir {
            return reply.error(Errno::ENOTDIR);
        }
        let dots = [(ino.0, "."), (node.parent, "..")];
        let names = dots.iter().map(|(ino, name)| (*ino, *name)).chain(
            node.children
                .iter()
                .map(|(name, ino)| (*ino, name.as_str())),
        );
        // The offset handed back with an entry is where the next call resumes.
        for (i, (child, name)) in names.enumerate().skip(offset as usize) {
            let kind = self
                .inodes
                .get(child)
                .map_or(fuser::FileType::Directory, |n| file_type(n.entry.kind));
            if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let files = self.inodes.len() as u64;
        reply.statfs(0, 0, 0, files, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let Some(node) = self.inodes.get(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let value = name
            .to_str()
            .and_then(|name| node.entry.xattrs.iter().find(|(n, _)| n == name))
            .map(|(_, v)| v.as_slice());
        match value {
            Some(value) => reply_sized(reply, size, value),
            None => reply.error(Errno::NO_XATTR),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let Some(node) = self.inodes.get(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let mut names = Vec::new();
        for (name, _) in &node.entry.xattrs {
            names.extend_from_slice(name.as_bytes());
            names.push(0);
        }
        reply_sized(reply, size, &names);
    }
}

/// The xattr protocol: size 0 asks how big the value is; a buffer too small is ERANGE.
fn reply_sized(reply: ReplyXattr, size: u32, value: &[u8]) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if (size as usize) < value.len() {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}
