//! Network: the configured interface over rtnetlink (no tool from the image), loopback, the
//! hostname, and the image's `/etc/resolv.conf`, `/etc/hostname` and `/etc/hosts`.
//!
//! Runs before the root switch, so exec and systemd mode alike start with the network up:
//! [`configure`] right after the config is read (find the interface, MTU, address, link up,
//! default route), [`set_hostname`], then [`write_files`] into the new root once it is
//! mounted. The kernel is reached through the narrow [`Netlink`] trait: [`Rtnetlink`] in
//! production, a recording double in the unit tests.

mod errno;
#[cfg(test)]
mod fake;
mod files;
mod rtnetlink;

use std::fmt;
use std::io;
use std::net::Ipv4Addr;
use std::time::Duration;

use guest_protocol::config::{MacAddress, Network};

use crate::syscalls::{Clock, Machine, Syscalls};

pub use errno::Errno;
pub use files::write_files;
pub use rtnetlink::Rtnetlink;

const LOOPBACK: &str = "lo";
/// The driver of the interface configured when `guest_mac` is not set.
pub const VIRTIO_NET_DRIVER: &str = "virtio_net";
/// How often the interface list is read again while waiting for the NIC.
const POLL: Duration = Duration::from_millis(5);

/// A network interface as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<MacAddress>,
    /// The bound driver (`/sys/class/net/<name>/device/driver`); `None` for virtual ones.
    pub driver: Option<String>,
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name)?;
        if let Some(mac) = self.mac {
            write!(f, " {mac}")?;
        }
        if let Some(driver) = &self.driver {
            write!(f, " ({driver})")?;
        }
        Ok(())
    }
}

/// The rtnetlink requests of the network phase. Errors carry the kernel's errno and, when it
/// sent one, its extended-ack message.
pub trait Netlink {
    /// Every interface (`RTM_GETLINK` dump), with its driver.
    fn links(&self) -> Result<Vec<Link>, Errno>;
    fn set_mtu(&self, link: u32, mtu: u32) -> Result<(), Errno>;
    /// The address with its prefix route (`ip addr add IP/PREFIX dev LINK`).
    fn add_address(&self, link: u32, ip: Ipv4Addr, prefix_len: u8) -> Result<(), Errno>;
    fn set_up(&self, link: u32) -> Result<(), Errno>;
    /// `ip route add default via GATEWAY dev LINK`.
    fn add_default_route(&self, link: u32, gateway: Ipv4Addr) -> Result<(), Errno>;
}

/// Each message is complete: causes are part of the text, not `source()` (the fatal path
/// prints a source chain after the message).
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("listing network interfaces: {0}")]
    ListLinks(Errno),
    #[error("no {wanted} appeared within {timeout_ms} ms (interfaces: {seen}); {hint}")]
    NoInterface {
        wanted: String,
        timeout_ms: u128,
        seen: String,
        hint: &'static str,
    },
    #[error("{interface}: {action}: {errno}{hint}")]
    Step {
        interface: String,
        action: String,
        errno: Errno,
        /// Empty, or `; ` and what to change.
        hint: String,
    },
    #[error("setting the hostname {name:?}: {cause}")]
    Hostname { name: String, cause: io::Error },
    #[error("writing {path} in the new root: {cause}")]
    WriteFile {
        path: std::path::PathBuf,
        cause: io::Error,
    },
    #[error("bringing up loopback: {0}")]
    Loopback(io::Error),
}

/// What [`configure`] set up, for the log.
#[derive(Debug, PartialEq, Eq)]
pub struct Configured {
    pub link: Link,
    /// How long the interface took to appear.
    pub waited: Duration,
}

