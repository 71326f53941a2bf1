//! A recording double of every seam trait.
//!
//! Every call is appended to [`Recorder::calls`]. A failure is injected as a typed [`Op`]
//! paired with an errno ([`Recorder::fail`], [`Recorder::fail_once`]). Paths in `existing`
//! exist; `sleep` advances a fake clock. Processes are simulated: children spawned or added
//! with a [`ChildState`], `kill` changes their state and queues SIGCHLD for PID 1, signals sent
//! to PID 1 are queued for `wait_signal`. A wait that would block forever panics instead of
//! hanging the test.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Cursor, Read};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use super::*;

/// PID 1, guest-init itself.
pub const INIT_PID: i32 = 1;
/// The first pid the fake hands out.
pub const FIRST_CHILD_PID: i32 = 100;
/// The descriptor [`Syscalls::seal_executable`] hands out.
pub const SEALED_FD: i32 = 7;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Mount {
        source: String,
        target: PathBuf,
        fstype: String,
        flags: MountFlags,
        data: String,
    },
    MountMove {
        from: PathBuf,
        to: PathBuf,
    },
    MakeRprivate(PathBuf),
    Remount {
        target: PathBuf,
        flags: MountFlags,
    },
    Unmount(PathBuf),
    MkdirAll(PathBuf),
    Chdir(PathBuf),
    Chroot(PathBuf),
    FinitModule(PathBuf),
    MknodChar {
        path: PathBuf,
        mode: u32,
        major: u32,
        minor: u32,
    },
    Sethostname(String),
    ReadFile(PathBuf),
    Sync,
    HoldInitramfs,
    ChdirInitramfs,
    FreeInitramfs(PathBuf),
    BlockSignals(Vec<i32>),
    WaitSignal(Option<Duration>),
    Kill {
        pid: i32,
        signal: i32,
    },
    WaitChild(WaitMode),
    /// Fork (or, with `in_place`, the start of an exec without fork).
    Spawn {
        spawn: Spawn,
        in_place: bool,
    },
    /// A step the child ran between fork and exec.
    InChild(ChildStep),
    /// The child execs a sealed executable by descriptor ([`Process::spawn_fd`]).
    ExecFd(ExeFd),
    SealExecutable(PathBuf),
    Exec(PathBuf),
    Reboot(Power),
    OpenInput(PathBuf),
    InterfaceFlags(String),
    SetInterfaceFlags(String, i16),
}

/// Which call fails: the typed key of a [`Call`], without the arguments that do not select.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Mount {
        target: PathBuf,
        fstype: String,
    },
    MountMove {
        from: PathBuf,
    },
    MakeRprivate,
    Remount {
        target: PathBuf,
    },
    Unmount {
        target: PathBuf,
    },
    MkdirAll {
        path: PathBuf,
    },
    Chdir {
        path: PathBuf,
    },
    Chroot,
    FinitModule {
        path: PathBuf,
    },
    MknodChar {
        path: PathBuf,
    },
    Sethostname,
    ReadFile {
        path: PathBuf,
    },
    HoldInitramfs,
    ChdirInitramfs,
    FreeInitramfs,
    SealExecutable,
    /// The directory watch of `wait_for_path` (no call is recorded: waits are not steps).
    WatchDir,
    BlockSignals,
    WaitSignal,
    Kill {
        pid: i32,
    },
    WaitChild,
    OpenConsole,
    Fork,
    UnblockSignals,
    NewSession,
    ControllingTerminal,
    SetGroups,
    SetGid,
    SetUid,
    Exec,
    Reboot(Power),
    OpenInput {
        device: PathBuf,
    },
    InterfaceFlags,
    SetInterfaceFlags,
}

impl Op {
    pub fn mount(target: &str, fstype: &str) -> Op {
        Op::Mount {
            target: target.into(),
            fstype: fstype.into(),
        }
    }

    fn of_step(step: &ChildStep) -> Op {
        match step {
            ChildStep::UnblockSignals => Op::UnblockSignals,
            ChildStep::NewSession => Op::NewSession,
            ChildStep::ControllingTerminal => Op::ControllingTerminal,
            ChildStep::SetGroups(_) => Op::SetGroups,
            ChildStep::SetGid(_) => Op::SetGid,
            ChildStep::SetUid(_) => Op::SetUid,
        }
    }
}

