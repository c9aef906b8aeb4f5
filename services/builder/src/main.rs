use std::process::ExitCode;

use clap::Parser;
use imagemesh_runtime::app::{self, ServiceArgs};

imagemesh_alloc::global_allocator!();

/// imagemesh builder: builds images for build requests and pushes them to the build registry
/// with the request's build-registry token, then asks the indexer to index them.
#[derive(Parser)]
#[command(name = "imagemesh-builder", version)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    app::main("builder", args.service, imagemesh_builder::run)
}
