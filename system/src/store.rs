//! A host's view of a store: verified paths of the lock's kernels and initrds.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use crate::arch::Arch;
use crate::error::{Artifact, Error, Kind, LockMismatch};
use crate::hash::sha256_reader;
use crate::layout::Layout;
use crate::lock::{Lock, Sha256};
use crate::stamp::FileStamp;
use crate::version::{InitrdVersion, KernelVersion};

/// How much to trust earlier verifications.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Re-hash only files whose identity (device, inode, size, mtime, ctime) changed since they
    /// were last verified by this `Store`.
    Cached,
    /// Re-hash every file.
    Full,
}

/// The verified artifacts of a store, for one lock.
///
/// Resolving never downloads or builds: it returns the path of a blob whose content matches the
/// lock, or an error that says what is wrong and how to fix it.
#[derive(Debug)]
pub struct Store {
    layout: Layout,
    data_dir: PathBuf,
    lock: Lock,
    origin: LockOrigin,
    verified: Mutex<HashMap<PathBuf, (FileStamp, Sha256)>>,
    files_hashed: AtomicU64,
}

impl Store {
    /// Opens the store under `data_dir` for the lock this crate was built with.
    pub fn open(data_dir: impl AsRef<Path>) -> Store {
        let modified = crate::EMBEDDED_LOCK_MODIFIED
            .map(|secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
        Store::with_lock(data_dir, crate::embedded_lock().clone())
            .with_lock_origin(crate::EMBEDDED_LOCK_PATH, modified)
    }

    /// Opens the store under `data_dir` for another lock (tests, tools that read a lock file).
    pub fn with_lock(data_dir: impl AsRef<Path>, lock: Lock) -> Store {
        Store {
            layout: Layout::new(&data_dir),
            data_dir: data_dir.as_ref().to_path_buf(),
            lock,
            origin: LockOrigin {
                path: None,
                modified: None,
            },
            verified: Mutex::new(HashMap::new()),
            files_hashed: AtomicU64::new(0),
        }
    }

    /// Where this store's lock came from (a file path) and when it was last modified, for the
    /// errors that compare it with the store's own copy of the lock.
    pub fn with_lock_origin(
        mut self,
        path: impl Into<String>,
        modified: Option<SystemTime>,
    ) -> Store {
        self.origin = LockOrigin {
            path: Some(path.into()),
            modified,
        };
        self
    }

    /// How many times this store has hashed a file: what the verification cache saves.
    pub fn files_hashed(&self) -> u64 {
        self.files_hashed.load(Ordering::Relaxed)
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn lock(&self) -> &Lock {
        &self.lock
    }

    /// The verified kernel image of `version` for `arch`.
    pub fn kernel_path(&self, version: &KernelVersion, arch: Arch) -> Result<PathBuf, Error> {
        self.kernel(version.as_str(), arch, Check::Cached)
    }

    /// The verified initrd of `version` for `arch`.
    pub fn initrd_path(&self, version: &InitrdVersion, arch: Arch) -> Result<PathBuf, Error> {
        self.initrd(version.as_str(), arch, Check::Cached)
    }

    /// Verifies every artifact the lock names, for every arch, and reports all problems at once.
    pub fn verify_all(&self, check: Check) -> Result<Vec<PathBuf>, Error> {
        self.verify_where(check, |_| true)
    }

    /// Verifies every artifact the lock names for one arch, reporting all problems at once.
    pub fn verify_arch(&self, arch: Arch, check: Check) -> Result<Vec<PathBuf>, Error> {
        self.verify_where(check, |a| a == arch)
    }

    fn verify_where(
        &self,
        check: Check,
        wanted: impl Fn(Arch) -> bool,
    ) -> Result<Vec<PathBuf>, Error> {
        let mut verified = Vec::new();
        let mut problems = Vec::new();
        let kernels = self.lock.kernels.iter().flat_map(|(version, files)| {
            files
                .keys()
                .map(move |arch| (Kind::Kernel, version.as_str(), *arch))
        });
        let initrds = self.lock.initrds.iter().flat_map(|(version, initrd)| {
            initrd
                .outputs
                .keys()
                .map(move |arch| (Kind::Initrd, version.as_str(), *arch))
        });
        for (kind, version, arch) in kernels.chain(initrds).filter(|(_, _, arch)| wanted(*arch)) {
            let result = match kind {
                Kind::Kernel => self.kernel(version, arch, check),
                Kind::Initrd => self.initrd(version, arch, check),
            };
            match result {
                Ok(path) => verified.push(path),
                Err(e) => problems.push(e),
            }
        }
        if problems.is_empty() {
            Ok(verified)
        } else {
            Err(Error::Incomplete(problems))
        }
    }

    fn kernel(&self, version: &str, arch: Arch, check: Check) -> Result<PathBuf, Error> {
        let files = self
            .lock
            .kernels
            .get(version)
            .ok_or_else(|| Error::UnknownVersion {
                kind: Kind::Kernel,
                version: version.into(),
                known: names(self.lock.kernels.keys().map(|v| v.as_str())),
            })?;
        let file = files.get(&arch).ok_or_else(|| Error::ArchNotPinned {
            kind: Kind::Kernel,
            version: version.into(),
            arch,
            pinned: names(files.keys().map(|a| a.as_str())),
        })?;
        let artifact = Artifact {
            kind: Kind::Kernel,
            version: version.into(),
            arch,
        };
        let link = self.layout.kernel_link(version, arch);
        self.resolve(&artifact, &link, &file.sha256, file.size, check)
    }

    fn initrd(&self, version: &str, arch: Arch, check: Check) -> Result<PathBuf, Error> {
        let initrd = self
            .lock
            .initrds
            .get(version)
            .ok_or_else(|| Error::UnknownVersion {
                kind: Kind::Initrd,
                version: version.into(),
                known: names(self.lock.initrds.keys().map(|v| v.as_str())),
            })?;
        let artifact = Artifact {
            kind: Kind::Initrd,
            version: version.into(),
            arch,
        };
        let output = initrd.outputs.get(&arch).ok_or_else(|| Error::NotBuilt {
            artifact: artifact.clone(),
        })?;
        let link = self.layout.initrd_link(version, arch);
        self.resolve(&artifact, &link, &output.sha256, Some(output.size), check)
    }

    /// Follows a named link to its blob, confines it to the store, and checks its content.
    fn resolve(
        &self,
        artifact: &Artifact,
        link: &Path,
        expected: &Sha256,
        size: Option<u64>,
        check: Check,
    ) -> Result<PathBuf, Error> {
        let io_error = |path: &Path, source: io::Error| Error::Io {
            artifact: artifact.clone(),
            path: path.to_path_buf(),
            source,
        };
        let link_meta = match fs::symlink_metadata(link) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::Missing {
                    artifact: artifact.clone(),
                    path: link.to_path_buf(),
                    data_dir: self.data_dir.clone(),
                });
            }
            Err(e) => return Err(io_error(link, e)),
        };
        let blob = if link_meta.file_type().is_symlink() {
            self.confine(artifact, link)?
        } else if link_meta.file_type().is_file() {
            // A copied store (`cp -L`) holds plain files: their content still has to match.
            link.to_path_buf()
        } else {
            return Err(self.not_a_file(artifact, link, &link_meta));
        };

