//! The agent's log lines, on its stderr (the console guest-init gives it) in guest-init's
//! format, `[guest-init +<ms>] agent: <message>`, with `<ms>` counted from guest-init's start
//! (passed as `--log-zero-ms`), so the console reads as one log.

use std::io::Write;
use std::sync::OnceLock;

/// The phase name of every agent line.
pub const PHASE: &str = "agent";

static ZERO_MS: OnceLock<u128> = OnceLock::new();

/// Count from `zero_ms` on `CLOCK_MONOTONIC` (guest-init's start). Without it, from boot.
pub fn set_zero(zero_ms: u128) {
    let _ = ZERO_MS.set(zero_ms);
}

/// Milliseconds on `CLOCK_MONOTONIC`.
pub fn monotonic_ms() -> u128 {
    // SAFETY: clock_gettime only writes the timespec we own.
    let ts = unsafe {
        let mut ts: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
        ts
    };
    ts.tv_sec as u128 * 1000 + ts.tv_nsec as u128 / 1_000_000
}

/// The line for `message` at `now_ms`.
pub fn line(now_ms: u128, message: &str) -> String {
    let zero = ZERO_MS.get().copied().unwrap_or(0);
    guest_protocol::log_line::format_line(now_ms.saturating_sub(zero), PHASE, message)
}

/// Write one line to stderr in a single write, so lines of the supervisor, the serving agent
/// and guest-init never interleave mid-line.
pub fn log(message: &str) {
    let text = format!("{}\n", line(monotonic_ms(), message));
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_count_from_guest_inits_start() {
        set_zero(1000);
        assert_eq!(
            line(1250, "listening on vsock port 2222"),
            "[guest-init +250] agent: listening on vsock port 2222"
        );
        assert!(monotonic_ms() > 0);
    }
}
