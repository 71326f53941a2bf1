//! Writing into a store: nothing becomes visible unverified, and writers take turns.
//!
//! Every blob goes through a [`BlobDir`] (the same one the OCI cache uses): written to a temp
//! file in the blobs directory (same filesystem) while it is hashed, fsynced, checked against
//! its expected digest and size, made read-only, renamed into place, and the directory fsynced. A crash at any point leaves either no blob or a whole one. Named links are
//! replaced by renaming a fresh symlink over them. An advisory lock on `.lock` serializes
//! concurrent `cargo xtask artifacts` runs on one data dir; the writer holding it removes the
//! temp files interrupted runs left, except the downloads it can resume.

mod atomic;
mod blob_dir;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use system::hash::sha256_reader;
use system::stamp::FileStamp;
use system::{Layout, Sha256};

pub use atomic::{atomic_write, sync_dir};
pub use blob_dir::{Blob, BlobDir, BlobWriter};

/// Exclusive write access to one store, for as long as it lives.
pub struct StoreWriter {
    layout: Layout,
    blobs: BlobDir,
    _lock: File,
}

impl StoreWriter {
    /// Creates the store's directories under `data_dir` and takes the writer lock, waiting for
    /// another writer to finish if there is one.
    pub fn open(data_dir: &Path) -> anyhow::Result<StoreWriter> {
        let layout = Layout::new(data_dir);
        let blobs = BlobDir::create(&layout.blobs())
            .with_context(|| format!("creating the store at {}", layout.root().display()))?;
        let lock_path = layout.writer_lock();
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("opening the writer lock {}", lock_path.display()))?;
        if lock.try_lock().is_err() {
            eprintln!(
                "waiting for another writer of {} to finish",
                layout.root().display()
            );
            lock.lock()
                .with_context(|| format!("locking {}", lock_path.display()))?;
        }
        let store = StoreWriter {
            layout,
            blobs,
            _lock: lock,
        };
        store.remove_stale_partials()?;
        Ok(store)
    }

    /// Removes the temp files interrupted runs left (a killed download, a crash before a
    /// rename): with the writer lock held, no other writer can be using them. Resumable
    /// downloads are kept for the run that fetches the same file again.
    fn remove_stale_partials(&self) -> anyhow::Result<()> {
        let oci = self.layout.oci_cache();
        let dirs = [
            self.layout.blobs(),
            self.layout.root().to_path_buf(),
            self.layout.root().join(".verified"),
            oci.join("blobs/sha256"),
            oci,
        ];
        let now = std::time::SystemTime::now();
        for dir in dirs {
            let (files, bytes) = BlobDir::new(&dir).remove_stale_partials(now)?;
            if files > 0 {
                eprintln!(
                    "removed {files} temp file(s) ({bytes} bytes) that interrupted runs left in {}",
                    dir.display()
                );
            }
        }
        Ok(())
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Whether a blob with this digest is present and its content matches. A blob that is not
    /// a regular file (a symlink, even to identical content; a fifo) or whose content does not
    /// match (bit rot, tampering) is corrupt: it is removed so that it is written again. A
    /// verified blob is made read-only (a file copied in by hand for `--offline` arrives
    /// writable). A blob that is unchanged since an earlier run hashed it (same [`FileStamp`])
    /// is not hashed again.
    pub fn has_verified_blob(&self, digest: &Sha256, size: Option<u64>) -> anyhow::Result<bool> {
        let path = self.layout.blob(digest);
        let meta = match fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e).with_context(|| format!("inspecting {}", path.display())),
        };
        if !meta.file_type().is_file() {
            // Checked before opening: opening a fifo would block, and a symlink would be followed.
            self.remove_corrupt(digest, &format!("it is {}", not_a_file(&path, &meta)))?;
            return Ok(false);
        }
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let mut stamp = FileStamp::of(&file.metadata()?);
        let size_ok = |len: u64| size.is_none_or(|s| s == len);
        if size_ok(stamp.size()) && self.recorded_stamp(digest) == Some(stamp) {
            return Ok(true);
        }
        let (actual, len) =
            sha256_reader(file).with_context(|| format!("hashing {}", path.display()))?;
        if actual != *digest || !size_ok(len) {
            self.remove_corrupt(
                digest,
                &format!("its content hashes to {actual} ({len} bytes)"),
            )?;
            return Ok(false);
        }
        if meta.permissions().mode() & 0o222 != 0 {
            // A blob someone else owns may refuse: its content is right, so only warn.
            match fs::set_permissions(&path, fs::Permissions::from_mode(0o444)) {
                // The mode change is a metadata change: stamp the file as it is now.
                Ok(()) => stamp = FileStamp::of(&fs::metadata(&path)?),
                Err(e) => eprintln!(
                    "warning: could not make the verified blob {} read-only ({e}); blobs are \
                     meant to be immutable: `chmod a-w` it",
                    path.display()
                ),
            }
        }
        self.record_stamp(digest, &stamp)?;
        Ok(true)
    }

    /// Removes a blob found corrupt (`why`), and its verification record.
    fn remove_corrupt(&self, digest: &Sha256, why: &str) -> anyhow::Result<()> {
        let path = self.layout.blob(digest);
        let _ = fs::remove_file(self.layout.verified_stamp(digest));
        if fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            // Never delete a tree we did not write: the user decides what it is.
            bail!(
                "{} is a directory where a blob belongs; move it away and run again",
                path.display()
            );
        }
        eprintln!(
            "removing corrupt blob {}: {why}; it will be fetched or built again",
            path.display()
        );
        fs::remove_file(&path)
            .with_context(|| format!("removing the corrupt blob {}", path.display()))
    }

    /// The blob directory (`blobs/sha256/`).
    pub fn blobs(&self) -> &BlobDir {
        &self.blobs
    }

    /// A temp file beside the blobs to stream one into; hand it back to
    /// [`StoreWriter::commit`].
    pub fn blob_writer(&self) -> anyhow::Result<BlobWriter> {
        self.blobs.writer()
    }

    /// A writer for the blob `digest` downloaded from `url` that a later run can resume when
    /// this one is interrupted ([`BlobDir::resumable_writer`]).
    pub fn resumable_blob_writer(&self, digest: &Sha256, url: &str) -> anyhow::Result<BlobWriter> {
        self.blobs.resumable_writer(digest, url)
    }

    /// Makes what `writer` received a visible blob, if it is `expected` (and `expected_size`
    /// long, when given); `None` adopts the digest of whatever was written (pinning a new
    /// input). The content was hashed while it was written, so it is not read again. `what`
    /// names the blob in errors.
    pub fn commit(
        &self,
        writer: BlobWriter,
        expected: Option<&Sha256>,
        expected_size: Option<u64>,
        what: &str,
    ) -> anyhow::Result<Blob> {
        let blob = writer
            .commit(expected, expected_size)
            .map_err(|e| anyhow::anyhow!("{what}: {e:#} (in {})", self.blobs.dir().display()))?;
        // Its content was just checked: record that, so the next run need not hash it again.
        self.record_stamp(&blob.sha256, &FileStamp::of(&fs::metadata(&blob.path)?))?;
        Ok(blob)
    }

    /// Stores bytes whose digest the caller has not pinned (a freshly built initrd). Returns
    /// its digest, size and path.
    pub fn put_bytes(&self, bytes: &[u8]) -> anyhow::Result<(Sha256, u64, PathBuf)> {
        let digest = system::hash::sha256_bytes(bytes);
        let path = self.blobs.path(&digest);
        if self.has_verified_blob(&digest, Some(bytes.len() as u64))? {
            return Ok((digest, bytes.len() as u64, path));
        }
        let mut writer = self.blob_writer()?;
        writer.write_all(bytes).context("writing a blob")?;
        let blob = self.commit(writer, Some(&digest), Some(bytes.len() as u64), "a blob")?;
        Ok((blob.sha256, blob.size, blob.path))
    }

    fn recorded_stamp(&self, digest: &Sha256) -> Option<FileStamp> {
        let text = fs::read_to_string(self.layout.verified_stamp(digest)).ok()?;
        FileStamp::parse(&text)
    }

    /// Written after the hash: a crash in between only costs a re-hash on the next run.
    fn record_stamp(&self, digest: &Sha256, stamp: &FileStamp) -> anyhow::Result<()> {
        let path = self.layout.verified_stamp(digest);
        let dir = path.parent().context("a stamp has a parent directory")?;
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        atomic_write(&path, stamp.to_line().as_bytes())
            .with_context(|| format!("recording {}", path.display()))
    }

    /// Points the named link `link` (e.g. `kernel/<v>/<arch>/vmlinux`) at the blob `digest`,
    /// atomically: a reader sees the old target or the new one, never no link.
    pub fn link(&self, link: &Path, digest: &Sha256) -> anyhow::Result<()> {
        let dir = link
            .parent()
            .context("a named link has a parent directory")?;
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let target = Layout::link_target(digest);
        if fs::read_link(link).is_ok_and(|current| current == target) {
            return Ok(());
        }
        let temp = dir.join(format!(".link-{}", std::process::id()));
        let _ = fs::remove_file(&temp);
        symlink(&target, &temp).with_context(|| format!("creating {}", temp.display()))?;
        fs::rename(&temp, link).with_context(|| format!("replacing {}", link.display()))?;
        sync_dir(dir)
    }
}

