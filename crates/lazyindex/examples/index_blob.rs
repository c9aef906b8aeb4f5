//! Indexes layer blobs from files and prints what it measured: time, throughput, checkpoints
//! and encoded index size relative to the uncompressed layer. Used to compare against
//! `tar -tzf` and `gzip -dc` on the same blobs (see docs/index-format.md, "Measurements").
//!
//! ```text
//! cargo run --release -p imagemesh-lazyindex --example index_blob -- [--span BYTES] BLOB...
//! ```

use std::time::Instant;

use imagemesh_lazyindex::{IndexOptions, encode_layer, index_layer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut options = IndexOptions::default();
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("--span") {
        args.next();
        options.span_size = args.next().ok_or("--span needs a value")?.parse()?;
    }
    let (mut total_in, mut total_out, mut total_index) = (0u64, 0u64, 0usize);
    let start = Instant::now();
    for path in args {
        let file = std::fs::File::open(&path)?;
        let t = Instant::now();
        let layer = index_layer(file, &options)?;
        let secs = t.elapsed().as_secs_f64();
        let encoded = encode_layer(&layer).len();
        let windows: usize = layer
            .checkpoints
            .iter()
            .map(|c| c.window.compressed.len())
            .sum();
        println!(
            "{path}: {} entries, {} checkpoints ({windows} B of windows), {:.1} MB -> {:.1} MB in {secs:.2}s ({:.0} MB/s out), index {encoded} B = {:.3}%",
            layer.entries.len(),
            layer.checkpoints.len(),
            layer.compressed_size as f64 / 1e6,
            layer.uncompressed_size as f64 / 1e6,
            layer.uncompressed_size as f64 / 1e6 / secs,
            100.0 * encoded as f64 / layer.uncompressed_size.max(1) as f64,
        );
        total_in += layer.compressed_size;
        total_out += layer.uncompressed_size;
        total_index += encoded;
    }
    println!(
        "total: {:.1} MB -> {:.1} MB in {:.2}s, index {total_index} B = {:.3}% of uncompressed",
        total_in as f64 / 1e6,
        total_out as f64 / 1e6,
        start.elapsed().as_secs_f64(),
        100.0 * total_index as f64 / total_out.max(1) as f64,
    );
    Ok(())
}
