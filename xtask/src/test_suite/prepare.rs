//! Preparing a fresh machine for the tests: the Debian packages the tests use, and Debian's
//! arm64 kernel and busybox for the aarch64 VM tests (the rustup targets are
//! [`crate::toolchain`]'s, shared with `cargo xtask artifacts`).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use xshell::{Shell, cmd};

/// The command that prepares a machine for the tests (named in errors of tests that need it).
pub const PREPARE_COMMAND: &str = "cargo xtask test --prepare-only";

/// Where Debian's arm64 cloud kernel and busybox are unpacked for the aarch64 VM tests.
pub fn arm64_guest_dir() -> PathBuf {
    crate::workspace_root().join("target/vm-tests/arm64-kernel/root")
}

/// rust-vmm's vsock device daemon: the VM tests' stand-in for Cloud Hypervisor's vsock (QEMU
/// `vhost-user-vsock-pci` on one side, the same hybrid Unix socket on the other).
pub const VSOCK_DAEMON: &str = "vhost-device-vsock";
/// The pinned version of [`VSOCK_DAEMON`].
pub const VSOCK_DAEMON_VERSION: &str = "0.3.0";

/// Where `cargo xtask test` installs [`VSOCK_DAEMON`] (`cargo install --root`).
pub fn tools_dir() -> PathBuf {
    crate::workspace_root().join("target/vm-tests/tools")
}

/// The installed [`VSOCK_DAEMON`] binary.
pub fn vsock_daemon_path() -> PathBuf {
    tools_dir().join("bin").join(VSOCK_DAEMON)
}

