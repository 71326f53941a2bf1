//! The kernel stage: every kernel file the lock selects, verified in the store and named
//! `kernel/<version>/<arch>/vmlinux|Image`.
//!
//! A blob already present is re-hashed and reused without any request. A `file:///…` URL is
//! copied from the local file (also under `--offline`), with the same checks. A missing one is
//! downloaded ([`crate::fetch`]) into a resumable store blob writer (a killed run's partial is
//! continued with `Range` + `If-Range`), and becomes visible only once its sha256 (and size,
//! when recorded) match the lock. A lock entry without a size gets the verified size recorded,
//! except under `--locked`, which refuses such an entry before touching the network. A failed
//! download does not stop the others: every selected file is tried, and the stage fails at the
//! end listing every failure with its next step (as `--offline` lists every missing file).

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io;
use std::path::Path;

use anyhow::{Context as _, bail};
use system::lock::{KernelFile, Version};
use system::{Arch, Lock};

use super::Report;
use crate::fetch::{Download, Expected, FetchError, Fetcher};
use crate::store::StoreWriter;

/// Which kernels, and how.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Versions to sync; empty means every version in the lock.
    pub versions: Vec<Version>,
    /// Architectures asked for by name; empty means every architecture each version pins.
    pub arches: Vec<Arch>,
    pub offline: bool,
    pub locked: bool,
}

/// One selected kernel file.
struct Entry {
    version: Version,
    arch: Arch,
    file: KernelFile,
}

impl Entry {
    fn name(&self) -> String {
        format!("kernel {} {}", self.version, self.arch)
    }
}

/// Makes the store hold every kernel `plan` selects. `fetcher` is called only when something
/// must be downloaded, so a fully populated store never builds an HTTP client.
pub fn sync_kernels(
    lock: &mut Lock,
    store: &StoreWriter,
    plan: &Plan,
    fetcher: impl FnOnce() -> anyhow::Result<Fetcher>,
    report: &mut Report,
) -> anyhow::Result<()> {
    let entries = select(lock, plan)?;

    if plan.locked {
        let unsized_entries: Vec<&Entry> =
            entries.iter().filter(|e| e.file.size.is_none()).collect();
        if !unsized_entries.is_empty() {
            let mut msg = String::from(
                "--locked: these kernel files have no size in the lock, and this run would \
                 record it (a change to the lock):\n",
            );
            for e in &unsized_entries {
                let _ = writeln!(
                    msg,
                    "  kernels.\"{}\".{}.size: missing (url {}, sha256 {})",
                    e.version, e.arch, e.file.url, e.file.sha256
                );
            }
            msg.push_str(
                "next step: run `cargo xtask artifacts` once without --locked (it records the \
                 size after a verified download) and commit artifacts.lock, or re-pin with \
                 `cargo xtask lock add-kernel VERSION --url ARCH=URL`",
            );
            bail!(msg);
        }
    }

    let mut missing = Vec::new();
    let mut failed = Vec::new();
    let mut fetcher_slot = Some(fetcher);
    let mut client: Option<Fetcher> = None;
    for entry in &entries {
        let digest = entry.file.sha256;
        let link = store
            .layout()
            .kernel_link(entry.version.as_str(), entry.arch);
        let size = if store.has_verified_blob(&digest, entry.file.size)? {
            let size = fs::metadata(store.layout().blob(&digest))?.len();
            report
                .reused
                .push(format!("{} sha256:{} ({size} bytes)", entry.name(), digest));
            size
        } else if let Some(path) = crate::fetch::local_path(&entry.file.url) {
            // A local file needs no network, so `--offline` allows it.
            match copy_local(store, entry, &path) {
                Ok(size) => {
                    report.fetched.push(format!(
                        "{} sha256:{} ({size} bytes, from {})",
                        entry.name(),
                        digest,
                        path.display()
                    ));
                    size
                }
                Err(e) => {
                    failed.push(e);
                    continue;
                }
            }
        } else if plan.offline {
            missing.push(entry);
            continue;
        } else {
            if client.is_none() {
                let make = fetcher_slot.take().expect("the fetcher is built once");
                client = Some(make()?);
            }
            let fetcher = client.as_ref().expect("just built");
            // One failure does not stop the others: every file is tried, every failure listed.
            let fetched = match fetch(store, fetcher, entry) {
                Ok(fetched) => fetched,
                Err(e) => {
                    failed.push(explain(entry, fetcher, e));
                    continue;
                }
            };
            let resumed = match fetched.resumed_from {
                0 => String::new(),
                n => format!(", resumed at byte {n}"),
            };
            report.fetched.push(format!(
                "{} sha256:{} ({} bytes, {} request(s){resumed})",
                entry.name(),
                digest,
                fetched.size,
                fetched.requests
            ));
            fetched.size
        };
        store.link(&link, &digest)?;
        if entry.file.size.is_none() && !plan.locked {
            let file = lock
                .kernels
                .get_mut(&entry.version)
                .and_then(|files| files.get_mut(&entry.arch))
                .expect("selected from this lock");
            file.size = Some(size);
        }
    }

    if failed.len() == 1 {
        return Err(failed.remove(0));
    }
    if !failed.is_empty() {
        let mut msg = format!(
            "{} of {} kernel file(s) could not be fetched (any others were stored and linked):",
            failed.len(),
            entries.len()
        );
        for error in &failed {
            let _ = write!(msg, "\n- {}", format!("{error:#}").replace('\n', "\n  "));
        }
        bail!(msg);
    }
    if !missing.is_empty() {
        let mut msg = format!(
            "--offline: {} kernel file(s) are not in the store at {}:\n",
            missing.len(),
            store.layout().root().display()
        );
        for e in &missing {
            let _ = writeln!(
                msg,
                "  {}: sha256 {}{} from {}",
                e.name(),
                e.file.sha256,
                e.file
                    .size
                    .map(|s| format!(", {s} bytes"))
                    .unwrap_or_default(),
                e.file.url
            );
        }
        let _ = write!(
            msg,
            "next step: run without --offline where the URLs (or a --mirror) are reachable, or \
             copy each file to {}/<sha256>",
            store.layout().blobs().display()
        );
        bail!(msg);
    }
    Ok(())
}

