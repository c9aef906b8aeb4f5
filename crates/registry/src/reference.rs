//! Image references (`[registry/]repository[:tag][@digest]`) parsed by hand, by the grammar of
//! the distribution project's `reference` package, into oci-client's [`Reference`].
//!
//! Why not `str::parse::<Reference>()`: oci-spec matches references with one regex whose tag
//! part is `[\w][\w.-]{0,127}` with Unicode `\w`. Compiled, that is a 4–5 MB automaton, built
//! the first time a process parses a reference and kept for its life: most of what a service
//! keeps after its first request (`docs/footprint.md`). Go's `\w`, which the grammar means, is
//! ASCII; so is this parser. It accepts and rejects what oci-spec's parser does on ASCII input
//! (`tests` compares the two) and produces the same `Reference` (Docker Hub names normalised to
//! `docker.io/library/…`, tag `latest` when neither tag nor digest is given).

use oci_client::{ParseError, Reference};

use crate::repository::valid_component;

/// Longest repository name (`NAME_TOTAL_LENGTH_MAX` of the distribution project).
const NAME_TOTAL_LENGTH_MAX: usize = 255;
/// Longest tag.
const TAG_MAX: usize = 128;

/// Parses an image reference. Equivalent to `reference.parse::<Reference>()` for ASCII input;
/// a tag with non-ASCII characters is refused (the grammar's `\w` is ASCII).
pub fn parse_reference(reference: &str) -> Result<Reference, ParseError> {
    if reference.is_empty() {
        return Err(ParseError::NameEmpty);
    }
    let (rest, digest) = match reference.split_once('@') {
        Some((rest, digest)) if is_digest(digest) => (rest, Some(digest)),
        Some(_) => return Err(ParseError::ReferenceInvalidFormat),
        None => (reference, None),
    };
    // A tag follows the last ':' that comes after the last '/' (a ':' before it is a port).
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => {
            let at = last_slash + i;
            (&rest[..at], Some(&rest[at + 1..]))
        }
        None => (rest, None),
    };
    if tag.is_some_and(|tag| !is_tag(tag)) || !is_name(name) {
        return Err(ParseError::ReferenceInvalidFormat);
    }
    let (registry, repository) = split_domain(name);
    if repository.len() > NAME_TOTAL_LENGTH_MAX {
        return Err(ParseError::NameTooLong);
    }
    if let Some(digest) = digest {
        check_digest_length(digest)?;
    }
    Ok(match (tag, digest) {
        (Some(tag), Some(digest)) => {
            Reference::with_tag_and_digest(registry, repository, tag.into(), digest.into())
        }
        (None, Some(digest)) => Reference::with_digest(registry, repository, digest.into()),
        (tag, None) => Reference::with_tag(registry, repository, tag.unwrap_or("latest").into()),
    })
}

/// `[domain '/'] path-component ('/' path-component)*`.
fn is_name(name: &str) -> bool {
    let mut parts = name.split('/');
    let first = parts.next().unwrap_or_default();
    let rest: Vec<&str> = parts.collect();
    let rest_ok = rest.iter().all(|part| valid_component(part));
    rest_ok && (valid_component(first) || (!rest.is_empty() && is_domain(first)))
}

/// `host [':' port]`, host being dot-separated labels of letters, digits and inner hyphens.
fn is_domain(domain: &str) -> bool {
    let (host, port) = match domain.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (domain, None),
    };
    let label_ok = |label: &str| {
        let bytes = label.as_bytes();
        !bytes.is_empty()
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
            && bytes[0] != b'-'
            && bytes[bytes.len() - 1] != b'-'
    };
    host.split('.').all(label_ok)
        && port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// `[\w][\w.-]{0,127}` with ASCII `\w`.
fn is_tag(tag: &str) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = tag.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= TAG_MAX
        && word(bytes[0])
        && bytes[1..]
            .iter()
            .all(|&b| word(b) || b == b'.' || b == b'-')
}

