//! File reads of one image: cached, single-flight, inflated off the async threads. The one
//! reader of lazily read images, over any [`BlobSource`]: the mounter's FUSE reads, `imagemesh
//! index cat` and the tests all go through it.
//!
//! A layer's uncompressed stream is cut into *spans* by the index's checkpoints (1 MiB by
//! default; a small layer is one span) and each span into [`PIECE`]-sized pieces counted from
//! the span start. A read is served piece by piece from the decoded cache. On a miss the reader
//! takes the span's flight lock (so concurrent readers of one span — the kernel's readahead —
//! wait for one fetch instead of racing), fetches the span's compressed bytes with one range
//! request (or takes them from the compressed cache), verifies and inflates from the checkpoint
//! in the blocking pool, and caches every piece from the one asked for up to [`MAX_RUN`] later
//! or the span's end: the next reads of the file are memory copies. An index loaded from its
//! head alone keeps its checkpoint windows in the registry: the first read from a checkpoint
//! fetches its window (one small range of the index blob, beside the span's own request),
//! checks it against its digest and caches it like a span.
//!
//! A reader can also *record* which spans its foreground reads needed during a window after
//! the mount ([`ImageReader::record`]), and *prefetch* spans ([`ImageReader::prefetch_span`]):
//! fetch, verify and put them in the compressed caches under the same flight lock and keys a
//! foreground read uses, so a foreground read of a span being prefetched joins that fetch
//! instead of making its own, and one of a prefetched span is a cache hit. Prefetch takes no
//! inflate slot and is not counted in [`ReadStats`]: those are the foreground's.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use imagemesh_lazyindex::{BlobSource, DataRef, EntryKind, ImageIndex, MergedTree, SourceError};
use tokio::sync::OwnedMutexGuard;

use crate::cache::{CacheConfig, Caches, RangeKey};
use crate::prefetch::RecordedSpan;

/// Decoded cache granularity.
pub const PIECE: u64 = 1 << 20;
/// Most spans read ahead of a sequential reader (doubling from one per miss).
pub const MAX_READ_AHEAD: usize = 4;
/// Most bytes inflated for one miss (a multiple of [`PIECE`]): bounds a read's memory and CPU.
pub const MAX_RUN: u64 = 4 << 20;

/// Why a read failed (the kernel sees EIO; the log sees this).
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The blob source failed (for a registry: a `RegistryError`, which names no secret).
    #[error(transparent)]
    Source(SourceError),
    #[error(transparent)]
    Index(#[from] imagemesh_lazyindex::Error),
    #[error("blocking task failed: {0}")]
    Task(String),
}

/// What every mount of the instance shares: caches and flight locks.
pub struct Shared {
    pub caches: Caches,
    flights: Mutex<HashMap<RangeKey, Weak<tokio::sync::Mutex<()>>>>,
}

impl Shared {
    /// Caches in memory only, within `bytes` each (tools and tests).
    pub fn in_memory(bytes: u64) -> Self {
        Self::new(Caches::new(&CacheConfig {
            compressed_bytes: bytes,
            decoded_bytes: bytes,
            disk_dir: None,
            disk_bytes: 0,
        }))
    }

    pub fn new(caches: Caches) -> Self {
        Self {
            caches,
            flights: Mutex::new(HashMap::new()),
        }
    }

    async fn flight(&self, key: RangeKey) -> OwnedMutexGuard<()> {
        let lock = {
            let mut flights = self.flights.lock().expect("flights lock");
            flights.retain(|_, lock| lock.strong_count() > 0);
            match flights.get(&key).and_then(Weak::upgrade) {
                Some(lock) => lock,
                None => {
                    let lock = Arc::new(tokio::sync::Mutex::new(()));
                    flights.insert(key, Arc::downgrade(&lock));
                    lock
                }
            }
        };
        lock.lock_owned().await
    }
}

/// Runs blocking work of a read in one of the process's [`blocking`](crate::blocking) slots.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ReadError> {
    crate::blocking::run(work)
        .await
        .map_err(|e| ReadError::Task(e.to_string()))
}

