//! The indexer service's path: layers served by a real registry, streamed over HTTP and
//! bridged to the synchronous ingest exactly as `services/indexer/src/ingest.rs` does.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use imagemesh_lazyindex::{IndexOptions, index_layer};
use imagemesh_testkit::{Registry, RegistryAuth};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::{IMAGE_LAYER_GZIP_MEDIA_TYPE, OciDescriptor};
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};
use tokio_util::io::{StreamReader, SyncIoBridge};

/// Layers pushed to a local docker-registry.
pub struct Served {
    _registry: Registry,
    runtime: tokio::runtime::Runtime,
    client: Client,
    reference: Reference,
    layers: Vec<OciDescriptor>,
}

impl Served {
    /// Starts an open registry and pushes every layer blob to it.
    pub fn start(paths: &[PathBuf]) -> anyhow::Result<Self> {
        let registry = Registry::start(RegistryAuth::Open);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let client = Client::new(ClientConfig {
            protocol: ClientProtocol::Http,
            ..Default::default()
        });
        let reference: Reference = format!("{}/bench/layers:v1", registry.addr()).parse()?;
        let mut layers = Vec::new();
        for path in paths {
            let data = std::fs::read(path)?;
            let digest = format!("sha256:{:x}", Sha256::digest(&data));
            let size = data.len() as i64;
            runtime.block_on(client.push_blob(&reference, data, &digest))?;
            layers.push(OciDescriptor {
                media_type: IMAGE_LAYER_GZIP_MEDIA_TYPE.into(),
                digest,
                size,
                ..Default::default()
            });
        }
        Ok(Self {
            _registry: registry,
            runtime,
            client,
            reference,
            layers,
        })
    }

    /// Indexes every layer from the registry; returns the time taken.
    pub fn index_all(&self) -> anyhow::Result<Duration> {
        let start = Instant::now();
        self.runtime.block_on(async {
            for layer in &self.layers {
                let stream = self.client.pull_blob_stream(&self.reference, layer).await?;
                let reader = SyncIoBridge::new(StreamReader::new(stream));
                let indexed = tokio::task::spawn_blocking(move || {
                    index_layer(reader, &IndexOptions::default())
                })
                .await??;
                anyhow::ensure!(indexed.digest == layer.digest, "digest mismatch");
            }
            Ok::<_, anyhow::Error>(())
        })?;
        Ok(start.elapsed())
    }
}
