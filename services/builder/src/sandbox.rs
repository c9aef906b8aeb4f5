//! The sandbox a Dockerfile's `RUN` steps execute in: they run code the request brought, so by
//! default they get no network, run as unprivileged host users in a user namespace, and see only
//! the image's own filesystem.
//!
//! [`SandboxConfig`] is the policy (`[builder.sandbox]`); [`Sandbox`] applies it to one build
//! ([`BuildSandbox`]): the buildah flags, the build's private `containers.conf`, a host id range
//! of its own, and the OCI runtime's state, from which containers a killed buildah left running
//! are removed when the build ends.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// How `RUN` steps are confined.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxConfig {
    /// `oci`: every `RUN` step is a container of the OCI runtime in its own user, mount, PID,
    /// IPC, UTS and network namespaces. `chroot`: buildah's chroot isolation, where a `RUN`
    /// step is real root in a chroot with the builder's network and processes in view;
    /// UNSAFE for Dockerfiles you do not trust, only for hosts that cannot run the OCI runtime.
    pub isolation: Isolation,
    /// The OCI runtime (`oci` isolation): a program name or path. runc; Debian's crun 1.8 fails
    /// on hosts with a hybrid cgroup layout.
    pub runtime: PathBuf,
    /// Tenants whose `RUN` steps get a network (`tenant_network`); everyone else's get none.
    pub network_tenants: Vec<String>,
    /// The network `RUN` steps of `network_tenants` get: `private` (a namespace of their own
    /// behind NAT on a CNI bridge; needs the CNI plugins and iptables) or `host` (the builder's
    /// own network: every service the builder can reach, loopback included).
    pub tenant_network: TenantNetwork,
    /// First host uid and gid `RUN` steps' users map to (`oci` isolation). The default range is
    /// the one an `/etc/subuid` and `/etc/subgid` line `containers:2147483647:2147483648`
    /// reserves, so no host account is given these ids.
    pub id_range_start: u32,
    /// How many host ids the range holds.
    pub id_range_count: u32,
    /// Host ids each build maps (uids and gids 0..n inside); concurrent builds get disjoint
    /// ranges.
    pub ids_per_build: u32,
}

/// How buildah runs `RUN` steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    Oci,
    Chroot,
}

/// The network of a tenant allowed one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TenantNetwork {
    Private,
    Host,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            isolation: Isolation::Oci,
            runtime: "runc".into(),
            network_tenants: Vec::new(),
            tenant_network: TenantNetwork::Private,
            id_range_start: 2_147_483_647,
            id_range_count: 2_147_483_648,
            ids_per_build: 65_536,
        }
    }
}

impl SandboxConfig {
    /// How many builds can hold an id range at once.
    fn slots(&self) -> Result<usize, String> {
        let end = u64::from(self.id_range_start) + u64::from(self.id_range_count);
        if self.ids_per_build == 0 || end > u64::from(u32::MAX) {
            return Err(format!(
                "builder.sandbox: ids_per_build must be positive and id_range_start + \
                 id_range_count at most {} (uid {} is invalid)",
                u32::MAX,
                u32::MAX
            ));
        }
        match self.id_range_count / self.ids_per_build {
            0 => Err("builder.sandbox: id_range_count is smaller than ids_per_build".into()),
            n => Ok(n as usize),
        }
    }
}

/// The sandbox of every build of this builder: its policy, and which id ranges are in use.
pub struct Sandbox {
    config: SandboxConfig,
    /// `true` for each id range a running build holds.
    in_use: Mutex<Vec<bool>>,
}

/// Whether every id of `first..end` is one the user namespace described by `map` (the text of
/// `/proc/self/uid_map`: `inside outside count` per line) maps.
fn maps_all(map: &str, first: u64, end: u64) -> bool {
    map.lines().any(|line| {
        let fields: Vec<u64> = line
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        matches!(fields[..], [inside, _, count] if inside <= first && end <= inside + count)
    })
}

