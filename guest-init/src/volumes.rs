//! Volumes from `volume_mounts`, mounted inside the new root before it becomes `/`:
//! - `ro`: the device read-only (ext4 or erofs);
//! - `rw`: the device read-write (ext4; erofs is refused, it cannot be written);
//! - `overlay`: the device read-only as the lower layer, `upper` and `work` directories on
//!   `overlay_device` (ext4, created when missing), the overlay at `path`. The two layer mounts
//!   are staged in the initramfs, so the application sees only the overlay.

use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use crate::error::ExitReason;
use crate::image_path;
use crate::mount::{self, MountError};
use crate::syscalls::{MountFlags, Syscalls};
use guest_protocol::Writable;
use guest_protocol::cmdline::BootOptions;
use guest_protocol::config::{VolumeMode, VolumeMount};

/// Filesystems tried for a volume device, in order.
pub const VOLUME_TYPES: [&str; 2] = ["ext4", "erofs"];
/// Filesystems for a writable layer.
pub const WRITABLE_TYPES: [&str; 1] = ["ext4"];
/// Where an overlay volume's layers are mounted (`<index>/lower`, `<index>/rw`); covered by the
/// new root after the switch.
pub const STAGING: &str = "/.guest-init/volumes";

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error(
        "volume_mounts[{index}].path {path} must name a directory below / inside the image, \
         without `..`"
    )]
    BadPath { index: usize, path: PathBuf },
    #[error(
        "volume_mounts[{index}].{key} {device} is also {other}; a disk one mount writes must not \
         be mounted anywhere else: give the volume a disk of its own"
    )]
    SharedDevice {
        index: usize,
        key: &'static str,
        device: PathBuf,
        other: String,
    },
    #[error(
        "volume_mounts[{index}] ({path}): block device {device} did not appear within \
         {timeout_ms} ms; attach it to the VM, fix the volume's device in config.json, or raise \
         guest_init.device_timeout_ms"
    )]
    Missing {
        index: usize,
        device: PathBuf,
        path: PathBuf,
        timeout_ms: u128,
    },
    #[error("volume_mounts[{index}] ({path}): {source}")]
    Mount {
        index: usize,
        path: PathBuf,
        source: MountError,
    },
    #[error(
        "volume_mounts[{index}] ({path}): mode \"rw\" but {device} holds erofs, which cannot be \
         written; use mode \"ro\", or \"overlay\" with an overlay_device"
    )]
    ReadOnlyFilesystem {
        index: usize,
        device: PathBuf,
        path: PathBuf,
    },
    #[error(
        "volume_mounts[{index}] ({path}): mode \"overlay\" needs an overlay_device, the disk \
         that receives the writes"
    )]
    NoOverlayDevice { index: usize, path: PathBuf },
    #[error(
        "volume_mounts[{index}] ({path}): creating {dir} on the overlay device {overlay_device}: \
         {source}"
    )]
    Layer {
        index: usize,
        path: PathBuf,
        overlay_device: PathBuf,
        dir: PathBuf,
        source: io::Error,
    },
    #[error(
        "volume_mounts[{index}] ({path}): mounting the overlay ({options}): {source}; if the \
         kernel builds overlayfs as a module, the initrd's load order must list overlay.ko"
    )]
    Overlay {
        index: usize,
        path: PathBuf,
        options: String,
        source: io::Error,
    },
}

impl VolumeError {
    /// A device that never appeared is a `device` failure, a clashing entry a `config` one; the
    /// rest failed to mount.
    pub fn class(&self) -> ExitReason {
        match self {
            VolumeError::Missing { .. } => ExitReason::Device,
            VolumeError::SharedDevice { .. } | VolumeError::BadPath { .. } => ExitReason::Config,
            _ => ExitReason::Mount,
        }
    }
}

