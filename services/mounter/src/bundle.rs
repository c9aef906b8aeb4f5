//! OCI runtime bundles: what a runtime request ends with, ready for `runc run` / `crun run`.
//!
//! Next to the lazy read-only mount the mounter prepares `<bundle_root>/<mount id>/`:
//!
//! - `rootfs/`: overlayfs with the lazy mount as its lower layer and this bundle's `upper/` and
//!   `work/` directories, so the container can write (its writes stay in `upper/`, never reach
//!   the image or another container);
//! - `config.json`: an OCI runtime spec (`oci-spec`) from the image config: entrypoint + cmd
//!   (the request's `args` replace cmd), env (the request's `env` over the image's), working
//!   directory and user, the usual namespaces and mounts, and the container id as hostname.
//!
//! Unmounting removes the overlay and the whole bundle directory, upper layer included.

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use oci_spec::image::ImageConfiguration;
use oci_spec::runtime::{Spec, User};

/// The environment a container gets when its image sets none.
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What the container runs, from the image config and the request's overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    /// The image's `User` (`uid[:gid]` or names, resolved in the rootfs once it is mounted).
    pub user: String,
}

impl Process {
    /// Whether there is anything to run: an image that names no command (Entrypoint, Cmd),
    /// with a request that gives no args, is mounted without a bundle.
    pub fn runnable(&self) -> bool {
        !self.args.is_empty()
    }

    /// `config_json` is the image configuration blob; `args` replace its Cmd, `env` entries
    /// override its Env by name. `Err((true, why))` when the image is at fault, `(false, why)`
    /// when the request is.
    pub fn from_image(
        config_json: &[u8],
        args: &[String],
        env: &[String],
    ) -> Result<Self, (bool, String)> {
        let image: ImageConfiguration = serde_json::from_slice(config_json)
            .map_err(|e| (true, format!("the image config does not parse: {e}")))?;
        let config = image.config().clone().unwrap_or_default();
        let mut argv = config.entrypoint().clone().unwrap_or_default();
        if args.is_empty() {
            argv.extend(config.cmd().clone().unwrap_or_default());
        } else {
            argv.extend(args.iter().cloned());
        }
        let mut merged: BTreeMap<String, String> = BTreeMap::new();
        let mut order: Vec<String> = Vec::new();
        let image_env = config
            .env()
            .clone()
            .unwrap_or_else(|| vec![DEFAULT_PATH.into()]);
        for entry in image_env.iter().chain(env) {
            let (name, _) = entry.split_once('=').unwrap_or((entry, ""));
            if name.is_empty() {
                return Err((false, format!("env entry {entry:?} has no name")));
            }
            if merged.insert(name.to_string(), entry.clone()).is_none() {
                order.push(name.to_string());
            }
        }
        Ok(Self {
            args: argv,
            env: order.iter().map(|n| merged[n].clone()).collect(),
            cwd: config
                .working_dir()
                .clone()
                .filter(|d| !d.is_empty())
                .unwrap_or_else(|| "/".into()),
            user: config.user().clone().unwrap_or_default(),
        })
    }
}

/// The runtime spec of a bundle whose root filesystem is `rootfs` (mounted: user names are
/// looked up in its `/etc/passwd` and `/etc/group`).
pub fn runtime_spec(process: &Process, rootfs: &Path, hostname: &str) -> Result<Spec, String> {
    let (uid, gid) = resolve_user(&process.user, rootfs)?;
    let mut spec = Spec::default();
    spec.set_hostname(Some(hostname.to_string()));
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_path(PathBuf::from("rootfs"));
    root.set_readonly(Some(false));
    spec.set_root(Some(root));
    let mut proc = spec.process().clone().unwrap_or_default();
    proc.set_args(Some(process.args.clone()));
    proc.set_env(Some(process.env.clone()));
    proc.set_cwd(PathBuf::from(&process.cwd));
    proc.set_terminal(Some(false));
    let mut user = User::default();
    user.set_uid(uid);
    user.set_gid(gid);
    proc.set_user(user);
    spec.set_process(Some(proc));
    Ok(spec)
}

/// `uid[:gid]`, `name[:group]` or empty (root), as the OCI image spec defines `User`.
fn resolve_user(user: &str, rootfs: &Path) -> Result<(u32, u32), String> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (name, group) = match user.split_once(':') {
        Some((name, group)) => (name, Some(group)),
        None => (user, None),
    };
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap_or_default();
    let (uid, primary_gid) = match name.parse::<u32>() {
        // Not in /etc/passwd: group 0, as container engines do.
        Ok(uid) => (uid, lookup(&passwd, |f| f[2] == name).map_or(0, |f| f.1)),
        Err(_) => lookup(&passwd, |f| f[0] == name)
            .ok_or_else(|| format!("user {name:?} is not in the image's /etc/passwd"))?,
    };
    let gid = match group {
        None => primary_gid,
        Some(group) => match group.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                let groups = std::fs::read_to_string(rootfs.join("etc/group")).unwrap_or_default();
                groups
                    .lines()
                    .map(|l| l.split(':').collect::<Vec<_>>())
                    .find(|f| f.len() > 2 && f[0] == group)
                    .and_then(|f| f[2].parse().ok())
                    .ok_or_else(|| format!("group {group:?} is not in the image's /etc/group"))?
            }
        },
    };
    Ok((uid, gid))
}

