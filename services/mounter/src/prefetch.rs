//! Recorded prefetch of one mount (`docs/mounter.md`, Recorded prefetch).
//!
//! At a mount the image's prefetch list is looked up next to the image with the mount's
//! credential. When there is one, its spans are fetched in the background in the recorded
//! order, at most `prefetch.concurrency` at a time, through the mount's reader (the same
//! credential, caches and flight locks as the container's reads, which never wait for a
//! prefetch slot). When there is none, the spans the mount's reads need during
//! `prefetch.record_window` are recorded and published as the image's list. A list that cannot
//! be used is logged and ignored (and replaced by a new recording); it never fails a mount.

use std::sync::Arc;

use imagemesh_lazyimage::prefetch::{PREFETCH_VERSION, PrefetchError};
use imagemesh_lazyimage::{PrefetchList, find_prefetch, push_prefetch};
use imagemesh_registry::{RegistryClient, ResolvedImage};
use imagemesh_runtime::Shutdown;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::config::PrefetchConfig;
use crate::fs::MountReader;
use crate::source::MountSource;

/// The prefetch task of one mount.
pub struct Prefetch {
    pub config: PrefetchConfig,
    pub reader: Arc<MountReader>,
    pub source: Arc<MountSource>,
    pub image: ResolvedImage,
    pub mount_id: String,
    /// Triggered when the mount goes.
    pub stop: Shutdown,
    /// Publishes a recorded list; `None`: with the mount's own credential.
    pub publisher: Option<Arc<RegistryClient>>,
}

impl Prefetch {
    /// Looks the list up, then prefetches it or records one, until done or stopped.
    pub async fn run(self) {
        if !self.config.enabled {
            return;
        }
        let found = find_prefetch(
            &self.source.client(),
            &self.image,
            self.config.max_list_bytes,
            self.config.max_spans,
        )
        .await;
        match found {
            Ok(Some(found)) => {
                let spans = found.list.resolve(self.reader.image());
                tracing::info!(mount_id = %self.mount_id, artifact = %found.digest, spans = spans.len(), "prefetching the recorded spans");
                self.reader
                    .set_prefetch_state("prefetching", Some(found.digest));
                self.prefetch(spans).await;
            }
            Ok(None) if self.config.record => self.record().await,
            Ok(None) => {}
            Err(PrefetchError::Invalid(why)) => {
                tracing::warn!(mount_id = %self.mount_id, reason = %why, "prefetch list ignored");
                self.reader.set_prefetch_state("ignored", None);
                if self.config.record {
                    self.record().await;
                }
            }
            // The registry may just be away: keep a list that may be good.
            Err(PrefetchError::Registry(err)) => {
                tracing::warn!(mount_id = %self.mount_id, error = %err, "looking up the prefetch list failed; no prefetch for this mount");
                self.reader.set_prefetch_state("failed", None);
            }
        }
    }

    /// Fetches `spans` (layer, checkpoint) in order, `concurrency` at a time.
    async fn prefetch(&self, spans: Vec<(usize, usize)>) {
        self.reader.plan_prefetch(spans.len());
        let slots = Arc::new(Semaphore::new(self.config.concurrency.max(1)));
        let mut running = JoinSet::new();
        for (layer, span) in spans {
            let slot = tokio::select! {
                _ = self.stop.cancelled() => return,
                slot = slots.clone().acquire_owned() => slot.expect("never closed"),
            };
            let (reader, mount_id) = (self.reader.clone(), self.mount_id.clone());
            running.spawn(async move {
                let _slot = slot;
                if let Err(err) = reader.prefetch_span(layer, span).await {
                    tracing::debug!(mount_id, layer, span, error = %err, "prefetching a span failed; a read will fetch it");
                }
            });
            // Reap what finished, so the set stays small.
            while running.try_join_next().is_some() {}
        }
        tokio::select! {
            _ = self.stop.cancelled() => return,
            _ = async { while running.join_next().await.is_some() {} } => {}
        }
        let stats = self.reader.prefetch_stats();
        tracing::info!(mount_id = %self.mount_id, spans = stats.spans_prefetched, bytes = stats.bytes_prefetched, cached = stats.spans_cached, errors = stats.errors, "prefetch done");
        self.reader.set_prefetch_state("done", None);
    }

    /// Records for the window (or until the mount goes), then publishes what was recorded.
    async fn record(&self) {
        let window = self.config.record_window;
        self.reader
            .record(window, self.config.max_spans, self.config.max_bytes);
        tokio::select! {
            _ = self.stop.cancelled() => {}
            _ = tokio::time::sleep(window) => {}
        }
        let spans = self.reader.take_recording();
        if spans.is_empty() {
            tracing::info!(mount_id = %self.mount_id, "nothing read during the record window; no prefetch list");
            self.reader.set_prefetch_state("off", None);
            return;
        }
        let list = PrefetchList {
            version: PREFETCH_VERSION,
            image_digest: self.image.digest().to_string(),
            window_ms: window.as_millis() as u64,
            spans,
        };
        let client = match &self.publisher {
            Some(client) => client.clone(),
            None => self.source.client(),
        };
        match push_prefetch(&client, &self.image, list.encode()).await {
            Ok(stored) => {
                tracing::info!(mount_id = %self.mount_id, artifact = %stored.digest, spans = list.spans.len(), "published the prefetch list");
                self.reader
                    .set_prefetch_state("published", Some(stored.digest));
            }
            Err(err) => {
                // A pull-only credential is refused here; the error names no secret.
                tracing::warn!(mount_id = %self.mount_id, error = %err, "publishing the prefetch list failed");
                self.reader.set_prefetch_state("failed", None);
            }
        }
    }
}
