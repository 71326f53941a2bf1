//! First run on a fresh clone: the committed HEAD cloned into a temp dir, an empty target dir
//! and an empty store, then `cargo xtask artifacts --only initrds --initrd <default> --offline`
//! to the first initrds in the store. Nearly all of it is compiling: xtask (dev profile) and
//! guest-init for every arch (release). Crate downloads are excluded: `cargo fetch` fills the
//! shared crate cache before the clock starts. The baseline is the target itself (2 minutes on
//! 2 cores), not a same-run measurement: there is no other way to build these crates to compare.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use system::Lock;
use testkit::bench::{Figure, Target, format_duration};
use xshell::{Shell, cmd};

/// Issue 13: from `git clone` to the first initrd in at most 2 minutes on 2 cores.
const TARGET: Duration = Duration::from_secs(120);

fn run(sh: &Shell) -> anyhow::Result<()> {
    let workspace = sh.current_dir();
    let commit = cmd!(sh, "git rev-parse HEAD").read()?;
    if !cmd!(sh, "git status --porcelain --untracked-files=no")
        .read()?
        .is_empty()
    {
        eprintln!("note: uncommitted changes are not measured: the clone is of commit {commit}");
    }
    let version = offline_initrd(&workspace.join("artifacts.lock"))?;

    let dir = tempfile::Builder::new().prefix("first-run-").tempdir()?;
    let clone = dir.path().join("src");
    let target = dir.path().join("target");
    let data = dir.path().join("data");
    cmd!(sh, "git clone --quiet --no-checkout {workspace} {clone}").run()?;
    cmd!(sh, "git -C {clone} checkout --quiet --detach {commit}").run()?;

    let sh = sh.clone();
    sh.change_dir(&clone);
    let _target = sh.push_env("CARGO_TARGET_DIR", &target);
    // Not timed: downloads depend on the network, not on what this project compiles.
    cmd!(sh, "cargo fetch --locked")
        .run()
        .context("filling the crate cache (cargo fetch)")?;

    let cpu_before = children_cpu()?;
    let start = Instant::now();
    // The same build `cargo xtask` starts, timed apart to show where the time goes.
    cmd!(sh, "cargo build --locked --offline --package xtask")
        .run()
        .context("building xtask in the fresh clone")?;
    let host = start.elapsed();
    let host_cpu = children_cpu()? - cpu_before;
    cmd!(
        sh,
        "cargo --locked --offline xtask artifacts --only initrds --initrd {version} --offline --data-dir {data}"
    )
    .run()
    .context("the first artifacts run in the fresh clone")?;
    let wall = start.elapsed();
    let cpu = children_cpu()? - cpu_before;

    for arch in system::Arch::ALL {
        let initrd = data.join(format!("system/initrd/{version}/{arch}/initrd"));
        ensure!(
            initrd.is_file(),
            "the first run ended without {} in the store",
            initrd.display()
        );
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "first run (fresh clone of {commit}, empty target dir, crate downloads excluded, \
         {cores} cores):"
    );
    println!(
        "  xtask build:               {:>9} wall, {:>6.1} s CPU",
        format_duration(host),
        host_cpu.as_secs_f64()
    );
    println!(
        "  guest-init + initrds:      {:>9} wall, {:>6.1} s CPU",
        format_duration(wall - host),
        (cpu - host_cpu).as_secs_f64()
    );
    println!(
        "  total:                     {:>9} wall, {:>6.1} s CPU (target <= {})",
        format_duration(wall),
        cpu.as_secs_f64(),
        format_duration(TARGET)
    );
    Figure {
        value: Some(wall),
        ..Figure::plain(
            "first run: fresh clone to first initrd (downloads excluded)",
            format!(
                "{} wall, {:.0} s CPU on {cores} cores",
                format_duration(wall),
                cpu.as_secs_f64()
            ),
        )
    }
    .with_target(Target::TimeAtMost(TARGET))
    .print();
    Ok(())
}

/// The lock's default initrd, refused unless it builds offline (no base image to pull).
fn offline_initrd(lock: &Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(lock).with_context(|| format!("reading {}", lock.display()))?;
    let lock = Lock::parse(&text).with_context(|| format!("parsing {}", lock.display()))?;
    let version = &lock.defaults.initrd;
    let Some(initrd) = lock.initrds.get(version) else {
        bail!("the lock's default initrd {version} is not among its initrds");
    };
    if let Some(base) = &initrd.base {
        bail!(
            "the lock's default initrd {version} needs base image {base}, which an offline first \
             run cannot pull; make the default an initrd without a base"
        );
    }
    Ok(version.to_string())
}

/// CPU time (user + system) of every child process waited for so far, and of their waited-for
/// descendants: cargo waits for each rustc, so this is the whole build's CPU time.
fn children_cpu() -> anyhow::Result<Duration> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage writes a whole `rusage` into the pointer on success, checked below.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, usage.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("getrusage(RUSAGE_CHILDREN)");
    }
    // SAFETY: initialized by the successful call above.
    let usage = unsafe { usage.assume_init() };
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    Ok(time(usage.ru_utime) + time(usage.ru_stime))
}

fn main() -> anyhow::Result<()> {
    run(&testkit::bench::workspace_shell()?)
}
