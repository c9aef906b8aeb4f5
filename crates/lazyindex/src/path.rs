//! Path hygiene for tar entry names: everything in an index is a clean relative path inside the
//! image root, so nothing downstream (merge, FUSE) can be steered outside it.

/// Why an entry name was refused.
pub(crate) type Refusal = &'static str;

/// Normalises a tar path: leading `/` and `./` are dropped (absolute names are made relative, as
/// containerd does), `.` and empty components vanish, `..` pops a component. A `..` that would
/// climb above the root, or a NUL byte, refuses the name. The root itself is `""`.
pub(crate) fn normalize(raw: &str, max_len: usize) -> Result<String, Refusal> {
    if raw.len() > max_len {
        return Err("path longer than the limit");
    }
    if raw.contains('\0') {
        return Err("path contains NUL");
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in raw.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err("path escapes the root with ..");
                }
            }
            p => parts.push(p),
        }
    }
    Ok(parts.join("/"))
}

/// Splits a normalised path into (parent, name); the parent of a top-level name is `""`.
pub(crate) fn split(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("", path),
    }
}

/// Joins a normalised parent and a name.
pub(crate) fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}

/// What an OCI whiteout file name means.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Whiteout {
    /// Not a whiteout.
    None,
    /// `.wh.<name>` in `parent`: remove `parent/name` from lower layers.
    Remove(String),
    /// `.wh..wh..opq` in `dir`: hide everything lower layers put in `dir`.
    Opaque(String),
    /// Other `.wh..wh.*` names are aufs bookkeeping and are ignored, as containerd does.
    Meta,
}

const PREFIX: &str = ".wh.";
const META_PREFIX: &str = ".wh..wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// Classifies a normalised path by its last component.
pub(crate) fn whiteout(path: &str) -> Result<Whiteout, Refusal> {
    let (parent, name) = split(path);
    if name == OPAQUE {
        return Ok(Whiteout::Opaque(parent.to_string()));
    }
    if name.starts_with(META_PREFIX) {
        return Ok(Whiteout::Meta);
    }
    match name.strip_prefix(PREFIX) {
        None => Ok(Whiteout::None),
        Some("" | "." | "..") => Err("whiteout of an invalid name"),
        Some(target) => Ok(Whiteout::Remove(join(parent, target))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_and_refuses_escapes() {
        let n = |s| normalize(s, 4096);
        assert_eq!(n("./usr/bin/"), Ok("usr/bin".into()));
        assert_eq!(n("/etc/passwd"), Ok("etc/passwd".into()));
        assert_eq!(n("a//b/./c"), Ok("a/b/c".into()));
        assert_eq!(n("a/../b"), Ok("b".into()));
        assert_eq!(n("./"), Ok("".into()));
        assert!(n("../../etc/passwd").is_err());
        assert!(n("a/../../x").is_err());
        assert!(n("a\0b").is_err());
        assert!(normalize(&"x".repeat(5000), 4096).is_err());
    }

    #[test]
    fn classifies_whiteouts() {
        assert_eq!(whiteout("a/b"), Ok(Whiteout::None));
        assert_eq!(whiteout("a/.wh.b"), Ok(Whiteout::Remove("a/b".into())));
        assert_eq!(whiteout(".wh.top"), Ok(Whiteout::Remove("top".into())));
        assert_eq!(whiteout("d/.wh..wh..opq"), Ok(Whiteout::Opaque("d".into())));
        assert_eq!(whiteout("d/.wh..wh.plnk"), Ok(Whiteout::Meta));
        assert!(whiteout("d/.wh...").is_err());
    }
}
