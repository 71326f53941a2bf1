//! Exec mode: the entrypoint runs as a child of PID 1, like a container runtime runs it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use guest_protocol::Config;

use crate::command::{self, CommandError};
use crate::error::{AppExit, ExitReason, Fatal};
use crate::reaper::{self, Action};
use crate::syscalls::{ChildStep, Process, Spawn, SpawnError, Syscalls};
use crate::user::{self, Credentials};

const PHASE: &str = "exec";

/// Everything needed to start the application, resolved inside the new root.
#[derive(Debug)]
pub struct Launch {
    pub program: PathBuf,
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub workdir: PathBuf,
    pub credentials: Credentials,
}

/// Resolve argv, user, environment and workdir. Runs after the root switch.
pub fn prepare(sys: &dyn Syscalls, config: &Config) -> Result<Launch, Fatal> {
    let argv = config.argv();
    if argv.is_empty() {
        return Err(Fatal::new(
            PHASE,
            ExitReason::Entrypoint,
            CommandError::Empty,
        ));
    }
    let passwd_path = Path::new("/etc/passwd");
    let group_path = Path::new("/etc/group");
    let passwd = sys.read_to_string(passwd_path).unwrap_or_default();
    let group = sys.read_to_string(group_path).unwrap_or_default();
    let credentials = user::resolve(
        config.user.as_deref(),
        &passwd,
        &group,
        (passwd_path, group_path),
    )
    .map_err(|err| Fatal::new(PHASE, ExitReason::User, err))?;
    let env = command::environment(&config.env, &credentials.home);
    let workdir = config.workdir.clone().unwrap_or_else(|| PathBuf::from("/"));
    // Container runtimes create a missing workdir rather than fail.
    sys.mkdir_all(&workdir).map_err(|err| {
        Fatal::new(
            PHASE,
            ExitReason::Spawn,
            format!("creating workdir {}: {err}", workdir.display()),
        )
    })?;
    let path = env
        .get("PATH")
        .map(String::as_str)
        .unwrap_or(command::DEFAULT_PATH);
    let program = command::resolve(&argv[0], path, &workdir, Path::new("/"))
        .map_err(|err| Fatal::new(PHASE, ExitReason::Entrypoint, err))?;
    Ok(Launch {
        program,
        argv,
        env,
        workdir,
        credentials,
    })
}

/// What the child does before exec: its own session on the console, an empty signal mask,
/// and the credentials in the order that keeps the permission to apply the next: groups,
/// gid, uid.
pub fn child_steps(credentials: &Credentials) -> Vec<ChildStep> {
    vec![
        ChildStep::UnblockSignals,
        ChildStep::NewSession,
        ChildStep::ControllingTerminal,
        ChildStep::SetGroups(credentials.groups.clone()),
        ChildStep::SetGid(credentials.gid),
        ChildStep::SetUid(credentials.uid),
    ]
}

/// The application: console as stdio, only the resolved environment, in the workdir.
pub fn spawn_request(launch: &Launch) -> Spawn {
    Spawn {
        program: launch.program.clone(),
        argv: launch.argv.clone(),
        env: Some(launch.env.clone()),
        workdir: Some(launch.workdir.clone()),
        console: true,
        in_child: child_steps(&launch.credentials),
    }
}

pub fn spawn(sys: &dyn Process, launch: &Launch) -> Result<i32, Fatal> {
    sys.spawn(&spawn_request(launch)).map_err(|err| {
        let message = match err {
            SpawnError::Console(err) => format!("opening /dev/console: {err}"),
            SpawnError::Start(err) => format!(
                "starting {} as uid {}: {err}",
                launch.program.display(),
                launch.credentials.uid
            ),
        };
        Fatal::new(PHASE, ExitReason::Spawn, message)
    })
}

