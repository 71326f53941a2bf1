//! Systemd mode: after the root switch, PID 1 becomes the image's init (exec, same PID).

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use crate::command;
use crate::error::{ExitReason, Fatal};
use guest_protocol::Config;

const PHASE: &str = "systemd";

/// Replace guest-init with the image's init. Returns only on failure.
pub fn hand_over(config: &Config) -> Fatal {
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
    let mut cmd = Command::new(&program);
    cmd.arg0(&argv[0]).args(&argv[1..]).env_clear().envs(&env);
    // SAFETY: one raw syscall before exec; init must not start with our blocked signals.
    unsafe {
        cmd.pre_exec(crate::reaper::unblock_in_child);
    }
    let err = cmd.exec();
    Fatal::new(
        PHASE,
        ExitReason::Spawn,
        format!("exec {}: {err}", program.display()),
    )
}
