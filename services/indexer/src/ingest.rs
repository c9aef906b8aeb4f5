//! One layer blob streamed from the registry through the synchronous one-pass ingest.
//!
//! The blob's HTTP body stream is bridged to `std::io::Read` with `SyncIoBridge` and consumed
//! by `index_layer` on the blocking pool, so memory stays bounded by the ingest's own buffers
//! (never a whole layer) and the async workers keep running while a layer inflates.

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use imagemesh_lazyindex::{
    Compression, Error as IndexError, IndexOptions, LayerIndex, index_layer,
};
use imagemesh_registry::{Reference, RegistryClient, RegistryError, RegistryErrorKind};
use oci_client::errors::DigestError;
use oci_client::manifest::OciDescriptor;
use tokio_util::io::{StreamReader, SyncIoBridge};

use crate::failure::Failure;

/// Indexes the layer `layer` of `image`'s repository in one streaming pass.
pub async fn index_blob(
    client: &RegistryClient,
    image: &Reference,
    layer: &OciDescriptor,
    options: &IndexOptions,
) -> Result<LayerIndex, Failure> {
    let compression = Compression::from_media_type(&layer.media_type).map_err(|_| {
        Failure::invalid(format!(
            "layer {} has media type {}, which cannot be indexed",
            layer.digest, layer.media_type
        ))
    })?;
    let options = IndexOptions {
        compression: Some(compression),
        ..options.clone()
    };
    client
        .oci()
        .store_auth_if_needed(image.resolve_registry(), client.auth())
        .await;
    let stream = client
        .oci()
        .pull_blob_stream(image, layer)
        .await
        .map_err(|e| RegistryError::from_oci(client.registry(), image.repository(), &e))?;
    // oci-client's stream also checks the blob digest at its end; a mismatch surfaces as an
    // I/O error carrying a `DigestError`, told apart below.
    let reader = SyncIoBridge::new(StreamReader::new(stream));
    let (reader, _stop_on_drop) = Abandonable::new(reader);
    let indexed = tokio::task::spawn_blocking(move || index_layer(reader, &options))
        .await
        .map_err(|e| Failure::internal(format!("layer ingest task failed: {e}")))?;
    let index = indexed.map_err(|e| classify(e, client, image, &layer.digest))?;
    check_matches(&index, layer)?;
    Ok(index)
}

/// A reader that fails once its guard is dropped: when the request is abandoned (shutdown grace
/// over), the blocking pass stops at its next read instead of pulling the rest of the layer.
struct Abandonable<R> {
    inner: R,
    abandoned: Arc<AtomicBool>,
}

/// Marks its reader abandoned when dropped (with the request's future).
struct AbandonOnDrop(Arc<AtomicBool>);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl<R> Abandonable<R> {
    fn new(inner: R) -> (Self, AbandonOnDrop) {
        let abandoned = Arc::new(AtomicBool::new(false));
        let guard = AbandonOnDrop(abandoned.clone());
        (Self { inner, abandoned }, guard)
    }
}

impl<R: Read> Read for Abandonable<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.abandoned.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("indexing abandoned"));
        }
        self.inner.read(buf)
    }
}

/// The layer as read must be the layer the manifest names.
pub fn check_matches(index: &LayerIndex, layer: &OciDescriptor) -> Result<(), Failure> {
    if index.digest != layer.digest {
        return Err(Failure::invalid(format!(
            "layer {} does not match its digest (read {})",
            layer.digest, index.digest
        )));
    }
    if i64::try_from(index.compressed_size).ok() != Some(layer.size) {
        return Err(Failure::invalid(format!(
            "layer {} is {} bytes, the manifest says {}",
            layer.digest, index.compressed_size, layer.size
        )));
    }
    Ok(())
}

/// Bad bytes are the image's fault (reject); a broken transfer is the registry's (retry).
fn classify(err: IndexError, client: &RegistryClient, image: &Reference, digest: &str) -> Failure {
    match err {
        IndexError::Io(io) => {
            if io
                .get_ref()
                .is_some_and(|inner| inner.downcast_ref::<DigestError>().is_some())
            {
                return Failure::invalid(format!("layer {digest} does not match its digest"));
            }
            // The error text may name a URL; the kind says enough.
            Failure::Registry(RegistryError::new(
                RegistryErrorKind::Unavailable,
                client.registry(),
                image.repository(),
                format!("reading layer {digest} failed: {}", io.kind()),
            ))
        }
        other => Failure::invalid(format!("layer {digest} is not a valid layer: {other}")),
    }
}