/// Installs [`VSOCK_DAEMON`] [`VSOCK_DAEMON_VERSION`] with `cargo install --locked` into
/// [`tools_dir`], unless the binary there already reports that version.
pub fn vsock_daemon(sh: &Shell) -> anyhow::Result<()> {
    let binary = vsock_daemon_path();
    let reported = cmd!(sh, "{binary} --version")
        .quiet()
        .ignore_stderr()
        .read()
        .unwrap_or_default();
    if reports_version(&reported, VSOCK_DAEMON_VERSION) {
        return Ok(());
    }
    let root = tools_dir();
    eprintln!(
        "installing {VSOCK_DAEMON} {VSOCK_DAEMON_VERSION} into {}",
        root.display()
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    cmd!(
        sh,
        "{cargo} install --locked --version {VSOCK_DAEMON_VERSION} --root {root} {VSOCK_DAEMON}"
    )
    .run()
    .with_context(|| {
        format!(
            "installing {VSOCK_DAEMON} {VSOCK_DAEMON_VERSION} (the vsock VM tests' device daemon) \
             from crates.io; it needs the network once, then {} is reused",
            binary.display()
        )
    })
}

/// Whether `--version` output (`vhost-device-vsock 0.3.0`) names exactly `version`.
fn reports_version(output: &str, version: &str) -> bool {
    output.split_whitespace().nth(1) == Some(version)
}

/// Debian packages the tests use: (package, why). Installed when missing and running as root.
const APT_PACKAGES: &[(&str, &str)] = &[
    (
        "cpio",
        "GNU cpio reads initrds back in the reproducibility tests",
    ),
    ("curl", "the download benchmark's baseline"),
    ("openssl", "the hashing benchmark's baseline (openssl dgst)"),
    (
        "docker-registry",
        "the OCI pull tests run a real registry on 127.0.0.1",
    ),
    (
        "skopeo",
        "the OCI tests push fixture images and read the cache back",
    ),
    (
        "umoci",
        "the OCI tests cross-check the layer model against umoci's unpack",
    ),
    (
        "qemu-system-x86",
        "the VM tests boot guest-init under qemu-system-x86_64",
    ),
    (
        "qemu-system-arm",
        "the aarch64 VM tests boot guest-init under qemu-system-aarch64 -M virt",
    ),
    (
        "kmod",
        "depmod indexes the modules of the arm64 kernel the aarch64 VM tests boot",
    ),
    (
        "linux-image-cloud-amd64",
        "the VM tests boot Debian's cloud kernel and its virtio modules",
    ),
    (
        "e2fsprogs",
        "mkfs.ext4 -d makes the VM tests' disks; debugfs reads them back",
    ),
    (
        "busybox-static",
        "the VM tests' rootfs has a shell and tools",
    ),
    (
        "erofs-utils",
        "mkfs.erofs makes the erofs rootfs and volume images the VM tests boot",
    ),
    (
        "dosfstools",
        "mkfs.vfat makes the vfat config disk of a VM test",
    ),
    (
        "mtools",
        "mcopy puts config.json on that vfat disk without root",
    ),
    ("genisoimage", "makes the iso9660 config disk of a VM test"),
    (
        "python3-grpcio",
        "an independent gRPC client (Python) checks the guest agent's wire contract",
    ),
    (
        "python3-grpc-tools",
        "generates that client's stubs from guest.proto",
    ),
    (
        "mmdebstrap",
        "the systemd-mode VM test boots a Debian rootfs with systemd-sysv built by mmdebstrap",
    ),
];

pub fn apt_packages(sh: &Shell) -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .map(|(package, _)| *package)
        .filter(|package| !apt_installed(sh, package))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let is_root = cmd!(sh, "id -u")
        .quiet()
        .read()
        .map(|uid| uid == "0")
        .unwrap_or(false);
    if !is_root || !Path::new("/usr/bin/apt-get").exists() {
        let why: Vec<String> = APT_PACKAGES
            .iter()
            .filter(|(p, _)| missing.contains(p))
            .map(|(p, why)| format!("  {p}: {why}"))
            .collect();
        bail!(
            "the tests need these Debian packages:\n{}\ninstall them with:\n  sudo apt-get install -y {}",
            why.join("\n"),
            missing.join(" ")
        );
    }
    eprintln!("installing test dependencies: {}", missing.join(" "));
    cmd!(sh, "apt-get update -q")
        .run()
        .context("apt-get update")?;
    let _frontend = sh.push_env("DEBIAN_FRONTEND", "noninteractive");
    cmd!(
        sh,
        "apt-get install -y -q --no-install-recommends {missing...}"
    )
    .run()
    .context("installing the tests' Debian packages")
}

/// Debian's arm64 cloud kernel (with a `modules.dep`) and `busybox-static`, unpacked at
/// [`arm64_guest_dir`] for the aarch64 VM tests. An amd64 host cannot install arm64
/// packages, so they are fetched with `apt-get download` and a private apt state (the host's
/// sources, arm64 only, an empty dpkg status) kept next to it, then unpacked with `dpkg-deb -x`.
/// Idempotent: a complete root is kept (delete it to fetch newer packages); it is only renamed
/// into place once complete.
pub fn arm64_guest(sh: &Shell) -> anyhow::Result<()> {
    let root = arm64_guest_dir();
    if root.is_dir() {
        return Ok(());
    }
    eprintln!("preparing the aarch64 VM tests: Debian's arm64 cloud kernel and busybox-static");
    fetch_arm64_guest(sh, &root).with_context(|| {
        format!(
            "preparing {} (Debian's arm64 cloud kernel and busybox-static for the aarch64 VM \
             tests, fetched from the host's apt sources with a private arm64 apt state)",
            root.display()
        )
    })
}

