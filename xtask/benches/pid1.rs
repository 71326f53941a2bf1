//! PID 1 figures: guest-init's start → entrypoint exec without the module-loading phase, over
//! [`BOOTS`] VM boots, next to a probe PID 1 that only mounts /proc, /sys and /dev (the floor
//! any init pays under the same kernel and accelerator), booted alternately in the same run so
//! both see the same machine load. Also the median of each phase of guest-init's `timings:`
//! line, to show where the time goes.
//!
//! `PID1_BENCH_BOOTS=<n>` changes the number of boots of each; `PID1_BENCH_CONSOLE=1` prints
//! guest-init's log lines of the first boot.

use std::fs;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use system::Arch;
use testkit::bench::{
    Figure, Target, exec_without, format_duration, median, phase_times, timings_marks,
};
use testkit::vm::{self, BOOT_TIMEOUT, Vm, VmSpec};

const BOOTS: usize = 10;
/// The figure's target (issue 13).
const TARGET: Duration = Duration::from_millis(50);
/// The mark of the phase the figure leaves out.
const MODULES: &str = "modules";

/// The probe PID 1, compiled for musl with the pinned toolchain's `rustc`.
fn build_probe(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let source = xtask::workspace_root().join("xtask/benches/probe/pid1_probe.rs");
    let out = dir.join("pid1-probe");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let status = std::process::Command::new(&rustc)
        .current_dir(xtask::workspace_root())
        .args(["--edition", "2024", "--target"])
        .arg(Arch::X86_64.musl_target())
        .args([
            "-C",
            "linker=rust-lld",
            "-C",
            "opt-level=s",
            "-C",
            "panic=abort",
            "-C",
            "strip=symbols",
            "-o",
        ])
        .arg(&out)
        .arg(&source)
        .status()
        .with_context(|| format!("running {rustc} for {}", source.display()))?;
    if !status.success() {
        bail!("{rustc} {} exited with {status}", source.display());
    }
    Ok(fs::read(&out)?)
}

fn run() -> anyhow::Result<()> {
    let boots: usize = match std::env::var("PID1_BENCH_BOOTS") {
        Ok(n) => n.parse().context("PID1_BENCH_BOOTS must be a number")?,
        Err(_) => BOOTS,
    };
    let show_console = std::env::var_os("PID1_BENCH_CONSOLE").is_some();
    let kernel = vm::Kernel::debian_cloud()?;
    let dir = tempfile::tempdir()?;

    let initrd = dir.path().join("initrd.gz");
    fs::write(
        &initrd,
        xtask::initrd::build_test_initrd(
            Arch::X86_64,
            &kernel.modules,
            vm::TEST_MODULES,
            Default::default(),
        )?,
    )?;
    let probe_tree = xtask::initrd::recipe::assemble(None, &build_probe(dir.path())?, None)?;
    let probe_initrd = dir.path().join("probe.gz");
    fs::write(
        &probe_initrd,
        xtask::initrd::cpio::write_initrd(
            &probe_tree,
            xtask::initrd::cpio::mtime_from_env()?,
            Default::default(),
        )?,
    )?;

    let tree = dir.path().join("rootfs");
    vm::busybox_rootfs(Arch::X86_64, &tree, Path::new("/"))?;
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
    let mut spec = VmSpec::new(vec![rootfs, config]);
    spec.append = "guest_init.config=/dev/vdb guest_init.writable=tmpfs".into();

    let mut ours = Vec::new();
    let mut probe = Vec::new();
    let mut by_phase: Vec<(String, Vec<u64>)> = Vec::new();
    for i in 0..boots {
        let boot = Vm::start_with(&kernel.image, &probe_initrd, &VmSpec::new(vec![]))?
            .finish(BOOT_TIMEOUT)?;
        let probe_marks = timings_marks(&boot.console).with_context(|| {
            format!("probe boot {i} printed no timings line:\n{}", boot.console)
        })?;
        probe.push(
            exec_without(&probe_marks, MODULES).context("the probe's line has no exec mark")?,
        );

        let boot = Vm::start_with(&kernel.image, &initrd, &spec)?.finish(BOOT_TIMEOUT)?;
        if boot.exit != Some(guest_protocol::ExitLine::app(0)) {
            bail!(
                "boot {i} ended with {:?}, not code 0 of the app:\n{}",
                boot.exit,
                boot.console
            );
        }
        if show_console && i == 0 {
            for line in boot.console.lines().filter(|l| l.contains("[guest-init")) {
                println!("  {line}");
            }
        }
        let marks = timings_marks(&boot.console)
            .with_context(|| format!("boot {i} printed no timings line:\n{}", boot.console))?;
        ours.push(exec_without(&marks, MODULES).context("the timings line has no exec mark")?);
        for (name, ms) in phase_times(&marks) {
            match by_phase.iter_mut().find(|(n, _)| *n == name) {
                Some((_, samples)) => samples.push(ms),
                None => by_phase.push((name, vec![ms])),
            }
        }
    }
    let phase_medians: Vec<String> = by_phase
        .into_iter()
        .map(|(name, samples)| format!("{name} {}", median(samples)))
        .collect();
    println!(
        "guest-init phases ({}), median ms of {boots} boots: {}",
        vm::accelerator(),
        phase_medians.join(", ")
    );
    let (ours, probe) = (
        Duration::from_millis(median(ours)),
        Duration::from_millis(median(probe)),
    );
    println!(
        "PID 1 start → entrypoint exec without module loading, median of {boots} boots: {} \
         (probe PID 1, 3 mounts: {}; target {})",
        format_duration(ours),
        format_duration(probe),
        format_duration(TARGET)
    );
    Figure::time(
        "PID 1 start -> entrypoint exec, without module loading (TCG)",
        ours,
        "probe PID 1 (3 mounts)",
        probe,
    )
    .with_target(Target::TimeAtMost(TARGET))
    .print();
    Ok(())
}

fn main() -> anyhow::Result<()> {
    run()
}
