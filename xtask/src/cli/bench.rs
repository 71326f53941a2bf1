//! `cargo xtask bench <case>`: benchmarks that report against a baseline measured in the same
//! run. Never part of the tests (tests do not assert on time). Each case is a bench target of
//! its own (`bench/benches/<case>.rs`), run by `cargo bench` in the dev profile, whose
//! dependencies are optimized: the harness they use (`testkit`) stays out of this binary.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use xshell::{Shell, cmd};

/// The prefix of the lines benches print their figures on (`testkit::bench::FIGURE_PREFIX`).
const FIGURE_PREFIX: &str = "BENCH-FIGURE ";

/// Run a benchmark and print its figures (ratios against a baseline from the same run).
#[derive(clap::Args)]
pub struct Bench {
    #[command(subcommand)]
    case: Case,
}

#[derive(clap::Subcommand, Clone, Copy)]
enum Case {
    /// Resolve + verify a 64 MiB blob: full hash (vs `sha256sum`) and with the cache warm.
    Verify,
    /// Apply an Alpine-sized gzip layer (~500 entries, ~8 MB tar) to an in-memory tree vs
    /// gunzip alone and `tar -xzf` to disk; peak memory of the apply.
    Layers,
    /// Download 256 MiB over loopback into the store (streamed sha256, fsync, rename) vs
    /// `curl -o /dev/null` from the same in-process server.
    Download,
    /// Assemble a 10 MB tree with our newc + gzip writer vs `find | sort | cpio | gzip -9`
    /// (time and size), and a no-op `artifacts --only initrds` run of the built binary.
    Initrd,
    /// The sizes of guest-init and the minimal initrd, and each initrd compression's unpack
    /// cost at boot under QEMU.
    Boot,
    /// Boot guest-init 10 times under QEMU, alternating with a probe PID 1 that asks the kernel
    /// for the same work with almost no userspace (the floor): PID 1 start → entrypoint exec
    /// without module loading (medians), and each phase's median for both.
    Pid1,
    /// Boot guest-init 10 times with networking on and 10 times off under QEMU: PID 1 start →
    /// entrypoint exec (medians) and the network phase alone.
    Network,
    /// The guest agent over real virtio-vsock under QEMU: exec round trip of `true` (median of
    /// 50) vs a StatPath call, copy in/out throughput vs the same bytes as an exec stream, and
    /// the agent binary's size.
    Agent,
    /// `dist` vs `tar -czf` of the same store files (time and size), and `artifacts --from`
    /// vs `tar -xzf` + a full verify.
    Dist,
    /// First run on a fresh clone of HEAD: empty target dir and store, `cargo xtask artifacts
    /// --only initrds --offline` to the first initrd; wall and CPU time vs the 2-minute target.
    /// Takes minutes; crate downloads are excluded (fetched before the clock starts).
    FirstRun,
    /// Every case above in turn, then one table of every figure next to its same-run baseline
    /// and its target. `first-run` only with `--first-run`: it takes minutes.
    All {
        /// Also run `first-run`.
        #[arg(long)]
        first_run: bool,
    },
}

impl Case {
    const EACH: [Case; 9] = [
        Case::Verify,
        Case::Layers,
        Case::Download,
        Case::Initrd,
        Case::Boot,
        Case::Pid1,
        Case::Network,
        Case::Agent,
        Case::Dist,
    ];

    /// The cases to run: `all` is every case but `first-run`, which takes minutes and is only
    /// included when asked for.
    fn cases(self) -> Vec<Case> {
        match self {
            Case::All { first_run } => {
                let mut all = Case::EACH.to_vec();
                if first_run {
                    all.push(Case::FirstRun);
                }
                all
            }
            one => vec![one],
        }
    }

    fn bench_target(self) -> &'static str {
        match self {
            Case::Verify => "verify",
            Case::Layers => "layers",
            Case::Download => "download",
            Case::Initrd => "initrd",
            Case::Boot => "boot",
            Case::Pid1 => "pid1",
            Case::Network => "network",
            Case::Agent => "agent",
            Case::Dist => "dist",
            Case::FirstRun => "first_run",
            Case::All { .. } => unreachable!("`all` runs the others"),
        }
    }
}

