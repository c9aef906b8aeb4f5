//! The index digest recorded with the image in the `imagemesh-image-refs` KV bucket, under the
//! request's tenant's key `<tenant>.<image id>` (image ids are per tenant).
//!
//! Registry 2.8 has no referrers API, so consumers that know an image id find its index here
//! without listing anything. The builder writes the record first (image ref, manifest digest);
//! the indexer adds the index digest with a compare-and-set on the entry's revision, so a
//! concurrent writer is never overwritten, and creates the record when it is absent.

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use imagemesh_proto::v1::ImageRecord;
use imagemesh_runtime::status;
use imagemesh_runtime::streams::image_key;
use prost::Message;

use crate::failure::Failure;

/// Compare-and-set rounds before giving up (each lost round means another writer won).
const ATTEMPTS: usize = 5;

/// What the indexer knows about the image it indexed.
pub struct Indexed<'a> {
    /// The tenant of the request: the record is its own.
    pub tenant: &'a str,
    pub image_id: &'a str,
    pub image_ref: &'a str,
    /// What the reference named (an index for multi-platform images).
    pub top_digest: &'a str,
    /// The platform image manifest that was indexed.
    pub manifest_digest: &'a str,
    pub index_digest: &'a str,
}

/// What became of the record.
#[derive(Debug, PartialEq, Eq)]
pub enum Recorded {
    Created,
    Updated,
    /// Already held this index digest.
    Unchanged,
    /// The record describes another manifest (the image id was rebuilt since): left alone.
    OtherManifest(String),
}

impl Recorded {
    pub fn as_str(&self) -> &'static str {
        match self {
            Recorded::Created => "created",
            Recorded::Updated => "updated",
            Recorded::Unchanged => "unchanged",
            Recorded::OtherManifest(_) => "other-manifest",
        }
    }
}

/// Records `indexed.index_digest` for the tenant's `indexed.image_id`.
pub async fn record(store: &kv::Store, indexed: &Indexed<'_>) -> Result<Recorded, Failure> {
    let key = &image_key(indexed.tenant, indexed.image_id);
    for _ in 0..ATTEMPTS {
        let entry = store
            .entry(key)
            .await
            .map_err(|e| Failure::internal(format!("reading image record {key}: {e}")))?;
        let current = entry.filter(|e| e.operation == Operation::Put);
        let Some(entry) = current else {
            let fresh = ImageRecord {
                image_id: indexed.image_id.to_string(),
                image_ref: indexed.image_ref.to_string(),
                manifest_digest: indexed.top_digest.to_string(),
                index_digest: indexed.index_digest.to_string(),
                pushed_at: None,
                indexed_at: Some(status::now()),
                // Not the indexer's to know: the builder sets it when it records a build.
                build_key: String::new(),
            };
            match store.create(key, fresh.encode_to_vec().into()).await {
                Ok(_) => return Ok(Recorded::Created),
                Err(e) if e.kind() == CreateErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(Failure::internal(format!(
                        "creating image record {key}: {e}"
                    )));
                }
            }
        };
        let mut rec = ImageRecord::decode(entry.value.as_ref())
            .map_err(|e| Failure::internal(format!("image record {key} does not decode: {e}")))?;
        let ours = [indexed.top_digest, indexed.manifest_digest];
        if !rec.manifest_digest.is_empty() && !ours.contains(&rec.manifest_digest.as_str()) {
            return Ok(Recorded::OtherManifest(rec.manifest_digest));
        }
        if rec.index_digest == indexed.index_digest {
            return Ok(Recorded::Unchanged);
        }
        fill(&mut rec, indexed);
        match store
            .update(key, rec.encode_to_vec().into(), entry.revision)
            .await
        {
            Ok(_) => return Ok(Recorded::Updated),
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => continue,
            Err(e) => {
                return Err(Failure::internal(format!(
                    "updating image record {key}: {e}"
                )));
            }
        }
    }
    Err(Failure::internal(format!(
        "image record {key} kept changing; gave up after {ATTEMPTS} attempts"
    )))
}

fn fill(rec: &mut ImageRecord, indexed: &Indexed<'_>) {
    rec.index_digest = indexed.index_digest.to_string();
    rec.indexed_at = Some(status::now());
    if rec.manifest_digest.is_empty() {
        rec.manifest_digest = indexed.top_digest.to_string();
    }
    if rec.image_ref.is_empty() {
        rec.image_ref = indexed.image_ref.to_string();
    }
}
