//! What goes into an initrd, and the recipe digest that says so.
//!
//! The tree is the base image's root filesystem (or nothing, for the minimal profile), plus:
//!
//! | path                      | what                                   |
//! |---------------------------|----------------------------------------|
//! | `/init`                   | guest-init, 0755                       |
//! | `/.guest-init/guest-agent`| the guest agent, 0755, if the recipe says `agent` (guest-init seals it in memory before the root switch) |
//! | `/dev/console`            | char 5:1, 0600: PID 1's stdio at boot  |
//! | `/dev /proc /sys /run`    | mount points guest-init uses (if absent)|
//! | `/tmp`                    | 1777 (if absent)                       |
//! | `/lib/modules/<kver>/…`   | kernel modules, plain `.ko`            |
//! | `/lib/modules/load-order` | module paths relative to `/`, in order |
//! | `/lib/modules/groups`     | module groups (drivers on demand), if any |
//! | `/lib/firmware/…`         | the groups' firmware, if any           |

use std::collections::BTreeMap;

use serde::Serialize;
use system::Digest;

use super::compress::Encoder;
use super::modules::ModuleSet;
use crate::rootfs::{Node, NodeKind, Tree, TreePath};

/// Bumped whenever the builder puts something else into an initrd for the same inputs (the
/// profile's entries, the writer's format): every initrd then rebuilds, and the lock says why.
/// 2: gzip through libdeflate level 6 (was miniz_oxide level 9); the compressor in the recipe.
pub const BUILDER: u32 = 2;

/// An initrd's recipe in canonical form: what its `recipe` input digest covers. The fields are
/// declared in alphabetical order, so the JSON is canonical.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Recipe {
    /// The guest agent is in the initrd; left out when not (older recipe digests unchanged).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub agent: bool,
    /// The base image's name in the lock, or none for the minimal profile.
    pub base: Option<String>,
    pub builder: u32,
    /// The format and its pinned encoder and level: another compressor is another initrd.
    pub compression: Encoder,
    /// The lock's module groups; left out when empty.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub module_groups: BTreeMap<String, RecipeGroup>,
    /// Module names as the lock lists them.
    pub modules: Vec<String>,
    /// Every entry's mtime (`SOURCE_DATE_EPOCH`).
    pub mtime: u32,
}

/// A module group as the recipe digest covers it (fields in alphabetical order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecipeGroup {
    pub firmware: Vec<String>,
    pub modules: Vec<String>,
    pub pci: Vec<String>,
}

impl RecipeGroup {
    pub fn from_lock(group: &system::lock::ModuleGroup) -> RecipeGroup {
        RecipeGroup {
            firmware: group.firmware.clone(),
            modules: group.modules.clone(),
            pci: group.pci.clone(),
        }
    }
}

impl Recipe {
    pub fn canonical_json(&self) -> String {
        serde_json::to_string(self).expect("a recipe always serializes")
    }

    pub fn digest(&self) -> Digest {
        Digest(system::hash::sha256_bytes(self.canonical_json().as_bytes()))
    }
}

/// Directories guest-init mounts on (it creates missing ones, but a read-only base would not
/// let it), with their modes.
const MOUNT_POINTS: [(&str, u32); 5] = [
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("run", 0o755),
    ("tmp", 0o1777),
];

/// Where the agent's binary goes (guest-init's `agent::IN_INITRD`).
pub const AGENT_PATH: &str = ".guest-init/guest-agent";

/// The initrd's tree: `base` (or empty) with guest-init, the agent if given, the console,
/// mount points and modules.
pub fn assemble(
    base: Option<Tree>,
    guest_init: &[u8],
    agent: Option<&[u8]>,
    modules: Option<&ModuleSet>,
) -> anyhow::Result<Tree> {
    let mut tree = base.unwrap_or_default();
    for (dir, mode) in MOUNT_POINTS {
        let path = TreePath::new(dir)?;
        match tree.get(&path) {
            Some(Node {
                kind: NodeKind::Dir,
                ..
            }) => {}
            Some(_) => anyhow::bail!(
                "the base image has a non-directory at /{dir}, where guest-init mounts a \
                 filesystem"
            ),
            None => tree.insert(path, Node::dir(mode))?,
        }
    }
    tree.insert(TreePath::new("init")?, Node::file(0o755, guest_init))?;
    if let Some(agent) = agent {
        let dir = TreePath::new(".guest-init")?;
        if tree.get(&dir).is_none() {
            tree.insert(dir, Node::dir(0o755))?;
        }
        tree.insert(TreePath::new(AGENT_PATH)?, Node::file(0o755, agent))?;
    }
    tree.insert(
        TreePath::new("dev/console")?,
        Node::char_device(0o600, 5, 1),
    )?;
    if let Some(modules) = modules {
        modules.add_to(&mut tree)?;
    }
    Ok(tree)
}

#[cfg(test)]
mod tests {
    use system::lock::InitrdCompression;

