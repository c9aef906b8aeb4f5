//! Runs the `container_request` fuzz target's body over its committed seed corpus
//! (`fuzz/corpus/container_request`), so the seeds stay valid and the decoding paths run in every
//! `cargo test`. `cargo test -p imagemesh-proto --test fuzz_seeds -- --ignored` regenerates the
//! protobuf seeds (the JSON ones are written by hand).

use std::path::{Path, PathBuf};

use imagemesh_proto::codec::{self, CONTENT_TYPE_JSON};
use imagemesh_proto::fuzzing::container_request;
use imagemesh_proto::v1::{
    AuthScheme, BuildOptions, ContainerRequest, RegistryCredential, RequestKind,
};
use prost::Message;

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/container_request")
}

fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(corpus())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(p).unwrap())
        })
        .collect()
}

#[test]
fn container_request_seeds() {
    let seeds = seeds();
    assert!(seeds.len() >= 4);
    for (name, seed) in seeds {
        container_request(&seed);
        // Each seed is a valid request in its own encoding, so the fuzzer starts from the
        // interesting paths rather than from errors.
        let decoded = if name.ends_with(".json") {
            codec::decode::<ContainerRequest>(&seed, Some(CONTENT_TYPE_JSON))
        } else {
            codec::decode::<ContainerRequest>(&seed, None)
        };
        let request = decoded.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!request.request_id.is_empty(), "{name}");
    }
}

fn build() -> ContainerRequest {
    let mut build_args = std::collections::HashMap::new();
    build_args.insert("TAG".into(), "1.36".into());
    ContainerRequest {
        request_id: "build-1".into(),
        image_id: "img-1".into(),
        kind: RequestKind::Build as i32,
        build_options: Some(BuildOptions {
            dockerfile: "ARG TAG\nFROM busybox:${TAG}\nRUN echo hi\n".into(),
            context_object: "ctx-1".into(),
            build_args,
            timeout_seconds: 60,
            ..Default::default()
        }),
        build_registry_creds: Some(RegistryCredential {
            registry: "127.0.0.1:5000".into(),
            scheme: AuthScheme::Bearer as i32,
            username: "u".into(),
            secret: "s".into(),
            ..Default::default()
        }),
        build_image_ref: "127.0.0.1:5000/imagemesh/builds/default:img-1".into(),
        submitted_at: Some(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 5,
        }),
        tenant: "default".into(),
        ..Default::default()
    }
}

fn runtime() -> ContainerRequest {
    ContainerRequest {
        request_id: "run-1".into(),
        container_id: "c-1".into(),
        kind: RequestKind::Runtime as i32,
        image_ref: "docker.io/library/busybox:1.36".into(),
        ..Default::default()
    }
}

#[test]
#[ignore = "writes the protobuf seeds into fuzz/corpus/container_request"]
fn regenerate_seeds() {
    std::fs::write(corpus().join("build.pb"), build().encode_to_vec()).unwrap();
    std::fs::write(corpus().join("runtime.pb"), runtime().encode_to_vec()).unwrap();
    let json = serde_json::to_vec_pretty(&codec::to_json(&build())).unwrap();
    std::fs::write(corpus().join("build-generated.json"), json).unwrap();
}
