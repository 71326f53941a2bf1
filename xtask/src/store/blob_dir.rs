//! A directory of content-addressed blobs (`<dir>/<sha256 hex>`), written so that nothing
//! unverified is ever visible: the system store's `blobs/sha256/` and the OCI cache's
//! `blobs/sha256/` are both one of these.
//!
//! A [`BlobWriter`] is a temp file in the same directory that hashes every byte as it is
//! written. [`BlobWriter::commit`] fsyncs it, checks size and digest against what was expected
//! (or adopts the computed digest for content nobody pinned), makes it read-only, renames it to
//! its digest and fsyncs the directory. Dropping a writer without committing deletes the temp
//! file: a crash leaves at most a `.partial-*` file, never a wrong blob, and the next writer
//! that holds the store's lock removes it ([`BlobDir::remove_stale_partials`]). A download
//! pinned by digest uses a resumable writer instead, whose partial a later run continues.

use std::fs;
use std::io::{self, Seek, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

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

    /// A temp file in this directory to stream a blob into; deleted unless committed.
    pub fn writer(&self) -> anyhow::Result<BlobWriter> {
        let (file, path) = tempfile::Builder::new()
            .prefix(PARTIAL)
            .tempfile_in(&self.dir)
            .and_then(|temp| temp.keep().map_err(|e| e.error))
            .with_context(|| format!("creating a temp file in {}", self.dir.display()))?;
        Ok(BlobWriter {
            file,
            path,
            hasher: sha2::Sha256::new(),
            size: 0,
            dir: self.dir.clone(),
            resume: None,
            done: false,
        })
    }

    /// A writer for the blob `expected`, downloaded from `url`, that survives being
    /// interrupted: its bytes go to `.partial-<hex>`, and the validator (ETag) of the answer
    /// they come from to `.partial-<hex>.source`. Both are kept when the writer is dropped
    /// uncommitted (a failed run) or the process is killed, and a later writer for the same
    /// digest and URL picks them up: the bytes are hashed once to rebuild the hash state, and
    /// the download resumes after them ([`BlobWriter::resumable`]). Only one writer per digest
    /// may exist at a time: callers hold the store's writer lock.
    pub fn resumable_writer(&self, expected: &Sha256, url: &str) -> anyhow::Result<BlobWriter> {
        let path = self.dir.join(format!("{PARTIAL}{}", expected.hex()));
        let source = self
            .dir
            .join(format!("{PARTIAL}{}{SOURCE}", expected.hex()));
        // Never write through a link someone put in the partial's place.
        if fs::symlink_metadata(&path).is_ok_and(|m| !m.file_type().is_file()) {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        let earlier = fs::read_to_string(&source)
            .ok()
            .and_then(|text| earlier_validator(&text, url));
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let mut hasher = sha2::Sha256::new();
        let mut size = 0;
        if earlier.is_some() {
            // The hash state is not saved: reading the partial once rebuilds it.
            size = io::copy(&mut file, &mut HashWriter(&mut hasher))
                .with_context(|| format!("reading {}", path.display()))?;
        } else {
            file.set_len(0)
                .with_context(|| format!("truncating {}", path.display()))?;
            remove_if_present(&source)?;
        }
        file.seek(io::SeekFrom::Start(size))
            .with_context(|| format!("seeking in {}", path.display()))?;
        Ok(BlobWriter {
            file,
            path,
            hasher,
            size,
            dir: self.dir.clone(),
            resume: Some(Resume {
                source,
                url: url.to_owned(),
                recorded: earlier.is_some(),
                earlier,
            }),
            done: false,
        })
    }

    /// Removes what interrupted writers left behind: every temp file, and the resumable
    /// partials that are of no use anymore (their blob exists, their source record is gone, or
    /// nobody touched them for [`RESUME_MAX_AGE`]). Only while holding the store's writer
    /// lock: no other writer can be using them. Returns how many files and bytes it removed.
    pub fn remove_stale_partials(&self, now: SystemTime) -> anyhow::Result<(usize, u64)> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((0, 0)),
            Err(e) => return Err(e).with_context(|| format!("listing {}", self.dir.display())),
        };
        let mut partials = Vec::new();
        for entry in entries {
            let entry = entry.with_context(|| format!("listing {}", self.dir.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(PARTIAL) {
                partials.push(name);
            }
        }
        let keep = |name: &str| -> bool {
            let Some(hex) = name.strip_prefix(PARTIAL) else {
                return false;
            };
            let hex = hex.strip_suffix(SOURCE).unwrap_or(hex);
            let Ok(digest) = Sha256::from_hex(hex) else {
                return false;
            };
            let data = self.dir.join(format!("{PARTIAL}{hex}"));
            let fresh = fs::symlink_metadata(&data)
                .ok()
                .filter(|m| m.file_type().is_file())
                .and_then(|m| m.modified().ok())
                .is_some_and(|t| now.duration_since(t).unwrap_or_default() < RESUME_MAX_AGE);
            let source = self.dir.join(format!("{PARTIAL}{hex}{SOURCE}"));
            fresh && source.is_file() && !self.contains(&digest)
        };
        let (mut files, mut bytes) = (0, 0);
        for name in partials.iter().filter(|name| !keep(name)) {
            let path = self.dir.join(name);
            let len = fs::symlink_metadata(&path).map(|m| m.len()).unwrap_or(0);
            match fs::remove_file(&path) {
                Ok(()) => {
                    files += 1;
                    bytes += len;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("removing {}", path.display()));
                }
            }
        }
        Ok((files, bytes))
    }

    /// Stores `bytes`, after checking them against `expected` when given.
    pub fn put_bytes(&self, bytes: &[u8], expected: Option<&Sha256>) -> anyhow::Result<Blob> {
        let mut writer = self.writer()?;
        writer
            .write_all(bytes)
            .with_context(|| format!("writing {}", writer.path.display()))?;
        writer.commit(expected, Some(bytes.len() as u64))
    }
}

