//! `cargo xtask vm run`: boot a kernel and initrd version from the store, as a host would.
//!
//! Kernel and initrd are resolved (and verified) through `system::Store`, for the lock the
//! store holds (`<data_dir>/system/artifacts.lock`, what `artifacts` or an installed dist left
//! there), or another lock. The rootfs is a directory (made into an ext4 image with
//! `mkfs.ext4 -d`, no root needed) or an ext4/erofs image; the command goes into `config.json`
//! on a config disk (vda rootfs, vdb writable, vdc config: guest-init's contract). The console
//! streams to stdout, and the app's exit code is read from guest-init's exit line.

pub mod qemu;
pub mod vsock;

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use guest_protocol::{Config, ExitLine, find_exit_line};
use system::lock::Version;
use system::{Arch, InitrdVersion, KernelVersion, Layout, Lock, Store};

/// What to boot.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub data_dir: PathBuf,
    /// The lock to resolve with; `None` means the store's copy, or the one `system` embeds.
    pub lock: Option<PathBuf>,
    /// Kernel and initrd versions; `None` means the lock's defaults.
    pub kernel: Option<Version>,
    pub initrd: Option<Version>,
    pub arch: Arch,
    /// A directory, or an ext4 or erofs image.
    pub rootfs: PathBuf,
    /// The entrypoint and its arguments.
    pub command: Vec<String>,
    pub memory_mib: u32,
    /// `kvm` or `tcg`; `None` picks what works ([`qemu::accelerator`]).
    pub accel: Option<String>,
    pub timeout: Duration,
    /// Where the console goes as it arrives (stdout for the command).
    pub echo: bool,
    /// Give the guest a vsock device whose host side is this hybrid vsock socket (Cloud
    /// Hypervisor's `--vsock socket=`), served by `vhost-device-vsock` for the run.
    pub vsock_socket: Option<PathBuf>,
}

