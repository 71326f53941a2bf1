//! Module groups (drivers on demand): the lock's `module_groups` resolved like `modules`, in
//! modules.dep order, each group leaving out what the always-loaded list already loads; their
//! firmware read from the firmware directory; and the groups file guest-init reads
//! (`lib/modules/groups`, format in `guest_protocol::module_groups`).

use std::collections::HashSet;
use std::fs;
use std::path::Path;

use anyhow::{Context, bail};
use guest_protocol::module_groups::{self, FIRMWARE_DIR, ModuleGroup, PciPattern};
use system::lock::ModuleGroup as LockGroup;

use super::modules_dir::{DepGraph, Module, ModulesDir, read_module};

/// One group as it goes into the initrd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSet {
    pub name: String,
    pub pci: Vec<PciPattern>,
    /// In load order, without the always-loaded list's modules.
    pub modules: Vec<Module>,
    /// The lock's firmware entries, relative to `/` (`lib/firmware/<entry>`).
    pub firmware_roots: Vec<String>,
    /// Every firmware file below those entries, sorted by path.
    pub firmware: Vec<FirmwareFile>,
}

/// A firmware file as it goes into the initrd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirmwareFile {
    /// Relative to `/`, under `lib/firmware/`.
    pub path: String,
    pub data: Vec<u8>,
}

impl GroupSet {
    /// What the `modules` input digest covers for this group.
    pub fn canonical(&self) -> String {
        let mut text = format!("group {}\n", self.name);
        for pattern in &self.pci {
            text.push_str(&format!("pci {pattern}\n"));
        }
        let files = self
            .modules
            .iter()
            .map(|m| ("module", &m.path, &m.data))
            .chain(self.firmware.iter().map(|f| ("firmware", &f.path, &f.data)));
        for (kind, path, data) in files {
            let sha = system::hash::sha256_bytes(data);
            text.push_str(&format!("{kind} {path} {sha}\n"));
        }
        text
    }
}

/// Resolves `groups` in `graph`, leaving out `base` (the always-loaded list's files), and
/// reads their modules from `dir` and firmware from `firmware_dir`.
pub fn load(
    dir: &ModulesDir,
    graph: &DepGraph,
    base: &HashSet<String>,
    groups: &[(String, LockGroup)],
    firmware_dir: Option<&Path>,
) -> anyhow::Result<Vec<GroupSet>> {
    let mut sets = Vec::with_capacity(groups.len());
    for (name, group) in groups {
        let set = load_one(dir, graph, base, name, group, firmware_dir)
            .with_context(|| format!("module group `{name}`"))?;
        sets.push(set);
    }
    Ok(sets)
}

