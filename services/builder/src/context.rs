//! The build context: fetched from the request's tenant's object store
//! (`imagemesh-contexts-<tenant>`, so a request can only name its own tenant's uploads) and
//! unpacked into the build directory, within a size limit and without letting the tar write
//! outside it.
//!
//! The tar (plain or gzip) is read with the `tar` crate: entries with absolute paths or `..`
//! are refused rather than rewritten, devices and FIFOs are refused, and `unpack_in` refuses
//! to follow a symlink out of the context. The limit applies to the upload and to the unpacked
//! size, so a small gzip cannot expand into a full disk.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Component, Path};

use async_nats::jetstream;
use imagemesh_runtime::ErrorCode;
use imagemesh_runtime::streams::contexts_bucket;
use tar::EntryType;
use tokio::io::AsyncReadExt;

use crate::failure::Failure;

/// Downloads object `name` of `tenant`'s context bucket to `dest`; fails when it is missing or
/// larger than `limit` bytes.
pub async fn fetch(
    js: &jetstream::Context,
    tenant: &str,
    name: &str,
    dest: &Path,
    limit: u64,
) -> Result<u64, Failure> {
    let bucket = contexts_bucket(tenant);
    let missing = || {
        Failure::reject(
            ErrorCode::NotFound,
            format!("build context {name:?} is not in the {bucket} bucket"),
        )
    };
    // Opened, never created: a tenant that uploaded nothing has no bucket, and so no context.
    let store = js.get_object_store(&bucket).await.map_err(|err| {
        if bucket_missing(&err) {
            missing()
        } else {
            Failure::internal(format!("cannot open the {bucket} bucket: {err}"))
        }
    })?;
    let info = store.info(name).await.map_err(|err| {
        use async_nats::jetstream::object_store::InfoErrorKind;
        match err.kind() {
            InfoErrorKind::NotFound | InfoErrorKind::InvalidName => missing(),
            _ => Failure::internal(format!("cannot read build context {name:?}: {err}")),
        }
    })?;
    too_large(info.size as u64, limit, "uploaded")?;
    let object = store
        .get(name)
        .await
        .map_err(|e| Failure::internal(format!("cannot read build context {name:?}: {e}")))?;
    let mut file = tokio::fs::File::create(dest)
        .await
        .map_err(|e| Failure::internal(format!("cannot store build context: {e}")))?;
    // The object may have been replaced since `info`; never read past the limit.
    let copied = tokio::io::copy(&mut object.take(limit + 1), &mut file)
        .await
        .map_err(|e| Failure::internal(format!("cannot download build context {name:?}: {e}")))?;
    too_large(copied, limit, "uploaded")?;
    Ok(copied)
}

/// The content digest NATS keeps for object `name` of `tenant`'s context bucket
/// (`SHA-256=<base64>`), or `None` when the bucket or the object is missing (the build then
/// fails with `NOT_FOUND` when it fetches the context).
pub async fn digest(
    js: &jetstream::Context,
    tenant: &str,
    name: &str,
) -> Result<Option<String>, Failure> {
    let bucket = contexts_bucket(tenant);
    let store = match js.get_object_store(&bucket).await {
        Ok(store) => store,
        Err(err) if bucket_missing(&err) => return Ok(None),
        Err(err) => {
            return Err(Failure::internal(format!(
                "cannot open the {bucket} bucket: {err}"
            )));
        }
    };
    match store.info(name).await {
        Ok(info) => Ok(Some(info.digest.unwrap_or_else(|| {
            // Objects always carry a digest; without one, size and modification time stand in.
            format!("size={} modified={:?}", info.size, info.modified)
        }))),
        Err(err) => {
            use async_nats::jetstream::object_store::InfoErrorKind;
            match err.kind() {
                InfoErrorKind::NotFound | InfoErrorKind::InvalidName => Ok(None),
                _ => Err(Failure::internal(format!(
                    "cannot read build context {name:?}: {err}"
                ))),
            }
        }
    }
}

