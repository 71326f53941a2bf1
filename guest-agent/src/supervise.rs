//! `guest-agent --supervise`: keeps the serving agent running while the VM runs.
//!
//! guest-init starts the supervisor once (fork + immediate exec of the agent's sealed memfd).
//! The supervisor runs the serving agent as its child (a re-exec of `/proc/self/exe`, which
//! works for a memfd) and, when it dies, logs it and starts it again after a capped
//! exponential back-off ([`Backoff`]); a child that ran [`Policy::stable_after`] resets the
//! back-off. On SIGTERM, SIGINT or SIGHUP it sends SIGTERM to the child, SIGKILL after
//! [`Policy::stop_grace`], and exits. It is one thread that waits with `sigtimedwait`: no
//! handlers, no races with `waitpid`.
//!
//! The loop ([`run`]) reaches the system only through [`Host`], so unit tests drive it on a
//! scripted clock; [`LinuxHost`] is the real one.

use std::io;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

/// Capped exponential back-off: `first`, doubling, never above `cap`.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(first: Duration, cap: Duration) -> Backoff {
        Backoff {
            first,
            cap,
            next: first.min(cap),
        }
    }

    /// The delay to wait now; the one after it doubles.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.cap);
        delay
    }

    /// Back to `first` (after a run long enough to call the agent healthy).
    pub fn reset(&mut self) {
        self.next = self.first.min(self.cap);
    }
}

/// The supervisor's numbers.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Delay before the first restart; doubles for each crash in a row.
    pub first_delay: Duration,
    pub max_delay: Duration,
    /// A child that ran this long resets the back-off.
    pub stable_after: Duration,
    /// SIGTERM to the child on stop, then SIGKILL after this.
    pub stop_grace: Duration,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            first_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(30),
            stable_after: Duration::from_secs(60),
            stop_grace: Duration::from_secs(2),
        }
    }
}

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Code(i32),
    Signal(i32),
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Status::Code(code) => write!(f, "exited with code {code}"),
            Status::Signal(signal) => write!(f, "was killed by signal {signal}"),
        }
    }
}

/// What a wait returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Exited {
        pid: i32,
        status: Status,
    },
    /// A signal asking the supervisor to stop.
    Stop(i32),
    TimedOut,
}

/// The supervisor's side effects.
pub trait Host {
    /// Start the serving agent; its pid.
    fn spawn_server(&mut self) -> io::Result<i32>;
    /// The next child exit or stop signal, waiting at most `timeout` (`None`: forever).
    fn wait(&mut self, timeout: Option<Duration>) -> Event;
    fn kill(&mut self, pid: i32, signal: i32);
    /// Monotonic time.
    fn now(&self) -> Duration;
    fn log(&mut self, message: &str);
}

