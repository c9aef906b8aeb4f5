//! Images for build tests, made without a network: a busybox base image built with umoci from
//! Debian's `busybox-static`, pushed with skopeo; and pulling an image back to look inside it.
//!
//! Registry credentials go to skopeo in an auth file, not on its command line.

use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

fn run(program: &str, args: &[&str]) -> String {
    try_run(program, args).unwrap_or_else(|e| panic!("{e}"))
}

/// The command's stdout, or what it said on stderr when it failed.
fn try_run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    if !out.status.success() {
        return Err(format!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// A containers-auth.json for one registry, in `dir`.
fn auth_file(dir: &Path, registry: &str, username: &str, password: &str) -> PathBuf {
    use base64::Engine;
    let pair = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
    let body = serde_json::json!({ "auths": { registry: { "auth": pair } } });
    let path = dir.join("auth.json");
    std::fs::write(&path, body.to_string()).expect("write auth file");
    path
}

/// Pushes a busybox image (the static busybox and a `/bin` link per applet, so `RUN` steps
/// have a shell and the usual commands) to `registry/repository:tag`.
pub fn push_busybox(registry: &str, repository_tag: &str, username: &str, password: &str) {
    try_push_busybox(registry, repository_tag, username, password).unwrap_or_else(|e| panic!("{e}"))
}

/// Like [`push_busybox`]; a push the registry (or its token realm) refuses is an `Err` with
/// what skopeo said.
pub fn try_push_busybox(
    registry: &str,
    repository_tag: &str,
    username: &str,
    password: &str,
) -> Result<(), String> {
    let dir = tempfile::Builder::new()
        .prefix("imagemesh-busybox-")
        .tempdir()
        .expect("temp dir");
    let layout = dir.path().join("layout");
    let image = format!("{}:base", path_str(&layout));
    let bundle = dir.path().join("bundle");
    run("umoci", &["init", "--layout", path_str(&layout)]);
    run("umoci", &["new", "--image", &image]);
    run("umoci", &["unpack", "--image", &image, path_str(&bundle)]);
    let bin = bundle.join("rootfs/bin");
    std::fs::create_dir_all(&bin).expect("bin dir");
    std::fs::copy("/bin/busybox", bin.join("busybox")).expect("copy busybox (busybox-static)");
    for applet in run("/bin/busybox", &["--list"]).lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).expect("applet link");
        }
    }
    run("umoci", &["repack", "--image", &image, path_str(&bundle)]);
    run(
        "umoci",
        &[
            "config",
            "--image",
            &image,
            "--config.env",
            "PATH=/bin",
            "--config.cmd",
            "/bin/sh",
        ],
    );
    let auth = auth_file(dir.path(), registry, username, password);
    try_run(
        "skopeo",
        &[
            "copy",
            "--dest-tls-verify=false",
            "--dest-authfile",
            path_str(&auth),
            &format!("oci:{image}"),
            &format!("docker://{registry}/{repository_tag}"),
        ],
    )
    .map(drop)
}

/// An image pulled back from a registry and unpacked.
pub struct PulledImage {
    dir: TempDir,
    /// The image config (`config` holds Env, Entrypoint, Cmd, ...).
    pub config: serde_json::Value,
    /// The manifest as the registry serves it.
    pub manifest: serde_json::Value,
}

impl PulledImage {
    /// Pulls `registry/repository:tag` with skopeo and unpacks it with umoci.
    pub fn pull(registry: &str, repository_tag: &str, username: &str, password: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("imagemesh-pulled-")
            .tempdir()
            .expect("temp dir");
        let auth = auth_file(dir.path(), registry, username, password);
        let source = format!("docker://{registry}/{repository_tag}");
        let common = ["--tls-verify=false", "--authfile", path_str(&auth)];
        let inspect = |raw: &str| -> serde_json::Value {
            let mut args = vec!["inspect", raw];
            args.extend(common);
            args.push(&source);
            serde_json::from_str(&run("skopeo", &args)).expect("skopeo inspect output")
        };
        let config = inspect("--config");
        let manifest = inspect("--raw");
        let image = format!("{}:pulled", path_str(&dir.path().join("layout")));
        run(
            "skopeo",
            &[
                "copy",
                "--src-tls-verify=false",
                "--src-authfile",
                path_str(&auth),
                &source,
                &format!("oci:{image}"),
            ],
        );
        let bundle = dir.path().join("bundle");
        run("umoci", &["unpack", "--image", &image, path_str(&bundle)]);
        Self {
            dir,
            config,
            manifest,
        }
    }

    /// The unpacked root filesystem.
    pub fn rootfs(&self) -> PathBuf {
        self.dir.path().join("bundle/rootfs")
    }
}