/// How the guest ended.
#[derive(Debug)]
pub struct Outcome {
    pub console: String,
    pub exit: ExitLine,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// The lock a run resolves with: the one named, else the store's copy, else the embedded one.
pub fn lock_for(data_dir: &Path, lock: Option<&Path>) -> anyhow::Result<Lock> {
    if let Some(path) = lock {
        return crate::lock::read(path);
    }
    let store_copy = Layout::new(data_dir).lock_file();
    if store_copy.exists() {
        return crate::lock::read(&store_copy);
    }
    Ok(system::embedded_lock().clone())
}

/// Boots and waits for guest-init's exit line.
pub fn run(options: &RunOptions) -> anyhow::Result<Outcome> {
    let lock = lock_for(&options.data_dir, options.lock.as_deref())?;
    let kernel_version = options
        .kernel
        .as_ref()
        .unwrap_or(&lock.defaults.kernel)
        .clone();
    let initrd_version = options
        .initrd
        .as_ref()
        .unwrap_or(&lock.defaults.initrd)
        .clone();
    let store = Store::with_lock(&options.data_dir, lock);
    let next = "next step: make the store hold it with `cargo xtask artifacts` (or \
                `--from` a dist) into this --data-dir";
    let kernel = store
        .kernel_path(&KernelVersion::new(kernel_version.as_str()), options.arch)
        .map_err(|e| anyhow::anyhow!("{e}\n{next}"))?;
    let initrd = store
        .initrd_path(&InitrdVersion::new(initrd_version.as_str()), options.arch)
        .map_err(|e| anyhow::anyhow!("{e}\n{next}"))?;

    let dir = tempfile::tempdir().context("creating a temp dir for the VM's disks")?;
    let rootfs = rootfs_image(&options.rootfs, dir.path())?;
    let writable = dir.path().join("writable.img");
    ext4_image(&writable, None, 64)?;
    let config = config_disk(&options.command, dir.path())?;
    let vsock = match &options.vsock_socket {
        None => None,
        Some(socket) => {
            let daemon = vsock::VsockDaemon::start(socket, dir.path())?;
            eprintln!(
                "vm: guest vsock (cid {}) on {}; reach the guest agent with\n  \
                 cargo xtask vm exec --socket {} -- COMMAND...",
                vsock::GUEST_CID,
                socket.display(),
                socket.display()
            );
            Some(daemon)
        }
    };

    let boot = qemu::Boot {
        arch: options.arch,
        accel: options
            .accel
            .clone()
            .unwrap_or_else(|| qemu::accelerator(options.arch).to_owned()),
        memory_mib: options.memory_mib,
        kernel: kernel.clone(),
        initrd: initrd.clone(),
        disks: vec![rootfs, writable, config],
        append: String::new(),
        vhost_user_vsock: vsock.as_ref().map(|d| d.vhost_user_socket.clone()),
        nic: None,
        monitor: None,
        extra_args: Vec::new(),
    };
    let console = console_of(boot, options.timeout, options.echo)?;
    // QEMU is gone: the daemon and its sockets go too.
    drop(vsock);
    if console.contains("Kernel panic") {
        bail!("the guest kernel panicked (the console is above)");
    }
    let exit = find_exit_line(&console).context(
        "the guest printed no GUEST-INIT-EXIT line: it did not finish (the console is above)",
    )?;
    Ok(Outcome {
        console,
        exit,
        kernel,
        initrd,
    })
}

/// Runs QEMU to its end (the guest powers off) and returns the console; kills it after
/// `timeout`.
fn console_of(boot: qemu::Boot, timeout: Duration, echo: bool) -> anyhow::Result<String> {
    let (binary, package, _, _) = qemu::machine(boot.arch);
    let mut child = boot
        .command()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {binary} (apt-get install {package})"))?;
    let (tx, rx) = mpsc::channel::<String>();
    let readers: Vec<_> = [
        Box::new(child.stdout.take().expect("piped")) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().expect("piped")),
    ]
    .into_iter()
    .map(|stream| {
        let tx = tx.clone();
        thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut raw = Vec::new();
            while reader.read_until(b'\n', &mut raw).unwrap_or(0) > 0 {
                let _ = tx.send(String::from_utf8_lossy(&raw).replace('\r', ""));
                raw.clear();
            }
        })
    })
    .collect();
    drop(tx);
    let deadline = Instant::now() + timeout;
    let mut console = String::new();
    let mut out = std::io::stdout();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(Duration::from_millis(200))) {
            Ok(line) => {
                if echo {
                    let _ = out.write_all(line.as_bytes());
                    let _ = out.flush();
                }
                console.push_str(&line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) if left.is_zero() => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "the VM did not power off within {timeout:?}; QEMU was stopped (the console \
                     is above)"
                );
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
    for reader in readers {
        let _ = reader.join();
    }
    child.wait().context("waiting for QEMU")?;
    Ok(console)
}

/// The rootfs as a disk image: a directory becomes an ext4 image in `dir`; an ext4 or erofs
/// image is used as it is.
fn rootfs_image(rootfs: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    let meta = fs::metadata(rootfs).with_context(|| format!("--rootfs {}", rootfs.display()))?;
    if meta.is_dir() {
        let image = dir.join("rootfs.img");
        let bytes: u64 = walkdir::WalkDir::new(rootfs)
            .into_iter()
            .filter_map(|e| e.ok())
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len().div_ceil(4096) * 4096 + 256)
            .sum();
        let mib = u32::try_from(bytes * 3 / 2 / (1 << 20) + 32).unwrap_or(u32::MAX);
        ext4_image(&image, Some(rootfs), mib)?;
        return Ok(image);
    }
    match filesystem_of(rootfs)? {
        Some(_) => Ok(rootfs.to_owned()),
        None => bail!(
            "--rootfs {}: neither a directory nor an ext4 or erofs image (no superblock magic); \
             pass a directory, or make an image with `mkfs.ext4 -d DIR IMG` or `mkfs.erofs IMG DIR`",
            rootfs.display()
        ),
    }
}

