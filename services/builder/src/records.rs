//! The image-refs bucket: `<tenant>.<image id>` -> what was pushed (the seed's `v2ImageRefs`).
//! Image ids are per tenant: another tenant's build of the same id writes its own key.
//!
//! The record is also what makes a build idempotent: a request whose image id is already
//! recorded in its tenant at the same reference, from the same content ([`build_key`]: the
//! Dockerfile, the context's content digest, the build args and the source image), with a
//! manifest the registry still serves under that digest, is not built or pushed again. The same
//! image id with other content is built again and the record replaced.

use async_nats::jetstream::kv;
use imagemesh_proto::v1::{ContainerRequest, ImageRecord};
use imagemesh_runtime::status;
use imagemesh_runtime::streams::image_key;
use prost::Message;
use sha2::{Digest, Sha256};

use crate::failure::Failure;

/// The image-refs KV bucket.
pub struct Records {
    kv: kv::Store,
}

impl Records {
    pub fn new(kv: kv::Store) -> Self {
        Self { kv }
    }

    /// The record of `tenant`'s `image_id`, if there is one.
    pub async fn get(&self, tenant: &str, image_id: &str) -> Result<Option<ImageRecord>, Failure> {
        let entry = self
            .kv
            .get(image_key(tenant, image_id))
            .await
            .map_err(|e| {
                Failure::internal(format!("image-refs lookup of {image_id} failed: {e}"))
            })?;
        let Some(bytes) = entry else {
            return Ok(None);
        };
        // An unreadable record is treated as absent: the build then runs and rewrites it.
        Ok(ImageRecord::decode(bytes).ok())
    }

    /// Records what was pushed for `tenant`'s `image_id`.
    pub async fn put(
        &self,
        tenant: &str,
        image_id: &str,
        image_ref: &str,
        digest: &str,
        build_key: &str,
    ) -> Result<ImageRecord, Failure> {
        let record = ImageRecord {
            image_id: image_id.to_string(),
            image_ref: image_ref.to_string(),
            manifest_digest: digest.to_string(),
            build_key: build_key.to_string(),
            pushed_at: Some(status::now()),
            ..Default::default()
        };
        self.kv
            .put(image_key(tenant, image_id), record.encode_to_vec().into())
            .await
            .map_err(|e| Failure::internal(format!("could not record image {image_id}: {e}")))?;
        Ok(record)
    }
}

/// True when `record` says this exact image was already pushed as `image_ref` from the same
/// content (`build_key`) and the registry still has `registry_digest` there.
pub fn already_pushed(
    record: &ImageRecord,
    image_ref: &str,
    build_key: &str,
    registry_digest: Option<&str>,
) -> bool {
    !record.manifest_digest.is_empty()
        && record.image_ref == image_ref
        && record.build_key == build_key
        && registry_digest == Some(record.manifest_digest.as_str())
}

/// What a build is made from, as `sha256:<hex>`: the build image ref, the Dockerfile, the content
/// digest of the context (`None`: no context, or it is missing), the build args (names and
/// values, sorted) and the source image. Every field is length-prefixed, so no two different
/// requests hash the same bytes.
pub fn build_key(request: &ContainerRequest, context_digest: Option<&str>) -> String {
    let options = request.build_options.clone().unwrap_or_default();
    let mut hash = Sha256::new();
    let mut field = |bytes: &[u8]| {
        hash.update((bytes.len() as u64).to_le_bytes());
        hash.update(bytes);
    };
    field(b"imagemesh-build-key-v1");
    field(request.build_image_ref.as_bytes());
    field(options.dockerfile.as_bytes());
    field(context_digest.unwrap_or("").as_bytes());
    field(options.source_image.as_bytes());
    let mut args: Vec<_> = options.build_args.iter().collect();
    args.sort();
    field(&(args.len() as u64).to_le_bytes());
    for (name, value) in args {
        field(name.as_bytes());
        field(value.as_bytes());
    }
    let digest = hash.finalize();
    let mut out = String::from("sha256:");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_same_reference_content_and_digest_count_as_already_pushed() {
        let record = ImageRecord {
            image_id: "img".into(),
            image_ref: "r:5000/a/b:img".into(),
            manifest_digest: "sha256:1".into(),
            build_key: "sha256:k".into(),
            ..Default::default()
        };
        let r = "r:5000/a/b:img";
        assert!(already_pushed(&record, r, "sha256:k", Some("sha256:1")));
        assert!(!already_pushed(
            &record,
            r,
            "sha256:other",
            Some("sha256:1")
        ));
        assert!(!already_pushed(&record, r, "sha256:k", Some("sha256:2")));
        assert!(!already_pushed(&record, r, "sha256:k", None));
        assert!(!already_pushed(
            &record,
            "r:5000/other:img",
            "sha256:k",
            Some("sha256:1")
        ));
        let old = ImageRecord {
            build_key: String::new(),
            ..record
        };
        assert!(!already_pushed(&old, r, "sha256:k", Some("sha256:1")));
    }

    #[test]
    fn the_build_key_covers_the_dockerfile_context_args_and_source() {
        use imagemesh_proto::v1::BuildOptions;
        let request = |dockerfile: &str, args: &[(&str, &str)], source: &str| ContainerRequest {
            request_id: "any".into(),
            build_image_ref: "r:5000/a:img".into(),
            build_options: Some(BuildOptions {
                dockerfile: dockerfile.into(),
                context_object: "ctx".into(),
                source_image: source.into(),
                build_args: args
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let base = build_key(
            &request("FROM a\n", &[("A", "1"), ("B", "2")], ""),
            Some("d1"),
        );
        // Same content under another request id, args in any order: the same key.
        let mut same = request("FROM a\n", &[("B", "2"), ("A", "1")], "");
        same.request_id = "other".into();
        assert_eq!(build_key(&same, Some("d1")), base);
        let differs = [
            build_key(
                &request("FROM b\n", &[("A", "1"), ("B", "2")], ""),
                Some("d1"),
            ),
            build_key(
                &request("FROM a\n", &[("A", "1"), ("B", "2")], ""),
                Some("d2"),
            ),
            build_key(&request("FROM a\n", &[("A", "1"), ("B", "2")], ""), None),
            build_key(
                &request("FROM a\n", &[("A", "1"), ("B", "3")], ""),
                Some("d1"),
            ),
            build_key(&request("FROM a\n", &[("A", "12")], ""), Some("d1")),
            build_key(
                &request("FROM a\n", &[("A", "1"), ("B", "2")], "x"),
                Some("d1"),
            ),
        ];
        for key in differs {
            assert_ne!(key, base);
        }
        assert!(base.starts_with("sha256:") && base.len() == 71);
    }
}
