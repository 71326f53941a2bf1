//! What can go wrong when resolving an artifact, each error naming the artifact, the path, what
//! was expected and what to do next.

use std::fmt;
use std::path::PathBuf;

use crate::arch::Arch;
use crate::lock::Sha256;

/// Kernel or initrd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Kernel,
    Initrd,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Kernel => "kernel",
            Kind::Initrd => "initrd",
        })
    }
}

/// One artifact of the lock: `kernel ch-release-v6.16.9-20260508 (x86_64)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    pub kind: Kind,
    pub version: String,
    pub arch: Arch,
}

impl fmt::Display for Artifact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} ({})", self.kind, self.version, self.arch)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{kind} version `{version}` is not in the lock this program was built with (known: {known}); \
         add it to artifacts.lock and rebuild"
    )]
    UnknownVersion {
        kind: Kind,
        version: String,
        known: String,
    },

    #[error(
        "{kind} {version} is not pinned for {arch} (pinned: {pinned}); use one of those or add it"
    )]
    ArchNotPinned {
        kind: Kind,
        version: String,
        arch: Arch,
        pinned: String,
    },

    #[error(
        "{artifact} has no output recorded in artifacts.lock; build it with \
         `cargo xtask artifacts --arch {arch}` and rebuild this program",
        arch = artifact.arch
    )]
    NotBuilt { artifact: Artifact },

    #[error(
        "{artifact} is missing: {path} does not exist; run `cargo xtask artifacts --data-dir {data_dir}`",
        path = path.display(),
        data_dir = data_dir.display()
    )]
    Missing {
        artifact: Artifact,
        path: PathBuf,
        data_dir: PathBuf,
    },

    #[error(
        "{artifact} at {path} is corrupt: expected sha256 {expected}, found {actual}; \
         delete it and run `cargo xtask artifacts` to fetch or rebuild it",
        path = path.display()
    )]
    Corrupt {
        artifact: Artifact,
        path: PathBuf,
        expected: Sha256,
        actual: Sha256,
    },

    #[error(
        "{artifact} at {path} has the wrong size: expected {expected} bytes, found {actual}; \
         delete it and run `cargo xtask artifacts` to fetch or rebuild it",
        path = path.display()
    )]
    WrongSize {
        artifact: Artifact,
        path: PathBuf,
        expected: u64,
        actual: u64,
    },

    #[error(
        "{artifact}: the blob {path} is {found}, not a regular file; a blob must be the file \
         itself, so the store treats it as corrupt. Run `cargo xtask artifacts --data-dir \
         {data_dir}` to replace it",
        path = path.display(),
        data_dir = data_dir.display()
    )]
    NotAFile {
        artifact: Artifact,
        path: PathBuf,
        /// What is there instead: `a symlink to /elsewhere`, `a directory`, ...
        found: String,
        data_dir: PathBuf,
    },

    /// The store was filled from another lock than this program's (boxed: it is large).
    #[error("{0}")]
    LockMismatch(Box<LockMismatch>),

    #[error(
        "{artifact}: the link {link} points outside the store's blobs ({target}); refusing it. \
         Remove the link and run `cargo xtask artifacts`",
        link = link.display(),
        target = target.display()
    )]
    LinkEscapes {
        artifact: Artifact,
        link: PathBuf,
        target: PathBuf,
    },

    #[error("{artifact}: reading {path}: {source}", path = path.display())]
    Io {
        artifact: Artifact,
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{} artifact(s) failed verification:\n{}", .0.len(), bullet_list(.0))]
    Incomplete(Vec<Error>),
}

/// A blob that matches the store's copy of the lock, not the lock this program was built with.
#[derive(Debug, thiserror::Error)]
#[error(
    "{artifact}: the store at {root} was filled from another lock: `{entry}` is {theirs} in \
     the store's lock {store_lock}, but {ours} in the lock this program was built with \
     ({built_with}); {newer}. The blob {path} matches the store's lock: it is not corrupt, \
     do not delete it. Next step: {next}",
    root = root.display(),
    store_lock = store_lock.display(),
    path = path.display()
)]
pub struct LockMismatch {
    pub artifact: Artifact,
    /// The store (`<data_dir>/system`).
    pub root: PathBuf,
    /// The blob the store links for this artifact.
    pub path: PathBuf,
    /// The JSON path that differs, like `kernels."k1".x86_64.sha256`.
    pub entry: String,
    /// The value in the lock this program embeds, and in the store's copy.
    pub ours: String,
    pub theirs: String,
    /// The store's copy of the lock it satisfies (`<store>/artifacts.lock`).
    pub store_lock: PathBuf,
    /// Where the embedded lock was read from when this program was built.
    pub built_with: String,
    /// Which of the two locks is newer, as far as their modification times tell.
    pub newer: String,
    /// What to do about it.
    pub next: String,
}

fn bullet_list(errors: &[Error]) -> String {
    errors
        .iter()
        .map(|e| format!("  - {e}"))
        .collect::<Vec<_>>()
        .join("\n")
}
