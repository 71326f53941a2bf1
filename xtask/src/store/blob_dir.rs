//! A directory of content-addressed blobs (`<dir>/<sha256 hex>`), written so that nothing
//! unverified is ever visible: the system store's `blobs/sha256/` and the OCI cache's
//! `blobs/sha256/` are both one of these.
//!
//! A [`BlobWriter`] is a temp file in the same directory that hashes every byte as it is
//! written. [`BlobWriter::commit`] fsyncs it, checks size and digest against what was expected
//! (or adopts the computed digest for content nobody pinned), makes it read-only, renames it to
//! its digest and fsyncs the directory. Dropping a writer without committing deletes the temp
//! file: a crash leaves at most a `.partial-*` file, never a wrong blob.

use std::fs;
use std::io::{self, Seek, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use sha2::Digest as _;
use system::Sha256;

use super::sync_dir;

/// One directory of verified blobs.
#[derive(Debug, Clone)]
pub struct BlobDir {
    dir: PathBuf,
}

/// A blob that is visible: verified, read-only, named by its digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub sha256: Sha256,
    pub size: u64,
    pub path: PathBuf,
}

impl BlobDir {
    /// The blob directory `dir`, as it is (nothing is created: for reading a source).
    pub fn new(dir: &Path) -> BlobDir {
        BlobDir {
            dir: dir.to_owned(),
        }
    }

    /// The blob directory `dir`, created when missing.
    pub fn create(dir: &Path) -> anyhow::Result<BlobDir> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(BlobDir {
            dir: dir.to_owned(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, digest: &Sha256) -> PathBuf {
        self.dir.join(digest.hex())
    }

    /// Whether a blob of that name exists as a regular file (its content is not checked). A
    /// symlink does not count, even to identical content: it is replaced by the next commit.
    pub fn contains(&self, digest: &Sha256) -> bool {
        fs::symlink_metadata(self.path(digest)).is_ok_and(|m| m.file_type().is_file())
    }

    /// A temp file in this directory to stream a blob into.
    pub fn writer(&self) -> anyhow::Result<BlobWriter> {
        let temp = tempfile::Builder::new()
            .prefix(".partial-")
            .tempfile_in(&self.dir)
            .with_context(|| format!("creating a temp file in {}", self.dir.display()))?;
        Ok(BlobWriter {
            temp,
            hasher: sha2::Sha256::new(),
            size: 0,
            dir: self.dir.clone(),
        })
    }

    /// Stores `bytes`, after checking them against `expected` when given.
    pub fn put_bytes(&self, bytes: &[u8], expected: Option<&Sha256>) -> anyhow::Result<Blob> {
        let mut writer = self.writer()?;
        writer
            .write_all(bytes)
            .with_context(|| format!("writing {}", writer.temp.path().display()))?;
        writer.commit(expected, Some(bytes.len() as u64))
    }
}

/// A blob being written: a temp file beside the blobs, hashed as it is filled.
pub struct BlobWriter {
    temp: tempfile::NamedTempFile,
    hasher: sha2::Sha256,
    size: u64,
    dir: PathBuf,
}

impl BlobWriter {
    /// Bytes written since the start (or the last restart).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The sha256 of the bytes written so far.
    pub fn sha256(&self) -> Sha256 {
        Sha256(self.hasher.clone().finalize().into())
    }

    /// Drops everything written so far, e.g. when a server ignores a range request and sends
    /// the file again from byte 0.
    pub fn restart(&mut self) -> io::Result<()> {
        let file = self.temp.as_file_mut();
        file.set_len(0)?;
        file.rewind()?;
        self.hasher = sha2::Sha256::new();
        self.size = 0;
        Ok(())
    }

    /// Makes the written bytes the blob they hash to, if they are what the caller expects:
    /// `expected` (a pinned digest; `None` adopts whatever was written) and `expected_size`.
    /// On a mismatch the temp file is deleted and nothing becomes visible.
    pub fn commit(
        mut self,
        expected: Option<&Sha256>,
        expected_size: Option<u64>,
    ) -> anyhow::Result<Blob> {
        let (actual, size) = (self.sha256(), self.size);
        if let Some(expected_size) = expected_size
            && size != expected_size
        {
            bail!("expected {expected_size} bytes, got {size}; nothing was stored");
        }
        if let Some(expected) = expected
            && *expected != actual
        {
            bail!(
                "expected sha256 {expected}, got sha256 {actual} ({size} bytes); nothing was stored"
            );
        }
        let path = self.dir.join(actual.hex());
        self.temp
            .flush()
            .and_then(|()| self.temp.as_file().sync_all())
            .and_then(|()| fs::set_permissions(self.temp.path(), fs::Permissions::from_mode(0o444)))
            .with_context(|| format!("syncing {}", self.temp.path().display()))?;
        self.temp
            .persist(&path)
            .with_context(|| format!("moving a verified blob to {}", path.display()))?;
        sync_dir(&self.dir)?;
        Ok(Blob {
            sha256: actual,
            size,
            path,
        })
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.temp.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.temp.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_restarted_writer_hashes_only_what_came_after() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobDir::create(dir.path()).unwrap();
        let mut writer = blobs.writer().unwrap();
        writer.write_all(b"half of the fi").unwrap();
        writer.restart().unwrap();
        writer.write_all(b"the file").unwrap();
        let expected = system::hash::sha256_bytes(b"the file");
        let blob = writer.commit(Some(&expected), Some(8)).unwrap();
        assert_eq!(blob.path, blobs.path(&expected));
        assert_eq!(fs::read(&blob.path).unwrap(), b"the file");
        assert!(fs::metadata(&blob.path).unwrap().permissions().readonly());
        assert_eq!(names(dir.path()), [expected.hex()]);
    }

    #[test]
    fn a_mismatch_leaves_nothing_and_unpinned_content_adopts_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobDir::create(dir.path()).unwrap();
        let promised = system::hash::sha256_bytes(b"promised");
        let err = blobs.put_bytes(b"delivered", Some(&promised)).unwrap_err();
        assert!(err.to_string().contains(&promised.hex()), "{err}");
        let err = blobs.put_bytes(b"delivered", None).map(|_| ());
        assert!(err.is_ok());
        let mut writer = blobs.writer().unwrap();
        writer.write_all(b"short").unwrap();
        let err = writer.commit(None, Some(6)).unwrap_err();
        assert!(err.to_string().contains("expected 6 bytes, got 5"), "{err}");
        let delivered = system::hash::sha256_bytes(b"delivered");
        assert_eq!(names(dir.path()), [delivered.hex()]);
    }
}
