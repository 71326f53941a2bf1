//! `cargo xtask lock add-kernel`: the only way a kernel digest enters the lock.
//!
//! It downloads each file, hashes it while streaming, stores it (so the next
//! `cargo xtask artifacts` reuses it), records URL + sha256 + size, writes the lock atomically
//! and prints the change as a line diff for review.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{Context as _, bail};
use system::lock::{KernelFile, UniqueMap, Version};
use system::{Arch, Lock};
use xshell::Shell;

use crate::fetch::{Fetcher, Mirror, Mirrors, Options};
use crate::store::StoreWriter;

/// Maintain artifacts.lock: pin new inputs (downloaded, hashed, recorded, diff printed).
#[derive(clap::Args)]
pub struct LockCmd {
    #[command(subcommand)]
    command: LockCommand,
}

#[derive(clap::Subcommand)]
enum LockCommand {
    AddKernel(AddKernel),
}

/// Download a kernel version's files, record URL + sha256 + size in the lock, print the diff.
/// Existing architectures of the version not named here are kept; named ones are replaced.
#[derive(clap::Args)]
pub struct AddKernel {
    /// The version name, e.g. `ch-release-v6.16.9-20260508`.
    pub version: Version,
    /// The file for one architecture (repeatable), e.g.
    /// `x86_64=https://github.com/cloud-hypervisor/linux/releases/download/V/vmlinux-x86_64`.
    #[arg(long = "url", value_name = "ARCH=URL", required = true)]
    pub urls: Vec<ArchUrl>,
    /// Also make this the default kernel.
    #[arg(long)]
    pub default: bool,
    /// The lock to update (relative paths are taken from the workspace root).
    #[arg(long, default_value = "artifacts.lock")]
    pub lock: PathBuf,
    /// The host data dir the downloaded files are stored in.
    #[arg(long, env = "SYSTEM_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
    /// Fetch URLs starting with FROM from TO instead (FROM=TO, repeatable). The lock records
    /// the URL as given.
    #[arg(
        long,
        value_name = "FROM=TO",
        env = "XTASK_MIRROR",
        value_delimiter = ','
    )]
    pub mirror: Vec<Mirror>,
}

/// `ARCH=URL`.
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

impl LockCmd {
    pub fn run(self, sh: &Shell) -> anyhow::Result<()> {
        match self.command {
            LockCommand::AddKernel(cmd) => cmd.run(sh),
        }
    }
}

impl AddKernel {
    fn run(self, sh: &Shell) -> anyhow::Result<()> {
        let lock_path = sh.current_dir().join(&self.lock);
        let text = std::fs::read_to_string(&lock_path)
            .with_context(|| format!("reading the lock {}", lock_path.display()))?;
        let old = Lock::parse(&text).with_context(|| format!("in {}", lock_path.display()))?;
        let store = StoreWriter::open(&sh.current_dir().join(&self.data_dir))?;
        let fetcher = Fetcher::new(Options::default(), Mirrors(self.mirror.clone()))?;
        let new = add_kernel(
            &old,
            &store,
            &fetcher,
            &self.version,
            &self.urls,
            self.default,
        )?;
        if new == old {
            eprintln!(
                "{}: kernel {} is already pinned exactly so; nothing changed",
                lock_path.display(),
                self.version
            );
            return Ok(());
        }
        crate::artifacts::write_lock(&lock_path, &new)?;
        println!("{}", diff(&old.to_json(), &new.to_json()));
        eprintln!(
            "updated {}: review the diff above and commit it",
            lock_path.display()
        );
        Ok(())
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
        let fetched = fetcher
            .fetch_blob(store, &u.url, &label, None, None)
            .map_err(|e| {
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

/// A line diff of two texts: changed lines with `-`/`+`, two lines of context, `@@` between
/// hunks. Longest common subsequence: locks are small.
pub fn diff(old: &str, new: &str) -> String {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    // lcs[i][j]: common lines of a[i..] and b[j..].
    let mut lcs = vec![vec![0u32; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut ops: Vec<(char, &str)> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            ops.push((' ', a[i]));
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            ops.push(('-', a[i]));
            i += 1;
        } else {
            ops.push(('+', b[j]));
            j += 1;
        }
    }
    const CONTEXT: usize = 2;
    let changed: Vec<usize> = (0..ops.len()).filter(|&k| ops[k].0 != ' ').collect();
    let mut out = String::new();
    let mut last_printed: Option<usize> = None;
    for (k, (op, line)) in ops.iter().enumerate() {
        let near = changed.iter().any(|&c| c.abs_diff(k) <= CONTEXT);
        if !near {
            continue;
        }
        if last_printed.is_some_and(|l| l + 1 != k) {
            out.push_str("@@\n");
        }
        let _ = writeln!(out, "{op}{line}");
        last_printed = Some(k);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::loopback::{Reply, Server};
    use crate::store::temp_store;

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
        Lock::parse(include_str!("../../artifacts.lock")).unwrap()
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

        let text = diff(&old.to_json(), &new.to_json());
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
    fn arch_url_parses() {
        assert!("x86_64=https://h/k".parse::<ArchUrl>().is_ok());
        assert!("riscv=https://h/k".parse::<ArchUrl>().is_err());
        assert!("x86_64".parse::<ArchUrl>().is_err());
        assert!("x86_64=ftp://h/k".parse::<ArchUrl>().is_err());
    }

    #[test]
    fn diff_shows_only_changes_with_context() {
        let old = "a\nb\nc\nd\ne\nf\ng\nh\ni\nj\n";
        let new = "a\nb\nc\nD\ne\nf\ng\nh\ni\nj\nk\n";
        assert_eq!(diff(old, new), " b\n c\n-d\n+D\n e\n f\n@@\n i\n j\n+k\n");
    }
}
