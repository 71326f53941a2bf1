//! The path as one, booted: lock → `cargo xtask artifacts` → store → `system` resolve → boot;
//! then `cargo xtask dist` → plain `tar -xzf` into another data dir → resolve → boot; then
//! `artifacts --from` the dist into a third data dir → the same digests; then `dist push` to a
//! registry on 127.0.0.1, `skopeo inspect --raw`, and `--from REF@sha256:…` into a fourth.
//!
//! The lock is made here from Debian's cloud kernel on this machine (a `file://` URL and its
//! sha256; Debian's vmlinuz is a bzImage, which QEMU's `-kernel` boots) and an initrd entry
//! carrying that kernel's virtio and overlay modules. Everything runs through the built
//! `cargo xtask` binary, as a release pipeline and a developer would.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::json;
use system::{Arch, Check, InitrdVersion, KernelVersion, Layout, Lock, Store};
use testkit::oci::DockerRegistry;
use testkit::vm::{Kernel, busybox_rootfs};
use xtask::test_suite::prepare::arm64_guest_dir;

const INITRD: &str = "e2e-v1";

fn xtask(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .env_remove("SYSTEM_DATA_DIR")
        .env_remove("XTASK_MIRROR")
        .output()
        .expect("running the xtask binary");
    eprintln!(
        "$ cargo xtask {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn xtask_ok(args: &[&str]) -> Output {
    let out = xtask(args);
    assert!(
        out.status.success(),
        "cargo xtask {} failed",
        args.join(" ")
    );
    out
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A lock pinning the Debian cloud kernel for `arch` by a file URL, and an initrd recipe with
/// its virtio and overlay modules (outputs recorded by the `artifacts` run).
fn write_lock(path: &Path, kernel_version: &str, arch: Arch, image: &Path) {
    let bytes = fs::read(image).unwrap();
    let lock = json!({
        "schema": 1,
        "defaults": { "kernel": kernel_version, "initrd": INITRD },
        "kernels": { kernel_version: { arch.as_str(): {
            "url": format!("file://{}", image.display()),
            "sha256": system::hash::sha256_bytes(&bytes).hex(),
            "size": bytes.len(),
        } } },
        "initrds": { INITRD: { "modules": ["virtio_pci", "virtio_blk", "overlay"], "outputs": {} } },
    });
    let lock = Lock::parse(&lock.to_string()).unwrap();
    fs::write(path, lock.to_json()).unwrap();
}

/// Resolves kernel and initrd through `system` for `lock`, fully verified; their digests.
fn resolve(data_dir: &Path, lock: &Lock, arch: Arch) -> (String, String) {
    let store = Store::with_lock(data_dir, lock.clone());
    assert_eq!(store.verify_all(Check::Full).unwrap().len(), 2);
    let kernel = store
        .kernel_path(&KernelVersion::new(lock.defaults.kernel.as_str()), arch)
        .unwrap();
    let initrd = store
        .initrd_path(&InitrdVersion::new(INITRD), arch)
        .unwrap();
    let name = |p: &Path| p.file_name().unwrap().to_str().unwrap().to_owned();
    (name(&kernel), name(&initrd))
}

/// `cargo xtask vm run` on `data_dir`: the app's exit code is the command's, the console has
/// guest-init's exit line.
fn boot(data_dir: &Path, lock: Option<&Path>, arch: Arch, rootfs: &Path) {
    let mut args = vec![
        "vm",
        "run",
        "--data-dir",
        s(data_dir),
        "--arch",
        arch.as_str(),
    ];
    if let Some(lock) = lock {
        args.extend(["--lock", s(lock)]);
    }
    args.extend([
        "--rootfs",
        s(rootfs),
        "--",
        "/bin/sh",
        "-c",
        "echo e2e-app-ran; uname -m; exit 7",
    ]);
    let out = xtask(&args);
    let console = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(7),
        "the app's exit code:\n{console}"
    );
    assert!(
        console.contains("GUEST-INIT-EXIT code=7 reason=app"),
        "{console}"
    );
    assert!(console.contains("e2e-app-ran"), "{console}");
    assert!(console.contains(arch.as_str()), "uname -m:\n{console}");
    assert!(!console.contains("Kernel panic"), "{console}");
}

fn lock_to_booted_vm_and_back_through_dist(arch: Arch) {
    let kernel = Kernel::debian_cloud_for(arch, &arm64_guest_dir()).unwrap();
    let kver = kernel
        .modules
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let kernel_version = format!("debian-{kver}");
    let work = tempfile::tempdir().unwrap();
    let lock_path = work.path().join("artifacts.lock");
    write_lock(&lock_path, &kernel_version, arch, &kernel.image);
    let rootfs = work.path().join("rootfs");
    busybox_rootfs(arch, &rootfs, &arm64_guest_dir()).unwrap();

    // 1. lock → artifacts → store, offline: the kernel is a local file, the initrd is built.
    let first = work.path().join("first");
    xtask_ok(&[
        "artifacts",
        "--lock",
        s(&lock_path),
        "--data-dir",
        s(&first),
        "--arch",
        arch.as_str(),
        "--modules-dir",
        s(&kernel.modules),
        "--offline",
    ]);
    let lock = xtask::lock::read(&lock_path).unwrap();
    assert!(
        lock.initrds[INITRD].outputs.contains_key(&arch),
        "the initrd output is recorded"
    );
    let digests = resolve(&first, &lock, arch);
    boot(&first, Some(&lock_path), arch, &rootfs);

    // 2. dist → plain tar into a fresh data dir → resolve with the tarball's own lock → boot.
    let out = work.path().join("dist");
    xtask_ok(&[
        "dist",
        "--lock",
        s(&lock_path),
        "--data-dir",
        s(&first),
        "--out",
        s(&out),
        "--arch",
        arch.as_str(),
    ]);
    let tarball = out.join(format!("system-{kernel_version}-{INITRD}-{arch}.tar.gz"));
    xtask_ok(&["dist", "verify", s(&tarball)]);
    let sums = Command::new("sha256sum")
        .args(["-c", "SHA256SUMS"])
        .current_dir(&out)
        .status()
        .unwrap();
    assert!(sums.success(), "sha256sum -c SHA256SUMS");
    let second = work.path().join("second");
    fs::create_dir_all(&second).unwrap();
    let untar = Command::new("tar")
        .arg("-C")
        .arg(&second)
        .arg("-xzf")
        .arg(&tarball)
        .status()
        .unwrap();
    assert!(untar.success());
    let installed_lock = xtask::lock::read(&Layout::new(&second).lock_file()).unwrap();
    assert_eq!(resolve(&second, &installed_lock, arch), digests);
    // No --lock: `vm run` resolves with the lock the tarball installed.
    boot(&second, None, arch, &rootfs);

    // 3. artifacts --from the dist: the same blobs, nothing built, the lock unchanged.
    let before = fs::read(&lock_path).unwrap();
    let third = work.path().join("third");
    xtask_ok(&[
        "artifacts",
        "--lock",
        s(&lock_path),
        "--data-dir",
        s(&third),
        "--from",
        s(&out),
        "--locked",
    ]);
    assert_eq!(fs::read(&lock_path).unwrap(), before);
    assert_eq!(resolve(&third, &lock, arch), digests);

    // 4. dist push to a registry on 127.0.0.1 → skopeo reads it → --from REF@digest → same.
    let registry = DockerRegistry::start();
    let reference = format!("{}/microvm/system:e2e-{arch}", registry.host());
    let pushed = xtask_ok(&[
        "dist",
        "push",
        &reference,
        "--lock",
        s(&lock_path),
        "--data-dir",
        s(&first),
        "--arch",
        arch.as_str(),
    ]);
    let pinned = String::from_utf8(pushed.stdout).unwrap().trim().to_owned();
    assert!(pinned.contains("@sha256:"), "{pinned}");
    let raw = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .output()
        .unwrap();
    assert!(
        raw.status.success(),
        "{}",
        String::from_utf8_lossy(&raw.stderr)
    );
    let index: serde_json::Value = serde_json::from_slice(&raw.stdout).unwrap();
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let manifest = &index["manifests"][0];
    assert_eq!(manifest["artifactType"], xtask::dist::oci::ARTIFACT_TYPE);
    assert_eq!(manifest["platform"]["architecture"], arch.oci_arch());
    let fourth = work.path().join("fourth");
    xtask_ok(&[
        "artifacts",
        "--lock",
        s(&lock_path),
        "--data-dir",
        s(&fourth),
        "--from",
        &pinned,
        "--locked",
    ]);
    assert_eq!(resolve(&fourth, &lock, arch), digests);
}

#[test]
fn x86_64_lock_to_booted_vm_and_back_through_dist() {
    lock_to_booted_vm_and_back_through_dist(Arch::X86_64);
}

#[test]
fn aarch64_lock_to_booted_vm_and_back_through_dist() {
    lock_to_booted_vm_and_back_through_dist(Arch::Aarch64);
}
