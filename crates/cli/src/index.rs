//! `imagemesh index show|cat`: inspect an image's lazy-mount index straight from the registry.
//!
//! Both find the index the way a mounter does: resolve the image to its platform manifest,
//! look up the index artifact that refers to it (referrers API, or the `sha256-<hex>` referrers
//! tag on registries without one), and decode it. `cat` then reads one file through the same
//! caching reader the mounter uses (`imagemesh_lazyimage::ImageReader`): one HTTP range request
//! per span of the file, inflated from the span's checkpoint. No NATS connection is needed.

use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, anyhow, bail};
use imagemesh_lazyimage::{ImageReader, RegistryBlobSource, Shared};
use imagemesh_lazyindex::{EntryKind, ImageIndex, MergedEntry, MergedTree};
use imagemesh_proto::v1::{AuthScheme, RegistryCredential};
use imagemesh_registry::{
    PlatformSpec, Reference, RegistryClient, RegistrySettings, ResolvedImage,
};
use serde::Serialize;

/// Environment variable holding the registry password (never a command-line flag).
pub const PASSWORD_ENV: &str = "IMAGEMESH_REGISTRY_PASSWORD";
/// Bytes of a file read per range request by `cat` (bounds memory for large files).
const CAT_CHUNK: u64 = 32 << 20;
/// Symlinks followed while resolving a path, like the kernel's limit.
const MAX_SYMLINKS: usize = 40;

#[derive(Debug, clap::Args)]
pub struct IndexArgs {
    #[command(subcommand)]
    pub command: IndexCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum IndexCommand {
    /// Print the image's merged file tree from its index, one JSON object per line.
    Show {
        /// Image reference, e.g. 127.0.0.1:5000/team/app:v1 or …@sha256:…
        image: String,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Write one file of the image to stdout, fetching only the compressed range it needs.
    Cat {
        image: String,
        /// Path inside the image, e.g. /etc/os-release.
        path: String,
        /// Report on stderr (one JSON line) how many bytes were fetched from the registry.
        #[arg(long)]
        stats: bool,
        #[command(flatten)]
        registry: RegistryArgs,
    },
}

/// How to reach and authenticate to the image's registry.
#[derive(Debug, clap::Args)]
pub struct RegistryArgs {
    /// Registry user name (anonymous without one).
    #[arg(long, env = "IMAGEMESH_REGISTRY_USERNAME")]
    pub username: Option<String>,
    /// Read the registry password from the first line of stdin; without this flag it comes
    /// from IMAGEMESH_REGISTRY_PASSWORD.
    #[arg(long)]
    pub password_stdin: bool,
    /// Speak plain HTTP to the registry (loopback registries always are).
    #[arg(long)]
    pub insecure: bool,
    /// Platform to pick from a multi-platform image.
    #[arg(long, default_value = "linux/amd64")]
    pub platform: String,
}

pub async fn run(args: IndexArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        IndexCommand::Show { image, registry } => show(&image, &registry).await,
        IndexCommand::Cat {
            image,
            path,
            stats,
            registry,
        } => cat(&image, &path, stats, &registry).await,
    }
}

/// An image with its decoded index.
struct Opened {
    client: Arc<RegistryClient>,
    image: ResolvedImage,
    index: Arc<ImageIndex>,
}

async fn open(image: &str, args: &RegistryArgs) -> anyhow::Result<Opened> {
    let reference: Reference = image
        .parse()
        .with_context(|| format!("image reference {image:?}"))?;
    let registry = reference.registry().to_string();
    let credential = credential(&registry, args)?;
    let settings = RegistrySettings {
        insecure: if args.insecure {
            vec![registry.clone()]
        } else {
            Vec::new()
        },
        ..Default::default()
    };
    let client = Arc::new(RegistryClient::new(
        &registry,
        credential.as_ref(),
        &settings,
    ));
    let platform = PlatformSpec::parse(&args.platform).map_err(|e| anyhow!(e))?;
    let resolved = client.resolve_image(&reference, &platform).await?;
    let index = imagemesh_lazyimage::load_index(&client, &resolved)
        .await?
        .index;
    Ok(Opened {
        client,
        image: resolved,
        index,
    })
}

/// The credential from `--username` and the password from stdin or the environment.
fn credential(registry: &str, args: &RegistryArgs) -> anyhow::Result<Option<RegistryCredential>> {
    let Some(username) = &args.username else {
        if args.password_stdin {
            bail!("--password-stdin needs --username");
        }
        return Ok(None);
    };
    let secret = if args.password_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the password from stdin")?;
        line.trim_end_matches(['\r', '\n']).to_string()
    } else {
        std::env::var(PASSWORD_ENV).map_err(|_| {
            anyhow!("--username needs a password: --password-stdin or {PASSWORD_ENV}")
        })?
    };
    Ok(Some(RegistryCredential {
        registry: registry.to_string(),
        scheme: AuthScheme::Basic as i32,
        username: username.clone(),
        secret,
        ..Default::default()
    }))
}

/// One line of `index show`.
#[derive(Serialize)]
struct Line<'a> {
    path: String,
    #[serde(rename = "type")]
    kind: &'static str,
    mode: u32,
    uid: u64,
    gid: u64,
    size: u64,
    mtime: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    link_target: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hardlink_to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<(u32, u32)>,
}

fn absolute(path: &str) -> String {
    format!("/{path}")
}

