//! Entry metadata from real tar formats: ustar, GNU long names/links, PAX records, xattrs,
//! every entry type, and archives written by GNU tar itself.

mod common;

use std::process::Command;

use common::{TarBuilder, gzip, index};
use imagemesh_lazyindex::{Entry, EntryKind, LayerIndex};

fn find<'a>(layer: &'a LayerIndex, path: &str) -> &'a Entry {
    layer
        .entries
        .iter()
        .find(|e| e.path == path)
        .unwrap_or_else(|| panic!("{path} not indexed: {:?}", paths(layer)))
}

fn paths(layer: &LayerIndex) -> Vec<&str> {
    layer.entries.iter().map(|e| e.path.as_str()).collect()
}

fn data<'a>(raw: &'a [u8], e: &Entry) -> &'a [u8] {
    let off = e.offset.unwrap() as usize;
    &raw[off..off + e.size as usize]
}

#[test]
fn records_every_entry_type_and_field() {
    let mut t = TarBuilder::default();
    t.dir("etc/")
        .file("etc/hosts", b"127.0.0.1 localhost\n")
        .symlink("etc/localtime", "/usr/share/zoneinfo/UTC")
        .hardlink("etc/hosts.bak", "etc/hosts")
        .char_device("dev/null", 1, 3)
        .raw(tar::EntryType::Fifo, b"run/fifo", b"", b"")
        .raw(tar::EntryType::Block, b"dev/sda", b"", b"");
    let raw = t.finish();
    let layer = index(&gzip(&raw), 1 << 20);

    let hosts = find(&layer, "etc/hosts");
    assert_eq!(
        (hosts.kind, hosts.mode, hosts.uid, hosts.gid),
        (EntryKind::File, 0o644, 1000, 1000)
    );
    assert_eq!(hosts.mtime, 1_700_000_000);
    assert_eq!(data(&raw, hosts), b"127.0.0.1 localhost\n");
    assert_eq!(find(&layer, "etc").kind, EntryKind::Dir);
    let tz = find(&layer, "etc/localtime");
    assert_eq!(tz.kind, EntryKind::Symlink);
    assert_eq!(tz.link_target.as_deref(), Some("/usr/share/zoneinfo/UTC"));
    let bak = find(&layer, "etc/hosts.bak");
    assert_eq!(bak.kind, EntryKind::Hardlink);
    assert_eq!(bak.link_target.as_deref(), Some("etc/hosts"));
    let null = find(&layer, "dev/null");
    assert_eq!(
        (null.kind, null.device),
        (EntryKind::CharDevice, Some((1, 3)))
    );
    assert_eq!(find(&layer, "run/fifo").kind, EntryKind::Fifo);
    assert_eq!(find(&layer, "dev/sda").kind, EntryKind::BlockDevice);
}

#[test]
fn gnu_long_names_and_links() {
    let long_dir = "d".repeat(120);
    let long_file = format!("{long_dir}/{}", "f".repeat(150));
    let long_link = format!("{long_dir}/{}", "l".repeat(140));
    let mut t = TarBuilder::default();
    // The tar crate's GNU headers spill names over 100 bytes into `././@LongLink` entries.
    t.file(&long_file, b"long").symlink(&long_link, &long_file);
    let raw = t.finish();
    let layer = index(&gzip(&raw), 1 << 20);
    assert_eq!(data(&raw, find(&layer, &long_file)), b"long");
    assert_eq!(
        find(&layer, &long_link).link_target.as_deref(),
        Some(long_file.as_str())
    );
    assert_eq!(layer.entries.len(), 2, "{:?}", paths(&layer));
}

#[test]
fn pax_records_override_the_header() {
    let long = format!("pax/{}", "p".repeat(300));
    let mut t = TarBuilder::default();
    t.pax(&[
        ("path", long.as_bytes()),
        ("uid", b"4000000000"),
        ("gid", b"77"),
        ("mtime", b"1700000000.25"),
        ("SCHILY.xattr.user.comment", b"hello"),
        ("SCHILY.xattr.security.capability", &[1, 0, 0, 2]),
    ])
    .file("short-name", b"pax data");
    let raw = t.finish();
    let layer = index(&gzip(&raw), 1 << 20);
    let e = find(&layer, &long);
    assert_eq!((e.uid, e.gid), (4_000_000_000, 77));
    assert_eq!((e.mtime, e.mtime_nsec), (1_700_000_000, 250_000_000));
    assert_eq!(
        e.xattrs,
        vec![
            ("security.capability".to_string(), vec![1, 0, 0, 2]),
            ("user.comment".to_string(), b"hello".to_vec()),
        ]
    );
    assert_eq!(data(&raw, e), b"pax data");
}

#[test]
fn pax_global_headers_are_ignored() {
    let mut t = TarBuilder::default();
    let mut global = tar::Header::new_ustar();
    let record = b"20 comment=ignored!\n";
    global.set_entry_type(tar::EntryType::XGlobalHeader);
    global.set_size(record.len() as u64);
    global.set_cksum();
    let mut raw = Vec::new();
    {
        let mut b = tar::Builder::new(&mut raw);
        b.append(&global, &record[..]).unwrap();
    }
    raw.truncate(raw.len() - 1024); // drop the end-of-archive blocks before appending more
    raw.extend(t.file("after-global", b"x").finish());
    let layer = index(&gzip(&raw), 1 << 20);
    assert_eq!(paths(&layer), vec!["after-global"]);
}

/// Archives written by GNU tar in gnu and pax formats, with names long enough for extensions.
#[test]
fn gnu_tar_formats() {
    let dir = tempfile::tempdir().unwrap();
    let deep = dir
        .path()
        .join("src")
        .join("n".repeat(90))
        .join("m".repeat(90));
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(deep.join("x".repeat(200)), b"deep file").unwrap();
    std::os::unix::fs::symlink("x".repeat(200), deep.join("link")).unwrap();
    for format in ["gnu", "pax", "ustar"] {
        let out = Command::new("tar")
            .args([
                "-C",
                dir.path().to_str().unwrap(),
                "--format",
                format,
                "-cf",
                "-",
                "src",
            ])
            .output()
            .unwrap();
        if format == "ustar" {
            // ustar cannot store a 200-byte name; GNU tar refuses the member.
            assert!(!out.status.success() || !out.stdout.is_empty());
            continue;
        }
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let layer = index(&gzip(&out.stdout), 1 << 20);
        let file = format!(
            "src/{}/{}/{}",
            "n".repeat(90),
            "m".repeat(90),
            "x".repeat(200)
        );
        assert_eq!(
            data(&out.stdout, find(&layer, &file)),
            b"deep file",
            "format {format}"
        );
        let link = file.replace(&"x".repeat(200), "link");
        assert_eq!(
            find(&layer, &link).link_target.as_deref(),
            Some("x".repeat(200).as_str())
        );
    }
}

#[test]
fn whiteouts_become_markers() {
    let mut t = TarBuilder::default();
    t.file("a/.wh.gone", b"")
        .file("b/.wh..wh..opq", b"")
        .file(".wh..wh.plnk", b"");
    let layer = index(&gzip(&t.finish()), 1 << 20);
    let kinds: Vec<_> = layer
        .entries
        .iter()
        .map(|e| (e.path.as_str(), e.kind))
        .collect();
    assert_eq!(
        kinds,
        vec![("a/gone", EntryKind::Whiteout), ("b", EntryKind::Opaque)]
    );
}
