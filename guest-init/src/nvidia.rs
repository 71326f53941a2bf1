//! NVIDIA device nodes. The driver registers character devices but creates no nodes (nothing
//! in a microVM runs `nvidia-modprobe`), so guest-init makes them after the `gpu` group loads:
//!
//! | node                    | major                        | minor                         |
//! |-------------------------|------------------------------|-------------------------------|
//! | `/dev/nvidiactl`        | `nvidia` in /proc/devices    | 255                           |
//! | `/dev/nvidia<N>`        | `nvidia`                     | N, per GPU                    |
//! | `/dev/nvidia-modeset`   | `nvidia`                     | 254 (when nvidia-modeset is loaded) |
//! | `/dev/nvidia-uvm`       | `nvidia-uvm` in /proc/devices| 0                             |
//! | `/dev/nvidia-uvm-tools` | `nvidia-uvm`                 | 1                             |
//!
//! N is the GPU's `Device Minor` from `/proc/driver/nvidia/gpus/<pci address>/information`,
//! or its position among the matched GPUs (by PCI address) when the driver does not say.
//! Nodes are 0666, as nvidia-modprobe makes them.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use crate::syscalls::Syscalls;

pub const PROC_DEVICES: &str = "/proc/devices";
/// `nvidia-frontend` on old drivers.
const NVIDIA_NAMES: [&str; 2] = ["nvidia", "nvidia-frontend"];
const UVM_NAME: &str = "nvidia-uvm";
const CTL_MINOR: u32 = 255;
const MODESET_MINOR: u32 = 254;
pub const NODE_MODE: u32 = 0o666;

/// Causes are part of the message (`cause`, not `source`), so the fatal line prints them once.
#[derive(Debug, thiserror::Error)]
pub enum NvidiaError {
    #[error("reading {path}: {cause}")]
    Read { path: PathBuf, cause: io::Error },
    #[error("{path}:{line}: {text:?} is not `<major> <name>`")]
    BadLine {
        path: PathBuf,
        line: usize,
        text: String,
    },
    #[error(
        "the NVIDIA driver loaded but {PROC_DEVICES} lists no `nvidia` character device; \
         check the driver's kernel messages (dmesg) and that it matches the kernel"
    )]
    NoMajor,
    #[error("creating {path} (char {major}:{minor}): {cause}")]
    Mknod {
        path: PathBuf,
        major: u32,
        minor: u32,
        cause: io::Error,
    },
}

/// The character devices of `/proc/devices`: name to major.
pub fn parse_char_majors(text: &str, path: &Path) -> Result<BTreeMap<String, u32>, NvidiaError> {
    let mut majors = BTreeMap::new();
    let mut in_char = false;
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        if line.ends_with(':') {
            in_char = line == "Character devices:";
            continue;
        }
        if !in_char {
            continue;
        }
        let parsed = line
            .split_once(char::is_whitespace)
            .and_then(|(major, name)| Some((major.parse::<u32>().ok()?, name.trim())));
        let Some((major, name)) = parsed.filter(|(_, name)| !name.is_empty()) else {
            return Err(NvidiaError::BadLine {
                path: path.to_owned(),
                line: index + 1,
                text: line.to_owned(),
            });
        };
        majors.insert(name.to_owned(), major);
    }
    Ok(majors)
}

/// The `Device Minor:` of the driver's information file.
pub fn parse_device_minor(information: &str) -> Option<u32> {
    information.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "Device Minor").then(|| value.trim().parse().ok())?
    })
}

/// One node to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub path: PathBuf,
    pub major: u32,
    pub minor: u32,
}

/// The nodes for GPUs at `addresses` (sorted PCI addresses), with the driver's minors where
/// `/proc/driver/nvidia` has them. `modeset`: nvidia-modeset is loaded.
pub fn plan_nodes(
    sys: &dyn Syscalls,
    dev: &Path,
    addresses: &[String],
    modeset: bool,
) -> Result<Vec<Node>, NvidiaError> {
    let path = Path::new(PROC_DEVICES);
    let text = sys
        .read_to_string(path)
        .map_err(|cause| NvidiaError::Read {
            path: path.to_owned(),
            cause,
        })?;
    let majors = parse_char_majors(&text, path)?;
    let major = NVIDIA_NAMES
        .iter()
        .find_map(|name| majors.get(*name).copied())
        .ok_or(NvidiaError::NoMajor)?;
    let node = |name: &str, major: u32, minor: u32| Node {
        path: dev.join(name),
        major,
        minor,
    };
    let mut nodes = vec![node("nvidiactl", major, CTL_MINOR)];
    for (index, address) in addresses.iter().enumerate() {
        let info = format!("/proc/driver/nvidia/gpus/{address}/information");
        let minor = sys
            .read_to_string(Path::new(&info))
            .ok()
            .and_then(|text| parse_device_minor(&text))
            .unwrap_or(index as u32);
        nodes.push(node(&format!("nvidia{minor}"), major, minor));
    }
    if modeset {
        nodes.push(node("nvidia-modeset", major, MODESET_MINOR));
    }
    if let Some(&uvm) = majors.get(UVM_NAME) {
        nodes.push(node("nvidia-uvm", uvm, 0));
        nodes.push(node("nvidia-uvm-tools", uvm, 1));
    }
    Ok(nodes)
}

