//! Guest vsock for `cargo xtask vm run --vsock-socket PATH`, exposed the way Cloud Hypervisor
//! does: rust-vmm's `vhost-device-vsock` serves QEMU's `vhost-user-vsock-pci` and listens on
//! PATH as a hybrid vsock socket (`CONNECT <port>\n` → `OK <port>\n`), so `cargo xtask vm exec
//! --socket PATH` reaches the guest agent as it would under Cloud Hypervisor.

use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::test_suite::prepare::{VSOCK_DAEMON, VSOCK_DAEMON_VERSION, vsock_daemon_path};

/// The guest's context id: the first one free for guests.
pub const GUEST_CID: u32 = 3;

/// A running daemon; killed, and both its sockets removed, when dropped.
pub struct VsockDaemon {
    child: Child,
    /// QEMU's side (`-chardev socket,path=`).
    pub vhost_user_socket: PathBuf,
    /// The host's side.
    pub hybrid_socket: PathBuf,
}

/// The daemon binary: `vhost-device-vsock` on PATH, else the one `cargo xtask test` installs.
fn daemon_binary() -> anyhow::Result<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(VSOCK_DAEMON))
            .find(|candidate| candidate.is_file())
    });
    let installed = vsock_daemon_path();
    on_path
        .or_else(|| installed.is_file().then_some(installed.clone()))
        .with_context(|| {
            format!(
                "--vsock-socket needs rust-vmm's {VSOCK_DAEMON}: none on PATH and no {}; install \
                 it with `cargo install --locked --version {VSOCK_DAEMON_VERSION} {VSOCK_DAEMON}` \
                 (or `cargo xtask test --prepare-only`)",
                installed.display()
            )
        })
}

/// Refuses paths the daemon cannot take and files that are not a stale socket; removes a
/// stale socket (one nobody listens on) left by an earlier run.
fn check_hybrid_path(path: &Path) -> anyhow::Result<()> {
    let text = path.to_string_lossy();
    if text.contains(',') || text.contains('=') {
        bail!("--vsock-socket {text}: {VSOCK_DAEMON} cannot take a path with ',' or '='");
    }
    let Ok(meta) = fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        bail!("--vsock-socket {text}: exists and is not a socket; choose another path");
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        bail!("--vsock-socket {text}: another VM is listening there; choose another path");
    }
    fs::remove_file(path).with_context(|| format!("removing the stale socket {text}"))
}

impl VsockDaemon {
    /// Starts the daemon for a guest with context id [`GUEST_CID`]: QEMU's socket in
    /// `private_dir`, the host's at `hybrid_socket`. Returns once it listens for QEMU.
    pub fn start(hybrid_socket: &Path, private_dir: &Path) -> anyhow::Result<VsockDaemon> {
        check_hybrid_path(hybrid_socket)?;
        let binary = daemon_binary()?;
        let vhost_user_socket = private_dir.join("vhost-user-vsock.sock");
        let child = Command::new(&binary)
            .arg("--vm")
            .arg(format!(
                "guest-cid={GUEST_CID},socket={},uds-path={}",
                vhost_user_socket.display(),
                hybrid_socket.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut daemon = VsockDaemon {
            child,
            vhost_user_socket,
            hybrid_socket: hybrid_socket.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !daemon.vhost_user_socket.exists() {
            if let Some(status) = daemon.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before listening (its messages are above)",
                    binary.display()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not create {} within 20 s",
                    binary.display(),
                    daemon.vhost_user_socket.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(daemon)
    }
}

impl Drop for VsockDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_file(&self.vhost_user_socket);
        let _ = fs::remove_file(&self.hybrid_socket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hybrid_path_is_checked_and_a_stale_socket_removed() {
        let dir = tempfile::tempdir().unwrap();
        let err = check_hybrid_path(&dir.path().join("a,b.sock")).unwrap_err();
        assert!(err.to_string().contains("cannot take a path"), "{err}");
        let file = dir.path().join("file");
        fs::write(&file, b"keep").unwrap();
        let err = check_hybrid_path(&file).unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert!(file.exists(), "a regular file is never removed");

        let live = dir.path().join("live.sock");
        let listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
        let err = check_hybrid_path(&live).unwrap_err();
        assert!(err.to_string().contains("listening"), "{err}");
        drop(listener);
        // The listener is gone, its socket file stays: stale, so removed.
        check_hybrid_path(&live).unwrap();
        assert!(!live.exists());
        check_hybrid_path(&dir.path().join("new.sock")).unwrap();
    }
}
