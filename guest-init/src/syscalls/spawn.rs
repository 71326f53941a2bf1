//! Starting a program the way `posix_spawn` does: `clone(CLONE_VM | CLONE_VFORK)`. The child
//! borrows PID 1's memory instead of copying its page tables, applies the prepared steps with
//! raw syscalls and execs; PID 1 resumes once the exec succeeded or the child gave up, so an
//! exec failure is still an error of the spawn. Under TCG a fork of PID 1 (the page-table
//! copy, then copy-on-write faults on both sides) cost several times this per start
//! (`cargo xtask bench pid1`).
//!
//! Everything the child touches is built before the clone ([`Prepared`]): in the child
//! nothing allocates, takes a lock or unwinds, and the only memory written is its own stack
//! and the [`Failure`] it leaves for the parent.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use rustix::process::{Gid, Uid};

use super::{ChildStep, ExeFd, Spawn, SpawnError};

/// The child's own stack: it makes a handful of syscalls through thin wrappers.
const CHILD_STACK_BYTES: usize = 64 * 1024;
/// The child's exit status when it could not exec (the shell's "cannot execute").
const CANNOT_EXEC: i32 = 127;

/// What to exec.
enum Program {
    Path(CString),
    /// A descriptor of the binary (a sealed memfd), exec'd with `fexecve`.
    Fd(RawFd),
}

/// A [`ChildStep`] with its ids converted, so the child does not allocate.
enum Step {
    UnblockSignals,
    NewSession,
    ControllingTerminal,
    SetGroups(Vec<Gid>),
    SetGid(Gid),
    SetUid(Uid),
}

impl Step {
    fn from(step: &ChildStep) -> Step {
        match step {
            ChildStep::UnblockSignals => Step::UnblockSignals,
            ChildStep::NewSession => Step::NewSession,
            ChildStep::ControllingTerminal => Step::ControllingTerminal,
            ChildStep::SetGroups(groups) => {
                Step::SetGroups(groups.iter().map(|g| Gid::from_raw(*g)).collect())
            }
            ChildStep::SetGid(gid) => Step::SetGid(Gid::from_raw(*gid)),
            ChildStep::SetUid(uid) => Step::SetUid(Uid::from_raw(*uid)),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Step::UnblockSignals => "sigprocmask",
            Step::NewSession => "setsid",
            Step::ControllingTerminal => "TIOCSCTTY",
            Step::SetGroups(_) => "setgroups",
            Step::SetGid(_) => "setgid",
            Step::SetUid(_) => "setuid",
        }
    }
}

/// Where the child gave up: the step's name and its errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Failure {
    step: &'static str,
    errno: i32,
}

impl Failure {
    /// The exec's own failure reads like any failed exec; the other steps are named.
    fn into_io(self) -> io::Error {
        let os = io::Error::from_raw_os_error(self.errno);
        if self.step == "exec" {
            os
        } else {
            io::Error::new(os.kind(), format!("{}: {os}", self.step))
        }
    }
}

/// A [`Spawn`] made ready for a child that must not allocate: C strings, pointer arrays, the
/// console opened.
pub struct Prepared {
    program: Program,
    /// Owns what `argv` and `envp` point into.
    _strings: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    workdir: Option<CString>,
    /// The console, above the stdio numbers so that `dup2` onto 0, 1 and 2 never meets itself
    /// (a `dup2` of a descriptor onto itself would keep its close-on-exec flag).
    console: Option<OwnedFd>,
    steps: Vec<Step>,
}

impl Prepared {
    pub fn new(spawn: &Spawn) -> Result<Prepared, SpawnError> {
        Prepared::build(
            spawn,
            Program::Path(c_string(spawn.program.as_os_str()).map_err(SpawnError::Start)?),
        )
    }

    /// Exec `exe` instead of `spawn.program`.
    pub fn with_fd(exe: ExeFd, spawn: &Spawn) -> Result<Prepared, SpawnError> {
        Prepared::build(spawn, Program::Fd(exe.0))
    }

    fn build(spawn: &Spawn, program: Program) -> Result<Prepared, SpawnError> {
        let start = SpawnError::Start;
        let argv: Vec<CString> = spawn
            .argv
            .iter()
            .map(|arg| c_string(OsStr::new(arg)))
            .collect::<io::Result<_>>()
            .map_err(start)?;
        let envp: Vec<CString> = match &spawn.env {
            Some(env) => env
                .iter()
                .map(|(key, value)| c_string(OsStr::new(&format!("{key}={value}"))))
                .collect::<io::Result<_>>(),
            None => std::env::vars_os()
                .map(|(key, value)| {
                    let mut pair = key;
                    pair.push("=");
                    pair.push(value);
                    c_string(&pair)
                })
                .collect::<io::Result<_>>(),
        }
        .map_err(start)?;
        let workdir = match &spawn.workdir {
            Some(dir) => Some(c_string(dir.as_os_str()).map_err(start)?),
            None => None,
        };
        let console = if spawn.console {
            Some(open_console().map_err(SpawnError::Console)?)
        } else {
            None
        };
        let (argv_ptrs, envp_ptrs) = (pointers(&argv), pointers(&envp));
        let mut strings = argv;
        strings.extend(envp);
        Ok(Prepared {
            program,
            _strings: strings,
            argv: argv_ptrs,
            envp: envp_ptrs,
            workdir,
            console,
            steps: spawn.in_child.iter().map(Step::from).collect(),
        })
    }

