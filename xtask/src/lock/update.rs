//! Writing an edited lock back without losing anyone else's edit.
//!
//! Commands read the lock, work for minutes (downloads, builds), then write. Two of them at
//! once (`artifacts` and `lock add-kernel`, or two `artifacts` runs on different data dirs)
//! must not write back the copy they read and drop the other's change. So every write is a
//! read-modify-write under an exclusive advisory lock on a sibling file (`.<name>.lock`; not
//! the lock file itself, which an atomic write replaces, and not the store's lock, since a
//! command may have no store): the file is read again, this command's edit (`base → ours`) is
//! merged into what is there now, and the result replaces the file only if the file is still
//! the one just read.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use system::Lock;
use system::stamp::FileStamp;

use super::merge::{self, Conflict};

/// What an update found and left.
#[derive(Debug, Clone)]
pub struct Updated {
    /// The lock as it was on disk just before this update (another command may have changed
    /// it since this one read it).
    pub before: Lock,
    /// The lock as it is now.
    pub after: Lock,
}

impl Updated {
    /// Whether the file was rewritten.
    pub fn changed(&self) -> bool {
        self.before != self.after
    }

    /// The line diff of what this update did to the file.
    pub fn diff(&self) -> String {
        super::diff(&self.before.to_json(), &self.after.to_json())
    }
}

/// Writes the edit `base → ours` into the lock at `path`, where `base` is the lock as this
/// command read it. Changes others made since (new versions, recorded sizes, outputs) are kept;
/// a value both changed differently fails, naming it, and nothing is written.
pub fn update(path: &Path, base: &Lock, ours: &Lock) -> anyhow::Result<Updated> {
    let _guard = WriteGuard::acquire(path)?;
    let (text, stamp) = read_with_stamp(path)?;
    let before = Lock::parse(&text).with_context(|| format!("in {}", path.display()))?;
    let after = if before == *base {
        ours.clone()
    } else {
        merged(path, base, ours, &before)?
    };
    if after != before {
        // Another `cargo xtask` waits on the guard; this catches anything else (an editor).
        let now = fs::metadata(path).map(|m| FileStamp::of(&m)).ok();
        if now != Some(stamp) {
            bail!(
                "{} changed while it was being updated (by something that does not take {}); \
                 nothing was written: run the command again",
                path.display(),
                guard_path(path).display()
            );
        }
        super::write(path, &after)?;
    }
    Ok(Updated { before, after })
}

/// `ours` merged into `theirs`, validated as a whole (each side was valid, their union may
/// not be, e.g. two versions whose constants collide).
fn merged(path: &Path, base: &Lock, ours: &Lock, theirs: &Lock) -> anyhow::Result<Lock> {
    let value = |lock: &Lock| serde_json::to_value(lock).expect("a lock always serializes");
    let merged = merge::merge(&value(base), &value(ours), &value(theirs))
        .map_err(|conflict| conflict_error(path, &conflict))?;
    let text = serde_json::to_string(&merged).expect("a JSON value always serializes");
    Lock::parse(&text).with_context(|| {
        format!(
            "{} changed while this command ran, and its changes combined with this command's \
             do not validate; nothing was written: run the command again",
            path.display()
        )
    })
}

fn conflict_error(path: &Path, conflict: &Conflict) -> anyhow::Error {
    let show = |v: &Option<serde_json::Value>| match v {
        Some(v) => v.to_string(),
        None => "(removed)".to_owned(),
    };
    anyhow::anyhow!(
        "{} changed while this command ran, and both changed `{}`: this command has {}, the \
         file now has {}; nothing was written: review the file and run the command again",
        path.display(),
        conflict.path,
        show(&conflict.ours),
        show(&conflict.theirs)
    )
}

fn read_with_stamp(path: &Path) -> anyhow::Result<(String, FileStamp)> {
    let read = || -> std::io::Result<(String, FileStamp)> {
        let file = File::open(path)?;
        let stamp = FileStamp::of(&file.metadata()?);
        Ok((std::io::read_to_string(file)?, stamp))
    };
    read().with_context(|| format!("reading the lock {}", path.display()))
}

/// `.<name>.lock` beside the lock file.
fn guard_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "artifacts.lock".to_owned());
    path.with_file_name(format!(".{name}.lock"))
}

/// An exclusive advisory lock for writers of one lock file, released when dropped.
struct WriteGuard {
    _file: File,
}