        let file = match File::open(&blob) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::Missing {
                    artifact: artifact.clone(),
                    path: blob,
                    data_dir: self.data_dir.clone(),
                });
            }
            Err(e) => return Err(io_error(&blob, e)),
        };
        // Stamp the open file, not the path, so what we hash is what we stamped.
        let stamp = FileStamp::of(&file.metadata().map_err(|e| io_error(&blob, e))?);
        if let Some(expected_size) = size
            && stamp.size() != expected_size
        {
            return Err(self.mismatch(Error::WrongSize {
                artifact: artifact.clone(),
                path: blob,
                expected: expected_size,
                actual: stamp.size(),
            }));
        }
        if check == Check::Cached && self.cached(&blob) == Some((stamp, *expected)) {
            return Ok(blob);
        }

        let (actual, _) = sha256_reader(file).map_err(|e| io_error(&blob, e))?;
        self.files_hashed.fetch_add(1, Ordering::Relaxed);
        if actual != *expected {
            self.verified
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&blob);
            return Err(self.mismatch(Error::Corrupt {
                artifact: artifact.clone(),
                path: blob,
                expected: *expected,
                actual,
            }));
        }
        self.verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(blob.clone(), (stamp, actual));
        Ok(blob)
    }

    fn cached(&self, blob: &Path) -> Option<(FileStamp, Sha256)> {
        self.verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(blob)
            .copied()
    }

    /// The blob a named link points to, refused unless it lies in `blobs/sha256/` of this store
    /// both as written and after every symlink on the way is resolved.
    fn confine(&self, artifact: &Artifact, link: &Path) -> Result<PathBuf, Error> {
        let escapes = |target: PathBuf| Error::LinkEscapes {
            artifact: artifact.clone(),
            link: link.to_path_buf(),
            target,
        };
        let target = fs::read_link(link).map_err(|e| Error::Io {
            artifact: artifact.clone(),
            path: link.to_path_buf(),
            source: e,
        })?;
        let parent = link.parent().unwrap_or(Path::new("/"));
        let lexical = normalize(&parent.join(&target));
        if !lexical.starts_with(normalize(&self.layout.blobs())) {
            return Err(escapes(target));
        }
        // The link is fine; the blob it names must be the file itself. A symlink in its place
        // (even to identical content) is the blob's fault, not the link's.
        if let Ok(meta) = fs::symlink_metadata(&lexical)
            && !meta.file_type().is_file()
        {
            return Err(self.not_a_file(artifact, &lexical, &meta));
        }
        match (
            fs::canonicalize(&lexical),
            fs::canonicalize(self.layout.blobs()),
        ) {
            (Ok(real), Ok(blobs)) if real.starts_with(&blobs) => Ok(real),
            (Ok(_), Ok(_)) => Err(escapes(target)),
            // A dangling link: report the blob it should lead to as missing.
            _ => Ok(lexical),
        }
    }
}