    /// Start the child; returns its pid once it has exec'd.
    pub fn spawn(&self) -> Result<i32, SpawnError> {
        // u128: the stack pointer the child starts with must be 16-byte aligned.
        let mut stack = vec![0u128; CHILD_STACK_BYTES / size_of::<u128>()];
        let top = stack.as_mut_ptr_range().end.cast::<libc::c_void>();
        let mut child = Child {
            prepared: self,
            failure: None,
        };
        // SAFETY: `child_main` only reads `self` and writes `child.failure` (both outlive the
        // call: CLONE_VFORK returns only after the child exec'd or exited) and runs on
        // `stack`, which it owns until then.
        let pid = unsafe {
            libc::clone(
                child_main,
                top,
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                (&raw mut child).cast::<libc::c_void>(),
            )
        };
        if pid < 0 {
            let err = io::Error::last_os_error();
            return Err(SpawnError::Start(io::Error::new(
                err.kind(),
                format!("clone: {err}"),
            )));
        }
        match child.failure {
            None => Ok(pid),
            Some(failure) => {
                // It has exited already: collect it here rather than leave it to the reaper,
                // which would take it for an application that ran.
                let mut status = 0;
                // SAFETY: plain syscall on our own child.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                Err(SpawnError::Start(failure.into_io()))
            }
        }
    }

    /// Apply the steps and exec in this process. Returns only on failure.
    pub fn exec(&self) -> SpawnError {
        SpawnError::Start(self.run().into_io())
    }

    /// stdio, working directory, signals, the steps, exec: std's order, so the steps run in
    /// the final directory with the console as stdin. Returns only on failure.
    /// Raw syscalls only: this runs in the clone child, on PID 1's memory.
    fn run(&self) -> Failure {
        let fail = |step: &'static str, errno: i32| Failure { step, errno };
        let last_errno = || {
            io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO)
        };
        if let Some(console) = &self.console {
            for target in 0..3 {
                // SAFETY: dup2 of a descriptor we own onto a stdio number.
                if unsafe { libc::dup2(console.as_raw_fd(), target) } < 0 {
                    return fail("dup2 of /dev/console", last_errno());
                }
            }
        }
        if let Some(dir) = &self.workdir {
            // SAFETY: NUL-terminated path.
            if unsafe { libc::chdir(dir.as_ptr()) } < 0 {
                return fail("chdir to the working directory", last_errno());
            }
        }
        // std ignores SIGPIPE in PID 1; a program expects the default. This child has its own
        // copy of the handler table (no CLONE_SIGHAND).
        // SAFETY: resetting a disposition to the default runs no code of ours.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
        for step in &self.steps {
            let result = match step {
                Step::UnblockSignals => {
                    // No allocation: sigemptyset on a set on this stack.
                    let empty = super::linux::sigset(&[]);
                    // SAFETY: valid set pointer, null old-set pointer.
                    if unsafe { libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) }
                        < 0
                    {
                        return fail("sigprocmask", last_errno());
                    }
                    Ok(())
                }
                Step::NewSession => rustix::process::setsid().map(drop),
                Step::ControllingTerminal => {
                    // Not every console is a terminal.
                    let _ = rustix::process::ioctl_tiocsctty(rustix::stdio::stdin());
                    Ok(())
                }
                Step::SetGroups(groups) => rustix::thread::set_thread_groups(groups),
                Step::SetGid(gid) => rustix::thread::set_thread_gid(*gid),
                Step::SetUid(uid) => rustix::thread::set_thread_uid(*uid),
            };
            if let Err(errno) = result {
                return fail(step.name(), errno.raw_os_error());
            }
        }
        // SAFETY: argv and envp are NUL-terminated arrays of pointers into `_strings`.
        unsafe {
            match &self.program {
                Program::Path(path) => {
                    libc::execve(path.as_ptr(), self.argv.as_ptr(), self.envp.as_ptr())
                }
                Program::Fd(fd) => libc::fexecve(*fd, self.argv.as_ptr(), self.envp.as_ptr()),
            }
        };
        fail("exec", last_errno())
    }
}

/// What the clone child reads and writes.
struct Child<'a> {
    prepared: &'a Prepared,
    failure: Option<Failure>,
}

extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `Child` that `Prepared::spawn` keeps alive until clone returns.
    let child = unsafe { &mut *arg.cast::<Child>() };
    child.failure = Some(child.prepared.run());
    // SAFETY: ends this child only (it is a process of its own, not a thread of PID 1).
    unsafe { libc::_exit(CANNOT_EXEC) }
}

fn c_string(text: &OsStr) -> io::Result<CString> {
    CString::new(text.as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("NUL byte in {:?}", text.to_string_lossy()),
        )
    })
}

fn pointers(strings: &[CString]) -> Vec<*const libc::c_char> {
    let mut list: Vec<*const libc::c_char> = strings.iter().map(|s| s.as_ptr()).collect();
    list.push(std::ptr::null());
    list
}

/// `/dev/console`, read-write, close-on-exec, at descriptor 3 or above.
fn open_console() -> io::Result<OwnedFd> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")?;
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor we own, or -1.
    let fd = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is fresh and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    fn sh(script: &str) -> Spawn {
        Spawn {
            program: PathBuf::from("/bin/sh"),
            argv: vec!["sh".into(), "-c".into(), script.into()],
            env: Some(BTreeMap::from([("GREETING".into(), "hello".into())])),
            workdir: None,
            console: false,
            in_child: vec![ChildStep::UnblockSignals],
        }
    }

    fn exit_code(pid: i32) -> i32 {
        let mut status = 0;
        // SAFETY: plain syscall on our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        libc::WEXITSTATUS(status)
    }

    #[test]
    fn the_child_gets_argv_env_and_workdir_and_its_exit_code_is_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let mut spawn = sh("printf '%s %s %s' \"$0\" \"$GREETING\" \"$(pwd)\" > out; exit 3");
        spawn.workdir = Some(dir.path().to_owned());
        let pid = Prepared::new(&spawn).unwrap().spawn().unwrap();
        assert_eq!(exit_code(pid), 3);
        let text = std::fs::read_to_string(out).unwrap();
        let real = dir.path().canonicalize().unwrap();
        assert_eq!(text, format!("sh hello {}", real.display()));
    }

    #[test]
    fn a_missing_program_is_the_plain_exec_error() {
        let mut spawn = sh("true");
        spawn.program = PathBuf::from("/nonexistent/program");
        let err = Prepared::new(&spawn)
            .unwrap()
            .spawn()
            .unwrap_err()
            .into_io();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");
    }

    #[test]
    fn a_failing_step_is_named_in_the_error() {
        let mut spawn = sh("true");
        spawn.workdir = Some(PathBuf::from("/nonexistent/workdir"));
        let err = Prepared::new(&spawn)
            .unwrap()
            .spawn()
            .unwrap_err()
            .into_io();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(
            err.to_string()
                .starts_with("chdir to the working directory: "),
            "{err}"
        );
    }

    #[test]
    fn the_child_starts_with_sigpipe_at_its_default_and_an_empty_mask() {
        // The test harness, like PID 1, runs with SIGPIPE ignored; block one more signal here
        // to see the step clear it (the mask is per thread, so only this test's thread).
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid set pointers.
        unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGUSR1);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        }
        let dir = tempfile::tempdir().unwrap();
        let mut spawn = sh("grep -E '^(SigIgn|SigBlk)' /proc/self/status > status");
        spawn.workdir = Some(dir.path().to_owned());
        let pid = Prepared::new(&spawn).unwrap().spawn().unwrap();
        assert_eq!(exit_code(pid), 0);
        // SAFETY: valid set pointers.
        unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
        let status = std::fs::read_to_string(dir.path().join("status")).unwrap();
        for line in status.lines() {
            let (name, mask) = line.split_once(':').unwrap();
            let mask = u64::from_str_radix(mask.trim(), 16).unwrap();
            let pipe = 1u64 << (libc::SIGPIPE - 1);
            let usr1 = 1u64 << (libc::SIGUSR1 - 1);
            match name {
                "SigIgn" => assert_eq!(mask & pipe, 0, "SIGPIPE still ignored: {line}"),
                "SigBlk" => assert_eq!(mask & usr1, 0, "SIGUSR1 still blocked: {line}"),
                _ => unreachable!(),
            }
        }
    }

    #[test]
    fn a_descriptor_is_exec_d_with_the_arguments() {
        let exe = std::fs::File::open("/bin/sh").unwrap();
        let spawn = sh("exit 7");
        let pid = Prepared::with_fd(ExeFd(exe.as_raw_fd()), &spawn)
            .unwrap()
            .spawn()
            .unwrap();
        assert_eq!(exit_code(pid), 7);
    }

    #[test]
    fn nul_bytes_are_refused_before_anything_starts() {
        let mut spawn = sh("true");
        spawn.argv.push("a\0b".into());
        assert!(Prepared::new(&spawn).is_err());
    }
}
