//! `cargo xtask artifacts`: make the store satisfy the lock.
//!
//! Stages run in data-flow order ([`kernels`], then [`initrds`], which pull the base image and
//! build guest-init), all under the store's writer lock, each recording what it did in a
//! [`Report`]. The lock file is written once at the end, and only when something in it changed
//! (merged into the file as it is then: [`crate::lock::update`]); after a successful run the
//! store keeps a copy of the lock this run satisfied (`<store>/artifacts.lock`). With `--from`,
//! the stages are replaced by installing a dist's prebuilt blobs ([`prebuilt`]).

pub mod initrds;
pub mod kernels;
mod prebuilt;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use system::lock::Version;
use system::{Arch, Lock};

use crate::fetch::{self, Fetcher, Mirrors};
use crate::initrd::{cpio, guest_init};
use crate::store::StoreWriter;

/// What to make, from which lock, into which store, and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// The lock to satisfy.
    pub lock: PathBuf,
    /// The host data dir; the store is its `system/` directory.
    pub data_dir: PathBuf,
    /// The checkout guest-init is built from.
    pub workspace: PathBuf,
    /// Only these architectures; empty means all.
    pub arches: Vec<Arch>,
    /// Only these kernel versions; empty means every kernel in the lock.
    pub kernels: Vec<Version>,
    /// Only these initrd versions; empty means every initrd in the lock.
    pub initrds: Vec<Version>,
    /// Never touch the network.
    pub offline: bool,
    /// Never write the lock.
    pub locked: bool,
    /// How downloads and registry pulls behave (timeouts, attempts, progress).
    pub transfer: fetch::Options,
    pub mirrors: Mirrors,
    /// Only these stages; empty means all, in data-flow order.
    pub stages: Vec<Stage>,
    /// Kernel modules for recipes that list `modules`.
    pub modules_dir: Option<PathBuf>,
    /// Firmware for recipes whose module groups list `firmware`.
    pub firmware_dir: Option<PathBuf>,
    /// Replaces the selected initrds' module lists.
    pub modules: Option<Vec<String>>,
    /// Sources that replace a base's lock reference, by base name.
    pub base_sources: BTreeMap<Version, String>,
    /// Install prebuilt artifacts from these dist tarballs (or directories of them) instead of
    /// fetching and building; empty means build.
    pub from: Vec<crate::dist::install::DistSource>,
}

/// A stage of `cargo xtask artifacts`, for `--only`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Stage {
    Kernels,
    Initrds,
}

/// What one run did, printed at the end.
#[derive(Debug, Default)]
pub struct Report {
    /// Downloaded or built this run.
    pub fetched: Vec<String>,
    /// Already present and verified.
    pub reused: Vec<String>,
    /// Built this run.
    pub built: Vec<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (label, items) in [
            ("fetched", &self.fetched),
            ("built", &self.built),
            ("reused", &self.reused),
        ] {
            writeln!(f, "{label}: {}", items.len())?;
            for item in items {
                writeln!(f, "  {item}")?;
            }
        }
        Ok(())
    }
}

/// Runs the selected stages and writes the lock when it changed (never under `locked`).
pub fn run(options: &Options) -> anyhow::Result<()> {
    check_selection(&crate::lock::read(&options.lock)?, options)?;
    let store = StoreWriter::open(&options.data_dir)?;
    // Read again once this run has the store: a writer it waited for may have changed the lock.
    let original = crate::lock::read(&options.lock)?;
    check_selection(&original, options)?;
    let mut lock = original.clone();
    let mut report = Report::default();

    let outcome = if options.from.is_empty() {
        stages(&mut lock, &store, options, &mut report)
    } else {
        prebuilt::install_prebuilt(&lock, &store, options, &mut report)
    };
    // Record what finished even when a later stage failed: it is verified and in the store.
    // Merged into the file as it is now, so a concurrent `lock add-kernel` is not undone.
    if lock != original {
        if options.locked {
            bail!("--locked: this run would change {}", options.lock.display());
        }
        crate::lock::update(&options.lock, &original, &lock)?;
    }
    eprint!("{report}");
    outcome?;
    // The store now satisfies this lock (for the selection made): keep a copy beside it.
    crate::lock::write(&store.layout().lock_file(), &lock)
}

