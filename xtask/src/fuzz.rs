//! `cargo xtask fuzz`: the libFuzzer targets in `fuzz/`, one per parser of the workspace.
//!
//! `fuzz/` is a crate of its own outside the workspace (cargo-fuzz needs nightly; the workspace
//! builds with the pinned stable). Each target reads the committed seeds in `fuzz/seeds/TARGET`
//! and grows a working corpus in `fuzz/corpus/TARGET`; a crash lands in `fuzz/artifacts/TARGET`.
//! What is missing is installed here: the nightly toolchain (rustup) and a pinned cargo-fuzz
//! under `target/tools`, so a fresh machine and CI need nothing else.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// The cargo-fuzz release `target/tools/bin/cargo-fuzz` is installed at.
pub const CARGO_FUZZ_VERSION: &str = "0.13.1";

/// The toolchain the targets build with (libFuzzer's instrumentation needs nightly).
pub const TOOLCHAIN: &str = "nightly";

/// The name that selects every target.
pub const ALL: &str = "all";

/// Seconds each target runs in `cargo xtask test`, after its seeds: enough to catch a regression
/// on a committed crash input and a shallow new one, short enough for CI's two cores.
pub const SMOKE_SECONDS: u64 = 5;

/// Seconds one input may take before libFuzzer reports it as a hang.
const INPUT_TIMEOUT_SECONDS: u64 = 10;

/// One fuzz target: its name (a bin in `fuzz/Cargo.toml`) and what it checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub name: &'static str,
    pub checks: &'static str,
}

/// Every target, in the order `all` runs them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "config_json",
        checks: "guest-protocol's config.json parser; what parses, the host writer writes back",
    },
    Target {
        name: "cmdline",
        checks: "guest-protocol's kernel command line parser; kernel_params round trip",
    },
    Target {
        name: "lock",
        checks: "system's artifacts.lock parser; what parses, to_json writes back the same",
    },
    Target {
        name: "oci_reference",
        checks: "base image references and oci: layouts; printed sources parse back the same",
    },
    Target {
        name: "layers",
        checks: "the OCI layer applier (tar, gzip, zstd; hostile headers); trees stay well formed",
    },
    Target {
        name: "newc_roundtrip",
        checks: "the initrd's newc writer: a tree written and parsed back is the same tree",
    },
    Target {
        name: "modules_dep",
        checks: "modules.dep resolution; load orders are complete, dependencies first, inside",
    },
    Target {
        name: "elf_check",
        checks: "the static-ELF check of guest-init binaries",
    },
];

