//! `imagemesh mounts WORKER`: what a mounter holds: its mounts with their read and prefetch
//! counters, and its caches (memory and the node cache on disk) with size, hits, misses and
//! evictions. Asks the
//! mounter's `imagemesh.mounter.<worker id>.mounts` subject, which only the operator may call.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;

#[derive(Debug, clap::Args)]
pub struct MountsArgs {
    /// The mounter's worker id (its placement worker id; on Kubernetes the node name).
    worker: String,
    /// Print the mounter's JSON answer as it is.
    #[arg(long)]
    json: bool,
}

pub async fn run(client: &async_nats::Client, args: MountsArgs) -> anyhow::Result<ExitCode> {
    let subject = format!("imagemesh.mounter.{}.mounts", args.worker);
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(subject.clone(), "".into()),
    )
    .await
    .with_context(|| format!("no answer on {subject} within 10 s"))?
    .with_context(|| format!("no mounter answers on {subject}"))?;
    let listing: Value =
        serde_json::from_slice(&reply.payload).context("the mounter's answer is not JSON")?;
    if args.json {
        println!("{listing}");
    } else {
        print!("{}", render(&listing));
    }
    Ok(ExitCode::SUCCESS)
}

/// The listing as a few aligned lines.
fn render(listing: &Value) -> String {
    let mut out = String::new();
    let mounts = listing["mounts"].as_array().cloned().unwrap_or_default();
    out.push_str(&format!(
        "mounter {}: {} mount(s)\n",
        listing["worker_id"].as_str().unwrap_or("?"),
        mounts.len()
    ));
    for mount in &mounts {
        let reads = &mount["reads"];
        out.push_str(&format!(
            "  {:<24} {}  reads {}  fetched {} in {} range request(s)\n",
            mount["mount_id"].as_str().unwrap_or("?"),
            mount["image_ref"].as_str().unwrap_or("?"),
            reads["reads"],
            bytes(&reads["bytes_fetched"]),
            reads["range_requests"],
        ));
        if let Some(lazy) = mount["lazy_mount"].as_str() {
            let shared = mount["shared_by"].as_array().map_or(0, Vec::len);
            out.pop();
            out.push_str(&format!("  image mount {lazy} (shared by {shared})\n"));
        }
        let prefetch = &mount["prefetch"];
        if let Some(state) = prefetch["state"].as_str().filter(|s| *s != "off") {
            out.push_str(&format!(
                "  {:<24} prefetch {state}: recorded {}  prefetched {} of {} span(s), {}  hits {}  errors {}\n",
                "",
                prefetch["spans_recorded"],
                prefetch["spans_prefetched"],
                prefetch["spans_planned"],
                bytes(&prefetch["bytes_prefetched"]),
                prefetch["hits"],
                prefetch["errors"],
            ));
        }
    }
    out.push_str("caches:\n");
    for (name, cache) in [
        ("memory, compressed", &listing["compressed_cache"]),
        ("memory, decoded", &listing["decoded_cache"]),
        ("disk (node cache)", &listing["disk_cache"]),
    ] {
        if cache.is_null() {
            out.push_str(&format!("  {name:<20} off\n"));
            continue;
        }
        out.push_str(&format!(
            "  {name:<20} {} of {} in {} entries  hits {}  misses {}  evictions {}",
            bytes(&cache["bytes"]),
            bytes(&cache["budget"]),
            cache["entries"],
            cache["hits"],
            cache["misses"],
            cache["evictions"],
        ));
        if !cache["dropped"].is_null() {
            out.push_str(&format!(
                "  dropped {}  write failures {}",
                cache["dropped"], cache["write_failures"]
            ));
        }
        out.push('\n');
    }
    out
}

/// A byte count for people: `12.3 MiB`.
fn bytes(value: &Value) -> String {
    let n = value.as_u64().unwrap_or(0) as f64;
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut size = n;
    let mut unit = 0;
    while size >= 1024.0 && unit + 1 < units.len() {
        size /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{size:.1} {}", units[unit])
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_listing_shows_each_cache_with_its_counters() {
        let cache = |bytes: u64| json!({"entries": 3, "bytes": bytes, "budget": 1u64 << 30, "hits": 7, "misses": 2, "evictions": 1});
        let mut disk = cache(5 << 20);
        disk["dropped"] = json!(1);
        disk["write_failures"] = json!(0);
        let listing = json!({
            "worker_id": "node-1",
            "mounts": [{"mount_id": "ctr-1", "image_ref": "r/a:1",
                        "reads": {"reads": 4, "bytes_fetched": 2048, "range_requests": 2},
                        "lazy_mount": "default.0011", "shared_by": ["ctr-1", "ctr-2"],
                        "prefetch": {"state": "done", "spans_recorded": 0, "spans_prefetched": 3,
                                     "spans_planned": 3, "bytes_prefetched": 3072, "hits": 2, "errors": 0}}],
            "compressed_cache": cache(1536),
            "decoded_cache": cache(0),
            "disk_cache": disk,
        });
        let text = render(&listing);
        assert!(text.contains("mounter node-1: 1 mount(s)"), "{text}");
        assert!(
            text.contains("fetched 2.0 KiB in 2 range request(s)"),
            "{text}"
        );
        assert!(
            text.contains("range request(s)  image mount default.0011 (shared by 2)"),
            "{text}"
        );
        assert!(
            text.contains("prefetch done: recorded 0  prefetched 3 of 3 span(s), 3.0 KiB  hits 2"),
            "{text}"
        );
        assert!(text.contains("memory, compressed   1.5 KiB of 1.0 GiB in 3 entries  hits 7  misses 2  evictions 1"), "{text}");
        assert!(
            text.contains("disk (node cache)    5.0 MiB of 1.0 GiB"),
            "{text}"
        );
        assert!(text.contains("dropped 1  write failures 0"), "{text}");
        let off = render(&json!({"worker_id": "n", "mounts": [], "disk_cache": null}));
        assert!(off.contains("disk (node cache)    off"), "{off}");
    }
}
