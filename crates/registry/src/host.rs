//! Registry host names: normalisation and exact matching.
//!
//! Matching is exact after normalisation, never by suffix or substring, so a credential for
//! `123.dkr.ecr.us-east-1.amazonaws.com` is never handed to
//! `123.dkr.ecr.us-east-1.amazonaws.com.attacker.net`.

use std::net::IpAddr;

/// The canonical name of Docker Hub.
pub const DOCKER_HUB: &str = "docker.io";

const DOCKER_HUB_ALIASES: &[&str] = &[
    "docker.io",
    "index.docker.io",
    "registry-1.docker.io",
    "registry.hub.docker.com",
];

/// Normalises a registry host as written in configs and image references: drops a URL scheme,
/// a trailing path (`https://index.docker.io/v1/`), lowercases, and maps Docker Hub aliases to
/// `docker.io`. The port is kept: `host:5000` and `host` are different registries.
pub fn normalize(host: &str) -> String {
    let host = host.trim();
    let host = host
        .strip_prefix("https://")
        .or_else(|| host.strip_prefix("http://"))
        .unwrap_or(host);
    let host = host.split('/').next().unwrap_or("").to_ascii_lowercase();
    if DOCKER_HUB_ALIASES.contains(&host.as_str()) {
        DOCKER_HUB.to_string()
    } else {
        host
    }
}

/// True when both name the same registry.
pub fn same_registry(a: &str, b: &str) -> bool {
    normalize(a) == normalize(b)
}

/// The host part without the port (handles `[::1]:5000`).
pub fn hostname(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    }
}

/// Loopback registries are spoken to over plain HTTP, as Docker does for `localhost`.
pub fn is_loopback(host: &str) -> bool {
    let name = hostname(host);
    name == "localhost" || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_aliases_are_one_registry() {
        for alias in [
            "docker.io",
            "index.docker.io",
            "https://index.docker.io/v1/",
            "registry-1.docker.io",
            "Registry.Hub.Docker.com",
        ] {
            assert_eq!(normalize(alias), DOCKER_HUB, "{alias}");
        }
    }

    #[test]
    fn matching_is_exact() {
        let ecr = "123456789012.dkr.ecr.us-east-1.amazonaws.com";
        assert!(same_registry(ecr, &format!("https://{ecr}")));
        assert!(!same_registry(ecr, &format!("{ecr}.attacker.net")));
        assert!(!same_registry(
            "registry.example.com",
            "registry.example.com.attacker.net"
        ));
        assert!(!same_registry(
            "amazonaws.com",
            "evil-amazonaws.com.example"
        ));
        assert!(!same_registry("host:5000", "host"));
        assert!(same_registry("HOST:5000", "host:5000"));
    }

    #[test]
    fn loopback_hosts() {
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("localhost:5000"));
        assert!(is_loopback("[::1]:5000"));
        assert!(!is_loopback("registry.example.com"));
        assert!(!is_loopback("127.0.0.1.example.com:5000"));
        assert_eq!(hostname("[::1]:5000"), "::1");
        assert_eq!(hostname("r.example:443"), "r.example");
    }
}
