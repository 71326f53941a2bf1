//! Network: loopback always; the configured interface is not implemented yet.

use std::io;

use guest_protocol::Config;

use crate::syscalls::Machine;

const LOOPBACK: &str = "lo";

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

    #[test]
    fn loopback_up_keeps_its_flags_and_adds_up_and_running() {
        let sys = crate::syscalls::fake::Recorder::default();
        let loopback = libc::IFF_LOOPBACK as i16;
        sys.add_interface("lo", loopback);
        loopback_up(&sys).unwrap();
        let up = (libc::IFF_UP | libc::IFF_RUNNING) as i16;
        assert_eq!(sys.interface("lo"), Some(loopback | up));
    }

    #[test]
    fn loopback_failure_is_reported_not_fatal_here() {
        use crate::syscalls::fake::{Call, Op, Recorder};
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
