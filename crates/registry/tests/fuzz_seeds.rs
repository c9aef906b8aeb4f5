//! Runs the `dockerfile_from` fuzz target's body over its committed seed corpus
//! (`fuzz/corpus/dockerfile_from`), so the seeds stay meaningful and the FROM parser's paths run
//! in every `cargo test`, nightly or not.

use std::collections::HashMap;
use std::path::Path;

use imagemesh_registry::dockerfile::{base_images, fuzz_one};

#[test]
fn dockerfile_from_seeds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/dockerfile_from");
    let mut found = 0;
    let mut seeds = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let seed = std::fs::read(entry.unwrap().path()).unwrap();
        fuzz_one(&seed);
        let text = String::from_utf8_lossy(&seed);
        let dockerfile = text.split('\0').next().unwrap();
        found += base_images(dockerfile, &HashMap::new()).len();
        seeds += 1;
    }
    assert!(seeds >= 4);
    assert!(found >= 4, "the seeds name base images ({found})");
}
