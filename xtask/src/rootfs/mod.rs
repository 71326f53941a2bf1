//! The filesystem tree an initrd is made of.
//!
//! The OCI layer model produces a [`Tree`] from an image's layers; the initrd writer consumes one.
//! It lives in memory so that nothing a layer says can touch the host filesystem, and so that
//! tests can build one directly.

use std::collections::BTreeMap;
use std::fmt;

use anyhow::{Context, bail};

/// A normalized path inside a [`Tree`]: relative, `/`-separated, no empty, `.` or `..` components.
///
/// Byte order of these strings puts every parent before its children, which is the order a cpio
/// archive needs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TreePath(String);

impl TreePath {
    /// Normalizes `raw` as an archive would name it (`./etc/passwd`, `/etc/passwd`, `etc//passwd`
    /// all become `etc/passwd`). `..` is refused rather than resolved: a layer has no business
    /// climbing, and resolving it lexically would hide an escape attempt.
    pub fn new(raw: &str) -> anyhow::Result<TreePath> {
        let mut parts = Vec::new();
        for part in raw.split('/') {
            match part {
                "" | "." => {}
                ".." => bail!("path `{raw}` contains `..`; tree paths never leave their root"),
                _ if part.contains('\0') => bail!("path `{raw}` contains a NUL byte"),
                _ => parts.push(part),
            }
        }
        if parts.is_empty() {
            bail!("path `{raw}` names the root itself, not an entry in it");
        }
        Ok(TreePath(parts.join("/")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The containing directory, or `None` for a top-level entry.
    pub fn parent(&self) -> Option<TreePath> {
        self.0
            .rsplit_once('/')
            .map(|(parent, _)| TreePath(parent.to_owned()))
    }

    /// The last component.
    pub fn file_name(&self) -> &str {
        self.0.rsplit_once('/').map_or(&self.0, |(_, name)| name)
    }

    pub fn join(&self, name: &str) -> anyhow::Result<TreePath> {
        TreePath::new(&format!("{}/{name}", self.0))
    }

    /// True when `self` is `ancestor` or lies below it.
    pub fn starts_with(&self, ancestor: &TreePath) -> bool {
        self.0 == ancestor.0
            || (self.0.starts_with(&ancestor.0) && self.0.as_bytes()[ancestor.0.len()] == b'/')
    }
}

impl fmt::Display for TreePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}", self.0)
    }
}

/// What kind of filesystem object an entry is, with what only that kind carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    Dir,
    File(Vec<u8>),
    Symlink(String),
    /// Another name for the regular file at the given path (same inode in the archive).
    HardLink(TreePath),
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
    Fifo,
}

/// One entry: its kind, permission bits (including setuid, setgid and sticky) and owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: NodeKind,
    /// Permission bits only (`0o7777`); the type lives in `kind`.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Node {
    pub fn dir(mode: u32) -> Node {
        Node {
            kind: NodeKind::Dir,
            mode,
            uid: 0,
            gid: 0,
        }
    }

    pub fn file(mode: u32, data: impl Into<Vec<u8>>) -> Node {
        Node {
            kind: NodeKind::File(data.into()),
            mode,
            uid: 0,
            gid: 0,
        }
    }

    pub fn symlink(target: impl Into<String>) -> Node {
        Node {
            kind: NodeKind::Symlink(target.into()),
            mode: 0o777,
            uid: 0,
            gid: 0,
        }
    }

    pub fn char_device(mode: u32, major: u32, minor: u32) -> Node {
        Node {
            kind: NodeKind::CharDevice { major, minor },
            mode,
            uid: 0,
            gid: 0,
        }
    }

    pub fn owned_by(self, uid: u32, gid: u32) -> Node {
        Node { uid, gid, ..self }
    }
}

/// A whole tree: every entry by path. Parents always exist as directories.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tree {
    entries: BTreeMap<TreePath, Node>,
}

impl Tree {
    pub fn new() -> Tree {
        Tree::default()
    }

    /// Adds or replaces the entry at `path`. Missing parent directories are created (0755,
    /// root-owned), as tar extractors do; a parent that exists but is not a directory is an
    /// error. Replacing a directory with a non-directory drops what was below it.
    pub fn insert(&mut self, path: TreePath, node: Node) -> anyhow::Result<()> {
        if let Some(parent) = path.parent() {
            self.ensure_dir(&parent)
                .with_context(|| format!("adding {path}"))?;
        }
        let replaces_dir = matches!(self.entries.get(&path), Some(n) if n.kind == NodeKind::Dir);
        if replaces_dir && node.kind != NodeKind::Dir {
            self.remove(&path);
        }
        self.entries.insert(path, node);
        Ok(())
    }

