//! The image-refs bucket: `<tenant>.<image id>` -> what was pushed (the seed's `v2ImageRefs`).
//! Image ids are per tenant: another tenant's build of the same id writes its own key.
//!
//! The record is also what makes a build idempotent: a request whose image id is already
//! recorded in its tenant at the same reference, with a manifest the registry still serves under
//! that digest, is not built or pushed again.

use async_nats::jetstream::kv;
use imagemesh_proto::v1::ImageRecord;
use imagemesh_runtime::status;
use imagemesh_runtime::streams::image_key;
use prost::Message;

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
    ) -> Result<ImageRecord, Failure> {
        let record = ImageRecord {
            image_id: image_id.to_string(),
            image_ref: image_ref.to_string(),
            manifest_digest: digest.to_string(),
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

/// True when `record` says this exact image was already pushed as `image_ref` and the registry
/// still has `registry_digest` there.
pub fn already_pushed(
    record: &ImageRecord,
    image_ref: &str,
    registry_digest: Option<&str>,
) -> bool {
    !record.manifest_digest.is_empty()
        && record.image_ref == image_ref
        && registry_digest == Some(record.manifest_digest.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_same_reference_and_digest_count_as_already_pushed() {
        let record = ImageRecord {
            image_id: "img".into(),
            image_ref: "r:5000/a/b:img".into(),
            manifest_digest: "sha256:1".into(),
            ..Default::default()
        };
        assert!(already_pushed(&record, "r:5000/a/b:img", Some("sha256:1")));
        assert!(!already_pushed(&record, "r:5000/a/b:img", Some("sha256:2")));
        assert!(!already_pushed(&record, "r:5000/a/b:img", None));
        assert!(!already_pushed(
            &record,
            "r:5000/other:img",
            Some("sha256:1")
        ));
    }
}
