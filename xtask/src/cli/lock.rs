use std::path::PathBuf;

use system::lock::Version;
use xtask::fetch::Fetcher;
use xtask::lock::add_kernel::{ArchUrl, add_kernel};
use xtask::store::StoreWriter;

use super::{TransferArgs, from_workspace};

/// Maintain artifacts.lock: pin new inputs (downloaded, hashed, recorded, diff printed).
#[derive(clap::Args)]
pub struct LockCmd {
    #[command(subcommand)]
    command: LockCommand,
}

#[derive(clap::Subcommand)]
enum LockCommand {
    AddKernel(AddKernel),
    UpdateBase(UpdateBase),
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
    #[command(flatten)]
    pub transfer: TransferArgs,
}

/// Resolve a base image's reference (its tag) now and record the index and per-architecture
/// manifest digests it points to, printing the diff; like `cargo update`. Builds use the lock's
/// digests and never look a tag up, so a moved tag changes nothing until this runs.
#[derive(clap::Args)]
pub struct UpdateBase {
    /// The base's name in the lock (`bases.<NAME>`), e.g. `alpine`.
    pub name: Version,
    /// Resolve this instead of the lock's reference: a local layout (`oci:/path/layout:TAG`)
    /// or another registry reference; the lock keeps its reference.
    #[arg(long, value_name = "SOURCE")]
    pub source: Option<String>,
    /// The lock to update (relative paths are taken from the workspace root).
    #[arg(long, default_value = "artifacts.lock")]
    pub lock: PathBuf,
    /// The host data dir whose OCI cache keeps the index and manifests fetched.
    #[arg(long, env = "SYSTEM_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
    #[command(flatten)]
    pub transfer: TransferArgs,
}

impl LockCmd {
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            LockCommand::AddKernel(cmd) => cmd.run(),
            LockCommand::UpdateBase(cmd) => cmd.run(),
        }
    }
}

impl AddKernel {
    fn run(self) -> anyhow::Result<()> {
        let lock_path = from_workspace(&self.lock);
        let old = xtask::lock::read(&lock_path)?;
        let store = StoreWriter::open(&from_workspace(&self.data_dir))?;
        let fetcher = Fetcher::new(self.transfer.options(), self.transfer.mirrors())?;
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
        xtask::lock::write(&lock_path, &new)?;
        println!("{}", xtask::lock::diff(&old.to_json(), &new.to_json()));
        eprintln!(
            "updated {}: review the diff above and commit it",
            lock_path.display()
        );
        Ok(())
    }
}

impl UpdateBase {
    fn run(self) -> anyhow::Result<()> {
        let lock_path = from_workspace(&self.lock);
        let old = xtask::lock::read(&lock_path)?;
        let Some(pinned) = old.bases.get(&self.name) else {
            let names: Vec<&str> = old.bases.keys().map(Version::as_str).collect();
            anyhow::bail!(
                "{} has no base `{}`; its bases: {}",
                lock_path.display(),
                self.name,
                if names.is_empty() {
                    "none".to_owned()
                } else {
                    names.join(", ")
                }
            );
        };
        let store = StoreWriter::open(&from_workspace(&self.data_dir))?;
        let mut options = xtask::oci::PullOptions::from_env()?;
        options.transfer = self.transfer.options();
        options.source = self.source.clone();
        let resolved = xtask::oci::resolve_base(&options, pinned, &store.layout().oci_cache())?;
        let resolved_from = self.source.as_deref().unwrap_or(&pinned.reference);
        for arch in pinned.manifests.keys() {
            if !resolved.manifests.contains_key(arch) {
                eprintln!(
                    "base `{}`: `{resolved_from}` does not offer linux/{}; its pin is dropped \
                     (initrds on this base cannot be built for {arch} until it is pinned again)",
                    self.name,
                    arch.oci_arch()
                );
            }
        }
        let mut new = old.clone();
        new.bases.insert(self.name.clone(), resolved);
        if new == old {
            eprintln!(
                "{}: base `{}` is already pinned to what `{resolved_from}` points to; nothing \
                 changed",
                lock_path.display(),
                self.name,
            );
            return Ok(());
        }
        xtask::lock::write(&lock_path, &new)?;
        println!("{}", xtask::lock::diff(&old.to_json(), &new.to_json()));
        eprintln!(
            "updated {}: review the diff above and commit it; the next `cargo xtask artifacts` \
             rebuilds the initrds on this base",
            lock_path.display()
        );
        Ok(())
    }
}
