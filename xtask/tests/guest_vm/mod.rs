//! What the network, systemd, agent-start and drivers VM tests share: the test initrd with the
//! virtio-net modules, guests made of fixture disks, user-network NICs.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde_json::Value;
use system::Arch;
use testkit::vm::{Kernel, NET_MODULES, Nic, TEST_MODULES, Vm, VmSpec, busybox_rootfs, ext4_image};

/// The guest's subnet: the documentation range, as QEMU's user network serves it.
pub const SUBNET: &str = "192.0.2.0/24";
/// QEMU's side of the user network: the gateway the guest routes through.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// QEMU's DNS address (never asked: the tests resolve nothing).
pub const DNS: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 3);
/// The guest's address.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 15);

/// The x86_64 test initrd: guest-init from this workspace, [`TEST_MODULES`] and
/// [`NET_MODULES`] of the host's Debian cloud kernel. Built once per test process.
pub fn network_initrd() -> &'static Path {
    testkit::vm::initrd_once("net-x86_64", || {
        let kernel = Kernel::debian_cloud()?;
        let modules: Vec<&str> = TEST_MODULES.iter().chain(NET_MODULES).copied().collect();
        xtask::initrd::build_test_initrd(
            &xtask::initrd::TestInitrd::new(Arch::X86_64).with_modules(&kernel.modules, &modules),
        )
    })
}

/// `-netdev user` options: the documentation subnet, nothing reachable beyond what
/// `forwards` (`hostfwd=...`, `guestfwd=...`) open.
pub fn user_net(forwards: &[String]) -> String {
    let mut options = format!("net={SUBNET},host={GATEWAY},dns={DNS},restrict=on");
    for forward in forwards {
        options.push(',');
        options.push_str(forward);
    }
    options
}

/// A NIC with QEMU's default MAC.
pub fn nic(forwards: &[String]) -> Nic {
    Nic {
        user: user_net(forwards),
        mac: None,
    }
}

/// The disks of one guest: a rootfs, an empty writable disk and a config disk.
pub struct Guest {
    /// Holds the disks; removed with the guest.
    pub _dir: tempfile::TempDir,
    pub rootfs: PathBuf,
    pub writable: PathBuf,
    pub config: PathBuf,
}

impl Guest {
    /// A busybox rootfs (with `extra` applied to its tree) and `config` (a JSON value, or raw
    /// text when a string).
    pub fn busybox(config: Value, extra: impl FnOnce(&Path)) -> Guest {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("rootfs-tree");
        busybox_rootfs(Arch::X86_64, &tree, Path::new("/")).unwrap();
        extra(&tree);
        let rootfs = dir.path().join("rootfs.img");
        ext4_image(&rootfs, Some(&tree), 64).unwrap();
        Guest::with_rootfs_image(dir, rootfs, config)
    }

    /// `rootfs` (already in `dir`) and `config`.
    pub fn with_rootfs_image(dir: tempfile::TempDir, rootfs: PathBuf, config: Value) -> Guest {
        let writable = dir.path().join("writable.img");
        ext4_image(&writable, None, 64).unwrap();
        let text = match config {
            Value::String(raw) => raw,
            other => serde_json::to_string_pretty(&other).unwrap(),
        };
        let config = dir.path().join("config.img");
        xtask::vm::config_image(&config, &text).unwrap();
        Guest {
            _dir: dir,
            rootfs,
            writable,
            config,
        }
    }

    /// The disks and, when given, a NIC.
    pub fn spec(&self, nic: Option<Nic>) -> VmSpec {
        let mut spec = VmSpec::new(vec![
            self.rootfs.clone(),
            self.writable.clone(),
            self.config.clone(),
        ]);
        spec.nic = nic;
        spec
    }
}

pub fn start(spec: &VmSpec) -> Vm {
    let kernel = Kernel::debian_cloud().unwrap();
    Vm::start_with(&kernel.image, network_initrd(), spec).unwrap()
}
