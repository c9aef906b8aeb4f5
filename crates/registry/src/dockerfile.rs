//! What a Dockerfile builds from: the images of its `FROM` lines.
//!
//! Parsed with `parse-dockerfile` (line continuations, flags, parser directives, stages);
//! references may use the ARGs declared before the first `FROM`, expanded here the way
//! buildah does.

use std::collections::HashMap;

use crate::Reference;

/// The images a Dockerfile starts from (`FROM` lines), skipping `scratch` and earlier stages.
/// A reference may use the ARGs declared before the first `FROM` (`FROM ${BASE}`,
/// `FROM busybox:${TAG:-1.36}`), with `build_args` over their defaults, as buildah expands them.
/// A reference that does not expand to a valid one, or a Dockerfile that does not parse, names
/// nothing here: buildah reports it.
pub fn base_images(dockerfile: &str, build_args: &HashMap<String, String>) -> Vec<Reference> {
    let Ok(parsed) = parse_dockerfile::parse(dockerfile) else {
        return Vec::new();
    };
    if parsed.stages().len() == 0 {
        return Vec::new();
    }
    let mut args = HashMap::new();
    for arg in parsed.global_args() {
        for declaration in arg.arguments.value.split_whitespace() {
            let (name, default) = match declaration.split_once('=') {
                Some((name, default)) => (name, Some(unquote(default))),
                None => (declaration, None),
            };
            // A build arg counts only for an ARG that declares it.
            if let Some(value) = build_args.get(name).cloned().or(default) {
                args.insert(name.to_string(), value);
            }
        }
    }
    let mut stages: Vec<String> = Vec::new();
    let mut images: Vec<Reference> = Vec::new();
    for stage in parsed.stages() {
        let image = expand(&stage.from.image.value, &args);
        // Checked before this stage's own name joins the stages.
        let earlier_stage = image
            .as_deref()
            .is_some_and(|i| stages.contains(&i.to_ascii_lowercase()));
        if let Some((_, name)) = &stage.from.as_ {
            stages.push(name.value.to_ascii_lowercase());
        }
        let Some(image) = image.filter(|i| !earlier_stage && !i.eq_ignore_ascii_case("scratch"))
        else {
            continue;
        };
        if let Some(reference) = parse_reference(&image)
            && !images.iter().any(|i| i.whole() == reference.whole())
        {
            images.push(reference);
        }
    }
    images
}

/// The body of the `dockerfile_from` fuzz target (`fuzz/`), here so its seed corpus also runs in
/// every `cargo test`. `data` is a Dockerfile, optionally followed by a NUL and `NAME=value`
/// build args, one per line. Every reference found must be one that parses back to itself.
#[doc(hidden)]
pub fn fuzz_one(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (dockerfile, args) = text.split_once('\0').unwrap_or((&text, ""));
    let build_args: HashMap<String, String> = args
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for image in base_images(dockerfile, &build_args) {
        let again: Reference = image
            .whole()
            .parse()
            .expect("a found reference parses again");
        assert_eq!(again.whole(), image.whole());
    }
}

/// `image` as a reference whose full form (`whole()`, what a token is asked for and the
/// scheduler and builder name) is itself valid. The short form parser accepts some names the
/// full form refuses, e.g. an upper-case repository (`Fnux/app` gives `docker.io/Fnux/app:latest`,
/// which no registry serves): found by the `dockerfile_from` fuzz target.
fn parse_reference(image: &str) -> Option<Reference> {
    let reference = crate::parse_reference(image).ok()?;
    crate::parse_reference(&reference.whole()).ok()?;
    Some(reference)
}

fn unquote(value: &str) -> String {
    let quoted = |q: char| value.len() >= 2 && value.starts_with(q) && value.ends_with(q);
    if quoted('"') || quoted('\'') {
        value[1..value.len() - 1].to_string()
    } else {
        value.to_string()
    }
}

