//! switch_root's delete step. The initramfs cannot be unmounted, so its files stay in memory
//! for the life of the VM unless they are deleted before the new root covers them. The walk
//! stays on the initramfs's own filesystem: mount points (the new root, the overlay's layers)
//! are left alone, and so are the directories that lead to them.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::syscalls::Freed;

/// `statfs` magic numbers of the filesystems an initramfs can be (linux/magic.h).
const RAMFS_MAGIC: u64 = 0x8584_58f6;
const TMPFS_MAGIC: u64 = 0x0102_1994;

/// Delete the files of `/`, which must be the initramfs (a ramfs or tmpfs): guest-init must
/// never wipe a disk root it was started on by mistake.
pub fn free_root() -> io::Result<Freed> {
    let root = Path::new("/");
    let magic = rustix::fs::statfs(root)?.f_type as u64;
    if magic != RAMFS_MAGIC && magic != TMPFS_MAGIC {
        return Err(io::Error::other(format!(
            "/ is not a ramfs or tmpfs (filesystem magic {magic:#x}), so not an initramfs: \
             nothing deleted"
        )));
    }
    let device = fs::symlink_metadata(root)?.dev();
    let mut freed = Freed::default();
    delete_contents(root, &|meta| meta.dev() == device, &mut freed);
    Ok(freed)
}

/// Delete everything under `dir` that `on_this_fs` accepts, depth first. A directory that
/// still holds something afterwards (a mount point inside) stays; failures are skipped.
pub fn delete_contents(dir: &Path, on_this_fs: &dyn Fn(&fs::Metadata) -> bool, freed: &mut Freed) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if !on_this_fs(&meta) {
            continue;
        }
        if meta.is_dir() {
            delete_contents(&path, on_this_fs, freed);
            let _ = fs::remove_dir(&path);
        } else if fs::remove_file(&path).is_ok() {
            freed.files += 1;
            if meta.is_file() {
                freed.bytes += meta.len();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deletes_files_and_directories_but_not_across_a_mount_point() {
        let root = tempfile::tempdir().unwrap();
        let at = |p: &str| root.path().join(p);
        fs::create_dir_all(at("lib/modules/6.1")).unwrap();
        fs::write(at("init"), vec![0u8; 1000]).unwrap();
        fs::write(at("lib/modules/6.1/virtio.ko"), vec![0u8; 24]).unwrap();
        std::os::unix::fs::symlink("init", at("sbin-init")).unwrap();
        // Stands in for a mount point: another filesystem's root, to be left alone.
        fs::create_dir_all(at(".guest-init/root/etc")).unwrap();
        fs::write(at(".guest-init/root/etc/hostname"), "vm\n").unwrap();
        let mount_point = fs::symlink_metadata(at(".guest-init/root")).unwrap().ino();

        let mut freed = Freed::default();
        delete_contents(root.path(), &|m| m.ino() != mount_point, &mut freed);

        assert_eq!(
            freed,
            Freed {
                files: 3,
                bytes: 1024
            }
        );
        assert!(!at("init").exists() && !at("lib").exists());
        assert!(fs::symlink_metadata(at("sbin-init")).is_err());
        // The mount point and what it holds stay, and so does the directory leading to it.
        assert_eq!(
            fs::read_to_string(at(".guest-init/root/etc/hostname")).unwrap(),
            "vm\n"
        );
    }
}