/// `ext4` or `erofs` when the image's superblock says so.
pub fn filesystem_of(image: &Path) -> anyhow::Result<Option<&'static str>> {
    let mut head = vec![0u8; 2048];
    let mut file = File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let n = read_up_to(&mut file, &mut head)?;
    head.truncate(n);
    // ext2/3/4: s_magic 0xEF53 at 1024 + 56; erofs: 0xE0F5E1E2 (LE) at 1024.
    if head.get(1080..1082) == Some(&[0x53, 0xEF]) {
        return Ok(Some("ext4"));
    }
    if head.get(1024..1028) == Some(&[0xE2, 0xE1, 0xF5, 0xE0]) {
        return Ok(Some("erofs"));
    }
    Ok(None)
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> anyhow::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// A config disk (ext4) holding `config.json` for exec mode: `command` is the entrypoint.
fn config_disk(command: &[String], dir: &Path) -> anyhow::Result<PathBuf> {
    if command.is_empty() {
        bail!(
            "no command: name what to run in the guest after `--`, e.g. `-- /bin/sh -c 'echo hi'`"
        );
    }
    let json = Config::exec(command.iter().cloned())
        .to_json()
        .map_err(|e| anyhow::anyhow!("the command does not make a valid config.json: {e}"))?;
    let image = dir.join("config.img");
    config_image(&image, &json)?;
    Ok(image)
}

/// A 4 MiB ext4 config disk at `image` whose one file is `config.json` holding `json` (not
/// checked: tests hand guest-init bad configs on purpose). The tree is staged beside it, in
/// `<image>.tree/`.
pub fn config_image(image: &Path, json: &str) -> anyhow::Result<()> {
    let tree = image.with_extension("tree");
    fs::create_dir_all(&tree).with_context(|| format!("creating {}", tree.display()))?;
    let file = tree.join("config.json");
    fs::write(&file, json).with_context(|| format!("writing {}", file.display()))?;
    ext4_image(image, Some(&tree), 4)
}

/// An ext4 image of `size_mib` made from a directory (`mkfs.ext4 -d`, no root), or empty.
/// Files are owned by root in the image whoever runs it.
pub fn ext4_image(path: &Path, contents: Option<&Path>, size_mib: u32) -> anyhow::Result<()> {
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-q", "-F", "-E", "root_owner=0:0"]);
    if let Some(dir) = contents {
        cmd.arg("-d").arg(dir);
    }
    cmd.arg(path).arg(format!("{size_mib}M"));
    let out = cmd
        .output()
        .context("running mkfs.ext4 (apt-get install e2fsprogs)")?;
    if !out.status.success() {
        bail!(
            "mkfs.ext4 {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_recognised_by_their_superblock() {
        let dir = tempfile::tempdir().unwrap();
        let ext4 = dir.path().join("a.img");
        ext4_image(&ext4, None, 4).unwrap();
        assert_eq!(filesystem_of(&ext4).unwrap(), Some("ext4"));
        let mut erofs = vec![0u8; 4096];
        erofs[1024..1028].copy_from_slice(&0xE0F5_E1E2u32.to_le_bytes());
        let erofs_path = dir.path().join("b.img");
        fs::write(&erofs_path, erofs).unwrap();
        assert_eq!(filesystem_of(&erofs_path).unwrap(), Some("erofs"));
        let junk = dir.path().join("c.img");
        fs::write(&junk, b"not a filesystem").unwrap();
        let err = rootfs_image(&junk, dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("neither a directory nor an ext4 or erofs image"),
            "{err}"
        );
        // A directory becomes an ext4 image.
        let tree = dir.path().join("tree");
        fs::create_dir_all(tree.join("bin")).unwrap();
        let image = rootfs_image(&tree, dir.path()).unwrap();
        assert_eq!(filesystem_of(&image).unwrap(), Some("ext4"));
    }

    #[test]
    fn a_store_without_the_version_fails_with_the_next_step() {
        let dir = tempfile::tempdir().unwrap();
        let err = run(&RunOptions {
            data_dir: dir.path().to_owned(),
            lock: None,
            kernel: None,
            initrd: None,
            arch: Arch::X86_64,
            rootfs: dir.path().to_owned(),
            command: vec!["/bin/true".into()],
            memory_mib: 256,
            accel: None,
            timeout: Duration::from_secs(1),
            echo: false,
            vsock_socket: None,
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("cargo xtask artifacts"), "{err}");
    }
}
