//! The lock file on disk: read and validated, edited without losing a concurrent edit
//! ([`update`]), written atomically, changes shown as a diff.
//! The lock's types and validation are `system::lock`'s: generator and runtime share them.

pub mod add_kernel;
mod merge;
mod update;

pub use update::{Updated, update};

use std::path::Path;

use anyhow::Context as _;
use system::Lock;

/// Reads and validates the lock at `path`; errors name the file and the JSON path.
pub fn read(path: &Path) -> anyhow::Result<Lock> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the lock {}", path.display()))?;
    Lock::parse(&text).with_context(|| format!("in {}", path.display()))
}

/// Replaces the lock file whole, atomically: a crash never leaves half a lock. Only for a file
/// no other command edits (the store's copy, under the store's lock); an edit of a lock others
/// may edit too goes through [`update`].
pub fn write(path: &Path, lock: &Lock) -> anyhow::Result<()> {
    crate::store::atomic_write(path, lock.to_json().as_bytes())
}

/// A line diff of two texts for review: changed lines with `-`/`+`, two lines of context, `@@`
/// between hunks.
pub fn diff(old: &str, new: &str) -> String {
    let diff = similar::TextDiff::from_lines(old, new);
    let mut out = String::new();
    for (n, group) in diff.grouped_ops(2).iter().enumerate() {
        if n > 0 {
            out.push_str("@@\n");
        }
        for op in group {
            for change in diff.iter_changes(op) {
                let sign = match change.tag() {
                    similar::ChangeTag::Equal => ' ',
                    similar::ChangeTag::Delete => '-',
                    similar::ChangeTag::Insert => '+',
                };
                out.push(sign);
                out.push_str(change.value().trim_end_matches('\n'));
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_shows_only_changes_with_context() {
        let old = "a\nb\nc\nd\ne\nf\ng\nh\ni\nj\n";
        let new = "a\nb\nc\nD\ne\nf\ng\nh\ni\nj\nk\n";
        assert_eq!(diff(old, new), " b\n c\n-d\n+D\n e\n f\n@@\n i\n j\n+k\n");
    }

    #[test]
    fn a_written_lock_reads_back_equal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("artifacts.lock");
        let lock = Lock::parse(include_str!("../../../artifacts.lock")).unwrap();
        write(&path, &lock).unwrap();
        assert_eq!(read(&path).unwrap(), lock);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), lock.to_json());
    }
}
