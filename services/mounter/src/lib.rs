//! The mounter: for a runtime request, mounts the image lazily and read-only over FUSE at
//! `<mount_root>/<container id>`, fetching only the byte ranges files are read from with the
//! request's credential, and refreshing that credential before it expires.
//!
//! - [`handler`]: one runtime request → a mount (idempotent per mount id).
//! - [`open`](mod@open): the platform's image manifest and its lazy-mount index from the registry.
//! - [`fs`]: the FUSE filesystem (metadata from an inode table; reads answered from tokio).
//! - reads: `imagemesh_lazyimage`'s caching reader (single-flight range reads inflated in the
//!   blocking pool, caches in memory and on disk) over [`source`]: the registry blob source
//!   whose credential can be swapped under live reads, with retries and a deadline.
//! - [`prefetch`](mod@prefetch): recording the spans an image's first run reads, publishing
//!   them next to the image, and prefetching them at later mounts.
//! - [`refresh`]: one task per mount renewing its token through `imagemesh.credential.refresh`.
//! - [`mounts`]: the mount table; unmount, detach of busy and stale mounts.
//! - [`bundle`]: the OCI runtime bundle of each mount (overlay rootfs + `config.json`).
//! - [`keeper`] + [`handover`]: mounts that outlive this process (the mount keeper holds their
//!   FUSE descriptors; the next process resumes them).
//! - [`control`]: the `imagemesh.mounter.<worker>.unmount` / `.mounts` request subjects.
//!
//! `docs/mounter.md` describes the whole.
#![forbid(unsafe_code)]

mod bundle;
pub mod config;
mod control;
mod footprint;
mod fs;
mod handler;
mod handover;
pub mod keeper;
mod mounts;
mod open;
mod prefetch;
mod refresh;
mod source;

use std::sync::Arc;
use std::time::Duration;

use async_nats::Client;
pub use config::Config;
use imagemesh_registry::PlatformSpec;
use imagemesh_runtime::credentials::CredentialClient;
use imagemesh_runtime::placement;
use imagemesh_runtime::service::Identity;
use imagemesh_runtime::status::StatusReporter;
use imagemesh_runtime::worker::{self, Work};
use imagemesh_runtime::{Shutdown, streams};

use crate::control::{Control, MountReport};
pub use crate::control::{stats_subject, unmount_subject};
use crate::handler::Mounter;
use crate::keeper::KeeperClient;
use crate::mounts::{FuseOptions, MountTable};
use imagemesh_lazyimage::{Caches, Shared};

/// How the mounter presents itself to `$SRV.INFO`.
pub const IDENTITY: Identity = Identity {
    name: "mounter",
    description: "Mounts images lazily with the request's credentials",
};

/// The mounter's async runtime. Its blocking work runs in slots (reads and index decoding:
/// `imagemesh_lazyimage::blocking`; mount work: [`mounts::MOUNT_WORK_SLOTS`]), and its blocking
/// pool holds that many threads and one more (the keeper's listing at start). Without the cap
/// the pool still grew past the slots under steady load: a slot is free again a moment before
/// its thread is idle, and tokio starts a new thread for a task that finds none idle. Read work
/// waits for nothing; mount work may wait for reads through the mount (a bundle looking up its
/// user), but holds at most its two threads, so read work always finds a thread within the cap.
pub fn runtime() -> tokio::runtime::Builder {
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.max_blocking_threads(
        imagemesh_lazyimage::blocking::slots() + mounts::MOUNT_WORK_SLOTS + 1,
    );
    runtime
}

