//! [`Netlink`] on the kernel: each request on its own `NETLINK_ROUTE` socket (the phase makes a
//! handful), blocking, no async runtime. The bytes are [`message`]'s. Extended acks are asked
//! for, so a refusal carries the kernel's own explanation.

mod message;

use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use message::{NLM_F_ACK, NLM_F_DUMP, Reply, Request};

use super::{Errno, Link, Netlink};

/// Where an interface's bound driver is linked.
const SYS_CLASS_NET: &str = "/sys/class/net";
/// Larger than any datagram the kernel sends (a dump part is at most 32 KiB, or a page).
const RECEIVE_BUFFER: usize = 64 * 1024;

pub struct Rtnetlink;

impl Netlink for Rtnetlink {
    fn links(&self) -> Result<Vec<Link>, Errno> {
        let mut links = request(&Request::links())?;
        for link in &mut links {
            link.driver = driver(&link.name);
        }
        Ok(links)
    }

    fn set_mtu(&self, link: u32, mtu: u32) -> Result<(), Errno> {
        request(&Request::set_mtu(link, mtu)).map(drop)
    }

    fn add_address(&self, link: u32, ip: Ipv4Addr, prefix_len: u8) -> Result<(), Errno> {
        request(&Request::add_address(link, ip, prefix_len)).map(drop)
    }

    fn set_up(&self, link: u32) -> Result<(), Errno> {
        request(&Request::set_up(link)).map(drop)
    }

    fn add_default_route(&self, link: u32, gateway: Ipv4Addr) -> Result<(), Errno> {
        request(&Request::add_default_route(link, gateway)).map(drop)
    }
}

/// The driver bound to the interface's device, from sysfs (netlink does not say).
fn driver(name: &str) -> Option<String> {
    if name.is_empty() || name.contains('/') {
        return None;
    }
    let target = fs::read_link(Path::new(SYS_CLASS_NET).join(name).join("device/driver")).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

/// Sends one request and reads its replies until the ack or, for a dump, the end; returns the
/// links among them (a link dump's).
fn request(request: &Request) -> Result<Vec<Link>, Errno> {
    let io = |err: io::Error| Errno::from_io(&err);
    let socket = Socket::route().map_err(io)?;
    socket.send(&request.encode(1)).map_err(io)?;

    let mut links = Vec::new();
    let mut buffer = vec![0; RECEIVE_BUFFER];
    loop {
        let size = socket.receive(&mut buffer).map_err(io)?;
        if size > buffer.len() {
            return Err(Errno::with_message(
                libc::EMSGSIZE,
                format!("a {size}-byte netlink reply does not fit the receive buffer"),
            ));
        }
        let datagram = message::parse(&buffer[..size])
            .map_err(|err| Errno::with_message(libc::EPROTO, err.to_string()))?;
        for reply in datagram {
            match reply {
                Reply::Ack { error: 0, .. } | Reply::Done { error: 0, .. } => return Ok(links),
                Reply::Ack { error, message } | Reply::Done { error, message } => {
                    return Err(Errno {
                        code: error.saturating_abs(),
                        message,
                    });
                }
                Reply::Link(link) => links.push(link),
                Reply::Other => {}
            }
        }
        // A request that is neither acked nor a dump ends with its one reply.
        if request.flags & (NLM_F_ACK | NLM_F_DUMP) == 0 {
            return Ok(links);
        }
    }
}

/// A `NETLINK_ROUTE` socket connected to the kernel, closed on drop.
struct Socket(OwnedFd);

impl Socket {
    fn route() -> io::Result<Socket> {
        // SAFETY: plain integer arguments.
        let fd = check(unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        })?;
        // SAFETY: a descriptor just returned by socket(2), owned by nothing else.
        let socket = Socket(unsafe { OwnedFd::from_raw_fd(fd) });
        // Best effort: old kernels answer without the explanation, or echo the full request.
        socket.enable(libc::NETLINK_EXT_ACK);
        socket.enable(libc::NETLINK_CAP_ACK);
        // Port 0 is the kernel; connecting binds this socket to a port of its own.
        // SAFETY: an all-zero sockaddr_nl is valid; the family is set below.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: the address is a live sockaddr_nl of the size passed.
        check(unsafe {
            libc::connect(
                socket.0.as_raw_fd(),
                (&raw const kernel).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        })?;
        Ok(socket)
    }

    fn enable(&self, option: libc::c_int) {
        let on: libc::c_int = 1;
        // SAFETY: the option value is a live c_int of the size passed.
        unsafe {
            libc::setsockopt(
                self.0.as_raw_fd(),
                libc::SOL_NETLINK,
                option,
                (&raw const on).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }

    fn send(&self, bytes: &[u8]) -> io::Result<()> {
        loop {
            // SAFETY: the pointer and length are those of a live slice.
            let sent =
                unsafe { libc::send(self.0.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
            match usize::try_from(sent) {
                Ok(sent) if sent == bytes.len() => return Ok(()),
                Ok(_) => return Err(io::Error::other("netlink request sent in part")),
                Err(_) => retry_on_interrupt()?,
            }
        }
    }

    /// One datagram into `buffer`; returns its full size, which exceeds the buffer's when it
    /// was cut short (`MSG_TRUNC`).
    fn receive(&self, buffer: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: the pointer and length are those of a live, writable slice.
            let size = unsafe {
                libc::recv(
                    self.0.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    libc::MSG_TRUNC,
                )
            };
            match usize::try_from(size) {
                Ok(size) => return Ok(size),
                Err(_) => retry_on_interrupt()?,
            }
        }
    }
}

/// `Ok` when the last call failed with `EINTR` (call it again), the error otherwise.
fn retry_on_interrupt() -> io::Result<()> {
    let err = io::Error::last_os_error();
    match err.kind() {
        io::ErrorKind::Interrupted => Ok(()),
        _ => Err(err),
    }
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

#[cfg(test)]
mod tests {
    use guest_protocol::config::MacAddress;

    use super::*;

    #[test]
    fn a_name_with_a_slash_never_reaches_sysfs() {
        assert_eq!(driver("../x"), None);
        assert_eq!(driver(""), None);
    }

    /// The host kernel answers the same socket code: a dump lists loopback, a request for a
    /// link that does not exist comes back refused (ENODEV as root, EPERM otherwise).
    #[test]
    fn the_kernel_lists_loopback_and_refuses_a_missing_link() {
        let links = Rtnetlink.links().unwrap();
        let lo = links
            .iter()
            .find(|link| link.name == "lo")
            .expect("lo listed");
        assert_eq!(lo.index, 1);
        assert_eq!(lo.mac, Some(MacAddress([0; 6])));
        let missing = i32::MAX as u32;
        let refused = Rtnetlink.set_up(missing).unwrap_err();
        assert!(
            [libc::ENODEV, libc::EPERM].contains(&refused.code),
            "{refused}"
        );
    }
}
