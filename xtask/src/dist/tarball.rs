//! The deterministic tarball writer: the same entries give the same bytes on every machine.
//!
//! Entries are written in path order (component-wise, so a directory precedes its contents),
//! owned by 0:0 (`root`), with fixed modes (directories 0755, blobs 0444, the lock 0644) and one
//! mtime; the gzip header carries no file name and mtime 0, at a pinned level of flate2's
//! pure-Rust backend.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read as _, Write};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use flate2::{Compression, GzBuilder};

/// gzip's own default: kernels and initrds are mostly compressed already, so a higher level
/// costs time and saves almost nothing.
pub const GZIP_LEVEL: u32 = 6;
/// The gzip header's OS byte: Unix, whatever the building machine.
const GZIP_OS_UNIX: u8 = 3;

/// What one archive path is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir,
    /// A regular file copied from `source` (`size` bytes), with `mode`.
    File {
        source: Source,
        size: u64,
        mode: u32,
    },
    /// A symlink to a relative target.
    Link(PathBuf),
}

/// Where a file's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Path(PathBuf),
    Bytes(Vec<u8>),
}

/// An archive's entries by path; [`Entries::add_parents`] fills in the directories.
#[derive(Debug, Default)]
pub struct Entries(pub BTreeMap<PathBuf, Node>);

impl Entries {
    /// Adds `path`, and every ancestor as a directory.
    pub fn insert(&mut self, path: impl Into<PathBuf>, node: Node) {
        let path = path.into();
        for ancestor in path.ancestors().skip(1) {
            if !ancestor.as_os_str().is_empty() {
                self.0.insert(ancestor.to_owned(), Node::Dir);
            }
        }
        self.0.insert(path, node);
    }
}

/// Writes `entries` as a gzip-compressed tar stream into `out`, every mtime `mtime`.
pub fn write<W: Write>(entries: &Entries, mtime: u64, out: W) -> anyhow::Result<W> {
    let gz = GzBuilder::new()
        .mtime(0)
        .operating_system(GZIP_OS_UNIX)
        .write(out, Compression::new(GZIP_LEVEL));
    let mut tar = tar::Builder::new(gz);
    // `BTreeMap<PathBuf, _>` orders by components: `system` < `system/blobs` < `system/blobs/x`.
    for (path, node) in &entries.0 {
        let mut header = tar::Header::new_gnu();
        header.set_uid(0);
        header.set_gid(0);
        header.set_username("root")?;
        header.set_groupname("root")?;
        header.set_mtime(mtime);
        match node {
            Node::Dir => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(0o755);
                header.set_size(0);
                tar.append_data(&mut header, path, io::empty())
            }
            Node::File { source, size, mode } => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(*mode);
                header.set_size(*size);
                match source {
                    Source::Path(file) => {
                        let reader = File::open(file)
                            .with_context(|| format!("opening {}", file.display()))?;
                        tar.append_data(&mut header, path, reader.take(*size))
                    }
                    Source::Bytes(bytes) => tar.append_data(&mut header, path, bytes.as_slice()),
                }
            }
            Node::Link(target) => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_mode(0o777);
                header.set_size(0);
                tar.append_link(&mut header, path, target)
            }
        }
        .with_context(|| format!("adding {} to the tarball", path.display()))?;
    }
    let gz = tar.into_inner().context("finishing the tar stream")?;
    gz.finish().context("finishing the gzip stream")
}

/// Writes the tarball to `dest` whole or not at all (temp file beside it, fsync, rename).
pub fn write_file(entries: &Entries, mtime: u64, dest: &Path) -> anyhow::Result<()> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let temp = tempfile::Builder::new()
        .prefix(".partial-")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temp file in {}", dir.display()))?;
    let file = write(entries, mtime, io::BufWriter::new(temp))?;
    let temp = file
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("writing {}", dest.display()))?;
    temp.as_file()
        .sync_all()
        .with_context(|| format!("syncing {}", dest.display()))?;
    temp.persist(dest)
        .with_context(|| format!("writing {}", dest.display()))?;
    crate::store::sync_dir(dir)
}
