use std::process::ExitCode;

use clap::Parser;
use imagemesh_runtime::app::{self, ServiceArgs};

imagemesh_alloc::global_allocator!();

/// imagemesh credential service: holds long-term registry credentials and answers
/// `imagemesh.credential.mint` / `imagemesh.credential.refresh` with short-lived scoped ones.
#[derive(Parser)]
#[command(name = "imagemesh-credential", version)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    app::main("credential", args.service, imagemesh_credential::run)
}
