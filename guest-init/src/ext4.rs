//! What guest-init reads of an ext4 superblock itself: whether a read-only mount may skip the
//! journal. Loading it (reading the journal, starting and later stopping its kernel thread)
//! is a good part of an ext4 mount's cost under emulation, and a read-only mount never writes
//! through it; `noload` is only safe when the journal holds nothing to replay, which the
//! superblock says.

/// Where the superblock starts on the device, and the part of it read here.
pub const SUPERBLOCK_OFFSET: u64 = 1024;
pub const SUPERBLOCK_READ: usize = 0x68;

const MAGIC: u16 = 0xef53;
const MAGIC_AT: usize = 0x38;
const FEATURE_INCOMPAT_AT: usize = 0x60;
/// `EXT4_FEATURE_INCOMPAT_RECOVER`: the journal needs replaying.
const INCOMPAT_RECOVER: u32 = 0x4;

/// The mount options for a read-only ext4 mount of a device whose superblock starts with
/// `superblock`: `noload` when it is ext4 with nothing to replay, none otherwise (not ext4,
/// unreadable, or a journal to replay: the kernel then loads and replays it as usual).
pub fn read_only_options(superblock: &[u8]) -> &'static str {
    let u16_at = |at: usize| {
        superblock
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        superblock
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    match (u16_at(MAGIC_AT), u32_at(FEATURE_INCOMPAT_AT)) {
        (Some(MAGIC), Some(incompat)) if incompat & INCOMPAT_RECOVER == 0 => "noload",
        _ => "",
    }
}

#[cfg(test)]
pub fn superblock(incompat: u32) -> Vec<u8> {
    let mut block = vec![0u8; SUPERBLOCK_READ];
    block[MAGIC_AT..MAGIC_AT + 2].copy_from_slice(&MAGIC.to_le_bytes());
    block[FEATURE_INCOMPAT_AT..FEATURE_INCOMPAT_AT + 4].copy_from_slice(&incompat.to_le_bytes());
    block
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_journal_is_skipped_one_to_replay_is_not() {
        // extents | 64bit | flex_bg, as mkfs.ext4 writes them.
        assert_eq!(read_only_options(&superblock(0x2c2)), "noload");
        assert_eq!(read_only_options(&superblock(0x2c2 | INCOMPAT_RECOVER)), "");
    }

    #[test]
    fn a_fresh_mkfs_ext4_image_has_a_journal_with_nothing_to_replay() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        let status = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&image)
            .arg("4M")
            .status()
            .expect("mkfs.ext4 (apt-get install e2fsprogs)");
        assert!(status.success());
        let mut block = vec![0u8; SUPERBLOCK_READ];
        std::fs::File::open(&image)
            .unwrap()
            .read_exact_at(&mut block, SUPERBLOCK_OFFSET)
            .unwrap();
        assert_eq!(read_only_options(&block), "noload");
    }

    #[test]
    fn not_ext4_or_too_short_mounts_as_usual() {
        let mut block = superblock(0);
        block[MAGIC_AT] = 0;
        assert_eq!(read_only_options(&block), "");
        assert_eq!(read_only_options(&superblock(0)[..0x50]), "");
        assert_eq!(read_only_options(&[]), "");
    }
}
