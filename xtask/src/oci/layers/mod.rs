//! The OCI layer model: an image's layers applied in order to an in-memory [`Tree`].
//!
//! Semantics follow the OCI image spec's "applying changesets": `.wh.<name>` removes `<name>`
//! from lower layers, `.wh..wh..opq` hides everything lower in its directory, later entries
//! replace earlier ones. Hard links, symlinks, devices, fifos, permission bits (setuid, setgid,
//! sticky) and owners are kept; mtimes and xattrs are not (the initrd sets its own mtimes).
//!
//! Nothing a layer says can reach the host: the tree lives in memory, and on top of that every
//! escape a real extractor would have to defend against is refused with an error naming the
//! layer: `..` components, a path below a symlink (the write would go wherever the link points),
//! a hard link to a missing, non-regular or symlinked-through target. Absolute paths are
//! confined (`/etc/x` is `etc/x`). Decompressed bytes, entries and file contents are capped
//! across the image ([`LayerLimits`]); a file is refused on its declared size before its data is
//! read, so a small blob cannot exhaust memory.
//!
//! Here: what a layer is (media type, compression, digests) and the streaming [`Applier::apply`];
//! `limits.rs` the caps and the hashing, capping reader; `entries.rs` tar entries into nodes;
//! `tree_edits.rs` whiteouts and removal. Decompression is [`crate::compression`]'s.

mod entries;
mod limits;
mod tree_edits;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, BufRead, BufReader, Read};

use anyhow::{Context, bail};
use system::lock::Digest;

pub use limits::{LayerLimits, MAX_BYTES_ENV, MAX_CONTENT_ENV, MAX_ENTRIES_ENV};

use crate::compression::Compression;
use crate::rootfs::{Tree, TreePath};
use limits::HashingReader;

/// The compression a layer's media type announces, `None` in the outer option for media types
/// that are not layers at all.
fn announced_compression(media_type: &str) -> Option<Option<Compression>> {
    Some(match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Some(Compression::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
        | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Some(Compression::Zstd),
        // No media type (a test, a hand-made layout): go by the magic bytes.
        "" => None,
        _ => return None,
    })
}

/// The compression of a layer, from its media type and first bytes. A media type that says one
/// thing while the bytes say another is an error: one of them is wrong.
pub fn detect(digest: &Digest, media_type: &str, head: &[u8]) -> anyhow::Result<Compression> {
    let by_magic = match Compression::from_magic(head) {
        // No layer media type announces xz, and xz decodes whole into memory, beyond the caps.
        refused @ (Compression::Xz | Compression::Lz4Legacy) => bail!(
            "layer {digest} is {refused}-compressed, which no OCI or Docker layer media type \
             allows (expected tar, tar+gzip or tar+zstd); refusing it"
        ),
        other => other,
    };
    match announced_compression(media_type) {
        None => bail!(
            "layer {digest} has media type `{media_type}`, which is not a filesystem layer \
             (expected an OCI or Docker tar, tar+gzip or tar+zstd layer)"
        ),
        Some(Some(announced)) if announced != by_magic => bail!(
            "layer {digest}: the media type `{media_type}` says {announced:?}, but the content \
             starts like {by_magic:?}; refusing an ambiguous layer"
        ),
        _ => Ok(by_magic),
    }
}

/// What identifies a layer to [`Applier::apply`].
#[derive(Debug, Clone, Copy)]
pub struct LayerInfo<'a> {
    /// The blob digest; the compressed bytes are checked against it.
    pub digest: &'a Digest,
    pub media_type: &'a str,
    /// The digest of the uncompressed tar (the config's `rootfs.diff_ids`), checked when given.
    pub diff_id: Option<&'a Digest>,
}

/// Applies layers in order to a tree it owns.
#[derive(Debug, Default)]
pub struct Applier {
    tree: Tree,
    limits: LayerLimits,
    /// For each regular file that has other names: those hard links.
    links: BTreeMap<TreePath, BTreeSet<TreePath>>,
    /// Decompressed bytes of the layers applied before this one.
    bytes: u64,
    /// Declared file sizes of the layer being applied (a lower bound of its stream so far).
    layer_content: u64,
    /// Declared file sizes of every layer, this one included: the tree's content.
    content: u64,
    entries: u64,
}

impl Applier {
    pub fn new(limits: LayerLimits) -> Applier {
        Applier {
            limits,
            ..Applier::default()
        }
    }

    pub fn into_tree(self) -> Tree {
        self.tree
    }

    pub fn tree(&self) -> &Tree {
        &self.tree
    }

    /// Applies one layer blob. On error the tree may hold part of the layer; callers discard it.
    pub fn apply(&mut self, layer: LayerInfo<'_>, blob: impl Read) -> anyhow::Result<()> {
        let digest = layer.digest;
        let mut compressed = HashingReader::new(blob, u64::MAX);
        let budget = self.limits.max_bytes.saturating_sub(self.bytes);
        self.layer_content = 0;
        let result = {
            let mut buffered = BufReader::with_capacity(64 << 10, &mut compressed);
            let head = buffered
                .fill_buf()
                .with_context(|| format!("reading layer {digest}"))?;
            let compression = detect(digest, layer.media_type, head)?;
            let mut tar_stream = HashingReader::new(compression.decoder(buffered), budget);
            let applied = self.apply_tar(layer, &mut tar_stream);
            // Read to the end: the diff_id covers the whole stream, padding included.
            let drained = applied.and_then(|()| {
                io::copy(&mut tar_stream, &mut io::sink())
                    .with_context(|| format!("decompressing layer {digest}"))
            });
            self.bytes += tar_stream.count;
            if tar_stream.exceeded {
                bail!(
                    "layer {digest} expands beyond the limit of {} decompressed bytes for the \
                     image; refusing it (a decompression bomb, or raise {MAX_BYTES_ENV} if the \
                     image really is that large)",
                    self.limits.max_bytes
                );
            }
            drained.map(|_| tar_stream.finish())
        };
        let diff = result?;
        if let Some(expected) = layer.diff_id
            && expected.0 != diff
        {
            bail!(
                "layer {digest} decompresses to sha256:{diff}, but the image config's diff_id is \
                 {expected}; the image is inconsistent"
            );
        }
        io::copy(&mut compressed, &mut io::sink())
            .with_context(|| format!("reading layer {digest}"))?;
        let actual = compressed.finish();
        if actual != digest.0 {
            bail!("layer {digest}: the blob hashes to sha256:{actual}; it is corrupt");
        }
        Ok(())
    }
}

#[cfg(test)]
mod bomb_tests;
#[cfg(test)]
mod tests;
