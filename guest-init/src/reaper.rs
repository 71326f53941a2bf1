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

    use crate::syscalls::Clock;
    use crate::syscalls::fake::{Call, ChildState, Op, Recorder};

    fn zombie(status: i32) -> ChildState {
        ChildState::Exited(AppExit::Exited(status))
    }

    #[test]
    fn blocks_every_handled_signal() {
        let sys = Recorder::default();
        block_signals(&sys).unwrap();
        let Call::BlockSignals(blocked) = &sys.calls()[0] else {
            panic!("{:?}", sys.calls())
        };
        for signal in FORWARDED.iter().chain(&[libc::SIGCHLD, SHUTDOWN_SIGNAL]) {
            assert!(blocked.contains(signal), "{signal} not blocked");
        }
        assert_eq!(blocked.len(), FORWARDED.len() + 2);
    }

    #[test]
    fn reap_all_collects_every_zombie_and_reports_the_app() {
        let sys = Recorder::default();
        sys.add_child(10, ChildState::running());
        for pid in [20, 21, 22] {
            sys.add_child(pid, zombie(0));
        }
        assert_eq!(reap_all(&sys, 10), None);
        assert_eq!(sys.children(), [(10, ChildState::running())]);
        sys.exit_child(10, AppExit::Exited(7));
        sys.add_child(23, zombie(1));
        assert_eq!(reap_all(&sys, 10), Some(AppExit::Exited(7)));
        assert!(sys.children().is_empty());
        // No child left: ECHILD ends the loop too.
        assert_eq!(reap_all(&sys, 10), None);
    }

    #[test]
    fn reap_remaining_returns_at_once_when_nothing_is_left() {
        let sys = Recorder::default();
        sys.add_child(20, zombie(0));
        reap_remaining(&sys, Duration::from_secs(2));
        assert!(sys.children().is_empty());
        assert_eq!(sys.now(), Duration::ZERO);
    }

    #[test]
    fn reap_remaining_is_bounded_by_the_timeout() {
        let sys = Recorder::default();
        sys.add_child(20, ChildState::Stuck);
        reap_remaining(&sys, Duration::from_secs(2));
        assert_eq!(sys.now(), Duration::from_secs(2));
        assert_eq!(sys.children(), [(20, ChildState::Stuck)]);
    }

    #[test]
    fn wait_for_reaps_the_others_on_the_way_and_retries_eintr() {
        let sys = Recorder::default();
        sys.add_child(20, zombie(0));
        sys.add_child(30, zombie(5));
        sys.fail_once(Op::WaitChild, libc::EINTR);
        assert_eq!(wait_for(&sys, 30), Some(AppExit::Exited(5)));
        assert!(sys.children().is_empty());
        // Another error (ECHILD: the shell is gone already) ends the wait.
        assert_eq!(wait_for(&sys, 30), None);
    }

    #[test]
    fn wait_signal_retries_eintr_and_reports_a_timeout() {
        let sys = Recorder::default();
        sys.fail_once(Op::WaitSignal, libc::EINTR);
        assert_eq!(wait_signal(&sys, Some(Duration::from_secs(1))), None);
        assert_eq!(sys.now(), Duration::from_secs(1));
        let waits = sys.calls_where(|call| matches!(call, Call::WaitSignal(_)));
        assert_eq!(waits.len(), 2);
        sys.deliver(user(libc::SIGCHLD));
        assert_eq!(wait_signal(&sys, None), Some(user(libc::SIGCHLD)));
    }

    #[test]
    fn send_ignores_a_vanished_process() {
        let sys = Recorder::default();
        send(&sys, 4242, libc::SIGTERM);
        assert_eq!(
            sys.calls(),
            [Call::Kill {
                pid: 4242,
                signal: libc::SIGTERM
            }]
        );
    }
}
