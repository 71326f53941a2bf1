//! `cargo xtask artifacts`: make the store satisfy the lock.
//!
//! Stages run in data-flow order (kernels, then initrds, which pull the base image and build
//! guest-init), all under the store's writer lock, each recording what it did in a [`Report`].
//! The lock file is written once at the end, and only when something in it changed; after a
//! successful run the store keeps a copy of it (`<store>/artifacts.lock`).

use std::fmt;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use system::lock::Version;
use system::{Arch, Lock};
use xshell::Shell;

use crate::store::StoreWriter;

/// Fetch the lock's kernels, pull its base image, build guest-init and assemble its initrds into
/// the store, verifying everything.
#[derive(clap::Args)]
pub struct Artifacts {
    /// Only this architecture (repeatable). Default: every architecture in the lock.
    #[arg(long)]
    pub arch: Vec<Arch>,
    /// Only this kernel version (repeatable). Default: every kernel in the lock.
    #[arg(long)]
    pub kernel: Vec<Version>,
    /// Only this initrd version (repeatable). Default: every initrd in the lock.
    #[arg(long)]
    pub initrd: Vec<Version>,
    /// The lock to satisfy (relative paths are taken from the workspace root).
    #[arg(long, default_value = "artifacts.lock")]
    pub lock: PathBuf,
    /// The host data dir; the store is its `system/` directory.
    #[arg(long, env = "SYSTEM_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
    /// Never touch the network: use what the store and caches hold, fail listing what is missing.
    #[arg(long)]
    pub offline: bool,
    /// Never write the lock: fail on anything unpinned or any output that would change it.
    #[arg(long)]
    pub locked: bool,
    /// Fetch URLs starting with FROM from TO instead (FROM=TO, repeatable; the longest FROM
    /// wins). The lock keeps the original URLs and digests.
    #[arg(
        long,
        value_name = "FROM=TO",
        env = "XTASK_MIRROR",
        value_delimiter = ','
    )]
    pub mirror: Vec<crate::fetch::Mirror>,
    /// Seconds to wait for a connection (DNS, TCP, TLS) before retrying.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// Seconds a download may go without receiving data before retrying.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub read_timeout: f64,
    /// Attempts in a row without progress before a download gives up.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub attempts: u32,
    /// Run only these stages (repeatable or comma-separated). Default: all, in data-flow order.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<Stage>,
    /// Kernel modules for initrd recipes that list `modules`: a kernel's `lib/modules/<kver>`
    /// directory, or a root holding exactly one `lib/modules/<kver>` (an unpacked package).
    #[arg(long, value_name = "DIR")]
    pub modules_dir: Option<PathBuf>,
    /// Replace the selected initrds' module lists (comma-separated names, e.g.
    /// `virtio_blk,overlay`); the lock records the new list.
    #[arg(long, value_name = "NAMES", value_delimiter = ',')]
    pub modules: Option<Vec<String>>,
    /// Pull base NAME from SOURCE instead of its lock reference (repeatable), e.g.
    /// `alpine=oci:/mnt/images/alpine:3.22` for a local OCI layout on an air-gapped host. The
    /// lock's digests must still match.
    #[arg(long, value_name = "NAME=SOURCE", value_parser = parse_base_source)]
    pub base_source: Vec<(Version, String)>,
}

/// A stage of `cargo xtask artifacts`, for `--only`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Stage {
    Kernels,
    Initrds,
}

/// What one run did, printed at the end.
#[derive(Debug, Default)]
pub struct Report {
    /// Downloaded or built this run.
    pub fetched: Vec<String>,
    /// Already present and verified.
    pub reused: Vec<String>,
    /// Built this run.
    pub built: Vec<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (label, items) in [
            ("fetched", &self.fetched),
            ("built", &self.built),
            ("reused", &self.reused),
        ] {
            writeln!(f, "{label}: {}", items.len())?;
            for item in items {
                writeln!(f, "  {item}")?;
            }
        }
        Ok(())
    }
}

/// Everything a stage needs: the selection, the modes, the lock it may update, and the store.
pub struct Run<'a> {
    pub sh: &'a Shell,
    pub args: &'a Artifacts,
    pub lock: Lock,
    pub store: StoreWriter,
    pub report: Report,
}

