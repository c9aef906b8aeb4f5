//! Path resolution inside the merged tree: following symlinked parent directories without ever
//! leaving the root, and listing a directory's direct children.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;

use tracing::warn;

use super::{MergedEntry, MergedTree};
use crate::model::EntryKind;

/// Symlinks followed while resolving one path, as Linux's MAXSYMLINKS.
const MAX_HOPS: usize = 40;
/// Components visited while resolving one path: bounds the work a hostile symlink farm can cause.
const MAX_STEPS: usize = 4096;

impl MergedTree {
    /// Resolves symlinks in the parent components of `path` (not the last component), treating
    /// the tree as a chroot: absolute targets start at the root and `..` stops at the root.
    pub(super) fn resolve_parents(&self, path: &str) -> String {
        let Some((parent, name)) = path.rsplit_once('/') else {
            return path.to_string();
        };
        let mut queue: VecDeque<String> = parent.split('/').map(str::to_string).collect();
        let mut cur: Vec<String> = Vec::new();
        let (mut hops, mut steps) = (0, 0);
        while let Some(part) = queue.pop_front() {
            steps += 1;
            if steps > MAX_STEPS {
                warn!(path, "parent path too long to resolve; kept literally");
                return path.to_string();
            }
            match part.as_str() {
                "" | "." => continue,
                ".." => {
                    cur.pop();
                    continue;
                }
                _ => cur.push(part),
            }
            let joined = cur.join("/");
            let Some(target) = self.symlink_target(&joined) else {
                continue;
            };
            hops += 1;
            if hops > MAX_HOPS {
                warn!(path, "too many symlinks in parent path; kept literally");
                return path.to_string();
            }
            cur.pop();
            if target.starts_with('/') {
                cur.clear();
            }
            for t in target.split('/').rev() {
                queue.push_front(t.to_string());
            }
        }
        cur.push(name.to_string());
        cur.join("/")
    }

    fn symlink_target(&self, path: &str) -> Option<&str> {
        match self.entries.get(path) {
            Some(e) if e.kind == EntryKind::Symlink => e.link_target.as_deref(),
            _ => None,
        }
    }
}

/// Iterates the direct children of a directory, jumping over each child's subtree.
///
/// Keys sort bytewise, so a child's subtree (`a/…`) is contiguous but siblings such as `a-b` or
/// `a.txt` ('-' and '.' sort before '/') may sit between `a` and `a/…`; after a child we resume
/// just past it, and on meeting a descendant we jump to `a0` ('0' sorts right after '/').
pub(super) struct Children<'a> {
    entries: &'a BTreeMap<String, MergedEntry>,
    prefix: String,
    from: Bound<String>,
}

impl<'a> Children<'a> {
    pub(super) fn new(entries: &'a BTreeMap<String, MergedEntry>, dir: &str) -> Self {
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        Children {
            entries,
            from: Bound::Excluded(prefix.clone()),
            prefix,
        }
    }
}

impl<'a> Iterator for Children<'a> {
    type Item = (&'a str, &'a MergedEntry);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let from = self.from.as_ref().map(String::as_str);
            let (key, entry) = self
                .entries
                .range::<str, _>((from, Bound::Unbounded))
                .next()?;
            let name = key.strip_prefix(self.prefix.as_str())?;
            match name.split_once('/') {
                Some((first, _)) => self.from = Bound::Included(format!("{}{first}0", self.prefix)),
                None => {
                    self.from = Bound::Excluded(key.clone());
                    return Some((name, entry));
                }
            }
        }
    }
}
