//! Where things live in a store. The one place that knows the directory layout:
//!
//! ```text
//! <data_dir>/system/
//!   blobs/sha256/<hex>                      immutable, read-only, named by content
//!   kernel/<version>/<arch>/vmlinux|Image   relative symlink into blobs
//!   initrd/<version>/<arch>/initrd          relative symlink into blobs
//!   oci-cache/                              OCI image layout (oci-layout, index.json, blobs/sha256)
//!   artifacts.lock                          the lock this store satisfies
//!   .lock                                   advisory lock serializing writers
//!   .verified/<hex>                         the stamp of a blob when the generator last hashed it
//!   .downloads/<hex of the URL's sha256>    the blob a URL served when `lock add-kernel` fetched it
//! ```

use std::path::{Path, PathBuf};

use crate::arch::Arch;
use crate::lock::Sha256;

/// The paths of one store, rooted at `<data_dir>/system`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// The layout under a host's data dir.
    pub fn new(data_dir: impl AsRef<Path>) -> Layout {
        Layout {
            root: data_dir.as_ref().join("system"),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blobs(&self) -> PathBuf {
        self.root.join("blobs/sha256")
    }

    pub fn blob(&self, digest: &Sha256) -> PathBuf {
        self.blobs().join(digest.hex())
    }

    pub fn kernel_link(&self, version: &str, arch: Arch) -> PathBuf {
        self.root
            .join("kernel")
            .join(version)
            .join(arch.as_str())
            .join(arch.kernel_file_name())
    }

    pub fn initrd_link(&self, version: &str, arch: Arch) -> PathBuf {
        self.root
            .join("initrd")
            .join(version)
            .join(arch.as_str())
            .join("initrd")
    }

    pub fn oci_cache(&self) -> PathBuf {
        self.root.join("oci-cache")
    }

    pub fn lock_file(&self) -> PathBuf {
        self.root.join("artifacts.lock")
    }

    /// Where the generator records that it hashed blob `digest` (its [`crate::stamp::FileStamp`]),
    /// so a later run trusts the blob while it is unchanged instead of hashing it again.
    pub fn verified_stamp(&self, digest: &Sha256) -> PathBuf {
        self.root.join(".verified").join(digest.hex())
    }

    /// The advisory lock file concurrent writers serialize on.
    pub fn writer_lock(&self) -> PathBuf {
        self.root.join(".lock")
    }

    /// Where `lock add-kernel` records which blob (`<hex> <size>`) `url` served when it last
    /// downloaded it, so adding it again (after a failure, or with another arch) reuses the blob.
    pub fn download_record(&self, url: &str) -> PathBuf {
        let key = crate::hash::sha256_bytes(url.as_bytes());
        self.root.join(".downloads").join(key.hex())
    }

    /// The relative symlink target that a named link (three directories deep: kind, version,
    /// arch) uses to reach a blob, so the store can be moved or mounted elsewhere whole.
    pub fn link_target(digest: &Sha256) -> PathBuf {
        Path::new("../../../blobs/sha256").join(digest.hex())
    }
}
