//! The real kernel: rustix (raw syscalls) and, for the signal mask, `sigtimedwait`, `waitpid`,
//! `kill` and the interface ioctls, libc's bindings to the musl that std already links. No C
//! code is built.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::spawn::Prepared;
use super::{
    AppExit, Clock, ExeFd, Freed, Machine, MountFlags, Power, Process, Reaped, Received, Spawn,
    SpawnError, Syscalls, WaitMode,
};

/// `si_code` of signals the kernel sends itself (Ctrl-Alt-Del goes out as SI_KERNEL).
const SI_KERNEL: i32 = 0x80;

pub struct Linux {
    epoch: Instant,
    /// The initramfs root, held from before the root switch until power off.
    initramfs: OnceLock<OwnedFd>,
}

impl Linux {
    pub fn new() -> Self {
        Linux {
            epoch: Instant::now(),
            initramfs: OnceLock::new(),
        }
    }
}

impl Clock for Linux {
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    fn sleep(&self, duration: Duration) {
        std::thread::sleep(duration);
    }
}

impl Syscalls for Linux {
    fn mount(
        &self,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: MountFlags,
        data: &str,
    ) -> io::Result<()> {
        let data = std::ffi::CString::new(data)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in mount options"))?;
        let data = (!data.is_empty()).then_some(data.as_c_str());
        rustix::mount::mount(source, target, fstype, flags, data)?;
        Ok(())
    }

    fn mount_move(&self, from: &Path, to: &Path) -> io::Result<()> {
        rustix::mount::mount_move(from, to)?;
        Ok(())
    }

    fn make_rprivate(&self, target: &Path) -> io::Result<()> {
        rustix::mount::mount_change(
            target,
            rustix::mount::MountPropagationFlags::PRIVATE
                | rustix::mount::MountPropagationFlags::REC,
        )?;
        Ok(())
    }

    fn remount(&self, target: &Path, flags: MountFlags) -> io::Result<()> {
        rustix::mount::mount_remount(target, flags, "")?;
        Ok(())
    }

    fn unmount(&self, target: &Path) -> io::Result<()> {
        rustix::mount::unmount(target, rustix::mount::UnmountFlags::empty())?;
        Ok(())
    }

    fn mkdir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn chdir(&self, path: &Path) -> io::Result<()> {
        rustix::process::chdir(path)?;
        Ok(())
    }

    fn chroot(&self, path: &Path) -> io::Result<()> {
        rustix::process::chroot(path)?;
        Ok(())
    }

    fn finit_module(&self, path: &Path) -> io::Result<()> {
        let file = File::open(path)?;
        rustix::system::finit_module(&file, c"", 0)?;
        Ok(())
    }

    fn mknod_char(&self, path: &Path, mode: u32, major: u32, minor: u32) -> io::Result<()> {
        use rustix::fs::{FileType, Mode};
        let mode = Mode::from_raw_mode(mode);
        let dev = rustix::fs::makedev(major, minor);
        rustix::fs::mknodat(rustix::fs::CWD, path, FileType::CharacterDevice, mode, dev)?;
        // mknod applies the umask; the node must have the mode asked for.
        rustix::fs::chmod(path, mode)?;
        Ok(())
    }

    fn sethostname(&self, name: &str) -> io::Result<()> {
        rustix::system::sethostname(name.as_bytes())?;
        Ok(())
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn wait_for_path(&self, path: &Path, timeout: Duration) -> io::Result<bool> {
        use rustix::fs::inotify;
        use std::os::fd::AsRawFd;
        // The usual case at boot: the node is there already, no watch needed.
        if path.exists() {
            return Ok(true);
        }
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let watch = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)?;
        // Watch first, then look: an entry created in between still wakes the wait.
        inotify::add_watch(
            &watch,
            dir,
            inotify::WatchFlags::CREATE | inotify::WatchFlags::MOVED_TO,
        )?;
        let deadline = self.now() + timeout;
        let mut events = [0u8; 1024];
        loop {
            if path.exists() {
                return Ok(true);
            }
            let left = deadline.saturating_sub(self.now());
            if left.is_zero() {
                return Ok(false);
            }
            let mut pollfd = libc::pollfd {
                fd: watch.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // Rounded up: a sub-millisecond rest must not turn into a busy loop.
            let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
            // SAFETY: one valid pollfd for the duration of the call.
            if unsafe { libc::poll(&mut pollfd, 1, ms) } < 0 {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
            // Which entry appeared does not matter: the path is looked up again.
            while rustix::io::read(&watch, &mut events).is_ok_and(|n| n > 0) {}
        }
    }

    fn read_to_string(&self, path: &Path) -> io::Result<String> {
        std::fs::read_to_string(path)
    }

    fn read_at(&self, path: &Path, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let mut bytes = vec![0u8; len];
        let n = File::open(path)?.read_at(&mut bytes, offset)?;
        bytes.truncate(n);
        Ok(bytes)
    }

    fn read_link(&self, path: &Path) -> io::Result<std::path::PathBuf> {
        std::fs::read_link(path)
    }

    fn sync(&self) {
        rustix::fs::sync();
    }

    fn hold_initramfs(&self) -> io::Result<()> {
        use rustix::fs::{Mode, OFlags};
        let root = rustix::fs::open(
            "/",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        // A second hold keeps the first handle: it is the one taken before the switch.
        let _ = self.initramfs.set(root);
        Ok(())
    }

    fn chdir_initramfs(&self) -> io::Result<()> {
        let root = self.initramfs.get().ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "the initramfs root was not held")
        })?;
        rustix::process::fchdir(root)?;
        Ok(())
    }

