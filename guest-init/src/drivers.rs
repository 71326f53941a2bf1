//! Drivers on demand: after the always-loaded modules, scan the PCI bus and load each module
//! group of the initrd (`/lib/modules/groups`, format in `guest_protocol::module_groups`) that
//! a present device matches, in the order the builder resolved (modules.dep order).
//!
//! A group's firmware is copied to `/run/guest-init/firmware` (a tmpfs that moves into the new
//! root with `/run`) and the kernel's firmware search path is pointed there *before* the
//! group's modules load, so a driver finds it at probe time and, after the root switch, when
//! the application first opens the device (NVIDIA's GSP firmware loads then): the initramfs
//! itself is out of reach once the root has switched. The `gpu` group also gets the NVIDIA
//! device nodes (`nvidia.rs`). `gpu` in config.json then only checks that the group loaded.
//!
//! The PCI scan and the firmware copy work on a directory root (`/` in production, a fixture
//! tree in tests); module loads, device nodes and reads of `/proc` go through [`Syscalls`].

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use guest_protocol::ExitReason;
use guest_protocol::module_groups::{
    self, FIRMWARE_DIR, GPU_GROUP, GROUPS_FILE, GroupsError, ModuleGroup, PciId,
};

use crate::info;
use crate::modules::{self, ModuleError, Outcome};
use crate::nvidia::{self, NvidiaError};
use crate::syscalls::Syscalls;

/// The PCI functions, relative to the root.
const PCI_DEVICES: &str = "sys/bus/pci/devices";
/// Where firmware is copied to, relative to the root (inside `/run`, which the root switch
/// moves into the new root).
pub const FIRMWARE_RUN: &str = "run/guest-init/firmware";
/// The kernel's custom firmware search path (searched before `/lib/firmware`).
const FIRMWARE_PARAM: &str = "sys/module/firmware_class/parameters/path";
const NVIDIA_VENDOR: u16 = 0x10de;

/// Each message carries its cause in the text (`cause`, not `source`): the fatal path prints a
/// source chain too, and would print it twice.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("cannot read the module groups {path}: {cause}")]
    ReadGroups { path: PathBuf, cause: io::Error },
    #[error("{path}: {cause}; the initrd builder must write this file")]
    BadGroups { path: PathBuf, cause: GroupsError },
    #[error("module group `{group}`: {cause}")]
    Load { group: String, cause: ModuleError },
    #[error(
        "module group `{group}`: copying firmware {from} to {to}: {cause} (is /run large \
         enough? it is a tmpfs in RAM)"
    )]
    Firmware {
        group: String,
        from: PathBuf,
        to: PathBuf,
        cause: io::Error,
    },
    #[error(
        "module group `{group}`: setting the firmware search path in {path}: {cause}; the \
         kernel needs firmware_class (CONFIG_FW_LOADER)"
    )]
    FirmwarePath {
        group: String,
        path: PathBuf,
        cause: io::Error,
    },
    #[error("module group `{group}`: NVIDIA device nodes: {cause}")]
    Nodes { group: String, cause: NvidiaError },
    #[error(
        "config asks for a GPU (`gpu`), but this initrd carries no `{GPU_GROUP}` module group; \
         boot an initrd whose recipe has module_groups.{GPU_GROUP}, or remove `gpu`"
    )]
    NoGpuGroup,
    #[error(
        "config asks for a GPU (`gpu`), but none of the {devices} PCI devices matches the \
         `{GPU_GROUP}` module group ({patterns}); attach the GPU to the VM (VFIO passthrough) \
         or remove `gpu`"
    )]
    NoGpuDevice { patterns: String, devices: usize },
}

impl DriverError {
    /// The exit class: a module that fails to load is a `modules` failure like any other;
    /// the rest is the driver's.
    pub fn class(&self) -> ExitReason {
        match self {
            DriverError::ReadGroups { .. }
            | DriverError::BadGroups { .. }
            | DriverError::Load { .. } => ExitReason::Modules,
            _ => ExitReason::Driver,
        }
    }
}

