//! The body of the `container_request` fuzz target (`fuzz/`), here so the seed corpus also runs
//! in every `cargo test` (`tests/fuzz_seeds.rs`), nightly or not.

use prost::Message;

use crate::codec::{self, CONTENT_TYPE_JSON};
use crate::v1::ContainerRequest;

/// Decodes `data` as a protobuf and as a proto3 JSON `ContainerRequest`, as the scheduler and
/// workers do; whatever decodes must survive a round trip through both encodings unchanged.
/// Panics on any violation.
pub fn container_request(data: &[u8]) {
    if let Ok(request) = codec::decode::<ContainerRequest>(data, None) {
        round_trip(&request);
    }
    if let Ok(request) = codec::decode::<ContainerRequest>(data, Some(CONTENT_TYPE_JSON)) {
        round_trip(&request);
    }
}

fn round_trip(request: &ContainerRequest) {
    let bytes = request.encode_to_vec();
    let again = ContainerRequest::decode(bytes.as_slice()).expect("own protobuf decodes");
    assert_eq!(&again, request, "protobuf round trip");
    let json = serde_json::to_vec(&codec::to_json(request)).expect("JSON serializes");
    let again: ContainerRequest =
        codec::decode(&json, Some(CONTENT_TYPE_JSON)).expect("own JSON decodes");
    assert_eq!(&again, request, "JSON round trip");
}
