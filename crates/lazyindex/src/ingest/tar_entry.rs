//! Turns one tar header (plus the PAX / GNU records before it) into an [`Entry`], or drops it
//! with a logged reason when it is unsafe or unsupported.

use tar::{EntryType, Header};
use tracing::debug;

use super::IndexOptions;
use super::tar::{Pending, kind_of, parse_num, warn_skip};
use crate::model::{Entry, EntryKind};
use crate::path::{self, Whiteout};
use crate::{Error, Result};

const XATTR_PREFIX: &str = "SCHILY.xattr.";

/// Builds the entry whose header starts at uncompressed offset `at` and whose data (if a
/// regular file) starts at `data_at`. `Ok(None)` means "dropped, already logged".
pub(super) fn build(
    header: &Header,
    pending: &Pending,
    data_at: u64,
    size: u64,
    opts: &IndexOptions,
    at: u64,
) -> Result<Option<Entry>> {
    let raw_path = pending
        .pax
        .get("path")
        .or(pending.long_name.as_ref())
        .cloned()
        .unwrap_or_else(|| header.path_bytes().into_owned());
    let Some(kind) = classify(header, &raw_path, pending, opts) else {
        return Ok(None);
    };
    let Some(path) = clean_path(&raw_path, opts) else {
        return Ok(None);
    };
    match path::whiteout(&path) {
        Ok(Whiteout::None) => {}
        Ok(Whiteout::Remove(target)) => return Ok(Some(Entry::new(target, EntryKind::Whiteout))),
        Ok(Whiteout::Opaque(dir)) => return Ok(Some(Entry::new(dir, EntryKind::Opaque))),
        Ok(Whiteout::Meta) => {
            debug!(path, "aufs metadata entry ignored");
            return Ok(None);
        }
        Err(reason) => {
            warn_skip(&raw_path, reason);
            return Ok(None);
        }
    }
    if path.is_empty() && kind != EntryKind::Dir {
        warn_skip(&raw_path, "the root can only be a directory");
        return Ok(None);
    }
    let mut e = Entry::new(path, kind);
    fill_metadata(&mut e, header, pending, at)?;
    if matches!(kind, EntryKind::Symlink | EntryKind::Hardlink) {
        match link_target(header, pending, kind, opts) {
            Ok(target) => e.link_target = Some(target),
            Err(reason) => {
                warn_skip(&raw_path, reason);
                return Ok(None);
            }
        }
    }
    if kind == EntryKind::File {
        e.size = size;
        e.offset = Some(data_at);
    }
    e.xattrs = xattrs(&pending.pax, &e.path, opts);
    Ok(Some(e))
}

/// The entry kind, or `None` (logged) for types we do not index.
fn classify(
    header: &Header,
    raw_path: &[u8],
    pending: &Pending,
    opts: &IndexOptions,
) -> Option<EntryKind> {
    let ty = header.entry_type();
    let Some(mut kind) = kind_of(ty) else {
        warn_skip(
            raw_path,
            &format!("unsupported tar entry type {:?}", ty.as_byte()),
        );
        return None;
    };
    // Pre-POSIX tars mark directories only by a trailing slash (Go's archive/tar does the same).
    if header.as_old().linkflag[0] == 0 && raw_path.ends_with(b"/") {
        kind = EntryKind::Dir;
    }
    if pending.pax.keys().any(|k| k.starts_with("GNU.sparse.")) || ty == EntryType::GNUSparse {
        warn_skip(raw_path, "sparse files are not supported");
        return None;
    }
    let device = matches!(kind, EntryKind::CharDevice | EntryKind::BlockDevice);
    if device && !opts.allow_devices {
        warn_skip(raw_path, "device nodes are disabled");
        return None;
    }
    Some(kind)
}

fn clean_path(raw: &[u8], opts: &IndexOptions) -> Option<String> {
    let Ok(text) = std::str::from_utf8(raw) else {
        warn_skip(raw, "path is not UTF-8");
        return None;
    };
    match path::normalize(text, opts.limits.max_path_len) {
        Ok(p) => Some(p),
        Err(reason) => {
            warn_skip(raw, reason);
            None
        }
    }
}

