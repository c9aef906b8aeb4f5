//! Build-argument values out of the pushed image.
//!
//! buildah, like docker, records the build arguments a `RUN` step saw in that step's history
//! entry (`|1 TOKEN=<value> /bin/sh -c ...`), and the history is part of the image config that
//! anyone who may pull the image reads. Build arguments are often used for secrets, and a request
//! has them redacted everywhere else, so before the push the builder rewrites the history of the
//! OCI layout buildah wrote: every `NAME=<value>` of a build argument with a value becomes
//! `NAME=<redacted>`. The config, and so the manifest, get new digests; the layers are untouched.
//! What a step wrote into its files (or `ENV NAME=$NAME`) is the Dockerfile's doing and stays.

use std::path::Path;

use sha2::{Digest, Sha256};

use crate::failure::Failure;
use crate::layout_push::blob_path;

/// What a value becomes in the history.
pub const REDACTED: &str = "<redacted>";

/// Rewrites the history of the image in the OCI layout at `layout`; returns whether anything
/// was redacted.
pub fn redact_layout(layout: &Path, build_args: &[(String, String)]) -> Result<bool, Failure> {
    let pairs: Vec<(String, String)> = build_args
        .iter()
        .filter(|(_, value)| !value.is_empty())
        .map(|(name, value)| (format!("{name}={value}"), format!("{name}={REDACTED}")))
        .collect();
    if pairs.is_empty() {
        return Ok(false);
    }
    let index_path = layout.join("index.json");
    let mut index = read_json(&index_path)?;
    let manifest_digest = digest_of(&index["manifests"][0])?;
    let mut manifest = read_json(&blob_path(layout, &manifest_digest)?)?;
    let config_digest = digest_of(&manifest["config"])?;
    let mut config = read_json(&blob_path(layout, &config_digest)?)?;

    let mut changed = false;
    if let Some(history) = config["history"].as_array_mut() {
        for entry in history {
            let Some(created_by) = entry["created_by"].as_str() else {
                continue;
            };
            let mut redacted = created_by.to_string();
            for (plain, hidden) in &pairs {
                redacted = redacted.replace(plain, hidden);
            }
            if redacted != created_by {
                entry["created_by"] = serde_json::Value::String(redacted);
                changed = true;
            }
        }
    }
    if !changed {
        return Ok(false);
    }
    let (digest, size) = write_blob(layout, &config)?;
    manifest["config"]["digest"] = digest.into();
    manifest["config"]["size"] = size.into();
    let (digest, size) = write_blob(layout, &manifest)?;
    index["manifests"][0]["digest"] = digest.into();
    index["manifests"][0]["size"] = size.into();
    let bytes = serde_json::to_vec(&index).map_err(internal)?;
    std::fs::write(&index_path, bytes).map_err(internal)?;
    Ok(true)
}

/// Stores `value` as a blob of the layout; returns its digest and size.
fn write_blob(layout: &Path, value: &serde_json::Value) -> Result<(String, u64), Failure> {
    let bytes = serde_json::to_vec(value).map_err(internal)?;
    let digest = format!("sha256:{:x}", Sha256::digest(&bytes));
    std::fs::write(blob_path(layout, &digest)?, &bytes).map_err(internal)?;
    Ok((digest, bytes.len() as u64))
}

fn digest_of(descriptor: &serde_json::Value) -> Result<String, Failure> {
    descriptor["digest"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| Failure::internal("the built image has a descriptor without a digest"))
}

fn read_json(path: &Path) -> Result<serde_json::Value, Failure> {
    let bytes = std::fs::read(path).map_err(internal)?;
    serde_json::from_slice(&bytes).map_err(internal)
}

fn internal(err: impl std::fmt::Display) -> Failure {
    Failure::internal(format!("cannot rewrite the built image's history: {err}"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A layout with one image whose config has `history`.
    fn layout(dir: &Path, history: serde_json::Value) -> String {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        let config = json!({"architecture": "amd64", "os": "linux", "history": history});
        let (config_digest, config_size) = write_blob(dir, &config).unwrap();
        let manifest = json!({
            "schemaVersion": 2,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest, "size": config_size},
            "layers": [],
        });
        let (digest, size) = write_blob(dir, &manifest).unwrap();
        let index = json!({"schemaVersion": 2, "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": size}
        ]});
        std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
        digest
    }

    /// The layout's config, found through index and manifest, checking every digest.
    fn config(dir: &Path) -> serde_json::Value {
        let index = read_json(&dir.join("index.json")).unwrap();
        let digest = digest_of(&index["manifests"][0]).unwrap();
        let bytes = std::fs::read(blob_path(dir, &digest).unwrap()).unwrap();
        assert_eq!(format!("sha256:{:x}", Sha256::digest(&bytes)), digest);
        let manifest: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let digest = digest_of(&manifest["config"]).unwrap();
        let bytes = std::fs::read(blob_path(dir, &digest).unwrap()).unwrap();
        assert_eq!(format!("sha256:{:x}", Sha256::digest(&bytes)), digest);
        assert_eq!(manifest["config"]["size"], bytes.len() as u64);
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn build_arg_values_leave_the_history_and_the_digests_still_hold() {
        let dir = tempfile::tempdir().unwrap();
        let before = layout(
            dir.path(),
            json!([
                {"created_by": "/bin/sh -c #(nop) ARG TOKEN"},
                {"created_by": "|2 MODE=fast TOKEN=s3cret-v /bin/sh -c make"},
                {"empty_layer": true},
            ]),
        );
        let args = [
            ("MODE".to_string(), "fast".to_string()),
            ("TOKEN".to_string(), "s3cret-v".to_string()),
            ("UNUSED".to_string(), String::new()),
        ];
        assert!(redact_layout(dir.path(), &args).unwrap());
        let history = config(dir.path())["history"].clone();
        assert_eq!(
            history[1]["created_by"],
            "|2 MODE=<redacted> TOKEN=<redacted> /bin/sh -c make"
        );
        assert_eq!(history[0]["created_by"], "/bin/sh -c #(nop) ARG TOKEN");
        let index = read_json(&dir.path().join("index.json")).unwrap();
        assert_ne!(index["manifests"][0]["digest"], before);
        // Nothing to redact: the layout is left as buildah wrote it.
        let untouched = tempfile::tempdir().unwrap();
        let digest = layout(untouched.path(), json!([{"created_by": "/bin/sh -c true"}]));
        assert!(!redact_layout(untouched.path(), &args).unwrap());
        assert!(!redact_layout(untouched.path(), &[]).unwrap());
        let index = read_json(&untouched.path().join("index.json")).unwrap();
        assert_eq!(index["manifests"][0]["digest"], digest);
    }
}
