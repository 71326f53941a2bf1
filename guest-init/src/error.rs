//! Failure classes and the exit codes they map to.
//!
//! When the application exits, the console line is `GUEST-INIT-EXIT code=<n> reason=app`
//! with `n` in `0..=255`: its exit status, or `128 + signal` when a signal killed it (shell
//! convention). When guest-init itself fails, the line is `GUEST-INIT-EXIT code=<n>
//! reason=<class>` with a fixed code per class:
//!
//! | code | class         | what failed                                                   |
//! |------|---------------|---------------------------------------------------------------|
//! | 240  | `config`      | config disk missing/unreadable, `config.json` invalid, bad cmdline |
//! | 241  | `mount`       | early mounts (/proc, /sys, /dev, ...), config disk mount       |
//! | 242  | `modules`     | reading the load-order file or loading a kernel module         |
//! | 243  | `device`      | a required block device did not appear before the timeout      |
//! | 244  | `rootfs`      | rootfs/writable disk mount, overlay, switch root               |
//! | 245  | `entrypoint`  | empty command, or the command is not found / not executable    |
//! | 246  | `user`        | `user` not resolvable from the image's /etc/passwd, /etc/group |
//! | 247  | `spawn`       | starting the entrypoint failed (exec, credentials, workdir)    |
//! | 248  | `unsupported` | a configured feature this guest-init does not implement yet    |
//! | 249  | `internal`    | an unexpected syscall failure in PID 1 (`reason=panic`: a panic) |
//!
//! An application can exit with 240..=255 by itself: the `reason=` token tells them apart.

use std::fmt;

/// Why guest-init gave up. Each class has one exit code on the console line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    Config,
    Mount,
    Modules,
    Device,
    Rootfs,
    Entrypoint,
    User,
    Spawn,
    Unsupported,
    Internal,
}

impl FailureClass {
    #[cfg(test)]
    pub const ALL: [FailureClass; 10] = [
        FailureClass::Config,
        FailureClass::Mount,
        FailureClass::Modules,
        FailureClass::Device,
        FailureClass::Rootfs,
        FailureClass::Entrypoint,
        FailureClass::User,
        FailureClass::Spawn,
        FailureClass::Unsupported,
        FailureClass::Internal,
    ];

    pub fn exit_code(self) -> u8 {
        match self {
            FailureClass::Config => 240,
            FailureClass::Mount => 241,
            FailureClass::Modules => 242,
            FailureClass::Device => 243,
            FailureClass::Rootfs => 244,
            FailureClass::Entrypoint => 245,
            FailureClass::User => 246,
            FailureClass::Spawn => 247,
            FailureClass::Unsupported => 248,
            FailureClass::Internal => 249,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FailureClass::Config => "config",
            FailureClass::Mount => "mount",
            FailureClass::Modules => "modules",
            FailureClass::Device => "device",
            FailureClass::Rootfs => "rootfs",
            FailureClass::Entrypoint => "entrypoint",
            FailureClass::User => "user",
            FailureClass::Spawn => "spawn",
            FailureClass::Unsupported => "unsupported",
            FailureClass::Internal => "internal",
        }
    }
}

impl fmt::Display for FailureClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A failure that ends the boot: which phase, which class, and the cause.
#[derive(Debug, thiserror::Error)]
#[error("{phase}: {source}")]
pub struct Fatal {
    pub phase: &'static str,
    pub class: FailureClass,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl Fatal {
    pub fn new(
        phase: &'static str,
        class: FailureClass,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Fatal {
            phase,
            class,
            source: source.into(),
        }
    }
}

/// How the application ended, as the console line reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppExit {
    Exited(i32),
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

/// The one machine-readable line the host looks for.
pub fn exit_line(code: u8, reason: &str) -> String {
    format!("GUEST-INIT-EXIT code={code} reason={reason}")
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
    fn failure_codes_are_distinct_and_fixed() {
        let mut codes: Vec<u8> = FailureClass::ALL.iter().map(|c| c.exit_code()).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), FailureClass::ALL.len());
        assert!(codes.iter().all(|c| (240..=249).contains(c)));
        assert_eq!(FailureClass::Config.exit_code(), 240);
        assert_eq!(FailureClass::Entrypoint.exit_code(), 245);
    }

    #[test]
    fn readme_documents_every_failure_code() {
        let readme = include_str!("../README.md");
        for class in FailureClass::ALL {
            let row = format!("| {}      | `{}`", class.exit_code(), class.name());
            assert!(readme.contains(&row), "README.md lacks the row {row:?}");
        }
    }

    #[test]
    fn exit_line_starts_with_the_code() {
        assert_eq!(exit_line(143, "app"), "GUEST-INIT-EXIT code=143 reason=app");
        assert_eq!(
            exit_line(FailureClass::Config.exit_code(), "config"),
            "GUEST-INIT-EXIT code=240 reason=config"
        );
    }
}
