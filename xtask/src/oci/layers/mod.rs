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
//! confined (`/etc/x` is `etc/x`). Decompressed bytes and entries are capped across the image
//! ([`LayerLimits`]) so a small blob cannot exhaust memory.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, BufRead, BufReader, Read};

use anyhow::{Context, bail};
use sha2::Digest as _;
use system::lock::{Digest, Sha256};

use crate::rootfs::{Node, NodeKind, Tree, TreePath};

/// Caps on what an image may expand to, summed over its layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerLimits {
    /// Decompressed tar bytes (headers included).
    pub max_bytes: u64,
    /// Tar entries, whiteouts included.
    pub max_entries: u64,
}

pub const MAX_BYTES_ENV: &str = "XTASK_OCI_MAX_BYTES";
pub const MAX_ENTRIES_ENV: &str = "XTASK_OCI_MAX_ENTRIES";

impl Default for LayerLimits {
    fn default() -> Self {
        LayerLimits {
            max_bytes: 2 << 30,
            max_entries: 500_000,
        }
    }
}

impl LayerLimits {
    /// The defaults, overridden by `XTASK_OCI_MAX_BYTES` / `XTASK_OCI_MAX_ENTRIES`.
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
        Ok(limits)
    }
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

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
    let by_magic = if head.starts_with(GZIP_MAGIC) {
        Compression::Gzip
    } else if head.starts_with(ZSTD_MAGIC) {
        Compression::Zstd
    } else {
        Compression::None
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
    bytes: u64,
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
        let result = {
            let mut buffered = BufReader::with_capacity(64 << 10, &mut compressed);
            let head = buffered
                .fill_buf()
                .with_context(|| format!("reading layer {digest}"))?;
            let compression = detect(digest, layer.media_type, head)?;
            let decoder: Box<dyn Read + '_> = match compression {
                Compression::None => Box::new(buffered),
                Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
                Compression::Zstd => Box::new(ZstdFrames::new(buffered)),
            };
            let mut tar_stream = HashingReader::new(decoder, budget);
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

    fn apply_tar(&mut self, layer: LayerInfo<'_>, stream: impl Read) -> anyhow::Result<()> {
        let digest = layer.digest;
        let mut archive = tar::Archive::new(stream);
        // Paths added by this layer: whiteouts hide lower layers only.
        let mut added: BTreeSet<String> = BTreeSet::new();
        let entries = archive
            .entries()
            .with_context(|| format!("reading layer {digest} as tar"))?;
        for entry in entries {
            let mut entry = entry.with_context(|| format!("reading layer {digest} as tar"))?;
            self.entries += 1;
            if self.entries > self.limits.max_entries {
                bail!(
                    "layer {digest} brings the image beyond the limit of {} entries; refusing it \
                     (raise {MAX_ENTRIES_ENV} if the image really has that many files)",
                    self.limits.max_entries
                );
            }
            let raw = entry.path_bytes().into_owned();
            let raw = String::from_utf8(raw).map_err(|e| {
                anyhow::anyhow!(
                    "layer {digest}: entry {:?} is not UTF-8; refusing it",
                    String::from_utf8_lossy(e.as_bytes())
                )
            })?;
            self.apply_entry(&mut entry, &raw, &mut added)
                .with_context(|| format!("layer {digest}: entry `{raw}`"))?;
        }
        Ok(())
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        raw: &str,
        added: &mut BTreeSet<String>,
    ) -> anyhow::Result<()> {
        use tar::EntryType as T;
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink
        ) {
            return Ok(());
        }
        if raw.split('/').all(|part| part.is_empty() || part == ".") {
            // The root itself: the initrd writer owns its metadata.
            return Ok(());
        }
        let path = TreePath::new(raw).context("refused")?;
        let name = path.file_name();
        if let Some(hidden) = name.strip_prefix(".wh.") {
            let parent = path.parent();
            if let Some(parent) = &parent {
                self.refuse_symlink_on_the_way(parent, true)?;
            }
            if hidden == ".wh..opq" {
                self.opaque(parent.as_ref(), added)?;
            } else if hidden.starts_with(".wh.") {
                // Other AUFS metadata (`.wh..wh.plnk`): not content.
            } else {
                let target = match &parent {
                    Some(p) => p.join(hidden),
                    None => TreePath::new(hidden),
                }
                .context("whiteout names an invalid path")?;
                self.hide_lower(&target, added)?;
            }
            return Ok(());
        }
        self.refuse_symlink_on_the_way(&path, false)?;

        // The entry (not the raw header) applies GNU long link names and PAX `linkpath`.
        let link = if matches!(kind, T::Symlink | T::Link) {
            let bytes = entry
                .link_name_bytes()
                .context("link entry without a target")?
                .into_owned();
            Some(String::from_utf8(bytes).context("link target is not UTF-8")?)
        } else {
            None
        };
        let link_name = || link.clone().context("link entry without a target");
        let header = entry.header();
        let mode = header.mode().context("bad mode")? & 0o7777;
        let (mut uid, mut gid) = (
            header.uid().context("bad uid")?,
            header.gid().context("bad gid")?,
        );
        if let Some(pax) = entry.pax_extensions().context("bad PAX header")? {
            for ext in pax.flatten() {
                let value = || ext.value().ok().and_then(|v| v.parse::<u64>().ok());
                match ext.key() {
                    Ok("uid") => uid = value().context("bad PAX uid")?,
                    Ok("gid") => gid = value().context("bad PAX gid")?,
                    _ => {}
                }
            }
        }
        let uid = u32::try_from(uid).context("uid does not fit 32 bits")?;
        let gid = u32::try_from(gid).context("gid does not fit 32 bits")?;
        let header = entry.header();
        let device = || -> anyhow::Result<(u32, u32)> {
            Ok((
                header
                    .device_major()?
                    .context("device without a major number")?,
                header
                    .device_minor()?
                    .context("device without a minor number")?,
            ))
        };
        let node_kind = match kind {
            T::Directory => {
                if let Some(Node {
                    kind: NodeKind::Dir,
                    ..
                }) = self.tree.get(&path)
                {
                    // Same directory, new metadata: what is below stays.
                    self.tree
                        .insert(path.clone(), Node::dir(mode).owned_by(uid, gid))?;
                    added.insert(path.as_str().to_owned());
                    return Ok(());
                }
                NodeKind::Dir
            }
            T::Regular | T::Continuous => NodeKind::File(Vec::new()),
            T::Symlink => NodeKind::Symlink(link_name()?),
            T::Link => {
                let target = TreePath::new(&link_name()?).context("hard link target refused")?;
                return self.hard_link(path, target, added);
            }
            T::Char => {
                let (major, minor) = device()?;
                NodeKind::CharDevice { major, minor }
            }
            T::Block => {
                let (major, minor) = device()?;
                NodeKind::BlockDevice { major, minor }
            }
            T::Fifo => NodeKind::Fifo,
            other => bail!("unsupported tar entry type {other:?}; refusing the layer"),
        };
        let node_kind = match node_kind {
            NodeKind::File(_) => {
                let size = entry.header().entry_size().context("bad size")?;
                let left = self.limits.max_bytes.saturating_sub(self.bytes);
                if size > left {
                    bail!(
                        "a {size}-byte file exceeds the limit of {} decompressed bytes for the \
                         image (raise {MAX_BYTES_ENV} if the image really is that large)",
                        self.limits.max_bytes
                    );
                }
                let mut data = Vec::with_capacity(size as usize);
                entry
                    .read_to_end(&mut data)
                    .context("reading the content")?;
                NodeKind::File(data)
            }
            other => other,
        };
        self.remove(&path);
        self.tree.insert(
            path.clone(),
            Node {
                kind: node_kind,
                mode,
                uid,
                gid,
            },
        )?;
        added.insert(path.as_str().to_owned());
        Ok(())
    }

    /// A hard link at `path` to the regular file `target`, which must already be in the tree.
    fn hard_link(
        &mut self,
        path: TreePath,
        target: TreePath,
        added: &mut BTreeSet<String>,
    ) -> anyhow::Result<()> {
        self.refuse_symlink_on_the_way(&target, false)?;
        let file = match self.tree.get(&target) {
            None => bail!("hard link to {target}, which does not exist (yet); refused"),
            Some(Node {
                kind: NodeKind::HardLink(file),
                ..
            }) => file.clone(),
            Some(Node {
                kind: NodeKind::File(_),
                ..
            }) => target.clone(),
            Some(_) => bail!("hard link to {target}, which is not a regular file; refused"),
        };
        if file == path {
            // `a` linked to itself: nothing changes.
            return Ok(());
        }
        let Some(node) = self.tree.get(&file) else {
            bail!("hard link to {file}, which does not exist; refused");
        };
        let (mode, uid, gid) = (node.mode, node.uid, node.gid);
        self.remove(&path);
        self.tree.insert(
            path.clone(),
            Node {
                kind: NodeKind::HardLink(file.clone()),
                mode,
                uid,
                gid,
            },
        )?;
        self.links.entry(file).or_default().insert(path.clone());
        added.insert(path.as_str().to_owned());
        Ok(())
    }

    /// Errors when an ancestor of `path` (or `path` itself, with `inclusive`) is a symlink: a
    /// real extractor would write wherever it points.
    fn refuse_symlink_on_the_way(&self, path: &TreePath, inclusive: bool) -> anyhow::Result<()> {
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
    fn opaque(&mut self, dir: Option<&TreePath>, added: &BTreeSet<String>) -> anyhow::Result<()> {
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
    fn hide_lower(&mut self, path: &TreePath, added: &BTreeSet<String>) -> anyhow::Result<()> {
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
    fn remove(&mut self, path: &TreePath) {
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

/// Reads through, hashing and counting, and failing once more than `limit` bytes came by.
struct HashingReader<R> {
    inner: R,
    hasher: sha2::Sha256,
    count: u64,
    limit: u64,
    exceeded: bool,
}

impl<R: Read> HashingReader<R> {
    fn new(inner: R, limit: u64) -> Self {
        HashingReader {
            inner,
            hasher: sha2::Sha256::new(),
            count: 0,
            limit,
            exceeded: false,
        }
    }

    fn finish(self) -> Sha256 {
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

/// Zstandard with any number of frames (and skippable frames), as `zstd` and `pzstd` write it.
struct ZstdFrames<R> {
    source: R,
    frame: ruzstd::decoding::FrameDecoder,
    in_frame: bool,
}

impl<R: BufRead> ZstdFrames<R> {
    fn new(source: R) -> Self {
        ZstdFrames {
            source,
            frame: ruzstd::decoding::FrameDecoder::new(),
            in_frame: false,
        }
    }
}

impl<R: BufRead> Read for ZstdFrames<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use ruzstd::decoding::BlockDecodingStrategy;
        use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if !self.in_frame {
                if self.source.fill_buf()?.is_empty() {
                    return Ok(0);
                }
                match self.frame.reset(&mut self.source) {
                    Ok(()) => self.in_frame = true,
                    Err(FrameDecoderError::ReadFrameHeaderError(
                        ReadFrameHeaderError::SkipFrame { length, .. },
                    )) => {
                        let skipped =
                            io::copy(&mut (&mut self.source).take(length.into()), &mut io::sink())?;
                        if skipped < u64::from(length) {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "zstd: truncated skippable frame",
                            ));
                        }
                        continue;
                    }
                    Err(e) => return Err(io::Error::other(e)),
                }
            }
            while self.frame.can_collect() < buf.len() && !self.frame.is_finished() {
                let wanted = buf.len() - self.frame.can_collect();
                self.frame
                    .decode_blocks(&mut self.source, BlockDecodingStrategy::UptoBytes(wanted))
                    .map_err(io::Error::other)?;
            }
            let n = self.frame.read(buf)?;
            if n > 0 {
                return Ok(n);
            }
            if self.frame.is_finished() {
                self.in_frame = false;
                continue;
            }
            return Ok(0);
        }
    }
}

#[cfg(test)]
#[cfg(test)]
mod tests;
