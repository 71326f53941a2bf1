//! `cargo xtask artifacts`: make the store satisfy the lock.

use std::path::PathBuf;

use anyhow::{Context, bail};
use system::{Arch, Lock};
use xshell::Shell;

/// Fetch the lock's kernels, pull its base image, build guest-init and assemble its initrds into
/// the store, verifying everything.
#[derive(clap::Args)]
pub struct Artifacts {
    /// Only this architecture (repeatable). Default: every architecture in the lock.
    #[arg(long)]
    arch: Vec<Arch>,
    /// The lock to satisfy.
    #[arg(long, default_value = "artifacts.lock")]
    lock: PathBuf,
    /// The host data dir; the store is its `system/` directory.
    #[arg(long, env = "SYSTEM_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
}

impl Artifacts {
    pub fn run(self, _sh: &Shell) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(&self.lock)
            .with_context(|| format!("reading the lock {}", self.lock.display()))?;
        let lock = Lock::parse(&text).with_context(|| format!("in {}", self.lock.display()))?;
        let arches: Vec<Arch> = if self.arch.is_empty() {
            Arch::ALL.to_vec()
        } else {
            self.arch
        };
        bail!(
            "{} is valid ({} kernel version(s), {} initrd version(s), arches {:?}), but the \
             generator is not built yet: kernel downloads, the base image pull and initrd assembly \
             are still to come. Nothing was written to {}.",
            self.lock.display(),
            lock.kernels.len(),
            lock.initrds.len(),
            arches.iter().map(|a| a.as_str()).collect::<Vec<_>>(),
            self.data_dir.display()
        )
    }
}
