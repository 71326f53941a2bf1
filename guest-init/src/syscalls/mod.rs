//! The seam between boot phases and the kernel.
//!
//! Three narrow traits, so each phase names what it touches:
//! - [`Syscalls`]: mounts, root switch, module loads, device nodes, hostname, files, sync;
//! - [`Process`]: signal mask and `sigtimedwait`, `kill`, `waitpid`, spawning a child (or
//!   exec in place) with the steps it runs between its start and exec (session, console,
//!   credentials; `spawn.rs` starts it without copying PID 1's memory);
//! - [`Machine`]: reboot/power off, input device events, network interface flags.
//!
//! Both [`Syscalls`] and [`Process`] read time through [`Clock`], so bounded waits are tested
//! on a fake clock. [`Kernel`] is all of them, for `main` and the shutdown path. Production
//! uses [`Linux`]; unit tests use [`fake::Recorder`], which records every call, injects typed
//! failures and simulates children and pending signals, so the phases run without root or VM.

#[cfg(test)]
pub mod fake;
mod linux;
mod spawn;

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use guest_protocol::AppExit;
pub use linux::Linux;
pub use rustix::mount::MountFlags;

/// Monotonic time, for bounded waits.
pub trait Clock {
    fn now(&self) -> Duration;
    fn sleep(&self, duration: Duration);
}

pub trait Syscalls: Clock {
    fn mount(
        &self,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: MountFlags,
        data: &str,
    ) -> io::Result<()>;
    /// `mount --move`: relocate a mounted tree.
    fn mount_move(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// `mount --make-rprivate`: nothing propagates out of the moves that follow.
    fn make_rprivate(&self, target: &Path) -> io::Result<()>;
    /// `mount -o remount` with new flags (e.g. `/` read-only before power off).
    fn remount(&self, target: &Path, flags: MountFlags) -> io::Result<()>;
    fn unmount(&self, target: &Path) -> io::Result<()>;
    fn mkdir_all(&self, path: &Path) -> io::Result<()>;
    fn chdir(&self, path: &Path) -> io::Result<()>;
    fn chroot(&self, path: &Path) -> io::Result<()>;
    /// Load a kernel module from a file.
    fn finit_module(&self, path: &Path) -> io::Result<()>;
    /// Create a character device node with exactly `mode` (permission bits; the umask does
    /// not apply).
    fn mknod_char(&self, path: &Path, mode: u32, major: u32, minor: u32) -> io::Result<()>;
    fn sethostname(&self, name: &str) -> io::Result<()>;
    fn exists(&self, path: &Path) -> bool;
    /// Block until `path` exists (`true`) or `timeout` passes (`false`), woken by the kernel
    /// when an entry appears in its directory rather than by polling. An error (the directory
    /// itself is missing, no inotify) leaves polling to the caller.
    fn wait_for_path(&self, path: &Path, timeout: Duration) -> io::Result<bool>;
    fn read_to_string(&self, path: &Path) -> io::Result<String>;
    /// Up to `len` bytes of `path` from `offset` (a block device's superblock).
    fn read_at(&self, path: &Path, offset: u64, len: usize) -> io::Result<Vec<u8>>;
    /// The target of a symbolic link (`EINVAL`: not a link, `ENOENT`: nothing there).
    fn read_link(&self, path: &Path) -> io::Result<PathBuf>;
    /// Write every dirty buffer to disk.
    fn sync(&self);
    /// Keep a handle on the current root (the initramfs) before the new root covers it, so
    /// that the power off can still reach the mounts left under it (the overlay's layers).
    fn hold_initramfs(&self) -> io::Result<()>;
    /// `fchdir` to the held initramfs root: relative paths then name the mounts under it.
    fn chdir_initramfs(&self) -> io::Result<()>;
    /// switch_root's delete step, once the application runs: remove the files of the
    /// initramfs held by [`Syscalls::hold_initramfs`] (not crossing mount points, keeping
    /// subtrees `mountinfo` shows bind-mounted elsewhere), then return to `/`. Refuses when
    /// the held root is not a ramfs/tmpfs.
    fn free_initramfs(&self, mountinfo: &Path) -> io::Result<Freed>;
    /// Copy the executable at `path` in the initramfs (through its held root handle once the
    /// root is switched) into a sealed, close-on-exec memfd (no write, grow or shrink ever
    /// again) that lives as long as PID 1: it outlives the initramfs, and exec
    /// by descriptor ([`Process::spawn_fd`]) needs no path in anyone's filesystem.
    fn seal_executable(&self, path: &Path) -> io::Result<ExeFd>;
}

/// A sealed in-memory executable ([`Syscalls::seal_executable`]), held open for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExeFd(pub i32);

/// What deleting the initramfs gave back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Freed {
    pub files: u64,
    /// The sizes of the deleted regular files.
    pub bytes: u64,
}

