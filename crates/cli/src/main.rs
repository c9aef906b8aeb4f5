use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = imagemesh_cli::Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("imagemesh: cannot start: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        // Spans of this command are the root of the request's trace; the guard flushes them.
        let _telemetry = imagemesh_runtime::telemetry::init_cli("imagemesh-cli");
        imagemesh_cli::run(cli).await
    })
}
