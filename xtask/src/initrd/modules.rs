//! Kernel modules for an initrd: the always-loaded list, resolved through `modules.dep` and
//! read decompressed (`modules_dir.rs`), dependencies first and each module once, plus the
//! module groups (drivers on demand, `groups.rs`).
//!
//! Modules land in the initrd as plain `.ko` files under `lib/modules/<kver>/`, and
//! `lib/modules/load-order` lists them, one path relative to `/` per line, in load order: the
//! format guest-init's `modules.rs` reads. Groups add their modules beside them and list them
//! in `lib/modules/groups`.

use std::collections::HashSet;
use std::fs;
use std::path::Path;

use anyhow::Context;
use guest_protocol::module_groups::GROUPS_FILE;
use system::Digest;
use system::lock::ModuleGroup as LockGroup;

use super::groups::{self, GroupSet};
use super::modules_dir::{DepGraph, Module, ModulesDir, read_module};
use crate::rootfs::{Node, Tree, TreePath};

/// Where guest-init looks for the load order, relative to `/`.
pub const LOAD_ORDER: &str = "lib/modules/load-order";

/// The modules of an initrd: the always-loaded list in load order, and the groups loaded on
/// demand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleSet {
    pub kver: String,
    pub modules: Vec<Module>,
    /// Module groups in name order; each leaves out what `modules` already loads.
    pub groups: Vec<GroupSet>,
}

impl ModuleSet {
    /// Resolves `names` (and their dependencies) in `dir` and reads them, decompressed.
    pub fn load(dir: &ModulesDir, names: &[String]) -> anyhow::Result<ModuleSet> {
        ModuleSet::load_with_groups(dir, names, &[], None)
    }

    /// Like [`ModuleSet::load`], plus the module groups `groups` (by name) with their firmware
    /// from `firmware_dir`.
    pub fn load_with_groups(
        dir: &ModulesDir,
        names: &[String],
        groups: &[(String, LockGroup)],
        firmware_dir: Option<&Path>,
    ) -> anyhow::Result<ModuleSet> {
        let dep_path = dir.root.join("modules.dep");
        let dep = fs::read_to_string(&dep_path)
            .with_context(|| format!("reading {}", dep_path.display()))?;
        let builtin = fs::read_to_string(dir.root.join("modules.builtin")).unwrap_or_default();
        let graph = DepGraph::parse(&dep, &builtin)
            .with_context(|| format!("resolving modules in {}", dir.root.display()))?;
        let mut done = HashSet::new();
        let order = graph
            .closure(names, &mut done)
            .with_context(|| format!("resolving modules in {}", dir.root.display()))?;
        let modules = order
            .iter()
            .map(|relative| read_module(dir, relative))
            .collect::<anyhow::Result<Vec<Module>>>()?;
        let groups = groups::load(dir, &graph, &done, groups, firmware_dir)?;
        Ok(ModuleSet {
            kver: dir.kver.clone(),
            modules,
            groups,
        })
    }

    /// The `load-order` file guest-init reads.
    pub fn load_order(&self) -> String {
        let mut text = String::new();
        for module in &self.modules {
            text.push_str(&module.path);
            text.push('\n');
        }
        text
    }

    /// What the initrd's `modules` input digest covers: the kernel release, and each module's
    /// path and content, in load order; then the groups (patterns, modules, firmware), if any.
    pub fn digest(&self) -> Digest {
        let mut canonical = format!("kver {}\n", self.kver);
        for module in &self.modules {
            let sha = system::hash::sha256_bytes(&module.data);
            canonical.push_str(&format!("{} {sha}\n", module.path));
        }
        for group in &self.groups {
            canonical.push_str(&group.canonical());
        }
        Digest(system::hash::sha256_bytes(canonical.as_bytes()))
    }

    /// Puts the modules (0644), the load order and, with groups, their modules, firmware and
    /// the groups file into `tree`. A file two groups share goes in once.
    pub fn add_to(&self, tree: &mut Tree) -> anyhow::Result<()> {
        let mut added = HashSet::new();
        let group_files = self.groups.iter().flat_map(|g| {
            g.modules
                .iter()
                .map(|m| (&m.path, &m.data))
                .chain(g.firmware.iter().map(|f| (&f.path, &f.data)))
        });
        let base_files = self.modules.iter().map(|m| (&m.path, &m.data));
        for (path, data) in base_files.chain(group_files) {
            if added.insert(path.clone()) {
                tree.insert(TreePath::new(path)?, Node::file(0o644, data.clone()))?;
            }
        }
        tree.insert(
            TreePath::new(LOAD_ORDER)?,
            Node::file(0o644, self.load_order()),
        )?;
        if !self.groups.is_empty() {
            tree.insert(
                TreePath::new(GROUPS_FILE)?,
                Node::file(0o644, groups::groups_file(&self.groups)),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::initrd::modules_dir::module_name;
    use crate::initrd::modules_dir::tests::{fixture, names};

    #[test]
    fn modules_are_read_decompressed_and_listed_for_guest_init() {
        let dir = tempfile::tempdir().unwrap();
        let modules_dir = fixture(dir.path());
        assert_eq!(modules_dir.kver, "6.1.0-test");
        let set = ModuleSet::load(&modules_dir, &names(&["virtio_pci", "overlay"])).unwrap();
        let order = set.load_order();
        assert_eq!(
            order,
            "lib/modules/6.1.0-test/kernel/drivers/virtio/virtio_ring.ko\n\
             lib/modules/6.1.0-test/kernel/drivers/virtio/virtio.ko\n\
             lib/modules/6.1.0-test/kernel/drivers/virtio/virtio_pci_modern_dev.ko\n\
             lib/modules/6.1.0-test/kernel/drivers/virtio/virtio_pci_legacy_dev.ko\n\
             lib/modules/6.1.0-test/kernel/drivers/virtio/virtio_pci.ko\n\
             lib/modules/6.1.0-test/kernel/fs/overlayfs/overlay.ko\n"
        );
        for module in &set.modules {
            let name = module_name(&module.path);
            assert_eq!(module.data, format!("\x7fELF module {name}").into_bytes());
        }
        // The kver dir itself works too, and gives the same set.
        let direct = ModulesDir::locate(&modules_dir.root).unwrap();
        assert_eq!(direct.kver, "6.1.0-test");
        let again = ModuleSet::load(&direct, &names(&["virtio_pci", "overlay"])).unwrap();
        assert_eq!(again.digest(), set.digest());
        let fewer = ModuleSet::load(&direct, &names(&["overlay"])).unwrap();
        assert_ne!(fewer.digest(), set.digest());
    }
}
