//! `cargo xtask test`: the one test command. It prepares what the tests need on a fresh machine
//! ([`prepare`]), then runs the formatting and lint gates, every test in the workspace, the
//! check that the committed lock's default initrd rebuilds byte-identically, and each fuzz
//! target for a few seconds over its seeds ([`crate::fuzz::smoke`]).

pub mod prepare;
pub mod systemd_rootfs;

use anyhow::Context;
use xshell::{Shell, cmd};

/// What `cargo xtask test` runs.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Prepare the machine, then stop without running anything.
    pub prepare_only: bool,
    /// Skip `cargo fmt --check` and clippy.
    pub no_lint: bool,
    /// Passed to `cargo test` (e.g. a test name filter).
    pub cargo_test_args: Vec<String>,
}

/// Prepares the machine (rustup targets, apt packages, the arm64 kernel and busybox for the
/// aarch64 VM tests, the systemd rootfs image for the systemd-mode VM test, the vsock device daemon), then runs fmt, clippy, every test and the reproducibility check.
pub fn run(options: &Options) -> anyhow::Result<()> {
    let sh = Shell::new()?;
    sh.change_dir(crate::workspace_root());
    crate::toolchain::ensure_targets(&sh, &crate::workspace_root(), false)?;
    prepare::apt_packages(&sh)?;
    prepare::arm64_guest(&sh)?;
    prepare::vsock_daemon(&sh)?;
    systemd_rootfs::prepare(&sh)?;
    if options.prepare_only {
        return Ok(());
    }
    if !options.no_lint {
        cmd!(sh, "cargo fmt --all -- --check")
            .run()
            .context("formatting differs: run `cargo fmt --all`")?;
        cmd!(sh, "cargo clippy --workspace --all-targets -- -D warnings")
            .run()
            .context("clippy found problems (see above)")?;
    }
    let args = &options.cargo_test_args;
    cmd!(sh, "cargo test --workspace {args...}")
        .run()
        .context("tests failed (see above)")?;
    if args.is_empty() {
        check_committed_initrd_reproduces(&sh)?;
        // Every parser's fuzz target over its seeds (crash inputs included) and a few seconds.
        crate::fuzz::smoke(&crate::fuzz::Paths {
            workspace: crate::workspace_root(),
        })?;
    }
    Ok(())
}

/// The reproducibility check: the default (minimal) initrd rebuilds from this checkout,
/// offline, into a fresh store, byte-identical to what the committed lock records.
fn check_committed_initrd_reproduces(sh: &Shell) -> anyhow::Result<()> {
    let store = tempfile::tempdir()?;
    let data_dir = store.path();
    let initrd = system::embedded_lock().defaults.initrd.to_string();
    cmd!(
        sh,
        "cargo xtask artifacts --only initrds --initrd {initrd} --offline --locked --data-dir {data_dir}"
    )
    .run()
    .with_context(|| {
        format!(
            "initrd {initrd} does not rebuild to the digests artifacts.lock records; if guest-init \
             changed on purpose, record the new outputs with `cargo xtask artifacts --only initrds \
             --initrd {initrd} --offline` and commit artifacts.lock"
        )
    })?;
    eprintln!("reproducibility: initrd {initrd} rebuilt byte-identical to artifacts.lock");
    Ok(())
}