    fn free_initramfs(&self, mountinfo: &Path) -> io::Result<Freed> {
        self.chdir_initramfs()?;
        let freed = crate::initramfs::free_root(Path::new("."), mountinfo);
        // Back to the new root whatever happened: PID 1's relative paths start there.
        rustix::process::chdir("/")?;
        freed
    }

    fn seal_executable(&self, path: &Path) -> io::Result<ExeFd> {
        use rustix::fs::{MemfdFlags, Mode, OFlags, SealFlags};
        use std::os::fd::IntoRawFd;
        // Once the root is switched the initramfs is reachable only through the held handle.
        let mut source = match self.initramfs.get() {
            Some(root) => File::from(rustix::fs::openat(
                root,
                path.strip_prefix("/").unwrap_or(path),
                OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
            )?),
            None => File::open(path)?,
        };
        let base = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
        // MFD_EXEC says "executable" to kernels with vm.memfd_noexec (6.3+); older ones refuse
        // the flag, and their memfds are executable anyway.
        let fd = match rustix::fs::memfd_create(c"guest-agent", base | MemfdFlags::EXEC) {
            Err(rustix::io::Errno::INVAL) => rustix::fs::memfd_create(c"guest-agent", base)?,
            other => other?,
        };
        let mut file = File::from(fd);
        // In the kernel (copy_file_range/sendfile), without a megabyte on PID 1's heap.
        io::copy(&mut source, &mut file)?;
        rustix::fs::fcntl_add_seals(
            &file,
            SealFlags::SEAL | SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE,
        )?;
        // Held for the life of PID 1: the agent's restarts exec it again.
        Ok(ExeFd(file.into_raw_fd()))
    }
}

pub(super) fn sigset(signals: &[i32]) -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset only write the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in signals {
            libc::sigaddset(&mut set, *signal);
        }
        set
    }
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Decode a `waitpid` status word.
pub fn decode_status(status: i32) -> Option<AppExit> {
    if libc::WIFEXITED(status) {
        Some(AppExit::Exited(libc::WEXITSTATUS(status)))
    } else if libc::WIFSIGNALED(status) {
        Some(AppExit::Signaled(libc::WTERMSIG(status)))
    } else {
        None
    }
}