/// A PCI function: its sysfs name (`0000:00:05.0`) and ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciDevice {
    pub address: String,
    pub id: PciId,
}

/// What the drivers phase did, for the `gpu` check and the log.
#[derive(Debug, Default)]
pub struct Report {
    /// The initrd's groups (empty when it has no groups file).
    pub groups: Vec<ModuleGroup>,
    /// Names of the groups that matched and loaded.
    pub loaded: Vec<String>,
    /// PCI functions seen.
    pub devices: usize,
}

fn read_hex(dir: &Path, name: &str) -> Result<u32, String> {
    let path = dir.join(name);
    let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let digits = text.trim().trim_start_matches("0x");
    u32::from_str_radix(digits, 16)
        .map_err(|_| format!("{}: {:?} is not a hex number", path.display(), text.trim()))
}

/// The PCI functions under `root`, sorted by address, and a warning per unreadable one. No
/// PCI bus (no directory) is no devices.
pub fn scan_pci(root: &Path) -> (Vec<PciDevice>, Vec<String>) {
    let mut devices = Vec::new();
    let mut warnings = Vec::new();
    let Ok(entries) = fs::read_dir(root.join(PCI_DEVICES)) else {
        return (devices, warnings);
    };
    for entry in entries.flatten() {
        let address = entry.file_name().to_string_lossy().into_owned();
        let dir = entry.path();
        let id = (|| {
            Ok::<_, String>(PciId {
                vendor: read_hex(&dir, "vendor")? as u16,
                device: read_hex(&dir, "device")? as u16,
                class: read_hex(&dir, "class")?,
            })
        })();
        match id {
            Ok(id) => devices.push(PciDevice { address, id }),
            Err(warning) => warnings.push(format!("PCI device {address} skipped: {warning}")),
        }
    }
    devices.sort_by(|a, b| a.address.cmp(&b.address));
    (devices, warnings)
}

/// Reads the groups file under `root`, scans the PCI bus and loads every matching group.
pub fn load_on_demand(sys: &dyn Syscalls, root: &Path) -> Result<Report, DriverError> {
    let path = root.join(GROUPS_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Report::default()),
        Err(cause) => return Err(DriverError::ReadGroups { path, cause }),
    };
    let groups = module_groups::parse_groups(&text)
        .map_err(|cause| DriverError::BadGroups { path, cause })?;
    let (devices, warnings) = scan_pci(root);
    for warning in warnings {
        info!("drivers", "{warning}");
    }
    let mut loaded = Vec::new();
    for group in &groups {
        let matched: Vec<&PciDevice> = devices.iter().filter(|d| group.matches(&d.id)).collect();
        let Some(first) = matched.first() else {
            continue;
        };
        info!(
            "drivers",
            "group `{}`: {} matches {} PCI device(s), first {} [{:04x}:{:04x}] class {:06x}",
            group.name,
            patterns(group),
            matched.len(),
            first.address,
            first.id.vendor,
            first.id.device,
            first.id.class
        );
        load_group(sys, root, group, &matched)?;
        loaded.push(group.name.clone());
    }
    Ok(Report {
        devices: devices.len(),
        groups,
        loaded,
    })
}

fn patterns(group: &ModuleGroup) -> String {
    let list: Vec<String> = group.pci.iter().map(ToString::to_string).collect();
    list.join(", ")
}

