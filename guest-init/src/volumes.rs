//! Volumes from `volume_mounts`, mounted inside the new root before it becomes `/`.
//! `ro` and `rw` are supported; `overlay` is refused until it is implemented.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::mount::{self, MountError};
use crate::syscalls::{MountFlags, Syscalls};
use guest_protocol::config::{Config, VolumeMode, VolumeMount};

/// Filesystems tried for a volume device, in order.
pub const VOLUME_TYPES: [&str; 2] = ["ext4", "erofs"];

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error(
        "volume_mounts[{index}] ({device} on {path}) uses mode \"overlay\", which this \
         guest-init does not support yet; use \"ro\" or \"rw\""
    )]
    OverlayUnsupported {
        index: usize,
        device: PathBuf,
        path: PathBuf,
    },
    #[error("volume_mounts[{index}]: {source}")]
    Mount { index: usize, source: MountError },
}

pub fn check_supported(config: &Config) -> Result<(), VolumeError> {
    for (index, volume) in config.volume_mounts.iter().enumerate() {
        if volume.mode == VolumeMode::Overlay {
            return Err(VolumeError::OverlayUnsupported {
                index,
                device: volume.device.clone(),
                path: volume.path.clone(),
            });
        }
    }
    Ok(())
}

pub fn mount_all(
    sys: &dyn Syscalls,
    volumes: &[VolumeMount],
    new_root: &Path,
    timeout: Duration,
) -> Result<(), VolumeError> {
    for (index, volume) in volumes.iter().enumerate() {
        let wrap = |source| VolumeError::Mount { index, source };
        mount::wait_for_device(sys, &volume.device, timeout).map_err(wrap)?;
        let target = new_root.join(volume.path.strip_prefix("/").unwrap_or(&volume.path));
        let flags = match volume.mode {
            VolumeMode::ReadOnly => MountFlags::RDONLY,
            _ => MountFlags::empty(),
        };
        mount::mount_device(sys, &volume.device, &target, &VOLUME_TYPES, flags).map_err(wrap)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscalls::fake::Recorder;

    #[test]
    fn ro_and_rw_volumes_mount_inside_the_new_root() {
        let sys = Recorder::with_existing(&["/dev/vdd", "/dev/vde"]);
        let volumes = [
            VolumeMount {
                device: "/dev/vdd".into(),
                path: "/data".into(),
                mode: VolumeMode::ReadWrite,
                overlay_device: None,
            },
            VolumeMount {
                device: "/dev/vde".into(),
                path: "/srv/static".into(),
                mode: VolumeMode::ReadOnly,
                overlay_device: None,
            },
        ];
        mount_all(
            &sys,
            &volumes,
            Path::new("/newroot"),
            Duration::from_secs(1),
        )
        .unwrap();
        let mounts = sys.mounts();
        assert_eq!(mounts[0].1, "/newroot/data");
        assert_eq!(mounts[0].3, MountFlags::empty());
        assert_eq!(mounts[1].1, "/newroot/srv/static");
        assert_eq!(mounts[1].3, MountFlags::RDONLY);
    }

    #[test]
    fn overlay_volumes_are_refused() {
        let mut config = Config::default();
        config.volume_mounts.push(VolumeMount {
            device: "/dev/vdd".into(),
            path: "/data".into(),
            mode: VolumeMode::Overlay,
            overlay_device: Some("/dev/vde".into()),
        });
        let err = check_supported(&config).unwrap_err();
        assert!(err.to_string().contains("does not support yet"));
    }
}