/// A signal taken from the pending set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    pub signal: i32,
    /// Sent by the kernel itself (`si_code == SI_KERNEL`), e.g. Ctrl-Alt-Del's SIGINT.
    pub from_kernel: bool,
}

/// Whether `waitpid` may block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitMode {
    Block,
    NoHang,
}

/// A child that `waitpid` collected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reaped {
    pub pid: i32,
    /// `None` for a status that is neither an exit nor a kill (stopped, continued).
    pub exit: Option<AppExit>,
}

/// What the child does between its start and exec, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChildStep {
    /// An empty signal mask: PID 1's blocked signals would survive exec and make the child
    /// deaf to SIGTERM.
    UnblockSignals,
    /// `setsid`: a session of its own.
    NewSession,
    /// `TIOCSCTTY` on stdin: job control and Ctrl-C. A failure is ignored (not every
    /// console is a terminal).
    ControllingTerminal,
    SetGroups(Vec<u32>),
    SetGid(u32),
    SetUid(u32),
}

/// A program to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spawn {
    pub program: PathBuf,
    /// Passed as is: argv[0] need not be the program's path.
    pub argv: Vec<String>,
    /// `None`: guest-init's own environment.
    pub env: Option<BTreeMap<String, String>>,
    /// `None`: guest-init's working directory.
    pub workdir: Option<PathBuf>,
    /// stdin, stdout and stderr on `/dev/console` (otherwise inherited).
    pub console: bool,
    pub in_child: Vec<ChildStep>,
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("opening /dev/console: {0}")]
    Console(io::Error),
    /// fork, a child step or exec failed.
    #[error(transparent)]
    Start(io::Error),
}

impl SpawnError {
    pub fn into_io(self) -> io::Error {
        match self {
            SpawnError::Console(err) | SpawnError::Start(err) => err,
        }
    }
}

pub trait Process: Clock {
    /// Add `signals` to this thread's blocked set (threads started later inherit it).
    fn block_signals(&self, signals: &[i32]) -> io::Result<()>;
    /// Take one pending signal of `signals`, waiting at most `timeout` (`None`: forever).
    /// `EAGAIN`: the timeout passed; `EINTR`: interrupted.
    fn wait_signal(&self, signals: &[i32], timeout: Option<Duration>) -> io::Result<Received>;
    fn kill(&self, pid: i32, signal: i32) -> io::Result<()>;
    /// `waitpid(-1)`. `Ok(None)`: [`WaitMode::NoHang`] and no child has exited yet;
    /// `ECHILD`: no child left.
    fn wait_child(&self, mode: WaitMode) -> io::Result<Option<Reaped>>;
    /// Fork, run [`Spawn::in_child`], exec. Returns the child's pid.
    fn spawn(&self, spawn: &Spawn) -> Result<i32, SpawnError>;
    /// Run [`Spawn::in_child`] and exec in place of this process. Returns only on failure.
    fn exec(&self, spawn: &Spawn) -> SpawnError;
    /// [`Process::spawn`], but the child execs `exe` by descriptor (`execveat` with
    /// `AT_EMPTY_PATH`); [`Spawn::program`] only names it in errors.
    fn spawn_fd(&self, exe: ExeFd, spawn: &Spawn) -> Result<i32, SpawnError>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Power {
    /// Ctrl-Alt-Del sends SIGINT to PID 1 instead of rebooting at once.
    CtrlAltDelOff,
    PowerOff,
}

pub trait Machine {
    fn reboot(&self, command: Power) -> io::Result<()>;
    /// The event stream of an input device (`/dev/input/eventN`).
    fn open_input(&self, device: &Path) -> io::Result<Box<dyn Read + Send>>;
    /// `SIOCGIFFLAGS` of a network interface.
    fn interface_flags(&self, name: &str) -> io::Result<i16>;
    /// `SIOCSIFFLAGS` of a network interface.
    fn set_interface_flags(&self, name: &str, flags: i16) -> io::Result<()>;
}

/// Everything PID 1 asks of the kernel.
pub trait Kernel: Syscalls + Process + Machine {}

impl<T: Syscalls + Process + Machine + ?Sized> Kernel for T {}
