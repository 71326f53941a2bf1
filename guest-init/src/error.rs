//! A failure that ends the boot. Its class is a failure [`ExitReason`] of the host/guest
//! contract (`guest_protocol::exit`), which fixes the exit code on the console line:
//!
//! | code | reason        | what failed                                                   |
//! |------|---------------|---------------------------------------------------------------|
//! | 240  | `config`      | config disk missing/unreadable, `config.json` invalid, bad cmdline, volumes that clash |
//! | 241  | `mount`       | early mounts (/proc, /sys, /dev, ...), config disk or volume mount |
//! | 242  | `modules`     | reading the load-order file or loading a kernel module         |
//! | 243  | `device`      | a required block device (rootfs, config, volume) did not appear |
//! | 244  | `rootfs`      | rootfs/writable disk mount, overlay, switch root               |
//! | 245  | `entrypoint`  | empty command, or the command is not found / not executable    |
//! | 246  | `user`        | `user` not resolvable from the image's /etc/passwd, /etc/group |
//! | 247  | `spawn`       | starting the entrypoint failed (exec, credentials, workdir)    |
//! | 248  | `unsupported` | a configured feature this guest-init does not implement yet    |
//! | 249  | `internal`    | an unexpected syscall failure in PID 1 (`reason=panic`: a panic) |
//! | 250  | `network`     | no interface, MTU/address/link/route refused, hostname, name files |
//! | 251  | `driver`      | `gpu` without its module group or device; firmware, GPU nodes  |

pub use guest_protocol::exit::{AppExit, ExitLine, ExitReason};

/// A failure that ends the boot: which phase, which reason, and the cause.
#[derive(Debug, thiserror::Error)]
#[error("{phase}: {source}")]
pub struct Fatal {
    pub phase: &'static str,
    pub class: ExitReason,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl Fatal {
    /// `class` is a failure reason; [`ExitReason::App`] is reported as `internal`.
    pub fn new(
        phase: &'static str,
        class: ExitReason,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Fatal {
            phase,
            class,
            source: source.into(),
        }
    }

    /// The console line for this failure.
    pub fn exit_line(&self) -> ExitLine {
        ExitLine::failure(self.class).unwrap_or(INTERNAL)
    }
}

/// The message of `err` and of each cause it wraps, joined by `: `. A cause whose text the
/// message already holds (an error that prints its source itself) is not repeated.
pub fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    let mut message = err.to_string();
    let mut cause = err.source();
    while let Some(inner) = cause {
        let text = inner.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        cause = inner.source();
    }
    message
}

impl Fatal {
    /// The `<phase>: FATAL (<class>): <cause>` line's cause, each part once.
    pub fn message(&self) -> String {
        describe(self.source.as_ref())
    }
}

const INTERNAL: ExitLine = match ExitLine::failure(ExitReason::Internal) {
    Some(line) => line,
    None => panic!("internal is a failure reason"),
};

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's table row for each code lists every reason with that code.
    fn readme_row(code: Option<u8>) -> String {
        let names: Vec<String> = ExitReason::ALL
            .iter()
            .filter(|reason| reason.code() == code)
            .map(|reason| format!("`{}`", reason.name()))
            .collect();
        let code = code.map_or("0..=255".to_owned(), |code| code.to_string());
        format!("| {code:<8} | {}", names.join(" or "))
    }

    #[test]
    fn readme_documents_every_exit_reason() {
        let readme = include_str!("../README.md");
        for reason in ExitReason::ALL {
            let row = readme_row(reason.code());
            assert!(readme.contains(&row), "README.md lacks the row {row:?}");
        }
    }

    #[test]
    fn a_fatal_message_says_its_cause_once() {
        // Bad JSON: the syntax error is the config error's source and part of its text.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, r#"{ "entrypoint": ["echo", }"#).unwrap();
        let err = crate::config::load(&path).unwrap_err();
        let message = Fatal::new("config", ExitReason::Config, err).message();
        assert_eq!(
            message,
            format!(
                "{} is not valid JSON: expected value at line 1 column 26",
                path.display()
            )
        );

        // A volume whose device does not mount: each type's answer once.
        use crate::syscalls::fake::{Op, Recorder};
        use guest_protocol::config::VolumeMount;
        let sys = Recorder::with_existing(&["/dev/vdd"]);
        sys.fail(Op::mount("/root/data", "ext4"), libc::EINVAL);
        sys.fail(Op::mount("/root/data", "erofs"), libc::ENODEV);
        let err = crate::volumes::mount_all(
            &sys,
            &[VolumeMount::read_only("/dev/vdd", "/data")],
            std::path::Path::new("/root"),
            std::time::Duration::from_secs(1),
        )
        .unwrap_err();
        let message = Fatal::new("volumes", err.class(), err).message();
        assert_eq!(
            message,
            "volume_mounts[0] (/data): cannot mount /dev/vdd on /root/data: ext4: Invalid \
             argument (os error 22); erofs: filesystem type not supported by this kernel (module \
             missing?)"
        );
        assert_eq!(message.matches("Invalid argument").count(), 1);
    }

    #[test]
    fn exit_line_starts_with_the_code() {
        assert_eq!(
            ExitLine::app(143).to_string(),
            "GUEST-INIT-EXIT code=143 reason=app"
        );
        let fatal = Fatal::new("config", ExitReason::Config, "bad");
        assert_eq!(
            fatal.exit_line().to_string(),
            "GUEST-INIT-EXIT code=240 reason=config"
        );
        let misuse = Fatal::new("x", ExitReason::App, "not a failure");
        assert_eq!(
            misuse.exit_line().to_string(),
            "GUEST-INIT-EXIT code=249 reason=internal"
        );
    }
}