/// The targets `name` selects: one by name, or every one for [`ALL`].
pub fn select(name: &str) -> anyhow::Result<Vec<Target>> {
    if name == ALL {
        return Ok(TARGETS.to_vec());
    }
    match TARGETS.iter().find(|t| t.name == name) {
        Some(target) => Ok(vec![*target]),
        None => bail!(
            "no fuzz target `{name}`; the targets are {} (or `{ALL}`); `cargo xtask fuzz --list` \
             says what each checks",
            TARGETS
                .iter()
                .map(|t| t.name)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Where the fuzz crate and its inputs are.
#[derive(Debug, Clone)]
pub struct Paths {
    pub workspace: PathBuf,
}

impl Paths {
    pub fn fuzz_dir(&self) -> PathBuf {
        self.workspace.join("fuzz")
    }
    /// Committed inputs: real samples and every crash input that was fixed.
    pub fn seeds(&self, target: &Target) -> PathBuf {
        self.fuzz_dir().join("seeds").join(target.name)
    }
    /// What libFuzzer adds while it runs (not committed).
    pub fn corpus(&self, target: &Target) -> PathBuf {
        self.fuzz_dir().join("corpus").join(target.name)
    }
    pub fn artifacts(&self, target: &Target) -> PathBuf {
        self.fuzz_dir().join("artifacts").join(target.name)
    }
    pub fn cargo_fuzz(&self) -> PathBuf {
        self.workspace.join("target/tools/bin/cargo-fuzz")
    }
}

/// What one run did, from libFuzzer's final statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    pub executions: u64,
    pub seconds: u64,
    /// Inputs libFuzzer added to the working corpus in this run.
    pub new_inputs: u64,
    pub peak_rss_mb: u64,
}

/// Installs what is missing: the nightly toolchain and cargo-fuzz [`CARGO_FUZZ_VERSION`].
pub fn prepare(paths: &Paths) -> anyhow::Result<()> {
    let nightly = Command::new("rustup")
        .args(["run", TOOLCHAIN, "rustc", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running rustup (the fuzz targets need it for a nightly toolchain)")?;
    if !nightly.success() {
        eprintln!("fuzz: installing the {TOOLCHAIN} toolchain (libFuzzer needs it)");
        run_checked(
            Command::new("rustup").args([
                "toolchain",
                "install",
                TOOLCHAIN,
                "--profile",
                "minimal",
            ]),
            "installing the nightly toolchain with rustup",
        )?;
    }
    let tool = paths.cargo_fuzz();
    let installed = Command::new(&tool)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    if installed.is_some_and(|v| v.split_whitespace().any(|w| w == CARGO_FUZZ_VERSION)) {
        return Ok(());
    }
    eprintln!(
        "fuzz: installing cargo-fuzz {CARGO_FUZZ_VERSION} into {}",
        paths.workspace.join("target/tools").display()
    );
    let root = paths.workspace.join("target/tools");
    run_checked(
        Command::new("cargo")
            .args([
                "install",
                "--locked",
                "--version",
                CARGO_FUZZ_VERSION,
                "--root",
            ])
            .arg(&root)
            .arg("cargo-fuzz")
            .current_dir(&paths.workspace),
        "installing cargo-fuzz",
    )
}

/// Builds every target (one build; the runs then start at once).
pub fn build(paths: &Paths) -> anyhow::Result<()> {
    run_checked(
        cargo_fuzz(paths).args(["build", "--sanitizer", "none"]),
        "building the fuzz targets",
    )
}

/// Runs `target` over its seeds and working corpus for `seconds`. Progress lines are shown
/// only with `verbose`; a crash, a hang or an out-of-memory is an error naming the input
/// (cargo-fuzz writes it into [`Paths::artifacts`]).
pub fn run(paths: &Paths, target: &Target, seconds: u64, verbose: bool) -> anyhow::Result<Outcome> {
    let corpus = paths.corpus(target);
    let seeds = paths.seeds(target);
    let artifacts = paths.artifacts(target);
    for dir in [&corpus, &artifacts] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if !seeds.is_dir() {
        bail!(
            "{}: the seeds of {} are missing",
            seeds.display(),
            target.name
        );
    }
    let mut command = cargo_fuzz(paths);
    command
        .args(["run", "--sanitizer", "none", target.name])
        .arg(&corpus)
        .arg(&seeds)
        .arg("--")
        .args(libfuzzer_args(seconds));
    let (status, log) = run_logged(command, verbose)
        .with_context(|| format!("running fuzz target {}", target.name))?;
    if !status.success() {
        let crash = log
            .lines()
            .filter_map(|l| l.split("Test unit written to ").nth(1))
            .next_back()
            .map(str::trim);
        bail!(
            "fuzz target {} failed ({status}){}; fix the parser, add a regression test to its \
             crate and copy the input into {}",
            target.name,
            match crash {
                Some(input) => format!(
                    ": the input is {input} (run it alone: cargo xtask fuzz {} --input {input})",
                    target.name
                ),
                None => String::new(),
            },
            seeds.display()
        );
    }
    let outcome = parse_final_stats(&log);
    eprintln!(
        "fuzz: {}: {} executions in {} s, {} new inputs, peak RSS {} MB, no failure",
        target.name, outcome.executions, outcome.seconds, outcome.new_inputs, outcome.peak_rss_mb
    );
    Ok(outcome)
}

/// Runs `target` once on one input file (a crash reproducer).
pub fn run_input(paths: &Paths, target: &Target, input: &Path) -> anyhow::Result<()> {
    run_checked(
        cargo_fuzz(paths)
            .args(["run", "--sanitizer", "none", target.name])
            .arg(input),
        &format!("running {} on {}", target.name, input.display()),
    )
}

/// The `cargo xtask test` step: every target over its seeds, then [`SMOKE_SECONDS`] of fuzzing.
pub fn smoke(paths: &Paths) -> anyhow::Result<()> {
    prepare(paths)?;
    build(paths)?;
    for target in TARGETS {
        run(paths, target, SMOKE_SECONDS, false)?;
    }
    Ok(())
}

fn libfuzzer_args(seconds: u64) -> Vec<String> {
    vec![
        format!("-max_total_time={seconds}"),
        format!("-timeout={INPUT_TIMEOUT_SECONDS}"),
        "-print_final_stats=1".to_owned(),
    ]
}

fn cargo_fuzz(paths: &Paths) -> Command {
    let mut command = Command::new(paths.cargo_fuzz());
    // cargo-fuzz run directly (not through `cargo fuzz`) takes `fuzz` as its first argument.
    command
        .arg("fuzz")
        .current_dir(&paths.workspace)
        // Overrides rust-toolchain.toml's pinned stable for cargo and rustc below cargo-fuzz.
        .env("RUSTUP_TOOLCHAIN", TOOLCHAIN);
    command
}

fn run_checked(command: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("{what}: starting {:?}", command.get_program()))?;
    if !status.success() {
        bail!("{what} failed ({status}; see above)");
    }
    Ok(())
}

/// Runs `command`, passing its stderr through (libFuzzer's progress lines only when `verbose`)
/// and returning it whole.
fn run_logged(
    mut command: Command,
    verbose: bool,
) -> anyhow::Result<(std::process::ExitStatus, String)> {
    let mut child = command
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", command.get_program().to_string_lossy()))?;
    let stderr = child.stderr.take().context("the child's stderr")?;
    let mut log = String::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.context("reading the fuzzer's output")?;
        if verbose || !is_progress(&line) {
            eprintln!("{line}");
        }
        log.push_str(&line);
        log.push('\n');
    }
    Ok((child.wait()?, log))
}

/// libFuzzer's per-input progress (`#1234 NEW cov: …`, `NEW_FUNC`), its recommended dictionary
/// (`"…" # Uses: 3`), the final statistics (summed up in one line by [`run`]) and start-up notes
/// (the sanitizer hooks it misses are absent on purpose: the targets build without a sanitizer).
fn is_progress(line: &str) -> bool {
    line.starts_with('#')
        || line.starts_with('"')
        || line.starts_with("stat::")
        || line.starts_with("Done ")
        || line.starts_with("INFO:")
        || line.trim_start().starts_with("NEW_FUNC")
        || line.starts_with("WARNING: Failed to find function")
}

/// The `stat::` lines `-print_final_stats=1` prints, and the `Done N runs in S second(s)` line.
pub fn parse_final_stats(log: &str) -> Outcome {
    let mut outcome = Outcome::default();
    for line in log.lines() {
        let stat = |key: &str| {
            line.strip_prefix(key)
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let Some(v) = stat("stat::number_of_executed_units:") {
            outcome.executions = v;
        } else if let Some(v) = stat("stat::new_units_added:") {
            outcome.new_inputs = v;
        } else if let Some(v) = stat("stat::peak_rss_mb:") {
            outcome.peak_rss_mb = v;
        } else if let Some(rest) = line.strip_prefix("Done ")
            && let Some((_, time)) = rest.split_once(" runs in ")
        {
            outcome.seconds = time
                .split_whitespace()
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_selects_every_target_and_an_unknown_name_lists_them() {
        assert_eq!(select(ALL).unwrap(), TARGETS);
        assert_eq!(select("lock").unwrap()[0].name, "lock");
        let err = select("locks").unwrap_err().to_string();
        assert!(err.contains("no fuzz target `locks`"), "{err}");
        assert!(err.contains("config_json, cmdline, lock"), "{err}");
    }

    #[test]
    fn every_target_is_a_bin_of_the_fuzz_crate_with_seeds() {
        let paths = Paths {
            workspace: crate::workspace_root(),
        };
        let manifest = std::fs::read_to_string(paths.fuzz_dir().join("Cargo.toml")).unwrap();
        for target in TARGETS {
            assert!(
                manifest.contains(&format!("name = \"{}\"", target.name)),
                "{} is not a bin in fuzz/Cargo.toml",
                target.name
            );
            let seeds = std::fs::read_dir(paths.seeds(target)).unwrap().count();
            assert!(seeds > 0, "{} has no seeds", target.name);
        }
        let bins = manifest.matches("[[bin]]").count();
        assert_eq!(
            bins,
            TARGETS.len(),
            "fuzz/Cargo.toml has bins TARGETS lacks"
        );
    }

    #[test]
    fn progress_is_hidden_and_failures_are_not() {
        for line in [
            "#4096\tpulse  cov: 1 ft: 2 corp: 3/4b exec/s: 5 rss: 6Mb",
            "\tNEW_FUNC[1/2]: 0x55a6ef517bb1",
            "INFO: Seed: 1",
            "\"\\001\\000\" # Uses: 16",
            "stat::peak_rss_mb:              71",
        ] {
            assert!(is_progress(line), "{line}");
        }
        for line in [
            "thread '<unnamed>' panicked at fuzz_targets/lock.rs:17:29:",
            "==17143== ERROR: libFuzzer: deadly signal",
            "artifact_prefix='fuzz/artifacts/lock/'; Test unit written to fuzz/artifacts/lock/x",
        ] {
            assert!(!is_progress(line), "{line}");
        }
    }

    #[test]
    fn final_stats_are_read() {
        let log = "#2 INITED\nDone 123456 runs in 601 second(s)\n\
                   stat::number_of_executed_units: 123456\nstat::average_exec_per_sec:     205\n\
                   stat::new_units_added:          42\nstat::slowest_unit_time_sec:    0\n\
                   stat::peak_rss_mb:              77\n";
        assert_eq!(
            parse_final_stats(log),
            Outcome {
                executions: 123456,
                seconds: 601,
                new_inputs: 42,
                peak_rss_mb: 77
            }
        );
    }
}
