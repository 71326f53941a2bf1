//! What proves a file unchanged since it was hashed, so verification is paid once.

use std::fs;
use std::os::unix::fs::MetadataExt;

/// A file's identity and change times: any write changes size, mtime or ctime, replacing the
/// file changes the inode, and ctime cannot be set back from userspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    pub fn of(meta: &fs::Metadata) -> FileStamp {
        FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// One line of text, for a record kept on disk.
    pub fn to_line(&self) -> String {
        format!(
            "{} {} {} {} {} {} {}",
            self.dev, self.ino, self.size, self.mtime.0, self.mtime.1, self.ctime.0, self.ctime.1
        )
    }

    /// The inverse of [`FileStamp::to_line`]; `None` for anything else.
    pub fn parse(line: &str) -> Option<FileStamp> {
        let fields: Vec<i64> = line
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        let [dev, ino, size, ms, mns, cs, cns] = fields[..] else {
            return None;
        };
        Some(FileStamp {
            dev: u64::try_from(dev).ok()?,
            ino: u64::try_from(ino).ok()?,
            size: u64::try_from(size).ok()?,
            mtime: (ms, mns),
            ctime: (cs, cns),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_round_trips_as_a_line() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let stamp = FileStamp::of(&file.as_file().metadata().unwrap());
        assert_eq!(FileStamp::parse(&stamp.to_line()), Some(stamp));
        assert_eq!(FileStamp::parse("1 2 3"), None);
        assert_eq!(FileStamp::parse("garbage"), None);
    }
}
