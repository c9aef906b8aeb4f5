use std::process::ExitCode;

use clap::Parser;
use imagemesh_runtime::app::{self, ServiceArgs};

imagemesh_alloc::global_allocator!();

/// imagemesh indexer: reads pushed images with the token that pushed them and stores a
/// lazy-mount index next to each image.
#[derive(Parser)]
#[command(name = "imagemesh-indexer", version)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    app::main("indexer", args.service, imagemesh_indexer::run)
}