fn line<'a>(path: &str, e: &'a MergedEntry) -> Line<'a> {
    Line {
        path: absolute(path),
        kind: e.kind.as_str(),
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        size: e.size,
        mtime: e.mtime,
        link_target: e.link_target.as_deref(),
        hardlink_to: e.hardlink_to.as_deref().map(absolute),
        device: e.device,
    }
}

async fn show(image: &str, args: &RegistryArgs) -> anyhow::Result<ExitCode> {
    let opened = open(image, args).await?;
    let tree = MergedTree::from_layers(&opened.index.layers);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for (path, entry) in tree.iter() {
        serde_json::to_writer(&mut out, &line(path, entry))?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

async fn cat(
    image: &str,
    path: &str,
    stats: bool,
    args: &RegistryArgs,
) -> anyhow::Result<ExitCode> {
    let Opened {
        client,
        image,
        index,
    } = open(image, args).await?;
    let source = RegistryBlobSource::new(client, &image.reference).await;
    let tree = MergedTree::from_layers(&index.layers);
    // Caches sized for one chunk: every byte is read once.
    let reader = ImageReader::new(index, source, Arc::new(Shared::in_memory(CAT_CHUNK)));
    let resolved = resolve(&tree, path)?;
    let entry = tree.get(&resolved).expect("resolved paths exist");
    if entry.kind != EntryKind::File {
        bail!("{path} is a {}, not a regular file", entry.kind);
    }
    let mut out = std::io::stdout().lock();
    let mut offset = 0;
    while offset < entry.size {
        let chunk = reader
            .read_path(&tree, &resolved, offset, CAT_CHUNK)
            .await?;
        if chunk.is_empty() {
            bail!(
                "{path}: the index promises {} bytes, read {offset}",
                entry.size
            );
        }
        out.write_all(&chunk)?;
        offset += chunk.len() as u64;
    }
    out.flush()?;
    if stats {
        let s = reader.stats();
        let layer = entry.data.map(|d| &reader.image().layers[d.layer]);
        let report = serde_json::json!({
            "path": absolute(&resolved),
            "file_size": entry.size,
            "requests": s.range_requests,
            "compressed_bytes_fetched": s.bytes_fetched,
            "bytes_returned": s.bytes_returned,
            "layer_digest": layer.map(|l| l.digest.as_str()),
            "layer_compressed_size": layer.map(|l| l.compressed_size),
        });
        eprintln!("{report}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Resolves `path` inside the image, following symlinks in every component (relative ones
/// against their directory, absolute ones against the image root), never leaving the root.
fn resolve(tree: &MergedTree, path: &str) -> anyhow::Result<String> {
    let mut pending: Vec<String> = components(path).rev().collect();
    let mut done: Vec<String> = Vec::new();
    let mut hops = 0;
    while let Some(part) = pending.pop() {
        match part.as_str() {
            "." => continue,
            ".." => {
                done.pop();
                continue;
            }
            _ => done.push(part),
        }
        let here = done.join("/");
        let entry = tree
            .get(&here)
            .ok_or_else(|| anyhow!("{path}: no such file in the image"))?;
        if let (EntryKind::Symlink, Some(target)) = (entry.kind, &entry.link_target) {
            hops += 1;
            if hops > MAX_SYMLINKS {
                bail!("{path}: too many levels of symbolic links");
            }
            done.pop();
            if target.starts_with('/') {
                done.clear();
            }
            pending.extend(components(target).rev());
        }
    }
    Ok(done.join("/"))
}

fn components(path: &str) -> impl DoubleEndedIterator<Item = String> + '_ {
    path.split('/')
        .filter(|c| !c.is_empty())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use imagemesh_lazyindex::{Compression, Entry, LayerIndex};

    use super::*;

    fn tree() -> MergedTree {
        let link = |path: &str, target: &str| Entry {
            link_target: Some(target.into()),
            ..Entry::new(path, EntryKind::Symlink)
        };
        let entries = vec![
            Entry::new("usr", EntryKind::Dir),
            Entry::new("usr/lib", EntryKind::Dir),
            Entry {
                size: 1,
                offset: Some(0),
                ..Entry::new("usr/lib/x", EntryKind::File)
            },
            link("lib", "usr/lib"),
            link("abs", "/usr/lib/x"),
            link("up", "../../../usr/lib/x"),
            link("loop", "loop"),
        ];
        let layer = LayerIndex {
            digest: format!("sha256:{}", "0".repeat(64)),
            diff_id: format!("sha256:{}", "1".repeat(64)),
            compression: Compression::None,
            compressed_size: 1024,
            uncompressed_size: 1024,
            checkpoints: Vec::new(),
            entries,
        };
        MergedTree::from_layers([&layer])
    }

    #[test]
    fn paths_resolve_through_symlinks_inside_the_image() {
        let tree = tree();
        assert_eq!(resolve(&tree, "/usr/lib/x").unwrap(), "usr/lib/x");
        assert_eq!(resolve(&tree, "lib/x").unwrap(), "usr/lib/x");
        assert_eq!(resolve(&tree, "/abs").unwrap(), "usr/lib/x");
        assert_eq!(
            resolve(&tree, "/up").unwrap(),
            "usr/lib/x",
            "never above the root"
        );
        assert_eq!(resolve(&tree, "/usr/./lib/../lib/x").unwrap(), "usr/lib/x");
        assert!(
            resolve(&tree, "/loop")
                .unwrap_err()
                .to_string()
                .contains("too many levels")
        );
        assert!(
            resolve(&tree, "/missing")
                .unwrap_err()
                .to_string()
                .contains("no such file")
        );
    }
}
