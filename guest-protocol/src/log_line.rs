//! The guest's console log line, `[guest-init +<ms>] <phase>: <message>`, written by guest-init
//! and by the guest agent it starts, so one console reads as one log.
//!
//! `<ms>` is milliseconds since guest-init (PID 1) started, on the monotonic clock. The agent
//! learns that zero from guest-init (`--log-zero-ms`, [`AGENT_LOG_ZERO_FLAG`]), so its lines
//! sort with guest-init's.

/// The agent's command-line flag carrying guest-init's start on `CLOCK_MONOTONIC`, in ms.
pub const AGENT_LOG_ZERO_FLAG: &str = "--log-zero-ms";

/// One log line, without its newline.
pub fn format_line(ms: u128, phase: &str, message: &str) -> String {
    format!("[guest-init +{ms}] {phase}: {message}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_format() {
        assert_eq!(
            format_line(123, "mount", "mounted /proc"),
            "[guest-init +123] mount: mounted /proc"
        );
    }
}
