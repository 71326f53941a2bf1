//! What every benchmark reports with: medians of repeated runs, so one noisy sample on a shared
//! machine does not decide a figure.

use std::time::Duration;

/// A shell in the workspace root, where every benchmark runs its commands.
pub fn workspace_shell() -> anyhow::Result<xshell::Shell> {
    let sh = xshell::Shell::new()?;
    sh.change_dir(xtask::workspace_root());
    Ok(sh)
}

/// The median of `samples` (the upper one for an even count). Panics on no samples.
pub fn median<T: Ord + Copy>(mut samples: Vec<T>) -> T {
    assert!(!samples.is_empty(), "a median needs samples");
    samples.sort();
    samples[samples.len() / 2]
}

/// Runs `f` `rounds` times and returns the median wall time.
pub fn median_time(
    rounds: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Duration> {
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let start = std::time::Instant::now();
        f()?;
        times.push(start.elapsed());
    }
    Ok(median(times))
}

/// The line prefix `cargo xtask bench all` collects figures by.
pub const FIGURE_PREFIX: &str = "BENCH-FIGURE ";

/// What a figure should reach, checked against its ratio or its value.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// ours / baseline (times) at most this.
    TimeRatioAtMost(f64),
    /// baseline / ours (speed) at least this.
    SpeedRatioAtLeast(f64),
    /// An absolute time at most this (figures with no baseline).
    TimeAtMost(Duration),
}

/// One measured figure next to its same-run baseline: printed by a bench as one line that
/// `cargo xtask bench all` gathers into its table.
#[derive(Debug, Clone)]
pub struct Figure {
    /// What was measured, e.g. "no-op artifacts --only initrds".
    pub what: String,
    /// Ours, formatted with its unit.
    pub ours: String,
    /// The baseline's name and value, formatted; empty when there is none.
    pub baseline: String,
    /// ours / baseline for times, baseline / ours for speeds (see `target`); None without one.
    pub ratio: Option<f64>,
    pub target: Option<Target>,
    /// The value an absolute target is checked against.
    pub value: Option<Duration>,
}

impl Figure {
    /// A time against a baseline time: ratio = ours / baseline.
    pub fn time(what: &str, ours: Duration, baseline_name: &str, baseline: Duration) -> Figure {
        Figure {
            what: what.to_owned(),
            ours: format_duration(ours),
            baseline: format!("{baseline_name} {}", format_duration(baseline)),
            ratio: Some(ours.as_secs_f64() / baseline.as_secs_f64()),
            target: None,
            value: Some(ours),
        }
    }

    /// A figure without a baseline (sizes, absolute times), formatted by the caller.
    pub fn plain(what: &str, ours: impl Into<String>) -> Figure {
        Figure {
            what: what.to_owned(),
            ours: ours.into(),
            baseline: String::new(),
            ratio: None,
            target: None,
            value: None,
        }
    }

    pub fn with_target(mut self, target: Target) -> Figure {
        self.target = Some(target);
        self
    }

    /// Whether the target is met; None without a target (or without what it checks).
    pub fn met(&self) -> Option<bool> {
        match self.target? {
            Target::TimeRatioAtMost(max) => self.ratio.map(|r| r <= max),
            Target::SpeedRatioAtLeast(min) => self.ratio.map(|r| r >= min),
            Target::TimeAtMost(max) => self.value.map(|v| v <= max),
        }
    }

    fn target_text(&self) -> String {
        match self.target {
            None => String::new(),
            Some(Target::TimeRatioAtMost(max)) => format!("<= {max}x baseline time"),
            Some(Target::SpeedRatioAtLeast(min)) => format!(">= {min}x baseline speed"),
            Some(Target::TimeAtMost(max)) => format!("<= {}", format_duration(max)),
        }
    }

    /// Prints the figure as one machine-readable line (and nothing else).
    pub fn print(&self) {
        let line = serde_json::json!({
            "what": self.what,
            "ours": self.ours,
            "baseline": self.baseline,
            "ratio": self.ratio,
            "target": self.target_text(),
            "met": self.met(),
        });
        println!("{FIGURE_PREFIX}{line}");
    }
}

/// The marks of guest-init's `timings:` line on a console (`start=0ms mounts=12ms ...`, each
/// the milliseconds since PID 1 started), in order.
pub fn timings_marks(console: &str) -> Option<Vec<(String, u64)>> {
    let line = console.lines().find(|l| l.contains("timings:"))?;
    let (_, fields) = line.split_once("timings:")?;
    fields
        .split_whitespace()
        .map(|field| {
            let (name, ms) = field.split_once('=')?;
            Some((name.to_owned(), ms.strip_suffix("ms")?.parse().ok()?))
        })
        .collect()
}

/// Each phase's own time: its mark minus the one before.
pub fn phase_times(marks: &[(String, u64)]) -> Vec<(String, u64)> {
    marks
        .windows(2)
        .map(|pair| (pair[1].0.clone(), pair[1].1.saturating_sub(pair[0].1)))
        .collect()
}

/// The `exec` mark less the time of the phases named `left_out`.
pub fn exec_without(marks: &[(String, u64)], left_out: &str) -> Option<u64> {
    let total = marks.iter().find(|(name, _)| name == "exec")?.1;
    let skipped: u64 = phase_times(marks)
        .iter()
        .filter(|(name, _)| name == left_out)
        .map(|(_, ms)| ms)
        .sum();
    Some(total.saturating_sub(skipped))
}

/// `12.3 ms`, `1.24 s`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms < 1000.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{:.2} s", ms / 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_checked_against_the_right_figure() {
        let ms = Duration::from_millis;
        let fast = Figure::time("x", ms(30), "base", ms(100));
        assert_eq!(fast.ratio, Some(0.3));
        assert_eq!(
            fast.clone().with_target(Target::TimeRatioAtMost(0.3)).met(),
            Some(true)
        );
        assert_eq!(
            fast.clone().with_target(Target::TimeRatioAtMost(0.2)).met(),
            Some(false)
        );
        assert_eq!(
            fast.clone().with_target(Target::TimeAtMost(ms(50))).met(),
            Some(true)
        );
        assert_eq!(fast.met(), None);
        let speed = Figure {
            ratio: Some(1.2),
            ..Figure::plain("hash", "1.2 GB/s")
        };
        assert_eq!(
            speed.with_target(Target::SpeedRatioAtLeast(1.0)).met(),
            Some(true)
        );
        assert_eq!(format_duration(ms(1500)), "1.50 s");
    }

    #[test]
    fn a_timings_line_gives_phases_and_the_total_without_one_phase() {
        let console = "x\n[guest-init +90] timings: start=0ms mounts=10ms modules=60ms \
                       devices=62ms config=70ms exec=90ms\n";
        let marks = timings_marks(console).unwrap();
        assert_eq!(marks[1], ("mounts".to_owned(), 10));
        assert_eq!(phase_times(&marks)[1], ("modules".to_owned(), 50));
        assert_eq!(exec_without(&marks, "modules"), Some(40));
        let probe = timings_marks("[probe] timings: start=0ms exec=7ms").unwrap();
        assert_eq!(exec_without(&probe, "modules"), Some(7));
        assert_eq!(timings_marks("no line"), None);
        assert_eq!(timings_marks("timings: start=0ms exec=x"), None);
    }
}