/// Refuses a range of ids the builder's own user namespace does not map: in a pod with
/// `hostUsers: false` (or any user namespace) every step would fail to start, late and
/// obscurely, so the builder says so at start instead.
fn check_mapped(config: &SandboxConfig, slots: usize) -> Result<(), String> {
    let first = u64::from(config.id_range_start);
    let end = first + slots as u64 * u64::from(config.ids_per_build);
    for map in ["uid_map", "gid_map"] {
        // No /proc (not Linux, or not mounted): nothing to check against.
        let Ok(text) = std::fs::read_to_string(format!("/proc/self/{map}")) else {
            continue;
        };
        if !maps_all(&text, first, end) {
            return Err(format!(
                "builder.sandbox: ids {first}..{end} (id_range_start, and ids_per_build for each \
                 of {slots} builds) are not all mapped in the builder's user namespace \
                 ({map}: {}); give the builder more ids or lower id_range_start, \
                 id_range_count or ids_per_build (docs/deploy.md)",
                text.split_whitespace().collect::<Vec<_>>().join(" ")
            ));
        }
    }
    Ok(())
}

impl Sandbox {
    pub fn new(config: SandboxConfig) -> Result<Self, String> {
        let slots = match config.isolation {
            Isolation::Oci => {
                let slots = config.slots()?;
                check_mapped(&config, slots)?;
                slots
            }
            Isolation::Chroot => 0,
        };
        Ok(Self {
            config,
            in_use: Mutex::new(vec![false; slots]),
        })
    }

    pub fn isolation(&self) -> Isolation {
        self.config.isolation
    }

    /// The sandbox of one build of `tenant`, with a host id range no other build of this builder
    /// holds until it is dropped. `state` is where the OCI runtime keeps its containers.
    pub fn enter(&self, tenant: &str, state: PathBuf) -> Result<BuildSandbox<'_>, String> {
        let config = &self.config;
        let network = match config.isolation {
            Isolation::Chroot => Network::Builder,
            Isolation::Oci if config.network_tenants.iter().any(|t| t == tenant) => {
                match config.tenant_network {
                    TenantNetwork::Private => Network::Private,
                    TenantNetwork::Host => Network::Builder,
                }
            }
            Isolation::Oci => Network::None,
        };
        let ids = match config.isolation {
            Isolation::Chroot => None,
            Isolation::Oci => Some(self.take_ids()?),
        };
        Ok(BuildSandbox {
            sandbox: self,
            network,
            ids,
            state,
        })
    }

    /// Removes every container the OCI runtime still lists in `state`: a `RUN` step's processes
    /// are not in buildah's process group, so a build killed at its deadline or dropped at
    /// shutdown, or a builder killed outright, would leave its step running.
    pub fn remove_containers(&self, state: &Path) {
        let Ok(entries) = std::fs::read_dir(state) else {
            return;
        };
        for entry in entries.flatten() {
            let id = entry.file_name();
            let removed = std::process::Command::new(&self.config.runtime)
                .arg("--root")
                .arg(state)
                .args(["--rootless", "true", "delete", "--force"])
                .arg(&id)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
            tracing::info!(container = ?id, ?removed, "removed a container a build left");
        }
    }

    fn take_ids(&self) -> Result<IdRange, String> {
        let mut in_use = self.in_use.lock().expect("id ranges lock");
        let slot = in_use
            .iter()
            .position(|used| !used)
            .ok_or("every host id range of builder.sandbox is in use by a build")?;
        in_use[slot] = true;
        let size = self.config.ids_per_build;
        Ok(IdRange {
            slot,
            first: self.config.id_range_start + slot as u32 * size,
            size,
        })
    }
}

/// The network of a build's `RUN` steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// A network namespace with only loopback.
    None,
    /// A namespace of their own behind NAT.
    Private,
    /// The builder's (chroot isolation, or `tenant_network = "host"`).
    Builder,
}

/// Host ids `first..first + size` map to ids `0..size` inside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    slot: usize,
    pub first: u32,
    pub size: u32,
}

/// One build's confinement; gives its id range back and removes the containers it left when
/// dropped.
pub struct BuildSandbox<'a> {
    sandbox: &'a Sandbox,
    pub network: Network,
    pub ids: Option<IdRange>,
    state: PathBuf,
}