/// The (uid, gid) of the first `/etc/passwd` line whose fields match.
fn lookup(passwd: &str, matches: impl Fn(&[&str]) -> bool) -> Option<(u32, u32)> {
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() > 3)
        .find(|f| matches(f))
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
}

/// Makes the bundle directory `dir` over the lazy mount `lower`: the overlay root filesystem,
/// then `config.json` for `process`. A failure leaves nothing behind.
pub fn create(dir: &Path, lower: &Path, process: &Process, hostname: &str) -> Result<(), String> {
    let made = create_in(dir, lower, process, hostname);
    if made.is_err() {
        remove(dir);
    }
    made
}

fn create_in(dir: &Path, lower: &Path, process: &Process, hostname: &str) -> Result<(), String> {
    let io = |what: &str, e: std::io::Error| format!("{what} in {}: {e}", dir.display());
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true).mode(0o700);
    for sub in ["upper", "work", "rootfs"] {
        builder
            .create(dir.join(sub))
            .map_err(|e| io("creating the bundle", e))?;
    }
    let rootfs = dir.join("rootfs");
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        dir.join("upper").display(),
        dir.join("work").display()
    );
    nix::mount::mount(
        Some("overlay"),
        &rootfs,
        Some("overlay"),
        MsFlags::MS_NODEV,
        Some(options.as_str()),
    )
    .map_err(|e| format!("mounting the overlay at {}: {e}", rootfs.display()))?;
    let spec = runtime_spec(process, &rootfs, hostname)?;
    spec.save(dir.join("config.json"))
        .map_err(|e| format!("writing {}/config.json: {e}", dir.display()))
}

/// Unmounts the bundle's overlay (detaching it when a process still uses it) and deletes the
/// bundle with its upper layer.
pub fn remove(dir: &Path) {
    let rootfs = dir.join("rootfs");
    if crate::mounts::mounts_under(dir).contains(&rootfs)
        && let Err(err) = nix::mount::umount2(&rootfs, MntFlags::empty())
    {
        tracing::warn!(rootfs = %rootfs.display(), error = %err, "overlay busy; detaching");
        let _ = nix::mount::umount2(&rootfs, MntFlags::MNT_DETACH);
    }
    match std::fs::remove_dir_all(dir) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            tracing::warn!(bundle = %dir.display(), error = %err, "bundle not removed")
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> Vec<u8> {
        format!(
            r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}},"config":{json}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn args_replace_cmd_and_env_overrides_by_name() {
        let image = config(
            r#"{"Entrypoint":["/bin/sh","-c"],"Cmd":["echo hi"],"Env":["PATH=/bin","A=1"],"WorkingDir":"/srv","User":"7:8"}"#,
        );
        let plain = Process::from_image(&image, &[], &[]).unwrap();
        assert_eq!(plain.args, ["/bin/sh", "-c", "echo hi"]);
        assert_eq!((plain.cwd.as_str(), plain.user.as_str()), ("/srv", "7:8"));
        let over = Process::from_image(
            &image,
            &["echo bye".to_string()],
            &["A=2".to_string(), "B=3".to_string()],
        )
        .unwrap();
        assert_eq!(over.args, ["/bin/sh", "-c", "echo bye"]);
        assert_eq!(over.env, ["PATH=/bin", "A=2", "B=3"]);
        let none = config(r#"{}"#);
        assert!(!Process::from_image(&none, &[], &[]).unwrap().runnable());
        let defaulted = Process::from_image(&none, &["/bin/true".into()], &[]).unwrap();
        assert_eq!(defaulted.env, [DEFAULT_PATH]);
        assert_eq!(defaulted.cwd, "/");
    }

    #[test]
    fn users_resolve_by_number_or_by_name_in_the_rootfs() {
        let rootfs = tempfile::tempdir().unwrap();
        std::fs::create_dir(rootfs.path().join("etc")).unwrap();
        std::fs::write(
            rootfs.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(rootfs.path().join("etc/group"), "staff:x:50:\n").unwrap();
        let at = rootfs.path();
        assert_eq!(resolve_user("", at), Ok((0, 0)));
        assert_eq!(resolve_user("app", at), Ok((1000, 1001)));
        assert_eq!(resolve_user("1000", at), Ok((1000, 1001)));
        assert_eq!(resolve_user("42", at), Ok((42, 0)));
        assert_eq!(resolve_user("app:staff", at), Ok((1000, 50)));
        assert_eq!(resolve_user("5:6", at), Ok((5, 6)));
        assert!(resolve_user("nobody-here", at).is_err());
    }
}
