//! The generator of the artifacts microVMs boot from, one module per stage of the data flow:
//!
//! ```text
//! lock ─► fetch ─► store          kernels: pinned URL + sha256 → verified blob → named link
//! lock ─► oci ─► rootfs ─► initrd ─► store
//!                                  base image → layers → Tree (+ guest-init, modules) → newc+gzip
//! artifacts: composes the stages for `cargo xtask artifacts` and records the outcome in the lock
//! store ─► dist                  release tarballs of a store subtree, verified and installed back
//! ```
//!
//! `store` is the floor every stage writes through (verified-before-visible blobs, atomic files);
//! `test_suite` is the project's own test command. The `cargo xtask` binary (`main.rs`) only
//! parses arguments and calls into here. See ARCHITECTURE.md for the map.

pub mod artifacts;
pub mod compression;
pub mod dist;
pub mod fetch;
pub mod fuzz;
pub mod initrd;
pub mod lock;
pub mod nested_cargo;
pub mod oci;
pub mod rootfs;
pub mod store;
pub mod test_suite;
pub mod toolchain;
pub mod vm;

use std::path::PathBuf;

/// The checkout this xtask belongs to: relative paths on the command line are taken from here.
pub fn workspace_root() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}
