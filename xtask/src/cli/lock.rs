use std::path::PathBuf;

use system::lock::Version;
use xtask::fetch::Fetcher;
use xtask::lock::add_kernel::{ArchUrl, Request, add_kernel};
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
/// A file the store already holds for its URL is reused without a request (see --refresh).
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
    /// Download every URL again even when the store holds what it served before (for a file
    /// the publisher replaced in place).
    #[arg(long)]
    pub refresh: bool,
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
        let store = StoreWriter::open(&from_workspace(&self.data_dir))?;
        let fetcher = Fetcher::new(self.transfer.options(), self.transfer.mirrors())?;
        let request = Request {
            version: self.version,
            urls: self.urls,
            make_default: self.default,
            refresh: self.refresh,
        };
        let updated = add_kernel(&lock_path, &store, &fetcher, &request)?;
        if !updated.changed() {
            eprintln!(
                "{}: kernel {} is already pinned exactly so; nothing changed",
                lock_path.display(),
                request.version
            );
            return Ok(());
        }
        println!("{}", updated.diff());
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
        // Merged into the lock as it is on disk now, under its write guard.
        let updated = xtask::lock::update(&lock_path, &old, &new)?;
        println!("{}", updated.diff());
        eprintln!(
            "updated {}: review the diff above and commit it; the next `cargo xtask artifacts` \
             rebuilds the initrds on this base",
            lock_path.display()
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use clap::Parser as _;
    use testkit::http::{Reply, Server};

    use crate::cli::{Cli, Command};

    fn add_kernel_cmd(args: &[&str]) -> super::AddKernel {
        let cli = Cli::try_parse_from(["cargo xtask", "lock", "add-kernel"].iter().chain(args))
            .unwrap_or_else(|e| panic!("{e}"));
        let Command::Lock(super::LockCmd {
            command: super::LockCommand::AddKernel(cmd),
        }) = cli.command
        else {
            unreachable!("parsed as lock add-kernel")
        };
        cmd
    }

    #[test]
    fn add_kernel_takes_the_transfer_flags_and_obeys_them() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join("artifacts.lock");
        std::fs::write(&lock, include_str!("../../../artifacts.lock")).unwrap();
        let data = dir.path().join("data");
        // A server that accepts and never answers: only the read timeout ends the attempt.
        let stall = Server::start(|_, _| Reply::Stall).unwrap();
        let url = format!("x86_64={}", stall.url("/vmlinux"));
        let (lock_arg, data_arg) = (lock.to_str().unwrap(), data.to_str().unwrap());
        let cmd = add_kernel_cmd(&[
            "ch-test-1",
            "--url",
            &url,
            "--lock",
            lock_arg,
            "--data-dir",
            data_arg,
            "--connect-timeout",
            "1.5",
            "--read-timeout",
            "0.2",
            "--attempts",
            "1",
        ]);
        let options = cmd.transfer.options();
        assert_eq!(options.connect_timeout.as_millis(), 1500);
        assert_eq!(options.read_timeout.as_millis(), 200);
        assert_eq!(options.attempts, 1);

        let err = format!("{:#}", cmd.run().unwrap_err());
        assert_eq!(stall.count(), 1, "--attempts 1: one request: {err}");
        assert!(err.contains("kernel ch-test-1 x86_64"), "{err}");
        assert_eq!(
            std::fs::read_to_string(&lock).unwrap(),
            include_str!("../../../artifacts.lock")
        );

        // And --refresh parses (its effect is tested in the library).
        let body = Arc::new(b"k".to_vec());
        let ok = Server::serving(&body, true);
        let url = format!("x86_64={}", ok.url("/vmlinux"));
        let cmd = add_kernel_cmd(&[
            "ch-test-1",
            "--url",
            &url,
            "--lock",
            lock_arg,
            "--data-dir",
            data_arg,
            "--refresh",
        ]);
        assert!(cmd.refresh);
        cmd.run().unwrap();
        assert!(
            std::fs::read_to_string(&lock)
                .unwrap()
                .contains("ch-test-1")
        );
    }
}
