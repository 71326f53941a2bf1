//! The new root: the read-only image as overlay lower, a writable upper, then switch root.
//!
//! `pivot_root` fails with EINVAL when the old root is the initramfs, so we use switch_root
//! semantics: move the API filesystems into the new root, move the new root onto `/`,
//! `chroot(".")`, `chdir("/")`, and delete the initramfs's files ([`free_initramfs`], once the
//! application has started: nothing waits on it). The overlay's layers stay mounted under the
//! covered initramfs; a handle on it lets the deletion and the power off reach them.

use std::io;
use std::path::{Path, PathBuf};

use crate::mount::{self, MountError};
use crate::syscalls::{MountFlags, Syscalls};
use guest_protocol::Writable;

/// Staging area in the initramfs (`/.guest-init`); hidden under the new root once switched.
pub const LOWER: &str = "/.guest-init/lower";
pub const WRITABLE: &str = "/.guest-init/rw";
pub const NEW_ROOT: &str = "/.guest-init/root";

/// Filesystem types tried for the image, in order.
pub const ROOTFS_TYPES: [&str; 2] = ["ext4", "erofs"];

/// Moved into the new root; their submounts (/dev/pts, /sys/fs/cgroup, ...) move along.
pub const MOVED_MOUNTS: [&str; 4] = ["/dev", "/proc", "/sys", "/run"];

#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error("creating {path}: {source}")]
    Mkdir { path: PathBuf, source: io::Error },
    #[error(
        "mounting the overlay root ({options}): {source}; if the kernel builds overlayfs as a \
         module, the initrd's load order must list overlay.ko"
    )]
    Overlay { options: String, source: io::Error },
    #[error("switch root, {step}: {source}")]
    Switch { step: String, source: io::Error },
}

/// Where the writable layer ended up, for the log.
#[derive(Debug, PartialEq, Eq)]
pub struct RootLayout {
    pub rootfs_type: &'static str,
    pub writable: String,
    /// The layers' mounts, in mount order: hidden under the new root once it is `/`.
    pub hidden: Vec<PathBuf>,
}

pub fn mount_overlay_root(
    sys: &dyn Syscalls,
    rootfs: &Path,
    writable: &Writable,
) -> Result<RootLayout, RootError> {
    let rootfs_type = mount::mount_device(
        sys,
        rootfs,
        Path::new(LOWER),
        &ROOTFS_TYPES,
        MountFlags::RDONLY,
    )?;

    let writable_desc = match writable {
        Writable::Device(device) if sys.exists(device) => {
            mount::mount_device(
                sys,
                device,
                Path::new(WRITABLE),
                &["ext4"],
                MountFlags::empty(),
            )?;
            format!("{} (ext4)", device.display())
        }
        _ => {
            mkdir(sys, Path::new(WRITABLE))?;
            sys.mount(
                "tmpfs",
                Path::new(WRITABLE),
                "tmpfs",
                MountFlags::empty(),
                "mode=0755",
            )
            .map_err(|source| MountError::Mount {
                fstype: "tmpfs".into(),
                target: PathBuf::from(WRITABLE),
                source,
            })?;
            match writable {
                Writable::Device(device) => format!("tmpfs ({} absent)", device.display()),
                Writable::Tmpfs => "tmpfs".to_owned(),
            }
        }
    };

    let upper = Path::new(WRITABLE).join("upper");
    let work = Path::new(WRITABLE).join("work");
    mkdir(sys, &upper)?;
    mkdir(sys, &work)?;
    mkdir(sys, Path::new(NEW_ROOT))?;
    let options = format!(
        "lowerdir={LOWER},upperdir={},workdir={}",
        upper.display(),
        work.display()
    );
    sys.mount(
        "overlay",
        Path::new(NEW_ROOT),
        "overlay",
        MountFlags::empty(),
        &options,
    )
    .map_err(|source| RootError::Overlay {
        options: options.clone(),
        source,
    })?;
    Ok(RootLayout {
        rootfs_type,
        writable: writable_desc,
        hidden: vec![PathBuf::from(LOWER), PathBuf::from(WRITABLE)],
    })
}

/// Make `new_root` the root of this process (and of everything it starts), holding the
/// initramfs root for [`free_initramfs`] and the power off.
pub fn switch_root(sys: &dyn Syscalls, new_root: &Path) -> Result<(), RootError> {
    let step = |step: String| move |source| RootError::Switch { step, source };
    sys.make_rprivate(Path::new("/"))
        .map_err(step("make / private".into()))?;
    for mount in MOVED_MOUNTS {
        let inside = new_root.join(mount.trim_start_matches('/'));
        mkdir(sys, &inside)?;
        sys.mount_move(Path::new(mount), &inside)
            .map_err(step(format!("move {mount} to {}", inside.display())))?;
    }
    if let Err(err) = sys.hold_initramfs() {
        crate::info!(
            "root",
            "cannot hold the initramfs root ({err}): its files stay in memory, and at power \
             off the writable disk is only synced, and its journal replays on the next mount"
        );
    }
    sys.chdir(new_root)
        .map_err(step(format!("chdir {}", new_root.display())))?;
    sys.mount_move(new_root, Path::new("/"))
        .map_err(step(format!("move {} to /", new_root.display())))?;
    sys.chroot(Path::new("."))
        .map_err(step("chroot .".into()))?;
    sys.chdir(Path::new("/")).map_err(step("chdir /".into()))?;
    Ok(())
}

