use std::process::ExitCode;

use clap::Parser;
use imagemesh_runtime::app::{self, ServiceArgs};

imagemesh_alloc::global_allocator!();

/// imagemesh mounter: for runtime requests, mounts the image lazily with the request's
/// credentials, refreshing them before they expire.
#[derive(Parser)]
#[command(name = "imagemesh-mounter", version)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    app::main_on(
        "mounter",
        args.service,
        imagemesh_mounter::runtime(),
        imagemesh_mounter::run,
    )
}
