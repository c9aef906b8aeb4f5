//! The indexer end to end, against a real htpasswd-protected registry and NATS, with the
//! indexer binary as a process: images built with umoci and pushed with skopeo are indexed;
//! the index is stored next to the image and recorded in KV; `imagemesh index show` equals
//! `umoci unpack` of the same image and `imagemesh index cat` returns every file's bytes
//! reading only the compressed ranges it needs; indexing is idempotent per manifest digest.

mod indexer_support;

use std::collections::BTreeMap;

use imagemesh_lazyindex::{decode_image, head_len};
use imagemesh_proto::v1::StatusEvent;
use imagemesh_testkit::oci_images::{OciLayout, have_image_tools};
use imagemesh_tests::{
    BuildRegistryAuth, Mesh, MeshOptions, REGISTRY_PASSWORD, REGISTRY_USER, assert_succeeded,
    describe, find,
};
use indexer_support::compare::{assert_tree_matches, parse_show, regular_files};
use indexer_support::{artifact, cli, detail, image_record, images, index, request};
use serde_json::Value;

async fn indexer_mesh() -> Mesh {
    assert!(
        have_image_tools(),
        "umoci and skopeo are needed (make deps installs them)"
    );
    let options = MeshOptions {
        build_registry_auth: BuildRegistryAuth::Basic,
        start: vec!["indexer"],
        ..Default::default()
    };
    Mesh::start(options).await
}

fn succeeded(events: &[StatusEvent]) -> &StatusEvent {
    let last = assert_succeeded(events);
    assert_eq!(last.phase, "indexed", "{}", describe(events));
    last
}

fn number(event: &StatusEvent, key: &str) -> u64 {
    detail(event, key)
        .parse()
        .unwrap_or_else(|_| panic!("{key} is not a number"))
}

/// `index cat` of every regular file equals the unpacked file.
fn assert_cat_matches(image: &str, show: &BTreeMap<String, Value>, rootfs: &std::path::Path) {
    let files = regular_files(show);
    assert!(files.len() > 250, "only {} files", files.len());
    for (path, size) in files {
        let out = cli(&["index", "cat", image, &path]);
        assert!(out.success, "cat {path}: {}", out.stderr);
        let expected = std::fs::read(rootfs.join(&path[1..])).unwrap();
        assert_eq!(out.stdout.len() as u64, size, "{path}: size");
        assert!(out.stdout == expected, "{path}: bytes differ");
    }
}

/// `cat --stats` of a small file in the large layer fetches one checkpoint span, not the layer.
fn assert_small_read_is_lazy(image: &str) {
    let out = cli(&["index", "cat", "--stats", image, "/small/d1/f1.txt"]);
    assert!(out.success, "{}", out.stderr);
    let stats: Value = serde_json::from_str(out.stderr.trim()).expect("stats are one JSON line");
    let fetched = stats["compressed_bytes_fetched"].as_u64().unwrap();
    let layer = stats["layer_compressed_size"].as_u64().unwrap();
    // One range of the layer, and one of the index blob: the window of the checkpoint the
    // read inflates from (the file lies past the layer's first checkpoint).
    assert_eq!(stats["requests"], 2, "{stats}");
    assert!(layer > images::RANDOM_SIZE as u64, "{stats}");
    assert!(
        fetched * 4 < layer,
        "fetched {fetched} of a {layer}-byte layer: {stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_is_indexed_stored_next_to_it_and_reads_back_like_umoci_unpacks_it() {
    let mesh = indexer_mesh().await;
    let registry = mesh.registry.addr().to_string();
    let layout = OciLayout::new();
    images::build_full(&layout, "full");
    let image = format!("{registry}/test/full:v1");
    layout.push("full", &image, REGISTRY_USER, REGISTRY_PASSWORD);
    let digest = layout.digest("full");

    let mut first = request(&mesh, "full-1", "test/full:v1");
    first.manifest_digest = digest.clone();
    let events = index(&mesh, &first).await;
    let done = succeeded(&events);
    for phase in ["authenticated", "resolved", "layer-indexed", "stored"] {
        assert!(
            find(&events, "indexer", phase).is_some(),
            "{phase}: {}",
            describe(&events)
        );
    }
    assert_eq!(
        events.iter().filter(|e| e.phase == "layer-indexed").count(),
        4
    );
    assert_eq!(detail(done, "reused"), "false");
    assert_eq!(detail(done, "manifest_digest"), digest);
    assert_eq!(number(done, "layers"), 4);
    assert_eq!(number(done, "layers_from_cache"), 0);
    let manifest = layout.json_blob(&digest);
    let compressed: u64 = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["size"].as_u64().unwrap())
        .sum();
    assert_eq!(number(done, "compressed_bytes_read"), compressed);
    let index_bytes = number(done, "index_bytes");

    let index_digest = detail(done, "index_digest").to_string();
    let blob = artifact::assert_stored(&registry, "test/full", &digest, &index_digest).await;
    assert_eq!(blob.len() as u64, index_bytes);
    let decoded = decode_image(&blob).expect("the stored index decodes");
    assert_eq!(decoded.manifest_digest.as_deref(), Some(digest.as_str()));
    // What a mount loads is the head (file table, checkpoints, digests): under 1 % of the
    // image. The windows after it (at most 32 KiB per checkpoint) are fetched one by one.
    let head = head_len(&blob).unwrap() as u64;
    assert!(
        head * 100 < number(done, "uncompressed_bytes"),
        "{:?}",
        done.details
    );
    let checkpoints: u64 = decoded
        .layers
        .iter()
        .map(|l| l.checkpoints.len() as u64)
        .sum();
    assert!(index_bytes - head <= checkpoints * (32 << 10));
    let record = image_record(&mesh, "img-full-1")
        .await
        .expect("image record created");
    assert_eq!(record.index_digest, index_digest);
    assert_eq!(record.manifest_digest, digest);
    assert_eq!(record.image_ref, image);

    let show = cli(&["index", "show", &image]);
    assert!(show.success, "{}", show.stderr);
    let show = parse_show(&show.stdout);
    let rootfs = layout.unpack("full", &layout.scratch("unpacked").join("bundle"));
    assert_tree_matches(&show, &rootfs);
    assert!(show.contains_key("/edit/log-link") && !show.contains_key("/gone"));
    assert_cat_matches(&image, &show, &rootfs);
    assert_small_read_is_lazy(&image);
    let via_link = cli(&["index", "cat", &image, "/bin/big-dir/text.log"]);
    assert!(via_link.stdout == std::fs::read(rootfs.join("big/text.log")).unwrap());

    let again = index(&mesh, &request(&mesh, "full-2", "test/full:v1")).await;
    let reused = succeeded(&again);
    assert_eq!(detail(reused, "reused"), "true", "{}", describe(&again));
    assert_eq!(detail(reused, "index_digest"), index_digest);
    assert!(find(&again, "indexer", "layer-indexed").is_none());
    let record = image_record(&mesh, "img-full-2")
        .await
        .expect("second image id recorded");
    assert_eq!(record.index_digest, index_digest);

    mesh.assert_no_secret_leaked(&["full-1", "full-2"], &[REGISTRY_PASSWORD])
        .await;
}
