//! The initrd writer round trip: a tree (made by applying the input's tar layers, as an image
//! becomes an initrd) written as newc and parsed back is the same tree: every path, kind,
//! content, mode, owner, device number, symlink target and hard-link group. Hard links compare
//! by group, since an archive cannot say which name was first.
//!
//! The input is the `layers` target's: tar layers separated by `%%LAYER%%`.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use workspace_fuzz::{LIMITS, apply_layer};
use xtask::initrd::cpio::write_newc;
use xtask::initrd::cpio_read::read_newc;
use xtask::oci::layers::Applier;
use xtask::rootfs::{Node, NodeKind, Tree, TreePath};

fuzz_target!(|data: &[u8]| {
    let mut applier = Applier::new(LIMITS);
    for blob in workspace_fuzz::layers(data) {
        if apply_layer(&mut applier, &blob).is_err() {
            break;
        }
    }
    let tree = applier.into_tree();
    let archive = match write_newc(&tree, 1_700_000_000, Vec::new()) {
        Ok(archive) => archive,
        // Refusals (a name the format cannot carry) are answers too.
        Err(_) => return,
    };
    let back = read_newc(&archive).unwrap_or_else(|e| panic!("the archive does not parse: {e:#}"));
    let (expected, actual) = (canonical(&tree), canonical(&back));
    if expected != actual {
        let missing: Vec<_> = expected.iter().filter(|e| !actual.contains(e)).collect();
        let extra: Vec<_> = actual.iter().filter(|e| !expected.contains(e)).collect();
        panic!("round trip changed the tree: lost {missing:?}, gained {extra:?}");
    }
});

/// One entry as it must survive: the inode's node (a link resolved to its file) and, for
/// hard-linked files, the smallest name of the group.
type Entry = (TreePath, Node, Option<TreePath>);

fn canonical(tree: &Tree) -> Vec<Entry> {
    let mut group_of: BTreeMap<&TreePath, &TreePath> = BTreeMap::new();
    let mut leader: BTreeMap<&TreePath, &TreePath> = BTreeMap::new();
    for (path, node) in tree.iter() {
        if let NodeKind::HardLink(file) = &node.kind {
            group_of.insert(path, file);
            let least = leader.entry(file).or_insert(file);
            if path < *least {
                *least = path;
            }
        }
    }
    tree.iter()
        .map(|(path, _)| {
            let file = group_of.get(path).copied().unwrap_or(path);
            let inode = tree
                .get(file)
                .expect("links name files in the tree")
                .clone();
            (path.clone(), inode, leader.get(file).map(|l| (*l).clone()))
        })
        .collect()
}
