//! Every initrd compression the recipe offers boots: the test initrd written as gzip, zstd,
//! legacy lz4 and uncompressed, each unpacked by Debian's cloud kernel (which has every
//! `CONFIG_RD_*`) and running an app to its exit line under QEMU.

use std::fs;

use system::Arch;
use system::lock::InitrdCompression;
use testkit::vm::{BOOT_TIMEOUT, Kernel, TEST_MODULES, Vm, VmSpec, busybox_rootfs, ext4_image};

/// Boots the test initrd compressed as `compression` and expects the app's exit code 0.
fn boots_with(compression: InitrdCompression) {
    let kernel = Kernel::debian_cloud().unwrap();
    let initrd = xtask::initrd::build_test_initrd(&xtask::initrd::TestInitrd {
        compression,
        ..xtask::initrd::TestInitrd::new(Arch::X86_64).with_modules(&kernel.modules, TEST_MODULES)
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("rootfs-tree");
    busybox_rootfs(Arch::X86_64, &tree, std::path::Path::new("/")).unwrap();
    let rootfs = dir.path().join("rootfs.img");
    ext4_image(&rootfs, Some(&tree), 64).unwrap();
    let config = dir.path().join("config.img");
    xtask::vm::config_image(
        &config,
        r#"{"entrypoint":["echo"],"cmd":["unpacked and running"]}"#,
    )
    .unwrap();
    let path = dir.path().join(format!("initrd.{compression}"));
    fs::write(&path, &initrd).unwrap();

    let mut spec = VmSpec::new(vec![rootfs, config]);
    spec.append = "guest_init.config=/dev/vdb guest_init.writable=tmpfs".into();
    let boot = Vm::start_with(&kernel.image, &path, &spec)
        .unwrap()
        .finish(BOOT_TIMEOUT)
        .unwrap();
    boot.expect_exit(0).expect_output("unpacked and running");
    // The kernel says when an initramfs fails to unpack and falls back; it must not have.
    assert!(
        !boot.console.contains("Initramfs unpacking failed"),
        "{compression}: {}",
        boot.console
    );
}

#[test]
fn a_gzip_initrd_boots() {
    boots_with(InitrdCompression::Gzip);
}

#[test]
fn a_zstd_initrd_boots() {
    boots_with(InitrdCompression::Zstd);
}

#[test]
fn a_legacy_lz4_initrd_boots() {
    boots_with(InitrdCompression::Lz4);
}

#[test]
fn an_uncompressed_initrd_boots() {
    boots_with(InitrdCompression::None);
}