/// Checked before the root is touched: every `path` stays inside the image (no `..`, not `/`
/// itself), and no written disk is used twice (an `rw` device or `overlay_device` that is also
/// the image, the writable disk or another volume's): the second mount would fail with a bare
/// EBUSY, or two writers would corrupt the filesystem.
pub fn check(volumes: &[VolumeMount], options: &BootOptions) -> Result<(), VolumeError> {
    for (index, volume) in volumes.iter().enumerate() {
        let mut parts = volume.path.components().skip(1).peekable();
        let inside =
            parts.peek().is_some() && parts.all(|part| matches!(part, Component::Normal(_)));
        if !inside {
            return Err(VolumeError::BadPath {
                index,
                path: volume.path.clone(),
            });
        }
    }
    let mut uses: Vec<(&Path, String)> = vec![(
        options.rootfs.as_path(),
        "the image disk (guest_init.rootfs)".to_owned(),
    )];
    if let Writable::Device(device) = &options.writable {
        uses.push((device, "the writable disk (guest_init.writable)".to_owned()));
    }
    for (index, volume) in volumes.iter().enumerate() {
        uses.push((&volume.device, format!("volume_mounts[{index}].device")));
        if let Some(overlay_device) = &volume.overlay_device {
            uses.push((
                overlay_device,
                format!("volume_mounts[{index}].overlay_device"),
            ));
        }
    }
    for (index, volume) in volumes.iter().enumerate() {
        let written = match (volume.mode, &volume.overlay_device) {
            (VolumeMode::ReadWrite, _) => Some(("device", &volume.device)),
            (VolumeMode::Overlay, Some(device)) => Some(("overlay_device", device)),
            _ => None,
        };
        let Some((key, device)) = written else {
            continue;
        };
        let this = format!("volume_mounts[{index}].{key}");
        if let Some((_, other)) = uses.iter().find(|(d, name)| d == device && *name != this) {
            return Err(VolumeError::SharedDevice {
                index,
                key,
                device: device.clone(),
                other: other.clone(),
            });
        }
    }
    Ok(())
}

/// What [`mount_all`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Mounted {
    /// The mounts staged outside the new root (overlay volumes' layers), in mount order.
    pub hidden: Vec<PathBuf>,
    /// One line per volume for the log.
    pub described: Vec<String>,
}

/// Mount every volume inside `new_root`, in order.
pub fn mount_all(
    sys: &dyn Syscalls,
    volumes: &[VolumeMount],
    new_root: &Path,
    timeout: Duration,
) -> Result<Mounted, VolumeError> {
    let mut mounted = Mounted::default();
    for (index, volume) in volumes.iter().enumerate() {
        let target =
            image_path::resolve_in_root(sys, new_root, &volume.path).map_err(|source| {
                VolumeError::Mount {
                    index,
                    path: volume.path.clone(),
                    source: MountError::MountPoint {
                        target: new_root
                            .join(volume.path.strip_prefix("/").unwrap_or(&volume.path)),
                        source,
                    },
                }
            })?;
        let volume = Volume {
            index,
            spec: volume,
            timeout,
        };
        match volume.spec.mode {
            VolumeMode::ReadOnly => {
                volume.wait(&volume.spec.device, sys)?;
                let fstype =
                    volume.mount(sys, &volume.spec.device, &target, &VOLUME_TYPES, true)?;
                mounted.described.push(format!(
                    "volume_mounts[{index}]: {} ({fstype}) read-only at {}",
                    volume.spec.device.display(),
                    volume.spec.path.display()
                ));
            }
            VolumeMode::ReadWrite => {
                volume.wait(&volume.spec.device, sys)?;
                let fstype =
                    volume.mount(sys, &volume.spec.device, &target, &VOLUME_TYPES, false)?;
                if fstype == "erofs" {
                    let _ = sys.unmount(&target);
                    return Err(VolumeError::ReadOnlyFilesystem {
                        index,
                        device: volume.spec.device.clone(),
                        path: volume.spec.path.clone(),
                    });
                }
                mounted.described.push(format!(
                    "volume_mounts[{index}]: {} ({fstype}) read-write at {}",
                    volume.spec.device.display(),
                    volume.spec.path.display()
                ));
            }
            VolumeMode::Overlay => {
                let (layers, fstype, overlay_device) = volume.mount_overlay(sys, &target)?;
                mounted.hidden.extend(layers);
                mounted.described.push(format!(
                    "volume_mounts[{index}]: overlay at {} of {} ({fstype}), changes on {}",
                    volume.spec.path.display(),
                    volume.spec.device.display(),
                    overlay_device.display()
                ));
            }
        }
    }
    Ok(mounted)
}