/// A simulated child of PID 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChildState {
    /// Dies of any signal but those it ignores (SIGKILL cannot be ignored).
    Running { ignoring: Vec<i32> },
    /// Never dies, not even of SIGKILL (uninterruptible sleep).
    Stuck,
    /// A zombie until reaped.
    Exited(AppExit),
}

impl ChildState {
    pub fn running() -> ChildState {
        ChildState::Running {
            ignoring: Vec::new(),
        }
    }
}

struct Failure {
    op: Op,
    errno: i32,
    once: bool,
}

#[derive(Default)]
struct State {
    calls: Vec<Call>,
    existing: HashSet<PathBuf>,
    appears_at: Vec<(PathBuf, Duration)>,
    failures: Vec<Failure>,
    clock: Duration,
    files: HashMap<PathBuf, String>,
    links: HashMap<PathBuf, PathBuf>,
    inputs: HashMap<PathBuf, Vec<u8>>,
    /// Contents of block devices, for `read_at`.
    devices: HashMap<PathBuf, Vec<u8>>,
    interfaces: HashMap<String, i16>,
    /// Pid and state, in creation order.
    children: Vec<(i32, ChildState)>,
    next_pid: i32,
    /// Signals pending for PID 1, oldest first.
    pending: VecDeque<Received>,
    /// State of the next spawned child.
    spawned: Option<ChildState>,
}

/// Thread-safe, so the power button watcher threads can share it.
#[derive(Default)]
pub struct Recorder {
    state: Mutex<State>,
}

impl Recorder {
    pub fn with_existing(paths: &[&str]) -> Self {
        let recorder = Recorder::default();
        for path in paths {
            recorder.state().existing.insert(PathBuf::from(path));
        }
        recorder
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Every call matching `op` fails with `errno`.
    pub fn fail(&self, op: Op, errno: i32) {
        self.state().failures.push(Failure {
            op,
            errno,
            once: false,
        });
    }

    /// The next call matching `op` fails with `errno`.
    pub fn fail_once(&self, op: Op, errno: i32) {
        self.state().failures.push(Failure {
            op,
            errno,
            once: true,
        });
    }

    /// `path` starts to exist when the fake clock reaches `at`.
    pub fn appear_at(&self, path: &str, at: Duration) {
        self.state().appears_at.push((PathBuf::from(path), at));
    }

    /// The bytes `read_at` finds on a device (no call is recorded: reads are not steps).
    pub fn add_device_bytes(&self, path: &str, bytes: Vec<u8>) {
        self.state().devices.insert(PathBuf::from(path), bytes);
    }

    pub fn add_file(&self, path: &str, text: &str) {
        self.state().files.insert(PathBuf::from(path), text.into());
    }

    /// A symbolic link at `path` pointing to `target`.
    pub fn add_link(&self, path: &str, target: &str) {
        self.state().links.insert(path.into(), target.into());
    }

    /// Bytes an input device yields, then end of file. Its node must exist too
    /// ([`Recorder::with_existing`], [`Recorder::appear_at`]).
    pub fn add_input(&self, device: &str, events: Vec<u8>) {
        self.state().inputs.insert(PathBuf::from(device), events);
    }

    pub fn add_interface(&self, name: &str, flags: i16) {
        self.state().interfaces.insert(name.into(), flags);
    }

    pub fn interface(&self, name: &str) -> Option<i16> {
        self.state().interfaces.get(name).copied()
    }

    /// A child that exists before the test starts (an orphan PID 1 inherited, say).
    pub fn add_child(&self, pid: i32, state: ChildState) {
        let mut s = self.state();
        s.children.push((pid, state));
    }

    /// How the next spawned child behaves (default: running, dies of any signal).
    pub fn spawn_as(&self, state: ChildState) {
        self.state().spawned = Some(state);
    }

    /// `pid` exits on its own; PID 1 gets SIGCHLD.
    pub fn exit_child(&self, pid: i32, exit: AppExit) {
        let mut s = self.state();
        let child = s.children.iter_mut().find(|(p, _)| *p == pid);
        child.expect("no such child").1 = ChildState::Exited(exit);
        s.pending.push_back(user(libc::SIGCHLD));
    }

    /// A signal arrives for PID 1.
    pub fn deliver(&self, received: Received) {
        self.state().pending.push_back(received);
    }

    /// Children not reaped yet.
    pub fn children(&self) -> Vec<(i32, ChildState)> {
        self.state().children.clone()
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state().calls.clone()
    }

    /// The calls `keep` selects, in order.
    pub fn calls_where(&self, keep: impl Fn(&Call) -> bool) -> Vec<Call> {
        self.calls().into_iter().filter(|call| keep(call)).collect()
    }

    pub fn mounts(&self) -> Vec<(String, String, String, MountFlags, String)> {
        self.calls()
            .into_iter()
            .filter_map(|call| match call {
                Call::Mount {
                    source,
                    target,
                    fstype,
                    flags,
                    data,
                } => Some((source, target.display().to_string(), fstype, flags, data)),
                _ => None,
            })
            .collect()
    }

    /// Record `call`, then fail it if an injected failure matches `op`.
    fn call(&self, call: Call, op: Op) -> io::Result<()> {
        let mut s = self.state();
        s.calls.push(call);
        fail_if_injected(&mut s, &op)
    }
}

fn fail_if_injected(s: &mut State, op: &Op) -> io::Result<()> {
    let Some(index) = s.failures.iter().position(|f| f.op == *op) else {
        return Ok(());
    };
    let errno = s.failures[index].errno;
    if s.failures[index].once {
        s.failures.remove(index);
    }
    Err(io::Error::from_raw_os_error(errno))
}

fn user(signal: i32) -> Received {
    Received {
        signal,
        from_kernel: false,
    }
}

impl State {
    /// Deliver `signal` to one child; `true` when it died of it.
    fn signal_child(&mut self, index: usize, signal: i32) -> bool {
        let dies = match &self.children[index].1 {
            ChildState::Running { ignoring } => {
                signal == libc::SIGKILL || !ignoring.contains(&signal)
            }
            ChildState::Stuck | ChildState::Exited(_) => false,
        };
        if dies {
            self.children[index].1 = ChildState::Exited(AppExit::Signaled(signal));
            self.pending.push_back(user(libc::SIGCHLD));
        }
        dies
    }
}

impl Clock for Recorder {
    fn now(&self) -> Duration {
        self.state().clock
    }

