//! The VM test harness: boots guest-init under QEMU with fixture disks and reads what it printed.
//!
//! The caller brings the initrd (a minimal profile + [`TEST_MODULES`] of Debian's cloud kernel).
//! x86_64 guests boot the host's `linux-image-cloud-amd64`; aarch64 guests boot Debian's arm64
//! cloud kernel under `qemu-system-aarch64 -M virt` (always TCG on an x86_64 host), from the
//! packages `cargo xtask test` unpacks (the `arm64_root` the caller names). Disks are ext4
//! images made with `mkfs.ext4 -d` from fixture directories, which needs no root. QEMU runs
//! under TCG unless KVM really works (this machine's `/dev/kvm` is paravirtual and cannot run a
//! guest). Tests assert on the console,
//! never on QEMU's exit status: a guest whose PID 1 died exits QEMU with 0 too.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};
use std::{fs, thread};

use anyhow::{Context, bail};
use guest_protocol::{EXIT_LINE_PREFIX, ExitLine, ExitReason, find_exit_line};
use system::Arch;

pub use crate::PREPARE_COMMAND;
pub use crate::vsock::Vsock;
use crate::vsock::VsockDaemon;
/// The QEMU command line and the ext4 images are `cargo xtask vm run`'s.
pub use xtask::vm::ext4_image;
use xtask::vm::qemu;
pub use xtask::vm::qemu::Nic;

/// Debian cloud kernel modules a test initrd carries: block devices, the overlay root, and the
/// ACPI power button delivered as an input event.
pub const TEST_MODULES: &[&str] = &["virtio_pci", "virtio_blk", "overlay", "button", "evdev"];

/// The newest `vmlinuz-*<suffix>` in `boot`.
fn newest_image(boot: &Path, suffix: &str) -> Option<PathBuf> {
    let mut images: Vec<PathBuf> = fs::read_dir(boot)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with("vmlinuz-") && name.ends_with(suffix)
        })
        .collect();
    images.sort();
    images.pop()
}

/// A kernel to boot and the modules directory that matches it.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub image: PathBuf,
    pub modules: PathBuf,
}

impl Kernel {
    /// Debian's `linux-image-cloud-amd64` as installed on this machine.
    pub fn debian_cloud() -> anyhow::Result<Kernel> {
        let Some(image) = newest_image(Path::new("/boot"), "-cloud-amd64") else {
            bail!(
                "no /boot/vmlinuz-*-cloud-amd64: the VM tests boot Debian's cloud kernel; install \
                 it with `apt-get install linux-image-cloud-amd64` (`cargo xtask test` does)"
            );
        };
        let version = image.file_name().unwrap().to_string_lossy()["vmlinuz-".len()..].to_owned();
        let modules = PathBuf::from("/lib/modules").join(&version);
        if !modules.join("modules.dep").exists() {
            bail!(
                "{} has no modules.dep; reinstall linux-image-{version}",
                modules.display()
            );
        }
        Ok(Kernel { image, modules })
    }

    /// Debian's `linux-image-cloud-arm64` as `cargo xtask test` unpacked it at `root`
    /// (`boot/vmlinuz-<kver>`, `lib/modules/<kver>` with its `modules.dep`).
    pub fn debian_cloud_arm64(root: &Path) -> anyhow::Result<Kernel> {
        let Some(image) = newest_image(&root.join("boot"), "-cloud-arm64") else {
            bail!(
                "no {}/boot/vmlinuz-*-cloud-arm64: the aarch64 VM tests boot Debian's arm64 cloud \
                 kernel, fetched with apt-get download and unpacked there; prepare it with \
                 `{PREPARE_COMMAND}`",
                root.display()
            );
        };
        let version = image.file_name().unwrap().to_string_lossy()["vmlinuz-".len()..].to_owned();
        let modules = root.join("lib/modules").join(&version);
        if !modules.join("modules.dep").exists() {
            bail!(
                "{} has no modules.dep; remove {} and prepare it again with `{PREPARE_COMMAND}`",
                modules.display(),
                root.display()
            );
        }
        Ok(Kernel { image, modules })
    }

    /// Debian's cloud kernel for guests of `arch` (arm64's unpacked at `arm64_root`).
    pub fn debian_cloud_for(arch: Arch, arm64_root: &Path) -> anyhow::Result<Kernel> {
        match arch {
            Arch::X86_64 => Kernel::debian_cloud(),
            Arch::Aarch64 => Kernel::debian_cloud_arm64(arm64_root),
        }
    }
}

