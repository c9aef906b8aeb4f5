//! The merged tree as inodes: numbers the kernel can hold, children in name order for lookups
//! by binary search, and one inode shared by the names of a hardlinked file.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo};
use imagemesh_lazyindex::{EntryKind, MergedEntry, MergedTree};

/// Hops followed when resolving a chain of hardlinks (a loop would be a broken index).
const MAX_LINK_HOPS: usize = 40;

/// One inode.
pub struct Node {
    pub entry: MergedEntry,
    pub parent: u64,
    /// (name, inode), sorted by name.
    pub children: Vec<(String, u64)>,
    pub nlink: u32,
}

/// Every inode of one image; inode `n` is `nodes[n - 1]`, the root is 1.
pub struct Inodes {
    nodes: Vec<Node>,
}

impl Inodes {
    /// The table of `tree`, whose entries move into it (the tree is not kept, so nothing is
    /// copied: the table is most of what a mount holds).
    pub fn build(tree: MergedTree) -> Self {
        // Which paths are one more name of a file that another path numbers, decided while the
        // tree can still be looked into.
        let shared: Vec<Option<String>> = tree
            .iter()
            .map(|(path, entry)| shared_target(&tree, path, entry))
            .collect();
        let mut nodes = Vec::with_capacity(tree.len());
        // (path, the inode it numbers or `None` for one more name of a shared file).
        let mut paths: Vec<(String, Option<u64>)> = Vec::with_capacity(tree.len());
        for ((path, entry), shared) in tree.into_entries().zip(&shared) {
            let numbered = shared.is_none().then(|| {
                nodes.push(Node {
                    entry,
                    parent: 1,
                    children: Vec::new(),
                    nlink: 1,
                });
                nodes.len() as u64
            });
            paths.push((path, numbered));
        }
        let inode_of: HashMap<&str, u64> = paths
            .iter()
            .filter_map(|(path, ino)| Some((path.as_str(), (*ino)?)))
            .collect();
        // Then names: path order lists a directory's children in name order.
        for ((path, numbered), shared) in paths.iter().zip(&shared).skip(1) {
            let (parent_path, name) = path.rsplit_once('/').unwrap_or(("", path));
            let ino = match (numbered, shared) {
                (Some(ino), _) => *ino,
                (None, Some(target)) => {
                    let ino = inode_of[target.as_str()];
                    nodes[ino as usize - 1].nlink += 1;
                    ino
                }
                (None, None) => unreachable!("a path either numbers an inode or shares one"),
            };
            let parent = inode_of[parent_path];
            nodes[parent as usize - 1]
                .children
                .push((name.to_string(), ino));
            if numbered.is_some() {
                nodes[ino as usize - 1].parent = parent;
            }
        }
        for node in &mut nodes {
            if node.entry.kind == EntryKind::Dir {
                node.nlink = 2;
            }
        }
        let subdirs: Vec<u64> = nodes
            .iter()
            .filter(|n| n.entry.kind == EntryKind::Dir)
            .map(|n| n.parent)
            .collect();
        for parent in subdirs.into_iter().skip(1) {
            nodes[parent as usize - 1].nlink += 1;
        }
        Self { nodes }
    }

    pub fn get(&self, ino: u64) -> Option<&Node> {
        self.nodes.get(usize::try_from(ino).ok()?.checked_sub(1)?)
    }