    /// Creates `path` and its parents as directories where they are missing.
    pub fn ensure_dir(&mut self, path: &TreePath) -> anyhow::Result<()> {
        match self.entries.get(path) {
            Some(Node {
                kind: NodeKind::Dir,
                ..
            }) => Ok(()),
            Some(_) => bail!("{path} exists and is not a directory"),
            None => {
                if let Some(parent) = path.parent() {
                    self.ensure_dir(&parent)?;
                }
                self.entries.insert(path.clone(), Node::dir(0o755));
                Ok(())
            }
        }
    }

    /// Removes `path` and everything below it. Returns whether anything was there.
    pub fn remove(&mut self, path: &TreePath) -> bool {
        let doomed: Vec<TreePath> = self
            .entries
            .range(path.clone()..)
            .take_while(|(p, _)| p.0.starts_with(&path.0))
            .filter(|(p, _)| p.starts_with(path))
            .map(|(p, _)| p.clone())
            .collect();
        for p in &doomed {
            self.entries.remove(p);
        }
        !doomed.is_empty()
    }

    /// `path` (if present) and every entry below it, parents before children.
    pub fn subtree<'a>(
        &'a self,
        path: &'a TreePath,
    ) -> impl Iterator<Item = (&'a TreePath, &'a Node)> + 'a {
        self.entries
            .range(path.clone()..)
            .take_while(move |(p, _)| p.0.starts_with(&path.0))
            .filter(move |(p, _)| p.starts_with(path))
    }

    pub fn get(&self, path: &TreePath) -> Option<&Node> {
        self.entries.get(path)
    }

    /// Every entry, parents before children.
    pub fn iter(&self) -> impl Iterator<Item = (&TreePath, &Node)> {
        self.entries.iter()
    }

    /// How many entries, the root included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the tree holds nothing, not even its root.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> TreePath {
        TreePath::new(s).unwrap()
    }

    #[test]
    fn paths_are_normalized_and_never_climb() {
        assert_eq!(p("./etc//passwd").as_str(), "etc/passwd");
        assert_eq!(p("/etc/passwd/").as_str(), "etc/passwd");
        assert!(TreePath::new("a/../../etc").is_err());
        assert!(TreePath::new("/").is_err());
        assert_eq!(p("a/b/c").parent(), Some(p("a/b")));
        assert_eq!(p("a").parent(), None);
        assert!(p("a/b").starts_with(&p("a")));
        assert!(!p("ab").starts_with(&p("a")));
    }

    #[test]
    fn parents_come_first_and_are_created() {
        let mut tree = Tree::new();
        tree.insert(p("a/b/c"), Node::file(0o644, "x")).unwrap();
        tree.insert(p("a-b"), Node::file(0o644, "y")).unwrap();
        let order: Vec<&str> = tree.iter().map(|(path, _)| path.as_str()).collect();
        assert_eq!(order, ["a", "a-b", "a/b", "a/b/c"]);
    }

    #[test]
    fn remove_takes_the_subtree_only() {
        let mut tree = Tree::new();
        tree.insert(p("a/b"), Node::file(0o644, "x")).unwrap();
        tree.insert(p("a-b"), Node::file(0o644, "y")).unwrap();
        tree.insert(p("ab"), Node::file(0o644, "z")).unwrap();
        assert!(tree.remove(&p("a")));
        let left: Vec<&str> = tree.iter().map(|(path, _)| path.as_str()).collect();
        assert_eq!(left, ["a-b", "ab"]);
    }

    #[test]
    fn subtree_is_the_entry_and_what_lies_below() {
        let mut tree = Tree::new();
        tree.insert(p("a/b"), Node::file(0o644, "x")).unwrap();
        tree.insert(p("a-b"), Node::file(0o644, "y")).unwrap();
        let (a, zz) = (p("a"), p("zz"));
        let below: Vec<&str> = tree.subtree(&a).map(|(path, _)| path.as_str()).collect();
        assert_eq!(below, ["a", "a/b"]);
        assert_eq!(tree.subtree(&zz).count(), 0);
    }

    #[test]
    fn a_file_cannot_be_a_parent() {
        let mut tree = Tree::new();
        tree.insert(p("a"), Node::file(0o644, "x")).unwrap();
        assert!(tree.insert(p("a/b"), Node::file(0o644, "y")).is_err());
    }
}