/// Makes `nodes`; one that exists already is kept.
pub fn create_nodes(sys: &dyn Syscalls, nodes: &[Node]) -> Result<(), NvidiaError> {
    for node in nodes {
        match sys.mknod_char(&node.path, NODE_MODE, node.major, node.minor) {
            Ok(()) => {}
            Err(err) if err.raw_os_error() == Some(libc::EEXIST) => {}
            Err(cause) => {
                return Err(NvidiaError::Mknod {
                    path: node.path.clone(),
                    major: node.major,
                    minor: node.minor,
                    cause,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscalls::fake::{Call, Op, Recorder};

    /// A guest's /proc/devices with the NVIDIA driver and UVM loaded.
    const PROC: &str = "Character devices:\n\
          1 mem\n\
          4 /dev/vc/0\n\
          5 /dev/tty\n\
        195 nvidia\n\
        195 nvidiactl\n\
        226 drm\n\
        510 nvidia-uvm\n\
        511 nvidia-caps\n\
        \n\
        Block devices:\n\
        254 virtblk\n\
        259 blkext\n";

    #[test]
    fn proc_devices_char_section_only() {
        let majors = parse_char_majors(PROC, Path::new(PROC_DEVICES)).unwrap();
        assert_eq!(majors["nvidia"], 195);
        assert_eq!(majors["nvidia-uvm"], 510);
        assert_eq!(majors["/dev/vc/0"], 4);
        // Block majors are another namespace.
        assert!(!majors.contains_key("virtblk"));
        let err = parse_char_majors("Character devices:\nx nvidia\n", Path::new(PROC_DEVICES))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "/proc/devices:2: \"x nvidia\" is not `<major> <name>`"
        );
        assert!(parse_char_majors("Character devices:\n195\n", Path::new("p")).is_err());
    }

    #[test]
    fn device_minor_from_the_driver_s_information() {
        let info = "Model: \t\t NVIDIA H100 80GB HBM3\nIRQ:   \t\t 42\nDevice Minor: \t 3\nBus Location: \t 0000:01:00.0\n";
        assert_eq!(parse_device_minor(info), Some(3));
        assert_eq!(parse_device_minor("Model: x\n"), None);
    }

    fn made(sys: &Recorder) -> Vec<(String, u32, u32, u32)> {
        sys.calls()
            .into_iter()
            .filter_map(|call| match call {
                Call::MknodChar {
                    path,
                    mode,
                    major,
                    minor,
                } => Some((path.display().to_string(), mode, major, minor)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn nodes_for_two_gpus_with_uvm() {
        let sys = Recorder::default();
        sys.add_file(PROC_DEVICES, PROC);
        // The driver says the second GPU is minor 0 and the first minor 1.
        sys.add_file(
            "/proc/driver/nvidia/gpus/0000:00:05.0/information",
            "Device Minor: 1\n",
        );
        sys.add_file(
            "/proc/driver/nvidia/gpus/0000:00:06.0/information",
            "Device Minor: 0\n",
        );
        let addresses = ["0000:00:05.0".to_owned(), "0000:00:06.0".to_owned()];
        let nodes = plan_nodes(&sys, Path::new("/dev"), &addresses, false).unwrap();
        create_nodes(&sys, &nodes).unwrap();
        assert_eq!(
            made(&sys),
            [
                ("/dev/nvidiactl".to_owned(), 0o666, 195, 255),
                ("/dev/nvidia1".to_owned(), 0o666, 195, 1),
                ("/dev/nvidia0".to_owned(), 0o666, 195, 0),
                ("/dev/nvidia-uvm".to_owned(), 0o666, 510, 0),
                ("/dev/nvidia-uvm-tools".to_owned(), 0o666, 510, 1),
            ]
        );
    }

    #[test]
    fn without_driver_information_gpus_number_in_address_order_and_modeset_is_made() {
        let sys = Recorder::default();
        sys.add_file(
            PROC_DEVICES,
            "Character devices:\n195 nvidia-frontend\nBlock devices:\n",
        );
        let addresses = ["0000:00:05.0".to_owned()];
        let nodes = plan_nodes(&sys, Path::new("/dev"), &addresses, true).unwrap();
        let names: Vec<String> = nodes.iter().map(|n| n.path.display().to_string()).collect();
        // No nvidia-uvm in /proc/devices: no UVM nodes.
        assert_eq!(
            names,
            ["/dev/nvidiactl", "/dev/nvidia0", "/dev/nvidia-modeset"]
        );
        assert_eq!(nodes[2].minor, 254);
    }

    #[test]
    fn no_nvidia_major_is_an_error_and_existing_nodes_are_kept() {
        let sys = Recorder::default();
        sys.add_file(PROC_DEVICES, "Character devices:\n1 mem\n");
        let err = plan_nodes(&sys, Path::new("/dev"), &[], false).unwrap_err();
        assert!(matches!(err, NvidiaError::NoMajor), "{err}");

        let sys = Recorder::default();
        sys.add_file(PROC_DEVICES, PROC);
        let nodes = plan_nodes(&sys, Path::new("/dev"), &[], false).unwrap();
        sys.fail(
            Op::MknodChar {
                path: "/dev/nvidiactl".into(),
            },
            libc::EEXIST,
        );
        create_nodes(&sys, &nodes).unwrap();
        assert_eq!(made(&sys).len(), 3);
        sys.fail(
            Op::MknodChar {
                path: "/dev/nvidia-uvm".into(),
            },
            libc::EPERM,
        );
        let err = create_nodes(&sys, &nodes).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("creating /dev/nvidia-uvm (char 510:0): "),
            "{err}"
        );
    }
}
