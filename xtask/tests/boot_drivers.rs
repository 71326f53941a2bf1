//! Drivers on demand, proven by booting: an initrd with module groups, a QEMU machine with or
//! without the device a group is keyed on, and the app reading `/proc/modules`.
//!
//! The test initrd carries [`TEST_MODULES`] and two groups: `rng` (QEMU's virtio-rng,
//! `1af4:1005` → `virtio_rng`, with a firmware file so that the firmware path is exercised)
//! and `gpu` (NVIDIA display controllers, `10de::03`; Debian's cloud kernel has no nvidia
//! module, so `virtio_input` stands in: no NVIDIA device is ever present here, so it must
//! never load).

#[allow(dead_code)]
mod guest_vm;

use std::fs;
use std::path::Path;

use guest_protocol::ExitReason;
use guest_vm::Guest;
use serde_json::{Value, json};
use system::Arch;
use system::lock::ModuleGroup;
use testkit::vm::{BOOT_TIMEOUT, Boot, Kernel, TEST_MODULES, Vm};

fn group(pci: &str, module: &str, firmware: &[&str]) -> ModuleGroup {
    ModuleGroup {
        pci: vec![pci.to_owned()],
        modules: vec![module.to_owned()],
        firmware: firmware.iter().map(|s| s.to_string()).collect(),
    }
}

/// The firmware file the `rng` group carries (virtio-rng needs none: a marker to find).
const FIRMWARE: &str = "guest-init-test/marker.bin";
const FIRMWARE_TEXT: &str = "firmware-marker-7f3a";

/// Which test initrd a boot uses.
#[derive(Clone, Copy)]
enum Initrd {
    /// `rng` on virtio-rng (with firmware), `gpu` on NVIDIA display controllers.
    Groups,
    /// Only a `gpu` group, keyed on virtio-rng (a stand-in for a GPU QEMU cannot emulate), so
    /// that `gpu: true` can succeed.
    GpuOnRng,
}

/// The x86_64 test initrd of `kind`, built once per test process.
fn initrd(kind: Initrd) -> &'static Path {
    let (name, groups) = match kind {
        Initrd::Groups => (
            "groups",
            vec![
                ("gpu".to_owned(), group("10de::03", "virtio_input", &[])),
                (
                    "rng".to_owned(),
                    group("1af4:1005", "virtio_rng", &["guest-init-test"]),
                ),
            ],
        ),
        Initrd::GpuOnRng => (
            "gpu-on-rng",
            vec![("gpu".to_owned(), group("1af4:1005", "virtio_rng", &[]))],
        ),
    };
    testkit::vm::initrd_once(name, || {
        let kernel = Kernel::debian_cloud()?;
        let firmware = tempfile::tempdir()?;
        let file = firmware.path().join(FIRMWARE);
        fs::create_dir_all(file.parent().unwrap())?;
        fs::write(&file, FIRMWARE_TEXT)?;
        xtask::initrd::build_test_initrd(&xtask::initrd::TestInitrd {
            groups: groups.clone(),
            firmware_dir: Some(firmware.path().to_owned()),
            ..xtask::initrd::TestInitrd::new(Arch::X86_64)
                .with_modules(&kernel.modules, TEST_MODULES)
        })
    })
}

/// Boots a busybox rootfs with `config`, plus the extra QEMU arguments.
fn boot(config: Value, qemu_args: &[&str]) -> Boot {
    boot_with(Initrd::Groups, config, qemu_args)
}

fn boot_with(kind: Initrd, config: Value, qemu_args: &[&str]) -> Boot {
    let guest = Guest::busybox(config, |_| {});
    let mut spec = guest.spec(None);
    spec.qemu_args = qemu_args.iter().map(|s| s.to_string()).collect();
    let kernel = Kernel::debian_cloud().unwrap();
    Vm::start_with(&kernel.image, initrd(kind), &spec)
        .unwrap()
        .finish(BOOT_TIMEOUT)
        .unwrap()
}

/// An app that prints which of the groups' modules `/proc/modules` lists, the kernel's
/// firmware search path and the firmware file found there (after the root switch).
fn report_modules() -> Value {
    json!({
        "entrypoint": ["/bin/sh", "-c"],
        "cmd": [format!("for m in virtio_rng virtio_input; do \
                   if grep -q \"^$m \" /proc/modules; then echo \"MODULE $m loaded\"; \
                   else echo \"MODULE $m absent\"; fi; \
                 done; \
                 echo \"FWPATH $(cat /sys/module/firmware_class/parameters/path)\"; \
                 echo \"FWFILE $(cat \"$(cat /sys/module/firmware_class/parameters/path)/{FIRMWARE}\")\"")]
    })
}

#[test]
fn a_group_loads_when_its_pci_device_is_present() {
    let boot = boot(report_modules(), &["-device", "virtio-rng-pci"]);
    boot.expect_exit(0)
        .expect_output("MODULE virtio_rng loaded")
        .expect_output("MODULE virtio_input absent")
        .expect_output("FWPATH /run/guest-init/firmware")
        .expect_output(&format!("FWFILE {FIRMWARE_TEXT}"))
        .expect_log("group `rng`: 1af4:1005 matches 1 PCI device(s)")
        // virtio and virtio_ring come with the base list: the group loads only its own module.
        .expect_log("group `rng`: 1 module(s) loaded");
    assert!(boot.timing_ms("drivers").is_some(), "{}", boot.console);
}

#[test]
fn without_the_device_the_group_is_not_loaded() {
    let boot = boot(report_modules(), &[]);
    boot.expect_exit(0)
        .expect_output("MODULE virtio_rng absent")
        .expect_output("MODULE virtio_input absent");
    // No group loaded: the firmware search path is the kernel's default (empty).
    assert!(
        boot.console.lines().any(|l| l.trim_end() == "FWPATH"),
        "the firmware search path was set:\n{}",
        boot.console
    );
    assert!(
        !boot.console.contains("group `rng`"),
        "the rng group was considered matched:\n{}",
        boot.console
    );
}

#[test]
fn gpu_without_an_nvidia_device_fails_clearly_and_powers_off() {
    let mut config = report_modules();
    config["gpu"] = json!(true);
    let boot = boot(config, &["-device", "virtio-rng-pci"]);
    boot.expect_failure(ExitReason::Driver)
        .expect_log("FATAL (driver): config asks for a GPU (`gpu`), but none of the");
    boot.expect_log("matches the `gpu` module group (10de::03); attach the GPU to the VM");
    // guest-init's own lines quote the command: only the app's output counts.
    assert!(
        !boot
            .console
            .lines()
            .any(|l| !l.starts_with('[') && l.contains("MODULE ")),
        "the app ran although the GPU was missing:\n{}",
        boot.console
    );
    assert!(
        boot.console.contains("reboot: Power down"),
        "no orderly power-off:\n{}",
        boot.console
    );
}

#[test]
fn gpu_boots_when_the_gpu_group_matches_a_present_device() {
    let mut config = report_modules();
    config["gpu"] = json!(true);
    let boot = boot_with(Initrd::GpuOnRng, config, &["-device", "virtio-rng-pci"]);
    boot.expect_exit(0)
        .expect_output("MODULE virtio_rng loaded")
        .expect_log("group `gpu`: 1af4:1005 matches 1 PCI device(s)");
    // The stand-in loads no nvidia module: no NVIDIA device nodes are made.
    assert!(
        !boot.console.contains("NVIDIA device nodes"),
        "{}",
        boot.console
    );
}