/// Expands `$NAME`, `${NAME}`, `${NAME:-default}` and `${NAME:+alternative}` from `args` (an
/// undeclared name is empty, as in buildah). `None` for anything else (other modifiers, an
/// unclosed brace).
fn expand(text: &str, args: &HashMap<String, String>) -> Option<String> {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let lookup = |name: &str| args.get(name).map(String::as_str).unwrap_or_default();
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(['$', '\\']) {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(escaped) = tail.strip_prefix('\\') {
            let next = escaped.chars().next()?;
            out.push(next);
            rest = &escaped[next.len_utf8()..];
            continue;
        }
        let after = &tail[1..];
        if let Some(braced) = after.strip_prefix('{') {
            let close = braced.find('}')?;
            let inner = &braced[..close];
            let value = match inner.split_once(':') {
                None => lookup(inner).to_string(),
                Some((name, word)) if word.starts_with('-') => match lookup(name) {
                    "" => word[1..].to_string(),
                    set => set.to_string(),
                },
                Some((name, word)) if word.starts_with('+') => match lookup(name) {
                    "" => String::new(),
                    _ => word[1..].to_string(),
                },
                Some(_) => return None,
            };
            out.push_str(&value);
            rest = &braced[close + 1..];
        } else {
            let end = after.find(|c: char| !is_name(c)).unwrap_or(after.len());
            if end == 0 {
                out.push('$');
            } else {
                out.push_str(lookup(&after[..end]));
            }
            rest = &after[end..];
        }
    }
    out.push_str(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(images: Vec<Reference>) -> Vec<String> {
        images.iter().map(|i| i.whole()).collect()
    }

    #[test]
    fn base_images_come_from_from_lines() {
        let digest = "a".repeat(64);
        let dockerfile = format!(
            "FROM 127.0.0.1:5000/base/busybox:1 AS build\n\
             RUN echo\n\
             from --platform=linux/amd64 registry.example/x/y@sha256:{digest}\n\
             FROM build\nFROM scratch\nFROM ${{BASE}}\nFROM busybox\n\
             FROM 127.0.0.1:5000/base/busybox:1\n"
        );
        assert_eq!(
            whole(base_images(&dockerfile, &HashMap::new())),
            vec![
                "127.0.0.1:5000/base/busybox:1".to_string(),
                format!("registry.example/x/y@sha256:{digest}"),
                "docker.io/library/busybox:latest".to_string(),
            ]
        );
    }

    /// Found by the `dockerfile_from` fuzz target: `Fnux/axmd3w2` parsed, but its full form
    /// `docker.io/Fnux/axmd3w2:latest` does not; such a name is no base image to fetch a
    /// credential for (buildah refuses it).
    #[test]
    fn names_whose_full_form_is_invalid_name_nothing() {
        let dockerfile = "FROM Fnux/axmd3w2\nFROM UPPER/Case:Tag\nFROM busybox:1\n";
        assert_eq!(
            whole(base_images(dockerfile, &HashMap::new())),
            vec!["docker.io/library/busybox:1".to_string()]
        );
        assert!(
            "Fnux/axmd3w2".parse::<Reference>().is_ok(),
            "still the parser's quirk"
        );
    }

    #[test]
    fn global_args_expand_with_build_args_over_their_defaults() {
        let dockerfile = "# syntax=docker/dockerfile:1\n\
             ARG REGISTRY=registry.example TAG=\"1.36\"\n\
             ARG BASE\n\
             FROM ${REGISTRY}/base/busybox:${TAG} AS tools\n\
             ARG STAGE_ONLY=ignored.example/x\n\
             FROM \\\n  $BASE\n\
             FROM ${UNSET:-fallback.example/y:2}\n\
             FROM registry.example/z${TAG:+-tagged}\n\
             FROM ${STAGE_ONLY}\n\
             FROM ${TOOLS_STAGE:-tools}\n";
        let defaults = whole(base_images(dockerfile, &HashMap::new()));
        assert_eq!(
            defaults,
            vec![
                "registry.example/base/busybox:1.36",
                "fallback.example/y:2",
                "registry.example/z-tagged:latest",
            ]
        );
        let args = HashMap::from([
            ("TAG".to_string(), "1.37".to_string()),
            ("BASE".to_string(), "other.example/b:3".to_string()),
            ("NOT_DECLARED".to_string(), "x".to_string()),
        ]);
        assert_eq!(
            whole(base_images(dockerfile, &args)),
            vec![
                "registry.example/base/busybox:1.37",
                "other.example/b:3",
                "fallback.example/y:2",
                "registry.example/z-tagged:latest",
            ]
        );
    }

    #[test]
    fn what_cannot_be_expanded_or_parsed_names_nothing() {
        let args = HashMap::new();
        assert!(base_images("ARG A=x\nFROM ${A:?unset}\n", &args).is_empty());
        assert!(base_images("FROM ${A\n", &args).is_empty());
        assert!(base_images("RUN echo no from\n", &args).is_empty());
        assert!(base_images("", &args).is_empty());
    }
}