impl Bench {
    pub fn run(self) -> anyhow::Result<()> {
        let cases = self.case.cases();
        let sh = Shell::new()?;
        sh.change_dir(xtask::workspace_root());
        // Build every bench first, so the runs that follow measure nothing but themselves.
        cmd!(sh, "cargo bench --profile dev -p bench --no-run")
            .run()
            .context("building the benchmarks")?;
        let mut figures = Vec::new();
        let mut failed = Vec::new();
        for case in &cases {
            let name = case.bench_target();
            eprintln!("== bench {name}");
            match run_case(name) {
                Ok(found) => figures.extend(found),
                Err(e) => failed.push(format!("{name}: {e:#}")),
            }
        }
        if cases.len() > 1 {
            println!("{}", table(&figures));
        }
        if !failed.is_empty() {
            bail!("benchmark(s) failed:\n  {}", failed.join("\n  "));
        }
        Ok(())
    }
}

/// Runs one bench target, echoing its output, and returns the figures it printed.
fn run_case(name: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut child = Command::new(cargo)
        .args(["bench", "--profile", "dev", "-p", "bench", "--bench", name])
        .current_dir(xtask::workspace_root())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cargo bench")?;
    let mut figures = Vec::new();
    let stdout = child.stdout.take().expect("piped");
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        match line.strip_prefix(FIGURE_PREFIX) {
            Some(json) => figures.push(
                serde_json::from_str(json)
                    .with_context(|| format!("a malformed figure line from {name}: {json}"))?,
            ),
            None => println!("{line}"),
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("cargo bench --bench {name} exited with {status}");
    }
    Ok(figures)
}

/// A markdown table of every figure: what, ours, baseline, ratio, target, met.
fn table(figures: &[serde_json::Value]) -> String {
    let text = |v: &serde_json::Value, key: &str| v[key].as_str().unwrap_or_default().to_owned();
    let mut out = String::from(
        "| what | ours | same-run baseline | ratio | target | met |\n|---|---|---|---|---|---|\n",
    );
    for figure in figures {
        let ratio = figure["ratio"]
            .as_f64()
            .map(|r| format!("{r:.2}"))
            .unwrap_or_default();
        let met = match figure["met"].as_bool() {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "",
        };
        out += &format!(
            "| {} | {} | {} | {ratio} | {} | {met} |\n",
            text(figure, "what"),
            text(figure, "ours"),
            text(figure, "baseline"),
            text(figure, "target"),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::Case;

    #[test]
    fn all_runs_the_first_run_case_only_when_asked() {
        let names = |case: Case| -> Vec<&str> {
            case.cases().into_iter().map(Case::bench_target).collect()
        };
        let without = names(Case::All { first_run: false });
        assert_eq!(without.len(), Case::EACH.len());
        assert!(!without.contains(&"first_run"), "{without:?}");
        let with = names(Case::All { first_run: true });
        assert_eq!(with.last(), Some(&"first_run"), "{with:?}");
        assert_eq!(names(Case::FirstRun), ["first_run"]);
    }

    #[test]
    fn the_table_shows_every_figure_with_its_verdict() {
        let figures: Vec<serde_json::Value> = [
            r#"{"what":"hash","ours":"50 ms","baseline":"openssl 60 ms","ratio":1.2,"target":">= 1x baseline speed","met":true}"#,
            r#"{"what":"size","ours":"1 MB","baseline":"","ratio":null,"target":"","met":null}"#,
            r#"{"what":"no-op","ours":"80 ms","baseline":"","ratio":null,"target":"<= 50.0 ms","met":false}"#,
        ]
        .iter()
        .map(|s| serde_json::from_str(s).unwrap())
        .collect();
        let table = super::table(&figures);
        let rows: Vec<&str> = table.lines().collect();
        assert_eq!(rows.len(), 5, "{table}");
        assert_eq!(
            rows[2],
            "| hash | 50 ms | openssl 60 ms | 1.20 | >= 1x baseline speed | yes |"
        );
        assert_eq!(rows[3], "| size | 1 MB |  |  |  |  |");
        assert!(rows[4].ends_with("| <= 50.0 ms | **no** |"), "{}", rows[4]);
    }
}
