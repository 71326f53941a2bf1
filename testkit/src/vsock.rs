//! Guest vsock for the VM tests, the way Cloud Hypervisor exposes it: rust-vmm's
//! `vhost-device-vsock` daemon serves QEMU's `vhost-user-vsock-pci` device and gives the host
//! a hybrid vsock Unix socket (`CONNECT <port>\n` → `OK <port>\n`, then the guest's stream).
//! There is no `/dev/vhost-vsock` on the test machines, so QEMU's own `vhost-vsock-pci` cannot
//! be used; vhost-user needs the guest's memory shared with the daemon (a memfd backend).
//! The daemon is `cargo xtask vm run`'s ([`VsockDaemon`]); this module adds which binary the
//! tests run and where its sockets and log go.

use std::path::{Path, PathBuf};

use anyhow::bail;
use xtask::test_suite::prepare::VSOCK_DAEMON_VERSION;
pub use xtask::vm::vsock::VsockDaemon;

/// A vsock device for a test VM.
#[derive(Debug, Clone)]
pub struct Vsock {
    /// The `vhost-device-vsock` binary (`cargo xtask test --prepare-only` installs it under
    /// `target/vm-tests/tools/bin`).
    pub daemon: PathBuf,
    /// The guest's context id (3: the first one free for guests).
    pub guest_cid: u32,
}

impl Vsock {
    /// Starts the daemon with its sockets and its log ([`VsockDaemon::output`]) in `dir`, and
    /// waits until it listens for QEMU.
    pub fn start(&self, dir: &Path) -> anyhow::Result<VsockDaemon> {
        if !self.daemon.is_file() {
            bail!(
                "no {}: the vsock VM tests run rust-vmm's vhost-device-vsock \
                 {VSOCK_DAEMON_VERSION}; install it with `{}`",
                self.daemon.display(),
                crate::PREPARE_COMMAND
            );
        }
        VsockDaemon::start_with(
            &self.daemon,
            self.guest_cid,
            &dir.join("vsock.sock"),
            dir,
            Some(&dir.join("vhost-device-vsock.log")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_daemon_names_the_prepare_command() {
        let dir = tempfile::tempdir().unwrap();
        let vsock = Vsock {
            daemon: dir.path().join("nope"),
            guest_cid: 3,
        };
        let err = match vsock.start(dir.path()) {
            Ok(_) => panic!("started a missing daemon"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(crate::PREPARE_COMMAND), "{err}");
    }
}