/// True when the bucket does not exist (as opposed to NATS failing to say).
fn bucket_missing(err: &jetstream::context::ObjectStoreError) -> bool {
    use jetstream::context::{GetStreamError, GetStreamErrorKind};
    std::error::Error::source(err)
        .and_then(|source| source.downcast_ref::<GetStreamError>())
        .is_some_and(|get| {
            matches!(get.kind(), GetStreamErrorKind::JetStream(e)
                if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
        })
}

fn too_large(size: u64, limit: u64, what: &str) -> Result<(), Failure> {
    if size > limit {
        return Err(Failure::build(format!(
            "the {what} build context is larger than the limit of {limit} bytes"
        )));
    }
    Ok(())
}

/// Unpacks the tar at `archive` into `into` (blocking: run it off the async threads).
pub fn unpack(archive: &Path, into: &Path, limit: u64) -> Result<(), Failure> {
    let file = File::open(archive).map_err(|e| Failure::internal(format!("build context: {e}")))?;
    let mut reader = BufReader::new(file);
    let gzip = {
        let mut magic = [0u8; 2];
        let n = reader.get_mut().read(&mut magic).unwrap_or(0);
        std::io::Seek::rewind(reader.get_mut()).ok();
        n == 2 && magic == [0x1f, 0x8b]
    };
    let stream: Box<dyn Read> = if gzip {
        Box::new(flate2::read::GzDecoder::new(reader))
    } else {
        Box::new(reader)
    };
    unpack_entries(tar::Archive::new(stream), into, limit)
        .map_err(|e| Failure::build(format!("the build context is not a usable tar: {e}")))
}

fn unpack_entries<R: Read>(
    mut archive: tar::Archive<R>,
    into: &Path,
    limit: u64,
) -> Result<(), String> {
    archive.set_overwrite(true);
    let mut total = 0u64;
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| e.to_string())?;
        let path = entry.path().map_err(|e| e.to_string())?.into_owned();
        check_path(&path)?;
        match entry.header().entry_type() {
            EntryType::Regular | EntryType::Continuous | EntryType::Directory => {}
            EntryType::Symlink => {}
            EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(|e| e.to_string())?
                    .unwrap_or_default();
                check_path(&target)?;
            }
            // Metadata entries the tar crate applies itself.
            EntryType::XGlobalHeader
            | EntryType::XHeader
            | EntryType::GNULongName
            | EntryType::GNULongLink => continue,
            other => {
                return Err(format!(
                    "{} is a {other:?}, which a build context may not hold",
                    path.display()
                ));
            }
        }
        total = total.saturating_add(entry.header().size().map_err(|e| e.to_string())?);
        if total > limit {
            return Err(format!(
                "it unpacks to more than the limit of {limit} bytes"
            ));
        }
        let inside = entry
            .unpack_in(into)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if !inside {
            return Err(format!("{} points outside the context", path.display()));
        }
    }
    Ok(())
}

/// A context path must stay inside the context: relative, without `..`.
fn check_path(path: &Path) -> Result<(), String> {
    let escapes = path.components().any(|c| {
        matches!(
            c,
            Component::ParentDir | Component::RootDir | Component::Prefix(_)
        )
    });
    if escapes {
        return Err(format!("{} points outside the context", path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_with(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_entry_type(EntryType::Regular);
            // set_path refuses `..`; write the raw name the way a hostile tar would.
            let raw = &mut header.as_old_mut().name;
            raw[..name.len()].copy_from_slice(name.as_bytes());
            header.set_cksum();
            builder.append(&header, *data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    fn unpack_bytes(bytes: &[u8], limit: u64) -> (tempfile::TempDir, Result<(), Failure>) {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("ctx.tar");
        std::fs::write(&archive, bytes).unwrap();
        let into = dir.path().join("ctx");
        std::fs::create_dir(&into).unwrap();
        let result = unpack(&archive, &into, limit);
        (dir, result)
    }

    #[test]
    fn a_plain_context_unpacks() {
        let (dir, result) = unpack_bytes(&tar_with(&[("app/hello.txt", b"hi")]), 1024);
        result.unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("ctx/app/hello.txt")).unwrap(),
            b"hi"
        );
    }

    #[test]
    fn escaping_paths_are_refused() {
        for name in ["../evil", "/etc/evil", "a/../../evil"] {
            let (dir, result) = unpack_bytes(&tar_with(&[(name, b"x")]), 1024);
            let err = result.unwrap_err();
            assert!(
                err.rejection.message.contains("outside the context"),
                "{name}: {err:?}"
            );
            assert!(!dir.path().join("evil").exists());
        }
    }

    #[test]
    fn a_context_over_the_limit_is_refused() {
        let (_dir, result) =
            unpack_bytes(&tar_with(&[("a", &[0u8; 600]), ("b", &[0u8; 600])]), 1000);
        let err = result.unwrap_err();
        assert_eq!(err.rejection.code, ErrorCode::BuildFailed);
        assert!(err.rejection.message.contains("limit"), "{err:?}");
    }

    #[test]
    fn a_symlink_out_of_the_context_cannot_be_written_through() {
        let mut builder = tar::Builder::new(Vec::new());
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(EntryType::Symlink);
        link.set_size(0);
        builder.append_link(&mut link, "out", "/tmp").unwrap();
        let mut file = tar::Header::new_gnu();
        file.set_size(1);
        builder
            .append_data(&mut file, "out/imagemesh-escape-test", &b"x"[..])
            .unwrap();
        let (_dir, result) = unpack_bytes(&builder.into_inner().unwrap(), 1024);
        assert!(result.is_err());
        assert!(!Path::new("/tmp/imagemesh-escape-test").exists());
    }
}
