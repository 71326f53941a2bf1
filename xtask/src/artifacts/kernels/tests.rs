//! The kernel stage's tests: against the loopback HTTP server, in temp stores.

use std::sync::Arc;

use system::lock::{Defaults, Initrd, SCHEMA, UniqueMap};

use super::*;
use crate::fetch::{Mirror, Mirrors};
use crate::store::temp_store;
use testkit::http::{Reply, Server};

/// What earlier runs left in the store: partial downloads, blobs that are not files.
mod leftovers;

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
            compression: Default::default(),
            agent: false,
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
fn every_kernel_is_tried_and_every_failure_reported() {
    let good = content(5_000);
    let served = Server::serving(&good, true);
    let gone = Server::start(|_, _| Reply::Status {
        code: 404,
        headers: vec![],
    })
    .unwrap();
    let (_dir, store) = temp_store();
    let (gone_url, wrong_url) = (gone.url("/x86"), served.url("/arm"));
    // V: x86_64 is gone, aarch64 serves other bytes than pinned; V2 x86_64 is fine.
    let mut lock = lock_for(&[
        (Arch::X86_64, &gone_url, b"k", None),
        (Arch::Aarch64, &wrong_url, b"pinned arm", None),
    ]);
    let mut files = UniqueMap::default();
    files.insert(
        Arch::X86_64,
        KernelFile {
            url: served.url("/ok"),
            sha256: system::hash::sha256_bytes(&good),
            size: None,
        },
    );
    lock.kernels
        .insert(Version::new("ch-test-2").unwrap(), files);

    let err = format!(
        "{:#}",
        sync(&mut lock, &store, &Plan::default()).unwrap_err()
    );
    for needle in [
        "2 of 3 kernel file(s)",
        &format!("kernel {V} x86_64"),
        &format!("kernel {V} aarch64"),
        "404",
        &gone_url,
        &wrong_url,
        &system::hash::sha256_bytes(b"pinned arm").hex(),
    ] {
        assert!(err.contains(needle), "missing {needle:?} in: {err}");
    }
    assert!(!err.contains("ch-test-2"), "{err}");
    // The one that could be fetched was, and is linked and recorded.
    let link = store.layout().kernel_link("ch-test-2", Arch::X86_64);
    assert_eq!(fs::read(link).unwrap(), *good);
    assert_eq!(
        lock.kernels["ch-test-2"][&Arch::X86_64].size,
        Some(good.len() as u64)
    );
    assert_eq!(lock.kernels[V][&Arch::Aarch64].size, None);
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

#[test]
fn a_file_url_is_copied_verified_and_allowed_offline() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = content(70_000);
    let path = dir.path().join("my kernel");
    fs::write(&path, bytes.as_slice()).unwrap();
    let url = "file://".to_owned() + &dir.path().join("my%20kernel").display().to_string();
    let mut lock = lock_for(&[(Arch::X86_64, &url, &bytes, None)]);
    let (_store_dir, store) = temp_store();
    let plan = Plan {
        offline: true,
        ..Plan::default()
    };
    let report = sync(&mut lock, &store, &plan).unwrap();
    assert_kernel(&store, Arch::X86_64, &bytes);
    assert_eq!(report.fetched.len(), 1, "{report}");
    assert_eq!(
        lock.kernels[&Version::new(V).unwrap()][&Arch::X86_64].size,
        Some(70_000)
    );
}

#[test]
fn a_missing_file_url_fails_naming_the_path_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vmlinuz-gone");
    let url = format!("file://{}", path.display());
    let mut lock = lock_for(&[(Arch::X86_64, &url, b"k", None)]);
    let (_store_dir, store) = temp_store();
    let err = sync(&mut lock, &store, &Plan::default()).unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains("No such file"), "{text}");
    assert!(text.contains("next step"), "{text}");
    assert_store_empty(&store);
}

#[test]
fn a_file_url_with_other_content_fails_naming_both_digests_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vmlinuz");
    fs::write(&path, b"not the pinned kernel").unwrap();
    let url = format!("file://{}", path.display());
    let mut lock = lock_for(&[(Arch::X86_64, &url, b"the pinned kernel", None)]);
    let (_store_dir, store) = temp_store();
    let err = sync(&mut lock, &store, &Plan::default()).unwrap_err();
    let text = format!("{err:#}");
    let pinned = system::hash::sha256_bytes(b"the pinned kernel");
    let actual = system::hash::sha256_bytes(b"not the pinned kernel");
    assert!(text.contains(&pinned.hex()), "{text}");
    assert!(text.contains(&actual.hex()), "{text}");
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert_store_empty(&store);
}
