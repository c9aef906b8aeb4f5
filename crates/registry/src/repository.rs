//! Repository paths inside a registry: which repositories a prefix covers.
//!
//! Tenants own the repositories under their prefix (`<build_repository>/<tenant>`), shared base
//! repositories are prefixes, and a named credential may be bound to one; all three ask the same
//! question, answered here once.

/// True when `repository` is `prefix` itself or lies below it (`prefix/...`). Compared by whole
/// path components, so `builds/team-a` does not cover `builds/team-ab`; a trailing `/` on the
/// prefix is ignored. An empty prefix covers nothing (a misconfiguration must not open every
/// repository).
pub fn within(repository: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return false;
    }
    match repository.strip_prefix(prefix) {
        Some("") => true,
        Some(rest) => rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::within;

    #[test]
    fn a_prefix_covers_itself_and_what_lies_below_it() {
        let prefix = "imagemesh/builds/team-a";
        assert!(within("imagemesh/builds/team-a", prefix));
        assert!(within("imagemesh/builds/team-a/app", prefix));
        assert!(within("imagemesh/builds/team-a/app/x", prefix));
        assert!(within(
            "imagemesh/builds/team-a",
            "imagemesh/builds/team-a/"
        ));
    }

    #[test]
    fn neighbours_parents_and_lookalikes_are_outside() {
        let prefix = "imagemesh/builds/team-a";
        for outside in [
            "imagemesh/builds/team-ab",
            "imagemesh/builds/team-a-x/app",
            "imagemesh/builds",
            "imagemesh/builds/team-b",
            "imagemesh/builds/team",
            "other/imagemesh/builds/team-a",
            "",
        ] {
            assert!(!within(outside, prefix), "{outside}");
        }
        assert!(!within("anything", ""), "an empty prefix covers nothing");
        assert!(!within("anything", "/"));
    }
}
