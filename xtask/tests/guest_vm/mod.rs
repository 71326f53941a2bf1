//! What the network, systemd, agent-start and drivers VM tests share: the test initrd with the
//! virtio-net modules, guests made of fixture disks, user-network NICs.

use std::net::Ipv4Addr;
use std::path::Path;

use system::Arch;
pub use testkit::vm::Guest;
use testkit::vm::{Kernel, NET_MODULES, Nic, TEST_MODULES, Vm, VmSpec};

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

pub fn start(spec: &VmSpec) -> Vm {
    let kernel = Kernel::debian_cloud().unwrap();
    Vm::start_with(&kernel.image, network_initrd(), spec).unwrap()
}
