//! PID 1 figures: guest-init's start → entrypoint exec without the module-loading phase, over
//! [`BOOTS`] VM boots, next to a probe PID 1 that asks the kernel for the same work with almost
//! no userspace around it (`probe/pid1_probe.rs`: the same mounts, modules, config disk,
//! overlay root, root switch, loopback and spawn: the floor any init doing this work pays
//! under the same kernel and accelerator), booted alternately in the same run with the same
//! disks so both see the same machine load. Also the median of each phase of both `timings:`
//! lines, to show where guest-init spends more than the floor.
//!
//! `PID1_BENCH_BOOTS=<n>` changes the number of boots of each; `PID1_BENCH_CONSOLE=1` prints
//! guest-init's log lines of the first boot; `PID1_BENCH_COMPARE=<x86_64 guest-init binary>`
//! boots that one too, alternately in the same run (an earlier build, for before/after).

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use system::Arch;
use testkit::bench::{
    Figure, Target, exec_without, format_duration, median, phase_times, timings_marks,
};
use testkit::vm::{self, BOOT_TIMEOUT, Vm, VmSpec};
use xtask::initrd::modules::ModuleSet;

const BOOTS: usize = 10;
/// The figure's target (issue 13).
const TARGET: Duration = Duration::from_millis(50);
/// The mark of the phase the figure leaves out.
const MODULES: &str = "modules";

