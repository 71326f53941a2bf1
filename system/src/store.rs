//! A host's view of a store: verified paths of the lock's kernels and initrds.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::arch::Arch;
use crate::error::{Artifact, Error, Kind};
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
    verified: Mutex<HashMap<PathBuf, (FileStamp, Sha256)>>,
    files_hashed: AtomicU64,
}

impl Store {
    /// Opens the store under `data_dir` for the lock this crate was built with.
    pub fn open(data_dir: impl AsRef<Path>) -> Store {
        Store::with_lock(data_dir, crate::embedded_lock().clone())
    }

    /// Opens the store under `data_dir` for another lock (tests, tools that read a lock file).
    pub fn with_lock(data_dir: impl AsRef<Path>, lock: Lock) -> Store {
        Store {
            layout: Layout::new(&data_dir),
            data_dir: data_dir.as_ref().to_path_buf(),
            lock,
            verified: Mutex::new(HashMap::new()),
            files_hashed: AtomicU64::new(0),
        }
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
        } else {
            // A copied store (`cp -L`) holds plain files: their content still has to match.
            link.to_path_buf()
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
            return Err(Error::WrongSize {
                artifact: artifact.clone(),
                path: blob,
                expected: expected_size,
                actual: stamp.size(),
            });
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
            return Err(Error::Corrupt {
                artifact: artifact.clone(),
                path: blob,
                expected: *expected,
                actual,
            });
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