fn load_one(
    dir: &ModulesDir,
    graph: &DepGraph,
    base: &HashSet<String>,
    name: &str,
    group: &LockGroup,
    firmware_dir: Option<&Path>,
) -> anyhow::Result<GroupSet> {
    module_groups::check_group_name(name).map_err(anyhow::Error::msg)?;
    let pci = group
        .pci
        .iter()
        .enumerate()
        .map(|(index, text)| {
            text.parse::<PciPattern>()
                .with_context(|| format!("pci[{index}]"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let order = graph.closure(&group.modules, &mut base.clone())?;
    if order.is_empty() {
        bail!(
            "its modules ({}) are all built into the kernel or in the always-loaded list; \
             the group would load nothing, so remove it or list other modules",
            group.modules.join(", ")
        );
    }
    let modules = order
        .iter()
        .map(|relative| read_module(dir, relative))
        .collect::<anyhow::Result<Vec<Module>>>()?;
    let mut firmware = Vec::new();
    let mut firmware_roots = Vec::new();
    if !group.firmware.is_empty() {
        let Some(firmware_dir) = firmware_dir else {
            bail!(
                "lists firmware ({}) but no --firmware-dir was given; pass the directory that \
                 holds it, e.g. --firmware-dir /lib/firmware",
                group.firmware.join(", ")
            );
        };
        for entry in &group.firmware {
            firmware_roots.push(format!("{FIRMWARE_DIR}/{entry}"));
            firmware.extend(read_firmware(firmware_dir, entry)?);
        }
        firmware.sort_by(|a, b| a.path.cmp(&b.path));
        firmware.dedup_by(|a, b| a.path == b.path);
    }
    Ok(GroupSet {
        name: name.to_owned(),
        pci,
        modules,
        firmware_roots,
        firmware,
    })
}

/// The files of one firmware entry (a file, or a directory read recursively; symlinks are
/// followed, so a link lands as the file it names).
fn read_firmware(firmware_dir: &Path, entry: &str) -> anyhow::Result<Vec<FirmwareFile>> {
    let root = firmware_dir.join(entry);
    if !root.exists() {
        bail!(
            "firmware `{entry}` is not in {}; install the firmware package or point \
             --firmware-dir at the directory that holds it",
            firmware_dir.display()
        );
    }
    let mut files = Vec::new();
    for item in walkdir::WalkDir::new(&root)
        .follow_links(true)
        .sort_by_file_name()
    {
        let item = item.with_context(|| format!("reading firmware {}", root.display()))?;
        if !item.file_type().is_file() {
            continue;
        }
        let relative = item
            .path()
            .strip_prefix(firmware_dir)
            .expect("walked below the firmware directory");
        let relative = relative
            .to_str()
            .with_context(|| format!("firmware path {} is not UTF-8", relative.display()))?;
        let data = fs::read(item.path())
            .with_context(|| format!("reading firmware {}", item.path().display()))?;
        files.push(FirmwareFile {
            path: format!("{FIRMWARE_DIR}/{relative}"),
            data,
        });
    }
    if files.is_empty() {
        bail!(
            "firmware `{entry}` in {} holds no files",
            firmware_dir.display()
        );
    }
    Ok(files)
}

/// The groups file guest-init reads.
pub fn groups_file(groups: &[GroupSet]) -> String {
    let groups: Vec<ModuleGroup> = groups
        .iter()
        .map(|g| ModuleGroup {
            name: g.name.clone(),
            pci: g.pci.clone(),
            firmware: g.firmware_roots.clone(),
            modules: g.modules.iter().map(|m| m.path.clone()).collect(),
        })
        .collect();
    module_groups::render_groups(&groups)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::initrd::modules::ModuleSet;
    use crate::initrd::modules_dir::tests::fixture;
    use crate::rootfs::{NodeKind, Tree, TreePath};

    fn group(pci: &[&str], modules: &[&str], firmware: &[&str]) -> LockGroup {
        let owned = |list: &[&str]| list.iter().map(|s| s.to_string()).collect();
        LockGroup {
            pci: owned(pci),
            modules: owned(modules),
            firmware: owned(firmware),
        }
    }

    fn names(set: &[Module]) -> Vec<&str> {
        set.iter()
            .map(|m| m.path.rsplit('/').next().unwrap())
            .collect()
    }

    #[test]
    fn groups_resolve_in_dep_order_without_the_base_list() {
        let dir = tempfile::tempdir().unwrap();
        let modules_dir = fixture(dir.path());
        let groups = vec![
            (
                "blk".to_owned(),
                group(&["1af4:1001"], &["virtio_blk"], &[]),
            ),
            ("pci".to_owned(), group(&["1af4::01"], &["virtio_pci"], &[])),
        ];
        let base = vec!["virtio".to_owned()];
        let set = ModuleSet::load_with_groups(&modules_dir, &base, &groups, None).unwrap();
        assert_eq!(names(&set.modules), ["virtio_ring.ko", "virtio.ko"]);
        // virtio and virtio_ring are loaded by the base list: left out of both groups.
        assert_eq!(names(&set.groups[0].modules), ["virtio_blk.ko"]);
        assert_eq!(
            names(&set.groups[1].modules),
            [
                "virtio_pci_modern_dev.ko",
                "virtio_pci_legacy_dev.ko",
                "virtio_pci.ko"
            ]
        );
        let file = groups_file(&set.groups);
        let parsed = module_groups::parse_groups(&file).unwrap();
        assert_eq!(parsed[0].name, "blk");
        assert_eq!(
            parsed[0].modules,
            ["lib/modules/6.1.0-test/kernel/drivers/block/virtio_blk.ko"]
        );
        assert_eq!(parsed[1].pci[0].to_string(), "1af4::01");
    }

    #[test]
    fn shared_dependencies_are_carried_once_and_listed_per_group() {
        let dir = tempfile::tempdir().unwrap();
        let modules_dir = fixture(dir.path());
        let groups = vec![
            ("a".to_owned(), group(&["1af4"], &["virtio_blk"], &[])),
            ("b".to_owned(), group(&["10de"], &["virtio_pci"], &[])),
        ];
        let set =
            ModuleSet::load_with_groups(&modules_dir, &["overlay".into()], &groups, None).unwrap();
        // Each group is complete on its own (either may be the only one that matches)...
        assert_eq!(
            names(&set.groups[0].modules),
            ["virtio_ring.ko", "virtio.ko", "virtio_blk.ko"]
        );
        assert_eq!(
            names(&set.groups[1].modules)[..2],
            ["virtio_ring.ko", "virtio.ko"]
        );
        // ...and the initrd carries every file once.
        let mut tree = Tree::new();
        set.add_to(&mut tree).unwrap();
        let modules: Vec<String> = tree
            .iter()
            .filter(|(p, _)| p.as_str().ends_with(".ko"))
            .map(|(p, _)| p.as_str().to_owned())
            .collect();
        assert_eq!(modules.len(), 7, "{modules:?}");
        assert!(
            tree.get(&TreePath::new("lib/modules/groups").unwrap())
                .is_some()
        );
        assert_eq!(set.load_order().lines().count(), 1);
    }

    #[test]
    fn firmware_is_read_below_the_firmware_dir_and_listed() {
        let dir = tempfile::tempdir().unwrap();
        let modules_dir = fixture(dir.path());
        let firmware = dir.path().join("firmware");
        fs::create_dir_all(firmware.join("nvidia/570/sub")).unwrap();
        fs::write(firmware.join("nvidia/570/gsp.bin"), b"gsp").unwrap();
        fs::write(firmware.join("nvidia/570/sub/x.bin"), b"x").unwrap();
        fs::write(firmware.join("other.bin"), b"o").unwrap();
        let groups = vec![(
            "gpu".to_owned(),
            group(&["10de::03"], &["overlay"], &["nvidia/570"]),
        )];
        let err = ModuleSet::load_with_groups(&modules_dir, &[], &groups, None).unwrap_err();
        assert!(format!("{err:#}").contains("--firmware-dir"), "{err:#}");
        let set = ModuleSet::load_with_groups(&modules_dir, &[], &groups, Some(&firmware)).unwrap();
        let gpu = &set.groups[0];
        assert_eq!(gpu.firmware_roots, ["lib/firmware/nvidia/570"]);
        let paths: Vec<&str> = gpu.firmware.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "lib/firmware/nvidia/570/gsp.bin",
                "lib/firmware/nvidia/570/sub/x.bin"
            ]
        );
        let mut tree = Tree::new();
        set.add_to(&mut tree).unwrap();
        let node = tree
            .get(&TreePath::new("lib/firmware/nvidia/570/gsp.bin").unwrap())
            .unwrap();
        assert_eq!(node.kind, NodeKind::File(b"gsp".to_vec()));
        assert!(groups_file(&set.groups).contains("firmware lib/firmware/nvidia/570\n"));
        // The firmware's bytes are part of the modules digest.
        let before = set.digest();
        fs::write(firmware.join("nvidia/570/gsp.bin"), b"gsp2").unwrap();
        let after =
            ModuleSet::load_with_groups(&modules_dir, &[], &groups, Some(&firmware)).unwrap();
        assert_ne!(after.digest(), before);
        let missing = vec![(
            "gpu".to_owned(),
            group(&["10de"], &["overlay"], &["nvidia/999"]),
        )];
        let err =
            ModuleSet::load_with_groups(&modules_dir, &[], &missing, Some(&firmware)).unwrap_err();
        assert!(
            format!("{err:#}").contains("`nvidia/999` is not in"),
            "{err:#}"
        );
    }

    #[test]
    fn bad_groups_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let modules_dir = fixture(dir.path());
        let load = |g: LockGroup| {
            let groups = vec![("gpu".to_owned(), g)];
            let err =
                ModuleSet::load_with_groups(&modules_dir, &["virtio_blk".into()], &groups, None)
                    .unwrap_err();
            format!("{err:#}")
        };
        let err = load(group(&["10de::3"], &["overlay"], &[]));
        assert!(
            err.contains("module group `gpu`: pci[0]: PCI pattern \"10de::3\""),
            "{err}"
        );
        let err = load(group(&["10de"], &["nvidia"], &[]));
        assert!(
            err.contains("module group `gpu`") && err.contains("`nvidia`"),
            "{err}"
        );
        let err = load(group(&["10de"], &["virtio"], &[]));
        assert!(err.contains("would load nothing"), "{err}");
    }

    #[test]
    fn without_groups_the_digest_and_tree_are_as_before() {
        let dir = tempfile::tempdir().unwrap();
        let modules_dir = fixture(dir.path());
        let plain = ModuleSet::load(&modules_dir, &["overlay".into()]).unwrap();
        assert!(plain.groups.is_empty());
        let mut tree = Tree::new();
        plain.add_to(&mut tree).unwrap();
        assert!(
            tree.get(&TreePath::new("lib/modules/groups").unwrap())
                .is_none()
        );
        let with = ModuleSet::load_with_groups(
            &modules_dir,
            &["overlay".into()],
            &[("rng".to_owned(), group(&["1af4:1005"], &["virtio"], &[]))],
            None,
        )
        .unwrap();
        assert_ne!(with.digest(), plain.digest());
    }
}
