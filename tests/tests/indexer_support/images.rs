//! The test images: built with umoci from generated files, covering what the index must get
//! right (many small files, a large random file, links, whiteouts, opaque directories, long
//! names, owners and odd modes), in several layers.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use imagemesh_testkit::oci_images::OciLayout;

/// Size of the random file: large enough (compressed) to get checkpoints with default settings.
pub const RANDOM_SIZE: usize = 24 << 20;

/// xorshift64*: deterministic test data without a dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }

    /// Compressible text, so deflate back-references cross block boundaries.
    pub fn text(&mut self, n: usize) -> Vec<u8> {
        const WORDS: [&str; 8] = [
            "layer", "index", "inflate", "tar", "gzip", "mount", "lazy", "\n",
        ];
        let mut v = Vec::with_capacity(n + 16);
        while v.len() < n {
            v.extend_from_slice(WORDS[self.below(8) as usize].as_bytes());
            v.push(b' ');
        }
        v.truncate(n);
        v
    }
}

pub fn write(path: &Path, data: &[u8], mode: u32) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, data).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Many small files, a large random file, links, odd modes and owners, long names.
fn base_tree(dir: &Path, rng: &mut Rng) {
    for i in 0..300 {
        let len = rng.below(6000) as usize;
        let mode = [0o644, 0o600, 0o755, 0o444][i % 4];
        write(
            &dir.join(format!("small/d{}/f{i}.txt", i % 13)),
            &rng.text(len),
            mode,
        );
    }
    write(&dir.join("small/empty"), b"", 0o644);
    write(&dir.join("big/random.bin"), &rng.bytes(RANDOM_SIZE), 0o600);
    write(&dir.join("big/text.log"), &rng.text(3 << 20), 0o640);
    write(&dir.join("bin/tool"), b"#!/bin/sh\necho tool\n", 0o4755);
    std::os::unix::fs::symlink("tool", dir.join("bin/tool-link")).unwrap();
    std::os::unix::fs::symlink("/etc/missing", dir.join("bin/dangling")).unwrap();
    std::os::unix::fs::symlink("../big", dir.join("bin/big-dir")).unwrap();
    fs::hard_link(dir.join("bin/tool"), dir.join("bin/tool-hard")).unwrap();
    let deep = dir
        .join("long")
        .join("n".repeat(120))
        .join("m".repeat(100))
        .join(format!("{}.txt", "x".repeat(200)));
    write(&deep, b"a path longer than 255 bytes", 0o644);
    write(
        &dir.join("long").join("y".repeat(250)),
        b"a 250-byte name",
        0o644,
    );
    write(&dir.join("owned/file"), b"owned", 0o640);
    std::os::unix::fs::chown(dir.join("owned/file"), Some(1234), Some(5678)).unwrap();
    std::os::unix::fs::chown(dir.join("owned"), Some(42), Some(43)).unwrap();
    write(&dir.join("gone/file"), b"to be whited out", 0o644);
    write(&dir.join("opq/old-a"), b"old", 0o644);
    write(&dir.join("opq/sub/old-b"), b"old", 0o644);
    write(&dir.join("replace/dir-becomes-file/x"), b"x", 0o644);
    write(&dir.join("edit/me"), b"version 1", 0o644);
}

/// Builds the four-layer image `tag` in `layout`: base tree; deletions, a replacement, an edit
/// and a hardlink to a lower-layer file (repack writes the whiteouts); an opaque directory; an
/// explicit whiteout.
pub fn build_full(layout: &OciLayout, tag: &str) {
    let mut rng = Rng::new(42);
    layout.new_image(tag);
    let src = layout.scratch("src1");
    base_tree(&src, &mut rng);
    layout.insert(tag, &src, "/");

    let bundle = layout.scratch("edit-bundle").join("b");
    let root = layout.unpack(tag, &bundle);
    fs::remove_file(root.join("small/d3/f3.txt")).unwrap();
    fs::remove_dir_all(root.join("small/d5")).unwrap();
    fs::remove_dir_all(root.join("replace/dir-becomes-file")).unwrap();
    write(&root.join("replace/dir-becomes-file"), b"now a file", 0o644);
    write(&root.join("edit/me"), b"version 2, longer", 0o600);
    fs::hard_link(root.join("big/text.log"), root.join("edit/log-link")).unwrap();
    layout.repack(tag, &bundle);

    let src3 = layout.scratch("src3");
    write(&src3.join("new-c"), b"new", 0o644);
    layout.insert_opaque(tag, &src3, "/opq");
    layout.whiteout(tag, "/gone");
}

/// A layer with a few files named after `name` under `/name`.
pub fn small_layer(layout: &OciLayout, tag: &str, name: &str) {
    let src = layout.scratch(&format!("src-{name}"));
    let mut rng = Rng::new(name.len() as u64 + 7);
    for i in 0..5 {
        write(
            &src.join(format!("{name}/file{i}")),
            &rng.text(2000 + i * 100),
            0o644,
        );
    }
    layout.insert(tag, &src, "/");
}
