//! Exec mode: the entrypoint runs as a child of PID 1, like a container runtime runs it.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::command::{self, CommandError};
use crate::error::{AppExit, ExitReason, Fatal};
use crate::reaper::{self, Action};
use crate::user::{self, Credentials};
use guest_protocol::Config;

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
pub fn prepare(config: &Config) -> Result<Launch, Fatal> {
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
    let passwd = std::fs::read_to_string(passwd_path).unwrap_or_default();
    let group = std::fs::read_to_string(group_path).unwrap_or_default();
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
    if !workdir.is_dir() {
        std::fs::create_dir_all(&workdir).map_err(|err| {
            Fatal::new(
                PHASE,
                ExitReason::Spawn,
                format!("creating workdir {}: {err}", workdir.display()),
            )
        })?;
    }
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

fn console() -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
}

/// A command with the console as stdio, a new session, and the credentials applied in the
/// child in the order that keeps the permission to apply the next: groups, gid, uid.
pub fn command(launch: &Launch) -> Result<Command, Fatal> {
    let stdio = |_| {
        console().map_err(|err| {
            Fatal::new(
                PHASE,
                ExitReason::Spawn,
                format!("opening /dev/console: {err}"),
            )
        })
    };
    let mut cmd = Command::new(&launch.program);
    cmd.arg0(&launch.argv[0])
        .args(&launch.argv[1..])
        .env_clear()
        .envs(&launch.env)
        .current_dir(&launch.workdir)
        .stdin(Stdio::from(stdio(0)?))
        .stdout(Stdio::from(stdio(1)?))
        .stderr(Stdio::from(stdio(2)?));
    let groups: Vec<rustix::process::Gid> = launch
        .credentials
        .groups
        .iter()
        .map(|g| rustix::process::Gid::from_raw(*g))
        .collect();
    let uid = rustix::process::Uid::from_raw(launch.credentials.uid);
    let gid = rustix::process::Gid::from_raw(launch.credentials.gid);
    // SAFETY: the closure runs between fork and exec and only makes raw syscalls
    // (no allocation, no locks).
    unsafe {
        cmd.pre_exec(move || {
            reaper::unblock_in_child()?;
            rustix::process::setsid()?;
            // The console becomes the session's controlling terminal (job control, Ctrl-C).
            let _ = rustix::process::ioctl_tiocsctty(rustix::stdio::stdin());
            rustix::thread::set_thread_groups(&groups)?;
            rustix::thread::set_thread_gid(gid)?;
            rustix::thread::set_thread_uid(uid)?;
            Ok(())
        });
    }
    Ok(cmd)
}

pub fn spawn(launch: &Launch) -> Result<i32, Fatal> {
    let child = command(launch)?.spawn().map_err(|err| {
        Fatal::new(
            PHASE,
            ExitReason::Spawn,
            format!(
                "starting {} as uid {}: {err}",
                launch.program.display(),
                launch.credentials.uid
            ),
        )
    })?;
    // PID 1 reaps with waitpid(-1); the std handle is dropped without waiting.
    Ok(child.id() as i32)
}

/// Forward signals, reap zombies, run the graceful shutdown; returns when the app is gone.
pub fn supervise(app: i32, grace: Duration) -> AppExit {
    let mut kill_deadline: Option<Instant> = None;
    loop {
        if let Some(exit) = reaper::reap_all(app) {
            return exit;
        }
        let timeout =
            kill_deadline.map(|deadline| deadline.saturating_duration_since(Instant::now()));
        let Some(received) = reaper::wait_signal(timeout) else {
            if kill_deadline.take().is_some() {
                crate::info!("shutdown", "grace period over: SIGKILL to the application");
                reaper::send(app, libc::SIGKILL);
            }
            continue;
        };
        match reaper::action(received) {
            Action::Reap | Action::Ignore => {}
            Action::Forward(signal) => reaper::send(app, signal),
            Action::Shutdown if kill_deadline.is_none() => {
                crate::info!(
                    "shutdown",
                    "shutdown requested: SIGTERM to the application, SIGKILL in {} ms",
                    grace.as_millis()
                );
                reaper::send(app, libc::SIGTERM);
                kill_deadline = Some(Instant::now() + grace);
            }
            Action::Shutdown => {}
        }
    }
}
