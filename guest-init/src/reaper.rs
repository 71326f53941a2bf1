//! Signals and zombies: PID 1 blocks the signals it cares about and takes them one at a time
//! with `sigtimedwait`, so there are no async handlers and no races with `waitpid`.
//!
//! Blocked signals are queued even for PID 1 (the kernel drops default-action signals to init
//! only when they are not blocked), so this also receives the kernel's Ctrl-Alt-Del SIGINT.

use std::io;
use std::time::Duration;

use crate::syscalls::{AppExit, Process, WaitMode};

pub use crate::syscalls::Received;

/// PID 1: guest-init itself, where the power button watcher sends [`SHUTDOWN_SIGNAL`].
pub const INIT_PID: i32 = 1;

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

/// Every signal PID 1 blocks and takes with [`wait_signal`].
pub const HANDLED: [i32; FORWARDED.len() + 2] = {
    let mut handled = [libc::SIGCHLD; FORWARDED.len() + 2];
    let mut i = 0;
    while i < FORWARDED.len() {
        handled[i] = FORWARDED[i];
        i += 1;
    }
    handled[FORWARDED.len() + 1] = SHUTDOWN_SIGNAL;
    handled
};

/// While children are left after the kill of everything: how often to look again.
const REAP_POLL: Duration = Duration::from_millis(5);

/// Block the handled signals in this thread; threads started later inherit the mask.
/// Children inherit it too: every spawn clears it in the child (`ChildStep::UnblockSignals`).
pub fn block_signals(sys: &dyn Process) -> io::Result<()> {
    sys.block_signals(&HANDLED)
}

/// Wait for one handled signal; `None` when the timeout passed first.
pub fn wait_signal(sys: &dyn Process, timeout: Option<Duration>) -> Option<Received> {
    loop {
        match sys.wait_signal(&HANDLED, timeout) {
            Ok(received) => return Some(received),
            Err(err) if err.raw_os_error() == Some(libc::EINTR) => continue,
            Err(_) => return None, // EAGAIN: timed out
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
pub fn reap_all(sys: &dyn Process, app: i32) -> Option<AppExit> {
    let mut app_exit = None;
    // Nothing exited yet, no child left, or an error: done for now.
    while let Ok(Some(reaped)) = sys.wait_child(WaitMode::NoHang) {
        if reaped.pid == app {
            app_exit = reaped.exit;
        }
    }
    app_exit
}

/// After a kill of everything: reap until no child is left, or `timeout` passes (a process
/// stuck in uninterruptible sleep must not keep the VM from powering off).
pub fn reap_remaining(sys: &dyn Process, timeout: Duration) {
    let deadline = sys.now() + timeout;
    loop {
        match sys.wait_child(WaitMode::NoHang) {
            Ok(Some(_)) => continue,
            Err(_) => return, // ECHILD: nothing left
            Ok(None) if sys.now() >= deadline => return,
            Ok(None) => sys.sleep(REAP_POLL),
        }
    }
}

/// Block until `pid` exits, reaping everything else on the way.
pub fn wait_for(sys: &dyn Process, pid: i32) -> Option<AppExit> {
    loop {
        match sys.wait_child(WaitMode::Block) {
            Ok(Some(reaped)) if reaped.pid == pid => return reaped.exit,
            Ok(_) => {}
            Err(err) if err.raw_os_error() == Some(libc::EINTR) => {}
            Err(_) => return None,
        }
    }
}

/// Send `signal`; a failure (the process is already gone) is harmless.
pub fn send(sys: &dyn Process, pid: i32, signal: i32) {
    let _ = sys.kill(pid, signal);
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
}
