//! The layer applier: image layers (tar, tar+gzip, tar+zstd, found by their magic bytes) applied
//! in order to an in-memory tree, hostile headers included. Any bytes give an error or a tree,
//! never a panic nor an allocation past the caps, and every tree that comes out is well formed:
//! each entry's parent is a directory and each hard link names a regular file.
//!
//! The input is one or more layers separated by `%%LAYER%%`, so that whiteouts and opaque
//! directories meet lower layers; tar header checksums are mended first, so that mutated
//! headers reach the applier.
#![no_main]

use libfuzzer_sys::fuzz_target;
use workspace_fuzz::{LIMITS, apply_layer};
use xtask::oci::layers::Applier;
use xtask::rootfs::{Node, NodeKind, Tree};

fuzz_target!(|data: &[u8]| {
    let mut applier = Applier::new(LIMITS);
    for blob in workspace_fuzz::layers(data) {
        if let Err((digest, e)) = apply_layer(&mut applier, &blob) {
            // Errors name the layer; the tree is discarded, as the real puller does.
            assert!(format!("{e:#}").contains(&digest.to_string()), "{e:#}");
            return;
        }
        well_formed(applier.tree());
    }
});

fn well_formed(tree: &Tree) {
    for (path, node) in tree.iter() {
        if let Some(parent) = path.parent() {
            match tree.get(&parent) {
                Some(Node {
                    kind: NodeKind::Dir,
                    ..
                }) => {}
                other => panic!("{path} has parent {parent}: {other:?}, not a directory"),
            }
        }
        assert!(node.mode <= 0o7777, "{path} mode {:o}", node.mode);
        if let NodeKind::HardLink(target) = &node.kind {
            match tree.get(target) {
                Some(Node {
                    kind: NodeKind::File(_),
                    ..
                }) => {}
                other => panic!("hard link {path} names {target}: {other:?}, not a file"),
            }
        }
    }
}
