//! `cargo xtask lock add-kernel`: the only way a kernel digest enters the lock.
//!
//! It downloads each file, hashes it while streaming and stores it (so the next
//! `cargo xtask artifacts` reuses it); then it records URL + sha256 + size in the lock (merged
//! into the file as it is then, see [`crate::lock::update`]), links the files as
//! `kernel/<version>/<arch>/...`, and returns the change for review. A file the store already
//! holds for that URL (pinned in the lock, or fetched by an earlier add) is reused without a
//! request unless `refresh` asks for a fresh download. Nothing is half done: a failed download
//! or lock write leaves the lock unchanged and makes no link.

use std::fs;
use std::path::Path;
use std::str::FromStr;

use anyhow::{Context as _, bail};
use system::lock::{KernelFile, UniqueMap, Version};
use system::{Arch, Lock, Sha256};

use crate::fetch::{Expected, FetchError, Fetcher};
use crate::lock::Updated;
use crate::store::{StoreWriter, atomic_write};

/// `ARCH=URL`: the file one architecture of a kernel version is fetched from.
#[derive(Debug, Clone)]
pub struct ArchUrl {
    pub arch: Arch,
    pub url: String,
}

impl FromStr for ArchUrl {
    type Err = String;
    fn from_str(text: &str) -> Result<ArchUrl, String> {
        let (arch, url) = text
            .split_once('=')
            .ok_or_else(|| format!("`{text}`: expected ARCH=URL, e.g. x86_64=https://..."))?;
        let arch: Arch = arch.parse().map_err(|e| format!("`{text}`: {e}"))?;
        let local = url.strip_prefix("file://");
        if !(url.starts_with("https://")
            || url.starts_with("http://")
            || local.is_some_and(|path| path.starts_with('/')))
        {
            return Err(format!(
                "`{text}`: `{url}` is not an http(s) URL or an absolute file:/// URL"
            ));
        }
        Ok(ArchUrl {
            arch,
            url: url.to_owned(),
        })
    }
}

/// What to pin.
#[derive(Debug, Clone)]
pub struct Request {
    pub version: Version,
    /// One URL per architecture.
    pub urls: Vec<ArchUrl>,
    /// Also make it `defaults.kernel`.
    pub make_default: bool,
    /// Download even when the store holds what a URL served before (the publisher replaced it).
    pub refresh: bool,
}

/// Pins `request.version` in the lock at `lock_path` to what its URLs serve: each file is
/// stored (hashed once, while streaming, or reused), the lock is updated, then the files are
/// linked. Returns what the update did to the file.
pub fn add_kernel(
    lock_path: &Path,
    store: &StoreWriter,
    fetcher: &Fetcher,
    request: &Request,
) -> anyhow::Result<Updated> {
    let mut seen = Vec::new();
    for u in &request.urls {
        if seen.contains(&u.arch) {
            bail!("--url {}=...: given twice; give one URL per arch", u.arch);
        }
        seen.push(u.arch);
    }
    let old = crate::lock::read(lock_path)?;
    let version = &request.version;
    // A name whose constant collides would break `system`'s build: refuse before downloading.
    old.check_new_kernel(version)?;
    let mut files = Vec::new();
    for u in &request.urls {
        let label = format!("kernel {version} {}", u.arch);
        let (sha256, size) = obtain(store, fetcher, &old, &u.url, request.refresh, &label)
            .map_err(|e| {
                anyhow::anyhow!(
                    "{label}: {e}\nnext step: check the URL; behind a firewall use --mirror FROM=TO \
                     (or XTASK_MIRROR); for a slow server raise --read-timeout or --attempts. \
                     Nothing was written to the lock and no link was made; files downloaded so \
                     far stay in the store and the next attempt reuses them"
                )
            })?;
        files.push((
            u.arch,
            KernelFile {
                url: u.url.clone(),
                sha256,
                size: Some(size),
            },
        ));
    }
    let new = pinned(&old, version, &files, request.make_default)?;
    let updated = crate::lock::update(lock_path, &old, &new)?;
    // Only now does the lock name the version: a failure above leaves no link to a version
    // the lock does not have.
    for (arch, file) in &files {
        store.link(
            &store.layout().kernel_link(version.as_str(), *arch),
            &file.sha256,
        )?;
    }
    Ok(updated)
}

