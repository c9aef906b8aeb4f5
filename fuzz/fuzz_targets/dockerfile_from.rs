//! Fuzzes the Dockerfile `FROM` parser the scheduler and the builder use to find a build's base
//! images (`imagemesh_registry::dockerfile::base_images`): any text, with or without build
//! args, must name zero or more valid references, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| imagemesh_registry::dockerfile::fuzz_one(data));