/// Forward signals, reap zombies, run the graceful shutdown; returns when the app is gone.
pub fn supervise(sys: &dyn Process, app: i32, grace: Duration) -> AppExit {
    let mut kill_deadline: Option<Duration> = None;
    loop {
        if let Some(exit) = reaper::reap_all(sys, app) {
            return exit;
        }
        let timeout = kill_deadline.map(|deadline| deadline.saturating_sub(sys.now()));
        let Some(received) = reaper::wait_signal(sys, timeout) else {
            if kill_deadline.take().is_some() {
                crate::info!("shutdown", "grace period over: SIGKILL to the application");
                reaper::send(sys, app, libc::SIGKILL);
            }
            continue;
        };
        match reaper::action(received) {
            Action::Reap | Action::Ignore => {}
            Action::Forward(signal) => reaper::send(sys, app, signal),
            Action::Shutdown if kill_deadline.is_none() => {
                crate::info!(
                    "shutdown",
                    "shutdown requested: SIGTERM to the application, SIGKILL in {} ms",
                    grace.as_millis()
                );
                reaper::send(sys, app, libc::SIGTERM);
                kill_deadline = Some(sys.now() + grace);
            }
            Action::Shutdown => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscalls::Clock;
    use crate::syscalls::fake::{Call, ChildState, FIRST_CHILD_PID, Op, Recorder};
    use crate::syscalls::{Received, WaitMode};

    const APP: i32 = FIRST_CHILD_PID;

    fn launch() -> Launch {
        Launch {
            program: PathBuf::from("/usr/bin/app"),
            argv: vec!["app".into(), "--serve".into()],
            env: BTreeMap::from([("PATH".into(), command::DEFAULT_PATH.into())]),
            workdir: PathBuf::from("/srv"),
            credentials: Credentials {
                uid: 1000,
                gid: 1001,
                groups: vec![1001, 29],
                home: "/home/app".into(),
            },
        }
    }

    fn in_child(sys: &Recorder) -> Vec<ChildStep> {
        sys.calls()
            .into_iter()
            .filter_map(|call| match call {
                Call::InChild(step) => Some(step),
                _ => None,
            })
            .collect()
    }

    fn kills(sys: &Recorder) -> Vec<(i32, i32)> {
        sys.calls()
            .into_iter()
            .filter_map(|call| match call {
                Call::Kill { pid, signal } => Some((pid, signal)),
                _ => None,
            })
            .collect()
    }

    fn signal(signal: i32) -> Received {
        Received {
            signal,
            from_kernel: false,
        }
    }

    #[test]
    fn child_gets_session_console_then_groups_gid_uid_in_that_order() {
        let sys = Recorder::default();
        assert_eq!(spawn(&sys, &launch()).unwrap(), APP);
        assert_eq!(
            in_child(&sys),
            [
                ChildStep::UnblockSignals,
                ChildStep::NewSession,
                ChildStep::ControllingTerminal,
                ChildStep::SetGroups(vec![1001, 29]),
                ChildStep::SetGid(1001),
                ChildStep::SetUid(1000),
            ]
        );
        let calls = sys.calls();
        let Call::Spawn { spawn, in_place } = &calls[0] else {
            panic!("{calls:?}")
        };
        assert!(!in_place);
        assert_eq!(spawn.argv, ["app", "--serve"]);
        assert_eq!(spawn.workdir.as_deref(), Some(Path::new("/srv")));
        assert!(spawn.console);
        assert_eq!(spawn.env.as_ref().unwrap().len(), 1);
        assert_eq!(
            calls.last(),
            Some(&Call::Exec(PathBuf::from("/usr/bin/app")))
        );
    }

    #[test]
    fn every_spawn_failure_is_the_spawn_class_and_stops_the_sequence() {
        for (op, stops_before) in [
            (Op::Fork, Some(ChildStep::UnblockSignals)),
            (Op::NewSession, Some(ChildStep::ControllingTerminal)),
            (Op::SetGroups, Some(ChildStep::SetGid(1001))),
            (Op::SetGid, Some(ChildStep::SetUid(1000))),
            (Op::SetUid, None),
            (Op::Exec, None),
        ] {
            let sys = Recorder::default();
            sys.fail(op.clone(), libc::EPERM);
            let fatal = spawn(&sys, &launch()).unwrap_err();
            assert_eq!(fatal.class, ExitReason::Spawn, "{op:?}");
            assert_eq!(fatal.phase, "exec");
            assert!(
                fatal
                    .source
                    .to_string()
                    .starts_with("starting /usr/bin/app as uid 1000: Operation not permitted"),
                "{op:?}: {fatal}"
            );
            if let Some(step) = stops_before {
                assert!(!in_child(&sys).contains(&step), "{op:?} ran {step:?}");
            }
            assert!(sys.children().is_empty(), "{op:?} left a child");
        }
    }

    #[test]
    fn console_failure_is_named_and_a_tty_failure_is_tolerated() {
        let sys = Recorder::default();
        sys.fail(Op::OpenConsole, libc::ENOENT);
        let fatal = spawn(&sys, &launch()).unwrap_err();
        assert_eq!(fatal.class, ExitReason::Spawn);
        assert!(
            fatal
                .source
                .to_string()
                .starts_with("opening /dev/console: No such file"),
            "{fatal}"
        );

        let sys = Recorder::default();
        sys.fail(Op::ControllingTerminal, libc::EPERM);
        assert_eq!(spawn(&sys, &launch()).unwrap(), APP);
        assert_eq!(in_child(&sys).last(), Some(&ChildStep::SetUid(1000)));
    }

    #[test]
    fn prepare_failure_classes() {
        let sys = Recorder::default();
        let fatal = prepare(&sys, &Config::default()).unwrap_err();
        assert_eq!(fatal.class, ExitReason::Entrypoint);

        let sys = Recorder::default();
        sys.add_file("/etc/passwd", "root:x:0:0:root:/root:/bin/sh\n");
        let config = Config::exec(["/bin/sh"]).with_user("nobody");
        let fatal = prepare(&sys, &config).unwrap_err();
        assert_eq!(fatal.class, ExitReason::User);
        assert!(fatal.source.to_string().contains("\"nobody\""), "{fatal}");

        let sys = Recorder::default();
        sys.fail(
            Op::MkdirAll {
                path: "/srv".into(),
            },
            libc::EROFS,
        );
        let fatal = prepare(&sys, &Config::exec(["/bin/sh"]).with_workdir("/srv")).unwrap_err();
        assert_eq!(fatal.class, ExitReason::Spawn);
        assert!(
            fatal
                .source
                .to_string()
                .starts_with("creating workdir /srv: "),
            "{fatal}"
        );
    }

    #[test]
    fn prepare_resolves_user_env_and_workdir_in_the_image() {
        let sys = Recorder::default();
        sys.add_file(
            "/etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        );
        sys.add_file("/etc/group", "app:x:1000:\naudio:x:29:app\n");
        // The program is looked up in the real root: /bin/sh exists on every test machine.
        let config = Config::exec(["/bin/sh", "-c"])
            .with_user("app")
            .with_workdir("/work")
            .with_env("LANG", "C");
        let launch = prepare(&sys, &config).unwrap();
        assert_eq!(launch.program, PathBuf::from("/bin/sh"));
        assert_eq!(launch.argv, ["/bin/sh", "-c"]);
        assert_eq!(
            (launch.credentials.uid, launch.credentials.gid),
            (1000, 1000)
        );
        assert_eq!(launch.credentials.groups, [1000, 29]);
        assert_eq!(launch.env["HOME"], "/home/app");
        assert_eq!(launch.env["LANG"], "C");
        assert!(
            sys.calls()
                .contains(&Call::MkdirAll(PathBuf::from("/work")))
        );
    }

    #[test]
    fn exit_status_is_returned_and_every_other_zombie_reaped() {
        let sys = Recorder::default();
        let app = spawn(&sys, &launch()).unwrap();
        sys.add_child(200, ChildState::Exited(AppExit::Exited(0)));
        sys.add_child(201, ChildState::Exited(AppExit::Signaled(9)));
        sys.exit_child(app, AppExit::Exited(3));
        let exit = supervise(&sys, app, Duration::from_secs(10));
        assert_eq!(exit, AppExit::Exited(3));
        assert_eq!(exit.code(), 3);
        assert!(sys.children().is_empty());
        assert!(kills(&sys).is_empty());
    }

    #[test]
    fn supervision_ends_when_the_app_exits_even_with_children_left() {
        let sys = Recorder::default();
        let app = spawn(&sys, &launch()).unwrap();
        sys.add_child(300, ChildState::running());
        sys.exit_child(app, AppExit::Exited(0));
        assert_eq!(supervise(&sys, app, Duration::from_secs(10)).code(), 0);
        assert_eq!(sys.children(), [(300, ChildState::running())]);
        // Only non-blocking waits: a live grandchild never holds PID 1 up.
        assert!(!sys.calls().contains(&Call::WaitChild(WaitMode::Block)));
    }

    #[test]
    fn signals_are_forwarded_to_the_app_and_a_kill_maps_to_128_plus_signal() {
        let sys = Recorder::default();
        sys.spawn_as(ChildState::Running {
            ignoring: vec![libc::SIGUSR1, libc::SIGHUP],
        });
        let app = spawn(&sys, &launch()).unwrap();
        for forwarded in [libc::SIGUSR1, libc::SIGHUP, libc::SIGWINCH, libc::SIGTERM] {
            sys.deliver(signal(forwarded));
        }
        let exit = supervise(&sys, app, Duration::from_secs(10));
        assert_eq!(exit, AppExit::Signaled(libc::SIGTERM));
        assert_eq!(exit.code(), 143);
        assert_eq!(
            kills(&sys),
            [
                (app, libc::SIGUSR1),
                (app, libc::SIGHUP),
                (app, libc::SIGTERM)
            ]
        );
    }

    #[test]
    fn shutdown_request_sends_sigterm_then_sigkill_after_the_grace_period() {
        let sys = Recorder::default();
        sys.spawn_as(ChildState::Running {
            ignoring: vec![libc::SIGTERM],
        });
        let app = spawn(&sys, &launch()).unwrap();
        sys.deliver(signal(libc::SIGPWR));
        // A second request does not restart the grace period.
        sys.deliver(signal(libc::SIGPWR));
        let exit = supervise(&sys, app, Duration::from_millis(2500));
        assert_eq!(exit.code(), 137);
        assert_eq!(kills(&sys), [(app, libc::SIGTERM), (app, libc::SIGKILL)]);
        assert_eq!(sys.now(), Duration::from_millis(2500));
    }

    #[test]
    fn kernel_sigint_is_ctrl_alt_del_a_user_sigint_is_forwarded() {
        let sys = Recorder::default();
        let app = spawn(&sys, &launch()).unwrap();
        sys.deliver(Received {
            signal: libc::SIGINT,
            from_kernel: true,
        });
        assert_eq!(supervise(&sys, app, Duration::from_secs(1)).code(), 143);
        assert_eq!(kills(&sys), [(app, libc::SIGTERM)]);

        let sys = Recorder::default();
        let app = spawn(&sys, &launch()).unwrap();
        sys.deliver(signal(libc::SIGINT));
        assert_eq!(supervise(&sys, app, Duration::from_secs(1)).code(), 130);
        assert_eq!(kills(&sys), [(app, libc::SIGINT)]);
    }

    #[test]
    fn interrupted_waits_are_retried() {
        let sys = Recorder::default();
        let app = spawn(&sys, &launch()).unwrap();
        sys.fail_once(Op::WaitSignal, libc::EINTR);
        sys.deliver(signal(libc::SIGTERM));
        assert_eq!(supervise(&sys, app, Duration::from_secs(1)).code(), 143);
    }

    #[test]
    fn the_agent_dying_is_ignored_and_a_running_agent_does_not_keep_the_vm_up() {
        use crate::syscalls::ExeFd;
        use crate::syscalls::fake::SEALED_FD;
        let sys = Recorder::default();
        let app = spawn(&sys, &launch()).unwrap();
        let agent = crate::agent::start(&sys, ExeFd(SEALED_FD), BTreeMap::new(), 0).unwrap();
        sys.exit_child(agent, AppExit::Exited(1));
        // Reaped, not mistaken for the application; signals still go to the application only.
        sys.deliver(signal(libc::SIGTERM));
        assert_eq!(supervise(&sys, app, Duration::from_secs(1)).code(), 143);
        assert_eq!(kills(&sys), [(app, libc::SIGTERM)]);

        let sys = Recorder::default();
        let app = spawn(&sys, &launch()).unwrap();
        let agent = crate::agent::start(&sys, ExeFd(SEALED_FD), BTreeMap::new(), 0).unwrap();
        sys.exit_child(app, AppExit::Exited(0));
        // The application's exit ends supervision at once; the agent is left to the power off.
        assert_eq!(
            supervise(&sys, app, Duration::from_secs(1)),
            AppExit::Exited(0)
        );
        assert_eq!(sys.children(), [(agent, ChildState::running())]);
        assert!(kills(&sys).is_empty());
    }
}