/// `lock` with `files` pinned for `version` (other arches of it kept), validated.
fn pinned(
    lock: &Lock,
    version: &Version,
    files: &[(Arch, KernelFile)],
    make_default: bool,
) -> anyhow::Result<Lock> {
    let mut new = lock.clone();
    let mut pinned = new.kernels.get(version).cloned().unwrap_or_default();
    for (arch, file) in files {
        if let Some(previous) = pinned.get(arch)
            && previous.sha256 != file.sha256
        {
            eprintln!(
                "kernel {version} {arch}: replacing pinned sha256 {} with {}",
                previous.sha256, file.sha256
            );
        }
        pinned.insert(*arch, file.clone());
    }
    new.kernels.insert(version.clone(), UniqueMap(pinned.0));
    if make_default {
        new.defaults.kernel = version.clone();
    }
    // The lock's own validation is the last word on what may be written.
    Lock::parse(&new.to_json()).context("the updated lock does not validate")
}

/// The digest and size of what `url` serves, with the file in the store: a verified blob it
/// served before, or a fresh download.
fn obtain(
    store: &StoreWriter,
    fetcher: &Fetcher,
    lock: &Lock,
    url: &str,
    refresh: bool,
    label: &str,
) -> Result<(Sha256, u64), FetchError> {
    // A local file may have been rebuilt in place: always read it again.
    if let Some(path) = crate::fetch::local_path(url) {
        let mut writer = store.blob_writer().map_err(FetchError::Local)?;
        let copied = fs::File::open(&path)
            .and_then(|mut file| std::io::copy(&mut file, &mut writer))
            .map_err(|e| {
                FetchError::Local(anyhow::anyhow!(
                    "{label}: cannot read {} ({url}): {e}",
                    path.display()
                ))
            })?;
        let blob = store
            .commit(writer, None, Some(copied), label)
            .map_err(FetchError::Local)?;
        eprintln!(
            "{label}: read {} ({} bytes, sha256:{})",
            path.display(),
            blob.size,
            blob.sha256
        );
        return Ok((blob.sha256, blob.size));
    }
    if !refresh {
        for (digest, size) in known_digests(lock, store, url) {
            if store
                .has_verified_blob(&digest, size)
                .map_err(FetchError::Local)?
            {
                let size = fs::metadata(store.layout().blob(&digest))
                    .map_err(|e| FetchError::Local(e.into()))?
                    .len();
                eprintln!(
                    "{label}: reusing sha256:{digest} ({size} bytes), which {url} served before; \
                     no request (--refresh downloads it again)"
                );
                return Ok((digest, size));
            }
        }
    }
    let mut writer = store.blob_writer().map_err(FetchError::Local)?;
    // This is where a digest enters the lock, so nothing is expected yet.
    let download = fetcher.fetch(url, label, Expected::default(), &mut writer)?;
    store
        .commit(writer, None, None, label)
        .map_err(FetchError::Local)?;
    record_download(store, url, &download.sha256, download.size).map_err(FetchError::Local)?;
    Ok((download.sha256, download.size))
}

/// What `url` served before, as far as this lock and store know: the lock's pins with the same
/// URL, then the store's record of an earlier add.
fn known_digests(lock: &Lock, store: &StoreWriter, url: &str) -> Vec<(Sha256, Option<u64>)> {
    let mut known: Vec<(Sha256, Option<u64>)> = lock
        .kernels
        .values()
        .flat_map(|files| files.values())
        .filter(|file| file.url == url)
        .map(|file| (file.sha256, file.size))
        .collect();
    // A garbled record only costs a download.
    let record = fs::read_to_string(store.layout().download_record(url)).unwrap_or_default();
    if let Some((hex, size)) = record.trim().split_once(' ')
        && let (Ok(digest), Ok(size)) = (Sha256::from_hex(hex), size.parse())
    {
        known.push((digest, Some(size)));
    }
    known
}