impl BuildSandbox<'_> {
    /// Global buildah flags: the storage's id mapping, so images are unpacked already owned by
    /// the mapped ids and every container of the build runs in a user namespace with them.
    pub fn global_args(&self) -> Vec<String> {
        let Some(ids) = self.ids else {
            return Vec::new();
        };
        let map = format!("0:{}:{}", ids.first, ids.size);
        let args = ["--userns-uid-map", &map, "--userns-gid-map", &map];
        args.map(String::from).to_vec()
    }

    /// `buildah bud` flags that say how `RUN` steps run.
    pub fn bud_args(&self) -> Vec<String> {
        let config = &self.sandbox.config;
        if config.isolation == Isolation::Chroot {
            return ["--isolation", "chroot"].map(String::from).to_vec();
        }
        let network = match self.network {
            Network::None => "none",
            Network::Private => "private",
            Network::Builder => "host",
        };
        let mut args: Vec<String> = ["--isolation", "oci", "--runtime"]
            .map(String::from)
            .to_vec();
        args.push(config.runtime.display().to_string());
        args.push("--runtime-flag".into());
        args.push(format!("root={}", self.state.display()));
        // runc's `--rootless true` only makes a cgroup it cannot create (a read-only cgroupfs,
        // as in most pods) not an error: the step then stays in the builder's cgroup.
        args.extend(["--runtime-flag".into(), "rootless=true".into()]);
        args.extend(["--network".into(), network.into()]);
        // The builder's own proxy settings are for its registry traffic; only a build with a
        // network has any use for them.
        if self.network == Network::None {
            args.push("--http-proxy=false".into());
        }
        args
    }

    /// The build's `containers.conf` (`CONTAINERS_CONF`, which makes buildah read no other).
    pub fn containers_conf(&self) -> String {
        let mut conf = String::new();
        // containers/common's default ulimits can exceed the host's hard limits, which fails
        // every RUN step; the builder's own limits are inherited instead.
        conf.push_str("[containers]\ndefault_ulimits = []\n\n[engine]\n");
        // cgroupfs: the systemd manager needs a systemd and D-Bus the builder may not have.
        conf.push_str("cgroup_manager = \"cgroupfs\"\n");
        let runtime = self.sandbox.config.runtime.display().to_string();
        let runtime = runtime.replace(['"', '\\', '\n'], "");
        let _ = writeln!(conf, "runtime = \"{runtime}\"");
        conf
    }

    /// What a failed build's message says about the sandbox, so a `RUN` step that failed for
    /// lack of network or privilege says why.
    pub fn describe(&self) -> String {
        let config = &self.sandbox.config;
        let network = match self.network {
            Network::None => "no network (the tenant is not in builder.sandbox.network_tenants)",
            Network::Private => "a private network",
            Network::Builder => "the builder's network",
        };
        match self.ids {
            None => format!("RUN steps ran as root in a chroot with {network}"),
            Some(ids) => format!(
                "RUN steps ran in the {} sandbox with {network}, as host ids {}-{} in a user \
                 namespace, seeing only the image's files",
                config.runtime.display(),
                ids.first,
                ids.first + (ids.size - 1)
            ),
        }
    }
}

impl Drop for BuildSandbox<'_> {
    fn drop(&mut self) {
        self.sandbox.remove_containers(&self.state);
        if let Some(ids) = self.ids {
            self.sandbox.in_use.lock().expect("id ranges lock")[ids.slot] = false;
        }
    }
}

