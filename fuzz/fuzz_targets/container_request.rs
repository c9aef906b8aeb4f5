//! Fuzzes request decoding as the scheduler and the workers do it (`imagemesh_proto::decode`):
//! arbitrary bytes as a protobuf `ContainerRequest` and as proto3 JSON must decode or give an
//! error, never panic; whatever decodes must re-encode to the same request both ways.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| imagemesh_proto::fuzzing::container_request(data));
