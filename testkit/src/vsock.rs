//! Guest vsock for the VM tests, the way Cloud Hypervisor exposes it: rust-vmm's
//! `vhost-device-vsock` daemon serves QEMU's `vhost-user-vsock-pci` device and gives the host
//! a hybrid vsock Unix socket (`CONNECT <port>\n` → `OK <port>\n`, then the guest's stream).
//! There is no `/dev/vhost-vsock` on the test machines, so QEMU's own `vhost-vsock-pci` cannot
//! be used; vhost-user needs the guest's memory shared with the daemon (a memfd backend).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The version `cargo xtask test` installs (`cargo install --locked --version`).
pub const DAEMON_VERSION: &str = "0.3.0";

/// A vsock device for a test VM.
#[derive(Debug, Clone)]
pub struct Vsock {
    /// The `vhost-device-vsock` binary (`cargo xtask test --prepare-only` installs it under
    /// `target/vm-tests/tools/bin`).
    pub daemon: PathBuf,
    /// The guest's context id (3: the first one free for guests).
    pub guest_cid: u32,
}

/// A running `vhost-device-vsock`: killed, and its sockets removed, when dropped.
pub struct VsockDaemon {
    child: Child,
    /// Where QEMU connects (`-chardev socket,path=`).
    pub vhost_user_socket: PathBuf,
    /// Where hosts connect (Cloud Hypervisor's `--vsock socket=`).
    pub hybrid_socket: PathBuf,
    log: PathBuf,
}

/// How long the daemon may take to listen: it binds its socket first thing.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(20);

impl VsockDaemon {
    /// Starts the daemon with its sockets (and its log) in `dir`, and waits until it listens
    /// for QEMU.
    pub fn start(vsock: &Vsock, dir: &Path) -> anyhow::Result<VsockDaemon> {
        let vhost_user_socket = dir.join("vhost-user-vsock.sock");
        let hybrid_socket = dir.join("vsock.sock");
        let log = dir.join("vhost-device-vsock.log");
        // The daemon splits its `--vm` value on ',' and '='.
        for path in [&vhost_user_socket, &hybrid_socket] {
            let text = path.to_string_lossy();
            if text.contains(',') || text.contains('=') {
                bail!("{text}: a vhost-device-vsock socket path cannot hold ',' or '='");
            }
        }
        if !vsock.daemon.is_file() {
            bail!(
                "no {}: the vsock VM tests run rust-vmm's vhost-device-vsock {DAEMON_VERSION}; \
                 install it with `{}`",
                vsock.daemon.display(),
                crate::PREPARE_COMMAND
            );
        }
        let child = Command::new(&vsock.daemon)
            .arg("--vm")
            .arg(format!(
                "guest-cid={},socket={},uds-path={}",
                vsock.guest_cid,
                vhost_user_socket.display(),
                hybrid_socket.display()
            ))
            .stdin(Stdio::null())
            .stdout(fs::File::create(&log)?)
            .stderr(fs::File::create(log.with_extension("err"))?)
            .spawn()
            .with_context(|| format!("starting {}", vsock.daemon.display()))?;
        let mut daemon = VsockDaemon {
            child,
            vhost_user_socket,
            hybrid_socket,
            log,
        };
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        while !daemon.vhost_user_socket.exists() {
            if let Some(status) = daemon.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before listening on {}:\n{}",
                    vsock.daemon.display(),
                    daemon.vhost_user_socket.display(),
                    daemon.output()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not create {} within {LISTEN_TIMEOUT:?}:\n{}",
                    vsock.daemon.display(),
                    daemon.vhost_user_socket.display(),
                    daemon.output()
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

    /// What the daemon printed so far (for error messages).
    pub fn output(&self) -> String {
        let read = |p: &Path| fs::read_to_string(p).unwrap_or_default();
        format!(
            "{}{}",
            read(&self.log),
            read(&self.log.with_extension("err"))
        )
    }

    /// QEMU's side: the guest's RAM as a shared memfd (vhost-user maps it into the daemon),
    /// and the device. `machine` is extended with the memory backend.
    pub fn qemu_args(&self, machine: &str, memory_mib: u32) -> (String, Vec<String>) {
        let machine = format!("{machine},memory-backend=vsock-mem");
        let args = vec![
            "-object".to_owned(),
            format!("memory-backend-memfd,id=vsock-mem,size={memory_mib}M,share=on"),
            "-chardev".to_owned(),
            format!("socket,id=vsock0,path={}", self.vhost_user_socket.display()),
            "-device".to_owned(),
            "vhost-user-vsock-pci,chardev=vsock0".to_owned(),
        ];
        (machine, args)
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

    fn start_error(daemon: &Path, dir: &Path) -> String {
        let vsock = Vsock {
            daemon: daemon.to_owned(),
            guest_cid: 3,
        };
        match VsockDaemon::start(&vsock, dir) {
            Ok(_) => panic!("started {}", daemon.display()),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn a_missing_daemon_names_the_prepare_command_and_bad_paths_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = start_error(&dir.path().join("nope"), dir.path());
        assert!(err.contains(crate::PREPARE_COMMAND), "{err}");
        let odd = dir.path().join("a,b");
        fs::create_dir(&odd).unwrap();
        let err = start_error(Path::new("/bin/true"), &odd);
        assert!(err.contains("cannot hold ','"), "{err}");
        // A daemon that exits at once: its exit is reported, not a long wait.
        let err = start_error(Path::new("/bin/false"), dir.path());
        assert!(err.contains("exited"), "{err}");
    }
}
