//! Boot figures: PID 1 start → entrypoint exec over 10 VM boots (from guest-init's timings
//! line), and the sizes of guest-init and the minimal initrd.

use std::fs;
use std::time::Instant;

use anyhow::Context;
use system::Arch;
use testkit::bench::median;
use xshell::Shell;

use testkit::vm::{self, BOOT_TIMEOUT, Vm, VmSpec};
use xtask::initrd::guest_init::{self, BuildOptions};

const BOOTS: usize = 10;

fn run(sh: &Shell) -> anyhow::Result<()> {
    let workspace = xtask::workspace_root();
    for arch in Arch::ALL {
        let binary = guest_init::build(sh, &workspace, arch, &BuildOptions::default())?;
        let minimal = xtask::initrd::build_test_initrd(arch, std::path::Path::new(""), &[])?;
        println!(
            "{arch}: guest-init {} bytes; minimal initrd (no modules) {} bytes gzip",
            binary.bytes.len(),
            minimal.len()
        );
    }
    let kernel = vm::Kernel::debian_cloud()?;
    let test_initrd =
        xtask::initrd::build_test_initrd(Arch::X86_64, &kernel.modules, vm::TEST_MODULES)?;
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
    let config_tree = dir.path().join("config");
    fs::create_dir_all(&config_tree)?;
    fs::write(
        config_tree.join("config.json"),
        r#"{"entrypoint":["/bin/true"]}"#,
    )?;
    let config = dir.path().join("config.img");
    vm::ext4_image(&config, Some(&config_tree), 4)?;
    let initrd = dir.path().join("initrd.gz");
    fs::write(&initrd, &test_initrd)?;
    let mut spec = VmSpec::new(vec![rootfs, config]);
    spec.append = "guest_init.config=/dev/vdb guest_init.writable=tmpfs".into();

    let mut to_exec = Vec::new();
    let mut walls = Vec::new();
    for i in 0..BOOTS {
        let start = Instant::now();
        let boot = Vm::start_with(&kernel.image, &initrd, &spec)?.finish(BOOT_TIMEOUT)?;
        walls.push(start.elapsed().as_millis() as u64);
        if boot.exit != Some(guest_protocol::ExitLine::app(0)) {
            anyhow::bail!(
                "boot {i} ended with {:?}, not code 0 of the app:\n{}",
                boot.exit,
                boot.console
            );
        }
        let exec = boot
            .timing_ms("exec")
            .with_context(|| format!("boot {i} printed no timings line:\n{}", boot.console))?;
        let modules = boot.timing_ms("modules").unwrap_or(0);
        to_exec.push((exec, exec.saturating_sub(modules)));
    }
    println!(
        "PID 1 start → entrypoint exec, median of {BOOTS} boots ({}): {} ms \
         (of which after module loading: {} ms); QEMU start → power off: {} ms",
        vm::accelerator(),
        median(to_exec.iter().map(|t| t.0).collect()),
        median(to_exec.iter().map(|t| t.1).collect()),
        median(walls),
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let sh = Shell::new()?;
    sh.change_dir(xtask::workspace_root());
    run(&sh)
}