fn record_download(
    store: &StoreWriter,
    url: &str,
    digest: &Sha256,
    size: u64,
) -> anyhow::Result<()> {
    let path = store.layout().download_record(url);
    let dir = path.parent().context("a record has a parent directory")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    atomic_write(&path, format!("{} {size}\n", digest.hex()).as_bytes())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex, mpsc};

    use super::*;
    use crate::fetch::Mirrors;
    use testkit::http::{Reply, Server};

    fn test_fetcher() -> Fetcher {
        Fetcher::new(crate::fetch::tests::options(), Mirrors::default()).unwrap()
    }

    fn committed() -> Lock {
        Lock::parse(include_str!("../../../artifacts.lock")).unwrap()
    }

    /// A data dir and a copy of the committed lock in a temp dir.
    struct Fixture {
        dir: tempfile::TempDir,
        lock: std::path::PathBuf,
        store: StoreWriter,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join("artifacts.lock");
        crate::lock::write(&lock, &committed()).unwrap();
        let store = StoreWriter::open(&dir.path().join("data")).unwrap();
        Fixture { dir, lock, store }
    }

    fn request(version: &str, urls: &[String]) -> Request {
        Request {
            version: Version::new(version).unwrap(),
            urls: urls.iter().map(|u| u.parse().unwrap()).collect(),
            make_default: false,
            refresh: false,
        }
    }

    fn not_found() -> Server {
        Server::start(|_, _| Reply::Status {
            code: 404,
            headers: vec![],
        })
        .unwrap()
    }

    #[test]
    fn add_kernel_downloads_records_links_and_diffs() {
        let body = Arc::new(b"a new kernel image".to_vec());
        let server = Server::serving(&body, true);
        let f = fixture();
        let mut req = request(
            "ch-test-9",
            &[format!("x86_64={}", server.url("/vmlinux-x86_64"))],
        );
        req.make_default = true;
        let updated = add_kernel(&f.lock, &f.store, &test_fetcher(), &req).unwrap();

        let new = crate::lock::read(&f.lock).unwrap();
        assert_eq!(updated.after, new);
        assert_eq!(updated.before, committed());
        let file = &new.kernels["ch-test-9"][&Arch::X86_64];
        assert_eq!(file.sha256, system::hash::sha256_bytes(&body));
        assert_eq!(file.size, Some(body.len() as u64));
        assert_eq!(new.defaults.kernel, req.version);
        assert_eq!(server.count(), 1);
        assert_eq!(
            fs::read(f.store.layout().kernel_link("ch-test-9", Arch::X86_64)).unwrap(),
            *body
        );

        let text = updated.diff();
        assert!(
            text.contains(&format!("+        \"sha256\": \"{}\"", file.sha256)),
            "{text}"
        );
        assert!(
            text.contains("-    \"kernel\": \"ch-release-v6.16.9-20260508\""),
            "{text}"
        );
        assert!(text.contains("+    \"kernel\": \"ch-test-9\""), "{text}");
        assert!(
            !text.contains("alpine"),
            "unchanged parts are left out: {text}"
        );
    }

    #[test]
    fn add_kernel_failure_leaves_the_lock_untouched() {
        let server = Server::start(|_, _| Reply::Status {
            code: 403,
            headers: vec![],
        })
        .unwrap();
        let f = fixture();
        let before = fs::read(&f.lock).unwrap();
        let req = request("ch-test-9", &[format!("aarch64={}", server.url("/Image"))]);
        let err = add_kernel(&f.lock, &f.store, &test_fetcher(), &req)
            .unwrap_err()
            .to_string();
        assert!(err.contains("403") && err.contains("aarch64"), "{err}");
        assert_eq!(server.count(), 1);
        assert_eq!(fs::read(&f.lock).unwrap(), before);
    }

    #[test]
    fn a_failed_second_url_leaves_no_link_and_the_retry_reuses_the_first_file() {
        let x86 = Arc::new(b"x86 kernel".to_vec());
        let arm = Arc::new(b"arm kernel".to_vec());
        let good = Server::serving(&x86, true);
        let gone = not_found();
        let f = fixture();
        let before = fs::read(&f.lock).unwrap();
        let urls = [
            format!("x86_64={}", good.url("/vmlinux")),
            format!("aarch64={}", gone.url("/Image")),
        ];
        let err = format!(
            "{:#}",
            add_kernel(
                &f.lock,
                &f.store,
                &test_fetcher(),
                &request("ch-test-9", &urls)
            )
            .unwrap_err()
        );
        assert!(err.contains("404") && err.contains("no link"), "{err}");
        assert_eq!(fs::read(&f.lock).unwrap(), before, "the lock is unchanged");
        assert!(
            !f.store.layout().root().join("kernel/ch-test-9").exists(),
            "a version the lock does not have has no link"
        );

        // The retry, with the second URL fixed, does not download the first file again.
        let fixed = Server::serving(&arm, true);
        let urls = [urls[0].clone(), format!("aarch64={}", fixed.url("/Image"))];
        add_kernel(
            &f.lock,
            &f.store,
            &test_fetcher(),
            &request("ch-test-9", &urls),
        )
        .unwrap();
        assert_eq!(good.count(), 1, "the stored x86_64 file was reused");
        assert_eq!(fixed.count(), 1);
        let new = crate::lock::read(&f.lock).unwrap();
        assert_eq!(
            new.kernels["ch-test-9"][&Arch::X86_64].sha256,
            system::hash::sha256_bytes(&x86)
        );
        for (arch, body) in [(Arch::X86_64, &x86), (Arch::Aarch64, &arm)] {
            let link = f.store.layout().kernel_link("ch-test-9", arch);
            assert_eq!(fs::read(link).unwrap(), **body);
        }
    }

    #[test]
    fn a_pinned_url_whose_blob_is_stored_is_not_downloaded_again_unless_refreshed() {
        let body = Arc::new(b"kernel v1".to_vec());
        let server = Server::serving(&body, true);
        let f = fixture();
        let url = format!("x86_64={}", server.url("/vmlinux"));
        add_kernel(
            &f.lock,
            &f.store,
            &test_fetcher(),
            &request("ch-a", std::slice::from_ref(&url)),
        )
        .unwrap();
        assert_eq!(server.count(), 1);
        // Not the add's own record: the lock's pin is enough.
        fs::remove_file(f.store.layout().download_record(&server.url("/vmlinux"))).unwrap();

        // The same URL under another version: the lock pins it and the store holds the blob.
        let updated = add_kernel(
            &f.lock,
            &f.store,
            &test_fetcher(),
            &request("ch-b", std::slice::from_ref(&url)),
        )
        .unwrap();
        assert_eq!(server.count(), 1, "no request for a file the store holds");
        assert_eq!(
            updated.after.kernels["ch-b"][&Arch::X86_64],
            updated.after.kernels["ch-a"][&Arch::X86_64]
        );

        // --refresh downloads it again (a publisher may replace a file in place).
        let mut refresh = request("ch-b", &[url]);
        refresh.refresh = true;
        add_kernel(&f.lock, &f.store, &test_fetcher(), &refresh).unwrap();
        assert_eq!(server.count(), 2);

        // A stored blob that no longer verifies is not reused either.
        let digest = system::hash::sha256_bytes(&body);
        let blob = f.store.layout().blob(&digest);
        let _ = fs::remove_file(f.store.layout().verified_stamp(&digest));
        fs::remove_file(&blob).unwrap();
        fs::write(&blob, b"rotten").unwrap();
        add_kernel(
            &f.lock,
            &f.store,
            &test_fetcher(),
            &request("ch-c", &[format!("x86_64={}", server.url("/vmlinux"))]),
        )
        .unwrap();
        assert_eq!(server.count(), 3);
        assert_eq!(fs::read(&blob).unwrap(), *body);
    }

    /// The race from the fault campaign: `artifacts` reads the lock, `lock add-kernel` writes a
    /// new version while `artifacts` downloads, then `artifacts` records a size. Both land.
    #[test]
    fn add_kernel_and_an_artifacts_run_at_once_both_land() {
        let f = fixture();
        let kernel = Arc::new(testkit::noise::Noise::new(7).bytes(4_096));
        // A lock whose kernel has no size yet: the artifacts run will record it.
        let server_started = Arc::new(Mutex::new(None::<mpsc::Sender<()>>));
        let (started_tx, started_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        *server_started.lock().unwrap() = Some(started_tx);
        let go_rx = Mutex::new(go_rx);
        let slow = {
            let kernel = Arc::clone(&kernel);
            let started = Arc::clone(&server_started);
            Server::start(move |_, _| {
                // Hold the download until add-kernel has written the lock.
                if let Some(tx) = started.lock().unwrap().take() {
                    tx.send(()).unwrap();
                    go_rx.lock().unwrap().recv().unwrap();
                }
                Reply::Body {
                    body: Arc::clone(&kernel),
                    ranges: true,
                }
            })
            .unwrap()
        };
        let mut lock = committed();
        let unsized_version = Version::new("ch-unsized").unwrap();
        let mut files = UniqueMap::default();
        files.insert(
            Arch::X86_64,
            KernelFile {
                url: slow.url("/vmlinux"),
                sha256: system::hash::sha256_bytes(&kernel),
                size: None,
            },
        );
        lock.kernels.insert(unsized_version.clone(), files);
        crate::lock::write(&f.lock, &lock).unwrap();

        let artifacts = {
            let options = crate::artifacts::Options {
                lock: f.lock.clone(),
                data_dir: f.dir.path().join("other-data"),
                workspace: crate::workspace_root(),
                arches: vec![Arch::X86_64],
                kernels: vec![unsized_version.clone()],
                initrds: vec![],
                offline: false,
                locked: false,
                // Long enough that the held download is not retried before add-kernel is done.
                transfer: crate::fetch::Options {
                    read_timeout: std::time::Duration::from_secs(60),
                    ..crate::fetch::tests::options()
                },
                mirrors: Mirrors::default(),
                stages: vec![crate::artifacts::Stage::Kernels],
                modules_dir: None,
                modules: None,
                base_sources: Default::default(),
                firmware_dir: None,
                from: vec![],
            };
            std::thread::spawn(move || crate::artifacts::run(&options))
        };
        started_rx.recv().unwrap();
        let added = Arc::new(b"added while artifacts ran".to_vec());
        let other = Server::serving(&added, true);
        add_kernel(
            &f.lock,
            &f.store,
            &test_fetcher(),
            &request("ch-added", &[format!("aarch64={}", other.url("/Image"))]),
        )
        .unwrap();
        go_tx.send(()).unwrap();
        artifacts.join().unwrap().unwrap();
        assert_eq!(
            slow.count(),
            1,
            "the held download was not retried around the race"
        );

        let on_disk = crate::lock::read(&f.lock).unwrap();
        assert!(
            on_disk.kernels.contains_key("ch-added"),
            "the artifacts run wrote back a stale lock"
        );
        assert_eq!(
            on_disk.kernels["ch-unsized"][&Arch::X86_64].size,
            Some(kernel.len() as u64),
            "the recorded size was lost"
        );
    }

    #[test]
    fn a_version_whose_constant_collides_is_refused_before_downloading() {
        let body = Arc::new(b"a kernel".to_vec());
        let server = Server::serving(&body, true);
        let f = fixture();
        let colliding = committed()
            .kernels
            .keys()
            .next()
            .expect("the committed lock pins a kernel")
            .as_str()
            .replacen('-', "_", 1);
        let req = request(&colliding, &[format!("x86_64={}", server.url("/k"))]);
        let err = add_kernel(&f.lock, &f.store, &test_fetcher(), &req)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("`{colliding}`")), "{err}");
        assert_eq!(server.count(), 0);
        assert_eq!(crate::lock::read(&f.lock).unwrap(), committed());
    }

    #[test]
    fn arch_url_parses() {
        assert!("x86_64=https://h/k".parse::<ArchUrl>().is_ok());
        assert!("riscv=https://h/k".parse::<ArchUrl>().is_err());
        assert!("x86_64".parse::<ArchUrl>().is_err());
        assert!("x86_64=ftp://h/k".parse::<ArchUrl>().is_err());
    }

    #[test]
    fn add_kernel_pins_a_local_file_and_reads_it_again_every_time() {
        let f = fixture();
        let image = f.dir.path().join("vmlinuz");
        fs::write(&image, b"local build 1").unwrap();
        let url = format!("x86_64=file://{}", image.display());
        let req = request("local-1", std::slice::from_ref(&url));
        add_kernel(&f.lock, &f.store, &test_fetcher(), &req).unwrap();
        let pinned = |f: &Fixture| {
            crate::lock::read(&f.lock).unwrap().kernels["local-1"][&Arch::X86_64].clone()
        };
        assert_eq!(
            pinned(&f).sha256,
            system::hash::sha256_bytes(b"local build 1")
        );
        assert_eq!(pinned(&f).url, format!("file://{}", image.display()));

        // Rebuilt in place: the new content is pinned, not the blob the URL gave before.
        fs::write(&image, b"local build 2").unwrap();
        add_kernel(&f.lock, &f.store, &test_fetcher(), &req).unwrap();
        assert_eq!(
            pinned(&f).sha256,
            system::hash::sha256_bytes(b"local build 2")
        );

        fs::remove_file(&image).unwrap();
        let err = format!(
            "{:#}",
            add_kernel(&f.lock, &f.store, &test_fetcher(), &req).unwrap_err()
        );
        assert!(err.contains(&image.display().to_string()), "{err}");
        assert!("x86_64=file://relative/k".parse::<ArchUrl>().is_err());
    }
}