impl Store {
    fn not_a_file(&self, artifact: &Artifact, path: &Path, meta: &fs::Metadata) -> Error {
        let kind = meta.file_type();
        let found = if kind.is_symlink() {
            match fs::read_link(path) {
                Ok(target) => format!("a symlink to {}", target.display()),
                Err(_) => "a symlink".to_owned(),
            }
        } else if kind.is_dir() {
            "a directory".to_owned()
        } else {
            "a special file (fifo, socket or device)".to_owned()
        };
        Error::NotAFile {
            artifact: artifact.clone(),
            path: path.to_path_buf(),
            found,
            data_dir: self.data_dir.clone(),
        }
    }

    /// A blob that does not match this store's lock is corrupt, unless the store was filled
    /// from a lock that pins this very blob for the artifact: then the locks differ, and the
    /// error says where and which lock is newer instead of blaming the blob.
    fn mismatch(&self, corrupt: Error) -> Error {
        let (artifact, path, actual) = match &corrupt {
            Error::Corrupt {
                artifact,
                path,
                actual,
                ..
            } => (artifact, path, *actual),
            Error::WrongSize { artifact, path, .. } => {
                // Only worth a hash when the store's lock could explain the size.
                let Some(actual) = File::open(path)
                    .and_then(sha256_reader)
                    .ok()
                    .map(|(digest, _)| digest)
                else {
                    return corrupt;
                };
                self.files_hashed.fetch_add(1, Ordering::Relaxed);
                (artifact, path, actual)
            }
            _ => return corrupt,
        };
        let store_lock = self.layout.lock_file();
        let Some(theirs) = fs::read_to_string(&store_lock)
            .ok()
            .and_then(|text| Lock::parse(&text).ok())
        else {
            return corrupt;
        };
        let (Some(ours), Some(theirs)) =
            (Pin::of(&self.lock, artifact), Pin::of(&theirs, artifact))
        else {
            return corrupt;
        };
        let len = fs::metadata(path).map(|m| m.len()).ok();
        if theirs.sha256 != actual || theirs.size.is_some_and(|s| Some(s) != len) {
            // The blob matches neither lock: it really is corrupt.
            return corrupt;
        }
        let section = match artifact.kind {
            Kind::Kernel => "kernels",
            Kind::Initrd => "initrds",
        };
        let base = format!(
            "{section}.{}.{}",
            crate::lock::key(&artifact.version),
            artifact.arch
        );
        let (entry, ours_text, theirs_text) = if theirs.sha256 != ours.sha256 {
            (
                format!("{base}.sha256"),
                ours.sha256.to_string(),
                theirs.sha256.to_string(),
            )
        } else {
            let show = |s: Option<u64>| s.map_or("unset".to_owned(), |s| s.to_string());
            (format!("{base}.size"), show(ours.size), show(theirs.size))
        };
        let store_modified = fs::metadata(&store_lock).and_then(|m| m.modified()).ok();
        let newer = match (self.origin.modified, store_modified) {
            (Some(ours), Some(store)) if store > ours => format!(
                "the store's lock is newer (written {}, this program's lock modified {})",
                utc(store),
                utc(ours)
            ),
            (Some(ours), Some(store)) if ours > store => format!(
                "this program's lock is newer (modified {}, the store's written {})",
                utc(ours),
                utc(store)
            ),
            (Some(_), Some(_)) => "both locks have the same modification time".to_owned(),
            _ => "which one is newer is unknown (no modification time for this program's lock)"
                .to_owned(),
        };
        let next = format!(
            "rebuild this program with the store's lock (SYSTEM_ARTIFACTS_LOCK={}), or fill the \
             store for this program's lock with `cargo xtask artifacts --lock {} --data-dir {}`",
            store_lock.display(),
            self.origin.path.as_deref().unwrap_or("<that lock>"),
            self.data_dir.display()
        );
        Error::LockMismatch(Box::new(LockMismatch {
            artifact: artifact.clone(),
            root: self.layout.root().to_path_buf(),
            path: path.clone(),
            entry,
            ours: ours_text,
            theirs: theirs_text,
            store_lock,
            built_with: self
                .origin
                .path
                .clone()
                .unwrap_or_else(|| "a lock given to Store::with_lock".to_owned()),
            newer,
            next,
        }))
    }
}

