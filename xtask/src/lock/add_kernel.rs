//! `cargo xtask lock add-kernel`: the only way a kernel digest enters the lock.
//!
//! It downloads each file, hashes it while streaming, stores it (so the next
//! `cargo xtask artifacts` reuses it), records URL + sha256 + size, writes the lock atomically
//! and prints the change as a line diff for review.

use std::str::FromStr;

use anyhow::{Context as _, bail};
use system::lock::{KernelFile, UniqueMap, Version};
use system::{Arch, Lock};

use crate::fetch::{Download, Expected, FetchError, Fetcher};
use crate::store::StoreWriter;

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
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return Err(format!("`{text}`: `{url}` is not an http(s) URL"));
        }
        Ok(ArchUrl {
            arch,
            url: url.to_owned(),
        })
    }
}

/// The lock with `version` pinned to what the URLs serve now. Each file is downloaded into the
/// store (hashed once, while streaming) and linked as `kernel/<version>/<arch>/...`.
pub fn add_kernel(
    lock: &Lock,
    store: &StoreWriter,
    fetcher: &Fetcher,
    version: &Version,
    urls: &[ArchUrl],
    make_default: bool,
) -> anyhow::Result<Lock> {
    // A name whose constant collides would break `system`'s build: refuse before downloading.
    lock.check_new_kernel(version)?;
    let mut seen = Vec::new();
    for u in urls {
        if seen.contains(&u.arch) {
            bail!("--url {}=...: given twice; give one URL per arch", u.arch);
        }
        seen.push(u.arch);
    }
    let mut new = lock.clone();
    let mut files = new.kernels.get(version).cloned().unwrap_or_default();
    for u in urls {
        let label = format!("kernel {version} {}", u.arch);
        let fetched = fetch_unpinned(store, fetcher, &u.url, &label).map_err(|e| {
            anyhow::anyhow!(
                "{label}: {e}\nnext step: check the URL; behind a firewall use --mirror \
                 FROM=TO (or XTASK_MIRROR); nothing was written to the lock"
            )
        })?;
        let file = KernelFile {
            url: u.url.clone(),
            sha256: fetched.sha256,
            size: Some(fetched.size),
        };
        if let Some(previous) = files.get(&u.arch)
            && previous.sha256 != file.sha256
        {
            eprintln!(
                "{label}: replacing pinned sha256 {} with {}",
                previous.sha256, file.sha256
            );
        }
        store.link(
            &store.layout().kernel_link(version.as_str(), u.arch),
            &file.sha256,
        )?;
        files.insert(u.arch, file);
    }
    new.kernels.insert(version.clone(), UniqueMap(files.0));
    if make_default {
        new.defaults.kernel = version.clone();
    }
    // The lock's own validation is the last word on what may be written.
    Lock::parse(&new.to_json()).context("the updated lock does not validate")
}

/// Downloads `url` into the store under whatever digest its content has: this is where a
/// digest enters the lock, so nothing is expected yet.
fn fetch_unpinned(
    store: &StoreWriter,
    fetcher: &Fetcher,
    url: &str,
    label: &str,
) -> Result<Download, FetchError> {
    let mut writer = store.blob_writer().map_err(FetchError::Local)?;
    let download = fetcher.fetch(url, label, Expected::default(), &mut writer)?;
    store
        .commit(writer, None, None, label)
        .map_err(FetchError::Local)?;
    Ok(download)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::fetch::{Mirrors, Options};
    use crate::store::temp_store;
    use testkit::http::{Reply, Server};

    fn test_fetcher() -> Fetcher {
        Fetcher::new(
            Options {
                read_timeout: std::time::Duration::from_secs(2),
                backoff: std::time::Duration::from_millis(10),
                progress: crate::fetch::Progress::Lines,
                ..Options::default()
            },
            Mirrors::default(),
        )
        .unwrap()
    }

    fn base_lock() -> Lock {
        Lock::parse(include_str!("../../../artifacts.lock")).unwrap()
    }

    #[test]
    fn add_kernel_downloads_records_and_diffs() {
        let body = Arc::new(b"a new kernel image".to_vec());
        let server = Server::serving(&body, true);
        let (_dir, store) = temp_store();
        let old = base_lock();
        let version = Version::new("ch-test-9").unwrap();
        let url: ArchUrl = format!("x86_64={}", server.url("/vmlinux-x86_64"))
            .parse()
            .unwrap();
        let new = add_kernel(&old, &store, &test_fetcher(), &version, &[url], true).unwrap();

        let file = &new.kernels["ch-test-9"][&Arch::X86_64];
        assert_eq!(file.sha256, system::hash::sha256_bytes(&body));
        assert_eq!(file.size, Some(body.len() as u64));
        assert_eq!(new.defaults.kernel, version);
        assert_eq!(server.count(), 1);
        assert_eq!(
            std::fs::read(store.layout().kernel_link("ch-test-9", Arch::X86_64)).unwrap(),
            *body
        );

        let text = crate::lock::diff(&old.to_json(), &new.to_json());
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
        let (_dir, store) = temp_store();
        let url: ArchUrl = format!("aarch64={}", server.url("/Image")).parse().unwrap();
        let version = Version::new("ch-test-9").unwrap();
        let err = add_kernel(
            &base_lock(),
            &store,
            &test_fetcher(),
            &version,
            &[url],
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("403") && err.contains("aarch64"), "{err}");
        assert_eq!(server.count(), 1);
    }

    #[test]
    fn a_version_whose_constant_collides_is_refused_before_downloading() {
        let body = Arc::new(b"a kernel".to_vec());
        let server = Server::serving(&body, true);
        let (_dir, store) = temp_store();
        let url: ArchUrl = format!("x86_64={}", server.url("/k")).parse().unwrap();
        let version = Version::new("ch-release-v6.16.9_20260508").unwrap();
        let err = add_kernel(
            &base_lock(),
            &store,
            &test_fetcher(),
            &version,
            &[url],
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`ch-release-v6.16.9-20260508` and `ch-release-v6.16.9_20260508`"),
            "{err}"
        );
        assert_eq!(server.count(), 0);
    }

    #[test]
    fn arch_url_parses() {
        assert!("x86_64=https://h/k".parse::<ArchUrl>().is_ok());
        assert!("riscv=https://h/k".parse::<ArchUrl>().is_err());
        assert!("x86_64".parse::<ArchUrl>().is_err());
        assert!("x86_64=ftp://h/k".parse::<ArchUrl>().is_err());
    }
}
