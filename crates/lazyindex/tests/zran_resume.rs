//! Checkpoint resume must reproduce plain inflation exactly, at any offset, across deflate
//! blocks, mid-byte checkpoints and gzip member boundaries.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{Rng, TarBuilder, gzip, gzip_members, index, index_plain, read_range, sha256};
use imagemesh_lazyindex::{CheckpointKind, Compression, EntryKind, LayerIndex};

/// A > 30 MiB tar of alternating random and text files.
fn big_tar(seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut tar = TarBuilder::default();
    for i in 0..14 {
        let extra = rng.below(500_000) as usize;
        let data = if i % 2 == 0 {
            rng.bytes(1_000_000 + 2 * extra)
        } else {
            rng.text(3_000_000 + extra)
        };
        tar.file(&format!("data/file-{i}"), &data);
    }
    let raw = tar.finish();
    assert!(raw.len() > 30 << 20, "test layer is {} bytes", raw.len());
    raw
}

/// Reads many random ranges plus ranges around every checkpoint and compares them to `raw`.
fn check_random_reads(layer: &LayerIndex, blob: &[u8], raw: &[u8], seed: u64) {
    let mut rng = Rng::new(seed);
    let total = raw.len() as u64;
    let mut ranges: Vec<(u64, u64)> = (0..150)
        .map(|_| {
            let start = rng.below(total);
            (start, (start + 1 + rng.below(300_000)).min(total))
        })
        .collect();
    for cp in &layer.checkpoints {
        let at = cp.uncompressed_offset;
        ranges.push((at.saturating_sub(10), (at + 10).min(total)));
        ranges.push((at, (at + 1).min(total)));
    }
    ranges.push((total - 1, total));
    for (start, end) in ranges {
        let got = read_range(layer, blob, start..end);
        assert!(
            got == raw[start as usize..end as usize],
            "mismatch at {start}..{end}"
        );
    }
}

fn check_files(layer: &LayerIndex, raw: &[u8]) {
    let mut archive = tar::Archive::new(raw);
    let files = layer.entries.iter().filter(|e| e.kind == EntryKind::File);
    for (entry, theirs) in files.zip(archive.entries().unwrap()) {
        let theirs = theirs.unwrap();
        assert_eq!(entry.offset, Some(theirs.raw_file_position()));
        assert_eq!(entry.size, theirs.size());
    }
}

#[test]
fn resume_equals_plain_inflation_single_member() {
    let raw = big_tar(1);
    let gz = gzip(&raw);
    let layer = index(&gz, 1 << 20);
    assert_eq!(layer.compression, Compression::Gzip);
    assert_eq!(layer.digest, sha256(&gz));
    assert_eq!(layer.diff_id, sha256(&raw));
    assert_eq!(layer.uncompressed_size, raw.len() as u64);
    let blocks = layer
        .checkpoints
        .iter()
        .filter(|c| c.kind == CheckpointKind::Block);
    assert!(
        blocks.clone().count() >= 25,
        "{} checkpoints",
        layer.checkpoints.len()
    );
    assert!(
        blocks.clone().any(|c| c.bit_offset != 0),
        "expected mid-byte checkpoints"
    );
    assert!(blocks.clone().all(|c| c.window.len == 32 * 1024));
    check_files(&layer, &raw);
    check_random_reads(&layer, &gz, &raw, 11);
}

#[test]
fn resume_across_gzip_members() {
    let raw = big_tar(2);
    // Members of 2.5 MiB with 1 MiB spans: checkpoints land inside members and at member starts,
    // and reads cross member boundaries (raw resume, trailer, next header).
    let gz = gzip_members(&raw, 2_500_000);
    let layer = index(&gz, 1 << 20);
    assert_eq!(layer.digest, sha256(&gz));
    assert_eq!(layer.diff_id, sha256(&raw));
    let members = layer
        .checkpoints
        .iter()
        .filter(|c| c.kind == CheckpointKind::Member);
    assert!(members.count() > 1, "expected member-start checkpoints");
    check_files(&layer, &raw);
    check_random_reads(&layer, &gz, &raw, 12);
}

#[test]
fn resume_with_gnu_gzip_output_and_concatenation() {
    let raw = big_tar(3);
    let half = raw.len() / 2;
    let mut gz = gnu_gzip(&raw[..half]);
    gz.extend(gnu_gzip(&raw[half..]));
    let layer = index(&gz, 1 << 20);
    assert_eq!(layer.diff_id, sha256(&raw));
    check_random_reads(&layer, &gz, &raw, 13);
}

#[test]
fn plain_tar_layers_read_directly() {
    let raw = big_tar(4);
    let layer = index_plain(&raw, 1 << 20);
    assert_eq!(layer.compression, Compression::None);
    assert_eq!(layer.digest, layer.diff_id);
    assert!(layer.checkpoints.len() >= 30);
    check_files(&layer, &raw);
    check_random_reads(&layer, &raw, &raw, 14);
}

#[test]
fn small_layers_keep_one_span_over_the_whole_blob() {
    let mut tar = TarBuilder::default();
    tar.file("a", b"hello");
    let raw = tar.finish();
    let gz = gzip(&raw);
    let layer = imagemesh_lazyindex::index_layer(&gz[..], &Default::default()).unwrap();
    assert_eq!(layer.checkpoints.len(), 1);
    assert_eq!(layer.span_range(0), 0..gz.len() as u64);
    let plan = layer.plan_read(512..517).unwrap();
    assert_eq!(plan.fetch, 0..gz.len() as u64);
    assert_eq!(read_range(&layer, &gz, 512..517), b"hello");
}

fn gnu_gzip(data: &[u8]) -> Vec<u8> {
    let mut child = Command::new("gzip")
        .args(["-c", "-6"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("gzip is installed");
    let mut stdin = child.stdin.take().unwrap();
    let input = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(out.status.success());
    out.stdout
}