    fn sleep(&self, duration: Duration) {
        self.state().clock += duration;
    }
}

impl Syscalls for Recorder {
    fn mount(
        &self,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: MountFlags,
        data: &str,
    ) -> io::Result<()> {
        let call = Call::Mount {
            source: source.to_owned(),
            target: target.to_owned(),
            fstype: fstype.to_owned(),
            flags,
            data: data.to_owned(),
        };
        self.call(
            call,
            Op::Mount {
                target: target.to_owned(),
                fstype: fstype.to_owned(),
            },
        )
    }

    fn mount_move(&self, from: &Path, to: &Path) -> io::Result<()> {
        let call = Call::MountMove {
            from: from.to_owned(),
            to: to.to_owned(),
        };
        self.call(
            call,
            Op::MountMove {
                from: from.to_owned(),
            },
        )
    }

    fn make_rprivate(&self, target: &Path) -> io::Result<()> {
        self.call(Call::MakeRprivate(target.to_owned()), Op::MakeRprivate)
    }

    fn remount(&self, target: &Path, flags: MountFlags) -> io::Result<()> {
        let call = Call::Remount {
            target: target.to_owned(),
            flags,
        };
        let op = Op::Remount {
            target: target.to_owned(),
        };
        self.call(call, op)
    }

    fn unmount(&self, target: &Path) -> io::Result<()> {
        let op = Op::Unmount {
            target: target.to_owned(),
        };
        self.call(Call::Unmount(target.to_owned()), op)
    }

    fn mkdir_all(&self, path: &Path) -> io::Result<()> {
        let op = Op::MkdirAll {
            path: path.to_owned(),
        };
        self.call(Call::MkdirAll(path.to_owned()), op)?;
        self.state().existing.insert(path.to_owned());
        Ok(())
    }

    fn chdir(&self, path: &Path) -> io::Result<()> {
        let op = Op::Chdir {
            path: path.to_owned(),
        };
        self.call(Call::Chdir(path.to_owned()), op)
    }

    fn chroot(&self, path: &Path) -> io::Result<()> {
        self.call(Call::Chroot(path.to_owned()), Op::Chroot)
    }

    fn finit_module(&self, path: &Path) -> io::Result<()> {
        let op = Op::FinitModule {
            path: path.to_owned(),
        };
        self.call(Call::FinitModule(path.to_owned()), op)
    }