/// Names on the command line that the lock does not have, refused before anything runs.
fn check_selection(lock: &Lock, options: &Options) -> anyhow::Result<()> {
    let path = options.lock.display();
    for version in &options.kernels {
        if !lock.kernels.contains_key(version) {
            bail!(
                "--kernel {version}: not in {path}; pin it with \
                 `cargo xtask lock add-kernel {version} --url ARCH=URL`"
            );
        }
    }
    for version in &options.initrds {
        if !lock.initrds.contains_key(version) {
            bail!("--initrd {version}: not in {path}");
        }
    }
    for base in options.base_sources.keys() {
        if !lock.bases.contains_key(base) {
            let known: Vec<&str> = lock.bases.keys().map(|b| b.as_str()).collect();
            bail!(
                "--base-source {base}=…: no base `{base}` in {path} (bases: {})",
                known.join(", ")
            );
        }
    }
    Ok(())
}

/// Runs the selected stages in data-flow order. A failing stage does not stop the next one (an
/// offline machine still gets its initrds when kernels cannot be fetched); every failure is
/// reported at the end.
fn stages(
    lock: &mut Lock,
    store: &StoreWriter,
    options: &Options,
    report: &mut Report,
) -> anyhow::Result<()> {
    let wants = |stage| options.stages.is_empty() || options.stages.contains(&stage);
    let mut failures = Vec::new();
    if wants(Stage::Kernels) {
        let plan = kernels::Plan {
            versions: options.kernels.clone(),
            arches: options.arches.clone(),
            offline: options.offline,
            locked: options.locked,
        };
        let fetcher = || Fetcher::new(options.transfer.clone(), options.mirrors.clone());
        if let Err(e) = kernels::sync_kernels(lock, store, &plan, fetcher, report) {
            failures.push(format!("kernels: {e:#}"));
        }
    }
    if wants(Stage::Initrds)
        && let Err(e) = sync_initrds(lock, store, options, report)
    {
        failures.push(format!("initrds: {e:#}"));
    }
    match failures.len() {
        0 => Ok(()),
        1 => bail!("{}", failures[0]),
        n => bail!("{n} stages failed:\n- {}", failures.join("\n- ")),
    }
}

fn sync_initrds(
    lock: &mut Lock,
    store: &StoreWriter,
    options: &Options,
    report: &mut Report,
) -> anyhow::Result<()> {
    let plan = initrds::Plan {
        versions: options.initrds.clone(),
        arches: if options.arches.is_empty() {
            Arch::ALL.to_vec()
        } else {
            options.arches.clone()
        },
        offline: options.offline,
        locked: options.locked,
        modules_dir: options.modules_dir.clone(),
        firmware_dir: options.firmware_dir.clone(),
        modules: options.modules.clone(),
        mtime: cpio::mtime_from_env()?,
        base_sources: options.base_sources.clone(),
        transfer: options.transfer.clone(),
    };
    let build_options = guest_init::BuildOptions {
        locked: options.locked,
        offline: options.offline,
        target_dir: None,
    };
    let sh = xshell::Shell::new().context("starting a shell for cargo")?;
    // The first arch asked for builds every arch of the plan: one cargo run for all targets.
    let mut built = BTreeMap::new();
    let mut build = |arch| {
        if built.is_empty() {
            built = guest_init::build_all(&sh, &options.workspace, &plan.arches, &build_options)?;
        }
        built
            .get(&arch)
            .cloned()
            .with_context(|| format!("guest-init and the agent for {arch} were not built"))
    };
    initrds::sync_initrds(lock, store, &plan, &mut build, report)
}
