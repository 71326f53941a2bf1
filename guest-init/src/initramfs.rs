//! switch_root's delete step. The initramfs cannot be unmounted, so its files stay in memory
//! for the life of the VM unless they are deleted before the new root covers them. The walk
//! stays on the initramfs's own filesystem: mount points (the new root, the overlay's layers)
//! are left alone, and so are the directories that lead to them, and any subtree that is
//! bind-mounted elsewhere (e.g. into the new root): its files are still in use.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::syscalls::Freed;

/// `statfs` magic numbers of the filesystems an initramfs can be (linux/magic.h).
const RAMFS_MAGIC: u64 = 0x8584_58f6;
const TMPFS_MAGIC: u64 = 0x0102_1994;

/// Delete the files of the initramfs reached at `root` (after the root switch: `.` with the
/// working directory on the held initramfs root), which must be a ramfs or tmpfs: guest-init
/// must never wipe a disk root it was started on by mistake. `mountinfo` is
/// `/proc/self/mountinfo` wherever /proc is mounted by now.
pub fn free_root(root: &Path, mountinfo: &Path) -> io::Result<Freed> {
    let magic = rustix::fs::statfs(root)?.f_type as u64;
    if magic != RAMFS_MAGIC && magic != TMPFS_MAGIC {
        return Err(io::Error::other(format!(
            "/ is not a ramfs or tmpfs (filesystem magic {magic:#x}), so not an initramfs: \
             nothing deleted"
        )));
    }
    let device = fs::symlink_metadata(root)?.dev();
    let mountinfo = fs::read_to_string(mountinfo)?;
    let id = format!(
        "{}:{}",
        rustix::fs::major(device),
        rustix::fs::minor(device)
    );
    // mountinfo names the subtrees from the filesystem's own root; the walk sees them under
    // `root`.
    let kept: Vec<PathBuf> = bind_mounted_subtrees(&mountinfo, &id)
        .into_iter()
        .map(|subtree| root.join(subtree.strip_prefix("/").unwrap_or(&subtree)))
        .collect();
    let mut freed = Freed::default();
    let skip =
        |path: &Path, meta: &fs::Metadata| meta.dev() != device || kept.iter().any(|k| k == path);
    delete_contents(root, &skip, &mut freed);
    Ok(freed)
}

/// The subtrees of filesystem `device` (`major:minor`) that a mount shows elsewhere, from
/// `/proc/self/mountinfo` (fields: id, parent, major:minor, root within the filesystem, ...).
pub fn bind_mounted_subtrees(mountinfo: &str, device: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let (this, root) = (fields.nth(2)?, fields.next()?);
            (this == device && root != "/")
                .then(|| PathBuf::from(crate::mount::unescape_mount_path(root)))
        })
        .collect()
}

/// Delete everything under `dir` but what `skip` names, depth first. A directory that still
/// holds something afterwards (a mount point, a skipped entry) stays; failures are skipped.
pub fn delete_contents(dir: &Path, skip: &dyn Fn(&Path, &fs::Metadata) -> bool, freed: &mut Freed) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if skip(&path, &meta) {
            continue;
        }
        if meta.is_dir() {
            delete_contents(&path, skip, freed);
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
        // Stands in for a subtree bind-mounted elsewhere.
        fs::create_dir_all(at("lib/firmware")).unwrap();
        fs::write(at("lib/firmware/gpu.bin"), "fw").unwrap();
        let kept = at("lib/firmware");

        let mut freed = Freed::default();
        let skip = |path: &Path, m: &fs::Metadata| m.ino() == mount_point || path == kept;
        delete_contents(root.path(), &skip, &mut freed);

        assert_eq!(
            freed,
            Freed {
                files: 3,
                bytes: 1024
            }
        );
        assert!(!at("init").exists() && !at("lib/modules").exists());
        assert_eq!(
            fs::read_to_string(at("lib/firmware/gpu.bin")).unwrap(),
            "fw"
        );
        assert!(fs::symlink_metadata(at("sbin-init")).is_err());
        // The mount point and what it holds stay, and so does the directory leading to it.
        assert_eq!(
            fs::read_to_string(at(".guest-init/root/etc/hostname")).unwrap(),
            "vm\n"
        );
    }

    #[test]
    fn subtrees_of_the_initramfs_mounted_elsewhere_are_found() {
        let mountinfo = "1 1 0:2 / / rw - rootfs rootfs rw\n\
                         20 1 0:5 / /dev rw - devtmpfs devtmpfs rw\n\
                         31 30 0:2 /lib/firmware /.guest-init/root/lib/firmware rw - rootfs rootfs rw\n\
                         32 30 0:2 /my\\040dir /.guest-init/root/x rw - rootfs rootfs rw\n\
                         33 30 0:9 /lib /.guest-init/root/y rw - ext4 /dev/vdd rw\n";
        assert_eq!(
            bind_mounted_subtrees(mountinfo, "0:2"),
            [PathBuf::from("/lib/firmware"), PathBuf::from("/my dir")]
        );
    }
}
