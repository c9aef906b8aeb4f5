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
    runtime.block_on(imagemesh_cli::run(cli))
}
