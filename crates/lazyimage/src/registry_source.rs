//! Layer blobs read from a registry with HTTP range requests: the [`BlobSource`] behind lazy
//! reads (`imagemesh index cat`, the mounter).
//!
//! Each `read_range` is one `GET /v2/<repo>/blobs/<digest>` with `Range: bytes=a-b`. The bytes
//! are not verified here: the lazy reader checks them against the span digests recorded at index
//! time, which a partial response cannot be checked against otherwise.

use std::ops::Range;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use imagemesh_lazyindex::{BlobSource, SourceError};
use oci_client::Reference;
use oci_client::client::{BlobResponse, SizedStream};

use imagemesh_registry::{RegistryClient, RegistryError, RegistryErrorKind};

/// Blobs of one repository, read with one client (and so one credential).
#[derive(Clone)]
pub struct RegistryBlobSource {
    client: Arc<RegistryClient>,
    repository: Reference,
}

impl RegistryBlobSource {
    /// Reads blobs of `image`'s repository. Stores the client's credential with oci-client so
    /// blob requests (which take no auth argument) present it.
    pub async fn new(client: Arc<RegistryClient>, image: &Reference) -> Self {
        client
            .oci()
            .store_auth_if_needed(image.resolve_registry(), client.auth())
            .await;
        Self {
            client,
            repository: image.clone(),
        }
    }

    pub fn client(&self) -> &RegistryClient {
        &self.client
    }

    /// The client, to share with other requests made with the same credential.
    pub fn shared_client(&self) -> Arc<RegistryClient> {
        self.client.clone()
    }

    /// Fetches exactly `range` of blob `digest`.
    pub async fn fetch(&self, digest: &str, range: Range<u64>) -> Result<Bytes, RegistryError> {
        fetch_range(&self.client, &self.repository, digest, range).await
    }
}

/// Fetches exactly `range` of blob `digest` of `repository`'s repository with one range
/// request. The client's credential must already be stored with oci-client.
pub async fn fetch_range(
    client: &RegistryClient,
    repository: &Reference,
    digest: &str,
    range: Range<u64>,
) -> Result<Bytes, RegistryError> {
    let len = range.end.saturating_sub(range.start);
    if len == 0 {
        return Ok(Bytes::new());
    }
    let response = client
        .oci()
        .pull_blob_stream_partial(repository, digest, range.start, Some(len))
        .await
        .map_err(|e| RegistryError::from_oci(client.registry(), repository.repository(), &e))?;
    match response {
        BlobResponse::Partial(stream) => collect(client, repository, stream, 0, len).await,
        // The registry ignored the Range header and sent the whole blob: skip to the range.
        BlobResponse::Full(stream) => {
            tracing::warn!(registry = %client.registry(), "registry ignored a range request");
            collect(client, repository, stream, range.start, len).await
        }
    }
}

/// Reads `len` bytes after skipping `skip`, never buffering more than `len`.
async fn collect(
    client: &RegistryClient,
    repository: &Reference,
    mut stream: SizedStream,
    mut skip: u64,
    len: u64,
) -> Result<Bytes, RegistryError> {
    let fail = |kind, detail: String| {
        RegistryError::new(kind, client.registry(), repository.repository(), detail)
    };
    let mut out = BytesMut::with_capacity(len.min(64 << 20) as usize);
    while (out.len() as u64) < len {
        let Some(chunk) = stream.next().await else {
            break;
        };
        let chunk = chunk.map_err(|e| {
            fail(
                RegistryErrorKind::Unavailable,
                format!("reading a blob range: {}", e.kind()),
            )
        })?;
        let dropped = chunk.len().min(skip as usize);
        skip -= dropped as u64;
        let rest = &chunk[dropped..];
        let wanted = (len - out.len() as u64).min(rest.len() as u64) as usize;
        out.extend_from_slice(&rest[..wanted]);
    }
    if (out.len() as u64) != len {
        return Err(fail(
            RegistryErrorKind::Invalid,
            format!("range response has {} bytes, wanted {len}", out.len()),
        ));
    }
    Ok(out.freeze())
}

impl BlobSource for RegistryBlobSource {
    async fn read_range(&self, digest: &str, range: Range<u64>) -> Result<Bytes, SourceError> {
        Ok(self.fetch(digest, range).await?)
    }
}