impl Process for Linux {
    fn block_signals(&self, signals: &[i32]) -> io::Result<()> {
        let set = sigset(signals);
        // SAFETY: valid set pointer, null old-set pointer.
        check(unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) })?;
        Ok(())
    }

    fn wait_signal(&self, signals: &[i32], timeout: Option<Duration>) -> io::Result<Received> {
        let set = sigset(signals);
        // SAFETY: zeroed siginfo is a valid out-parameter; set and timespec outlive the call.
        let (rc, info) = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let rc = match timeout {
                Some(timeout) => {
                    let ts = libc::timespec {
                        tv_sec: timeout.as_secs() as _,
                        tv_nsec: timeout.subsec_nanos() as _,
                    };
                    libc::sigtimedwait(&set, &mut info, &ts)
                }
                None => libc::sigwaitinfo(&set, &mut info),
            };
            (rc, info)
        };
        Ok(Received {
            signal: check(rc)?,
            from_kernel: info.si_code == SI_KERNEL,
        })
    }

    fn kill(&self, pid: i32, signal: i32) -> io::Result<()> {
        // SAFETY: plain syscall.
        check(unsafe { libc::kill(pid, signal) })?;
        Ok(())
    }

    fn wait_child(&self, mode: WaitMode) -> io::Result<Option<Reaped>> {
        let options = match mode {
            WaitMode::Block => 0,
            WaitMode::NoHang => libc::WNOHANG,
        };
        let mut status = 0;
        // SAFETY: plain syscall with a valid status pointer.
        let pid = check(unsafe { libc::waitpid(-1, &mut status, options) })?;
        Ok((pid > 0).then(|| Reaped {
            pid,
            exit: decode_status(status),
        }))
    }

    fn spawn(&self, spawn: &Spawn) -> Result<i32, SpawnError> {
        // PID 1 reaps with waitpid(-1).
        Prepared::new(spawn)?.spawn()
    }

    fn exec(&self, spawn: &Spawn) -> SpawnError {
        match Prepared::new(spawn) {
            Ok(prepared) => prepared.exec(),
            Err(err) => err,
        }
    }

    fn spawn_fd(&self, exe: ExeFd, spawn: &Spawn) -> Result<i32, SpawnError> {
        Prepared::with_fd(exe, spawn)?.spawn()
    }
}

impl Machine for Linux {
    fn reboot(&self, command: Power) -> io::Result<()> {
        let command = match command {
            Power::CtrlAltDelOff => rustix::system::RebootCommand::CadOff,
            Power::PowerOff => rustix::system::RebootCommand::PowerOff,
        };
        rustix::system::reboot(command)?;
        Ok(())
    }

    fn open_input(&self, device: &Path) -> io::Result<Box<dyn Read + Send>> {
        Ok(Box::new(File::open(device)?))
    }

    fn interface_flags(&self, name: &str) -> io::Result<i16> {
        let mut req = ifreq(name)?;
        with_inet_socket(|fd| {
            // SAFETY: req is a valid ifreq naming the interface.
            check(unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut req) })
        })?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        Ok(unsafe { req.ifr_ifru.ifru_flags })
    }

    fn set_interface_flags(&self, name: &str, flags: i16) -> io::Result<()> {
        let mut req = ifreq(name)?;
        req.ifr_ifru.ifru_flags = flags;
        with_inet_socket(|fd| {
            // SAFETY: req is a valid ifreq with the flags member set.
            check(unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &req) })
        })?;
        Ok(())
    }
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {name:?}"),
        ));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

/// Interface ioctls need some socket; the fd is closed on every path.
fn with_inet_socket(ioctl: impl FnOnce(libc::c_int) -> io::Result<libc::c_int>) -> io::Result<()> {
    // SAFETY: plain syscall.
    let fd =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    let result = ioctl(fd);
    // SAFETY: fd is ours and closed once.
    unsafe { libc::close(fd) };
    result.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_status_decoding() {
        // Encodings from wait(2): exit code in bits 8..16, signal in the low 7 bits.
        assert_eq!(decode_status(0), Some(AppExit::Exited(0)));
        assert_eq!(decode_status(3 << 8), Some(AppExit::Exited(3)));
        assert_eq!(decode_status(15), Some(AppExit::Signaled(15)));
        assert_eq!(decode_status(15).unwrap().code(), 143);
        assert_eq!(decode_status(9 | 0x80).unwrap().code(), 137); // core dumped
    }

    #[test]
    fn a_path_wait_is_woken_by_the_entry_and_reports_a_timeout_or_a_missing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("vda");
        let linux = Linux::new();
        let creator = {
            let node = node.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                std::fs::write(&node, "").unwrap();
            })
        };
        assert!(linux.wait_for_path(&node, Duration::from_secs(60)).unwrap());
        creator.join().unwrap();
        // Present from the start.
        assert!(linux.wait_for_path(&node, Duration::ZERO).unwrap());
        let absent = dir.path().join("vdb");
        assert!(
            !linux
                .wait_for_path(&absent, Duration::from_millis(20))
                .unwrap()
        );
        let unwatchable = dir.path().join("input/event0");
        assert!(
            linux
                .wait_for_path(&unwatchable, Duration::from_millis(20))
                .is_err()
        );
    }

    #[test]
    fn ifreq_names_are_bounded() {
        assert!(ifreq("lo").is_ok());
        assert!(ifreq("a-name-far-too-long").is_err());
    }
}
