//! The guest agent (exec, copy, stat for hosts over vsock), started from the initrd's copy.
//!
//! The initrd carries the agent at [`IN_INITRD`] (initrds whose lock recipe says `agent`).
//! After the switch (once the application is started; in systemd mode before the hand-over),
//! and before PID 1 frees the initramfs, its bytes are copied through PID 1's handle on the
//! initramfs root into a sealed memfd ([`load`]); PID 1 forks and execs that descriptor at once
//! ([`start`]) as
//! `guest-agent --supervise`, in a session of its own, with the application's root as its
//! root. Nothing of it appears in the image's filesystem. The supervisor runs the serving agent
//! as its child and restarts it with back-off (guest-agent's `supervise` module); it is a
//! separate process, not a thread of PID 1, so it survives systemd mode's exec, and PID 1 never
//! forks without exec (it has threads).
//!
//! Exec mode reaps the supervisor like any other process and does not wait for it: the power
//! off after the application's exit kills it with everyone else.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::syscalls::{ChildStep, ExeFd, Process, Spawn, Syscalls};

/// Where the agent's binary is in the initrd (the initramfs, never the image).
pub const IN_INITRD: &str = "/.guest-init/guest-agent";

const PHASE: &str = "agent";

/// Before the initramfs is freed: the initrd's agent sealed in memory, or `None` (logged once) when
/// the initrd has none or it cannot be read. Never fatal: the application runs either way.
pub fn load(sys: &dyn Syscalls) -> Option<ExeFd> {
    match sys.seal_executable(Path::new(IN_INITRD)) {
        Ok(exe) => Some(exe),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            crate::info!(
                PHASE,
                "this initrd carries no agent ({IN_INITRD}): none started"
            );
            None
        }
        Err(err) => {
            crate::info!(
                PHASE,
                "cannot copy {IN_INITRD} into memory: {err}; the agent is not started"
            );
            None
        }
    }
}

/// `guest-agent --supervise --log-zero-ms=<ms>` on the console, in a new session (it must not
/// take the console as its controlling terminal: the application does), with an empty signal
/// mask and `env`, in `/`.
pub fn spawn_request(env: BTreeMap<String, String>, log_zero_ms: u128) -> Spawn {
    Spawn {
        program: PathBuf::from(IN_INITRD),
        argv: vec![
            "guest-agent".to_owned(),
            "--supervise".to_owned(),
            format!(
                "{}={log_zero_ms}",
                guest_protocol::log_line::AGENT_LOG_ZERO_FLAG
            ),
        ],
        env: Some(env),
        workdir: Some(PathBuf::from("/")),
        console: true,
        in_child: vec![ChildStep::UnblockSignals, ChildStep::NewSession],
    }
}

/// After the root switch: start the agent's supervisor from `exe`. Returns its pid; a failure
/// is logged and the boot goes on without an agent.
pub fn start(
    sys: &dyn Process,
    exe: ExeFd,
    env: BTreeMap<String, String>,
    log_zero_ms: u128,
) -> Option<i32> {
    match sys.spawn_fd(exe, &spawn_request(env, log_zero_ms)) {
        Ok(pid) => {
            crate::info!(
                PHASE,
                "started its supervisor as pid {pid} (from the initrd's {IN_INITRD}, sealed in memory)"
            );
            Some(pid)
        }
        Err(err) => {
            crate::info!(PHASE, "cannot start the agent: {err}; going on without it");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscalls::fake::{Call, FIRST_CHILD_PID, Op, Recorder, SEALED_FD};

    fn env() -> BTreeMap<String, String> {
        BTreeMap::from([("PATH".to_owned(), "/bin".to_owned())])
    }

    #[test]
    fn an_initrd_with_the_agent_gets_it_sealed_and_started_by_descriptor() {
        let sys = Recorder::with_existing(&[IN_INITRD]);
        let exe = load(&sys).expect("the initrd has the agent");
        assert_eq!(exe, ExeFd(SEALED_FD));
        assert_eq!(start(&sys, exe, env(), 42), Some(FIRST_CHILD_PID));
        let calls = sys.calls();
        assert_eq!(calls[0], Call::SealExecutable(PathBuf::from(IN_INITRD)));
        assert_eq!(calls[1], Call::ExecFd(ExeFd(SEALED_FD)));
        let Call::Spawn { spawn, in_place } = &calls[2] else {
            panic!("expected a spawn: {calls:?}")
        };
        assert!(!in_place, "forked, never exec'd in place of PID 1");
        assert_eq!(
            spawn.argv,
            ["guest-agent", "--supervise", "--log-zero-ms=42"]
        );
        assert_eq!(spawn.env, Some(env()));
        assert_eq!(spawn.workdir.as_deref(), Some(Path::new("/")));
        assert!(spawn.console);
        // A session of its own, but never the console as controlling terminal: that is the
        // application's.
        assert_eq!(
            spawn.in_child,
            [ChildStep::UnblockSignals, ChildStep::NewSession]
        );
    }

    #[test]
    fn an_initrd_without_the_agent_starts_nothing() {
        let sys = Recorder::default();
        assert_eq!(load(&sys), None);
        assert_eq!(
            sys.calls(),
            [Call::SealExecutable(PathBuf::from(IN_INITRD))],
            "no spawn"
        );
    }

    #[test]
    fn a_failed_copy_or_spawn_is_not_fatal() {
        let sys = Recorder::with_existing(&[IN_INITRD]);
        sys.fail(Op::SealExecutable, libc::ENOMEM);
        assert_eq!(load(&sys), None);

        let sys = Recorder::default();
        sys.fail(Op::Fork, libc::EAGAIN);
        assert_eq!(start(&sys, ExeFd(SEALED_FD), env(), 0), None);
        assert!(sys.children().is_empty());
    }
}