/// Where a [`Store`]'s lock was read from, for messages.
#[derive(Debug, Clone)]
struct LockOrigin {
    /// `None` for a lock handed over in memory.
    path: Option<String>,
    modified: Option<SystemTime>,
}

/// What a lock pins for one artifact: the part a blob is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pin {
    sha256: Sha256,
    size: Option<u64>,
}

impl Pin {
    fn of(lock: &Lock, artifact: &Artifact) -> Option<Pin> {
        match artifact.kind {
            Kind::Kernel => lock
                .kernels
                .get(artifact.version.as_str())?
                .get(&artifact.arch)
                .map(|f| Pin {
                    sha256: f.sha256,
                    size: f.size,
                }),
            Kind::Initrd => lock
                .initrds
                .get(artifact.version.as_str())?
                .outputs
                .get(&artifact.arch)
                .map(|o| Pin {
                    sha256: o.sha256,
                    size: Some(o.size),
                }),
        }
    }
}

/// `2026-05-08 10:00:00 UTC`, without a date library (days to civil date, proleptic Gregorian).
fn utc(time: SystemTime) -> String {
    let secs = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rest / 3_600,
        rest % 3_600 / 60,
        rest % 60
    )
}

/// Removes `.` and resolves `..` lexically, without touching the filesystem.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

fn names<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let names: Vec<String> = names.map(|n| format!("`{n}`")).collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_civil_dates() {
        let at = |secs| utc(SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(at(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(at(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(at(1_778_234_400), "2026-05-08 10:00:00 UTC");
    }
}
