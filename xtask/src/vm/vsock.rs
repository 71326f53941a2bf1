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
    /// Where its stdout and stderr go, when not to this process's stderr.
    log: Option<PathBuf>,
}

/// How long the daemon may take to listen: it binds its socket first thing.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(20);

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

/// The daemon splits its `--vm` value on ',' and '='.
fn check_daemon_path(path: &Path) -> anyhow::Result<()> {
    let text = path.to_string_lossy();
    if text.contains(',') || text.contains('=') {
        bail!("{text}: {VSOCK_DAEMON} cannot take a path with ',' or '='; choose another path");
    }
    Ok(())
}

/// Refuses paths the daemon cannot take and files that are not a stale socket; removes a
/// stale socket (one nobody listens on) left by an earlier run.
fn check_hybrid_path(path: &Path) -> anyhow::Result<()> {
    check_daemon_path(path)?;
    let text = path.to_string_lossy();
    let Ok(meta) = fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        bail!("hybrid vsock socket {text}: exists and is not a socket; choose another path");
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        bail!("hybrid vsock socket {text}: another VM is listening there; choose another path");
    }
    fs::remove_file(path).with_context(|| format!("removing the stale socket {text}"))
}

impl VsockDaemon {
    /// `vm run`'s daemon: the one on PATH or `cargo xtask test`'s, for a guest with context
    /// id [`GUEST_CID`], its messages on this process's stderr. See [`VsockDaemon::start_with`].
    pub fn start(hybrid_socket: &Path, private_dir: &Path) -> anyhow::Result<VsockDaemon> {
        VsockDaemon::start_with(
            &daemon_binary()?,
            GUEST_CID,
            hybrid_socket,
            private_dir,
            None,
        )
    }

    /// Starts `binary` for a guest with context id `guest_cid`: QEMU's socket in
    /// `private_dir`, the host's at `hybrid_socket` (a stale socket there is replaced). Its
    /// output goes to `log` (read back by [`VsockDaemon::output`]), else to this process's
    /// stderr. Returns once it listens for QEMU.
    pub fn start_with(
        binary: &Path,
        guest_cid: u32,
        hybrid_socket: &Path,
        private_dir: &Path,
        log: Option<&Path>,
    ) -> anyhow::Result<VsockDaemon> {
        check_hybrid_path(hybrid_socket)?;
        let vhost_user_socket = private_dir.join("vhost-user-vsock.sock");
        check_daemon_path(&vhost_user_socket)?;
        let mut command = Command::new(binary);
        command
            .arg("--vm")
            .arg(format!(
                "guest-cid={guest_cid},socket={},uds-path={}",
                vhost_user_socket.display(),
                hybrid_socket.display()
            ))
            .stdin(Stdio::null());
        match log {
            None => command.stdout(Stdio::null()),
            Some(log) => {
                let file = fs::File::create(log)
                    .with_context(|| format!("creating the daemon's log {}", log.display()))?;
                command.stdout(file.try_clone()?).stderr(file)
            }
        };
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut daemon = VsockDaemon {
            child,
            vhost_user_socket,
            hybrid_socket: hybrid_socket.to_owned(),
            log: log.map(Path::to_owned),
        };
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        while !daemon.vhost_user_socket.exists() {
            if let Some(status) = daemon.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before listening on {}: {}",
                    binary.display(),
                    daemon.vhost_user_socket.display(),
                    daemon.messages()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not create {} within {LISTEN_TIMEOUT:?}: {}",
                    binary.display(),
                    daemon.vhost_user_socket.display(),
                    daemon.messages()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(daemon)
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the daemon printed so far into its log (empty without one).
    pub fn output(&self) -> String {
        self.log
            .as_deref()
            .and_then(|log| fs::read_to_string(log).ok())
            .unwrap_or_default()
    }

    /// Its messages for an error: the log's text, or where they went.
    fn messages(&self) -> String {
        match &self.log {
            None => "its messages are above".to_owned(),
            Some(_) => format!("it printed:\n{}", self.output()),
        }
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
        let err = check_hybrid_path(&dir.path().join("a=b.sock")).unwrap_err();
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

    fn start_error(binary: &Path, hybrid: &Path, private_dir: &Path, log: Option<&Path>) -> String {
        match VsockDaemon::start_with(binary, GUEST_CID, hybrid, private_dir, log) {
            Ok(_) => panic!("started {}", binary.display()),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn the_daemon_s_paths_are_checked_and_an_early_exit_is_reported_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let hybrid = dir.path().join("vsock.sock");
        // QEMU's socket goes on the daemon's command line too.
        let odd = dir.path().join("a,b");
        fs::create_dir(&odd).unwrap();
        let err = start_error(Path::new("/bin/true"), &hybrid, &odd, None);
        assert!(err.contains("cannot take a path"), "{err}");

        let err = start_error(&dir.path().join("nope"), &hybrid, dir.path(), None);
        assert!(err.contains("starting"), "{err}");

        // A daemon that exits at once (ls refuses `--vm`): its exit and its log are reported,
        // not a long wait.
        let log = dir.path().join("daemon.log");
        let err = start_error(Path::new("/bin/ls"), &hybrid, dir.path(), Some(&log));
        assert!(err.contains("exited"), "{err}");
        assert!(err.contains("'--vm'"), "the log is quoted: {err}");
    }
}
