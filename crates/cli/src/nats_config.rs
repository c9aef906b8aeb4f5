//! `imagemesh nats-config`: the security bundle of a mesh (identities, TLS, the nats-server
//! authorization config rendered from the permission table) and the permission matrix.

use std::path::PathBuf;
use std::process::ExitCode;

use imagemesh_access::{Bundle, BundleSpec};

#[derive(Debug, clap::Args)]
pub struct NatsConfigArgs {
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Generate a new bundle in DIR: an nkey per identity, a local CA and server certificate,
    /// the JetStream encryption key, and `auth.conf` for nats-server.
    Generate {
        dir: PathBuf,
        /// Tenants (comma-separated or repeated); each gets the client identity
        /// `client-<tenant>`.
        #[arg(long, value_delimiter = ',', default_value = "default")]
        tenants: Vec<String>,
        /// Worker id of a builder instance (repeatable).
        #[arg(long = "builder", default_value = "builder-1")]
        builders: Vec<String>,
        /// Worker id of a mounter instance (repeatable).
        #[arg(long = "mounter", default_value = "mounter-1")]
        mounters: Vec<String>,
        #[arg(long, default_value_t = 1)]
        credentials: usize,
        #[arg(long, default_value_t = 1)]
        schedulers: usize,
        #[arg(long, default_value_t = 1)]
        indexers: usize,
        /// A DNS name or IP address the server certificate is valid for (repeatable).
        #[arg(long = "server-name", default_values = ["127.0.0.1", "localhost"])]
        server_names: Vec<String>,
        /// Issue a client certificate per identity; the server then requires one.
        #[arg(long)]
        mutual_tls: bool,
    },
    /// Print a whole single-server nats-server config for the bundle in DIR.
    Server {
        dir: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:4222")]
        listen: String,
        /// JetStream store directory.
        #[arg(long)]
        store: PathBuf,
    },
    /// Print `export` lines that make a service (or, with --cli, the imagemesh CLI) connect as
    /// identity NAME of the bundle in DIR.
    Env {
        dir: PathBuf,
        name: String,
        #[arg(long)]
        cli: bool,
    },
    /// Print the permission matrix (Markdown) of the bundle in DIR, or of an example mesh.
    Matrix { dir: Option<PathBuf> },
}

pub fn run(args: NatsConfigArgs) -> anyhow::Result<ExitCode> {
    match args.action {
        Action::Generate {
            dir,
            tenants,
            builders,
            mounters,
            credentials,
            schedulers,
            indexers,
            server_names,
            mutual_tls,
        } => {
            for tenant in &tenants {
                imagemesh_proto::validate_tenant(tenant).map_err(anyhow::Error::msg)?;
            }
            let spec = BundleSpec {
                tenants,
                credentials,
                schedulers,
                indexers,
                builders,
                mounters,
                server_names,
                mutual_tls,
            };
            let bundle = Bundle::generate(&dir, spec)?;
            for identity in bundle.identities() {
                println!("{:<24} {}", identity.name, identity.role.kind());
            }
            eprintln!(
                "wrote {} identities, TLS material and auth.conf to {}",
                bundle.identities().len(),
                dir.display()
            );
        }
        Action::Server { dir, listen, store } => {
            print!("{}", Bundle::load(&dir)?.server_config(&listen, &store)?);
        }
        Action::Env { dir, name, cli } => {
            let bundle = Bundle::load(&dir)?;
            bundle.identity(&name)?;
            let env = if cli {
                bundle.cli_env(&name)
            } else {
                bundle.env_for(&name)
            };
            for (key, value) in env {
                println!("export {key}={value:?}");
            }
        }
        Action::Matrix { dir } => {
            let (identities, facts) = match dir {
                Some(dir) => {
                    let bundle = Bundle::load(&dir)?;
                    (bundle.identities().to_vec(), bundle.facts())
                }
                None => imagemesh_access::render::example(),
            };
            print!("{}", imagemesh_access::render::matrix(&identities, &facts));
        }
    }
    Ok(ExitCode::SUCCESS)
}
