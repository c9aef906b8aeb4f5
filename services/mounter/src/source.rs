//! The registry a mount reads from, with a credential that can be replaced while reads go on.
//!
//! oci-client keeps the first auth a `Client` used for a registry for its whole life, so a new
//! credential needs a new client: [`MountSource::swap`] builds one and later reads use it, while
//! reads already in flight finish with the old one.

use std::ops::Range;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use imagemesh_lazyimage::{BlobSource, RegistryBlobSource, SourceError};
use imagemesh_proto::v1::RegistryCredential;
use imagemesh_registry::{
    Reference, RegistryClient, RegistryError, RegistryErrorKind, RegistrySettings,
};

use tracing::Instrument as _;

use crate::config::ReadConfig;

/// Blob ranges of one image's repository, read with the mount's current credential.
pub struct MountSource {
    image: Reference,
    settings: RegistrySettings,
    reads: ReadConfig,
    current: RwLock<Arc<RegistryBlobSource>>,
    /// The span of the request that made the mount, until its first registry read (which
    /// it then parents, so the request's trace shows what the container's start waited for).
    first_read: std::sync::Mutex<Option<opentelemetry::Context>>,
}

impl MountSource {
    /// Reads `image`'s blobs with `client` (the client the image was opened with).
    pub async fn new(
        client: Arc<RegistryClient>,
        image: &Reference,
        settings: RegistrySettings,
        reads: ReadConfig,
    ) -> Self {
        let source = RegistryBlobSource::new(client, image).await;
        Self {
            image: image.clone(),
            settings,
            reads,
            current: RwLock::new(Arc::new(source)),
            first_read: std::sync::Mutex::new(None),
        }
    }

    /// Reads go on with `credential` from now on.
    pub async fn swap(&self, credential: &RegistryCredential) {
        let client = Arc::new(RegistryClient::new(
            self.image.registry(),
            Some(credential),
            &self.settings,
        ));
        let source = Arc::new(RegistryBlobSource::new(client, &self.image).await);
        *self.current.write().expect("source lock") = source;
    }

    /// Fetches exactly `range` of blob `digest`: one range request, retried while the registry
    /// is unavailable, within `reads.retries` and `reads.deadline`.
    pub async fn fetch(&self, digest: &str, range: Range<u64>) -> Result<Bytes, RegistryError> {
        let parent = self.first_read.lock().expect("first read lock").take();
        let Some(parent) = parent else {
            return self.fetch_within_deadline(digest, range).await;
        };
        let span = tracing::info_span!(
            parent: None,
            "first registry read",
            layer = digest,
            range_start = range.start,
            range_bytes = range.end - range.start,
            bytes = tracing::field::Empty,
        );
        imagemesh_runtime::telemetry::set_parent(&span, parent);
        let fetched = self
            .fetch_within_deadline(digest, range)
            .instrument(span.clone())
            .await;
        if let Ok(bytes) = &fetched {
            span.record("bytes", bytes.len());
        }
        fetched
    }

    /// Traces the next registry read under `parent` (the request that made the mount).
    pub fn trace_first_read(&self, parent: opentelemetry::Context) {
        *self.first_read.lock().expect("first read lock") = Some(parent);
    }

    async fn fetch_within_deadline(
        &self,
        digest: &str,
        range: Range<u64>,
    ) -> Result<Bytes, RegistryError> {
        let deadline = self.reads.deadline;
        match tokio::time::timeout(deadline, self.fetch_retrying(digest, range)).await {
            Ok(fetched) => fetched,
            Err(_) => Err(RegistryError::new(
                RegistryErrorKind::Unavailable,
                self.image.registry(),
                self.image.repository(),
                format!("a range read of {digest} took longer than {deadline:?}"),
            )),
        }
    }

    async fn fetch_retrying(
        &self,
        digest: &str,
        range: Range<u64>,
    ) -> Result<Bytes, RegistryError> {
        let mut wait = self.reads.retry_initial;
        let mut attempt = 0;
        loop {
            // Clone the Arc and drop the lock before awaiting: a swap never waits for a read,
            // and a retry uses a credential refreshed meanwhile.
            let source = self.current.read().expect("source lock").clone();
            match source.fetch(digest, range.clone()).await {
                Ok(bytes) => return Ok(bytes),
                Err(err) if err.is_retryable() && attempt < self.reads.retries => {
                    attempt += 1;
                    tracing::debug!(%digest, attempt, error = %err, "range read failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait = wait.saturating_mul(2);
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// A client with the mount's current credential (for the prefetch list next to the image).
    pub fn client(&self) -> Arc<RegistryClient> {
        self.current.read().expect("source lock").shared_client()
    }

    pub fn image(&self) -> &Reference {
        &self.image
    }
}

impl BlobSource for MountSource {
    async fn read_range(&self, digest: &str, range: Range<u64>) -> Result<Bytes, SourceError> {
        Ok(self.fetch(digest, range).await?)
    }
}
