//! The crate's typed error. Callers match on it (e.g. the indexer maps `CorruptGzip` and
//! `CorruptTar` to a permanent "bad layer" failure, `Source` to a retryable registry error).

/// Boxed error from a [`crate::BlobSource`] implementation.
pub type SourceError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong while indexing, encoding, decoding or reading.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading the layer stream failed.
    #[error("reading the layer: {0}")]
    Io(#[from] std::io::Error),

    /// The gzip stream is not valid gzip/deflate.
    #[error("corrupt gzip stream at compressed offset {offset}: {reason}")]
    CorruptGzip { offset: u64, reason: String },

    /// The layer ended before the gzip member or tar entry did.
    #[error("truncated layer: {0}")]
    Truncated(&'static str),

    /// The tar stream is malformed (bad checksum, unparsable number, bad PAX record).
    #[error("corrupt tar stream at uncompressed offset {offset}: {reason}")]
    CorruptTar { offset: u64, reason: String },

    /// A configured bound was exceeded (metadata size, entry count, index size).
    #[error("{what} exceeds the limit of {limit}")]
    LimitExceeded { what: &'static str, limit: u64 },

    /// Valid input we deliberately do not handle (e.g. zstd layers, sparse files).
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// An encoded index failed validation.
    #[error("invalid index: {0}")]
    InvalidIndex(String),

    /// Bytes fetched for a read did not match the span digest recorded at index time.
    #[error("digest mismatch for span {span} of layer {layer}")]
    DigestMismatch { layer: String, span: usize },

    /// A window fetched for a read did not match the digest its index records.
    #[error("digest mismatch for the window of checkpoint {checkpoint} of layer {layer}")]
    WindowMismatch { layer: String, checkpoint: usize },

    /// The index does not describe the requested data.
    #[error("not found: {0}")]
    NotFound(String),

    /// The path exists but has no readable bytes (directory, device, ...).
    #[error("not a regular file: {0}")]
    NotAFile(String),

    /// The blob source failed.
    #[error("blob source: {0}")]
    Source(#[source] SourceError),
}

/// Shorthand used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn invalid(reason: impl Into<String>) -> Self {
        Error::InvalidIndex(reason.into())
    }

    pub(crate) fn tar(offset: u64, reason: impl std::fmt::Display) -> Self {
        Error::CorruptTar {
            offset,
            reason: reason.to_string(),
        }
    }
}