fn fetch_arm64_guest(sh: &Shell, root: &Path) -> anyhow::Result<()> {
    let dir = root.parent().context("the arm64 root has a parent")?;
    let lists = dir.join("lists");
    let cache = dir.join("cache");
    let status = dir.join("status");
    std::fs::create_dir_all(lists.join("partial"))?;
    std::fs::create_dir_all(cache.join("archives/partial"))?;
    std::fs::write(&status, "")?;
    let options: Vec<String> = [
        "APT::Architecture=arm64".to_owned(),
        "APT::Architectures::=arm64".to_owned(),
        format!("Dir::State::Lists={}", lists.display()),
        format!("Dir::Cache={}", cache.display()),
        format!("Dir::State::status={}", status.display()),
    ]
    .into_iter()
    .flat_map(|o| ["-o".to_owned(), o])
    .collect();
    let options = options.as_slice();
    cmd!(sh, "apt-get {options...} -q update")
        .run()
        .context("apt-get update (arm64, private state)")?;
    let depends = cmd!(sh, "apt-cache {options...} depends linux-image-cloud-arm64")
        .read()
        .context("apt-cache depends linux-image-cloud-arm64")?;
    let kernel = arm64_kernel_package(&depends)?;
    let kver = kernel["linux-image-".len()..].to_owned();

    let debs = dir.join("debs");
    if debs.exists() {
        std::fs::remove_dir_all(&debs)?;
    }
    std::fs::create_dir_all(&debs)?;
    {
        let _cwd = sh.push_dir(&debs);
        cmd!(
            sh,
            "apt-get {options...} -q download {kernel} busybox-static"
        )
        .run()
        .with_context(|| format!("apt-get download {kernel} busybox-static"))?;
    }
    let staging = dir.join("root.partial");
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    std::fs::create_dir_all(&staging)?;
    for deb in std::fs::read_dir(&debs)? {
        let deb = deb?.path();
        cmd!(sh, "dpkg-deb -x {deb} {staging}")
            .run()
            .with_context(|| format!("dpkg-deb -x {}", deb.display()))?;
    }
    // Debian's package leaves modules.dep to its postinst.
    if !staging
        .join("lib/modules")
        .join(&kver)
        .join("modules.dep")
        .is_file()
    {
        cmd!(sh, "depmod -b {staging} {kver}")
            .run()
            .context("depmod (apt-get install kmod)")?;
    }
    for needed in [
        format!("boot/vmlinuz-{kver}"),
        format!("lib/modules/{kver}/modules.dep"),
        "bin/busybox".to_owned(),
    ] {
        if !staging.join(&needed).is_file() {
            bail!("the unpacked packages have no {needed}");
        }
    }
    std::fs::rename(&staging, root)?;
    eprintln!("prepared {} (kernel {kver})", root.display());
    Ok(())
}

/// The real kernel package the `linux-image-cloud-arm64` metapackage depends on, from
/// `apt-cache depends` output.
fn arm64_kernel_package(depends: &str) -> anyhow::Result<String> {
    depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-cloud-arm64"))
        .map(str::to_owned)
        .with_context(|| {
            format!("linux-image-cloud-arm64 depends on no linux-image-*-cloud-arm64:\n{depends}")
        })
}

fn apt_installed(sh: &Shell, package: &str) -> bool {
    let format = "-f=${Status}";
    cmd!(sh, "dpkg-query -W {format} {package}")
        .quiet()
        .ignore_stderr()
        .read()
        .map(|status| status.ends_with("install ok installed"))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vsock_daemon_is_reinstalled_unless_it_reports_the_pinned_version() {
        assert!(reports_version("vhost-device-vsock 0.3.0\n", "0.3.0"));
        assert!(!reports_version("vhost-device-vsock 0.2.0\n", "0.3.0"));
        assert!(!reports_version("vhost-device-vsock 0.3.0-rc1", "0.3.0"));
        assert!(!reports_version("", "0.3.0"));
    }

    #[test]
    fn finds_the_real_arm64_kernel_package() {
        let depends = "linux-image-cloud-arm64\n  Depends: linux-image-6.1.0-56-cloud-arm64\n";
        assert_eq!(
            arm64_kernel_package(depends).unwrap(),
            "linux-image-6.1.0-56-cloud-arm64"
        );
        assert!(arm64_kernel_package("linux-image-cloud-arm64\n").is_err());
    }
}
