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

impl LockCmd {
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            LockCommand::AddKernel(cmd) => cmd.run(),
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