/// switch_root's delete step, after the switch (through the held initramfs root, so /dev,
/// /proc, /sys and /run are out of the walk's way): the initramfs cannot be unmounted, and
/// its files would stay in memory. Runs once the application is started, since nothing it
/// does depends on it. What it freed is logged; a failure is logged, not fatal.
pub fn free_initramfs(sys: &dyn Syscalls) {
    let start = sys.now();
    match sys.free_initramfs(Path::new("/proc/self/mountinfo")) {
        Ok(freed) => crate::info!(
            "root",
            "initramfs freed: {} KiB in {} files ({} ms)",
            freed.bytes / 1024,
            freed.files,
            (sys.now() - start).as_millis()
        ),
        Err(err) => crate::info!("root", "initramfs not freed: {err}"),
    }
}

fn mkdir(sys: &dyn Syscalls, path: &Path) -> Result<(), RootError> {
    sys.mkdir_all(path).map_err(|source| RootError::Mkdir {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscalls::fake::{Call, Op, Recorder};

    #[test]
    fn overlay_on_writable_disk() {
        let sys = Recorder::with_existing(&["/dev/vdb"]);
        let layout = mount_overlay_root(
            &sys,
            Path::new("/dev/vda"),
            &Writable::Device(PathBuf::from("/dev/vdb")),
        )
        .unwrap();
        assert_eq!(layout.rootfs_type, "ext4");
        assert_eq!(layout.writable, "/dev/vdb (ext4)");
        assert_eq!(
            layout.hidden,
            [PathBuf::from(LOWER), PathBuf::from(WRITABLE)]
        );
        let mounts = sys.mounts();
        assert_eq!(
            mounts,
            [
                (
                    "/dev/vda".into(),
                    LOWER.into(),
                    "ext4".into(),
                    MountFlags::RDONLY,
                    "".into()
                ),
                (
                    "/dev/vdb".into(),
                    WRITABLE.into(),
                    "ext4".into(),
                    MountFlags::empty(),
                    "".into()
                ),
                (
                    "overlay".into(),
                    NEW_ROOT.into(),
                    "overlay".into(),
                    MountFlags::empty(),
                    "lowerdir=/.guest-init/lower,upperdir=/.guest-init/rw/upper,\
                     workdir=/.guest-init/rw/work"
                        .into()
                ),
            ]
        );
    }

    #[test]
    fn tmpfs_upper_when_the_disk_is_absent_and_erofs_image() {
        let sys = Recorder::default();
        sys.fail(Op::mount(LOWER, "ext4"), libc::EINVAL);
        let layout = mount_overlay_root(
            &sys,
            Path::new("/dev/vda"),
            &Writable::Device(PathBuf::from("/dev/vdb")),
        )
        .unwrap();
        assert_eq!(layout.rootfs_type, "erofs");
        assert_eq!(layout.writable, "tmpfs (/dev/vdb absent)");
        let fstypes: Vec<String> = sys.mounts().into_iter().map(|m| m.2).collect();
        assert_eq!(fstypes, ["ext4", "erofs", "tmpfs", "overlay"]);
    }

    #[test]
    fn overlay_failure_hints_at_the_module() {
        let sys = Recorder::default();
        sys.fail(Op::mount(NEW_ROOT, "overlay"), libc::ENODEV);
        let err = mount_overlay_root(&sys, Path::new("/dev/vda"), &Writable::Tmpfs).unwrap_err();
        assert!(err.to_string().contains("must list overlay.ko"), "{err}");
    }

    #[test]
    fn switch_root_sequence() {
        let sys = Recorder::default();
        switch_root(&sys, Path::new(NEW_ROOT)).unwrap();
        let root = PathBuf::from(NEW_ROOT);
        let mut expected = vec![Call::MakeRprivate(PathBuf::from("/"))];
        for mount in MOVED_MOUNTS {
            let inside = root.join(&mount[1..]);
            expected.push(Call::MkdirAll(inside.clone()));
            expected.push(Call::MountMove {
                from: PathBuf::from(mount),
                to: inside,
            });
        }
        expected.extend([
            Call::HoldInitramfs,
            Call::Chdir(root.clone()),
            Call::MountMove {
                from: root,
                to: PathBuf::from("/"),
            },
            Call::Chroot(PathBuf::from(".")),
            Call::Chdir(PathBuf::from("/")),
        ]);
        assert_eq!(sys.calls(), expected);
    }

    #[test]
    fn a_failure_to_free_or_hold_the_initramfs_is_not_fatal() {
        let sys = Recorder::default();
        sys.fail(Op::HoldInitramfs, libc::EMFILE);
        switch_root(&sys, Path::new(NEW_ROOT)).unwrap();
        assert_eq!(sys.calls().last(), Some(&Call::Chdir(PathBuf::from("/"))));
        sys.fail(Op::FreeInitramfs, libc::EPERM);
        free_initramfs(&sys);
    }

    #[test]
    fn the_initramfs_is_freed_after_the_switch_through_the_new_root_s_proc() {
        let sys = Recorder::default();
        switch_root(&sys, Path::new(NEW_ROOT)).unwrap();
        assert!(
            !sys.calls()
                .iter()
                .any(|call| matches!(call, Call::FreeInitramfs(_))),
            "the switch itself must not wait on the deletion"
        );
        free_initramfs(&sys);
        assert_eq!(
            sys.calls().last(),
            Some(&Call::FreeInitramfs(PathBuf::from("/proc/self/mountinfo")))
        );
    }

    #[test]
    fn switch_root_failure_names_the_step() {
        let sys = Recorder::default();
        sys.fail(
            Op::MountMove {
                from: "/proc".into(),
            },
            libc::EINVAL,
        );
        let err = switch_root(&sys, Path::new(NEW_ROOT)).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("switch root, move /proc to /.guest-init/root/proc: "),
            "{err}"
        );
    }
}
