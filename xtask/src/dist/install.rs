//! Taking a dist's blobs into a store (`cargo xtask artifacts --from DIST`).
//!
//! Only blobs whose digests the lock being satisfied records are taken; any other digest is
//! refused (a tarball made for another lock). Each blob streams into a store blob writer,
//! hashed as it is written; a tarball's blobs become visible only once all of them match their
//! names, so a tarball with one bad blob leaves nothing in the store. The tarball's structure is
//! checked exactly as `dist verify` checks it.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use system::{Lock, Sha256};

use super::read::{self, Item};
use super::verify::recorded;
use crate::store::{BlobWriter, StoreWriter};

/// What one install took.
#[derive(Debug, Default)]
pub struct Installed {
    /// Blobs written into the store, with the tarball they came from.
    pub written: Vec<(Sha256, u64, PathBuf)>,
    /// Blobs the store already held, verified.
    pub present: Vec<(Sha256, PathBuf)>,
}

/// Where prebuilt artifacts come from (`artifacts --from`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DistSource {
    /// A tarball, or a directory of them.
    Path(PathBuf),
    /// An OCI artifact pushed by `dist push`: `REF`, `REF@sha256:…`.
    Registry(String),
}

impl DistSource {
    /// `oci:REF` and `REF@sha256:…` (when no such file exists) are registry references; anything
    /// else is a path, relative ones taken from `base`.
    pub fn parse(text: &str, base: &Path) -> DistSource {
        if let Some(reference) = text.strip_prefix("oci:") {
            return DistSource::Registry(reference.to_owned());
        }
        let path = base.join(text);
        if text.contains("@sha256:") && !path.exists() {
            return DistSource::Registry(text.to_owned());
        }
        DistSource::Path(path)
    }
}

impl std::fmt::Display for DistSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DistSource::Path(path) => write!(f, "{}", path.display()),
            DistSource::Registry(reference) => write!(f, "oci:{reference}"),
        }
    }
}

/// The tarballs `source` names: itself, or every `*.tar.gz` in it (sorted).
pub fn tarballs(source: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let meta = fs::metadata(source).map_err(|e| {
        anyhow::anyhow!(
            "--from {}: {e}; expected a `cargo xtask dist` tarball, a directory of them, or an \
             OCI artifact (`oci:REGISTRY/REPO:TAG`, `REGISTRY/REPO@sha256:…`)",
            source.display()
        )
    })?;
    if !meta.is_dir() {
        return Ok(vec![source.to_owned()]);
    }
    let mut found = Vec::new();
    for entry in fs::read_dir(source).with_context(|| format!("reading {}", source.display()))? {
        let path = entry?.path();
        if path.to_str().is_some_and(|p| p.ends_with(".tar.gz")) && path.is_file() {
            found.push(path);
        }
    }
    found.sort();
    if found.is_empty() {
        bail!(
            "--from {}: no *.tar.gz in this directory; point it at the output of `cargo xtask \
             dist` or at one tarball",
            source.display()
        );
    }
    Ok(found)
}

/// Takes every blob of `sources` that `lock` records into `store`.
pub fn install(
    sources: &[DistSource],
    lock: &Lock,
    lock_path: &Path,
    store: &StoreWriter,
    transfer: &crate::fetch::Options,
) -> anyhow::Result<Installed> {
    let known = recorded(lock);
    let mut installed = Installed::default();
    for source in sources {
        match source {
            DistSource::Path(path) => {
                for tarball in tarballs(path)? {
                    install_one(&tarball, &known, lock_path, store, &mut installed)?;
                }
            }
            DistSource::Registry(reference) => {
                super::oci::pull(reference, lock, store, transfer, &mut installed)?;
            }
        }
    }
    Ok(installed)
}

type Recorded = Vec<(
    system::Kind,
    system::lock::Version,
    system::Arch,
    Sha256,
    Option<u64>,
)>;

fn install_one(
    tarball: &Path,
    known: &Recorded,
    lock_path: &Path,
    store: &StoreWriter,
    installed: &mut Installed,
) -> anyhow::Result<()> {
    let mut pending: Vec<(BlobWriter, Sha256, Option<u64>, String)> = Vec::new();
    read::for_each(tarball, |name, item, content| {
        if let Item::Blob(digest) = item {
            let Some((kind, version, arch, _, size)) =
                known.iter().find(|(_, _, _, d, _)| *d == digest)
            else {
                bail!(
                    "sha256:{digest} is not recorded in {}: refusing it (no kernel or initrd \
                     there has this digest; the tarball was made for another lock)\nnext step: \
                     use a dist made from this lock, or the lock the dist was made from",
                    lock_path.display()
                );
            };
            let what = format!("{kind} {version} ({arch}) from {}", tarball.display());
            if store.has_verified_blob(&digest, *size)? {
                installed.present.push((digest, tarball.to_owned()));
            } else {
                let mut writer = store.blob_writer()?;
                io::copy(content, &mut writer)
                    .with_context(|| format!("copying {} into the store", name.display()))?;
                pending.push((writer, digest, *size, what));
            }
        }
        Ok(())
    })?;
    // All or nothing per tarball: check every blob before any becomes visible. Dropping the
    // writers deletes their temp files.
    for (writer, expected, size, what) in &pending {
        let actual = writer.sha256();
        if let Some(size) = size
            && writer.size() != *size
        {
            bail!(
                "{what}: blob system/blobs/sha256/{expected} is {} bytes, the lock records \
                 {size}; nothing from {} was stored\nnext step: the tarball is corrupt or was \
                 made for another lock; fetch it again and check it with `cargo xtask dist verify`",
                writer.size(),
                tarball.display()
            );
        }
        if actual != *expected {
            bail!(
                "{what}: blob system/blobs/sha256/{expected} holds content hashing to \
                 sha256:{actual} ({} bytes), not sha256:{expected}; nothing from {} was stored\n\
                 next step: the tarball is corrupt or was tampered with; fetch it again and \
                 check it with `sha256sum -c SHA256SUMS` and `cargo xtask dist verify`",
                writer.size(),
                tarball.display()
            );
        }
    }
    for (writer, expected, size, what) in pending {
        let blob = store.commit(writer, Some(&expected), size, &what)?;
        installed
            .written
            .push((blob.sha256, blob.size, tarball.to_owned()));
    }
    Ok(())
}