/// Reads files of one image from `S`.
pub struct ImageReader<S> {
    /// Starts a read-ahead task for (layer, span); only a reader made with
    /// [`ImageReader::new_shared`] has one (the task holds the reader).
    spawn_ahead: Option<SpawnAhead>,
    /// Per layer: the last span a foreground read fetched, and how far ahead it read.
    sequences: Mutex<Vec<Sequence>>,
    read_ahead_spans: AtomicU64,
    read_ahead_bytes: AtomicU64,
    image: Arc<ImageIndex>,
    digests: Vec<Arc<str>>,
    /// The encoded index blob, when the index's windows are remote (read from it on demand).
    index_blob: Option<Arc<str>>,
    /// `Checkpoint::identity` of every checkpoint of every layer: the cache keys' verifiers.
    verifiers: Vec<Vec<[u8; 32]>>,
    source: S,
    shared: Arc<Shared>,
    reads: AtomicU64,
    range_requests: AtomicU64,
    fetched: AtomicU64,
    returned: AtomicU64,
    inflated: AtomicU64,
    errors: AtomicU64,
    prefetch: Prefetch,
}

type SpawnAhead = Box<dyn Fn(usize, usize) + Send + Sync>;

/// How a layer has been read so far: a fetch of the span right after the last one fetched (or
/// of one just past what was read ahead) is sequential, and reads further ahead.
#[derive(Clone, Copy, Default)]
struct Sequence {
    last: Option<usize>,
    ahead: usize,
}

/// Where [`ImageReader::load`] found bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// Memory or the node's disk cache.
    Cache,
    /// The blob source (the registry).
    Source,
}

/// Who fetches a span or window: counted as the foreground's, prefetch's or read-ahead's.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fetcher {
    Foreground,
    Prefetch,
    ReadAhead,
}

/// What a reader records and prefetches.
#[derive(Default)]
struct Prefetch {
    recorder: Mutex<Option<Recorder>>,
    /// Spans (their compressed cache keys) prefetched and not read in the foreground yet.
    prefetched: Mutex<HashSet<RangeKey>>,
    state: Mutex<(&'static str, Option<String>)>,
    recorded: AtomicU64,
    planned: AtomicU64,
    prefetched_spans: AtomicU64,
    cached: AtomicU64,
    bytes: AtomicU64,
    hits: AtomicU64,
    errors: AtomicU64,
}

/// The spans foreground reads needed, in order, until `until` or a bound.
struct Recorder {
    until: Instant,
    max_spans: usize,
    max_bytes: u64,
    bytes: u64,
    seen: HashSet<(usize, usize)>,
    spans: Vec<RecordedSpan>,
}

/// What a reader recorded and prefetched, for the stats endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PrefetchStats {
    /// `off`, `recording`, `published`, `prefetching`, `done`, `ignored` or `failed`.
    pub state: String,
    /// Digest of the prefetch artifact published or replayed, when there is one.
    pub artifact: Option<String>,
    /// Spans recorded (first run).
    pub spans_recorded: u64,
    /// Spans in the prefetch list that this image's index has (later runs).
    pub spans_planned: u64,
    /// Spans fetched from the registry by prefetch.
    pub spans_prefetched: u64,
    /// Spans of the list already cached (memory or disk): nothing to fetch.
    pub spans_cached: u64,
    /// Compressed bytes prefetch fetched.
    pub bytes_prefetched: u64,
    /// Foreground reads served from a prefetched span instead of the registry.
    pub hits: u64,
    /// Spans prefetch could not fetch or verify (a foreground read fetches them).
    pub errors: u64,
}

/// A reader's counters since it was made.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReadStats {
    pub reads: u64,
    /// Uncompressed bytes handed back to callers.
    pub bytes_returned: u64,
    /// Range requests made to the source by foreground reads (cache misses; prefetch's are
    /// counted in [`PrefetchStats`]).
    pub range_requests: u64,
    /// Compressed bytes fetched from the source.
    /// Compressed bytes fetched from the source by foreground reads (prefetch not included).
    pub bytes_fetched: u64,
    pub bytes_inflated: u64,
    pub read_errors: u64,
    /// Spans fetched ahead of a sequential reader (not in `range_requests`).
    pub read_ahead_spans: u64,
    /// Compressed bytes fetched ahead (spans and their windows).
    pub read_ahead_bytes: u64,
}