    use super::*;

    #[test]
    fn the_recipe_json_is_canonical_and_every_field_counts() {
        let recipe = Recipe {
            agent: false,
            base: None,
            builder: BUILDER,
            module_groups: BTreeMap::new(),
            compression: Encoder::of(InitrdCompression::Gzip),
            modules: vec!["virtio_blk".into()],
            mtime: 0,
        };
        // Without groups the JSON is what it was before groups existed.
        assert_eq!(
            recipe.canonical_json(),
            r#"{"base":null,"builder":2,"compression":{"encoder":"libdeflate","format":"gzip","level":"6"},"modules":["virtio_blk"],"mtime":0}"#
        );
        for format in [
            InitrdCompression::Zstd,
            InitrdCompression::Lz4,
            InitrdCompression::None,
        ] {
            let mut other = recipe.clone();
            other.compression = Encoder::of(format);
            assert_ne!(other.digest(), recipe.digest(), "{format}");
        }
        let mut grouped = recipe.clone();
        grouped.module_groups.insert(
            "rng".into(),
            RecipeGroup {
                firmware: vec![],
                modules: vec!["virtio_rng".into()],
                pci: vec!["1af4:1005".into()],
            },
        );
        assert_eq!(
            grouped.canonical_json(),
            r#"{"base":null,"builder":2,"compression":{"encoder":"libdeflate","format":"gzip","level":"6"},"module_groups":{"rng":{"firmware":[],"modules":["virtio_rng"],"pci":["1af4:1005"]}},"modules":["virtio_blk"],"mtime":0}"#
        );
        assert_ne!(grouped.digest(), recipe.digest());
        let mut other = recipe.clone();
        other.mtime = 1;
        assert_ne!(other.digest(), recipe.digest());
        let mut other = recipe.clone();
        other.base = Some("alpine".into());
        assert_ne!(other.digest(), recipe.digest());
        let mut with_agent = recipe.clone();
        with_agent.agent = true;
        assert_eq!(
            with_agent.canonical_json(),
            r#"{"agent":true,"base":null,"builder":2,"compression":{"encoder":"libdeflate","format":"gzip","level":"6"},"modules":["virtio_blk"],"mtime":0}"#
        );
        assert_ne!(with_agent.digest(), recipe.digest());
    }

    #[test]
    fn the_agent_goes_under_guest_init_s_directory() {
        let tree = assemble(None, b"\x7fELF init", Some(b"\x7fELF agent"), None).unwrap();
        let agent = tree.get(&TreePath::new(AGENT_PATH).unwrap()).unwrap();
        assert_eq!(agent.kind, NodeKind::File(b"\x7fELF agent".to_vec()));
        assert_eq!(agent.mode, 0o755);
        let dir = tree.get(&TreePath::new(".guest-init").unwrap()).unwrap();
        assert_eq!((dir.kind.clone(), dir.mode), (NodeKind::Dir, 0o755));
        assert!(
            assemble(None, b"", None, None)
                .unwrap()
                .get(&TreePath::new(".guest-init").unwrap())
                .is_none(),
            "no agent, no directory: the tree is what it was"
        );
    }

    #[test]
    fn the_minimal_profile_has_init_console_and_mount_points() {
        let tree = assemble(None, b"\x7fELF", None, None).unwrap();
        let listing: Vec<(String, u32)> = tree
            .iter()
            .map(|(p, n)| (p.as_str().to_owned(), n.mode))
            .collect();
        let expect = [
            ("dev", 0o755),
            ("dev/console", 0o600),
            ("init", 0o755),
            ("proc", 0o555),
            ("run", 0o755),
            ("sys", 0o555),
            ("tmp", 0o1777),
        ];
        let expect: Vec<(String, u32)> = expect.iter().map(|(p, m)| (p.to_string(), *m)).collect();
        assert_eq!(listing, expect);
        let console = tree.get(&TreePath::new("dev/console").unwrap()).unwrap();
        assert_eq!(console.kind, NodeKind::CharDevice { major: 5, minor: 1 });
    }

    #[test]
    fn a_base_keeps_its_directories_but_not_its_init() {
        let mut base = Tree::new();
        base.insert(TreePath::new("tmp").unwrap(), Node::dir(0o700))
            .unwrap();
        base.insert(TreePath::new("init").unwrap(), Node::file(0o755, "old"))
            .unwrap();
        let tree = assemble(Some(base), b"new", None, None).unwrap();
        assert_eq!(
            tree.get(&TreePath::new("tmp").unwrap()).unwrap().mode,
            0o700
        );
        assert_eq!(
            tree.get(&TreePath::new("init").unwrap()).unwrap().kind,
            NodeKind::File(b"new".to_vec())
        );
        let mut base = Tree::new();
        base.insert(TreePath::new("proc").unwrap(), Node::file(0o644, ""))
            .unwrap();
        assert!(assemble(Some(base), b"", None, None).is_err());
    }
}