fn fill_metadata(e: &mut Entry, header: &Header, pending: &Pending, at: u64) -> Result<()> {
    let raw = header.as_bytes();
    // Go's archive/tar reads an empty (all NUL/space) numeric field as 0; so do we.
    let num = |field: std::ops::Range<usize>, parsed: std::io::Result<u64>, what: &str| {
        let blank = raw[field].iter().all(|&b| b == 0 || b == b' ');
        parsed.or_else(|_| {
            if blank {
                Ok(0)
            } else {
                Err(Error::tar(at, format!("bad {what} field")))
            }
        })
    };
    let pax = |key: &str| -> Result<Option<u64>> {
        match pending.pax.get(key) {
            Some(v) => parse_num(v)
                .map(Some)
                .ok_or_else(|| Error::tar(at, format!("bad PAX {key}"))),
            None => Ok(None),
        }
    };
    // Only the permission bits are kept; the mask makes the narrowing lossless.
    e.mode =
        u32::try_from(num(100..108, header.mode().map(u64::from), "mode")? & 0o7777).unwrap_or(0);
    e.uid = pax("uid")?.map_or_else(|| num(108..116, header.uid(), "uid"), Ok)?;
    e.gid = pax("gid")?.map_or_else(|| num(116..124, header.gid(), "gid"), Ok)?;
    (e.mtime, e.mtime_nsec) = match pending.pax.get("mtime") {
        Some(v) => parse_time(v).ok_or_else(|| Error::tar(at, "bad PAX mtime"))?,
        None => {
            let secs = num(136..148, header.mtime(), "mtime")?;
            let secs = i64::try_from(secs).map_err(|_| Error::tar(at, "mtime out of range"))?;
            (secs, 0)
        }
    };
    if matches!(e.kind, EntryKind::CharDevice | EntryKind::BlockDevice) {
        let major = num(
            329..337,
            header.device_major().map(|d| u64::from(d.unwrap_or(0))),
            "devmajor",
        )?;
        let minor = num(
            337..345,
            header.device_minor().map(|d| u64::from(d.unwrap_or(0))),
            "devminor",
        )?;
        let fit = |v: u64| u32::try_from(v).map_err(|_| Error::tar(at, "device number too large"));
        e.device = Some((fit(major)?, fit(minor)?));
    }
    Ok(())
}

/// Symlink targets are kept verbatim (the kernel resolves them inside the container); hardlink
/// targets name another entry and are normalised like paths, refusing escapes.
fn link_target(
    header: &Header,
    pending: &Pending,
    kind: EntryKind,
    opts: &IndexOptions,
) -> std::result::Result<String, &'static str> {
    let raw = pending
        .pax
        .get("linkpath")
        .or(pending.long_link.as_ref())
        .cloned()
        .or_else(|| header.link_name_bytes().map(|c| c.into_owned()))
        .unwrap_or_default();
    let text = String::from_utf8(raw).map_err(|_| "link target is not UTF-8")?;
    if text.is_empty() {
        return Err("empty link target");
    }
    if text.len() > opts.limits.max_path_len || text.contains('\0') {
        return Err("link target too long or contains NUL");
    }
    if kind == EntryKind::Symlink {
        return Ok(text);
    }
    match path::normalize(&text, opts.limits.max_path_len)? {
        t if t.is_empty() => Err("hardlink to the root"),
        t => Ok(t),
    }
}

/// PAX `SCHILY.xattr.<name>` records, sorted by name for a deterministic index.
fn xattrs(
    pax: &std::collections::HashMap<String, Vec<u8>>,
    path: &str,
    opts: &IndexOptions,
) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    for (key, value) in pax {
        let Some(name) = key.strip_prefix(XATTR_PREFIX) else {
            continue;
        };
        if value.len() > opts.limits.max_xattr_value || name.is_empty() {
            tracing::warn!(
                path,
                xattr = name,
                "xattr dropped: empty name or value over the limit"
            );
            continue;
        }
        out.push((name.to_string(), value.clone()));
    }
    out.sort();
    out
}

/// Parses a PAX time, `[-]seconds[.fraction]`, into seconds and nanoseconds.
fn parse_time(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?.trim();
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = int.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits: String = frac.chars().chain("000000000".chars()).take(9).collect();
    let nsec: u32 = digits.parse().ok()?;
    if s.starts_with('-') && nsec > 0 {
        return Some((secs.checked_sub(1)?, 1_000_000_000 - nsec));
    }
    Some((secs, nsec))
}

#[cfg(test)]
mod tests {
    use super::parse_time;

    #[test]
    fn parses_pax_times() {
        assert_eq!(parse_time(b"1700000000"), Some((1700000000, 0)));
        assert_eq!(parse_time(b"1700000000.5"), Some((1700000000, 500_000_000)));
        assert_eq!(parse_time(b"-1.25"), Some((-2, 750_000_000)));
        assert_eq!(parse_time(b"12.x"), None);
    }
}
