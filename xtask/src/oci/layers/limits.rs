//! How much an image may expand to, and the reader that measures it.

use std::io::{self, Read};

use anyhow::Context;
use sha2::Digest as _;
use system::lock::Sha256;

/// Caps on what an image may expand to, summed over its layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerLimits {
    /// Decompressed tar bytes (headers included).
    pub max_bytes: u64,
    /// Tar entries, whiteouts included.
    pub max_entries: u64,
    /// Regular files' contents, summed over the layers: what the in-memory tree holds, so
    /// this bounds the pull's memory. Checked against each entry's declared size before its
    /// data is read.
    pub max_content_bytes: u64,
}

pub const MAX_BYTES_ENV: &str = "XTASK_OCI_MAX_BYTES";
pub const MAX_ENTRIES_ENV: &str = "XTASK_OCI_MAX_ENTRIES";
pub const MAX_CONTENT_ENV: &str = "XTASK_OCI_MAX_CONTENT_BYTES";

impl Default for LayerLimits {
    fn default() -> Self {
        LayerLimits {
            max_bytes: 2 << 30,
            max_entries: 500_000,
            // An initrd lives in the guest's RAM: a base image beyond this is a mistake (or a
            // bomb), and the tree, the cpio and its gzip are all built in memory.
            max_content_bytes: 256 << 20,
        }
    }
}

impl LayerLimits {
    /// The defaults, overridden by `XTASK_OCI_MAX_BYTES` / `XTASK_OCI_MAX_ENTRIES` /
    /// `XTASK_OCI_MAX_CONTENT_BYTES`.
    pub fn from_env() -> anyhow::Result<LayerLimits> {
        let mut limits = LayerLimits::default();
        let read = |name: &str| -> anyhow::Result<Option<u64>> {
            match std::env::var(name) {
                Ok(v) => v
                    .trim()
                    .parse()
                    .map(Some)
                    .with_context(|| format!("{name}={v:?} is not a whole number")),
                Err(_) => Ok(None),
            }
        };
        if let Some(v) = read(MAX_BYTES_ENV)? {
            limits.max_bytes = v;
        }
        if let Some(v) = read(MAX_ENTRIES_ENV)? {
            limits.max_entries = v;
        }
        if let Some(v) = read(MAX_CONTENT_ENV)? {
            limits.max_content_bytes = v;
        }
        Ok(limits)
    }
}

/// Reads through, hashing and counting, and failing once more than `limit` bytes came by.
pub(super) struct HashingReader<R> {
    inner: R,
    hasher: sha2::Sha256,
    pub(super) count: u64,
    limit: u64,
    pub(super) exceeded: bool,
}

impl<R: Read> HashingReader<R> {
    pub(super) fn new(inner: R, limit: u64) -> Self {
        HashingReader {
            inner,
            hasher: sha2::Sha256::new(),
            count: 0,
            limit,
            exceeded: false,
        }
    }

    pub(super) fn finish(self) -> Sha256 {
        Sha256(self.hasher.finalize().into())
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        if self.count > self.limit {
            self.exceeded = true;
            return Err(io::Error::other("decompressed size limit exceeded"));
        }
        Ok(n)
    }
}