/// `algorithm ':' hex{32,}`, algorithm being `[A-Za-z][A-Za-z0-9]*` parts joined by `-_+.`.
fn is_digest(digest: &str) -> bool {
    let Some((algorithm, hex)) = digest.split_once(':') else {
        return false;
    };
    let part_ok = |part: &str| {
        let bytes = part.as_bytes();
        bytes.first().is_some_and(u8::is_ascii_alphabetic)
            && bytes.iter().all(u8::is_ascii_alphanumeric)
    };
    algorithm.split(['-', '_', '+', '.']).all(part_ok)
        && hex.len() >= 32
        && hex.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The lengths oci-spec holds the known algorithms to.
fn check_digest_length(digest: &str) -> Result<(), ParseError> {
    let (algorithm, hex) = digest
        .split_once(':')
        .ok_or(ParseError::DigestInvalidFormat)?;
    let want = match algorithm {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        _ => return Err(ParseError::DigestUnsupported),
    };
    if hex.len() != want {
        return Err(ParseError::DigestInvalidLength);
    }
    Ok(())
}

/// The registry and repository of a validated name, Docker Hub's defaults applied.
fn split_domain(name: &str) -> (String, String) {
    let (mut domain, mut remainder) = match name.split_once('/') {
        Some((left, right)) if left.contains('.') || left.contains(':') || left == "localhost" => {
            (left.to_string(), right.to_string())
        }
        _ => ("docker.io".to_string(), name.to_string()),
    };
    if domain == "index.docker.io" {
        domain = "docker.io".into();
    }
    if domain == "docker.io" && !remainder.contains('/') {
        remainder = format!("library/{remainder}");
    }
    (domain, remainder)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// oci-spec's parser, the reference this one must agree with.
    fn upstream(s: &str) -> Result<Reference, ParseError> {
        s.parse()
    }

    #[test]
    fn agrees_with_oci_spec_on_valid_and_invalid_references() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        let cases = [
            "busybox".to_string(),
            "busybox:1.36".into(),
            "library/busybox".into(),
            "docker.io/busybox".into(),
            "index.docker.io/library/busybox:latest".into(),
            "127.0.0.1:5000/tenant-a/app:v1".into(),
            "localhost/app".into(),
            "localhost:5000/app".into(),
            "registry.example.com/a/b/c:tag_1.2-rc".into(),
            "registry.example.com:443/a__b/c-d/e.f:TAG".into(),
            "my-registry.io/a---b/c".into(),
            format!("r.io/app@{digest}"),
            format!("r.io/app:v1@{digest}"),
            format!("app@{digest}"),
            "r.io/app@sha256:abc".into(),
            format!("r.io/app@sha512:{}", "ab".repeat(32)),
            format!("r.io/app@md5:{}", "ab".repeat(16)),
            format!("r.io/app@sha256+b64:{}", "ab".repeat(32)),
            format!("r.io/app:{}", "t".repeat(128)),
            format!("r.io/app:{}", "t".repeat(129)),
            format!("r.io/{}", "a".repeat(256)),
            String::new(),
            "UPPER/case".into(),
            "r.io/Upper".into(),
            "r.io/app:".into(),
            "r.io/app:.tag".into(),
            "r.io/app:-tag".into(),
            "r.io//app".into(),
            "r.io/app/".into(),
            "/app".into(),
            "r.io/-app".into(),
            "r.io/app-".into(),
            "r.io/a..b".into(),
            "r.io/a._b".into(),
            "r.io/a___b".into(),
            "-r.io/app".into(),
            "r-.io/app".into(),
            "r.io:/app".into(),
            "r.io:x/app".into(),
            "r.io:5000".into(),
            "app:tag:tag".into(),
            "r.io/app@".into(),
            "r.io/app@sha256".into(),
            "r.io/app@@sha256:00".into(),
            "a b".into(),
            "r.io/app:tag@sha256:zz".into(),
            "UPPER:5000/app".into(),
            "localhost:5000".into(),
            "r.io/a/b:c/d".into(),
            "r.io/a-_b".into(),
            "r.io/a.-b".into(),
            "a/b".into(),
            "a.b/c".into(),
            "A.io/app".into(),
            "1.2.3.4/app".into(),
            "r.io:5000/app:5000".into(),
            "[::1]:5000/app".into(),
            format!("r.io/app@SHA256:{}", "ab".repeat(32)),
            format!("r.io/app@sha256:{}", "AB".repeat(32)),
            format!("sha256:{}", "ab".repeat(32)),
            "r.io/app:v1@".into(),
            "r.io/a__b__c".into(),
            "r.io/a-b-c".into(),
            "r.io/_a".into(),
        ];
        for case in &cases {
            let ours = parse_reference(case);
            let theirs = upstream(case);
            assert_eq!(ours, theirs, "{case:?}");
        }
    }

    #[test]
    fn a_non_ascii_tag_is_refused() {
        assert!(
            upstream("r.io/app:tägé").is_ok(),
            "oci-spec's \\w is Unicode"
        );
        assert_eq!(
            parse_reference("r.io/app:tägé"),
            Err(ParseError::ReferenceInvalidFormat)
        );
    }
}
