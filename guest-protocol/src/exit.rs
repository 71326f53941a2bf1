//! How a boot ends, as the console says it: exactly one line
//! `GUEST-INIT-EXIT code=<n> reason=<reason>`.
//!
//! `reason=app`: the application exited and `n` is its status, or `128 + signal` when a signal
//! killed it (shell convention). Any other reason is a failure of guest-init itself, with one
//! fixed code per reason. An application may exit with 240..=255 by itself: the reason tells
//! the two apart.

use std::fmt;

/// The first token of the exit line, with the space that separates it from `code=`.
pub const EXIT_LINE_PREFIX: &str = "GUEST-INIT-EXIT ";

/// Declares [`ExitReason`] once: variant, `reason=` token and fixed code. `ALL` and every
/// lookup are generated from the same list, so none of them can miss a reason.
macro_rules! exit_reasons {
    ($($(#[$doc:meta])* $variant:ident = $name:literal, $code:expr;)+) => {
        /// Every `reason=` the exit line can carry.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ExitReason {
            $($(#[$doc])* $variant,)+
        }

        impl ExitReason {
            /// Every reason, in code order (`App` first).
            pub const ALL: &'static [ExitReason] = &[$(ExitReason::$variant,)+];

            /// The `reason=` token.
            pub const fn name(self) -> &'static str {
                match self {
                    $(ExitReason::$variant => $name,)+
                }
            }

            /// The code a failure always exits with; `None` for [`ExitReason::App`], whose
            /// code is the application's own.
            pub const fn code(self) -> Option<u8> {
                match self {
                    $(ExitReason::$variant => $code,)+
                }
            }
        }
    };
}

exit_reasons! {
    /// The application exited; the code is its status or `128 + signal`.
    App = "app", None;
    /// Bad `config.json` (syntax, types, values), unreadable config, bad `guest_init.*` value.
    Config = "config", Some(240);
    /// Early mounts, config disk or volume mount failed.
    Mount = "mount", Some(241);
    /// Load-order file unreadable or malformed, or a kernel module failed to load.
    Modules = "modules", Some(242);
    /// The rootfs or config device did not appear within the timeout.
    Device = "device", Some(243);
    /// Image or writable disk mount, overlay, or switch root failed.
    Rootfs = "rootfs", Some(244);
    /// Empty command, or the command is not found / not executable in the image.
    Entrypoint = "entrypoint", Some(245);
    /// `user` not found in the image's /etc/passwd or /etc/group.
    User = "user", Some(246);
    /// Starting the application failed (exec, credentials, workdir, console).
    Spawn = "spawn", Some(247);
    /// A configured feature guest-init does not implement yet.
    Unsupported = "unsupported", Some(248);
    /// An unexpected failure inside guest-init.
    Internal = "internal", Some(249);
    /// A panic inside guest-init (same code as `internal`).
    Panic = "panic", Some(249);
    /// The network interface could not be configured (none found, MTU, address, link up,
    /// default route), or `/etc/resolv.conf`, `/etc/hostname`, `/etc/hosts` not written.
    Network = "network", Some(250);
    /// A driver the config asks for has no hardware (`gpu` without a matching PCI device, or
    /// an initrd without a `gpu` module group), or its device nodes could not be made.
    Driver = "driver", Some(251);
}

impl ExitReason {
    /// Everything but [`ExitReason::App`] is a failure of guest-init.
    pub const fn is_failure(self) -> bool {
        !matches!(self, ExitReason::App)
    }

    /// The reason whose `reason=` token is `name`.
    pub fn from_name(name: &str) -> Option<ExitReason> {
        ExitReason::ALL
            .iter()
            .copied()
            .find(|reason| reason.name() == name)
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How the application ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppExit {
    /// `exit(status)`.
    Exited(i32),
    /// Killed by this signal number.
    Signaled(i32),
}

impl AppExit {
    /// Shell convention: the exit status, or 128 + the signal number.
    pub fn code(self) -> u8 {
        match self {
            AppExit::Exited(status) => (status & 0xff) as u8,
            AppExit::Signaled(signal) => (128 + (signal & 0x7f)) as u8,
        }
    }
}

/// The one machine-readable line of a boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitLine {
    pub code: u8,
    pub reason: ExitReason,
}

impl ExitLine {
    /// The application exited with `code`.
    pub const fn app(code: u8) -> ExitLine {
        ExitLine {
            code,
            reason: ExitReason::App,
        }
    }

    /// guest-init failed for `reason`; `None` for [`ExitReason::App`], which is no failure.
    pub const fn failure(reason: ExitReason) -> Option<ExitLine> {
        match reason.code() {
            Some(code) => Some(ExitLine { code, reason }),
            None => None,
        }
    }

    /// A failure reason always carries its own code; `app` carries any.
    pub fn is_consistent(self) -> bool {
        self.reason.code().is_none_or(|code| code == self.code)
    }
}

impl From<AppExit> for ExitLine {
    fn from(exit: AppExit) -> ExitLine {
        ExitLine::app(exit.code())
    }
}

impl fmt::Display for ExitLine {
    /// `GUEST-INIT-EXIT code=<n> reason=<reason>`, byte for byte what hosts match.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{EXIT_LINE_PREFIX}code={} reason={}",
            self.code, self.reason
        )
    }
}

/// Find the exit line in one console line. The marker may follow other output on the same
/// line (a serial console interleaves), trailing whitespace (`\r`) is ignored. `None` when
/// the line has no marker, is malformed, names an unknown reason, or a failure reason
/// carries a code other than its own.
pub fn parse_exit_line(console_line: &str) -> Option<ExitLine> {
    let (_, rest) = console_line.split_once(EXIT_LINE_PREFIX)?;
    let rest = rest.trim_end();
    let (code, reason) = rest.strip_prefix("code=")?.split_once(" reason=")?;
    // u8::from_str accepts a leading '+': the formatter never writes one.
    if !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let line = ExitLine {
        code: code.parse().ok()?,
        reason: ExitReason::from_name(reason)?,
    };
    line.is_consistent().then_some(line)
}

/// The first exit line in a whole console capture.
pub fn find_exit_line(console: &str) -> Option<ExitLine> {
    console.lines().find_map(parse_exit_line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_exit_codes_follow_shell_convention() {
        assert_eq!(AppExit::Exited(0).code(), 0);
        assert_eq!(AppExit::Exited(3).code(), 3);
        assert_eq!(AppExit::Exited(255).code(), 255);
        assert_eq!(AppExit::Signaled(15).code(), 143);
        assert_eq!(AppExit::Signaled(9).code(), 137);
        assert_eq!(AppExit::Signaled(2).code(), 130);
    }

    #[test]
    fn failure_codes_are_fixed_and_only_internal_and_panic_share_one() {
        let failures: Vec<ExitReason> = ExitReason::ALL
            .iter()
            .copied()
            .filter(|r| r.is_failure())
            .collect();
        assert_eq!(failures.len(), ExitReason::ALL.len() - 1);
        let mut codes: Vec<u8> = failures.iter().filter_map(|r| r.code()).collect();
        assert_eq!(codes.len(), failures.len());
        assert!(codes.iter().all(|c| (240..=255).contains(c)));
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), failures.len() - 1);
        assert_eq!(ExitReason::Config.code(), Some(240));
        assert_eq!(ExitReason::Entrypoint.code(), Some(245));
        assert_eq!(ExitReason::Panic.code(), ExitReason::Internal.code());
        assert_eq!(ExitReason::Network.code(), Some(250));
        // 250 is `network`'s (issue 10 adds both); `driver` follows it.
        assert_eq!(ExitReason::Driver.code(), Some(251));
        assert_eq!(ExitReason::App.code(), None);
    }

    #[test]
    fn names_are_distinct_and_round_trip() {
        for reason in ExitReason::ALL {
            assert_eq!(ExitReason::from_name(reason.name()), Some(*reason));
            assert_eq!(reason.to_string(), reason.name());
        }
        assert_eq!(ExitReason::from_name("App"), None);
        assert_eq!(ExitReason::from_name(""), None);
    }

    #[test]
    fn exit_line_format_is_fixed() {
        assert_eq!(
            ExitLine::app(143).to_string(),
            "GUEST-INIT-EXIT code=143 reason=app"
        );
        assert_eq!(
            ExitLine::failure(ExitReason::Config).unwrap().to_string(),
            "GUEST-INIT-EXIT code=240 reason=config"
        );
        assert_eq!(
            ExitLine::failure(ExitReason::Panic).unwrap().to_string(),
            "GUEST-INIT-EXIT code=249 reason=panic"
        );
        assert_eq!(ExitLine::failure(ExitReason::App), None);
        assert_eq!(ExitLine::from(AppExit::Signaled(9)), ExitLine::app(137));
    }

    #[test]
    fn every_line_parses_back() {
        for reason in ExitReason::ALL {
            let lines: Vec<ExitLine> = match ExitLine::failure(*reason) {
                Some(line) => vec![line],
                None => vec![ExitLine::app(0), ExitLine::app(240), ExitLine::app(255)],
            };
            for line in lines {
                assert_eq!(parse_exit_line(&line.to_string()), Some(line));
            }
        }
    }

    #[test]
    fn parser_tolerates_console_noise_and_rejects_garbage() {
        let app = Some(ExitLine::app(3));
        assert_eq!(parse_exit_line("GUEST-INIT-EXIT code=3 reason=app\r"), app);
        assert_eq!(
            parse_exit_line("[    1.2] x GUEST-INIT-EXIT code=3 reason=app"),
            app
        );
        for bad in [
            "",
            "GUEST-INIT-EXIT",
            "GUEST-INIT-EXIT code=3",
            "GUEST-INIT-EXIT code=256 reason=app",
            "GUEST-INIT-EXIT code=-1 reason=app",
            "GUEST-INIT-EXIT code=+3 reason=app",
            "GUEST-INIT-EXIT code= reason=app",
            "GUEST-INIT-EXIT code=3 reason=ap",
            "GUEST-INIT-EXIT code=3 reason=app extra",
            "GUEST-INIT-EXIT reason=app code=3",
            "GUEST-INIT-EXIT  code=3 reason=app",
            "GUEST-INIT-EXIT code=241 reason=config",
        ] {
            assert_eq!(parse_exit_line(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn finds_the_line_in_a_capture() {
        let console = "[guest-init +12] exec: FATAL (config): bad\n\
                       GUEST-INIT-EXIT code=240 reason=config\n\
                       reboot: Power down\n";
        assert_eq!(
            find_exit_line(console),
            ExitLine::failure(ExitReason::Config)
        );
        assert_eq!(find_exit_line("no line here\n"), None);
    }
}
