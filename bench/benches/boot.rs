//! Boot figures: the sizes of guest-init and the minimal initrd, and what each initrd
//! compression costs at boot: the kernel's own unpack time (from its log) and QEMU start →
//! guest-init's first line, over [`UNPACK_BOOTS`] boots each. PID 1's own time (start →
//! entrypoint exec) is `benches/pid1.rs`.

use std::fs;
use std::time::Instant;

use anyhow::Context;
use system::Arch;
use system::lock::InitrdCompression;
use testkit::bench::median;
use xshell::Shell;

use testkit::vm::{self, BOOT_TIMEOUT, Vm, VmSpec};
use xtask::initrd::TestInitrd;
use xtask::initrd::guest_init::{self, BuildOptions};

/// Boots per compression for the unpack figures.
const UNPACK_BOOTS: usize = 5;

fn run(sh: &Shell) -> anyhow::Result<()> {
    let workspace = xtask::workspace_root();
    for arch in Arch::ALL {
        let binary = guest_init::build(sh, &workspace, arch, &BuildOptions::default())?;
        let minimal = xtask::initrd::build_test_initrd(&TestInitrd::new(arch))?;
        let with_agent = xtask::initrd::build_test_initrd(&TestInitrd {
            agent: true,
            ..TestInitrd::new(arch)
        })?;
        println!(
            "{arch}: guest-init {} bytes, guest-agent {} bytes; minimal initrd (no modules) {} \
             bytes gzip, {} bytes with the agent",
            binary.guest_init.bytes.len(),
            binary.agent.bytes.len(),
            minimal.len(),
            with_agent.len()
        );
    }
    let kernel = vm::Kernel::debian_cloud()?;
    let test_initrd = xtask::initrd::build_test_initrd(
        &TestInitrd::new(Arch::X86_64).with_modules(&kernel.modules, vm::TEST_MODULES),
    )?;
    println!(
        "x86_64 test initrd (+ {} and their dependencies): {} bytes",
        vm::TEST_MODULES.join(", "),
        test_initrd.len()
    );

    let dir = tempfile::tempdir()?;
    let tree = dir.path().join("rootfs");
    vm::busybox_rootfs(Arch::X86_64, &tree, std::path::Path::new("/"))?;
    let rootfs = dir.path().join("rootfs.img");
    vm::ext4_image(&rootfs, Some(&tree), 64)?;
    unpack_costs(&kernel.image, &kernel.modules, dir.path(), &rootfs)
}

/// For each compression: its size, the kernel's unpack time (from "Trying to unpack rootfs
/// image" to "Freeing initrd memory" in its log, read by the app with `dmesg`) and QEMU start →
/// guest-init's first console line, medians of [`UNPACK_BOOTS`] boots.
fn unpack_costs(
    kernel: &std::path::Path,
    modules: &std::path::Path,
    dir: &std::path::Path,
    rootfs: &std::path::Path,
) -> anyhow::Result<()> {
    let config_tree = dir.join("dmesg-config");
    fs::create_dir_all(&config_tree)?;
    fs::write(
        config_tree.join("config.json"),
        r#"{"entrypoint":["/bin/sh","-c"],"cmd":["dmesg | grep -e 'Trying to unpack' -e 'Freeing initrd memory'"]}"#,
    )?;
    let config = dir.join("dmesg-config.img");
    vm::ext4_image(&config, Some(&config_tree), 4)?;
    let mut spec = VmSpec::new(vec![rootfs.to_path_buf(), config]);
    spec.append = "guest_init.config=/dev/vdb guest_init.writable=tmpfs".into();

    println!(
        "initrd unpack at boot ({}, x86_64 test initrd), median of {UNPACK_BOOTS} boots each:",
        vm::accelerator()
    );
    for compression in InitrdCompression::ALL {
        let bytes = xtask::initrd::build_test_initrd(&TestInitrd {
            compression,
            ..TestInitrd::new(Arch::X86_64).with_modules(modules, vm::TEST_MODULES)
        })?;
        let initrd = dir.join(format!("initrd.{compression}"));
        fs::write(&initrd, &bytes)?;
        let mut unpack = Vec::new();
        let mut first_line = Vec::new();
        for i in 0..UNPACK_BOOTS {
            let start = Instant::now();
            let vm = Vm::start_with(kernel, &initrd, &spec)?;
            vm.wait_for("[guest-init", BOOT_TIMEOUT)?;
            first_line.push(start.elapsed().as_millis() as u64);
            let boot = vm.finish(BOOT_TIMEOUT)?;
            if boot.exit != Some(guest_protocol::ExitLine::app(0)) {
                anyhow::bail!(
                    "{compression} boot {i} ended with {:?}:\n{}",
                    boot.exit,
                    boot.console
                );
            }
            let at = |needle: &str| {
                kernel_time_us(&boot.console, needle).with_context(|| {
                    format!(
                        "{compression} boot {i}: no kernel line {needle:?}:\n{}",
                        boot.console
                    )
                })
            };
            let (from, to) = (at("Trying to unpack")?, at("Freeing initrd memory")?);
            unpack.push(to.saturating_sub(from));
        }
        println!(
            "  {:<5} {:>9} bytes  kernel unpack {:>7.1} ms  QEMU start → first guest-init line \
             {:>5} ms",
            compression.as_str(),
            bytes.len(),
            median(unpack) as f64 / 1e3,
            median(first_line)
        );
    }
    Ok(())
}

/// The kernel timestamp (µs since boot) of the first `[   1.234567] <needle>` line (guest-init's
/// log quotes the app's command, needle included, on lines without such a stamp).
fn kernel_time_us(console: &str, needle: &str) -> Option<u64> {
    console.lines().find_map(|line| {
        let (stamp, text) = line.strip_prefix('[')?.split_once(']')?;
        if !text.trim_start().starts_with(needle) {
            return None;
        }
        let (secs, micros) = stamp.trim().split_once('.')?;
        Some(secs.parse::<u64>().ok()? * 1_000_000 + micros.parse::<u64>().ok()?)
    })
}

fn main() -> anyhow::Result<()> {
    run(&testkit::bench::workspace_shell()?)
}
