//! Human-readable log lines: `[guest-init +<ms>] <phase>: <message>`.
//!
//! `<ms>` is monotonic time since PID 1 started. Lines go to the console and to `/dev/kmsg`
//! (at debug priority, so the kernel does not echo them on the console a second time; they
//! are in `dmesg`). Until [`attach_console`] runs (tests, or before /dev exists) lines go to
//! stderr.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

struct Sinks {
    console: Option<File>,
    kmsg: Option<File>,
}

static START: OnceLock<Instant> = OnceLock::new();
static SINKS: Mutex<Sinks> = Mutex::new(Sinks {
    console: None,
    kmsg: None,
});

/// Fix the zero of the timestamps. Call first thing in main.
pub fn start_clock() {
    START.get_or_init(Instant::now);
}

pub fn elapsed_ms() -> u128 {
    START.get_or_init(Instant::now).elapsed().as_millis()
}

/// (Re)open `/dev/console` and `/dev/kmsg`; failures keep the previous sinks.
pub fn attach_console() {
    let mut sinks = SINKS.lock().unwrap_or_else(|poison| poison.into_inner());
    if let Ok(console) = OpenOptions::new().write(true).open("/dev/console") {
        sinks.console = Some(console);
    }
    if let Ok(kmsg) = OpenOptions::new().write(true).open("/dev/kmsg") {
        sinks.kmsg = Some(kmsg);
    }
}

pub use guest_protocol::log_line::format_line;

/// When PID 1 started, in ms on `CLOCK_MONOTONIC` (the clock `Instant` reads on Linux): the
/// zero the agent's lines count from, so they line up with ours.
pub fn start_monotonic_ms() -> u128 {
    // SAFETY: clock_gettime only writes the timespec we own.
    let now = unsafe {
        let mut ts: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    };
    let since_start = START.get_or_init(Instant::now).elapsed();
    now.saturating_sub(since_start).as_millis()
}

pub fn log(phase: &str, message: &str) {
    write_line(&format_line(elapsed_ms(), phase, message));
}

/// Write one complete line to every sink, in a single write each so lines never interleave.
pub fn write_line(line: &str) {
    let mut sinks = SINKS.lock().unwrap_or_else(|poison| poison.into_inner());
    let text = format!("{line}\n");
    match sinks.console.as_mut() {
        Some(console) => {
            let _ = console.write_all(text.as_bytes());
        }
        None => {
            let _ = std::io::stderr().write_all(text.as_bytes());
        }
    }
    if let Some(kmsg) = sinks.kmsg.as_mut() {
        // "<7>": debug priority, not echoed to the console at the default loglevel.
        let _ = kmsg.write_all(format!("<7>{text}").as_bytes());
    }
}

#[macro_export]
macro_rules! info {
    ($phase:expr, $($arg:tt)*) => {
        $crate::logger::log($phase, &format!($($arg)*))
    };
}

/// Milestones from PID 1 start to the entrypoint's exec, printed as one `timings:` line.
#[derive(Debug, Default)]
pub struct Timings {
    marks: Vec<(&'static str, u128)>,
}

impl Timings {
    pub fn mark(&mut self, phase: &'static str) {
        self.marks.push((phase, elapsed_ms()));
    }

    pub fn line(&self) -> String {
        let mut line = String::from("start=0ms");
        for (phase, ms) in &self.marks {
            line.push_str(&format!(" {phase}={ms}ms"));
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_on_the_monotonic_clock_is_in_the_past_and_stable() {
        start_clock();
        let first = start_monotonic_ms();
        std::thread::sleep(Duration::from_millis(3));
        let second = start_monotonic_ms();
        // Both readings compute the same instant; rounding may move it by a millisecond.
        assert!(first.abs_diff(second) <= 1, "{first} vs {second}");
        assert!(first > 0);
    }

    #[test]
    fn timings_line_lists_marks_in_order() {
        let timings = Timings {
            marks: vec![("mounts", 3), ("modules", 40), ("exec", 200)],
        };
        assert_eq!(
            timings.line(),
            "start=0ms mounts=3ms modules=40ms exec=200ms"
        );
    }
}
