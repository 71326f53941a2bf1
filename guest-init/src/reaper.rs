//! Signals and zombies: PID 1 blocks the signals it cares about and takes them one at a time
//! with `sigtimedwait`, so there are no async handlers and no races with `waitpid`.
//!
//! Blocked signals are queued even for PID 1 (the kernel drops default-action signals to init
//! only when they are not blocked), so this also receives the kernel's Ctrl-Alt-Del SIGINT.

use std::io;
use std::time::Duration;

use crate::error::AppExit;

/// Passed on to the application unchanged.
pub const FORWARDED: [i32; 6] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// Raised by guest-init's power button watcher (and by anyone asking for a clean shutdown).
pub const SHUTDOWN_SIGNAL: i32 = libc::SIGPWR;

/// `si_code` of signals the kernel sends itself (Ctrl-Alt-Del goes out as SI_KERNEL).
const SI_KERNEL: i32 = 0x80;

fn handled_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset only write the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in FORWARDED.iter().chain(&[libc::SIGCHLD, SHUTDOWN_SIGNAL]) {
            libc::sigaddset(&mut set, *signal);
        }
        set
    }
}

/// Block the handled signals in this thread; threads started later inherit the mask.
/// Children inherit it too: every spawn calls [`unblock_in_child`] between fork and exec.
pub fn block_signals() -> io::Result<()> {
    let set = handled_set();
    // SAFETY: valid set pointer, null old-set pointer.
    let rc = unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Clear the signal mask. For `pre_exec`: async-signal-safe, one syscall. A blocked SIGTERM
/// would silently survive exec and make the application deaf to the shutdown.
pub fn unblock_in_child() -> io::Result<()> {
    // SAFETY: valid empty set, null old-set pointer.
    let rc = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut())
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    pub signal: i32,
    pub from_kernel: bool,
}

/// Wait for one handled signal; `None` when the timeout passed first.
pub fn wait_signal(timeout: Option<Duration>) -> Option<Received> {
    let set = handled_set();
    loop {
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
        if rc >= 0 {
            return Some(Received {
                signal: rc,
                from_kernel: info.si_code == SI_KERNEL,
            });
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => continue,
            _ => return None, // EAGAIN: timed out
        }
    }
}

/// What the supervisor does with a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// A child changed state: reap.
    Reap,
    /// Begin the graceful shutdown (power button, Ctrl-Alt-Del).
    Shutdown,
    Forward(i32),
    Ignore,
}

pub fn action(received: Received) -> Action {
    match received.signal {
        libc::SIGCHLD => Action::Reap,
        SHUTDOWN_SIGNAL => Action::Shutdown,
        // Ctrl-Alt-Del with CAD off: the kernel sends SIGINT to PID 1.
        libc::SIGINT if received.from_kernel => Action::Shutdown,
        signal if FORWARDED.contains(&signal) => Action::Forward(signal),
        _ => Action::Ignore,
    }
}

/// Reap every exited child; returns the application's exit when it was among them.
pub fn reap_all(app: i32) -> Option<AppExit> {
    let mut app_exit = None;
    loop {
        let mut status = 0;
        // SAFETY: plain syscall with a valid status pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return app_exit;
        }
        if pid == app {
            app_exit = decode_status(status);
        }
    }
}

/// After a kill of everything: reap until no child is left, or `timeout` passes (a process
/// stuck in uninterruptible sleep must not keep the VM from powering off).
pub fn reap_remaining(timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let mut status = 0;
        // SAFETY: plain syscall with a valid status pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid > 0 {
            continue;
        }
        if pid < 0 || std::time::Instant::now() >= deadline {
            return; // ECHILD: nothing left
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Block until `pid` exits, reaping everything else on the way.
pub fn wait_for(pid: i32) -> Option<AppExit> {
    loop {
        let mut status = 0;
        // SAFETY: plain syscall with a valid status pointer.
        let reaped = unsafe { libc::waitpid(-1, &mut status, 0) };
        if reaped == pid {
            return decode_status(status);
        }
        if reaped < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return None;
        }
    }
}

pub fn decode_status(status: i32) -> Option<AppExit> {
    if libc::WIFEXITED(status) {
        Some(AppExit::Exited(libc::WEXITSTATUS(status)))
    } else if libc::WIFSIGNALED(status) {
        Some(AppExit::Signaled(libc::WTERMSIG(status)))
    } else {
        None
    }
}

pub fn send(pid: i32, signal: i32) {
    // SAFETY: plain syscall; failure (already gone) is harmless.
    unsafe {
        libc::kill(pid, signal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(signal: i32) -> Received {
        Received {
            signal,
            from_kernel: false,
        }
    }

    #[test]
    fn actions() {
        assert_eq!(action(user(libc::SIGCHLD)), Action::Reap);
        assert_eq!(action(user(libc::SIGPWR)), Action::Shutdown);
        for signal in FORWARDED {
            assert_eq!(action(user(signal)), Action::Forward(signal));
        }
        let cad = Received {
            signal: libc::SIGINT,
            from_kernel: true,
        };
        assert_eq!(action(cad), Action::Shutdown);
        assert_eq!(action(user(libc::SIGWINCH)), Action::Ignore);
    }

    #[test]
    fn wait_status_decoding() {
        // Encodings from wait(2): exit code in bits 8..16, signal in the low 7 bits.
        assert_eq!(decode_status(0), Some(AppExit::Exited(0)));
        assert_eq!(decode_status(3 << 8), Some(AppExit::Exited(3)));
        assert_eq!(decode_status(15), Some(AppExit::Signaled(15)));
        assert_eq!(decode_status(15).unwrap().code(), 143);
        assert_eq!(decode_status(9 | 0x80).unwrap().code(), 137); // core dumped
    }
}