/// Configure the interface `network` asks for: MTU, address, up, default route. The NIC may
/// still be probing when this starts: the interface list is read again until `timeout`.
pub fn configure(
    net: &dyn Netlink,
    clock: &dyn Clock,
    network: &Network,
    timeout: Duration,
) -> Result<Configured, NetworkError> {
    let start = clock.now();
    let link = find_interface(net, clock, network.mac, timeout)?;
    let waited = clock.now().saturating_sub(start);
    let step = |action: String, hint: String| {
        let interface = link.name.clone();
        move |errno| NetworkError::Step {
            interface,
            action,
            errno,
            hint,
        }
    };
    if let Some(mtu) = network.mtu {
        net.set_mtu(link.index, mtu).map_err(step(
            format!("setting MTU {mtu}"),
            "; guest_mtu must be within what the device supports (virtio-net: 68 to 65535)".into(),
        ))?;
    }
    let address = format!("{}/{}", network.ip, network.prefix_len);
    net.add_address(link.index, network.ip, network.prefix_len)
        .map_err(step(format!("adding address {address}"), String::new()))?;
    net.set_up(link.index)
        .map_err(step("bringing the link up".into(), String::new()))?;
    if let Some(gateway) = network.gateway {
        let hint = if network.contains(gateway) {
            String::new()
        } else {
            format!(
                "; guest_gw {gateway} is outside {}/{} (guest_ip/guest_cidr): the gateway \
                 must be in the guest's subnet",
                network.subnet(),
                network.prefix_len
            )
        };
        net.add_default_route(link.index, gateway).map_err(step(
            format!("adding the default route via {gateway}"),
            hint,
        ))?;
    }
    Ok(Configured { link, waited })
}

/// The interface with `mac`, or the first virtio-net one (lowest index), waiting up to
/// `timeout` for it to appear.
fn find_interface(
    net: &dyn Netlink,
    clock: &dyn Clock,
    mac: Option<MacAddress>,
    timeout: Duration,
) -> Result<Link, NetworkError> {
    let start = clock.now();
    loop {
        let mut links = net.links().map_err(NetworkError::ListLinks)?;
        links.sort_by_key(|link| link.index);
        let found = links.iter().find(|link| match mac {
            Some(mac) => link.mac == Some(mac),
            None => link.driver.as_deref() == Some(VIRTIO_NET_DRIVER),
        });
        if let Some(link) = found {
            return Ok(link.clone());
        }
        let waited = clock.now().saturating_sub(start);
        if waited >= timeout {
            let seen: Vec<String> = links.iter().map(ToString::to_string).collect();
            let (wanted, hint) = match mac {
                Some(mac) => (
                    format!("interface with MAC {mac} (guest_mac)"),
                    "guest_mac must name the MAC address the VM's NIC was given",
                ),
                None => (
                    "virtio-net interface".to_owned(),
                    "network_enabled needs a virtio-net device in the VM (Cloud Hypervisor \
                     --net, QEMU -device virtio-net-pci) and, when the kernel builds it as a \
                     module, virtio_net (with failover, net_failover) in the initrd's load order",
                ),
            };
            return Err(NetworkError::NoInterface {
                wanted,
                timeout_ms: timeout.as_millis(),
                seen: if seen.is_empty() {
                    "none".into()
                } else {
                    seen.join(", ")
                },
                hint,
            });
        }
        clock.sleep(POLL);
    }
}

/// The kernel's hostname (`hostname` in config.json).
pub fn set_hostname(sys: &dyn Syscalls, name: &str) -> Result<(), NetworkError> {
    sys.sethostname(name)
        .map_err(|cause| NetworkError::Hostname {
            name: name.to_owned(),
            cause,
        })
}

/// `ip link set lo up`: many programs talk to 127.0.0.1 even without a network.
pub fn loopback_up(sys: &dyn Machine) -> Result<(), NetworkError> {
    let flags = sys
        .interface_flags(LOOPBACK)
        .map_err(NetworkError::Loopback)?;
    let up = (libc::IFF_UP | libc::IFF_RUNNING) as i16;
    sys.set_interface_flags(LOOPBACK, flags | up)
        .map_err(NetworkError::Loopback)
}

#[cfg(test)]
mod tests {
    use super::fake::{FakeNetlink, NetCall, NetOp};
    use super::*;
    use crate::syscalls::fake::Recorder;

    const MAC_A: MacAddress = MacAddress([0x52, 0x54, 0, 0, 0, 0xa]);
    const MAC_B: MacAddress = MacAddress([0x52, 0x54, 0, 0, 0, 0xb]);
    const TIMEOUT: Duration = Duration::from_millis(100);

