use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// imagemesh mount keeper: holds the mounter's FUSE connections so its mounts outlive it
/// (a restart, an upgrade, a crash). Run one per node next to the mounter, with the socket in
/// a directory only the mounter's user can reach, and the same path in the mounter's
/// `mounter.keeper_socket`.
#[derive(Parser)]
#[command(name = "imagemesh-mount-keeper", version)]
struct Args {
    /// The unix socket to serve (its directory is created 0700, the socket 0600).
    #[arg(long, env = "IMAGEMESH_KEEPER_SOCKET")]
    socket: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    match imagemesh_mounter::keeper::serve(&args.socket) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(socket = %args.socket.display(), error = %err, "mount keeper stopped");
            ExitCode::FAILURE
        }
    }
}
