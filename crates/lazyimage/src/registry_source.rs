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
        let len = range.end.saturating_sub(range.start);
        if len == 0 {
            return Ok(Bytes::new());
        }
        let response = self
            .client
            .oci()
            .pull_blob_stream_partial(&self.repository, digest, range.start, Some(len))
            .await
            .map_err(|e| self.error_from_oci(&e))?;
        match response {
            BlobResponse::Partial(stream) => self.collect(stream, 0, len).await,
            // The registry ignored the Range header and sent the whole blob: skip to the range.
            BlobResponse::Full(stream) => {
                tracing::warn!(registry = %self.client.registry(), "registry ignored a range request");
                self.collect(stream, range.start, len).await
            }
        }
    }

    /// Reads `len` bytes after skipping `skip`, never buffering more than `len`.
    async fn collect(
        &self,
        mut stream: SizedStream,
        mut skip: u64,
        len: u64,
    ) -> Result<Bytes, RegistryError> {
        let mut out = BytesMut::with_capacity(len.min(64 << 20) as usize);
        while (out.len() as u64) < len {
            let Some(chunk) = stream.next().await else {
                break;
            };
            let chunk = chunk
                .map_err(|e| self.unavailable(format!("reading a blob range: {}", e.kind())))?;
            let dropped = chunk.len().min(skip as usize);
            skip -= dropped as u64;
            let rest = &chunk[dropped..];
            let wanted = (len - out.len() as u64).min(rest.len() as u64) as usize;
            out.extend_from_slice(&rest[..wanted]);
        }
        if (out.len() as u64) != len {
            return Err(RegistryError::new(
                RegistryErrorKind::Invalid,
                self.client.registry(),
                self.repository.repository(),
                format!("range response has {} bytes, wanted {len}", out.len()),
            ));
        }
        Ok(out.freeze())
    }

    fn error_from_oci(&self, err: &oci_client::errors::OciDistributionError) -> RegistryError {
        RegistryError::from_oci(self.client.registry(), self.repository.repository(), err)
    }

    fn unavailable(&self, detail: String) -> RegistryError {
        RegistryError::new(
            RegistryErrorKind::Unavailable,
            self.client.registry(),
            self.repository.repository(),
            detail,
        )
    }
}

impl BlobSource for RegistryBlobSource {
    async fn read_range(&self, digest: &str, range: Range<u64>) -> Result<Bytes, SourceError> {
        Ok(self.fetch(digest, range).await?)
    }
}