    fn link(index: u32, name: &str, mac: Option<MacAddress>, driver: Option<&str>) -> Link {
        Link {
            index,
            name: name.into(),
            mac,
            driver: driver.map(str::to_owned),
        }
    }

    fn two_nics() -> FakeNetlink {
        FakeNetlink::with_links(vec![
            link(3, "eth1", Some(MAC_B), Some(VIRTIO_NET_DRIVER)),
            link(1, "lo", Some(MacAddress([0; 6])), None),
            link(2, "eth0", Some(MAC_A), Some(VIRTIO_NET_DRIVER)),
        ])
    }

    fn network() -> Network {
        Network::new(Ipv4Addr::new(192, 0, 2, 15), 24).with_gateway(Ipv4Addr::new(192, 0, 2, 2))
    }

    #[test]
    fn configures_the_first_virtio_nic_in_order_mtu_address_up_route() {
        let net = two_nics();
        let clock = Recorder::default();
        let done = configure(&net, &clock, &network().with_mtu(1400), TIMEOUT).unwrap();
        assert_eq!(done.link.name, "eth0");
        assert_eq!(done.waited, Duration::ZERO);
        assert_eq!(
            net.calls(),
            [
                NetCall::Links,
                NetCall::SetMtu(2, 1400),
                NetCall::AddAddress(2, Ipv4Addr::new(192, 0, 2, 15), 24),
                NetCall::SetUp(2),
                NetCall::AddDefaultRoute(2, Ipv4Addr::new(192, 0, 2, 2)),
            ]
        );
    }

    #[test]
    fn guest_mac_picks_the_interface_and_no_gateway_means_no_route() {
        let net = two_nics();
        let clock = Recorder::default();
        let only_address = Network::new(Ipv4Addr::new(10, 0, 0, 2), 8).with_mac(MAC_B);
        let done = configure(&net, &clock, &only_address, TIMEOUT).unwrap();
        assert_eq!(done.link.name, "eth1");
        assert_eq!(
            net.calls(),
            [
                NetCall::Links,
                NetCall::AddAddress(3, Ipv4Addr::new(10, 0, 0, 2), 8),
                NetCall::SetUp(3),
            ]
        );
    }

    #[test]
    fn waits_for_a_nic_that_is_still_probing() {
        let net = FakeNetlink::with_links(vec![link(1, "lo", None, None)]);
        net.appear_after_lists(3, link(2, "eth0", Some(MAC_A), Some(VIRTIO_NET_DRIVER)));
        let clock = Recorder::default();
        let done = configure(&net, &clock, &network(), TIMEOUT).unwrap();
        assert_eq!(done.link.name, "eth0");
        assert_eq!(done.waited, POLL * 3);
    }

