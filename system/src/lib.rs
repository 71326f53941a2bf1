//! The runtime side of the system files: which kernels and initrds exist, where they are, and
//! whether they are intact.
//!
//! A host links this crate, points it at its data dir, and asks for the verified path of a
//! kernel or initrd version for an architecture. It never downloads or builds anything: that is
//! `cargo xtask artifacts`' job. The versions it knows are the ones in the `artifacts.lock` it was
//! built with, as typed constants ([`DEFAULT_KERNEL`], [`KERNELS`], [`DEFAULT_INITRD`], ...).
//!
//! ```
//! use system::{Arch, Error, Store, DEFAULT_INITRD, DEFAULT_KERNEL};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let data_dir = tempfile::tempdir()?;
//! let store = Store::open(data_dir.path());
//! match store.kernel_path(&DEFAULT_KERNEL, Arch::host()) {
//!     Ok(kernel) => println!("boot {}", kernel.display()),
//!     // A fresh data dir: the artifacts have not been generated into it yet.
//!     Err(e @ Error::Missing { .. }) => eprintln!("{e}"),
//!     Err(e) => return Err(e.into()),
//! }
//! # assert!(matches!(store.kernel_path(&DEFAULT_KERNEL, Arch::host()), Err(Error::Missing { .. })));
//! # let _ = DEFAULT_INITRD;
//! # Ok(())
//! # }
//! ```
//!
//! Snapshots restore only on the exact versions they were taken on; see [`SystemVersions`].
//!
//! ## Store layout
//! ```text
//! <data_dir>/system/
//!   blobs/sha256/<hex>                      immutable, read-only, named by content
//!   kernel/<version>/<arch>/vmlinux|Image   relative symlink into blobs (x86_64: vmlinux, aarch64: Image)
//!   initrd/<version>/<arch>/initrd          relative symlink into blobs
//!   oci-cache/                              OCI image layout the initrd builder pulls into
//!   artifacts.lock                          the lock this store satisfies
//! ```
//! Resolving follows the named link, refuses one that leads outside `blobs/sha256/`, and hashes
//! the blob once; later resolves trust the result while the file's device, inode, size, mtime
//! and ctime are unchanged. [`Store::verify_all`] with [`Check::Full`] re-hashes everything.

mod arch;
mod error;
pub mod hash;
pub mod layout;
pub mod lock;
#[cfg(test)]
mod lock_path;
mod snapshot;
pub mod stamp;
mod store;
mod version;

use std::sync::OnceLock;

pub use arch::{Arch, UnknownArch};
pub use error::{Artifact, Error, Kind, LockMismatch};
pub use layout::Layout;
pub use lock::{Digest, Lock, LockError, Sha256};
pub use snapshot::{FieldDifference, SnapshotMismatch, SystemVersions};
pub use store::{Check, Store};
pub use version::{InitrdVersion, KernelVersion};

include!(concat!(env!("OUT_DIR"), "/versions.rs"));

/// The lock this crate was built with, parsed. (build.rs validated it, so parsing cannot fail.)
pub fn embedded_lock() -> &'static Lock {
    static LOCK: OnceLock<Lock> = OnceLock::new();
    LOCK.get_or_init(|| Lock::parse(EMBEDDED_LOCK).expect("build.rs validated the embedded lock"))
}