fn load_group(
    sys: &dyn Syscalls,
    root: &Path,
    group: &ModuleGroup,
    matched: &[&PciDevice],
) -> Result<(), DriverError> {
    if !group.firmware.is_empty() {
        expose_firmware(root, group)?;
    }
    let files: Vec<PathBuf> = group
        .modules
        .iter()
        .map(|m| Path::new("/").join(m))
        .collect();
    let outcomes = modules::load_all(sys, &files).map_err(|cause| DriverError::Load {
        group: group.name.clone(),
        cause,
    })?;
    for (module, outcome) in files.iter().zip(&outcomes) {
        if *outcome != Outcome::Loaded {
            info!("drivers", "{}: {outcome:?}", module.display());
        }
    }
    info!(
        "drivers",
        "group `{}`: {} module(s) loaded",
        group.name,
        files.len()
    );
    let has = |name: &str| {
        files.iter().any(|f| {
            f.file_stem()
                .is_some_and(|s| s.to_string_lossy().replace('-', "_") == name)
        })
    };
    if group.name == GPU_GROUP && has("nvidia") {
        let gpus: Vec<String> = matched
            .iter()
            .filter(|d| d.id.vendor == NVIDIA_VENDOR && d.id.class >> 16 == 0x03)
            .map(|d| d.address.clone())
            .collect();
        let nodes = nvidia::plan_nodes(sys, Path::new("/dev"), &gpus, has("nvidia_modeset"))
            .and_then(|nodes| nvidia::create_nodes(sys, &nodes).map(|()| nodes))
            .map_err(|cause| DriverError::Nodes {
                group: group.name.clone(),
                cause,
            })?;
        let names: Vec<String> = nodes.iter().map(|n| n.path.display().to_string()).collect();
        info!("drivers", "NVIDIA device nodes: {}", names.join(" "));
    }
    Ok(())
}

/// Copies the group's firmware below [`FIRMWARE_RUN`] (paths below `lib/firmware` kept) and
/// points the kernel's search path there.
fn expose_firmware(root: &Path, group: &ModuleGroup) -> Result<(), DriverError> {
    let target_root = root.join(FIRMWARE_RUN);
    let mut bytes = 0;
    for entry in &group.firmware {
        let relative = Path::new(entry)
            .strip_prefix(FIRMWARE_DIR)
            .unwrap_or(Path::new(entry));
        let from = root.join(entry);
        let to = target_root.join(relative);
        bytes += copy_tree(&from, &to).map_err(|cause| DriverError::Firmware {
            group: group.name.clone(),
            from: from.clone(),
            to: to.clone(),
            cause,
        })?;
    }
    let param = root.join(FIRMWARE_PARAM);
    let search = Path::new("/").join(FIRMWARE_RUN);
    // sysfs: the file exists or the parameter does not; never create it.
    let write = fs::OpenOptions::new()
        .write(true)
        .open(&param)
        .and_then(|mut file| {
            io::Write::write_all(&mut file, search.as_os_str().as_encoded_bytes())
        });
    write.map_err(|cause| DriverError::FirmwarePath {
        group: group.name.clone(),
        path: param,
        cause,
    })?;
    info!(
        "drivers",
        "group `{}`: {bytes} bytes of firmware in {} (the kernel's firmware search path)",
        group.name,
        search.display()
    );
    Ok(())
}