    fn mknod_char(&self, path: &Path, mode: u32, major: u32, minor: u32) -> io::Result<()> {
        let call = Call::MknodChar {
            path: path.to_owned(),
            mode,
            major,
            minor,
        };
        let op = Op::MknodChar {
            path: path.to_owned(),
        };
        self.call(call, op)?;
        self.state().existing.insert(path.to_owned());
        Ok(())
    }

    fn sethostname(&self, name: &str) -> io::Result<()> {
        self.call(Call::Sethostname(name.to_owned()), Op::Sethostname)
    }

    fn exists(&self, path: &Path) -> bool {
        let s = self.state();
        s.existing.contains(path)
            || s.appears_at
                .iter()
                .any(|(appearing, at)| appearing == path && *at <= s.clock)
    }

    /// Jumps the clock to the moment `path` appears (or by `timeout` when it does not).
    fn wait_for_path(&self, path: &Path, timeout: Duration) -> io::Result<bool> {
        let mut s = self.state();
        fail_if_injected(&mut s, &Op::WatchDir)?;
        if s.existing.contains(path) {
            return Ok(true);
        }
        let deadline = s.clock + timeout;
        let appears = s
            .appears_at
            .iter()
            .filter(|(appearing, _)| appearing == path)
            .map(|(_, at)| *at)
            .min();
        match appears {
            Some(at) if at <= deadline => {
                s.clock = s.clock.max(at);
                Ok(true)
            }
            _ => {
                s.clock = deadline;
                Ok(false)
            }
        }
    }

    fn read_at(&self, path: &Path, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let s = self.state();
        let bytes = s
            .devices
            .get(path)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        let start = (offset as usize).min(bytes.len());
        let end = start.saturating_add(len).min(bytes.len());
        Ok(bytes[start..end].to_vec())
    }

    fn read_to_string(&self, path: &Path) -> io::Result<String> {
        let op = Op::ReadFile {
            path: path.to_owned(),
        };
        self.call(Call::ReadFile(path.to_owned()), op)?;
        self.state()
            .files
            .get(path)
            .cloned()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
    }

    fn read_link(&self, path: &Path) -> io::Result<PathBuf> {
        let s = self.state();
        if let Some(target) = s.links.get(path) {
            return Ok(target.clone());
        }
        let exists = s.existing.contains(path) || s.files.contains_key(path);
        Err(io::Error::from_raw_os_error(if exists {
            libc::EINVAL
        } else {
            libc::ENOENT
        }))
    }

    fn sync(&self) {
        self.state().calls.push(Call::Sync);
    }

    fn hold_initramfs(&self) -> io::Result<()> {
        self.call(Call::HoldInitramfs, Op::HoldInitramfs)
    }

    fn chdir_initramfs(&self) -> io::Result<()> {
        self.call(Call::ChdirInitramfs, Op::ChdirInitramfs)
    }

    fn free_initramfs(&self, mountinfo: &Path) -> io::Result<Freed> {
        self.call(Call::FreeInitramfs(mountinfo.to_owned()), Op::FreeInitramfs)?;
        Ok(Freed {
            files: 3,
            bytes: 4096,
        })
    }

    /// The descriptor number is [`SEALED_FD`]; the file must exist (`with_existing`).
    fn seal_executable(&self, path: &Path) -> io::Result<ExeFd> {
        self.call(Call::SealExecutable(path.to_owned()), Op::SealExecutable)?;
        if !self.exists(path) {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        Ok(ExeFd(SEALED_FD))
    }
}

impl Recorder {
    /// Console, fork, the child's steps, exec: in the order the real spawn meets them.
    fn start(&self, spawn: &Spawn, in_place: bool) -> Result<(), SpawnError> {
        let mut s = self.state();
        s.calls.push(Call::Spawn {
            spawn: spawn.clone(),
            in_place,
        });
        if spawn.console {
            fail_if_injected(&mut s, &Op::OpenConsole).map_err(SpawnError::Console)?;
        }
        if !in_place {
            fail_if_injected(&mut s, &Op::Fork).map_err(SpawnError::Start)?;
        }
        for step in &spawn.in_child {
            s.calls.push(Call::InChild(step.clone()));
            let result = fail_if_injected(&mut s, &Op::of_step(step));
            if *step != ChildStep::ControllingTerminal {
                result.map_err(SpawnError::Start)?;
            }
        }
        s.calls.push(Call::Exec(spawn.program.clone()));
        fail_if_injected(&mut s, &Op::Exec).map_err(SpawnError::Start)
    }
}

impl Process for Recorder {
    fn block_signals(&self, signals: &[i32]) -> io::Result<()> {
        self.call(Call::BlockSignals(signals.to_vec()), Op::BlockSignals)
    }

