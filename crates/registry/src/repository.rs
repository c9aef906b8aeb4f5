//! Repository paths inside a registry: which repositories a prefix covers.
//!
//! Tenants own the repositories under their prefix (`<build_repository>/<tenant>`), shared base
//! repositories are prefixes, and a named credential may be bound to one; all three ask the same
//! question, answered here once.

/// Why a repository name is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("the repository name is empty")]
    Empty,
    #[error("the repository name is longer than {MAX_NAME} characters")]
    TooLong,
    #[error(
        "repository name {0:?} is not a repository path (lowercase letters, digits, '.', '_', '-' and '/')"
    )]
    Invalid(String),
}

/// The longest repository name distribution accepts.
pub const MAX_NAME: usize = 255;

/// Checks `name` against distribution's repository name grammar:
/// `component ('/' component)*`, a component being `[a-z0-9]+` runs joined by one `.`, one
/// or two `_`, or any number of `-`. Whatever reaches a token scope (`repository:<name>:pull`)
/// must pass, so no caller can widen its scope through the name (a `*`, a `:`, a space, a
/// second `repository:` clause).
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME {
        return Err(NameError::TooLong);
    }
    if name.split('/').all(valid_component) {
        Ok(())
    } else {
        Err(NameError::Invalid(name.chars().take(64).collect()))
    }
}

/// One path component of a repository name: lowercase alphanumerics joined by `.`, `_`, `__`
/// or runs of `-` (the distribution grammar's `path-component`).
pub(crate) fn valid_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    if !alnum(first) || !alnum(last) {
        return false;
    }
    // Between alphanumeric runs: exactly one separator token.
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let separator = &component[start..i];
        let ok = matches!(separator, "." | "_" | "__") || separator.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

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
    use super::{NameError, validate_name, within};

    #[test]
    fn repository_names_follow_the_distribution_grammar() {
        for good in [
            "imagemesh/builds/default",
            "a",
            "library/busybox",
            "a.b/c_d/e__f/g-h/i---j",
            "0/1",
        ] {
            assert_eq!(validate_name(good), Ok(()), "{good}");
        }
        assert_eq!(validate_name(""), Err(NameError::Empty));
        assert_eq!(validate_name(&"a".repeat(256)), Err(NameError::TooLong));
        for bad in [
            "team:pull,push",
            "a b",
            "*",
            "builds/*",
            "builds/app:pull repository:other:push",
            "Upper",
            "/leading",
            "trailing/",
            "a//b",
            "a..b",
            "a___b",
            "-a",
            "a-",
            "a\nb",
            "a\u{0}b",
        ] {
            assert!(
                matches!(validate_name(bad), Err(NameError::Invalid(_))),
                "{bad:?}"
            );
        }
    }

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
