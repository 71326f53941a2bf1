//! How a download reports on stderr: a bar (bytes, rate, ETA) on a terminal, plain lines
//! otherwise, so CI logs stay readable.

use std::io::{self, IsTerminal};
use std::time::Instant;

use super::Progress;

/// The reporting of one download.
pub(crate) struct Reporter {
    lines: bool,
    bar_wanted: bool,
    bar: Option<indicatif::ProgressBar>,
    started: Instant,
}

impl Reporter {
    pub fn new(progress: Progress) -> Reporter {
        let bar_wanted = progress == Progress::Auto && io::stderr().is_terminal();
        Reporter {
            lines: progress == Progress::Lines || (progress == Progress::Auto && !bar_wanted),
            bar_wanted,
            bar: None,
            started: Instant::now(),
        }
    }

    pub fn start(&self, label: &str, url: &str) {
        if self.lines {
            eprintln!("fetching {label}: {url}");
        }
    }

    /// The position, after the first answer told how long the file is (if it did).
    pub fn position(&mut self, label: &str, total: Option<u64>, position: u64) {
        if self.bar_wanted && self.bar.is_none() {
            self.bar = Some(bar(label, total));
        }
        if let Some(bar) = &self.bar {
            bar.set_position(position);
        }
    }

    /// A line that must not be overdrawn by the bar (retries, restarts).
    pub fn log(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    pub fn finish(&mut self, label: &str, outcome: Option<(u64, u32)>) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        if let (true, Some((size, requests))) = (self.lines, outcome) {
            let secs = self.started.elapsed().as_secs_f64();
            eprintln!(
                "fetched {label}: {size} bytes in {secs:.1}s ({:.1} MiB/s, {requests} request(s))",
                size as f64 / (1 << 20) as f64 / secs.max(1e-6)
            );
        }
    }
}

fn bar(label: &str, total: Option<u64>) -> indicatif::ProgressBar {
    let bar = match total {
        Some(total) => indicatif::ProgressBar::new(total).with_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        ),
        None => indicatif::ProgressBar::new_spinner().with_style(
            indicatif::ProgressStyle::with_template("{msg} {spinner} {bytes} {bytes_per_sec}")
                .expect("a valid template"),
        ),
    };
    bar.with_message(label.to_owned())
}
