//! How a layer changes what lower layers left: whiteouts, opaque directories, and removal that
//! keeps hard-linked content alive; plus the refusal to write through a symlink.

use std::collections::BTreeSet;

use anyhow::bail;

use super::Applier;
use crate::rootfs::{Node, NodeKind, TreePath};

impl Applier {
    /// Errors when an ancestor of `path` (or `path` itself, with `inclusive`) is a symlink: a
    /// real extractor would write wherever it points.
    pub(super) fn refuse_symlink_on_the_way(
        &self,
        path: &TreePath,
        inclusive: bool,
    ) -> anyhow::Result<()> {
        let mut at = if inclusive {
            Some(path.clone())
        } else {
            path.parent()
        };
        while let Some(p) = at {
            if let Some(Node {
                kind: NodeKind::Symlink(target),
                ..
            }) = self.tree.get(&p)
            {
                bail!(
                    "{path} lies below the symlink {p} -> {target}; writing through a symlink is \
                     refused"
                );
            }
            at = p.parent();
        }
        Ok(())
    }

    /// `.wh..wh..opq`: everything lower in `dir` (the root when `None`) disappears.
    pub(super) fn opaque(
        &mut self,
        dir: Option<&TreePath>,
        added: &BTreeSet<String>,
    ) -> anyhow::Result<()> {
        let children: Vec<TreePath> = match dir {
            Some(dir) => self
                .tree
                .subtree(dir)
                .filter(|(p, _)| p.parent().as_ref() == Some(dir))
                .map(|(p, _)| p.clone())
                .collect(),
            None => self
                .tree
                .iter()
                .filter(|(p, _)| p.parent().is_none())
                .map(|(p, _)| p.clone())
                .collect(),
        };
        for child in children {
            self.hide_lower(&child, added)?;
        }
        Ok(())
    }

    /// Removes what lower layers put at `path`, keeping what this layer added (and the
    /// directories leading to it).
    pub(super) fn hide_lower(
        &mut self,
        path: &TreePath,
        added: &BTreeSet<String>,
    ) -> anyhow::Result<()> {
        if self.tree.get(path).is_none() {
            return Ok(());
        }
        let prefix = format!("{}/", path.as_str());
        let added_below = added
            .range(prefix.clone()..)
            .next()
            .is_some_and(|p| p.starts_with(&prefix));
        if !added_below {
            if !added.contains(path.as_str()) {
                self.remove(path);
            }
            return Ok(());
        }
        // This layer put things below `path`: hide only the lower entries around them.
        let children: Vec<TreePath> = self
            .tree
            .subtree(path)
            .filter(|(p, _)| p.parent().as_ref() == Some(path))
            .map(|(p, _)| p.clone())
            .collect();
        for child in children {
            self.hide_lower(&child, added)?;
        }
        Ok(())
    }

    /// Removes `path` and its subtree. Hard links elsewhere to a removed file keep its content:
    /// the first surviving link becomes the file, the others link to it.
    pub(super) fn remove(&mut self, path: &TreePath) {
        let doomed: Vec<(TreePath, Node)> = self
            .tree
            .subtree(path)
            .map(|(p, n)| (p.clone(), n.clone()))
            .collect();
        for (p, node) in &doomed {
            match &node.kind {
                NodeKind::HardLink(file) => {
                    if let Some(set) = self.links.get_mut(file) {
                        set.remove(p);
                        if set.is_empty() {
                            self.links.remove(file);
                        }
                    }
                }
                NodeKind::File(_) => {
                    let Some(names) = self.links.remove(p) else {
                        continue;
                    };
                    let mut survivors = names.into_iter().filter(|l| !l.starts_with(path));
                    let Some(heir) = survivors.next() else {
                        continue;
                    };
                    let rest: BTreeSet<TreePath> = survivors.collect();
                    for l in &rest {
                        if let Some(n) = self.tree.get(l).cloned() {
                            let relinked = Node {
                                kind: NodeKind::HardLink(heir.clone()),
                                ..n
                            };
                            self.tree
                                .insert(l.clone(), relinked)
                                .expect("replacing a link with a link keeps its parents");
                        }
                    }
                    self.tree
                        .insert(heir.clone(), node.clone())
                        .expect("replacing a link with a file keeps its parents");
                    if !rest.is_empty() {
                        self.links.insert(heir, rest);
                    }
                }
                _ => {}
            }
        }
        self.tree.remove(path);
    }
}
