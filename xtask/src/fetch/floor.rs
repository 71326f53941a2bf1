//! The stall floor: a body that arrives, but too slowly to ever finish, is a stall.
//!
//! The read timeout only limits the gap between two reads, so a server that sends a byte every
//! few seconds would hold a run forever. The floor measures the rate over consecutive windows
//! (`--stall-window`): a window below `--min-rate` bytes per second ends the attempt, which
//! counts as a failure without progress (the bytes it got are kept for the resume).

use std::time::{Duration, Instant};

use super::Options;

/// The rate check of one attempt. Times are passed in, so the logic is testable without
/// waiting.
pub(crate) struct RateFloor {
    min_rate: u64,
    window: Duration,
    started: Instant,
    bytes: u64,
}

/// A window whose rate was below the floor.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Slow {
    /// Bytes per second over the window.
    pub rate: f64,
    pub over: Duration,
    pub min_rate: u64,
}

impl Slow {
    /// `512 B/s over the last 30.0s, below the floor of 1.0 KiB/s`.
    pub fn describe(&self) -> String {
        format!(
            "{} over the last {:.1}s, below the floor of {} (--min-rate, --stall-window)",
            rate(self.rate),
            self.over.as_secs_f64(),
            rate(self.min_rate as f64)
        )
    }
}

impl RateFloor {
    /// A floor starting at `now` (when the response head arrived).
    pub fn new(options: &Options, now: Instant) -> RateFloor {
        RateFloor {
            min_rate: options.min_rate,
            window: options.stall_window,
            started: now,
            bytes: 0,
        }
    }

    /// Counts `n` bytes received at `now`. Once a window is over, its rate is judged: below
    /// the floor it is [`Slow`], otherwise the next window starts.
    pub fn record(&mut self, n: u64, now: Instant) -> Result<(), Slow> {
        self.bytes += n;
        let elapsed = now.saturating_duration_since(self.started);
        if self.min_rate == 0 || self.window.is_zero() || elapsed < self.window {
            return Ok(());
        }
        let rate = self.bytes as f64 / elapsed.as_secs_f64();
        if rate < self.min_rate as f64 {
            return Err(Slow {
                rate,
                over: elapsed,
                min_rate: self.min_rate,
            });
        }
        self.started = now;
        self.bytes = 0;
        Ok(())
    }
}

/// A transfer rate for people: `512 B/s`, `1.5 KiB/s`, `12.0 MiB/s`.
pub(crate) fn rate(bytes_per_sec: f64) -> String {
    const KIB: f64 = 1024.0;
    if bytes_per_sec < KIB {
        format!("{bytes_per_sec:.0} B/s")
    } else if bytes_per_sec < KIB * KIB {
        format!("{:.1} KiB/s", bytes_per_sec / KIB)
    } else {
        format!("{:.1} MiB/s", bytes_per_sec / KIB / KIB)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn floor(min_rate: u64, window_ms: u64, start: Instant) -> RateFloor {
        let options = Options {
            min_rate,
            stall_window: Duration::from_millis(window_ms),
            ..Options::default()
        };
        RateFloor::new(&options, start)
    }

    #[test]
    fn a_window_below_the_floor_is_slow_and_a_fast_one_starts_the_next() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut floor = floor(1024, 1000, t0);
        // Within the window nothing is judged, however slow.
        assert_eq!(floor.record(1, at(10)), Ok(()));
        assert_eq!(floor.record(1, at(999)), Ok(()));
        // 2048 bytes in the first second: fast enough; a new window starts.
        assert_eq!(floor.record(2046, at(1000)), Ok(()));
        // 500 bytes in the next second: slow.
        let slow = floor.record(500, at(2000)).unwrap_err();
        assert_eq!(slow.over, Duration::from_millis(1000));
        assert!((slow.rate - 500.0).abs() < 1e-9, "{slow:?}");
        assert_eq!(
            slow.describe(),
            "500 B/s over the last 1.0s, below the floor of 1.0 KiB/s (--min-rate, --stall-window)"
        );
    }

    #[test]
    fn a_zero_floor_never_stalls() {
        let t0 = Instant::now();
        let mut floor = floor(0, 1000, t0);
        assert_eq!(floor.record(1, t0 + Duration::from_secs(3600)), Ok(()));
    }

    #[test]
    fn rates_read_in_binary_units() {
        assert_eq!(rate(12.0), "12 B/s");
        assert_eq!(rate(1536.0), "1.5 KiB/s");
        assert_eq!(rate(3.0 * 1024.0 * 1024.0), "3.0 MiB/s");
    }
}