    pub fn lookup(&self, parent: u64, name: &str) -> Option<u64> {
        let children = &self.get(parent)?.children;
        let at = children
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .ok()?;
        Some(children[at].1)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Every node, inode 1 first (what the mount's memory footprint is counted over).
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Regular files (a hardlinked file counts once).
    pub fn files(&self) -> usize {
        self.nodes
            .iter()
            .filter(|n| n.entry.kind == EntryKind::File)
            .count()
    }

    /// The kernel's view of inode `ino`.
    pub fn attr(&self, ino: u64) -> Option<FileAttr> {
        let node = self.get(ino)?;
        let e = &node.entry;
        let mtime = if e.mtime >= 0 {
            UNIX_EPOCH + Duration::new(e.mtime as u64, e.mtime_nsec)
        } else {
            UNIX_EPOCH - Duration::from_secs(e.mtime.unsigned_abs())
        };
        let size = match e.kind {
            EntryKind::Symlink => e.link_target.as_ref().map_or(0, |t| t.len() as u64),
            _ => e.size,
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: SystemTime::UNIX_EPOCH,
            kind: file_type(e.kind),
            perm: (e.mode & 0o7777) as u16,
            nlink: node.nlink,
            uid: u32::try_from(e.uid).unwrap_or(u32::MAX),
            gid: u32::try_from(e.gid).unwrap_or(u32::MAX),
            rdev: e
                .device
                .map_or(0, |(major, minor)| encode_dev(major, minor)),
            blksize: 4096,
            flags: 0,
        })
    }
}

/// The kernel's `new_encode_dev`: minor's low byte, major, then the minor's high bits.
fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

pub fn file_type(kind: EntryKind) -> FileType {
    match kind {
        EntryKind::Dir => FileType::Directory,
        EntryKind::Symlink => FileType::Symlink,
        EntryKind::CharDevice => FileType::CharDevice,
        EntryKind::BlockDevice => FileType::BlockDevice,
        EntryKind::Fifo => FileType::NamedPipe,
        _ => FileType::RegularFile,
    }
}

/// For a path created by a hardlink whose target still holds the same file: the path that
/// owns the inode. A target replaced since the link was made keeps its own inode.
fn shared_target(tree: &MergedTree, path: &str, entry: &MergedEntry) -> Option<String> {
    let mut target = entry.hardlink_to.clone()?;
    for _ in 0..MAX_LINK_HOPS {
        let found = tree.get(&target)?;
        if target == path || !same_file(found, entry) {
            return None;
        }
        match &found.hardlink_to {
            Some(next) => target = next.clone(),
            None => return Some(target),
        }
    }
    None
}

fn same_file(a: &MergedEntry, b: &MergedEntry) -> bool {
    a.kind == b.kind && a.data == b.data && a.size == b.size && a.mode == b.mode
}

#[cfg(test)]
mod tests {
    use imagemesh_lazyindex::{Compression, Entry, LayerIndex};

    use super::*;

    fn file(path: &str, offset: u64, size: u64) -> Entry {
        Entry {
            size,
            offset: Some(offset),
            mode: 0o4755,
            uid: 1000,
            ..Entry::new(path, EntryKind::File)
        }
    }

    fn tree(entries: Vec<Entry>) -> MergedTree {
        let layer = LayerIndex {
            digest: format!("sha256:{}", "0".repeat(64)),
            diff_id: format!("sha256:{}", "1".repeat(64)),
            compression: Compression::None,
            compressed_size: 1 << 20,
            uncompressed_size: 1 << 20,
            checkpoints: Vec::new(),
            entries,
        };
        MergedTree::from_layers([&layer])
    }

    #[test]
    fn names_resolve_in_order_and_hardlinks_share_an_inode() {
        let link = Entry {
            link_target: Some("bin/tool".into()),
            ..Entry::new("bin/tool-hard", EntryKind::Hardlink)
        };
        let symlink = Entry {
            link_target: Some("tool".into()),
            ..Entry::new("bin/tool-link", EntryKind::Symlink)
        };
        let inodes = Inodes::build(tree(vec![
            Entry::new("bin", EntryKind::Dir),
            file("bin/tool", 512, 20),
            link,
            symlink,
            Entry::new("etc/sub", EntryKind::Dir),
        ]));
        let bin = inodes.lookup(1, "bin").unwrap();
        let names: Vec<&str> = inodes
            .get(bin)
            .unwrap()
            .children
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(names, ["tool", "tool-hard", "tool-link"]);
        let tool = inodes.lookup(bin, "tool").unwrap();
        assert_eq!(
            inodes.lookup(bin, "tool-hard"),
            Some(tool),
            "one inode, two names"
        );
        let attr = inodes.attr(tool).unwrap();
        assert_eq!(
            (attr.nlink, attr.perm, attr.uid, attr.size),
            (2, 0o4755, 1000, 20)
        );
        let link = inodes
            .attr(inodes.lookup(bin, "tool-link").unwrap())
            .unwrap();
        assert_eq!(
            (link.kind, link.size),
            (FileType::Symlink, 4),
            "size = target length"
        );
        // The root holds bin and the implicit etc: 2 + two subdirectories.
        assert_eq!(inodes.attr(1).unwrap().nlink, 4);
        assert_eq!(inodes.get(bin).unwrap().parent, 1);
        assert!(inodes.lookup(1, "missing").is_none() && inodes.get(0).is_none());
        assert_eq!(inodes.files(), 1);
    }

    #[test]
    fn devices_encode_like_the_kernel() {
        assert_eq!(encode_dev(1, 3), 0x103);
        assert_eq!(encode_dev(8, 0x1234), 0x34 | (8 << 8) | (0x1200 << 12));
    }
}