impl<S: BlobSource + 'static> ImageReader<S> {
    /// A reader that also reads ahead of sequential reads, in tasks of its own on the tokio
    /// runtime it reads on.
    pub fn new_shared(image: Arc<ImageIndex>, source: S, shared: Arc<Shared>) -> Arc<Self> {
        Arc::new_cyclic(|me: &Weak<Self>| {
            let me = me.clone();
            let mut reader = Self::new(image, source, shared);
            reader.spawn_ahead = Some(Box::new(move |layer, span| {
                let Some(reader) = me.upgrade() else {
                    return;
                };
                tokio::spawn(async move {
                    if let Err(err) = reader.fetch_span(layer, span, Fetcher::ReadAhead).await {
                        tracing::debug!(error = %err, "read-ahead failed; a foreground read fetches the span itself");
                    }
                });
            }));
            reader
        })
    }
}

impl<S: BlobSource> ImageReader<S> {
    pub fn new(image: Arc<ImageIndex>, source: S, shared: Arc<Shared>) -> Self {
        let digests = image
            .layers
            .iter()
            .map(|l| l.digest.as_str().into())
            .collect();
        let verifiers = image
            .layers
            .iter()
            .map(|l| l.checkpoints.iter().map(|c| c.identity()).collect())
            .collect();
        let index_blob = image
            .remote_windows
            .as_ref()
            .map(|w| w.blob.as_str().into());
        Self {
            spawn_ahead: None,
            sequences: Mutex::new(vec![Sequence::default(); image.layers.len()]),
            read_ahead_spans: AtomicU64::new(0),
            read_ahead_bytes: AtomicU64::new(0),
            image,
            digests,
            index_blob,
            verifiers,
            source,
            shared,
            reads: AtomicU64::new(0),
            range_requests: AtomicU64::new(0),
            fetched: AtomicU64::new(0),
            returned: AtomicU64::new(0),
            inflated: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            prefetch: Prefetch {
                state: Mutex::new(("off", None)),
                ..Default::default()
            },
        }
    }

    /// Starts fetching the spans after `spans` of `layer` when the foreground's fetches of that
    /// layer look sequential: one span after the first sequential fetch, doubling up to
    /// [`MAX_READ_AHEAD`]. A fetch elsewhere in the layer starts over, so a single small read
    /// never reads ahead.
    fn read_ahead(&self, layer: usize, spans: std::ops::Range<usize>) {
        let Some(spawn) = &self.spawn_ahead else {
            return;
        };
        let last = spans.end.saturating_sub(1);
        let ahead = {
            let mut sequences = self.sequences.lock().expect("sequences lock");
            let seq = &mut sequences[layer];
            let sequential = seq
                .last
                .is_some_and(|prev| spans.start > prev && spans.start <= prev + seq.ahead + 1);
            seq.ahead = if sequential {
                (seq.ahead * 2).clamp(1, MAX_READ_AHEAD)
            } else {
                0
            };
            seq.last = Some(last);
            seq.ahead
        };
        let count = self.image.layers[layer].checkpoints.len();
        for span in (last + 1..=last + ahead).filter(|&span| span < count) {
            spawn(layer, span);
        }
    }

    /// What was recorded and prefetched so far.
    pub fn prefetch_stats(&self) -> PrefetchStats {
        let p = &self.prefetch;
        let (state, artifact) = p.state.lock().expect("prefetch state lock").clone();
        PrefetchStats {
            state: state.to_string(),
            artifact,
            spans_recorded: p.recorded.load(Ordering::Relaxed),
            spans_planned: p.planned.load(Ordering::Relaxed),
            spans_prefetched: p.prefetched_spans.load(Ordering::Relaxed),
            spans_cached: p.cached.load(Ordering::Relaxed),
            bytes_prefetched: p.bytes.load(Ordering::Relaxed),
            hits: p.hits.load(Ordering::Relaxed),
            errors: p.errors.load(Ordering::Relaxed),
        }
    }

    /// Sets what the prefetch of this reader's mount is doing (shown by [`Self::prefetch_stats`]).
    pub fn set_prefetch_state(&self, state: &'static str, artifact: Option<String>) {
        let mut current = self.prefetch.state.lock().expect("prefetch state lock");
        *current = (state, artifact.or_else(|| current.1.take()));
    }

    /// Records, from now for `window`, the spans foreground reads need (at most `max_spans`
    /// spans of `max_bytes` compressed bytes together), each once, in order.
    pub fn record(&self, window: Duration, max_spans: usize, max_bytes: u64) {
        *self.prefetch.recorder.lock().expect("recorder lock") = Some(Recorder {
            until: Instant::now() + window,
            max_spans,
            max_bytes,
            bytes: 0,
            seen: HashSet::new(),
            spans: Vec::new(),
        });
        self.set_prefetch_state("recording", None);
    }

