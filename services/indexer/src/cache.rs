//! Encoded layer indexes cached in a JetStream object store, keyed by layer digest.
//!
//! A base layer shared by many images is then inflated once. The key also names the format
//! version and the checkpoint settings, because an index built with other settings is a
//! different index. The cache is an optimisation only: every failure to use it is logged and
//! the layer is indexed from the registry instead.

use async_nats::jetstream::object_store::ObjectStore;
use imagemesh_lazyindex::{FORMAT_VERSION, IndexOptions, LayerIndex, decode_layer, encode_layer};
use tokio::io::AsyncReadExt;

/// The layer-index cache of one indexer.
#[derive(Clone)]
pub struct LayerCache {
    store: ObjectStore,
    prefix: String,
}

impl LayerCache {
    pub fn new(store: ObjectStore, options: &IndexOptions) -> Self {
        let prefix = format!(
            "v{FORMAT_VERSION}/span-{}/threshold-{}",
            options.span_size, options.checkpoint_threshold
        );
        Self { store, prefix }
    }

    fn key(&self, digest: &str) -> String {
        format!("{}/{digest}", self.prefix)
    }

    /// The cached index of layer `digest`, if there is a usable one.
    pub async fn get(&self, digest: &str) -> Option<LayerIndex> {
        let key = self.key(digest);
        let mut object = match self.store.get(&key).await {
            Ok(object) => object,
            Err(err) => {
                if err.kind() != async_nats::jetstream::object_store::GetErrorKind::NotFound {
                    tracing::warn!(key, error = %err, "layer index cache unavailable");
                }
                return None;
            }
        };
        let mut bytes = Vec::new();
        if let Err(err) = object.read_to_end(&mut bytes).await {
            tracing::warn!(key, error = %err, "could not read a cached layer index");
            return None;
        }
        match decode_layer(&bytes) {
            Ok(layer) if layer.digest == digest => Some(layer),
            Ok(_) => {
                tracing::warn!(
                    key,
                    "cached layer index describes another layer; ignoring it"
                );
                None
            }
            Err(err) => {
                tracing::warn!(key, error = %err, "cached layer index does not decode; ignoring it");
                None
            }
        }
    }

    /// Caches `layer`; a failure only costs a later re-index.
    pub async fn put(&self, layer: &LayerIndex) {
        let key = self.key(&layer.digest);
        let encoded = encode_layer(layer);
        if let Err(err) = self.store.put(key.as_str(), &mut encoded.as_slice()).await {
            tracing::warn!(key, error = %err, "could not cache a layer index");
        }
    }
}
