//! Systemd mode: after the root switch, PID 1 becomes the image's init (exec, same PID).

use std::path::Path;

use guest_protocol::Config;

use crate::command;
use crate::error::{ExitReason, Fatal};
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
    Fatal::new(
        PHASE,
        ExitReason::Spawn,
        format!("exec {}: {err}", program.display()),
    )
}