/// An erofs image of a directory (`mkfs.erofs` from erofs-utils), every file owned by root;
/// `compressor` (e.g. `lz4hc`) compresses it.
pub fn erofs_image(path: &Path, contents: &Path, compressor: Option<&str>) -> anyhow::Result<()> {
    let mut cmd = Command::new("mkfs.erofs");
    cmd.args(["--quiet", "--all-root"]);
    if let Some(compressor) = compressor {
        cmd.arg(format!("-z{compressor}"));
    }
    let out = cmd
        .arg(path)
        .arg(contents)
        .output()
        .context("running mkfs.erofs (apt-get install erofs-utils)")?;
    if !out.status.success() {
        bail!(
            "mkfs.erofs {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The applets linked in an aarch64 rootfs: an arm64 busybox cannot run on this host to list
/// its own, so these are the ones the aarch64 tests use.
const AARCH64_APPLETS: &[&str] = &[
    "sh", "echo", "cat", "env", "id", "ls", "sleep", "true", "false", "kill", "sync", "uname",
];

/// A rootfs tree for guests of `arch` with a shell and tools: Debian's `busybox-static` (the
/// host's on x86_64, the one unpacked under `arm64_root` on aarch64) and one link per applet,
/// a root user and an unprivileged `app` user (uid 1000) in groups `app` (1000) and `extra`
/// (2000).
pub fn busybox_rootfs(arch: Arch, dir: &Path, arm64_root: &Path) -> anyhow::Result<()> {
    let bin = dir.join("bin");
    fs::create_dir_all(&bin)?;
    let applets: Vec<String> = match arch {
        Arch::X86_64 => {
            let busybox = Path::new("/bin/busybox");
            if !busybox.exists() {
                bail!("no /bin/busybox: install it with `apt-get install busybox-static`");
            }
            fs::copy(busybox, bin.join("busybox"))?;
            let list = Command::new(busybox)
                .arg("--list")
                .output()
                .context("busybox --list")?;
            String::from_utf8_lossy(&list.stdout)
                .lines()
                .map(str::to_owned)
                .collect()
        }
        Arch::Aarch64 => {
            let busybox = arm64_root.join("bin/busybox");
            if !busybox.exists() {
                bail!(
                    "no {}: the aarch64 VM tests' rootfs has Debian's arm64 busybox-static; \
                     prepare it with `{PREPARE_COMMAND}`",
                    busybox.display()
                );
            }
            fs::copy(&busybox, bin.join("busybox"))?;
            AARCH64_APPLETS.iter().map(|a| a.to_string()).collect()
        }
    };
    for applet in &applets {
        if applet != "busybox" && !applet.is_empty() {
            std::os::unix::fs::symlink("busybox", bin.join(applet))?;
        }
    }
    for sub in ["etc", "tmp", "home/app", "root", "usr/bin", "sbin"] {
        fs::create_dir_all(dir.join(sub))?;
    }
    fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
    )?;
    fs::write(
        dir.join("etc/group"),
        "root:x:0:\napp:x:1000:\nextra:x:2000:app\n",
    )?;
    Ok(())
}

/// Debian cloud kernel modules for guest vsock over a virtio device (`VmSpec::vsock`), in
/// load order.
pub const VSOCK_MODULES: &[&str] = &[
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
];

/// Debian cloud kernel modules for a virtio-net NIC (`virtio_net` pulls `net_failover` and
/// `failover` in through modules.dep).
pub const NET_MODULES: &[&str] = &["virtio_net"];

/// What a test boots: the disks in virtio order (vda rootfs, vdb writable, vdc config, ...).
pub struct VmSpec {
    pub disks: Vec<PathBuf>,
    /// A NIC; `None`: no network device at all.
    pub nic: Option<Nic>,
    /// Appended to `console=<ttyS0 or ttyAMA0> panic=-1 loglevel=4` (and `no_timer_check`
    /// under TCG on x86_64, as every `vm run` boot).
    pub append: String,
    pub memory_mib: u32,
    /// The guest's architecture: x86_64 unless set.
    pub arch: Arch,
    /// Extra QEMU arguments, appended (e.g. `-device virtio-rng-pci`).
    pub qemu_args: Vec<String>,
    /// A vsock device served by `vhost-device-vsock`; [`Vm::vsock_socket`] is its hybrid
    /// socket. The guest needs [`VSOCK_MODULES`].
    pub vsock: Option<Vsock>,
}

impl VmSpec {
    pub fn new(disks: Vec<PathBuf>) -> VmSpec {
        VmSpec {
            disks,
            nic: None,
            append: String::new(),
            memory_mib: 512,
            arch: Arch::X86_64,
            qemu_args: Vec::new(),
            vsock: None,
        }
    }
}

/// The disks of one test guest, in virtio order: a rootfs (vda), an empty writable disk (vdb)
/// and a config disk (vdc), in a temp dir removed with the guest.
pub struct Guest {
    pub arch: Arch,
    pub dir: tempfile::TempDir,
    pub rootfs: PathBuf,
    pub writable: PathBuf,
    pub config: PathBuf,
}

impl Guest {
    /// An x86_64 busybox rootfs (with `extra` applied to its tree) and `config` (a JSON value,
    /// or raw text when a string).
    pub fn busybox(config: serde_json::Value, extra: impl FnOnce(&Path)) -> Guest {
        Guest::busybox_for(Arch::X86_64, Path::new("/"), config, extra)
    }

    /// The same for `arch`; `arm64_root` is where an arm64 busybox is found ([`busybox_rootfs`]).
    pub fn busybox_for(
        arch: Arch,
        arm64_root: &Path,
        config: serde_json::Value,
        extra: impl FnOnce(&Path),
    ) -> Guest {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("rootfs-tree");
        busybox_rootfs(arch, &tree, arm64_root).unwrap();
        extra(&tree);
        let rootfs = dir.path().join("rootfs.img");
        ext4_image(&rootfs, Some(&tree), 64).unwrap();
        Guest {
            arch,
            ..Guest::with_rootfs_image(dir, rootfs, config)
        }
    }

    /// An x86_64 guest around `rootfs` (already in `dir`), with `config`.
    pub fn with_rootfs_image(
        dir: tempfile::TempDir,
        rootfs: PathBuf,
        config: serde_json::Value,
    ) -> Guest {
        let writable = dir.path().join("writable.img");
        ext4_image(&writable, None, 64).unwrap();
        let text = match config {
            serde_json::Value::String(raw) => raw,
            other => serde_json::to_string_pretty(&other).unwrap(),
        };
        let config = dir.path().join("config.img");
        xtask::vm::config_image(&config, &text).unwrap();
        Guest {
            arch: Arch::X86_64,
            dir,
            rootfs,
            writable,
            config,
        }
    }

    /// The three disks for the guest's arch and, when given, a NIC.
    pub fn spec(&self, nic: Option<Nic>) -> VmSpec {
        let mut spec = VmSpec::new(vec![
            self.rootfs.clone(),
            self.writable.clone(),
            self.config.clone(),
        ]);
        spec.arch = self.arch;
        spec.nic = nic;
        spec
    }
}

/// The accelerator for guests of the host's architecture: see [`accelerator_for`].
pub fn accelerator() -> String {
    accelerator_for(Arch::host())
}

/// The accelerator for guests of `arch`: `vm run`'s choice (KVM only where it can run the
/// guest, TCG otherwise), unless `VM_TEST_ACCEL` forces one for the host's architecture.
pub fn accelerator_for(arch: Arch) -> String {
    match std::env::var("VM_TEST_ACCEL") {
        Ok(forced) if arch == Arch::host() => forced,
        _ => qemu::accelerator(arch).to_owned(),
    }
}

/// A running VM: its console so far, and its monitor.
pub struct Vm {
    child: Child,
    console: Arc<(Mutex<String>, Condvar)>,
    /// How many of QEMU's two output streams reached their end (2: QEMU is gone).
    closed: Arc<AtomicUsize>,
    monitor: PathBuf,
    /// Dropped after QEMU is killed (fields drop after `Drop::drop`).
    vsock: Option<VsockDaemon>,
    /// Kills QEMU and the daemon when this process exits (see [`Vm::stop_at_process_exit`]).
    reaper: Option<Child>,
    _dir: tempfile::TempDir,
}

/// How a boot ended, as the guest said it on the console.
#[derive(Debug)]
pub struct Boot {
    pub console: String,
    /// The `GUEST-INIT-EXIT` line, parsed by the contract hosts use.
    pub exit: Option<ExitLine>,
}

impl Boot {
    /// The line of `guest-init`'s timings, e.g. `exec=1722ms` → 1722.
    pub fn timing_ms(&self, phase: &str) -> Option<u64> {
        let line = self.console.lines().find(|l| l.contains("timings:"))?;
        let field = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{phase}=")))?;
        field.trim_end_matches("ms").parse().ok()
    }
}

impl Boot {
    /// Asserts the application exited with `code` (`reason=app`): see [`Boot::expect_line`].
    pub fn expect_exit(&self, code: u8) -> &Boot {
        self.expect_line(ExitLine::app(code))
    }

    /// Asserts guest-init failed for `reason`, with that reason's code.
    pub fn expect_failure(&self, reason: ExitReason) -> &Boot {
        let line = ExitLine::failure(reason).expect("a failure reason, not `app`");
        self.expect_line(line)
    }

    /// Asserts the log has exactly one exit line, it is `expected`, and the kernel did not
    /// panic.
    pub fn expect_line(&self, expected: ExitLine) -> &Boot {
        let lines = self.console.matches(EXIT_LINE_PREFIX).count();
        assert_eq!(
            lines, 1,
            "expected exactly one exit line:\n{}",
            self.console
        );
        assert_eq!(
            self.exit,
            Some(expected),
            "wrong exit line (expected `{expected}`):\n{}",
            self.console
        );
        assert!(
            !self.console.contains("Kernel panic"),
            "kernel panicked:\n{}",
            self.console
        );
        self
    }

    /// Asserts the application printed a line containing `needle`. Log lines of guest-init and
    /// the kernel (which quote the command, and so the script's text) do not count.
    pub fn expect_output(&self, needle: &str) -> &Boot {
        assert!(
            self.console
                .lines()
                .any(|l| !l.starts_with('[') && l.contains(needle)),
            "the application printed no line containing {needle:?}:\n{}",
            self.console
        );
        self
    }

    /// Asserts some console line (guest-init's log included) contains `needle`.
    pub fn expect_log(&self, needle: &str) -> &Boot {
        assert!(
            self.console.lines().any(|l| l.contains(needle)),
            "no console line contains {needle:?}:\n{}",
            self.console
        );
        self
    }
}

impl Vm {
    /// Boots `spec` with this kernel and initrd.
    pub fn start_with(kernel: &Path, initrd: &Path, spec: &VmSpec) -> anyhow::Result<Vm> {
        let dir = tempfile::tempdir()?;
        let monitor = dir.path().join("monitor.sock");
        let vsock = spec
            .vsock
            .as_ref()
            .map(|vsock| vsock.start(dir.path()))
            .transpose()?;
        let boot = qemu::Boot {
            arch: spec.arch,
            accel: accelerator_for(spec.arch),
            memory_mib: spec.memory_mib,
            kernel: kernel.to_owned(),
            initrd: initrd.to_owned(),
            disks: spec.disks.clone(),
            append: spec.append.clone(),
            vhost_user_vsock: vsock.as_ref().map(|d| d.vhost_user_socket.clone()),
            nic: spec.nic.clone(),
            monitor: Some(monitor.clone()),
            extra_args: spec.qemu_args.clone(),
        };
        let (qemu, package, ..) = qemu::machine(spec.arch);
        let mut cmd = boot.command();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {qemu} (apt-get install {package})"))?;

        let console = Arc::new((Mutex::new(String::new()), Condvar::new()));
        let closed = Arc::new(AtomicUsize::new(0));
        let verbose = std::env::var_os("VM_TEST_VERBOSE").is_some();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let console = Arc::clone(&console);
            let closed = Arc::clone(&closed);
            thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                let mut raw = Vec::new();
                while reader.read_until(b'\n', &mut raw).unwrap_or(0) > 0 {
                    let line = String::from_utf8_lossy(&raw).replace('\r', "");
                    if verbose {
                        eprint!("{line}");
                    }
                    let (text, changed) = &*console;
                    text.lock().unwrap().push_str(&line);
                    changed.notify_all();
                    raw.clear();
                }
                let (text, changed) = &*console;
                let _guard = text.lock().unwrap();
                closed.fetch_add(1, Ordering::SeqCst);
                changed.notify_all();
            });
        }
        Ok(Vm {
            child,
            console,
            closed,
            monitor,
            vsock,
            reaper: None,
            _dir: dir,
        })
    }

    /// The hybrid vsock socket hosts connect to (`CONNECT <port>\n`), when the spec had a
    /// vsock device.
    pub fn vsock_socket(&self) -> Option<&Path> {
        self.vsock.as_ref().map(|d| d.hybrid_socket.as_path())
    }

    /// What the vsock daemon printed so far (empty without one).
    pub fn vsock_log(&self) -> String {
        self.vsock
            .as_ref()
            .map(VsockDaemon::output)
            .unwrap_or_default()
    }

    /// The console so far.
    pub fn console(&self) -> String {
        self.console.0.lock().unwrap().clone()
    }

    /// For a VM kept in a `static` (shared by a test binary's tests, never dropped): QEMU and
    /// the vsock daemon are killed when this process exits, however it exits. A `sh` child
    /// holds the read end of a pipe whose write end only this process has; its EOF is the
    /// signal.
    pub fn stop_at_process_exit(&mut self) -> anyhow::Result<()> {
        let mut pids = vec![self.child.id()];
        pids.extend(self.vsock.as_ref().map(VsockDaemon::pid));
        let reaper = kill_at_eof(&pids)?;
        self.reaper = Some(reaper);
        Ok(())
    }

    /// Waits until a console line contains `needle`; fails at once when QEMU has exited.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let (text, changed) = &*self.console;
        let mut guard = text.lock().unwrap();
        while !guard.contains(needle) {
            if self.closed.load(Ordering::SeqCst) == 2 {
                bail!("QEMU exited without {needle:?} on the console:\n{guard}");
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no {needle:?} on the console within {timeout:?}:\n{guard}");
            }
            guard = changed.wait_timeout(guard, left).unwrap().0;
        }
        Ok(())
    }

    /// Presses the ACPI power button (`system_powerdown` on the QEMU monitor).
    pub fn power_button(&self) -> anyhow::Result<()> {
        use std::io::Write;
        let mut socket =
            std::os::unix::net::UnixStream::connect(&self.monitor).with_context(|| {
                format!("connecting to the QEMU monitor {}", self.monitor.display())
            })?;
        socket.write_all(b"system_powerdown\n")?;
        // Let QEMU read the command before the socket closes.
        thread::sleep(Duration::from_millis(200));
        Ok(())
    }

    /// Waits for QEMU to exit (the guest powered off), or kills it after `timeout`.
    pub fn finish(mut self, timeout: Duration) -> anyhow::Result<Boot> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.child.try_wait()?.is_some() {
                break;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!(
                    "the VM did not power off within {timeout:?}; console:\n{}",
                    self.console.0.lock().unwrap()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        // The reader threads finish with the pipes; give them a moment to drain.
        thread::sleep(Duration::from_millis(100));
        let console = self.console.0.lock().unwrap().clone();
        Ok(Boot {
            exit: find_exit_line(&console),
            console,
        })
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // The reaper first: it must never see pids that were reused after these exits.
        if let Some(mut reaper) = self.reaper.take() {
            let _ = reaper.kill();
            let _ = reaper.wait();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `sh` that SIGKILLs `pids` once its stdin (a pipe only this process holds) reaches EOF:
/// when this process exits, or when the returned child's stdin is dropped.
fn kill_at_eof(pids: &[u32]) -> anyhow::Result<Child> {
    Command::new("sh")
        .args(["-c", "read -r _; kill -KILL \"$@\" 2>/dev/null", "reaper"])
        .args(pids.iter().map(u32::to_string))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .context("starting the reaper shell for a shared VM")
}

/// How long a boot may take before the harness gives up: generous for TCG on a busy machine.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// The test initrd called `name`, built at most once per test process and kept as
/// `target/vm-tests/initrd-<name>-<pid>.gz`: the first caller for a name runs `build` (other
/// names build meanwhile), later ones get its path. A failed build panics in every caller,
/// naming `name` and the cause.
pub fn initrd_once(name: &str, build: impl FnOnce() -> anyhow::Result<Vec<u8>>) -> &'static Path {
    type Cell = OnceLock<Result<PathBuf, String>>;
    static BUILT: Mutex<BTreeMap<String, &'static Cell>> = Mutex::new(BTreeMap::new());
    let cell: &'static Cell = BUILT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .entry(name.to_owned())
        .or_insert_with(|| Box::leak(Box::default()));
    let built = cell.get_or_init(|| {
        let write = || -> anyhow::Result<PathBuf> {
            let bytes = build()?;
            let dir = xtask::workspace_root().join("target/vm-tests");
            fs::create_dir_all(&dir)?;
            let path = dir.join(format!("initrd-{name}-{}.gz", std::process::id()));
            fs::write(&path, bytes)?;
            Ok(path)
        };
        write().map_err(|e| format!("{e:#}"))
    });
    match built {
        Ok(path) => path,
        Err(e) => panic!("building the {name} test initrd: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn the_reaper_kills_its_pids_when_its_pipe_closes() {
        let mut victim = Command::new("sleep").arg("1000").spawn().unwrap();
        let mut reaper = kill_at_eof(&[victim.id()]).unwrap();
        // Still alive while the pipe is open.
        thread::sleep(Duration::from_millis(100));
        assert!(victim.try_wait().unwrap().is_none());
        drop(reaper.stdin.take());
        reaper.wait().unwrap();
        assert_eq!(victim.wait().unwrap().signal(), Some(9), "SIGKILL");
    }
}
