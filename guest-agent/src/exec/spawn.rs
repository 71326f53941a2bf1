//! Starting an exec's process: argv (empty: /bin/sh), user, env over the agent's own (which
//! is the application's), cwd, and either pipes in a new process group or a tty as the
//! controlling terminal of a new session. Either way the process leads its own group, so the
//! whole group can be signalled and killed.

use std::io;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;

use guest_agent_proto::pb::ExecStart;
use guest_protocol::user::{self, Credentials, UserError};
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command};

use super::pty::Pty;

/// 80x24 when a tty exec names no size (an original host never does).
const DEFAULT_SIZE: (u16, u16) = (24, 80);

pub(crate) enum Io {
    Pipes {
        stdin: ChildStdin,
        stdout: ChildStdout,
        stderr: ChildStderr,
    },
    Tty(Arc<Pty>),
}

pub(crate) struct Process {
    pub child: Child,
    pub group: ProcessGroup,
    pub io: Io,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum SpawnError {
    #[error("cannot run {argv0:?}: {source}")]
    Exec { argv0: String, source: io::Error },
    #[error("cannot open a terminal for the tty exec: {0}")]
    Pty(io::Error),
    #[error("{0}")]
    User(#[from] UserError),
    #[error("cwd {cwd:?} is not a directory in the guest: {reason}")]
    Cwd { cwd: String, reason: String },
}

impl SpawnError {
    /// The shell's convention: 127 when the command does not exist, 126 when it cannot run.
    pub(crate) fn exit_code(&self) -> i32 {
        match self {
            SpawnError::Exec { source, .. } if source.kind() == io::ErrorKind::NotFound => 127,
            _ => 126,
        }
    }
}

/// The process group an exec leads. Dropped while armed (the call ended before the process
/// did: a cancelled call, a host that went away) it kills the whole group.
pub(crate) struct ProcessGroup {
    pgid: i32,
    armed: bool,
}

impl ProcessGroup {
    /// The group a just-spawned child leads. Never pgid 0 or less: `kill(0)` would hit the
    /// agent's own group.
    fn led_by(child: &Child) -> ProcessGroup {
        match child.id().and_then(|pid| i32::try_from(pid).ok()) {
            Some(pgid) if pgid > 0 => ProcessGroup { pgid, armed: true },
            _ => ProcessGroup {
                pgid: 0,
                armed: false,
            },
        }
    }

    pub(crate) fn signal(&self, signal: i32) {
        if self.armed {
            // SAFETY: kill has no memory effects; ESRCH (group gone) is fine to ignore.
            unsafe { libc::kill(-self.pgid, signal) };
        }
    }

    pub(crate) fn kill(&self) {
        self.signal(libc::SIGKILL);
    }

    /// The leader was reaped: its pid may be reused, so the group is not ours to signal.
    pub(crate) fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

pub(crate) fn spawn(start: &ExecStart) -> Result<Process, SpawnError> {
    let argv: Vec<String> = if start.command.is_empty() {
        vec!["/bin/sh".to_owned()]
    } else {
        start.command.clone()
    };
    let credentials = match start.user.trim() {
        "" => None,
        spec => Some(resolve_user(spec)?),
    };
    let mut command = Command::new(&argv[0]);
    command.args(&argv[1..]);
    if let Some(credentials) = &credentials
        && !start.env.contains_key("HOME")
    {
        command.env("HOME", &credentials.home);
    }
    command.envs(&start.env);
    let cwd = if start.cwd.is_empty() {
        "/"
    } else {
        &start.cwd
    };
    // Checked here: a failed chdir in the child would read as "command not found".
    let not_a_dir = |reason: String| SpawnError::Cwd {
        cwd: cwd.to_owned(),
        reason,
    };
    match std::fs::metadata(cwd) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(not_a_dir("not a directory".into())),
        Err(err) => return Err(not_a_dir(err.to_string())),
    }
    command.current_dir(cwd);

    let groups: Vec<libc::gid_t> = credentials
        .as_ref()
        .map(|c| c.groups.clone())
        .unwrap_or_default();
    let ids = credentials.as_ref().map(|c| (c.uid, c.gid));
    let exec_error = |source| SpawnError::Exec {
        argv0: argv[0].clone(),
        source,
    };

    if start.tty {
        let size = start
            .window_size
            .as_ref()
            .map(|w| (clamp(w.rows), clamp(w.cols)))
            .unwrap_or(DEFAULT_SIZE);
        let (pty, slave) = Pty::open(size).map_err(SpawnError::Pty)?;
        let clone = |fd: &std::os::fd::OwnedFd| fd.try_clone().map_err(SpawnError::Pty);
        command.stdin(Stdio::from(clone(&slave)?));
        command.stdout(Stdio::from(clone(&slave)?));
        command.stderr(Stdio::from(slave));
        // SAFETY: between fork and exec only async-signal-safe calls, no allocation.
        unsafe {
            command.pre_exec(move || {
                rustix::process::setsid()?;
                rustix::process::ioctl_tiocsctty(std::io::stdin())?;
                become_user(ids, &groups)
            });
        }
        let child = command.spawn().map_err(exec_error)?;
        drop(command); // closes our copies of the slave: EOF on the master once the process exits
        let group = ProcessGroup::led_by(&child);
        Ok(Process {
            child,
            group,
            io: Io::Tty(Arc::new(pty)),
        })
    } else {
        command.stdin(Stdio::piped());
        command.stdout(Stdio::piped());
        command.stderr(Stdio::piped());
        command.process_group(0);
        // SAFETY: between fork and exec only async-signal-safe calls, no allocation.
        unsafe {
            command.pre_exec(move || become_user(ids, &groups));
        }
        let mut child = command.spawn().map_err(exec_error)?;
        let group = ProcessGroup::led_by(&child);
        let io = Io::Pipes {
            stdin: child.stdin.take().expect("stdin is piped"),
            stdout: child.stdout.take().expect("stdout is piped"),
            stderr: child.stderr.take().expect("stderr is piped"),
        };
        Ok(Process { child, group, io })
    }
}

fn clamp(n: u32) -> u16 {
    n.min(u16::MAX as u32) as u16
}

/// The exec's user from the guest's own /etc/passwd and /etc/group (the application's root).
fn resolve_user(spec: &str) -> Result<Credentials, UserError> {
    let (passwd_path, group_path) = (Path::new("/etc/passwd"), Path::new("/etc/group"));
    let passwd = std::fs::read_to_string(passwd_path).unwrap_or_default();
    let group = std::fs::read_to_string(group_path).unwrap_or_default();
    user::resolve(Some(spec), &passwd, &group, (passwd_path, group_path))
}

/// In the child: groups, then gid, then uid (after setuid the others are no longer allowed).
fn become_user(ids: Option<(u32, u32)>, groups: &[libc::gid_t]) -> io::Result<()> {
    let Some((uid, gid)) = ids else {
        return Ok(());
    };
    // SAFETY: plain syscalls on memory we own; async-signal-safe.
    unsafe {
        if libc::setgroups(groups.len(), groups.as_ptr()) != 0
            || libc::setgid(gid) != 0
            || libc::setuid(uid) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