/// Downloads one kernel file into the store: streamed into a blob writer (hashed as it is
/// written), checked by the fetcher, then committed, which checks again before the blob is
/// visible.
fn fetch(store: &StoreWriter, fetcher: &Fetcher, entry: &Entry) -> Result<Download, FetchError> {
    let expected = Expected {
        sha256: Some(entry.file.sha256),
        size: entry.file.size,
    };
    // Resumable: a run killed mid-download leaves a partial the next run continues.
    let mut writer = store
        .resumable_blob_writer(&entry.file.sha256, &fetcher.effective_url(&entry.file.url))
        .map_err(FetchError::Local)?;
    let download = fetcher.fetch(&entry.file.url, &entry.name(), expected, &mut writer)?;
    store
        .commit(
            writer,
            expected.sha256.as_ref(),
            expected.size,
            &entry.name(),
        )
        .map_err(FetchError::Local)?;
    Ok(download)
}

/// Copies a `file://` kernel into the store through a blob writer: hashed as it is copied, and
/// visible only once it matches the lock, exactly like a download.
fn copy_local(store: &StoreWriter, entry: &Entry, path: &Path) -> anyhow::Result<u64> {
    let url = &entry.file.url;
    let mut file = File::open(path).map_err(|e| {
        anyhow::anyhow!(
            "{}: cannot read {} ({url}): {e}\nnext step: put the pinned file there, or fix \
             kernels.\"{}\".{}.url in the lock",
            entry.name(),
            path.display(),
            entry.version,
            entry.arch
        )
    })?;
    let mut writer = store.blob_writer()?;
    io::copy(&mut file, &mut writer).with_context(|| {
        format!(
            "{}: copying {} into the store",
            entry.name(),
            path.display()
        )
    })?;
    let blob = store
        .commit(
            writer,
            Some(&entry.file.sha256),
            entry.file.size,
            &entry.name(),
        )
        .map_err(|e| {
            anyhow::anyhow!(
                "{} from {}: {e:#}\nnext step: the file is not the pinned one; restore the \
                 pinned file, or re-pin kernels.\"{}\".{} with its sha256 (`sha256sum {}`) after \
                 checking where it came from",
                entry.name(),
                path.display(),
                entry.version,
                entry.arch,
                path.display()
            )
        })?;
    Ok(blob.size)
}

