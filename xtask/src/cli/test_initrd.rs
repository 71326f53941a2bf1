use std::path::PathBuf;

use anyhow::{Context, bail};
use system::Arch;
use system::lock::InitrdCompression;

/// Build a minimal-profile initrd with kernel modules for VM tests (nothing is stored, the
/// lock is not touched): `cargo xtask test-initrd --modules-dir /lib/modules/<kver> --modules
/// virtio_pci,virtio_blk,overlay [--agent] --out initrd.gz`.
#[derive(clap::Args)]
pub struct TestInitrd {
    #[arg(long, default_value_t = Arch::host())]
    pub arch: Arch,
    /// A kernel's `lib/modules/<kver>`, or a root holding exactly one.
    #[arg(long, value_name = "DIR")]
    pub modules_dir: Option<PathBuf>,
    /// Module names (comma-separated); dependencies are added.
    #[arg(long, value_name = "NAMES", value_delimiter = ',')]
    pub modules: Vec<String>,
    /// How to compress the archive: gzip, zstd, lz4 (the kernel's legacy frame) or none.
    #[arg(long, default_value_t = InitrdCompression::Gzip)]
    pub compression: InitrdCompression,
    /// Carry the guest agent (built with guest-init); guest-init then starts it.
    #[arg(long)]
    pub agent: bool,
    /// Where to write the initrd.
    #[arg(long)]
    pub out: PathBuf,
}

impl TestInitrd {
    pub fn run(self) -> anyhow::Result<()> {
        if !self.modules.is_empty() && self.modules_dir.is_none() {
            bail!("--modules needs --modules-dir (e.g. /lib/modules/<kver>)");
        }
        let bytes = xtask::initrd::build_test_initrd(&xtask::initrd::TestInitrd {
            modules_dir: self.modules_dir.unwrap_or_default(),
            modules: self.modules,
            compression: self.compression,
            agent: self.agent,
            ..xtask::initrd::TestInitrd::new(self.arch)
        })?;
        std::fs::write(&self.out, &bytes)
            .with_context(|| format!("writing {}", self.out.display()))?;
        eprintln!(
            "wrote {} ({} bytes, sha256 {})",
            self.out.display(),
            bytes.len(),
            system::hash::sha256_bytes(&bytes)
        );
        Ok(())
    }
}
