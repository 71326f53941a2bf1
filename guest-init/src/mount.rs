//! Early mounts (the API filesystems every program expects) and waiting for block devices.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::ext4;
use crate::syscalls::{MountFlags, Syscalls};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot create mount point {target}: {source}")]
    MountPoint { target: PathBuf, source: io::Error },
    #[error("mounting {fstype} on {target}: {source}")]
    Mount {
        fstype: String,
        target: PathBuf,
        source: io::Error,
    },
    #[error(
        "block device {device} did not appear within {timeout_ms} ms; check the VM's disks and \
         the virtio modules in the initrd's load order, or raise guest_init.device_timeout_ms"
    )]
    DeviceTimeout { device: PathBuf, timeout_ms: u128 },
    /// Every filesystem type was tried once; each one's answer is kept.
    #[error("cannot mount {device} on {target}: {}", describe_attempts(.attempts))]
    NoFilesystem {
        device: PathBuf,
        target: PathBuf,
        attempts: Vec<Attempt>,
    },
}

/// One filesystem type tried on a device, and why it did not mount.
#[derive(Debug)]
pub struct Attempt {
    pub fstype: &'static str,
    pub error: io::Error,
}

/// `ext4: <why>; vfat: <why>`, with ENODEV (no such filesystem type in this kernel) said in
/// words: the usual cause is a module the initrd does not carry.
fn describe_attempts(attempts: &[Attempt]) -> String {
    let described: Vec<String> = attempts
        .iter()
        .map(|attempt| match attempt.error.raw_os_error() {
            Some(libc::ENODEV) => format!(
                "{}: filesystem type not supported by this kernel (module missing?)",
                attempt.fstype
            ),
            _ => format!("{}: {}", attempt.fstype, attempt.error),
        })
        .collect();
    described.join("; ")
}

/// One filesystem to mount at boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EarlyMount {
    pub source: &'static str,
    pub target: &'static str,
    pub fstype: &'static str,
    pub flags: MountFlags,
    pub data: &'static str,
}

/// In order: each later target lives inside an earlier one.
pub fn early_mounts() -> [EarlyMount; 7] {
    let hardened = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    [
        EarlyMount {
            source: "proc",
            target: "/proc",
            fstype: "proc",
            flags: hardened,
            data: "",
        },
        EarlyMount {
            source: "sysfs",
            target: "/sys",
            fstype: "sysfs",
            flags: hardened,
            data: "",
        },
        // The kernel's DEVTMPFS_MOUNT only covers a disk root, not an initramfs.
        EarlyMount {
            source: "devtmpfs",
            target: "/dev",
            fstype: "devtmpfs",
            flags: MountFlags::NOSUID,
            data: "mode=0755",
        },
        EarlyMount {
            source: "devpts",
            target: "/dev/pts",
            fstype: "devpts",
            flags: MountFlags::NOSUID | MountFlags::NOEXEC,
            data: "gid=5,mode=620,ptmxmode=0666",
        },
        EarlyMount {
            source: "shm",
            target: "/dev/shm",
            fstype: "tmpfs",
            flags: MountFlags::NOSUID | MountFlags::NODEV,
            data: "mode=1777",
        },
        EarlyMount {
            source: "tmpfs",
            target: "/run",
            fstype: "tmpfs",
            flags: MountFlags::NOSUID | MountFlags::NODEV,
            data: "mode=0755",
        },
        EarlyMount {
            source: "cgroup2",
            target: "/sys/fs/cgroup",
            fstype: "cgroup2",
            flags: hardened,
            data: "nsdelegate",
        },
    ]
}

pub fn mount_early(sys: &dyn Syscalls) -> Result<(), MountError> {
    for m in early_mounts() {
        let target = Path::new(m.target);
        sys.mkdir_all(target)
            .map_err(|source| MountError::MountPoint {
                target: target.to_owned(),
                source,
            })?;
        match sys.mount(m.source, target, m.fstype, m.flags, m.data) {
            Ok(()) => {}
            // A kernel that mounted devtmpfs itself: keep its mount.
            Err(err) if m.fstype == "devtmpfs" && err.raw_os_error() == Some(libc::EBUSY) => {}
            Err(source) => {
                return Err(MountError::Mount {
                    fstype: m.fstype.to_owned(),
                    target: target.to_owned(),
                    source,
                });
            }
        }
    }
    Ok(())
}

