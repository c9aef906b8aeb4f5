//! Compiles `protos/` with protox (pure Rust, no system protoc) and prost.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "imagemesh/v1/credential.proto",
    "imagemesh/v1/request.proto",
    "imagemesh/v1/status.proto",
    "imagemesh/v1/placement.proto",
];

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../protos");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={}", root.join(proto).display());
    }
    let descriptors = protox::compile(PROTOS, [&root]).expect("protos compile");

    // The descriptor set lets us read the proto3 JSON mapping at runtime (prost-reflect).
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let encoded = prost::Message::encode_to_vec(&descriptors);
    std::fs::write(out.join("descriptors.bin"), encoded).unwrap();

    prost_build::Config::new()
        .enable_type_names()
        // Hand-written Debug that redacts the secret, and the build args' values.
        .skip_debug([
            "imagemesh.v1.RegistryCredential",
            "imagemesh.v1.BuildOptions",
        ])
        .compile_fds(descriptors)
        .expect("prost codegen");
}
