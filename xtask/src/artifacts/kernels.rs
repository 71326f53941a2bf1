//! The kernel stage: every kernel file the lock selects, verified in the store and named
//! `kernel/<version>/<arch>/vmlinux|Image`.
//!
//! A blob already present is re-hashed and reused without any request. A missing one is
//! downloaded ([`crate::fetch`]) into a store blob writer, and becomes visible only once its
//! sha256 (and size, when recorded) match the lock. A lock entry without a size gets the verified size recorded,
//! except under `--locked`, which refuses such an entry before touching the network.

use std::fmt::Write as _;
use std::fs;

use anyhow::bail;
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
        } else if plan.offline {
            missing.push(entry);
            continue;
        } else {
            if client.is_none() {
                let make = fetcher_slot.take().expect("the fetcher is built once");
                client = Some(make()?);
            }
            let fetcher = client.as_ref().expect("just built");
            let fetched = fetch(store, fetcher, entry).map_err(|e| explain(entry, fetcher, e))?;
            report.fetched.push(format!(
                "{} sha256:{} ({} bytes, {} request(s))",
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
    let mut writer = store.blob_writer().map_err(FetchError::Local)?;
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
             purpose, re-pin with `cargo xtask lock add-kernel {} --url {}={url}` and review the \
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
mod tests {
    use std::sync::Arc;

    use system::lock::{Defaults, Initrd, SCHEMA, UniqueMap};

    use super::*;
    use crate::fetch::{Mirror, Mirrors};
    use crate::store::temp_store;
    use testkit::http::{Reply, Server};

    const V: &str = "ch-test-1";

    fn content(len: usize) -> Arc<Vec<u8>> {
        Arc::new(testkit::noise::Noise::new(0x2545_f491_4f6c_dd1d).bytes(len))
    }

    fn lock_for(files: &[(Arch, &str, &[u8], Option<u64>)]) -> Lock {
        let mut per_arch = UniqueMap::default();
        for (arch, url, bytes, size) in files {
            per_arch.insert(
                *arch,
                KernelFile {
                    url: (*url).to_owned(),
                    sha256: system::hash::sha256_bytes(bytes),
                    size: *size,
                },
            );
        }
        let mut kernels = UniqueMap::default();
        kernels.insert(Version::new(V).unwrap(), per_arch);
        let mut initrds = UniqueMap::default();
        initrds.insert(
            Version::new("i").unwrap(),
            Initrd {
                base: None,
                modules: vec![],
                module_groups: Default::default(),
                outputs: UniqueMap::default(),
            },
        );
        Lock {
            schema: SCHEMA,
            defaults: Defaults {
                kernel: Version::new(V).unwrap(),
                initrd: Version::new("i").unwrap(),
            },
            kernels,
            bases: UniqueMap::default(),
            initrds,
        }
    }

    fn fetcher() -> anyhow::Result<Fetcher> {
        Fetcher::new(crate::fetch::tests::options(), Mirrors::default())
    }

    fn sync(lock: &mut Lock, store: &StoreWriter, plan: &Plan) -> anyhow::Result<Report> {
        let mut report = Report::default();
        sync_kernels(lock, store, plan, fetcher, &mut report)?;
        Ok(report)
    }

    /// Nothing but the writer lock: no blob, no partial file, no link.
    fn assert_store_empty(store: &StoreWriter) {
        let blobs: Vec<_> = fs::read_dir(store.layout().blobs()).unwrap().collect();
        assert!(blobs.is_empty(), "blobs should be empty: {blobs:?}");
        assert!(!store.layout().root().join("kernel").exists());
    }

    fn assert_kernel(store: &StoreWriter, arch: Arch, bytes: &[u8]) {
        let link = store.layout().kernel_link(V, arch);
        assert_eq!(fs::read(&link).unwrap(), bytes);
        let blob = store.layout().blob(&system::hash::sha256_bytes(bytes));
        assert_eq!(
            fs::canonicalize(&link).unwrap(),
            fs::canonicalize(blob).unwrap()
        );
    }

    #[test]
    fn fetches_verifies_links_and_records_the_size() {
        let body = content(300_000);
        let server = Server::serving(&body, true);
        let (_dir, store) = temp_store();
        let mut lock = lock_for(&[(Arch::X86_64, &server.url("/vmlinux"), &body, None)]);

        let report = sync(&mut lock, &store, &Plan::default()).unwrap();
        assert_eq!(server.count(), 1);
        assert_eq!(server.requests()[0].method, "GET");
        assert_eq!(report.fetched.len(), 1, "{report}");
        assert_kernel(&store, Arch::X86_64, &body);
        assert_eq!(lock.kernels[V][&Arch::X86_64].size, Some(body.len() as u64));

        // Second run: present and verified, so not a single request.
        let report = sync(&mut lock, &store, &Plan::default()).unwrap();
        assert_eq!(server.count(), 1);
        assert_eq!((report.fetched.len(), report.reused.len()), (0, 1));
    }

    #[test]
    fn a_wrong_digest_stores_nothing() {
        let pinned = content(10_000);
        let server = Server::start(|_, _| Reply::Body {
            body: Arc::new(b"some other kernel".to_vec()),
            ranges: false,
        })
        .unwrap();
        let (_dir, store) = temp_store();
        let url = server.url("/vmlinux");
        let mut lock = lock_for(&[(Arch::X86_64, &url, &pinned, None)]);
        let err = sync(&mut lock, &store, &Plan::default()).unwrap_err();
        let text = format!("{err:#}");
        for needle in [
            V,
            "x86_64",
            url.as_str(),
            &system::hash::sha256_bytes(&pinned).hex(),
            &system::hash::sha256_bytes(b"some other kernel").hex(),
            "lock add-kernel",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in: {text}");
        }
        assert_store_empty(&store);
        assert_eq!(lock.kernels[V][&Arch::X86_64].size, None);
    }

    #[test]
    fn not_found_fails_at_once_with_the_next_step() {
        let server = Server::start(|_, _| Reply::Status {
            code: 404,
            headers: vec![],
        })
        .unwrap();
        let (_dir, store) = temp_store();
        let url = server.url("/gone");
        let mut lock = lock_for(&[(Arch::Aarch64, &url, b"k", None)]);
        let err = format!(
            "{:#}",
            sync(&mut lock, &store, &Plan::default()).unwrap_err()
        );
        assert_eq!(server.count(), 1, "no retry storm on 404");
        for needle in ["404", &url, V, "aarch64", "lock add-kernel"] {
            assert!(err.contains(needle), "missing {needle:?} in: {err}");
        }
        assert_store_empty(&store);
    }

    #[test]
    fn a_network_failure_suggests_a_mirror_or_offline() {
        // Nothing listens on port 9: refused, retried, then explained.
        let (_dir, store) = temp_store();
        let mut lock = lock_for(&[(Arch::X86_64, "http://127.0.0.1:9/k", b"k", None)]);
        let err = format!(
            "{:#}",
            sync(&mut lock, &store, &Plan::default()).unwrap_err()
        );
        assert!(
            err.contains("--mirror") && err.contains("--offline"),
            "{err}"
        );
        assert!(err.contains("3 attempt(s)") && err.contains(V), "{err}");
        assert_store_empty(&store);
    }

    #[test]
    fn a_mirror_replaces_the_url_prefix() {
        let body = content(1_000);
        let server = Server::serving(&body, true);
        let (_dir, store) = temp_store();
        // `.invalid` never resolves: reaching the file proves the mirror was used.
        let mut lock = lock_for(&[(
            Arch::X86_64,
            "https://releases.invalid/linux/k",
            &body,
            None,
        )]);
        let mirror: Mirror = format!("https://releases.invalid/={}", server.url("/copy/"))
            .parse()
            .unwrap();
        let mut report = Report::default();
        sync_kernels(
            &mut lock,
            &store,
            &Plan::default(),
            || Fetcher::new(crate::fetch::tests::options(), Mirrors(vec![mirror])),
            &mut report,
        )
        .unwrap();
        assert_eq!(server.requests()[0].path, "/copy/linux/k");
        assert_eq!(
            lock.kernels[V][&Arch::X86_64].url,
            "https://releases.invalid/linux/k",
            "the lock keeps the original URL"
        );
        assert_kernel(&store, Arch::X86_64, &body);
    }

    #[test]
    fn offline_uses_the_store_and_lists_every_missing_file() {
        let x86 = content(2_000);
        let arm = content(3_000);
        let (_dir, store) = temp_store();
        // URLs that would fail if anything tried them.
        let mut lock = lock_for(&[
            (Arch::X86_64, "http://127.0.0.1:9/x", &x86, None),
            (Arch::Aarch64, "http://127.0.0.1:9/a", &arm, None),
        ]);
        let offline = Plan {
            offline: true,
            ..Plan::default()
        };
        let no_network = || -> anyhow::Result<Fetcher> { panic!("--offline built a client") };

        let mut report = Report::default();
        let err = format!(
            "{:#}",
            sync_kernels(&mut lock, &store, &offline, no_network, &mut report).unwrap_err()
        );
        for needle in [
            "--offline",
            "2 kernel file(s)",
            "http://127.0.0.1:9/x",
            "http://127.0.0.1:9/a",
            &system::hash::sha256_bytes(&x86).hex(),
        ] {
            assert!(err.contains(needle), "missing {needle:?} in: {err}");
        }

        // With the blobs in place (copied in by hand), --offline succeeds and links them.
        store.put_bytes(&x86).unwrap();
        store.put_bytes(&arm).unwrap();
        let mut report = Report::default();
        sync_kernels(&mut lock, &store, &offline, no_network, &mut report).unwrap();
        assert_eq!(report.reused.len(), 2);
        assert_kernel(&store, Arch::X86_64, &x86);
        assert_kernel(&store, Arch::Aarch64, &arm);
    }

    #[test]
    fn locked_refuses_an_unrecorded_size_before_any_request() {
        let body = content(1_000);
        let server = Server::serving(&body, true);
        let (_dir, store) = temp_store();
        let mut lock = lock_for(&[(Arch::X86_64, &server.url("/k"), &body, None)]);
        let original = lock.clone();
        let locked = Plan {
            locked: true,
            ..Plan::default()
        };
        let err = format!("{:#}", sync(&mut lock, &store, &locked).unwrap_err());
        assert!(err.contains("--locked"), "{err}");
        assert!(
            err.contains(&format!("kernels.\"{V}\".x86_64.size")),
            "{err}"
        );
        assert_eq!(server.count(), 0);
        assert_eq!(lock, original);

        // With the size pinned, --locked fetches and leaves the lock alone.
        lock.kernels
            .get_mut(V)
            .unwrap()
            .get_mut(&Arch::X86_64)
            .unwrap()
            .size = Some(body.len() as u64);
        let pinned = lock.clone();
        sync(&mut lock, &store, &locked).unwrap();
        assert_eq!(lock, pinned);
        assert_kernel(&store, Arch::X86_64, &body);
    }

    #[test]
    fn selection_narrows_by_version_and_arch() {
        let x86 = content(100);
        let (_dir, store) = temp_store();
        store.put_bytes(&x86).unwrap();
        let mut lock = lock_for(&[
            (Arch::X86_64, "http://127.0.0.1:9/x", &x86, None),
            (Arch::Aarch64, "http://127.0.0.1:9/a", b"arm", None),
        ]);
        let plan = Plan {
            arches: vec![Arch::X86_64],
            offline: true,
            ..Plan::default()
        };
        let report = sync(&mut lock, &store, &plan).unwrap();
        assert_eq!(report.reused.len(), 1);

        let unknown = Plan {
            versions: vec![Version::new("nope").unwrap()],
            ..Plan::default()
        };
        let err = sync(&mut lock, &store, &unknown).unwrap_err().to_string();
        assert!(err.contains("nope") && err.contains("add-kernel"), "{err}");
    }

    #[test]
    fn two_concurrent_runs_leave_one_consistent_store() {
        let body = content(2_000_000);
        let server = Server::serving(&body, true);
        let dir = tempfile::tempdir().unwrap();
        let url = server.url("/k");
        let runs: Vec<_> = (0..2)
            .map(|_| {
                let (data_dir, url, body) = (dir.path().to_owned(), url.clone(), body.clone());
                std::thread::spawn(move || {
                    // Each run opens its own writer: its own lock file handle, as a process would.
                    let store = StoreWriter::open(&data_dir)?;
                    let mut lock = lock_for(&[(Arch::X86_64, &url, &body, None)]);
                    sync(&mut lock, &store, &Plan::default())
                })
            })
            .collect();
        let reports: Vec<Report> = runs
            .into_iter()
            .map(|r| r.join().unwrap().unwrap())
            .collect();
        let fetched: usize = reports.iter().map(|r| r.fetched.len()).sum();
        let reused: usize = reports.iter().map(|r| r.reused.len()).sum();
        assert_eq!((fetched, reused), (1, 1), "one downloads, the other reuses");
        assert_eq!(server.count(), 1);
        let store = StoreWriter::open(dir.path()).unwrap();
        assert_kernel(&store, Arch::X86_64, &body);
        let names: Vec<_> = fs::read_dir(store.layout().blobs())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "one blob, no leftovers: {names:?}");
    }
}
