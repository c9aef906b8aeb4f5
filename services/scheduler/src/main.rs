use std::process::ExitCode;

use clap::Parser;
use imagemesh_runtime::app::{self, ServiceArgs};

imagemesh_alloc::global_allocator!();

/// imagemesh scheduler: reads ContainerRequests from the durable intake, attaches image and
/// build-registry credentials to every one of them, and dispatches builds to builders and
/// runtime requests to mounters.
#[derive(Parser)]
#[command(name = "imagemesh-scheduler", version)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    app::main("scheduler", args.service, imagemesh_scheduler::run)
}