/// Only when the device's directory cannot be watched: short enough to add little latency,
/// long enough not to spin the single vCPU.
pub const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// Wait until `device` exists or `timeout` passes: drivers create nodes asynchronously. The
/// kernel wakes the wait when the node appears (`Syscalls::wait_for_path`); polling is the
/// fallback when the directory cannot be watched (e.g. `/dev/input` before its first node).
pub fn wait_for_device(
    sys: &dyn Syscalls,
    device: &Path,
    timeout: Duration,
) -> Result<Duration, MountError> {
    let start = sys.now();
    loop {
        let left = timeout.saturating_sub(sys.now() - start);
        match sys.wait_for_path(device, left) {
            Ok(true) => return Ok(sys.now() - start),
            Ok(false) => {
                return Err(MountError::DeviceTimeout {
                    device: device.to_owned(),
                    timeout_ms: timeout.as_millis(),
                });
            }
            Err(_) => {}
        }
        if sys.exists(device) {
            return Ok(sys.now() - start);
        }
        if sys.now() - start >= timeout {
            return Err(MountError::DeviceTimeout {
                device: device.to_owned(),
                timeout_ms: timeout.as_millis(),
            });
        }
        sys.sleep(POLL_INTERVAL);
    }
}

/// Mount a block device trying each filesystem type once, in turn; returns the type that
/// worked. A read-only ext4 attempt skips loading the journal when the superblock says it
/// holds nothing to replay ([`ext4::read_only_options`]).
pub fn mount_device(
    sys: &dyn Syscalls,
    device: &Path,
    target: &Path,
    fstypes: &[&'static str],
    flags: MountFlags,
) -> Result<&'static str, MountError> {
    sys.mkdir_all(target)
        .map_err(|source| MountError::MountPoint {
            target: target.to_owned(),
            source,
        })?;
    let source_name = device.to_string_lossy();
    let mut attempts = Vec::new();
    for fstype in fstypes {
        let data = if *fstype == "ext4" && flags.contains(MountFlags::RDONLY) {
            // Unreadable: mount as usual, and let the mount report what is wrong.
            sys.read_at(device, ext4::SUPERBLOCK_OFFSET, ext4::SUPERBLOCK_READ)
                .map(|superblock| ext4::read_only_options(&superblock))
                .unwrap_or("")
        } else {
            ""
        };
        match sys.mount(&source_name, target, fstype, flags, data) {
            Ok(()) => return Ok(fstype),
            Err(error) => attempts.push(Attempt { fstype, error }),
        }
    }
    Err(MountError::NoFilesystem {
        device: device.to_owned(),
        target: target.to_owned(),
        attempts,
    })
}

/// Mount points from /proc/self/mounts, in mount order (octal escapes decoded).
pub fn mount_targets(mounts: &str) -> Vec<String> {
    mounts
        .lines()
        .filter_map(|line| line.split(' ').nth(1))
        .map(unescape_mount_path)
        .collect()
}