/// The lock's kernel files the plan selects, in a stable order.
fn select(lock: &Lock, plan: &Plan) -> anyhow::Result<Vec<Entry>> {
    let mut entries = Vec::new();
    for (version, files) in lock.kernels.iter() {
        if !plan.versions.is_empty() && !plan.versions.contains(version) {
            continue;
        }
        for arch in &plan.arches {
            if !files.contains_key(arch) {
                bail!(
                    "kernel {version} pins no {arch} file (it pins: {}); pin one with \
                     `cargo xtask lock add-kernel {version} --url {arch}=URL`, or drop --arch {arch}",
                    files
                        .keys()
                        .map(|a| a.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        for (arch, file) in files.iter() {
            if plan.arches.is_empty() || plan.arches.contains(arch) {
                entries.push(Entry {
                    version: version.clone(),
                    arch: *arch,
                    file: file.clone(),
                });
            }
        }
    }
    for version in &plan.versions {
        if !lock.kernels.contains_key(version) {
            bail!(
                "--kernel {version}: not in the lock; pin it with \
                 `cargo xtask lock add-kernel {version} --url ARCH=URL`"
            );
        }
    }
    Ok(entries)
}

/// A download error with what it was for and what to do next.
fn explain(entry: &Entry, fetcher: &Fetcher, error: FetchError) -> anyhow::Error {
    let url = &entry.file.url;
    let effective = fetcher.effective_url(url);
    let via = if effective != *url {
        format!(" (lock URL {url}, fetched through a mirror)")
    } else {
        String::new()
    };
    let next = match &error {
        FetchError::Network { .. } => format!(
            "next step: check the network and proxy settings (HTTPS_PROXY/NO_PROXY); fetch from \
             a reachable copy with --mirror FROM=TO (or XTASK_MIRROR); or use --offline to work \
             with what the store holds (copy the file to blobs/sha256/{})",
            entry.file.sha256
        ),
        FetchError::Status { status, .. } if status.is_client_error() => format!(
            "next step: the URL is wrong, gone or not public; check kernels.\"{}\".{}.url, or pin \
             the right file with `cargo xtask lock add-kernel {} --url {}=URL` (review the diff)",
            entry.version, entry.arch, entry.version, entry.arch
        ),
        FetchError::Status { .. } => "next step: the server is failing; try again later or use \
             --mirror FROM=TO (or XTASK_MIRROR)"
            .to_owned(),
        FetchError::Digest { .. } | FetchError::Size { .. } => format!(
            "next step: the server's file is not the pinned one. If the publisher replaced it on \
             purpose, re-pin with `cargo xtask lock add-kernel {} --refresh --url {}={url}` and review the \
             diff; otherwise fetch from a trusted copy with --mirror FROM=TO",
            entry.version, entry.arch
        ),
        FetchError::Auth(_) => "next step: the server asks for credentials; fetch from a public \
             copy with --mirror FROM=TO (or XTASK_MIRROR)"
            .to_owned(),
        FetchError::Local(_) => "next step: check the data dir's free space and permissions \
             (--data-dir or SYSTEM_DATA_DIR)"
            .to_owned(),
    };
    anyhow::anyhow!("{}{via}: {error}\n{next}", entry.name())
}

#[cfg(test)]
mod tests;