/// What a non-regular file at `path` is, for messages: `a symlink to /x`, `a directory`.
fn not_a_file(path: &Path, meta: &fs::Metadata) -> String {
    let kind = meta.file_type();
    if kind.is_symlink() {
        match fs::read_link(path) {
            Ok(target) => format!("a symlink to {}, not a regular file", target.display()),
            Err(_) => "a symlink, not a regular file".to_owned(),
        }
    } else if kind.is_dir() {
        "a directory, not a regular file".to_owned()
    } else {
        "a special file (fifo, socket or device), not a regular file".to_owned()
    }
}

/// A store in a fresh temp dir, for tests; the dir lives as long as the returned guard.
#[cfg(test)]
pub fn temp_store() -> (tempfile::TempDir, StoreWriter) {
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let store = StoreWriter::open(dir.path()).expect("opening a store in a temp dir");
    (dir, store)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrong_blob_never_becomes_visible() {
        let dir = tempfile::tempdir().unwrap();
        let store = StoreWriter::open(dir.path()).unwrap();
        let mut writer = store.blob_writer().unwrap();
        writer.write_all(b"not what was promised").unwrap();
        let promised = system::hash::sha256_bytes(b"what was promised");
        let err = store
            .commit(writer, Some(&promised), None, "kernel x")
            .unwrap_err();
        assert!(err.to_string().contains(&promised.hex()), "{err}");
        let left: Vec<_> = fs::read_dir(store.layout().blobs()).unwrap().collect();
        assert!(left.is_empty(), "blobs dir should be empty: {left:?}");
    }

    #[test]
    fn put_then_link_resolves_through_the_system_crate() {
        let dir = tempfile::tempdir().unwrap();
        let store = StoreWriter::open(dir.path()).unwrap();
        let (digest, size, path) = store.put_bytes(b"initrd bytes").unwrap();
        assert_eq!(size, 12);
        assert_eq!(fs::read(&path).unwrap(), b"initrd bytes");
        let link = store.layout().initrd_link("v1", system::Arch::X86_64);
        store.link(&link, &digest).unwrap();
        assert_eq!(
            fs::canonicalize(&link).unwrap(),
            fs::canonicalize(&path).unwrap()
        );
        // Relinking to the same blob is a no-op; to another blob replaces the link.
        store.link(&link, &digest).unwrap();
        let (other, _, other_path) = store.put_bytes(b"other").unwrap();
        store.link(&link, &other).unwrap();
        assert_eq!(
            fs::canonicalize(&link).unwrap(),
            fs::canonicalize(other_path).unwrap()
        );
    }

    #[test]
    fn a_corrupt_blob_is_removed_and_reported_absent() {
        let dir = tempfile::tempdir().unwrap();
        let store = StoreWriter::open(dir.path()).unwrap();
        let (digest, _, path) = store.put_bytes(b"good").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&path, b"evil").unwrap();
        assert!(!store.has_verified_blob(&digest, None).unwrap());
        assert!(!path.exists());
    }

    #[test]
    fn a_blob_hashed_by_an_earlier_run_is_not_hashed_again_while_unchanged() {
        let (_dir, store) = temp_store();
        let (digest, size, path) = store.put_bytes(b"kernel").unwrap();
        let stamp = store.layout().verified_stamp(&digest);
        assert!(stamp.exists(), "publishing records the verification");

        // Proof that the record is what decides: a blob rewritten to wrong content, with its
        // record forged to the new stamp, is trusted without hashing.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&path, b"KERNEL").unwrap();
        let forged = FileStamp::of(&fs::metadata(&path).unwrap());
        fs::write(&stamp, forged.to_line()).unwrap();
        assert!(store.has_verified_blob(&digest, Some(size)).unwrap());

        // Without a matching record the content is hashed, found wrong and removed.
        fs::write(&stamp, "0 0 0 0 0 0 0").unwrap();
        assert!(!store.has_verified_blob(&digest, Some(size)).unwrap());
        assert!(!path.exists() && !stamp.exists());
    }

    #[test]
    fn a_blob_that_is_a_symlink_is_corrupt_and_replaced() {
        let (dir, store) = temp_store();
        let (digest, _, path) = store.put_bytes(b"kernel").unwrap();
        // Identical content, but outside the store: the runtime would refuse it.
        let outside = dir.path().join("copy-of-kernel");
        fs::write(&outside, b"kernel").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        fs::remove_file(&path).unwrap();
        symlink(&outside, &path).unwrap();

        assert!(!store.has_verified_blob(&digest, Some(6)).unwrap());
        assert!(
            fs::symlink_metadata(&path).is_err(),
            "the symlink is removed"
        );
        assert_eq!(
            fs::read(&outside).unwrap(),
            b"kernel",
            "its target is left alone"
        );
        assert!(!store.blobs().contains(&digest));

        let (_, _, again) = store.put_bytes(b"kernel").unwrap();
        let meta = fs::symlink_metadata(&again).unwrap();
        assert!(meta.file_type().is_file() && meta.permissions().readonly());
    }

    #[test]
    fn a_blob_copied_in_by_hand_is_made_read_only_once_verified() {
        let (_dir, store) = temp_store();
        let digest = system::hash::sha256_bytes(b"copied kernel");
        let path = store.layout().blob(&digest);
        fs::write(&path, b"copied kernel").unwrap();
        assert!(!fs::metadata(&path).unwrap().permissions().readonly());

        assert!(store.has_verified_blob(&digest, Some(13)).unwrap());
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o444, "mode {mode:o}");
        // The record matches the file as it is now, so the next run does not hash it again.
        let stamp = FileStamp::of(&fs::metadata(&path).unwrap());
        assert_eq!(store.recorded_stamp(&digest), Some(stamp));
    }

    #[test]
    fn a_directory_where_a_blob_belongs_is_reported_not_deleted() {
        let (_dir, store) = temp_store();
        let digest = system::hash::sha256_bytes(b"k");
        let path = store.layout().blob(&digest);
        fs::create_dir(&path).unwrap();
        fs::write(path.join("keep"), b"user data").unwrap();
        let err = store
            .has_verified_blob(&digest, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("directory") && err.contains(&digest.hex()),
            "{err}"
        );
        assert!(path.join("keep").exists());
    }

    #[test]
    fn opening_a_store_removes_what_interrupted_runs_left_but_keeps_resumable_downloads() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let blobs = layout.blobs();
        fs::create_dir_all(&blobs).unwrap();
        fs::create_dir_all(layout.root().join(".verified")).unwrap();
        let partial = |name: &str| blobs.join(format!(".partial-{name}"));
        let resumable = |content: &[u8]| {
            let hex = system::hash::sha256_bytes(content).hex();
            fs::write(partial(&hex), &content[..4]).unwrap();
            fs::write(partial(&format!("{hex}.source")), "http://h/k\n\"e\"\n").unwrap();
            hex
        };
        // A killed plain writer, a killed atomic write of a stamp and of the lock copy.
        fs::write(partial("Xy12ab"), vec![0u8; 1000]).unwrap();
        fs::write(layout.root().join(".verified/.partial-Qw34cd"), "0 0").unwrap();
        fs::write(layout.root().join(".partial-Er56ef"), "{").unwrap();
        let wanted = resumable(b"a kernel still wanted");
        let done = resumable(b"a kernel fetched since");
        fs::write(blobs.join(&done), b"a kernel fetched since").unwrap();
        let old = resumable(b"a kernel nobody fetched for weeks");
        let weeks_ago = std::time::SystemTime::now() - blob_dir::RESUME_MAX_AGE * 2;
        File::options()
            .write(true)
            .open(partial(&old))
            .unwrap()
            .set_modified(weeks_ago)
            .unwrap();
        let unrecorded = system::hash::sha256_bytes(b"no source record").hex();
        fs::write(partial(&unrecorded), b"no s").unwrap();

        let store = StoreWriter::open(dir.path()).unwrap();
        let mut left: Vec<String> = fs::read_dir(store.layout().blobs())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let mut expected = vec![
            done.clone(),
            format!(".partial-{wanted}"),
            format!(".partial-{wanted}.source"),
        ];
        expected.sort();
        assert_eq!(left, expected);
        assert!(!layout.root().join(".verified/.partial-Qw34cd").exists());
        assert!(!layout.root().join(".partial-Er56ef").exists());
    }
}
