//! Build arguments reach buildah through its environment, never its command line: a command
//! line is world-readable in `/proc` and ends up in process listings and audit logs, while
//! `--build-arg NAME` (no value) makes buildah read the value from its own environment, which
//! only root can read.
//!
//! That environment is also buildah's own, so a name that buildah, the Go runtime, the C library
//! or the OCI runtime read for themselves (`LD_PRELOAD`, `HTTPS_PROXY`, `TMPDIR`,
//! `CONTAINERS_CONF`, ...) would let a request reconfigure the builder; such names are refused.
//! The list covers what those programs read today; it is a deny list, so a variable a later
//! buildah starts to read needs adding here.

/// Exact names buildah's process must not take from a request.
const RESERVED: &[&str] = &[
    // The builder's own settings for buildah.
    "PATH",
    "HOME",
    "TMPDIR",
    // Go runtime and libraries.
    "GODEBUG",
    "GOGC",
    "GOMAXPROCS",
    "GOMEMLIMIT",
    "GOTRACEBACK",
    "GORACE",
    "GOROOT",
    "GOCOVERDIR",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "TZ",
    "ZONEINFO",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
    "FTP_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "all_proxy",
    "ftp_proxy",
    "REQUEST_METHOD",
    // The C library (buildah is linked against it) and the resolver.
    "GCONV_PATH",
    "LOCPATH",
    "NLSPATH",
    "HOSTALIASES",
    "LOCALDOMAIN",
    "RES_OPTIONS",
    "TZDIR",
    // Signature verification (gpgme).
    "GNUPGHOME",
    // Passed on to the OCI runtime and into the container by it.
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
];

/// Prefixes of families of such names.
const RESERVED_PREFIXES: &[&str] = &[
    "LD_",
    "GLIBC_",
    "MALLOC_",
    "CONTAINERS_",
    "_CONTAINERS_",
    "BUILDAH_",
    "_BUILDAH_",
    "STORAGE_",
    "REGISTRY_",
    "REGISTRIES_",
    "DOCKER_",
    "XDG_",
    "DBUS_",
    // The network plugins of a tenant's private network, and the iptables they run.
    "CNI_",
    "NETAVARK_",
    "XTABLES_",
    "GPG_",
];

/// Whether `args` can be handed to buildah through its environment; why not, when not.
pub fn check(args: &[(String, String)]) -> Result<(), String> {
    for (name, value) in args {
        if !is_identifier(name) {
            return Err(format!(
                "build arg {name:?} is not a valid name ([A-Za-z_][A-Za-z0-9_]*)"
            ));
        }
        if value.contains('\0') {
            return Err(format!("build arg {name} holds a NUL byte"));
        }
        if is_reserved(name) {
            return Err(format!(
                "build arg {name} is reserved: build args are passed to buildah in its \
                 environment, where {name} would change how the builder itself runs"
            ));
        }
    }
    Ok(())
}

fn is_identifier(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn is_reserved(name: &str) -> bool {
    RESERVED.contains(&name) || RESERVED_PREFIXES.iter().any(|p| name.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn ordinary_names_pass() {
        check(&args(&[("VERSION", "1.2"), ("_x9", ""), ("GOOD", "a=b c")])).unwrap();
    }

    #[test]
    fn names_that_steer_the_builder_are_refused() {
        for name in [
            "LD_PRELOAD",
            "HTTPS_PROXY",
            "https_proxy",
            "TMPDIR",
            "CONTAINERS_CONF",
            "_CONTAINERS_USERNS_CONFIGURED",
            "REGISTRY_AUTH_FILE",
            "BUILDAH_ISOLATION",
            "GODEBUG",
            "NOTIFY_SOCKET",
        ] {
            let err = check(&args(&[(name, "x")])).unwrap_err();
            assert!(err.contains("reserved"), "{name}: {err}");
        }
    }

    #[test]
    fn malformed_names_and_values_are_refused() {
        for name in ["", "1ABC", "A=B", "A B", "A-B", "Ä"] {
            assert!(check(&args(&[(name, "x")])).is_err(), "{name:?}");
        }
        assert!(check(&args(&[("A", "x\0y")])).is_err());
    }
}