/// Mounts until `shutdown`, then unmounts everything it mounted.
pub async fn run(config: Config, client: Client, shutdown: Shutdown) -> anyhow::Result<()> {
    let js = async_nats::jetstream::new(client.clone());
    let used = [streams::MOUNT, streams::STATUS, streams::DEAD_LETTER];
    streams::ensure(&js, &used, &config.streams).await?;
    let mut settings = config.mounter;
    settings.placement = settings.placement.resolved();
    let worker_id = settings.placement.worker_id.clone();
    let platform = PlatformSpec::parse(&settings.platform).map_err(|e| anyhow::anyhow!(e))?;
    let fuse = FuseOptions {
        threads: settings.fuse_threads,
        allow_other: settings.allow_other,
        max_mounts: settings.max_mounts.max(1),
        index_memory_budget: settings.index_memory_bytes,
    };
    let fuse_max_mounts = fuse.max_mounts;
    let keeper = settings.keeper_socket.as_deref().map(KeeperClient::new);
    let mounts = Arc::new(
        MountTable::open(
            &settings.mount_root,
            &settings.bundle_root,
            fuse,
            keeper.clone(),
        )
        .map_err(|e| anyhow::anyhow!("mount root {}: {e}", settings.mount_root.display()))?,
    );
    let shared = Arc::new(Shared::new(Caches::new(&settings.cache)));
    register_gauges(&shared, &mounts);
    let status = StatusReporter::new(js, IDENTITY.name).with_instance(&worker_id);
    let control = Control {
        client: client.clone(),
        worker_id: worker_id.clone(),
        mounts: mounts.clone(),
        shared: shared.clone(),
        status: status.clone(),
    };
    let handler = Arc::new(Mounter {
        status,
        registry: settings.registry.clone(),
        platform,
        mounts: mounts.clone(),
        shared,
        credentials: CredentialClient::new(client.clone(), settings.refresh.timeout),
        refresh: settings.refresh.clone(),
        reads: settings.reads.clone(),
        prefetch: settings.prefetch.clone(),
        prepare_deadline: settings.prepare_deadline,
        runtime: tokio::runtime::Handle::current(),
        worker_id,
    });
    // Mounts an earlier process left with the keeper are served again; anything else left
    // mounted under the root is stale.
    let resuming = match &keeper {
        Some(keeper) => handler.take_over(keeper, &shutdown).await,
        None => Default::default(),
    };
    mounts.detach_stale(&resuming);
    // The control subjects answer once stale mounts are gone: a caller that sees this instance
    // serve sees no mount of an earlier one it did not take over.
    control::serve(control.clone(), shutdown.clone()).await?;
    // Mounts outlive the requests that made them, so placement counts mounts held, not
    // requests in progress.
    let held = mounts.clone();
    let work = Work::Placed {
        kind: placement::MOUNT,
        placement: settings.placement.clone(),
        streams: Box::new(config.streams.clone()),
        holds: Some((
            fuse_max_mounts as u32,
            placement::Load::Held(Arc::new(move || held.held() as u32)),
        )),
    };
    let handler = Mounter::clone(&handler);
    let served = worker::serve(&client, IDENTITY, work, settings.worker, handler, shutdown).await;
    if let Some(keeper) = &keeper {
        hand_over(&client, keeper, &mounts, &served).await;
    }
    // Whatever ended the work loop, leave no mount behind.
    unmount_all(&control).await;
    served
}

/// Ends the process with every mount left mounted, for the next mounter to take from the
/// keeper. It exits here rather than returning: unwinding would drop the reads still waiting
/// for the registry, and fuser answers a dropped read with EIO. The kernel instead resends
/// them to the next process.
async fn hand_over(
    client: &Client,
    keeper: &KeeperClient,
    mounts: &MountTable,
    served: &anyhow::Result<()>,
) -> ! {
    let held = mounts.all().len();
    tracing::info!(mounts = held, socket = %keeper.socket().display(), "stopping without unmounting: the mount keeper holds the mounts for the next mounter");
    if let Err(err) = served {
        tracing::error!(error = format!("{err:#}"), "mounter stopped with an error");
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), client.flush()).await;
    std::process::exit(if served.is_ok() { 0 } else { 1 })
}

/// The mounter's memory as gauges, next to the process gauges every service exports: what the
/// memory caches hold and what the mounts' loaded indexes take (the `index_memory_bytes`
/// budget), so a node's RSS can be told apart into caches, indexes and the rest.
fn register_gauges(shared: &Arc<Shared>, mounts: &Arc<MountTable>) {
    use imagemesh_runtime::telemetry::process::gauge;
    let caches = shared.clone();
    gauge(
        "imagemesh.mounter.cache.compressed",
        "By",
        "verified compressed spans held in memory",
        move || Some(caches.caches.compressed.stats().bytes),
    );
    let caches = shared.clone();
    gauge(
        "imagemesh.mounter.cache.decoded",
        "By",
        "inflated pieces of layer data held in memory",
        move || Some(caches.caches.decoded.stats().bytes),
    );
    let table = mounts.clone();
    gauge(
        "imagemesh.mounter.index_memory",
        "By",
        "loaded indexes and file tables of every mount",
        move || Some(table.index_memory().0),
    );
    let table = mounts.clone();
    gauge(
        "imagemesh.mounter.mounts",
        "{mount}",
        "mounts held, live or being prepared",
        move || Some(table.held() as u64),
    );
}

async fn unmount_all(control: &Control) {
    let unmounting = control.mounts.unmount_all();
    // A session thread that never ends must not keep the process alive past its grace.
    match tokio::time::timeout(Duration::from_secs(30), unmounting).await {
        Ok(done) => {
            for mount in done {
                let report = MountReport::of(&mount);
                control.report_unmounted(&mount, &report).await;
            }
        }
        Err(_) => tracing::error!("unmounting took over 30 s; exiting anyway"),
    }
}