/// Copies a file or a directory tree (symlinks followed); returns the bytes copied.
fn copy_tree(from: &Path, to: &Path) -> io::Result<u64> {
    if fs::metadata(from)?.is_dir() {
        fs::create_dir_all(to)?;
        let mut bytes = 0;
        for entry in fs::read_dir(from)? {
            let entry = entry?;
            bytes += copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        Ok(bytes)
    } else {
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::copy(from, to)
    }
}

/// `gpu` in config.json: the `gpu` group must have loaded.
pub fn check_gpu(requested: bool, report: &Report) -> Result<(), DriverError> {
    if !requested || report.loaded.iter().any(|g| g == GPU_GROUP) {
        return Ok(());
    }
    match report.groups.iter().find(|g| g.name == GPU_GROUP) {
        None => Err(DriverError::NoGpuGroup),
        Some(group) => Err(DriverError::NoGpuDevice {
            patterns: patterns(group),
            devices: report.devices,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscalls::fake::{Call, Op, Recorder};

    /// A fixture root: PCI functions, a groups file, firmware, the firmware_class parameter.
    struct Root {
        dir: tempfile::TempDir,
    }

    impl Root {
        fn new(groups: &str) -> Root {
            let root = Root {
                dir: tempfile::tempdir().unwrap(),
            };
            root.write(GROUPS_FILE, groups);
            root.write(FIRMWARE_PARAM, "");
            root
        }

        fn path(&self) -> &Path {
            self.dir.path()
        }

        fn write(&self, relative: &str, text: &str) {
            let path = self.path().join(relative);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        }

        fn pci(&self, address: &str, vendor: &str, device: &str, class: &str) {
            let dir = format!("{PCI_DEVICES}/{address}");
            self.write(&format!("{dir}/vendor"), &format!("0x{vendor}\n"));
            self.write(&format!("{dir}/device"), &format!("0x{device}\n"));
            self.write(&format!("{dir}/class"), &format!("0x{class}\n"));
        }
    }

    const GROUPS: &str = "group gpu\n\
        pci 10de::03\n\
        firmware lib/firmware/nvidia/570\n\
        module lib/modules/k/nvidia.ko\n\
        module lib/modules/k/nvidia-uvm.ko\n\
        group rng\n\
        pci 1af4:1005\n\
        module lib/modules/k/virtio-rng.ko\n";

    const PROC_DEVICES: &str = "Character devices:\n195 nvidia\n510 nvidia-uvm\n";

    fn loads(sys: &Recorder) -> Vec<PathBuf> {
        sys.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::FinitModule(path) => Some(path),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_scan_reads_ids_sorted_and_skips_broken_entries() {
        let root = Root::new("");
        root.pci("0000:00:05.0", "1af4", "1005", "00ff00");
        root.pci("0000:00:01.0", "8086", "7000", "060100");
        root.write(&format!("{PCI_DEVICES}/0000:00:07.0/vendor"), "0x10de\n");
        let (devices, warnings) = scan_pci(root.path());
        assert_eq!(
            devices,
            [
                PciDevice {
                    address: "0000:00:01.0".into(),
                    id: PciId {
                        vendor: 0x8086,
                        device: 0x7000,
                        class: 0x060100
                    }
                },
                PciDevice {
                    address: "0000:00:05.0".into(),
                    id: PciId {
                        vendor: 0x1af4,
                        device: 0x1005,
                        class: 0x00ff00
                    }
                },
            ]
        );
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].starts_with("PCI device 0000:00:07.0 skipped: "),
            "{warnings:?}"
        );
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(scan_pci(empty.path()), (vec![], vec![]));
    }

    #[test]
    fn only_matching_groups_load() {
        let root = Root::new(GROUPS);
        root.pci("0000:00:05.0", "1af4", "1005", "00ff00");
        // NVIDIA's HDMI audio function is not a display controller: no gpu group.
        root.pci("0000:00:06.1", "10de", "22bc", "040300");
        let sys = Recorder::default();
        let report = load_on_demand(&sys, root.path()).unwrap();
        assert_eq!(report.loaded, ["rng"]);
        assert_eq!(report.devices, 2);
        assert_eq!(loads(&sys), [PathBuf::from("/lib/modules/k/virtio-rng.ko")]);
        assert!(
            sys.calls_where(|c| matches!(c, Call::MknodChar { .. }))
                .is_empty()
        );
        let err = check_gpu(true, &report).unwrap_err();
        assert_eq!(err.class(), ExitReason::Driver);
        assert_eq!(
            err.to_string(),
            "config asks for a GPU (`gpu`), but none of the 2 PCI devices matches the `gpu` \
             module group (10de::03); attach the GPU to the VM (VFIO passthrough) or remove `gpu`"
        );
        check_gpu(false, &report).unwrap();
    }

    #[test]
    fn the_gpu_group_gets_firmware_modules_and_nodes_in_order() {
        let root = Root::new(GROUPS);
        root.pci("0000:00:05.0", "10de", "2330", "030200");
        root.write("lib/firmware/nvidia/570/gsp_ga10x.bin", "gsp");
        root.write("lib/firmware/nvidia/570/sub/b.bin", "b");
        let sys = Recorder::default();
        sys.add_file(nvidia::PROC_DEVICES, PROC_DEVICES);
        let report = load_on_demand(&sys, root.path()).unwrap();
        assert_eq!(report.loaded, ["gpu"]);
        check_gpu(true, &report).unwrap();
        assert_eq!(
            loads(&sys),
            [
                PathBuf::from("/lib/modules/k/nvidia.ko"),
                PathBuf::from("/lib/modules/k/nvidia-uvm.ko")
            ]
        );
        let copied = root.path().join("run/guest-init/firmware/nvidia/570");
        assert_eq!(
            fs::read_to_string(copied.join("gsp_ga10x.bin")).unwrap(),
            "gsp"
        );
        assert_eq!(fs::read_to_string(copied.join("sub/b.bin")).unwrap(), "b");
        assert_eq!(
            fs::read_to_string(root.path().join(FIRMWARE_PARAM)).unwrap(),
            "/run/guest-init/firmware"
        );
        let nodes: Vec<String> = sys
            .calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::MknodChar { path, .. } => Some(path.display().to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(
            nodes,
            [
                "/dev/nvidiactl",
                "/dev/nvidia0",
                "/dev/nvidia-uvm",
                "/dev/nvidia-uvm-tools"
            ]
        );
    }

    /// The fatal path prints the message and then every `source()`: the cause must be in one
    /// of them only.
    fn assert_cause_once(err: &DriverError) {
        assert!(
            std::error::Error::source(err).is_none(),
            "{err} also has a source, which the fatal line would print again"
        );
    }

    #[test]
    fn failures_carry_their_class() {
        // Firmware missing from the initrd.
        let root = Root::new(GROUPS);
        root.pci("0000:00:05.0", "10de", "2330", "030000");
        let err = load_on_demand(&Recorder::default(), root.path()).unwrap_err();
        assert_cause_once(&err);
        assert_eq!(err.class(), ExitReason::Driver);
        assert!(
            err.to_string()
                .starts_with("module group `gpu`: copying firmware "),
            "{err}"
        );

        // A module that does not load is a `modules` failure naming group and module.
        let root = Root::new(GROUPS);
        root.pci("0000:00:05.0", "1af4", "1005", "00ff00");
        let sys = Recorder::default();
        sys.fail(
            Op::FinitModule {
                path: "/lib/modules/k/virtio-rng.ko".into(),
            },
            libc::ENOEXEC,
        );
        let err = load_on_demand(&sys, root.path()).unwrap_err();
        assert_eq!(err.class(), ExitReason::Modules);
        assert_cause_once(&err);
        assert!(
            err.to_string().starts_with(
                "module group `rng`: loading kernel module /lib/modules/k/virtio-rng.ko"
            ),
            "{err}"
        );

        // No nvidia major after the driver loaded.
        let root = Root::new(GROUPS);
        root.pci("0000:00:05.0", "10de", "2330", "030000");
        root.write("lib/firmware/nvidia/570/gsp.bin", "gsp");
        let sys = Recorder::default();
        sys.add_file(nvidia::PROC_DEVICES, "Character devices:\n1 mem\n");
        let err = load_on_demand(&sys, root.path()).unwrap_err();
        assert_eq!(err.class(), ExitReason::Driver);
        assert!(
            err.to_string()
                .contains("lists no `nvidia` character device"),
            "{err}"
        );

        let root = Root::new("group a\n");
        let err = load_on_demand(&Recorder::default(), root.path()).unwrap_err();
        assert_eq!(err.class(), ExitReason::Modules);
        assert!(
            err.to_string()
                .contains("line 1: group `a` has no `pci` pattern"),
            "{err}"
        );
    }

    #[test]
    fn no_groups_file_means_nothing_to_do_and_gpu_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let sys = Recorder::default();
        let report = load_on_demand(&sys, dir.path()).unwrap();
        assert!(report.groups.is_empty() && sys.calls().is_empty());
        let err = check_gpu(true, &report).unwrap_err();
        assert!(matches!(err, DriverError::NoGpuGroup));
        assert_eq!(err.class(), ExitReason::Driver);
        check_gpu(false, &report).unwrap();
    }
}