impl Run<'_> {
    /// The architectures selected on the command line, or all.
    pub fn arches(&self) -> Vec<Arch> {
        if self.args.arch.is_empty() {
            Arch::ALL.to_vec()
        } else {
            self.args.arch.clone()
        }
    }
}

impl Artifacts {
    pub fn run(mut self, sh: &Shell) -> anyhow::Result<()> {
        // Relative paths are the workspace root's (the shell's directory), wherever cargo ran.
        self.lock = sh.current_dir().join(&self.lock);
        self.data_dir = sh.current_dir().join(&self.data_dir);
        let text = std::fs::read_to_string(&self.lock)
            .with_context(|| format!("reading the lock {}", self.lock.display()))?;
        let lock = Lock::parse(&text).with_context(|| format!("in {}", self.lock.display()))?;
        for version in &self.kernel {
            if !lock.kernels.contains_key(version) {
                bail!(
                    "--kernel {version}: not in {}; pin it with \
                     `cargo xtask lock add-kernel {version} --url ARCH=URL`",
                    self.lock.display()
                );
            }
        }
        for version in &self.initrd {
            if !lock.initrds.contains_key(version) {
                bail!("--initrd {version}: not in {}", self.lock.display());
            }
        }
        for (base, _) in &self.base_source {
            if !lock.bases.contains_key(base) {
                let known: Vec<&str> = lock.bases.keys().map(|b| b.as_str()).collect();
                bail!(
                    "--base-source {base}=…: no base `{base}` in {} (bases: {})",
                    self.lock.display(),
                    known.join(", ")
                );
            }
        }
        let store = StoreWriter::open(&self.data_dir)?;
        let original = lock.clone();
        let mut run = Run {
            sh,
            args: &self,
            lock,
            store,
            report: Report::default(),
        };

        let outcome = stages(&mut run);
        // Record what finished even when a later stage failed: it is verified and in the store.
        if run.lock != original {
            if self.locked {
                bail!("--locked: this run would change {}", self.lock.display());
            }
            write_lock(&self.lock, &run.lock)?;
        }
        eprint!("{}", run.report);
        outcome?;
        // The store now satisfies this lock (for the selection made): keep a copy beside it.
        write_lock(&run.store.layout().lock_file(), &run.lock)
    }
}

fn parse_base_source(text: &str) -> Result<(Version, String), String> {
    let (name, source) = text
        .split_once('=')
        .filter(|(_, source)| !source.is_empty())
        .ok_or_else(|| format!("`{text}`: expected NAME=SOURCE, e.g. alpine=oci:/path:3.22"))?;
    Ok((Version::new(name)?, source.to_owned()))
}

/// Runs the selected stages in data-flow order. A failing stage does not stop the next one (an
/// offline machine still gets its initrds when kernels cannot be fetched); every failure is
/// reported at the end.
fn stages(run: &mut Run) -> anyhow::Result<()> {
    let wants = |stage| run.args.only.is_empty() || run.args.only.contains(&stage);
    let mut failures = Vec::new();
    if wants(Stage::Kernels)
        && let Err(e) = crate::kernels::sync(run)
    {
        failures.push(format!("kernels: {e:#}"));
    }
    if wants(Stage::Initrds)
        && let Err(e) = crate::initrd::sync(run)
    {
        failures.push(format!("initrds: {e:#}"));
    }
    match failures.len() {
        0 => Ok(()),
        1 => bail!("{}", failures[0]),
        n => bail!("{n} stages failed:\n- {}", failures.join("\n- ")),
    }
}

/// Writes the lock atomically (temp file, fsync, rename): a crash never leaves half a lock.
pub(crate) fn write_lock(path: &std::path::Path, lock: &Lock) -> anyhow::Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let mut temp = tempfile::NamedTempFile::new_in(dir)?;
    temp.write_all(lock.to_json().as_bytes())?;
    temp.as_file().sync_all()?;
    temp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    crate::store::sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_sources_parse_as_name_and_source() {
        let (name, source) = parse_base_source("alpine=oci:/mnt/alpine:3.22").unwrap();
        assert_eq!(
            (name.as_str(), source.as_str()),
            ("alpine", "oci:/mnt/alpine:3.22")
        );
        assert!(
            parse_base_source("alpine")
                .unwrap_err()
                .contains("NAME=SOURCE")
        );
        assert!(parse_base_source("alpine=").is_err());
        assert!(parse_base_source("../x=oci:/a").is_err());
    }
}