    /// Ends the recording; what it recorded, in order.
    pub fn take_recording(&self) -> Vec<RecordedSpan> {
        self.prefetch
            .recorder
            .lock()
            .expect("recorder lock")
            .take()
            .map(|r| r.spans)
            .unwrap_or_default()
    }

    /// Notes that a foreground read needs spans `spans` of `layer`.
    fn note(&self, layer: usize, spans: std::ops::Range<usize>) {
        let mut recorder = self.prefetch.recorder.lock().expect("recorder lock");
        let Some(r) = recorder.as_mut() else {
            return;
        };
        if Instant::now() >= r.until {
            return;
        }
        let index = &self.image.layers[layer];
        for span in spans {
            let range = index.span_range(span);
            let len = range.end - range.start;
            if r.spans.len() >= r.max_spans || r.bytes.saturating_add(len) > r.max_bytes {
                return;
            }
            if r.seen.insert((layer, span)) {
                r.bytes += len;
                r.spans.push(RecordedSpan {
                    layer: index.digest.clone(),
                    offset: range.start,
                    length: len,
                });
                self.prefetch.recorded.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// How many spans the prefetch of this mount will go through.
    pub fn plan_prefetch(&self, spans: usize) {
        self.prefetch.planned.store(spans as u64, Ordering::Relaxed);
    }

    /// Fetches span `span` of `layer` into the compressed caches (memory and disk), verified,
    /// unless a cache has it. Holds the span's flight lock while it fetches, so a foreground
    /// read of the span waits for this fetch rather than making a second one. Takes no inflate
    /// slot: a foreground read never waits for prefetch's CPU.
    pub async fn prefetch_span(&self, layer: usize, span: usize) -> Result<(), ReadError> {
        let result = self.fetch_span(layer, span, Fetcher::Prefetch).await;
        if result.is_err() {
            self.prefetch.errors.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// Fetches span `span` of `layer` and its checkpoint's window into the caches, for
    /// prefetch or read-ahead.
    async fn fetch_span(&self, layer: usize, span: usize, by: Fetcher) -> Result<(), ReadError> {
        tokio::try_join!(
            self.fetch_span_bytes(layer, span, by),
            self.window(layer, span, by)
        )
        .map(|_| ())
    }

    async fn fetch_span_bytes(
        &self,
        layer: usize,
        span: usize,
        by: Fetcher,
    ) -> Result<(), ReadError> {
        let plan = self.span_plan(layer, span)?;
        let key = self.key(
            layer,
            plan.fetch.start,
            plan.fetch.end,
            self.verifiers[layer][span],
        );
        let _flight = self.shared.flight(key.clone()).await;
        let verify = |bytes| self.verify_read(layer, &plan, bytes);
        let (_, origin) = self.load(&key, by, verify, || ()).await?;
        match (by, origin) {
            (Fetcher::Prefetch, Origin::Cache) => {
                self.prefetch.cached.fetch_add(1, Ordering::Relaxed);
            }
            (Fetcher::Prefetch, Origin::Source) => {
                self.prefetch
                    .prefetched_spans
                    .fetch_add(1, Ordering::Relaxed);
                self.prefetch
                    .prefetched
                    .lock()
                    .expect("prefetched lock")
                    .insert(key);
            }
            (Fetcher::ReadAhead, Origin::Source) => {
                self.read_ahead_spans.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        Ok(())
    }

    /// The plan that fetches exactly span `span` of `layer` (what prefetch and read-ahead
    /// fetch, under the key a foreground read of the span uses).
    fn span_plan(
        &self,
        layer: usize,
        span: usize,
    ) -> Result<imagemesh_lazyindex::ReadPlan, ReadError> {
        let index = &self.image.layers[layer];
        let start = index.checkpoints[span].uncompressed_offset;
        let end = index
            .checkpoints
            .get(span + 1)
            .map_or(index.uncompressed_size, |c| c.uncompressed_offset);
        Ok(index.plan_read(start..end)?)
    }

    /// Counts a fetch from the source as `by`'s.
    fn count_fetch(&self, by: Fetcher, bytes: usize) {
        match by {
            Fetcher::Prefetch => self
                .prefetch
                .bytes
                .fetch_add(bytes as u64, Ordering::Relaxed),
            Fetcher::ReadAhead => self
                .read_ahead_bytes
                .fetch_add(bytes as u64, Ordering::Relaxed),
            Fetcher::Foreground => {
                self.range_requests.fetch_add(1, Ordering::Relaxed);
                self.fetched.fetch_add(bytes as u64, Ordering::Relaxed)
            }
        };
    }

    /// The bytes under `key` (its range of blob `key.digest`): from memory, else from the
    /// node's disk cache, else fetched from the source and counted as `by`'s. `verify` checks
    /// bytes from the disk or the source before they are used or cached; a disk entry that
    /// fails it is dropped and fetched anew. `on_miss` runs when both caches missed, before the
    /// fetch. The caller holds the key's flight lock. One path for spans and windows, for the
    /// foreground, prefetch and read-ahead.
    async fn load<Verified>(
        &self,
        key: &RangeKey,
        by: Fetcher,
        verify: impl Fn(Bytes) -> Verified,
        on_miss: impl FnOnce(),
    ) -> Result<(Bytes, Origin), ReadError>
    where
        Verified: std::future::Future<Output = Result<(), ReadError>>,
    {
        use imagemesh_lazyindex::Error;
        if let Some(bytes) = self.shared.caches.compressed.get(key) {
            return Ok((bytes, Origin::Cache));
        }
        if let Some(disk) = &self.shared.caches.disk {
            let (cache, k) = (disk.clone(), key.clone());
            let found = blocking(move || cache.get(&k)).await?;
            if let Some(bytes) = found {
                match verify(bytes.clone()).await {
                    Ok(()) => {
                        self.shared
                            .caches
                            .compressed
                            .insert(key.clone(), bytes.clone());
                        return Ok((bytes, Origin::Cache));
                    }
                    // A file that no longer matches its digests: dropped, fetched anew.
                    Err(ReadError::Index(
                        Error::DigestMismatch { .. } | Error::WindowMismatch { .. },
                    )) => {
                        tracing::warn!(blob = %key.digest, "disk cache entry failed verification; dropped");
                        disk.drop_entry(key);
                    }
                    Err(other) => return Err(other),
                }
            }
        }
        on_miss();
        let bytes = self
            .source
            .read_range(&key.digest, key.start..key.end)
            .await
            .map_err(ReadError::Source)?;
        self.count_fetch(by, bytes.len());
        verify(bytes.clone()).await?;
        if let Some(disk) = &self.shared.caches.disk {
            let (cache, k, b) = (disk.clone(), key.clone(), bytes.clone());
            // Written in the background: the read does not wait for the disk.
            tokio::spawn(blocking(move || cache.insert(&k, &b)));
        }
        self.shared
            .caches
            .compressed
            .insert(key.clone(), bytes.clone());
        Ok((bytes, Origin::Source))
    }

    /// A foreground read found `key` in a cache: a prefetch hit if prefetch put it there.
    fn served_from_cache(&self, key: &RangeKey) {
        if self
            .prefetch
            .prefetched
            .lock()
            .expect("prefetched lock")
            .remove(key)
        {
            self.prefetch.hits.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn stats(&self) -> ReadStats {
        ReadStats {
            reads: self.reads.load(Ordering::Relaxed),
            bytes_returned: self.returned.load(Ordering::Relaxed),
            range_requests: self.range_requests.load(Ordering::Relaxed),
            bytes_fetched: self.fetched.load(Ordering::Relaxed),
            bytes_inflated: self.inflated.load(Ordering::Relaxed),
            read_errors: self.errors.load(Ordering::Relaxed),
            read_ahead_spans: self.read_ahead_spans.load(Ordering::Relaxed),
            read_ahead_bytes: self.read_ahead_bytes.load(Ordering::Relaxed),
        }
    }

    pub fn image(&self) -> &Arc<ImageIndex> {
        &self.image
    }

    pub fn source(&self) -> &S {
        &self.source
    }

    /// Up to `len` bytes of the file at `path` of `tree` (this image's merged tree), from
    /// `offset`: short at the end of the file, like `pread`.
    pub async fn read_path(
        &self,
        tree: &MergedTree,
        path: &str,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, ReadError> {
        use imagemesh_lazyindex::Error;
        let entry = tree
            .get(path)
            .ok_or_else(|| Error::NotFound(path.to_string()))?;
        match entry.data {
            Some(data) => self.read(data, entry.size, offset, len).await,
            None if entry.kind == EntryKind::File => Ok(Bytes::new()),
            None => Err(Error::NotAFile(path.to_string()).into()),
        }
    }

    /// Up to `len` bytes of a file of `size` bytes whose data is at `data`, from `offset`.
    pub async fn read(
        &self,
        data: DataRef,
        size: u64,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, ReadError> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        let result = self.read_range(data, size, offset, len).await;
        match &result {
            Ok(bytes) => self
                .returned
                .fetch_add(bytes.len() as u64, Ordering::Relaxed),
            Err(_) => self.errors.fetch_add(1, Ordering::Relaxed),
        };
        result
    }

    async fn read_range(
        &self,
        data: DataRef,
        size: u64,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, ReadError> {
        let end = offset.saturating_add(len).min(size);
        let (a, b) = (data.offset + offset.min(end), data.offset + end);
        let mut out = BytesMut::new();
        let mut pos = a;
        while pos < b {
            let (start, piece) = self.piece(data.layer, pos).await?;
            let from = (pos - start) as usize;
            let to = ((b - start) as usize).min(piece.len());
            if pos == a && to - from == (b - a) as usize {
                // The whole read is in one piece: hand out a slice, no copy.
                return Ok(piece.slice(from..to));
            }
            out.extend_from_slice(&piece[from..to]);
            pos = start + to as u64;
        }
        Ok(out.freeze())
    }

    /// The cached piece holding uncompressed offset `pos` of `layer`, as (its start, bytes).
    async fn piece(&self, layer: usize, pos: u64) -> Result<(u64, Bytes), ReadError> {
        let index = &self.image.layers[layer];
        let cps = &index.checkpoints;
        let span = cps.partition_point(|c| c.uncompressed_offset <= pos).max(1) - 1;
        let span_start = cps[span].uncompressed_offset;
        let span_end = cps
            .get(span + 1)
            .map_or(index.uncompressed_size, |c| c.uncompressed_offset);
        let start = span_start + (pos - span_start) / PIECE * PIECE;
        let verifier = self.verifiers[layer][span];
        let key = self.key(layer, start, (start + PIECE).min(span_end), verifier);
        if let Some(bytes) = self.shared.caches.decoded.get(&key) {
            return Ok((start, bytes));
        }
        let compressed = index.span_range(span);
        let _flight = self
            .shared
            .flight(self.key(layer, compressed.start, compressed.end, verifier))
            .await;
        if let Some(bytes) = self.shared.caches.decoded.peek(&key) {
            return Ok((start, bytes));
        }
        let run_end = (start + MAX_RUN).min(span_end);
        let run = self.inflate(layer, start, run_end).await?;
        Ok((
            start,
            self.cache_pieces(layer, start, span_end, verifier, &run),
        ))
    }

    /// Fetches (or takes from a cache) and inflates the uncompressed range `[start, end)`,
    /// which lies inside one span. The span's bytes and, when the index holds it remotely, its
    /// checkpoint's window are fetched side by side.
    async fn inflate(&self, layer: usize, start: u64, end: u64) -> Result<Vec<u8>, ReadError> {
        let plan = self.image.layers[layer].plan_read(start..end)?;
        self.note(layer, plan.spans());
        let (compressed, window) = tokio::try_join!(
            self.span_bytes(layer, &plan),
            self.window(layer, plan.checkpoint(), Fetcher::Foreground)
        )?;
        self.decode(layer, &plan, compressed, window).await
    }

    /// The verified compressed bytes of `plan.fetch`: memory first, then the node's disk cache,
    /// then the registry (reading ahead when the layer is read sequentially). The caller holds
    /// the span's flight lock.
    async fn span_bytes(
        &self,
        layer: usize,
        plan: &imagemesh_lazyindex::ReadPlan,
    ) -> Result<Bytes, ReadError> {
        let verifier = spans_verifier(&self.verifiers[layer][plan.spans()]);
        let span_key = self.key(layer, plan.fetch.start, plan.fetch.end, verifier);
        let verify = |bytes| self.verify_read(layer, plan, bytes);
        let on_miss = || self.read_ahead(layer, plan.spans());
        let (bytes, origin) = self
            .load(&span_key, Fetcher::Foreground, verify, on_miss)
            .await?;
        if origin == Origin::Cache {
            self.served_from_cache(&span_key);
        }
        Ok(bytes)
    }

    /// Checks `bytes` against the span digests `plan` covers (off the async threads).
    async fn verify_read(
        &self,
        layer: usize,
        plan: &imagemesh_lazyindex::ReadPlan,
        bytes: Bytes,
    ) -> Result<(), ReadError> {
        let (image, plan) = (self.image.clone(), plan.clone());
        blocking(move || image.layers[layer].verify_read(&plan, &bytes))
            .await?
            .map_err(ReadError::from)
    }

    /// The compressed window of checkpoint `checkpoint` of `layer` when the index holds it
    /// remotely (`None` when the index has it in memory): from the caches, or fetched from the
    /// index blob with one range request, checked against the window's digest before it is
    /// used or cached, and counted as `by`'s fetch.
    async fn window(
        &self,
        layer: usize,
        checkpoint: usize,
        by: Fetcher,
    ) -> Result<Option<Bytes>, ReadError> {
        let (Some(blob), Some(remote)) = (&self.index_blob, &self.image.remote_windows) else {
            return Ok(None);
        };
        let window = &self.image.layers[layer].checkpoints[checkpoint].window;
        if !window.is_remote() {
            return Ok(None);
        }
        let range = remote.ranges[layer][checkpoint].clone();
        let key = RangeKey {
            digest: blob.clone(),
            start: range.start,
            end: range.end,
            verifier: window.digest,
        };
        if let Some(bytes) = self.shared.caches.compressed.get(&key) {
            return Ok(Some(bytes));
        }
        let _flight = self.shared.flight(key.clone()).await;
        let verify = |bytes: Bytes| {
            use sha2::{Digest, Sha256};
            let good = Sha256::digest(&bytes)[..] == window.digest;
            // A 32 KiB digest: cheap enough for the async thread.
            std::future::ready(if good {
                Ok(())
            } else {
                Err(imagemesh_lazyindex::Error::WindowMismatch {
                    layer: self.digests[layer].to_string(),
                    checkpoint,
                }
                .into())
            })
        };
        let (bytes, _) = self.load(&key, by, verify, || ()).await?;
        Ok(Some(bytes))
    }

    /// Inflates what `plan` wants from its verified compressed bytes, in a blocking slot.
    async fn decode(
        &self,
        layer: usize,
        plan: &imagemesh_lazyindex::ReadPlan,
        compressed: Bytes,
        window: Option<Bytes>,
    ) -> Result<Vec<u8>, ReadError> {
        let image = self.image.clone();
        let plan = plan.clone();
        let decoded = blocking(move || {
            image.layers[layer].inflate_verified(&plan, &compressed, window.as_deref())
        })
        .await??;
        self.inflated
            .fetch_add(decoded.len() as u64, Ordering::Relaxed);
        Ok(decoded)
    }

    /// Caches `run` (uncompressed bytes from `start`, decoded through the checkpoint with
    /// identity `verifier`) piece by piece; returns the first piece.
    fn cache_pieces(
        &self,
        layer: usize,
        start: u64,
        span_end: u64,
        verifier: [u8; 32],
        run: &[u8],
    ) -> Bytes {
        let mut first = None;
        for (i, chunk) in run.chunks(PIECE as usize).enumerate() {
            let piece_start = start + i as u64 * PIECE;
            let piece_end = (piece_start + PIECE).min(span_end);
            // Only whole pieces are cached (the last chunk of a run is whole by construction).
            if chunk.len() as u64 != piece_end - piece_start {
                break;
            }
            // Copies, so every cached piece owns exactly its bytes and the budget is honest.
            let bytes = Bytes::copy_from_slice(chunk);
            self.shared.caches.decoded.insert(
                self.key(layer, piece_start, piece_end, verifier),
                bytes.clone(),
            );
            first.get_or_insert(bytes);
        }
        first.unwrap_or_else(|| Bytes::copy_from_slice(&run[..run.len().min(PIECE as usize)]))
    }

    fn key(&self, layer: usize, start: u64, end: u64, verifier: [u8; 32]) -> RangeKey {
        RangeKey {
            digest: self.digests[layer].clone(),
            start,
            end,
            verifier,
        }
    }
}

/// The verifier of bytes covering several spans: the one span's identity, or the sha256 of the
/// identities in order.
fn spans_verifier(identities: &[[u8; 32]]) -> [u8; 32] {
    match identities {
        [one] => *one,
        many => {
            use sha2::{Digest, Sha256};
            let mut hash = Sha256::new();
            for identity in many {
                hash.update(identity);
            }
            hash.finalize().into()
        }
    }
}
