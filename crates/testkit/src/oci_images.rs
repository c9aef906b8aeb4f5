//! OCI test images built locally with `umoci` and pushed with `skopeo`: no network, no daemon.
//!
//! An [`OciLayout`] is a temporary OCI image layout holding any number of tagged images. Build
//! layers with [`OciLayout::insert`] (plus `--opaque`/`--whiteout` variants), or unpack, edit
//! and [`OciLayout::repack`] to let umoci write whiteouts; tag one image as another to share its
//! layers; combine images into a multi-platform index; push to a registry with credentials.

use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

/// Runs a command and panics with its stderr when it fails.
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// True when umoci and skopeo are installed.
pub fn have_image_tools() -> bool {
    ["umoci", "skopeo"].iter().all(|tool| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// A temporary OCI image layout.
pub struct OciLayout {
    dir: TempDir,
    /// `<dir>/layout`, as text for umoci's arguments.
    layout: String,
}

impl Default for OciLayout {
    fn default() -> Self {
        Self::new()
    }
}

impl OciLayout {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("imagemesh-oci-")
            .tempdir()
            .expect("temp dir");
        let path = dir.path().join("layout");
        let layout = path.to_str().expect("utf-8 temp path").to_string();
        run("umoci", &["init", "--layout", &layout]);
        Self { dir, layout }
    }

    /// The layout directory.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(&self.layout)
    }

    /// A scratch directory inside the layout's temp dir (for sources and bundles).
    pub fn scratch(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::create_dir_all(&path).expect("scratch dir");
        path
    }

    fn image(&self, tag: &str) -> String {
        format!("{}:{tag}", self.layout)
    }

    /// An empty image (no layers) tagged `tag`.
    pub fn new_image(&self, tag: &str) {
        run("umoci", &["new", "--image", &self.image(tag)]);
    }

    /// Adds a layer with the contents of `src` at `dest` (e.g. "/").
    pub fn insert(&self, tag: &str, src: &Path, dest: &str) {
        let src = src.to_str().expect("utf-8 path");
        run("umoci", &["insert", "--image", &self.image(tag), src, dest]);
    }

    /// Adds a layer that makes `dest` opaque and fills it with `src`.
    pub fn insert_opaque(&self, tag: &str, src: &Path, dest: &str) {
        let src = src.to_str().expect("utf-8 path");
        run(
            "umoci",
            &["insert", "--image", &self.image(tag), "--opaque", src, dest],
        );
    }

    /// Adds a layer that only whites out `path`.
    pub fn whiteout(&self, tag: &str, path: &str) {
        run(
            "umoci",
            &["insert", "--image", &self.image(tag), "--whiteout", path],
        );
    }

    /// Tags the image `from` also as `to` (they share every layer).
    pub fn tag(&self, from: &str, to: &str) {
        run("umoci", &["tag", "--image", &self.image(from), to]);
    }

    /// Unpacks `tag` into `bundle` and returns its rootfs.
    pub fn unpack(&self, tag: &str, bundle: &Path) -> PathBuf {
        let out = bundle.to_str().expect("utf-8 path");
        run("umoci", &["unpack", "--image", &self.image(tag), out]);
        bundle.join("rootfs")
    }

    /// Adds a layer with the changes made to an unpacked `bundle` (whiteouts for deletions).
    pub fn repack(&self, tag: &str, bundle: &Path) {
        let out = bundle.to_str().expect("utf-8 path");
        run("umoci", &["repack", "--image", &self.image(tag), out]);
    }

    /// Sets the platform in `tag`'s config.
    pub fn set_platform(&self, tag: &str, os: &str, architecture: &str) {
        run(
            "umoci",
            &[
                "config",
                "--image",
                &self.image(tag),
                "--os",
                os,
                "--architecture",
                architecture,
            ],
        );
    }

    fn index_json(&self) -> serde_json::Value {
        let text = std::fs::read(self.path().join("index.json")).expect("index.json");
        serde_json::from_slice(&text).expect("index.json parses")
    }

    /// The descriptor `index.json` holds for `tag`.
    pub fn descriptor(&self, tag: &str) -> serde_json::Value {
        self.index_json()["manifests"]
            .as_array()
            .expect("manifests")
            .iter()
            .rev()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
            .unwrap_or_else(|| panic!("no tag {tag} in the layout"))
            .clone()
    }

    /// Digest of `tag`'s manifest (or index).
    pub fn digest(&self, tag: &str) -> String {
        self.descriptor(tag)["digest"]
            .as_str()
            .expect("digest")
            .to_string()
    }

    /// A blob of the layout.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let (alg, hex) = digest.split_once(':').expect("algorithm:hex");
        self.path().join("blobs").join(alg).join(hex)
    }

    /// The parsed JSON blob `digest` (a manifest, index or config).
    pub fn json_blob(&self, digest: &str) -> serde_json::Value {
        let bytes = std::fs::read(self.blob_path(digest)).expect("blob");
        serde_json::from_slice(&bytes).expect("JSON blob")
    }

    /// Tags a multi-platform image index over images already in the layout:
    /// `platforms` = (image tag, os, architecture).
    pub fn add_platform_index(&self, tag: &str, platforms: &[(&str, &str, &str)]) {
        let manifests: Vec<_> = platforms
            .iter()
            .map(|(image, os, arch)| {
                let mut d = self.descriptor(image);
                d.as_object_mut().expect("descriptor").remove("annotations");
                d["platform"] = serde_json::json!({"os": os, "architecture": arch});
                d
            })
            .collect();
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        });
        let bytes = serde_json::to_vec(&index).expect("index serialises");
        let tmp = self.dir.path().join("index.tmp");
        std::fs::write(&tmp, &bytes).expect("write index");
        let sum = run("sha256sum", &[tmp.to_str().expect("utf-8")]);
        let digest = format!("sha256:{}", &sum[..64]);
        std::fs::rename(&tmp, self.blob_path(&digest)).expect("store index blob");
        let mut top = self.index_json();
        top["manifests"]
            .as_array_mut()
            .expect("manifests")
            .push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "digest": digest,
                "size": bytes.len(),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }));
        std::fs::write(self.path().join("index.json"), top.to_string()).expect("index.json");
    }

    /// Pushes `tag` (every platform of an index) to `dest` (`host:port/repo:tag`) over plain
    /// HTTP with basic credentials.
    pub fn push(&self, tag: &str, dest: &str, username: &str, password: &str) {
        let creds = format!("{username}:{password}");
        let src = format!("oci:{}", self.image(tag));
        let dest = format!("docker://{dest}");
        run(
            "skopeo",
            &[
                "copy",
                "--all",
                "--dest-tls-verify=false",
                "--dest-creds",
                &creds,
                &src,
                &dest,
            ],
        );
    }
}
