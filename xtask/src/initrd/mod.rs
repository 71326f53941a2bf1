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

use std::path::{Path, PathBuf};

use system::Arch;
use system::lock::InitrdCompression;
use system::lock::ModuleGroup;
use xshell::Shell;

use guest_init::BuildOptions;
use modules::ModuleSet;
use modules_dir::ModulesDir;

/// Input names in the lock's `initrds.<version>.outputs.<arch>.inputs`.
pub const INPUT_AGENT: &str = "agent";
pub const INPUT_BASE: &str = "base";
pub const INPUT_GUEST_INIT: &str = "guest-init";
pub const INPUT_MODULES: &str = "modules";
pub const INPUT_RECIPE: &str = "recipe";

/// What [`build_test_initrd`] puts in a test initrd. `TestInitrd::new(arch)` is guest-init
/// alone (no modules, no agent, gzip); set the fields a test needs:
/// `TestInitrd { modules: vec!["virtio_blk".into()], agent: true, ..TestInitrd::new(arch) }`.
#[derive(Debug, Clone)]
pub struct TestInitrd {
    pub arch: Arch,
    /// A kernel's `lib/modules/<kver>` (e.g. Debian's `/lib/modules/<ver>-cloud-amd64`), or a
    /// root holding exactly one; needed when `modules` or `groups` are set.
    pub modules_dir: PathBuf,
    /// Module names loaded at boot, in order; their dependencies are added.
    pub modules: Vec<String>,
    /// Module groups (name, lock entry), resolved as the artifacts stage resolves a recipe's
    /// `module_groups`, with their firmware from `firmware_dir`.
    pub groups: Vec<(String, ModuleGroup)>,
    pub firmware_dir: Option<PathBuf>,
    pub compression: InitrdCompression,
    /// Carry the guest agent (built in the same cargo run as guest-init), which guest-init
    /// then starts.
    pub agent: bool,
}

impl TestInitrd {
    pub fn new(arch: Arch) -> TestInitrd {
        TestInitrd {
            arch,
            modules_dir: PathBuf::new(),
            modules: Vec::new(),
            groups: Vec::new(),
            firmware_dir: None,
            compression: InitrdCompression::default(),
            agent: false,
        }
    }

    /// `names` as [`TestInitrd::modules`], from `modules_dir`.
    pub fn with_modules(mut self, modules_dir: &Path, names: &[&str]) -> TestInitrd {
        self.modules_dir = modules_dir.to_owned();
        self.modules = names.iter().map(|s| s.to_string()).collect();
        self
    }
}

/// A minimal-profile initrd for VM tests: guest-init for `arch` built from this workspace, plus
/// what `options` asks for. Returns the archive compressed as asked. Nothing is stored and no
/// lock is touched.
pub fn build_test_initrd(options: &TestInitrd) -> anyhow::Result<Vec<u8>> {
    let sh = Shell::new()?;
    let workspace = crate::workspace_root();
    let built = guest_init::build(&sh, &workspace, options.arch, &BuildOptions::default())?;
    let modules = if options.modules.is_empty() && options.groups.is_empty() {
        None
    } else {
        let dir = ModulesDir::locate(&options.modules_dir)?;
        Some(ModuleSet::load_with_groups(
            &dir,
            &options.modules,
            &options.groups,
            options.firmware_dir.as_deref(),
        )?)
    };
    let agent = options.agent.then_some(built.agent.bytes.as_slice());
    let tree = recipe::assemble(None, &built.guest_init.bytes, agent, modules.as_ref())?;
    cpio::write_initrd(&tree, cpio::mtime_from_env()?, options.compression)
}
