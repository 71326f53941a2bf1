//! One layer's tar entries turned into tree nodes: kinds, modes, owners (PAX included),
//! content within the byte budget, hard links to files already in the tree.

use std::collections::BTreeSet;
use std::io::Read;

use anyhow::{Context, bail};

use super::{Applier, LayerInfo, MAX_BYTES_ENV, MAX_CONTENT_ENV, MAX_ENTRIES_ENV};
use crate::rootfs::{Node, NodeKind, TreePath};

impl Applier {
    pub(super) fn apply_tar(
        &mut self,
        layer: LayerInfo<'_>,
        stream: impl Read,
    ) -> anyhow::Result<()> {
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
                self.reserve_content(size)?;
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

    /// Counts a file's declared size against the caps before any of its data is read: the
    /// image's decompressed bytes (earlier layers' streams plus this layer's files so far) and
    /// the contents held in memory.
    fn reserve_content(&mut self, size: u64) -> anyhow::Result<()> {
        let limits = self.limits;
        let streamed = self
            .bytes
            .saturating_add(self.layer_content)
            .saturating_add(size);
        if streamed > limits.max_bytes {
            bail!(
                "a {size}-byte file would take the image beyond the limit of {} decompressed \
                 bytes; refused before reading it (a decompression bomb, or raise \
                 {MAX_BYTES_ENV} if the image really is that large)",
                limits.max_bytes
            );
        }
        let held = self.content.saturating_add(size);
        if held > limits.max_content_bytes {
            bail!(
                "a {size}-byte file would take the image's file contents to {held} bytes, beyond \
                 the limit of {} bytes held in memory; refused before reading it (a \
                 decompression bomb, or raise {MAX_CONTENT_ENV} if the image really is that \
                 large)",
                limits.max_content_bytes
            );
        }
        self.layer_content += size;
        self.content = held;
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
}
