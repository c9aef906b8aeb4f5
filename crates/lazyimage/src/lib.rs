//! An image's lazy index in a registry: push it, find it, load it, and read the image's files
//! through it. Everything that knows where the index lives or how files are read lazily is here;
//! the index *format* is `imagemesh-lazyindex`, plain registry access is `imagemesh-registry`.
//!
//! - [`artifact`]: the index artifact (an OCI artifact whose `subject` is the image manifest),
//!   its constants, finding it (referrers API, else the referrers tag schema) and loading the
//!   index checked against the image it must describe.
//! - [`store`]: pushing an index as that artifact and listing it under the referrers tag (the
//!   indexer).
//! - [`registry_source`]: layer blob ranges over HTTP, the [`BlobSource`] behind every read.
//! - [`reader`]: the one caching reader of files, generic over any [`BlobSource`]: the mounter,
//!   `imagemesh index cat` and the tests read through it. It counts what it fetched, so there
//!   is one [`ReadStats`].
//! - [`prefetch`]: the recorded prefetch list of an image (which spans its first run read), an
//!   artifact next to the index, found, pushed and replayed through the reader.
//! - [`cache`] + [`disk_cache`]: the byte-bounded caches a reader shares with every reader of
//!   the process, in memory and on disk, keyed by what verified their bytes.
//! - [`blocking`]: the bounded slots all their blocking work runs in.
//!
//! `docs/index-format.md` describes the artifact; `docs/mounter.md` the reader and its caches.
#![forbid(unsafe_code)]

pub mod artifact;
pub mod blocking;
pub mod cache;
pub mod disk_cache;
pub mod prefetch;
pub mod reader;
pub mod registry_source;
pub mod store;

pub use artifact::{
    IndexArtifact, IndexLoadError, LoadedIndex, find_index_artifact, load_index,
    load_index_sharing, referrers_tag,
};
pub use cache::{CacheConfig, Caches};
pub use imagemesh_lazyindex::{BlobSource, MemorySource, OciLayoutSource, SourceError};
pub use prefetch::{FoundPrefetch, PrefetchList, RecordedSpan, find_prefetch, push_prefetch};
pub use reader::{ImageReader, MAX_READ_AHEAD, PrefetchStats, ReadError, ReadStats, Shared};
pub use registry_source::RegistryBlobSource;
pub use store::{Stored, push_index};
