use std::path::PathBuf;

use system::Arch;
use system::lock::Version;
use xtask::artifacts::{Options, Stage};
use xtask::dist::install::DistSource;

use super::{TransferArgs, from_workspace};

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
    #[command(flatten)]
    pub transfer: TransferArgs,
    /// Run only these stages (repeatable or comma-separated). Default: all, in data-flow order.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<Stage>,
    /// Kernel modules for initrd recipes that list `modules`: a kernel's `lib/modules/<kver>`
    /// directory, or a root holding exactly one `lib/modules/<kver>` (an unpacked package).
    #[arg(long, value_name = "DIR")]
    pub modules_dir: Option<PathBuf>,
    /// Firmware for initrd module groups that list `firmware` (paths relative to it), e.g.
    /// /lib/firmware.
    #[arg(long, value_name = "DIR")]
    pub firmware_dir: Option<PathBuf>,
    /// Replace the selected initrds' module lists (comma-separated names, e.g.
    /// `virtio_blk,overlay`); the lock records the new list.
    #[arg(long, value_name = "NAMES", value_delimiter = ',')]
    pub modules: Option<Vec<String>>,
    /// Pull base NAME from SOURCE instead of its lock reference (repeatable), e.g.
    /// `alpine=oci:/mnt/images/alpine:3.22` for a local OCI layout on an air-gapped host. The
    /// lock's digests must still match.
    #[arg(long, value_name = "NAME=SOURCE", value_parser = parse_base_source)]
    pub base_source: Vec<(Version, String)>,
    /// Install prebuilt artifacts from DIST instead of downloading and building (repeatable): a
    /// `cargo xtask dist` tarball, a directory of them, or an artifact pushed by `dist push`
    /// (`oci:REGISTRY/REPO:TAG` or `REGISTRY/REPO@sha256:…`). Blobs the lock records are taken,
    /// verified, and linked; anything else is refused.
    #[arg(long, value_name = "DIST")]
    pub from: Vec<String>,
}

impl Artifacts {
    pub fn run(self) -> anyhow::Result<()> {
        xtask::artifacts::run(&Options {
            lock: from_workspace(&self.lock),
            data_dir: from_workspace(&self.data_dir),
            workspace: xtask::workspace_root(),
            arches: self.arch,
            kernels: self.kernel,
            initrds: self.initrd,
            offline: self.offline,
            locked: self.locked,
            transfer: self.transfer.options(),
            mirrors: self.transfer.mirrors(),
            stages: self.only,
            modules_dir: self.modules_dir,
            firmware_dir: self.firmware_dir,
            modules: self.modules,
            base_sources: self.base_source.into_iter().collect(),
            from: self
                .from
                .iter()
                .map(|text| DistSource::parse(text, &xtask::workspace_root()))
                .collect(),
        })
    }
}

fn parse_base_source(text: &str) -> Result<(Version, String), String> {
    let (name, source) = text
        .split_once('=')
        .filter(|(_, source)| !source.is_empty())
        .ok_or_else(|| format!("`{text}`: expected NAME=SOURCE, e.g. alpine=oci:/path:3.22"))?;
    Ok((Version::new(name)?, source.to_owned()))
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
