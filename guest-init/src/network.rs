//! Network: loopback always; the configured interface is not implemented yet.

use std::io;

use guest_protocol::Config;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(
        "network_enabled is true (guest_ip {ip}/{prefix}) but this guest-init cannot configure \
         a network interface yet; boot with network_enabled false"
    )]
    Unsupported { ip: std::net::Ipv4Addr, prefix: u8 },
    #[error("bringing up loopback: {0}")]
    Loopback(io::Error),
}

/// Fail before the root is touched when networking is requested.
pub fn check_supported(config: &Config) -> Result<(), NetworkError> {
    match &config.network {
        Some(network) => Err(NetworkError::Unsupported {
            ip: network.ip,
            prefix: network.prefix_len,
        }),
        None => Ok(()),
    }
}

/// `ip link set lo up`: many programs talk to 127.0.0.1 even without a network.
pub fn loopback_up() -> Result<(), NetworkError> {
    // SAFETY: ifreq is plain data; the socket fd is closed on every path.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(NetworkError::Loopback(io::Error::last_os_error()));
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        let mut result = Ok(());
        if libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut req) < 0 {
            result = Err(io::Error::last_os_error());
        } else {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            if libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &req) < 0 {
                result = Err(io::Error::last_os_error());
            }
        }
        libc::close(fd);
        result.map_err(NetworkError::Loopback)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn configured_network_is_refused_with_a_clear_message() {
        let (config, _) = guest_protocol::config::parse(
            r#"{"network_enabled": true, "guest_ip": "10.0.0.2", "guest_cidr": 24}"#,
            Path::new("config.json"),
        )
        .unwrap();
        let err = check_supported(&config).unwrap_err();
        assert!(err.to_string().starts_with(
            "network_enabled is true (guest_ip 10.0.0.2/24) but this guest-init cannot"
        ));
        assert!(check_supported(&Config::default()).is_ok());
    }
}
