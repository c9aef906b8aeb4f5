//! What a Dockerfile builds from: the images of its `FROM` lines.

use crate::Reference;

/// The images a Dockerfile starts from (`FROM` lines), skipping `scratch`, earlier stages and
/// references built from `ARG`s (resolved by buildah, pulled anonymously).
pub fn base_images(dockerfile: &str) -> Vec<Reference> {
    let mut stages = Vec::new();
    let mut images: Vec<Reference> = Vec::new();
    for line in dockerfile.lines() {
        let mut words = line.split_whitespace();
        if !words.next().is_some_and(|w| w.eq_ignore_ascii_case("FROM")) {
            continue;
        }
        let rest: Vec<&str> = words.filter(|w| !w.starts_with("--")).collect();
        let Some(image) = rest.first() else { continue };
        let lower = image.to_ascii_lowercase();
        // Checked before this line's own `AS name` joins the stages.
        let earlier_stage = stages.contains(&lower);
        if let [_, as_word, name] = rest.as_slice()
            && as_word.eq_ignore_ascii_case("AS")
        {
            stages.push(name.to_ascii_lowercase());
        }
        if lower == "scratch" || image.contains('$') || earlier_stage {
            continue;
        }
        if let Ok(reference) = image.parse::<Reference>()
            && !images.iter().any(|i| i.whole() == reference.whole())
        {
            images.push(reference);
        }
    }
    images
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let images: Vec<String> = base_images(&dockerfile).iter().map(|i| i.whole()).collect();
        assert_eq!(
            images,
            vec![
                "127.0.0.1:5000/base/busybox:1".to_string(),
                format!("registry.example/x/y@sha256:{digest}"),
                "docker.io/library/busybox:latest".to_string(),
            ]
        );
    }
}