impl WriteGuard {
    fn acquire(lock_path: &Path) -> anyhow::Result<WriteGuard> {
        let path = guard_path(lock_path);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        if file.try_lock().is_err() {
            eprintln!(
                "waiting for another command writing {} to finish",
                lock_path.display()
            );
            file.lock()
                .with_context(|| format!("locking {}", path.display()))?;
        }
        Ok(WriteGuard { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use system::lock::{KernelFile, UniqueMap, Version};
    use system::{Arch, Sha256};

    use super::*;

    fn committed() -> Lock {
        Lock::parse(include_str!("../../../artifacts.lock")).unwrap()
    }

    fn lock_file(lock: &Lock) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("artifacts.lock");
        super::super::write(&path, lock).unwrap();
        (dir, path)
    }

    fn with_kernel(lock: &Lock, version: &str, fill: u8) -> Lock {
        let mut lock = lock.clone();
        let mut files = UniqueMap::default();
        files.insert(
            Arch::X86_64,
            KernelFile {
                url: format!("https://example.org/{version}/vmlinux"),
                sha256: Sha256::from_hex(&format!("{fill:02x}").repeat(32)).unwrap(),
                size: Some(u64::from(fill)),
            },
        );
        lock.kernels.insert(Version::new(version).unwrap(), files);
        lock
    }

    #[test]
    fn an_edit_of_a_stale_copy_keeps_the_other_writers_change() {
        let base = committed();
        let (_dir, path) = lock_file(&base);
        // Two commands read the same lock; the first writes a new version.
        let first = with_kernel(&base, "ch-first", 1);
        update(&path, &base, &first).unwrap();
        // The second, still holding the copy it read, adds another.
        let second = with_kernel(&base, "ch-second", 2);
        let updated = update(&path, &base, &second).unwrap();

        let on_disk = crate::lock::read(&path).unwrap();
        assert!(on_disk.kernels.contains_key("ch-first"), "first lost");
        assert!(on_disk.kernels.contains_key("ch-second"), "second lost");
        assert_eq!(updated.after, on_disk);
        assert!(updated.before.kernels.contains_key("ch-first"));
        let diff = updated.diff();
        assert!(diff.contains("+    \"ch-second\"") && !diff.contains("+    \"ch-first\""));
    }

    #[test]
    fn racing_writers_all_land() {
        let base = committed();
        let (_dir, path) = lock_file(&base);
        let path = Arc::new(path);
        let writers: Vec<_> = (0..8u8)
            .map(|n| {
                let path = Arc::clone(&path);
                std::thread::spawn(move || {
                    // Each reads the file itself and writes through its own guard handle, as
                    // separate processes would.
                    let read = crate::lock::read(&path).unwrap();
                    let ours = with_kernel(&read, &format!("ch-race-{n}"), n + 1);
                    update(&path, &read, &ours).unwrap();
                })
            })
            .collect();
        for writer in writers {
            writer.join().unwrap();
        }
        let on_disk = crate::lock::read(&path).unwrap();
        for n in 0..8 {
            assert!(
                on_disk
                    .kernels
                    .contains_key(format!("ch-race-{n}").as_str()),
                "ch-race-{n} was lost"
            );
        }
    }

    #[test]
    fn conflicting_edits_fail_naming_the_entry_and_write_nothing() {
        let base = committed();
        let (_dir, path) = lock_file(&base);
        let theirs = with_kernel(&base, "ch-x", 1);
        update(&path, &base, &theirs).unwrap();
        let written = fs::read_to_string(&path).unwrap();

        let ours = with_kernel(&base, "ch-x", 2);
        let err = format!("{:#}", update(&path, &base, &ours).unwrap_err());
        assert!(err.contains("kernels.\"ch-x\".x86_64"), "{err}");
        assert!(err.contains("nothing was written"), "{err}");
        assert_eq!(fs::read_to_string(&path).unwrap(), written);
    }

    #[test]
    fn an_unchanged_edit_does_not_rewrite_the_file() {
        let base = committed();
        let (_dir, path) = lock_file(&base);
        let before = FileStamp::of(&fs::metadata(&path).unwrap());
        let updated = update(&path, &base, &base).unwrap();
        assert!(!updated.changed());
        assert_eq!(FileStamp::of(&fs::metadata(&path).unwrap()), before);
        assert!(guard_path(&path).ends_with(".artifacts.lock.lock"));
    }
}