/// One entry of `volume_mounts` and what its errors name.
struct Volume<'a> {
    index: usize,
    spec: &'a VolumeMount,
    timeout: Duration,
}

impl Volume<'_> {
    fn wait(&self, device: &Path, sys: &dyn Syscalls) -> Result<(), VolumeError> {
        mount::wait_for_device(sys, device, self.timeout).map_err(|_| VolumeError::Missing {
            index: self.index,
            device: device.to_owned(),
            path: self.spec.path.clone(),
            timeout_ms: self.timeout.as_millis(),
        })?;
        Ok(())
    }

    fn mount(
        &self,
        sys: &dyn Syscalls,
        device: &Path,
        target: &Path,
        fstypes: &[&'static str],
        read_only: bool,
    ) -> Result<&'static str, VolumeError> {
        let flags = if read_only {
            MountFlags::RDONLY
        } else {
            MountFlags::empty()
        };
        mount::mount_device(sys, device, target, fstypes, flags).map_err(|source| {
            VolumeError::Mount {
                index: self.index,
                path: self.spec.path.clone(),
                source,
            }
        })
    }

    /// Returns the two staged layer mounts, the base's filesystem and the overlay device.
    fn mount_overlay(
        &self,
        sys: &dyn Syscalls,
        target: &Path,
    ) -> Result<([PathBuf; 2], &'static str, &Path), VolumeError> {
        let Some(overlay_device) = &self.spec.overlay_device else {
            // The config parser already refuses this; a config built in code may not.
            return Err(VolumeError::NoOverlayDevice {
                index: self.index,
                path: self.spec.path.clone(),
            });
        };
        self.wait(&self.spec.device, sys)?;
        self.wait(overlay_device, sys)?;
        let staging = Path::new(STAGING).join(self.index.to_string());
        let lower = staging.join("lower");
        let layers = staging.join("rw");
        let fstype = self.mount(sys, &self.spec.device, &lower, &VOLUME_TYPES, true)?;
        self.mount(sys, overlay_device, &layers, &WRITABLE_TYPES, false)?;
        let upper = layers.join("upper");
        let work = layers.join("work");
        for dir in [&upper, &work] {
            sys.mkdir_all(dir).map_err(|source| VolumeError::Layer {
                index: self.index,
                path: self.spec.path.clone(),
                overlay_device: overlay_device.clone(),
                dir: dir.clone(),
                source,
            })?;
        }
        let mount_point_error = |source| VolumeError::Mount {
            index: self.index,
            path: self.spec.path.clone(),
            source: MountError::MountPoint {
                target: target.to_owned(),
                source,
            },
        };
        sys.mkdir_all(target).map_err(mount_point_error)?;
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        sys.mount("overlay", target, "overlay", MountFlags::empty(), &options)
            .map_err(|source| VolumeError::Overlay {
                index: self.index,
                path: self.spec.path.clone(),
                options: options.clone(),
                source,
            })?;
        Ok(([lower, layers], fstype, overlay_device))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscalls::fake::{Op, Recorder};

    fn mount_all_in(sys: &Recorder, volumes: &[VolumeMount]) -> Result<Mounted, VolumeError> {
        mount_all(sys, volumes, Path::new("/newroot"), Duration::from_secs(1))
    }

    #[test]
    fn a_written_disk_used_twice_is_a_config_error() {
        let options = BootOptions::default();
        let check = |volumes: &[VolumeMount]| check(volumes, &options);
        // Read-only mounts may share a device; each written disk stands alone.
        check(&[
            VolumeMount::read_only("/dev/vdd", "/a"),
            VolumeMount::read_only("/dev/vdd", "/b"),
            VolumeMount::overlay("/dev/vdd", "/c", "/dev/vde"),
            VolumeMount::read_write("/dev/vdf", "/d"),
        ])
        .unwrap();

        let err = check(&[VolumeMount::overlay("/dev/vdd", "/c", "/dev/vdb")]).unwrap_err();
        assert_eq!(err.class(), ExitReason::Config);
        assert_eq!(
            err.to_string(),
            "volume_mounts[0].overlay_device /dev/vdb is also the writable disk \
             (guest_init.writable); a disk one mount writes must not be mounted anywhere else: \
             give the volume a disk of its own"
        );
        let err = check(&[
            VolumeMount::read_only("/dev/vdd", "/a"),
            VolumeMount::read_write("/dev/vdd", "/b"),
        ])
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("volume_mounts[1].device /dev/vdd is also volume_mounts[0].device;"),
            "{err}"
        );
        let err = check(&[VolumeMount::read_write("/dev/vda", "/a")]).unwrap_err();
        assert!(err.to_string().contains("the image disk"), "{err}");
    }

    #[test]
    fn a_path_outside_the_image_is_a_config_error() {
        let options = BootOptions::default();
        for path in ["/", "/data/../../etc", "//.."] {
            let err = check(&[VolumeMount::read_only("/dev/vdd", path)], &options).unwrap_err();
            assert_eq!(err.class(), ExitReason::Config);
            assert!(
                err.to_string().starts_with(&format!(
                    "volume_mounts[0].path {path} must name a directory"
                )),
                "{err}"
            );
        }
        check(
            &[VolumeMount::read_only("/dev/vdd", "/srv/data/")],
            &options,
        )
        .unwrap();
    }

    #[test]
    fn a_volume_is_mounted_where_its_path_leads_in_the_image() {
        let sys = Recorder::with_existing(&["/dev/vdd"]);
        sys.add_link("/newroot/data", "/srv/data");
        mount_all_in(&sys, &[VolumeMount::read_only("/dev/vdd", "/data")]).unwrap();
        assert_eq!(sys.mounts()[0].1, "/newroot/srv/data");
    }

    #[test]
    fn ro_and_rw_volumes_mount_inside_the_new_root() {
        let sys = Recorder::with_existing(&["/dev/vdd", "/dev/vde"]);
        let volumes = [
            VolumeMount::read_write("/dev/vdd", "/data"),
            VolumeMount::read_only("/dev/vde", "/srv/static"),
        ];
        let mounted = mount_all_in(&sys, &volumes).unwrap();
        assert!(mounted.hidden.is_empty());
        assert_eq!(
            mounted.described,
            [
                "volume_mounts[0]: /dev/vdd (ext4) read-write at /data",
                "volume_mounts[1]: /dev/vde (ext4) read-only at /srv/static"
            ]
        );
        let mounts = sys.mounts();
        assert_eq!(mounts[0].1, "/newroot/data");
        assert_eq!(mounts[0].3, MountFlags::empty());
        assert_eq!(mounts[1].1, "/newroot/srv/static");
        assert_eq!(mounts[1].3, MountFlags::RDONLY);
    }

    #[test]
    fn an_erofs_ro_volume_mounts_and_an_erofs_rw_volume_is_refused() {
        let sys = Recorder::with_existing(&["/dev/vdd"]);
        sys.fail(Op::mount("/newroot/data", "ext4"), libc::EINVAL);
        mount_all_in(&sys, &[VolumeMount::read_only("/dev/vdd", "/data")]).unwrap();
        assert_eq!(sys.mounts()[1].2, "erofs");

        let err = mount_all_in(&sys, &[VolumeMount::read_write("/dev/vdd", "/data")]).unwrap_err();
        assert_eq!(err.class(), ExitReason::Mount);
        assert!(
            err.to_string().starts_with(
                "volume_mounts[0] (/data): mode \"rw\" but /dev/vdd holds erofs, which cannot be \
                 written"
            ),
            "{err}"
        );
        assert!(sys.calls().contains(&crate::syscalls::fake::Call::Unmount(
            "/newroot/data".into()
        )));
    }

    #[test]
    fn overlay_volume_stages_its_layers_and_mounts_the_overlay_at_the_path() {
        let sys = Recorder::with_existing(&["/dev/vdd", "/dev/vde", "/dev/vdf"]);
        let volumes = [
            VolumeMount::read_only("/dev/vdd", "/ro"),
            VolumeMount::overlay("/dev/vde", "/cache", "/dev/vdf"),
        ];
        let mounted = mount_all_in(&sys, &volumes).unwrap();
        assert_eq!(
            mounted.described[1],
            "volume_mounts[1]: overlay at /cache of /dev/vde (ext4), changes on /dev/vdf"
        );
        assert_eq!(
            mounted.hidden,
            [
                PathBuf::from("/.guest-init/volumes/1/lower"),
                PathBuf::from("/.guest-init/volumes/1/rw")
            ]
        );
        let mounts = sys.mounts();
        assert_eq!(
            mounts[1..],
            [
                (
                    "/dev/vde".into(),
                    "/.guest-init/volumes/1/lower".into(),
                    "ext4".into(),
                    MountFlags::RDONLY,
                    "".into()
                ),
                (
                    "/dev/vdf".into(),
                    "/.guest-init/volumes/1/rw".into(),
                    "ext4".into(),
                    MountFlags::empty(),
                    "".into()
                ),
                (
                    "overlay".into(),
                    "/newroot/cache".into(),
                    "overlay".into(),
                    MountFlags::empty(),
                    "lowerdir=/.guest-init/volumes/1/lower,\
                     upperdir=/.guest-init/volumes/1/rw/upper,\
                     workdir=/.guest-init/volumes/1/rw/work"
                        .into()
                ),
            ]
        );
        use crate::syscalls::fake::Call;
        for dir in ["upper", "work"] {
            let path = PathBuf::from("/.guest-init/volumes/1/rw").join(dir);
            assert!(sys.calls().contains(&Call::MkdirAll(path)));
        }
    }

    #[test]
    fn a_missing_device_waits_the_timeout_then_is_a_device_failure_naming_the_volume() {
        let sys = Recorder::with_existing(&["/dev/vdd"]);
        let volumes = [
            VolumeMount::read_only("/dev/vdd", "/ro"),
            VolumeMount::overlay("/dev/vdd", "/cache", "/dev/vdx"),
        ];
        let err = mount_all_in(&sys, &volumes).unwrap_err();
        assert_eq!(err.class(), ExitReason::Device);
        assert_eq!(
            err.to_string(),
            "volume_mounts[1] (/cache): block device /dev/vdx did not appear within 1000 ms; \
             attach it to the VM, fix the volume's device in config.json, or raise \
             guest_init.device_timeout_ms"
        );
        use crate::syscalls::Clock;
        assert!(sys.now() >= Duration::from_secs(1));
    }

    #[test]
    fn an_overlay_failure_names_the_volume_and_the_options() {
        let sys = Recorder::with_existing(&["/dev/vdd", "/dev/vde"]);
        sys.fail(Op::mount("/newroot/cache", "overlay"), libc::EINVAL);
        let err = mount_all_in(
            &sys,
            &[VolumeMount::overlay("/dev/vdd", "/cache", "/dev/vde")],
        )
        .unwrap_err();
        assert_eq!(err.class(), ExitReason::Mount);
        assert!(
            err.to_string().starts_with(
                "volume_mounts[0] (/cache): mounting the overlay (lowerdir=/.guest-init/volumes/0/lower,"
            ),
            "{err}"
        );
    }
}