/// Supervise until asked to stop.
pub fn run(host: &mut dyn Host, policy: &Policy) {
    let mut backoff = Backoff::new(policy.first_delay, policy.max_delay);
    let mut restarts = 0u64;
    loop {
        let child = match host.spawn_server() {
            Ok(pid) => pid,
            Err(err) => {
                let delay = backoff.next_delay();
                host.log(&format!(
                    "cannot start the serving agent: {err}; trying again in {} ms",
                    delay.as_millis()
                ));
                if !pause(host, delay) {
                    return;
                }
                continue;
            }
        };
        if restarts == 0 {
            host.log(&format!("serving agent started as pid {child}"));
        } else {
            host.log(&format!(
                "serving agent restarted as pid {child} (restart {restarts})"
            ));
        }
        let started = host.now();
        let status = loop {
            match host.wait(None) {
                Event::Exited { pid, status } if pid == child => break status,
                Event::Exited { .. } | Event::TimedOut => {}
                Event::Stop(signal) => {
                    stop(host, child, signal, policy.stop_grace);
                    return;
                }
            }
        };
        let ran = host.now().saturating_sub(started);
        if ran >= policy.stable_after {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        restarts += 1;
        host.log(&format!(
            "the serving agent (pid {child}) {status} after {} ms; restarting it in {} ms",
            ran.as_millis(),
            delay.as_millis()
        ));
        if !pause(host, delay) {
            return;
        }
    }
}

/// Wait out `delay`; `false` when a stop signal came first.
fn pause(host: &mut dyn Host, delay: Duration) -> bool {
    let deadline = host.now() + delay;
    loop {
        let remaining = deadline.saturating_sub(host.now());
        if remaining.is_zero() {
            return true;
        }
        match host.wait(Some(remaining)) {
            Event::Stop(signal) => {
                host.log(&format!("stopping on signal {signal}"));
                return false;
            }
            Event::Exited { .. } | Event::TimedOut => {}
        }
    }
}

/// SIGTERM to the child, SIGKILL if it is still there after `grace`.
fn stop(host: &mut dyn Host, child: i32, signal: i32, grace: Duration) {
    host.log(&format!(
        "stopping on signal {signal}: SIGTERM to the serving agent (pid {child})"
    ));
    host.kill(child, libc::SIGTERM);
    let deadline = host.now() + grace;
    loop {
        let remaining = deadline.saturating_sub(host.now());
        if remaining.is_zero() {
            host.log(&format!(
                "the serving agent (pid {child}) did not stop within {} ms: SIGKILL",
                grace.as_millis()
            ));
            host.kill(child, libc::SIGKILL);
            return;
        }
        match host.wait(Some(remaining)) {
            Event::Exited { pid, .. } if pid == child => return,
            _ => {}
        }
    }
}

/// Signals the supervisor takes with `sigtimedwait` (blocked, so never delivered otherwise).
const WAITED: [i32; 4] = [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// The real host: the serving agent is `/proc/self/exe` with `server_args`.
pub struct LinuxHost {
    server_args: Vec<String>,
    epoch: Instant,
}

impl LinuxHost {
    /// Blocks the signals [`run`] waits for: call before any other thread exists.
    pub fn new(server_args: Vec<String>) -> io::Result<LinuxHost> {
        let set = sigset(&WAITED);
        // SAFETY: valid set pointer, null old-set pointer.
        let rc = unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(LinuxHost {
            server_args,
            epoch: Instant::now(),
        })
    }

    /// A child that already exited, if any.
    fn reap(&self) -> Option<Event> {
        let mut status = 0;
        // SAFETY: plain syscall with a valid status pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return None;
        }
        let status = if libc::WIFSIGNALED(status) {
            Status::Signal(libc::WTERMSIG(status))
        } else {
            Status::Code(libc::WEXITSTATUS(status))
        };
        Some(Event::Exited { pid, status })
    }
}

fn sigset(signals: &[i32]) -> libc::sigset_t {
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

impl Host for LinuxHost {
    fn spawn_server(&mut self) -> io::Result<i32> {
        let mut command = std::process::Command::new("/proc/self/exe");
        command.arg0("guest-agent").args(&self.server_args);
        // The signals blocked for sigtimedwait would survive the exec and make the serving
        // agent deaf to SIGTERM. Its stdio is ours (the console).
        // SAFETY: sigprocmask is a raw syscall on a set built before fork.
        unsafe {
            command.pre_exec(|| {
                let empty = sigset(&[]);
                if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn()?;
        // Reaped by `wait` through waitpid(-1); the handle is dropped without waiting.
        Ok(child.id() as i32)
    }

    fn wait(&mut self, timeout: Option<Duration>) -> Event {
        let deadline = timeout.map(|t| self.now() + t);
        loop {
            if let Some(exited) = self.reap() {
                return exited;
            }
            let set = sigset(&WAITED);
            let remaining = deadline.map(|d| d.saturating_sub(self.now()));
            if remaining.is_some_and(|r| r.is_zero()) {
                return Event::TimedOut;
            }
            // SAFETY: zeroed siginfo is a valid out-parameter; set and timespec outlive it.
            let signal = unsafe {
                let mut info: libc::siginfo_t = std::mem::zeroed();
                match remaining {
                    Some(r) => {
                        let ts = libc::timespec {
                            tv_sec: r.as_secs() as _,
                            tv_nsec: r.subsec_nanos() as _,
                        };
                        libc::sigtimedwait(&set, &mut info, &ts)
                    }
                    None => libc::sigwaitinfo(&set, &mut info),
                }
            };
            match signal {
                // SIGCHLD, EAGAIN (timeout: checked above on the next turn), EINTR: look again.
                libc::SIGTERM | libc::SIGINT | libc::SIGHUP => return Event::Stop(signal),
                _ => {}
            }
        }
    }

    fn kill(&mut self, pid: i32, signal: i32) {
        // SAFETY: plain syscall. A child already gone (ESRCH) needs nothing.
        unsafe { libc::kill(pid, signal) };
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    fn log(&mut self, message: &str) {
        crate::console::log(message);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let mut backoff = Backoff::new(250 * MS, 1000 * MS);
        let delays: Vec<u128> = (0..5).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, [250, 500, 1000, 1000, 1000]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), 250 * MS);
    }

    /// A simulated world on a fake clock: each serving agent lives for its entry of
    /// `lifetimes` (then exits with that status; `None`: until signalled), strays are other
    /// children exiting at given times, and a stop signal arrives at `stop_at`.
    #[derive(Default)]
    struct World {
        clock: Duration,
        lifetimes: VecDeque<(Duration, Option<Status>)>,
        spawn_failures: u32,
        ignores_sigterm: bool,
        stop_at: Option<(Duration, i32)>,
        strays: VecDeque<Duration>,
        /// The live serving agent: pid and when it exits, how.
        live: Option<(i32, Option<(Duration, Status)>)>,
        spawned: Vec<(Duration, i32)>,
        kills: Vec<(i32, i32)>,
        logs: Vec<String>,
    }

    impl World {
        fn living(lifetimes: &[(u64, Option<i32>)]) -> World {
            World {
                lifetimes: lifetimes
                    .iter()
                    .map(|(ms, code)| (Duration::from_millis(*ms), code.map(Status::Code)))
                    .collect(),
                ..World::default()
            }
        }

        fn stopped_at(mut self, ms: u64, signal: i32) -> World {
            self.stop_at = Some((Duration::from_millis(ms), signal));
            self
        }
    }

    impl Host for World {
        fn spawn_server(&mut self) -> io::Result<i32> {
            if self.spawn_failures > 0 {
                self.spawn_failures -= 1;
                return Err(io::Error::from_raw_os_error(libc::EAGAIN));
            }
            let pid = 101 + self.spawned.len() as i32;
            let (lifetime, status) = self
                .lifetimes
                .pop_front()
                .expect("more agents started than the test expected");
            self.live = Some((pid, status.map(|s| (self.clock + lifetime, s))));
            self.spawned.push((self.clock, pid));
            Ok(pid)
        }

        fn wait(&mut self, timeout: Option<Duration>) -> Event {
            let mut next: Vec<(Duration, Event)> = Vec::new();
            if let Some((pid, Some((at, status)))) = self.live {
                next.push((at, Event::Exited { pid, status }));
            }
            if let Some(&at) = self.strays.front() {
                next.push((at, exited(7, 0)));
            }
            if let Some((at, signal)) = self.stop_at {
                next.push((at, Event::Stop(signal)));
            }
            next.sort_by_key(|(at, _)| *at);
            let deadline = timeout.map(|t| self.clock + t);
            match next.first() {
                Some(&(at, event)) if deadline.is_none_or(|d| at <= d) => {
                    self.clock = self.clock.max(at);
                    match event {
                        Event::Exited { pid: 7, .. } => {
                            self.strays.pop_front();
                        }
                        Event::Exited { .. } => self.live = None,
                        Event::Stop(_) => self.stop_at = None,
                        Event::TimedOut => {}
                    }
                    event
                }
                _ => {
                    self.clock = deadline.expect("the supervisor would wait forever");
                    Event::TimedOut
                }
            }
        }

        fn kill(&mut self, pid: i32, signal: i32) {
            self.kills.push((pid, signal));
            if let Some((live, _)) = self.live
                && live == pid
                && (signal == libc::SIGKILL || !self.ignores_sigterm)
            {
                self.live = Some((pid, Some((self.clock, Status::Signal(signal)))));
            }
        }

        fn now(&self) -> Duration {
            self.clock
        }

        fn log(&mut self, message: &str) {
            self.logs.push(message.to_owned());
        }
    }

    fn exited(pid: i32, code: i32) -> Event {
        Event::Exited {
            pid,
            status: Status::Code(code),
        }
    }

    fn policy() -> Policy {
        Policy {
            first_delay: 250 * MS,
            max_delay: 1000 * MS,
            stable_after: 60_000 * MS,
            stop_grace: 2000 * MS,
        }
    }

    #[test]
    fn a_crashing_agent_is_restarted_with_growing_delays_and_each_restart_is_logged() {
        // Four quick crashes, a long healthy run (which resets the back-off), a crash; the
        // stop arrives during the last back-off.
        let mut host = World::living(&[
            (10, Some(1)),
            (10, Some(1)),
            (10, Some(1)),
            (10, Some(1)),
            (70_000, Some(1)),
            (10, None),
        ])
        .stopped_at(72_900, libc::SIGTERM);
        run(&mut host, &policy());
        let starts: Vec<u128> = host.spawned.iter().map(|(at, _)| at.as_millis()).collect();
        // Each start is the previous exit plus the delay: 250, 500, 1000, 1000 (capped).
        assert_eq!(starts, [0, 260, 770, 1780, 2790]);
        let restarts: Vec<&String> = host
            .logs
            .iter()
            .filter(|l| l.contains("restarting it in"))
            .collect();
        assert_eq!(restarts.len(), 5, "{:?}", host.logs);
        assert_eq!(
            restarts[0],
            "the serving agent (pid 101) exited with code 1 after 10 ms; restarting it in 250 ms"
        );
        assert!(restarts[3].ends_with("in 1000 ms"), "{}", restarts[3]);
        assert!(restarts[4].ends_with("in 250 ms"), "{}", restarts[4]);
        assert!(
            host.logs
                .contains(&"serving agent restarted as pid 102 (restart 1)".to_owned())
        );
        // Stopped during a back-off: nothing left to signal, nothing started again.
        assert!(host.kills.is_empty());
        assert_eq!(host.logs.last().unwrap(), "stopping on signal 15");
    }

    #[test]
    fn a_killed_agent_is_named_by_its_signal_and_stop_reaches_its_successor() {
        let mut host = World {
            lifetimes: VecDeque::from([
                (5 * MS, Some(Status::Signal(libc::SIGKILL))),
                (Duration::ZERO, None),
            ]),
            ..World::default()
        }
        .stopped_at(1000, libc::SIGTERM);
        run(&mut host, &policy());
        assert!(
            host.logs
                .iter()
                .any(|l| l.starts_with("the serving agent (pid 101) was killed by signal 9")),
            "{:?}",
            host.logs
        );
        assert_eq!(host.spawned.len(), 2);
        assert_eq!(host.kills, [(102, libc::SIGTERM)]);
        // It stopped at once: the supervisor ends with its child.
        assert_eq!(host.clock, 1000 * MS);
    }

    #[test]
    fn stop_sends_sigterm_then_sigkill_after_the_grace_period() {
        let mut host = World {
            ignores_sigterm: true,
            ..World::living(&[(0, None)])
        }
        .stopped_at(100, libc::SIGTERM);
        run(&mut host, &policy());
        assert_eq!(host.kills, [(101, libc::SIGTERM), (101, libc::SIGKILL)]);
        assert_eq!(host.clock, 2100 * MS);
    }

    #[test]
    fn other_children_do_not_count_as_the_agent() {
        let mut host = World {
            strays: VecDeque::from([5 * MS, 6 * MS]),
            ..World::living(&[(0, None)])
        }
        .stopped_at(10, libc::SIGHUP);
        run(&mut host, &policy());
        assert_eq!(host.spawned.len(), 1);
        assert_eq!(host.kills, [(101, libc::SIGTERM)]);
    }

    #[test]
    fn a_failed_start_is_retried_with_back_off() {
        let mut host = World {
            spawn_failures: 2,
            ..World::living(&[(0, None)])
        }
        .stopped_at(1000, libc::SIGTERM);
        run(&mut host, &policy());
        assert_eq!(host.spawned, [(750 * MS, 101)]);
        assert_eq!(
            host.logs[0],
            "cannot start the serving agent: Resource temporarily unavailable (os error 11); \
             trying again in 250 ms"
        );
    }
}