/// Whether every directory above `dir` lets others search it: the OCI runtime prepares a `RUN`
/// step's root filesystem as the step's mapped root user, which must reach it by path.
pub fn check_searchable(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    for ancestor in dir.ancestors().skip(1) {
        let Ok(meta) = std::fs::metadata(ancestor) else {
            continue;
        };
        if meta.permissions().mode() & 0o001 == 0 {
            return Err(format!(
                "{} (above builder.storage_dir {}) has mode {:o}: RUN steps run as unprivileged \
                 host users, which need search permission (o+x) on every directory above the \
                 build directories",
                ancestor.display(),
                dir.display(),
                meta.permissions().mode() & 0o7777
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(edit: impl FnOnce(&mut SandboxConfig)) -> Sandbox {
        let mut config = SandboxConfig::default();
        edit(&mut config);
        Sandbox::new(config).unwrap()
    }

    #[test]
    fn by_default_run_steps_get_no_network_and_their_own_host_ids() {
        let sandbox = sandbox(|_| {});
        let a = sandbox.enter("default", "/b/a/runtime".into()).unwrap();
        let b = sandbox.enter("default", "/b/b/runtime".into()).unwrap();
        assert_eq!(a.network, Network::None);
        assert_eq!(
            a.bud_args().join(" "),
            "--isolation oci --runtime runc --runtime-flag root=/b/a/runtime --runtime-flag \
             rootless=true --network none --http-proxy=false"
        );
        assert_eq!(
            a.global_args().join(" "),
            "--userns-uid-map 0:2147483647:65536 --userns-gid-map 0:2147483647:65536"
        );
        // Concurrent builds never share host ids; a finished build's range is reused.
        assert_eq!(b.ids.unwrap().first, 2_147_483_647 + 65_536);
        drop(a);
        let c = sandbox.enter("default", "/b/c/runtime".into()).unwrap();
        assert_eq!(c.ids.unwrap().first, 2_147_483_647);
        assert!(c.describe().contains("no network"), "{}", c.describe());
    }

    #[test]
    fn only_listed_tenants_get_a_network() {
        let sandbox = sandbox(|c| c.network_tenants = vec!["online".into()]);
        let online = sandbox.enter("online", "/s".into()).unwrap();
        assert_eq!(online.network, Network::Private);
        assert!(online.bud_args().join(" ").contains("--network private"));
        assert!(
            !online
                .bud_args()
                .contains(&"--http-proxy=false".to_string())
        );
        let other = sandbox.enter("online-not", "/s".into()).unwrap();
        assert_eq!(other.network, Network::None);
        let host = super::Sandbox::new(SandboxConfig {
            network_tenants: vec!["online".into()],
            tenant_network: TenantNetwork::Host,
            ..Default::default()
        })
        .unwrap();
        let online = host.enter("online", "/s".into()).unwrap();
        assert!(online.bud_args().join(" ").contains("--network host"));
    }

    #[test]
    fn chroot_is_only_used_when_configured_and_maps_nothing() {
        let sandbox = sandbox(|c| c.isolation = Isolation::Chroot);
        let build = sandbox.enter("default", "/s".into()).unwrap();
        assert_eq!(build.bud_args(), ["--isolation", "chroot"]);
        assert!(build.global_args().is_empty());
        assert_eq!(build.network, Network::Builder);
    }

    #[test]
    fn the_id_range_must_be_mapped_in_the_builders_user_namespace() {
        // The initial user namespace maps every id but the last.
        let host = "         0          0 4294967295\n";
        assert!(maps_all(host, 2_147_483_647, 4_294_967_295));
        // A pod with `hostUsers: false` and 65536 ids: only 0..65536.
        let pod = "         0 1879048192      65536\n";
        assert!(!maps_all(pod, 2_147_483_647, 2_147_549_183));
        assert!(!maps_all(pod, 65_536, 131_072));
        assert!(maps_all(pod, 1_000, 65_536));
        // A pod given more ids (the kubelet's idsPerPod).
        let larger = "0 1879048192 327680\n";
        assert!(maps_all(larger, 65_536, 327_680));
        assert!(!maps_all("", 0, 1));
    }

    #[test]
    fn the_id_range_must_fit_and_runs_out_clearly() {
        let bad = SandboxConfig {
            id_range_start: u32::MAX - 10,
            ..Default::default()
        };
        assert!(Sandbox::new(bad).is_err());
        let two = sandbox(|c| {
            c.id_range_count = 20;
            c.ids_per_build = 10;
        });
        let _a = two.enter("t", "/s".into()).unwrap();
        let _b = two.enter("t", "/s".into()).unwrap();
        let third = two.enter("t", "/s".into()).err().unwrap();
        assert!(third.contains("in use"), "{third}");
    }

    #[test]
    fn the_containers_conf_sets_no_ulimits_cgroupfs_and_the_runtime() {
        let sandbox = sandbox(|c| c.runtime = "/usr/bin/runc".into());
        let conf = sandbox.enter("t", "/s".into()).unwrap().containers_conf();
        assert!(conf.contains("default_ulimits = []"), "{conf}");
        assert!(conf.contains("cgroup_manager = \"cgroupfs\""), "{conf}");
        assert!(conf.contains("runtime = \"/usr/bin/runc\""), "{conf}");
    }

    #[test]
    fn storage_must_be_reachable_by_unprivileged_users() {
        use std::os::unix::fs::PermissionsExt;
        let top = tempfile::tempdir().unwrap();
        let storage = top.path().join("storage");
        std::fs::create_dir(&storage).unwrap();
        std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let err = check_searchable(&storage).unwrap_err();
        assert!(err.contains("o+x"), "{err}");
        std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        check_searchable(&storage).unwrap();
    }
}
