//! Initrd assembly: guest-init built for musl, kernel modules resolved from modules.dep, the
//! recipe's tree, and the deterministic newc writer and its compressors.

pub mod compress;
pub mod cpio;
pub mod cpio_read;
pub mod fingerprint;
pub mod groups;
pub mod guest_init;
pub mod modules;
pub mod modules_dir;
pub mod recipe;

use std::path::Path;

use system::Arch;
use system::lock::InitrdCompression;
use system::lock::ModuleGroup;
use xshell::Shell;

use guest_init::BuildOptions;
use modules::ModuleSet;
use modules_dir::ModulesDir;

/// Input names in the lock's `initrds.<version>.outputs.<arch>.inputs`.
pub const INPUT_BASE: &str = "base";
pub const INPUT_GUEST_INIT: &str = "guest-init";
pub const INPUT_MODULES: &str = "modules";
pub const INPUT_RECIPE: &str = "recipe";

/// A minimal-profile initrd with kernel modules, for VM tests: guest-init for `arch` built from
/// this workspace, plus `module_names` (and their dependencies) from `modules_dir` (a kernel's
/// `lib/modules/<kver>`, e.g. Debian's `/lib/modules/<ver>-cloud-amd64`). Returns the archive
/// compressed as `compression`. Nothing is stored and no lock is touched.
pub fn build_test_initrd(
    arch: Arch,
    modules_dir: &Path,
    module_names: &[&str],
    compression: InitrdCompression,
) -> anyhow::Result<Vec<u8>> {
    build_test_initrd_with_groups(arch, modules_dir, module_names, &[], None, compression)
}

/// [`build_test_initrd`] plus module groups (name, lock entry), resolved as the artifacts
/// stage resolves a recipe's `module_groups`, with their firmware from `firmware_dir`.
pub fn build_test_initrd_with_groups(
    arch: Arch,
    modules_dir: &Path,
    module_names: &[&str],
    groups: &[(String, ModuleGroup)],
    firmware_dir: Option<&Path>,
    compression: InitrdCompression,
) -> anyhow::Result<Vec<u8>> {
    let sh = Shell::new()?;
    let workspace = crate::workspace_root();
    let guest_init = guest_init::build(&sh, &workspace, arch, &BuildOptions::default())?;
    let names: Vec<String> = module_names.iter().map(|s| s.to_string()).collect();
    let modules = if names.is_empty() && groups.is_empty() {
        None
    } else {
        let dir = ModulesDir::locate(modules_dir)?;
        Some(ModuleSet::load_with_groups(
            &dir,
            &names,
            groups,
            firmware_dir,
        )?)
    };
    let tree = recipe::assemble(None, &guest_init.bytes, modules.as_ref())?;
    cpio::write_initrd(&tree, cpio::mtime_from_env()?, compression)
}
