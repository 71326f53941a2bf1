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
