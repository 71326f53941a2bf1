//! Systemd mode: after the root switch, PID 1 becomes the image's init (exec, same PID).

use std::path::Path;

use guest_protocol::Config;

use crate::command;
use crate::error::{ExitReason, Fatal};
use crate::reaper;
use crate::syscalls::{ChildStep, Process, Spawn};

const PHASE: &str = "systemd";

/// Replace guest-init with the image's init. Returns only on failure.
pub fn hand_over(sys: &dyn Process, config: &Config) -> Fatal {
    let mut argv = config.argv();
    if argv.is_empty() {
        argv.push("/sbin/init".to_owned());
    }
    let env = command::environment(&config.env, "/root");
    let path = env
        .get("PATH")
        .map(String::as_str)
        .unwrap_or(command::DEFAULT_PATH);
    let program = match command::resolve(&argv[0], path, Path::new("/"), Path::new("/")) {
        Ok(program) => program,
        Err(err) => return Fatal::new(PHASE, ExitReason::Entrypoint, err),
    };
    crate::info!(PHASE, "handing PID 1 to {}", program.display());
    let init = Spawn {
        program: program.clone(),
        argv,
        env: Some(env),
        workdir: None,
        console: false,
        // Init must not start with our blocked signals.
        in_child: vec![ChildStep::UnblockSignals],
    };
    let err = sys.exec(&init).into_io();
    // A failed exec ran the child steps in PID 1 itself: block the signals again, or the
    // fatal path's waits would miss them.
    if let Err(block) = reaper::block_signals(sys) {
        crate::info!(PHASE, "re-blocking signals after the failed exec: {block}");
    }
    Fatal::new(
        PHASE,
        ExitReason::Spawn,
        format!("exec {}: {err}", program.display()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscalls::fake::{Call, Op, Recorder};

    #[test]
    fn execs_in_place_with_an_empty_signal_mask_and_reports_failure_as_spawn() {
        let sys = Recorder::default();
        sys.fail(Op::Exec, libc::ENOEXEC);
        // /bin/sh stands in for the image's init: it exists on every test machine.
        let fatal = hand_over(&sys, &Config::systemd().with_cmd(["/bin/sh"]));
        assert_eq!(fatal.class, ExitReason::Spawn);
        assert!(
            fatal.source.to_string().starts_with("exec /bin/sh: "),
            "{fatal}"
        );
        let calls = sys.calls();
        let Call::Spawn { spawn, in_place } = &calls[0] else {
            panic!("{calls:?}")
        };
        assert!(*in_place);
        assert_eq!(spawn.in_child, [ChildStep::UnblockSignals]);
        assert!(!spawn.console);
        assert_eq!(spawn.env.as_ref().unwrap()["HOME"], "/root");
        assert!(
            !calls
                .iter()
                .any(|call| matches!(call, Call::InChild(ChildStep::NewSession)))
        );
        // PID 1 ran UnblockSignals before the exec failed: it must block them again.
        assert_eq!(
            calls.last(),
            Some(&Call::BlockSignals(reaper::HANDLED.to_vec()))
        );
    }
}