/// The probe PID 1, compiled for musl with the pinned toolchain's `rustc`.
fn build_probe(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let source = xtask::workspace_root().join("bench/benches/probe/pid1_probe.rs");
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

/// A test initrd (the minimal profile + `modules`) around `init`.
fn initrd_with(modules: &ModuleSet, init: &[u8]) -> anyhow::Result<Vec<u8>> {
    use xtask::initrd::{cpio, recipe};
    let tree = recipe::assemble(None, init, None, Some(modules))?;
    cpio::write_initrd(&tree, cpio::mtime_from_env()?, Default::default())
}

/// [`vm::TEST_MODULES`] of `kernel`, read once for every initrd the run boots.
fn test_modules(kernel: &vm::Kernel) -> anyhow::Result<ModuleSet> {
    let dir = xtask::initrd::modules_dir::ModulesDir::locate(&kernel.modules)?;
    let names: Vec<String> = vm::TEST_MODULES.iter().map(|s| s.to_string()).collect();
    ModuleSet::load(&dir, &names)
}

/// What one kind of boot measured: start → exec without module loading, and QEMU start →
/// power off, per boot.
#[derive(Default)]
struct Samples {
    outside_modules: Vec<u64>,
    walls: Vec<u64>,
}

/// Boots `initrd` once and returns its timings marks (and, when `app` is set, checks that the
/// app exited 0).
fn boot_once(
    kernel: &Path,
    initrd: &Path,
    spec: &VmSpec,
    app: bool,
    samples: &mut Samples,
) -> anyhow::Result<(Vec<(String, u64)>, String)> {
    let start = Instant::now();
    let boot = Vm::start_with(kernel, initrd, spec)?.finish(BOOT_TIMEOUT)?;
    samples.walls.push(start.elapsed().as_millis() as u64);
    if app && boot.exit != Some(guest_protocol::ExitLine::app(0)) {
        bail!(
            "{} ended with {:?}, not code 0 of the app:\n{}",
            initrd.display(),
            boot.exit,
            boot.console
        );
    }
    let marks = timings_marks(&boot.console).with_context(|| {
        format!(
            "{} printed no timings line:\n{}",
            initrd.display(),
            boot.console
        )
    })?;
    samples
        .outside_modules
        .push(exec_without(&marks, MODULES).context("the timings line has no exec mark")?);
    Ok((marks, boot.console))
}

/// Each phase's samples, in the order the phases first appear.
#[derive(Default)]
struct Phases(Vec<(String, Vec<u64>)>);

impl Phases {
    fn add(&mut self, marks: &[(String, u64)]) {
        for (name, ms) in phase_times(marks) {
            match self.0.iter_mut().find(|(n, _)| *n == name) {
                Some((_, samples)) => samples.push(ms),
                None => self.0.push((name, vec![ms])),
            }
        }
    }

    fn medians(&self) -> String {
        let medians: Vec<String> = self
            .0
            .iter()
            .map(|(name, samples)| format!("{name} {}", median(samples.clone())))
            .collect();
        medians.join(", ")
    }
}

fn main() -> anyhow::Result<()> {
    let boots: usize = match std::env::var("PID1_BENCH_BOOTS") {
        Ok(n) => n.parse().context("PID1_BENCH_BOOTS must be a number")?,
        Err(_) => BOOTS,
    };
    let show_console = std::env::var_os("PID1_BENCH_CONSOLE").is_some();
    let compare = std::env::var_os("PID1_BENCH_COMPARE").map(std::path::PathBuf::from);
    let kernel = vm::Kernel::debian_cloud()?;
    let modules = test_modules(&kernel)?;
    let dir = tempfile::tempdir()?;

    let initrd = dir.path().join("initrd.gz");
    fs::write(
        &initrd,
        xtask::initrd::build_test_initrd(
            &xtask::initrd::TestInitrd::new(Arch::X86_64)
                .with_modules(&kernel.modules, vm::TEST_MODULES),
        )?,
    )?;
    let other = match &compare {
        Some(binary) => {
            let bytes = fs::read(binary)
                .with_context(|| format!("PID1_BENCH_COMPARE: reading {}", binary.display()))?;
            let path = dir.path().join("compare.gz");
            fs::write(&path, initrd_with(&modules, &bytes)?)?;
            Some(path)
        }
        None => None,
    };
    let probe_initrd = dir.path().join("probe.gz");
    fs::write(
        &probe_initrd,
        initrd_with(&modules, &build_probe(dir.path())?)?,
    )?;

    let tree = dir.path().join("rootfs");
    vm::busybox_rootfs(Arch::X86_64, &tree, Path::new("/"))?;
    let rootfs = dir.path().join("rootfs.img");
    vm::ext4_image(&rootfs, Some(&tree), 64)?;
    let config = dir.path().join("config.img");
    xtask::vm::config_image(&config, r#"{"entrypoint":["/bin/true"]}"#)?;
    let mut spec = VmSpec::new(vec![rootfs, config]);
    spec.append = "guest_init.config=/dev/vdb guest_init.writable=tmpfs".into();

    let (mut ours, mut probe, mut compared) =
        (Samples::default(), Samples::default(), Samples::default());
    let (mut by_phase, mut probe_by_phase) = (Phases::default(), Phases::default());
    for i in 0..boots {
        let (marks, _) = boot_once(&kernel.image, &probe_initrd, &spec, false, &mut probe)?;
        probe_by_phase.add(&marks);
        if let Some(other) = &other {
            boot_once(&kernel.image, other, &spec, true, &mut compared)?;
        }
        let (marks, console) = boot_once(&kernel.image, &initrd, &spec, true, &mut ours)?;
        if show_console && i == 0 {
            for line in console.lines().filter(|l| l.contains("[guest-init")) {
                println!("  {line}");
            }
        }
        by_phase.add(&marks);
    }
    println!(
        "guest-init phases ({}), median ms of {boots} boots: {}",
        vm::accelerator(),
        by_phase.medians()
    );
    println!(
        "probe phases (the same kernel work), median ms of {boots} boots: {}",
        probe_by_phase.medians()
    );
    let ms = |samples: &[u64]| Duration::from_millis(median(samples.to_vec()));
    println!(
        "PID 1 start → entrypoint exec without module loading, median of {boots} boots: {} \
         (probe PID 1, the same kernel work: {}; target {}); QEMU start → power off {}",
        format_duration(ms(&ours.outside_modules)),
        format_duration(ms(&probe.outside_modules)),
        format_duration(TARGET),
        format_duration(ms(&ours.walls)),
    );
    if let Some(binary) = &compare {
        println!(
            "  {} in the same run: {}; QEMU start → power off {}",
            binary.display(),
            format_duration(ms(&compared.outside_modules)),
            format_duration(ms(&compared.walls)),
        );
    }
    Figure::time(
        "PID 1 start -> entrypoint exec, without module loading (TCG)",
        ms(&ours.outside_modules),
        "probe PID 1 (same kernel work)",
        ms(&probe.outside_modules),
    )
    .with_target(Target::TimeAtMost(TARGET))
    .print();
    Ok(())
}