/// A path from /proc/self/mounts or mountinfo, its `\ooo` octal escapes decoded.
pub fn unescape_mount_path(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .and_then(|digits| std::str::from_utf8(digits).ok())
            .and_then(|digits| u8::from_str_radix(digits, 8).ok());
        if let (b'\\', Some(code)) = (bytes[i], octal) {
            out.push(code);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscalls::Clock;
    use crate::syscalls::fake::{Call, Op, Recorder};

    #[test]
    fn early_mounts_in_order_with_flags() {
        let sys = Recorder::default();
        mount_early(&sys).unwrap();
        let mounts = sys.mounts();
        let targets: Vec<&str> = mounts.iter().map(|m| m.1.as_str()).collect();
        assert_eq!(
            targets,
            [
                "/proc",
                "/sys",
                "/dev",
                "/dev/pts",
                "/dev/shm",
                "/run",
                "/sys/fs/cgroup"
            ]
        );
        let hardened = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
        assert_eq!(mounts[0].2, "proc");
        assert_eq!(mounts[0].3, hardened);
        assert_eq!(mounts[2].2, "devtmpfs");
        assert_eq!(mounts[2].3, MountFlags::NOSUID);
        assert_eq!(mounts[6].2, "cgroup2");
        // Each mount point is created right before its mount.
        let calls = sys.calls();
        assert_eq!(calls[0], Call::MkdirAll(PathBuf::from("/proc")));
        assert!(matches!(&calls[1], Call::Mount { target, .. } if target == Path::new("/proc")));
    }

    #[test]
    fn devtmpfs_already_mounted_is_fine_other_failures_are_not() {
        let sys = Recorder::default();
        sys.fail(Op::mount("/dev", "devtmpfs"), libc::EBUSY);
        mount_early(&sys).unwrap();

        let sys = Recorder::default();
        sys.fail(Op::mount("/sys", "sysfs"), libc::EPERM);
        let err = mount_early(&sys).unwrap_err();
        assert!(err.to_string().starts_with("mounting sysfs on /sys: "));
        assert_eq!(sys.mounts().len(), 2);
    }

    #[test]
    fn waits_until_the_device_appears() {
        let sys = Recorder::default();
        sys.appear_at("/dev/vda", Duration::from_millis(42));
        let waited = wait_for_device(&sys, Path::new("/dev/vda"), Duration::from_secs(10)).unwrap();
        assert!(waited >= Duration::from_millis(42) && waited < Duration::from_millis(50));
    }

    #[test]
    fn a_directory_that_cannot_be_watched_falls_back_to_polling() {
        let sys = Recorder::default();
        sys.fail(Op::WatchDir, libc::ENOENT);
        sys.appear_at("/dev/input/event0", Duration::from_millis(12));
        let waited =
            wait_for_device(&sys, Path::new("/dev/input/event0"), Duration::from_secs(1)).unwrap();
        assert!(waited >= Duration::from_millis(12) && waited < Duration::from_millis(20));
        let err =
            wait_for_device(&sys, Path::new("/dev/vdz"), Duration::from_millis(30)).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("block device /dev/vdz did not appear within 30 ms")
        );
    }

    #[test]
    fn the_wait_wakes_when_the_device_appears_not_on_a_poll_tick() {
        let sys = Recorder::default();
        sys.appear_at("/dev/vdc", Duration::from_micros(1_234));
        let waited = wait_for_device(&sys, Path::new("/dev/vdc"), Duration::from_secs(10)).unwrap();
        assert_eq!(waited, Duration::from_micros(1_234));
    }

    #[test]
    fn device_timeout_is_bounded_and_named() {
        let sys = Recorder::default();
        let err =
            wait_for_device(&sys, Path::new("/dev/vdc"), Duration::from_millis(100)).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("block device /dev/vdc did not appear within 100 ms")
        );
        assert!(sys.now() >= Duration::from_millis(100) && sys.now() < Duration::from_millis(110));
    }

    #[test]
    fn mount_device_tries_types_in_turn() {
        let sys = Recorder::default();
        sys.fail(Op::mount("/lower", "ext4"), libc::EINVAL);
        let fstype = mount_device(
            &sys,
            Path::new("/dev/vda"),
            Path::new("/lower"),
            &["ext4", "erofs"],
            MountFlags::RDONLY,
        )
        .unwrap();
        assert_eq!(fstype, "erofs");
        let mounts = sys.mounts();
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[1].0, "/dev/vda");
        assert_eq!(mounts[1].3, MountFlags::RDONLY);
    }

    #[test]
    fn a_read_only_ext4_mount_skips_a_clean_journal_only() {
        let mount = |sys: &Recorder, flags| {
            mount_device(
                sys,
                Path::new("/dev/vda"),
                Path::new("/lower"),
                &["ext4"],
                flags,
            )
            .unwrap();
            sys.mounts().pop().unwrap()
        };
        let mut disk = vec![0u8; ext4::SUPERBLOCK_OFFSET as usize];
        disk.extend(ext4::superblock(0x2c2));
        let sys = Recorder::default();
        sys.add_device_bytes("/dev/vda", disk.clone());
        assert_eq!(mount(&sys, MountFlags::RDONLY).4, "noload");
        // Writable mounts load their journal, always.
        assert_eq!(mount(&sys, MountFlags::empty()).4, "");

        let mut dirty = vec![0u8; ext4::SUPERBLOCK_OFFSET as usize];
        dirty.extend(ext4::superblock(0x2c2 | 0x4));
        let sys = Recorder::default();
        sys.add_device_bytes("/dev/vda", dirty);
        assert_eq!(mount(&sys, MountFlags::RDONLY).4, "");
        // A device that cannot be read is mounted as usual.
        assert_eq!(mount(&Recorder::default(), MountFlags::RDONLY).4, "");
    }

    #[test]
    fn a_type_the_kernel_lacks_is_named_and_each_type_is_tried_once() {
        let sys = Recorder::default();
        sys.fail(Op::mount("/cfg", "ext4"), libc::EINVAL);
        sys.fail(Op::mount("/cfg", "vfat"), libc::ENODEV);
        let err = mount_device(
            &sys,
            Path::new("/dev/vdc"),
            Path::new("/cfg"),
            &["ext4", "vfat"],
            MountFlags::RDONLY,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot mount /dev/vdc on /cfg: ext4: Invalid argument (os error 22); vfat: \
             filesystem type not supported by this kernel (module missing?)"
        );
        assert_eq!(sys.mounts().len(), 2);
    }

    #[test]
    fn mount_targets_in_order_with_escapes() {
        let mounts = "none / rootfs rw 0 0\n\
                      proc /proc proc rw 0 0\n\
                      /dev/vdd /data\\040dir ext4 rw 0 0\n";
        assert_eq!(mount_targets(mounts), ["/", "/proc", "/data dir"]);
    }
}
