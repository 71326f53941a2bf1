use std::path::PathBuf;

use anyhow::bail;
use system::Arch;
use system::lock::Version;
use xtask::dist::{self, Options};

use super::from_workspace;

/// Pack the store's kernels and initrds into release tarballs (one per arch), with
/// `dist.json` and `SHA256SUMS`; or check tarballs (`dist verify`).
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Dist {
    #[command(subcommand)]
    pub command: Option<DistCommand>,
    #[command(flatten)]
    pub set: SetArgs,
    /// Where to write the tarballs, dist.json and SHA256SUMS.
    #[arg(long, value_name = "DIR", default_value = "target/dist")]
    pub out: PathBuf,
}

/// Which artifacts, from which lock and store.
#[derive(clap::Args)]
pub struct SetArgs {
    /// Only this kernel version (repeatable). Default: the lock's default kernel.
    #[arg(long)]
    pub kernel: Vec<Version>,
    /// Only this initrd version (repeatable). Default: the lock's default initrd.
    #[arg(long)]
    pub initrd: Vec<Version>,
    /// Only this architecture (repeatable). Default: every arch the selected versions all have.
    #[arg(long)]
    pub arch: Vec<Arch>,
    /// The lock whose artifacts are packed (relative paths are taken from the workspace root).
    #[arg(long, default_value = "artifacts.lock")]
    pub lock: PathBuf,
    /// The host data dir holding the store (`<data_dir>/system`).
    #[arg(long, env = "SYSTEM_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
}

#[derive(clap::Subcommand)]
pub enum DistCommand {
    /// Check tarballs: structure, nothing outside system/, no escaping link, every blob against
    /// the embedded lock.
    Verify {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Push the set to an OCI registry as an artifact (an index with one manifest per arch, one
    /// layer per blob) under REF (`REGISTRY/REPO:TAG`); prints `REF@sha256:<index digest>`.
    Push {
        #[arg(value_name = "REF")]
        reference: String,
        #[command(flatten)]
        set: SetArgs,
    },
}

impl SetArgs {
    fn options(self, out: PathBuf) -> anyhow::Result<Options> {
        Ok(Options {
            lock: from_workspace(&self.lock),
            data_dir: from_workspace(&self.data_dir),
            out: from_workspace(&out),
            kernels: self.kernel,
            initrds: self.initrd,
            arches: self.arch,
            mtime: xtask::initrd::cpio::mtime_from_env()?.into(),
        })
    }
}

impl Dist {
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            Some(DistCommand::Verify { files }) => verify(&files),
            Some(DistCommand::Push { reference, set }) => {
                let options = set.options(PathBuf::new())?;
                let digest =
                    dist::oci::push(&options, &reference, &xtask::fetch::Options::default())?;
                let repo = reference
                    .rsplit_once(':')
                    .filter(|(_, tag)| !tag.contains('/'))
                    .map_or(reference.as_str(), |(repo, _)| repo);
                println!("{repo}@{digest}");
                Ok(())
            }
            None => {
                let written = dist::run(&self.set.options(self.out)?)?;
                for path in written {
                    println!("{}", path.display());
                }
                Ok(())
            }
        }
    }
}

fn verify(files: &[PathBuf]) -> anyhow::Result<()> {
    let mut failed = Vec::new();
    for file in files {
        match dist::verify::verify(file) {
            Ok(summary) => {
                let names: Vec<String> = summary
                    .artifacts
                    .iter()
                    .map(|(kind, version, arch, sha)| format!("{kind} {version} {arch} {sha}"))
                    .collect();
                println!("ok {}: {}", file.display(), names.join(", "));
            }
            Err(e) => {
                eprintln!("FAILED {e:#}");
                failed.push(file.display().to_string());
            }
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} tarball(s) failed: {}",
            failed.len(),
            files.len(),
            failed.join(", ")
        );
    }
    Ok(())
}