    #[test]
    fn no_virtio_nic_names_what_is_there_and_the_fix() {
        let net = FakeNetlink::with_links(vec![link(1, "lo", None, None)]);
        let clock = Recorder::default();
        let err = configure(&net, &clock, &network(), TIMEOUT).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("no virtio-net interface appeared within 100 ms (interfaces: lo); "),
            "{text}"
        );
        assert!(
            text.contains("virtio_net (with failover, net_failover)"),
            "{text}"
        );
        // Nothing was changed on the way.
        assert!(net.calls().iter().all(|call| *call == NetCall::Links));
    }

    #[test]
    fn an_unknown_guest_mac_lists_the_macs_present() {
        let net = two_nics();
        let clock = Recorder::default();
        let unknown = MacAddress([2, 0, 0, 0, 0, 1]);
        let err = configure(&net, &clock, &network().with_mac(unknown), TIMEOUT).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no interface with MAC 02:00:00:00:00:01 (guest_mac) appeared within 100 ms \
             (interfaces: lo 00:00:00:00:00:00, eth0 52:54:00:00:00:0a (virtio_net), \
             eth1 52:54:00:00:00:0b (virtio_net)); guest_mac must name the MAC address the \
             VM's NIC was given"
        );
    }

    #[test]
    fn a_gateway_outside_the_subnet_names_interface_gateway_errno_and_subnet() {
        let net = two_nics();
        net.fail(NetOp::AddDefaultRoute, Errno::new(libc::ENETUNREACH));
        let clock = Recorder::default();
        let outside =
            Network::new(Ipv4Addr::new(192, 0, 2, 15), 24).with_gateway(Ipv4Addr::new(10, 9, 9, 1));
        let err = configure(&net, &clock, &outside, TIMEOUT).unwrap_err();
        assert_eq!(
            err.to_string(),
            "eth0: adding the default route via 10.9.9.1: Network is unreachable \
             (ENETUNREACH, os error 101); guest_gw 10.9.9.1 is outside 192.0.2.0/24 \
             (guest_ip/guest_cidr): the gateway must be in the guest's subnet"
        );
        // The errno is in the text, not a source: the fatal path would print it again.
        assert!(std::error::Error::source(&err).is_none());
    }

    #[test]
    fn each_failing_step_is_named_with_the_kernel_s_message() {
        let cases = [
            (
                NetOp::SetMtu,
                Errno::with_message(libc::EINVAL, "MTU greater than device maximum"),
                "eth0: setting MTU 1400: Invalid argument (EINVAL, os error 22; kernel: MTU \
                 greater than device maximum); guest_mtu must be",
            ),
            (
                NetOp::AddAddress,
                Errno::new(libc::EEXIST),
                "eth0: adding address 192.0.2.15/24: File exists (EEXIST, os error 17)",
            ),
            (
                NetOp::SetUp,
                Errno::new(libc::EPERM),
                "eth0: bringing the link up: Operation not permitted (EPERM, os error 1)",
            ),
        ];
        for (op, errno, expected) in cases {
            let net = two_nics();
            net.fail(op.clone(), errno);
            let clock = Recorder::default();
            let err = configure(&net, &clock, &network().with_mtu(1400), TIMEOUT).unwrap_err();
            assert!(err.to_string().starts_with(expected), "{op:?}: {err}");
            assert!(
                !net.calls()
                    .contains(&NetCall::AddDefaultRoute(2, Ipv4Addr::new(192, 0, 2, 2))),
                "{op:?}: continued after the failure"
            );
        }
    }

    #[test]
    fn a_failing_interface_list_is_reported() {
        let net = two_nics();
        net.fail(NetOp::Links, Errno::new(libc::EACCES));
        let err = configure(&net, &Recorder::default(), &network(), TIMEOUT).unwrap_err();
        assert_eq!(
            err.to_string(),
            "listing network interfaces: Permission denied (EACCES, os error 13)"
        );
    }

    #[test]
    fn hostname_failure_names_the_hostname() {
        use crate::syscalls::fake::{Call, Op};
        let sys = Recorder::default();
        set_hostname(&sys, "web-1").unwrap();
        assert_eq!(sys.calls(), [Call::Sethostname("web-1".into())]);
        sys.fail(Op::Sethostname, libc::EPERM);
        let err = set_hostname(&sys, "web-1").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("setting the hostname \"web-1\": "),
            "{err}"
        );
    }

    #[test]
    fn loopback_up_keeps_its_flags_and_adds_up_and_running() {
        let sys = Recorder::default();
        let loopback = libc::IFF_LOOPBACK as i16;
        sys.add_interface("lo", loopback);
        loopback_up(&sys).unwrap();
        let up = (libc::IFF_UP | libc::IFF_RUNNING) as i16;
        assert_eq!(sys.interface("lo"), Some(loopback | up));
    }

    #[test]
    fn loopback_failure_is_reported_not_fatal_here() {
        use crate::syscalls::fake::{Call, Op};
        let sys = Recorder::default();
        sys.add_interface("lo", 0);
        sys.fail(Op::InterfaceFlags, libc::EPERM);
        let err = loopback_up(&sys).unwrap_err();
        assert!(
            err.to_string().starts_with("bringing up loopback: "),
            "{err}"
        );
        assert!(
            !sys.calls()
                .iter()
                .any(|call| matches!(call, Call::SetInterfaceFlags(..)))
        );
    }
}