/// The prefix of every temp file in a blob directory.
const PARTIAL: &str = ".partial-";
/// The suffix of a resumable partial's source record.
const SOURCE: &str = ".source";
/// How long a resumable partial is kept for a run that fetches the same file again.
pub const RESUME_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// The validator recorded in a source record (`URL\nVALIDATOR\n`), if it is for `url`.
fn earlier_validator(record: &str, url: &str) -> Option<String> {
    let mut lines = record.lines();
    let (recorded_url, validator) = (lines.next()?, lines.next()?);
    (recorded_url == url && !validator.is_empty()).then(|| validator.to_owned())
}

fn remove_if_present(path: &Path) -> anyhow::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Feeds what is copied into it to a hasher.
struct HashWriter<'a>(&'a mut sha2::Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A blob being written: a temp file beside the blobs, hashed as it is filled.
pub struct BlobWriter {
    file: fs::File,
    path: PathBuf,
    hasher: sha2::Sha256,
    size: u64,
    dir: PathBuf,
    /// Set for a resumable partial ([`BlobDir::resumable_writer`]).
    resume: Option<Resume>,
    /// Committed or discarded: nothing left to clean up.
    done: bool,
}

/// Where a resumable partial records what it is a download of.
struct Resume {
    /// `.partial-<hex>.source`: the URL and the validator of the answer being written.
    source: PathBuf,
    url: String,
    /// The validator an earlier run recorded for the bytes it left.
    earlier: Option<String>,
    /// The source record describes the bytes written: they can be resumed.
    recorded: bool,
}

impl BlobWriter {
    /// Bytes written since the start (or the last restart), including those an earlier run
    /// left in a resumable partial.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The sha256 of the bytes written so far.
    pub fn sha256(&self) -> Sha256 {
        Sha256(self.hasher.clone().finalize().into())
    }

    /// What an earlier, interrupted run left for this download: the bytes held (already in the
    /// hash) and the validator (`ETag` or `Last-Modified`) of the answer they came from, for
    /// `Range` + `If-Range`. `None` for a fresh writer.
    pub fn resumable(&self) -> Option<(u64, String)> {
        let earlier = self.resume.as_ref()?.earlier.clone()?;
        (self.size > 0).then_some((self.size, earlier))
    }

    /// A body starts from byte 0 with this validator: recorded, so that a later run can resume
    /// it (without a validator it cannot, safely). A no-op for plain temp files.
    pub fn begin(&mut self, validator: Option<&str>) -> io::Result<()> {
        let Some(resume) = &mut self.resume else {
            return Ok(());
        };
        resume.earlier = None;
        resume.recorded = validator.is_some();
        match validator {
            Some(validator) => {
                let record = format!("{}\n{validator}\n", resume.url);
                crate::store::atomic_write(&resume.source, record.as_bytes())
                    .map_err(io::Error::other)
            }
            None => match fs::remove_file(&resume.source) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        }
    }

    /// Drops everything written so far, e.g. when a server ignores a range request and sends
    /// the file again from byte 0.
    pub fn restart(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.rewind()?;
        self.hasher = sha2::Sha256::new();
        self.size = 0;
        if let Some(resume) = &mut self.resume {
            resume.earlier = None;
        }
        Ok(())
    }

    /// Makes the written bytes the blob they hash to, if they are what the caller expects:
    /// `expected` (a pinned digest; `None` adopts whatever was written) and `expected_size`.
    /// On a mismatch the temp file (resumable or not) is deleted and nothing becomes visible.
    pub fn commit(
        mut self,
        expected: Option<&Sha256>,
        expected_size: Option<u64>,
    ) -> anyhow::Result<Blob> {
        let (actual, size) = (self.sha256(), self.size);
        if let Some(expected_size) = expected_size
            && size != expected_size
        {
            self.discard();
            bail!("expected {expected_size} bytes, got {size}; nothing was stored");
        }
        if let Some(expected) = expected
            && *expected != actual
        {
            self.discard();
            bail!(
                "expected sha256 {expected}, got sha256 {actual} ({size} bytes); nothing was stored"
            );
        }
        let path = self.dir.join(actual.hex());
        self.file
            .flush()
            .and_then(|()| self.file.sync_all())
            .and_then(|()| fs::set_permissions(&self.path, fs::Permissions::from_mode(0o444)))
            .with_context(|| format!("syncing {}", self.path.display()))?;
        fs::rename(&self.path, &path)
            .with_context(|| format!("moving a verified blob to {}", path.display()))?;
        self.done = true;
        if let Some(resume) = &self.resume {
            remove_if_present(&resume.source)?;
        }
        sync_dir(&self.dir)?;
        Ok(Blob {
            sha256: actual,
            size,
            path,
        })
    }

    /// Deletes the temp file and its source record: its content is not worth resuming.
    fn discard(&mut self) {
        self.done = true;
        let _ = fs::remove_file(&self.path);
        if let Some(resume) = &self.resume {
            let _ = fs::remove_file(&resume.source);
        }
    }
}

impl Drop for BlobWriter {
    /// An uncommitted temp file goes; a resumable partial with bytes worth resuming (and the
    /// validator to resume them safely) stays for the next run.
    fn drop(&mut self) {
        let worth_resuming = self.resume.as_ref().is_some_and(|r| r.recorded) && self.size > 0;
        if !self.done && !worth_resuming {
            self.discard();
        }
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
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