    fn wait_signal(&self, signals: &[i32], timeout: Option<Duration>) -> io::Result<Received> {
        self.call(Call::WaitSignal(timeout), Op::WaitSignal)?;
        let mut s = self.state();
        if let Some(index) = s.pending.iter().position(|r| signals.contains(&r.signal)) {
            return Ok(s.pending.remove(index).expect("index is in range"));
        }
        match timeout {
            Some(timeout) => {
                s.clock += timeout;
                Err(io::Error::from_raw_os_error(libc::EAGAIN))
            }
            None => panic!("wait_signal would block forever: no signal pending in this test"),
        }
    }

    fn kill(&self, pid: i32, signal: i32) -> io::Result<()> {
        self.call(Call::Kill { pid, signal }, Op::Kill { pid })?;
        let mut s = self.state();
        if pid == INIT_PID {
            s.pending.push_back(user(signal));
            return Ok(());
        }
        if pid == -1 {
            // Every process but PID 1.
            for index in 0..s.children.len() {
                s.signal_child(index, signal);
            }
            return Ok(());
        }
        match s.children.iter().position(|(p, _)| *p == pid) {
            Some(index) => {
                s.signal_child(index, signal);
                Ok(())
            }
            None => Err(io::Error::from_raw_os_error(libc::ESRCH)),
        }
    }

    fn wait_child(&self, mode: WaitMode) -> io::Result<Option<Reaped>> {
        self.call(Call::WaitChild(mode), Op::WaitChild)?;
        let mut s = self.state();
        let zombie = s
            .children
            .iter()
            .position(|(_, state)| matches!(state, ChildState::Exited(_)));
        if let Some(index) = zombie {
            let (pid, state) = s.children.remove(index);
            let ChildState::Exited(exit) = state else {
                unreachable!("selected as exited")
            };
            return Ok(Some(Reaped {
                pid,
                exit: Some(exit),
            }));
        }
        if s.children.is_empty() {
            return Err(io::Error::from_raw_os_error(libc::ECHILD));
        }
        match mode {
            WaitMode::NoHang => Ok(None),
            WaitMode::Block => panic!("wait_child would block forever: no child exits"),
        }
    }

    fn spawn(&self, spawn: &Spawn) -> Result<i32, SpawnError> {
        self.start(spawn, false)?;
        let mut s = self.state();
        let pid = FIRST_CHILD_PID.max(s.next_pid);
        s.next_pid = pid + 1;
        let state = s.spawned.take().unwrap_or_else(ChildState::running);
        s.children.push((pid, state));
        Ok(pid)
    }

    fn spawn_fd(&self, exe: ExeFd, spawn: &Spawn) -> Result<i32, SpawnError> {
        self.state().calls.push(Call::ExecFd(exe));
        self.spawn(spawn)
    }

    fn exec(&self, spawn: &Spawn) -> SpawnError {
        match self.start(spawn, true) {
            Err(err) => err,
            // The real exec does not return; the fake has to.
            Ok(()) => SpawnError::Start(io::Error::other("fake exec: the program now runs")),
        }
    }
}

impl Machine for Recorder {
    fn reboot(&self, command: Power) -> io::Result<()> {
        self.call(Call::Reboot(command), Op::Reboot(command))
    }

    fn open_input(&self, device: &Path) -> io::Result<Box<dyn Read + Send>> {
        let op = Op::OpenInput {
            device: device.to_owned(),
        };
        self.call(Call::OpenInput(device.to_owned()), op)?;
        if !self.exists(device) {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        match self.state().inputs.get(device) {
            Some(bytes) => Ok(Box::new(Cursor::new(bytes.clone()))),
            None => Err(io::Error::from_raw_os_error(libc::ENOENT)),
        }
    }

    fn interface_flags(&self, name: &str) -> io::Result<i16> {
        self.call(Call::InterfaceFlags(name.into()), Op::InterfaceFlags)?;
        self.state()
            .interfaces
            .get(name)
            .copied()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENODEV))
    }

    fn set_interface_flags(&self, name: &str, flags: i16) -> io::Result<()> {
        let call = Call::SetInterfaceFlags(name.into(), flags);
        self.call(call, Op::SetInterfaceFlags)?;
        self.state().interfaces.insert(name.into(), flags);
        Ok(())
    }
}
