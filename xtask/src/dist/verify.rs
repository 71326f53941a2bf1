//! `cargo xtask dist verify`: a tarball checked without installing it.
//!
//! The structure (only the store layout, nothing outside `system/`, no link leaving the blobs:
//! [`super::read`]), every blob's content against its name, and every blob and link against
//! the embedded `system/artifacts.lock`: each blob is an artifact that lock records, each named
//! link leads to the blob the lock pins for it, and each artifact the lock records is there.
//! All problems of a tarball are reported together.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, Read};
use std::path::Path;

use anyhow::bail;
use system::lock::Version;
use system::{Arch, Kind, Lock, Sha256};

use super::read::{self, Item};

/// The largest lock a tarball may carry (the real one is a few KiB).
const MAX_LOCK: u64 = 1 << 20;

/// What a verified tarball holds.
#[derive(Debug)]
pub struct Summary {
    /// (kind, version, arch, digest) of every named link.
    pub artifacts: Vec<(Kind, Version, Arch, Sha256)>,
    /// Bytes of blob content hashed.
    pub blob_bytes: u64,
}

/// Verifies the tarball at `path`; the error lists every problem found.
pub fn verify(path: &Path) -> anyhow::Result<Summary> {
    let mut problems = Vec::new();
    let mut blobs: BTreeMap<Sha256, u64> = BTreeMap::new();
    let mut links = Vec::new();
    let mut lock_text = None;
    read::for_each(path, |name, item, content| {
        match item {
            Item::Dir => {}
            Item::Lock => {
                let mut text = String::new();
                (&mut *content)
                    .take(MAX_LOCK + 1)
                    .read_to_string(&mut text)?;
                if text.len() as u64 > MAX_LOCK {
                    bail!("larger than {MAX_LOCK} bytes: not a lock");
                }
                lock_text = Some(text);
            }
            Item::Blob(expected) => {
                let (actual, size) = system::hash::sha256_reader(&mut *content)?;
                if actual != expected {
                    problems.push(format!(
                        "blob {}: content hashes to sha256:{actual} ({size} bytes), not the \
                         sha256:{expected} it is named by (corrupted or tampered with)",
                        name.display()
                    ));
                }
                blobs.insert(expected, size);
            }
            Item::Link {
                kind,
                version,
                arch,
                target,
            } => links.push((kind, version, arch, target, name.display().to_string())),
        }
        let _ = io::copy(content, &mut io::sink())?;
        Ok(())
    })?;

    let lock = match lock_text.as_deref().map(Lock::parse) {
        None => {
            problems.push("system/artifacts.lock is missing".into());
            None
        }
        Some(Err(e)) => {
            problems.push(format!("system/artifacts.lock: {e}"));
            None
        }
        Some(Ok(lock)) => Some(lock),
    };
    if let Some(lock) = &lock {
        let recorded = recorded(lock);
        for (digest, size) in &blobs {
            match recorded.iter().find(|(_, _, _, d, _)| d == digest) {
                None => problems.push(format!(
                    "blob system/blobs/sha256/{digest} is not recorded in the embedded \
                     artifacts.lock (no kernel or initrd there has this digest)"
                )),
                Some((kind, version, arch, _, Some(expected))) if expected != size => problems
                    .push(format!(
                        "blob system/blobs/sha256/{digest} ({kind} {version} {arch}): {size} \
                         bytes, the embedded lock records {expected}"
                    )),
                Some(_) => {}
            }
        }
        for (kind, version, arch, target, name) in &links {
            match recorded
                .iter()
                .find(|(k, v, a, _, _)| k == kind && v == version && a == arch)
            {
                None => problems.push(format!(
                    "link {name}: the embedded lock has no {kind} {version} for {arch}"
                )),
                Some((_, _, _, pinned, _)) if pinned != target => problems.push(format!(
                    "link {name} leads to sha256:{target}, the embedded lock pins sha256:{pinned}"
                )),
                Some(_) => {}
            }
            if !blobs.contains_key(target) {
                problems.push(format!(
                    "link {name} leads to system/blobs/sha256/{target}, which the tarball lacks"
                ));
            }
        }
        for (kind, version, arch, _, _) in &recorded {
            if !links
                .iter()
                .any(|(k, v, a, _, _)| k == kind && v == version && a == arch)
            {
                problems.push(format!(
                    "the embedded lock records {kind} {version} ({arch}), but the tarball has \
                     no link for it"
                ));
            }
        }
    }
    if !problems.is_empty() {
        let mut msg = format!(
            "{}: {} problem(s); do not install it:",
            path.display(),
            problems.len()
        );
        for problem in &problems {
            let _ = write!(msg, "\n  - {problem}");
        }
        bail!(msg);
    }
    Ok(Summary {
        artifacts: links
            .into_iter()
            .map(|(kind, version, arch, target, _)| (kind, version, arch, target))
            .collect(),
        blob_bytes: blobs.values().sum(),
    })
}

/// Every artifact a lock records: (kind, version, arch, digest, size when recorded).
pub fn recorded(lock: &Lock) -> Vec<(Kind, Version, Arch, Sha256, Option<u64>)> {
    let mut out = Vec::new();
    for (version, files) in lock.kernels.iter() {
        for (arch, file) in files.iter() {
            out.push((Kind::Kernel, version.clone(), *arch, file.sha256, file.size));
        }
    }
    for (version, initrd) in lock.initrds.iter() {
        for (arch, output) in initrd.outputs.iter() {
            out.push((
                Kind::Initrd,
                version.clone(),
                *arch,
                output.sha256,
                Some(output.size),
            ));
        }
    }
    out
}
