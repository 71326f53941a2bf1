//! A pseudo-terminal for driving a command the way a user's terminal would, independent of
//! whatever terminal (if any) runs the tests: the command gets the terminal as its stdio and
//! controlling terminal, the test reads what it prints, types into it and resizes it (the
//! kernel then sends SIGWINCH to the command's foreground process group).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
use rustix::termios::{Winsize, tcsetwinsize};

/// A `sh -c` script for a command run on a terminal: prints `size ROWS COLS` and `ready`,
/// waits until its terminal is 50×132, prints `resized to 50 132` and exits with 4. Its wait
/// has no deadline: the test's wait for the line is the hang guard.
pub const FOLLOWS_A_RESIZE: &str = "echo size $(stty size); echo ready; \
     while [ \"$(stty size)\" != '50 132' ]; do sleep 0.1; done; \
     echo resized to $(stty size); exit 4";

/// What the terminal has shown so far, and whether its last user closed it.
type Screen = Arc<(Mutex<(Vec<u8>, bool)>, Condvar)>;

/// The controlling side of a pseudo-terminal.
pub struct Pty {
    master: OwnedFd,
    slave: PathBuf,
    screen: Screen,
}

impl Pty {
    /// A new terminal of `rows` × `cols`; what its commands print is collected from now on.
    pub fn open(rows: u16, cols: u16) -> anyhow::Result<Pty> {
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)
            .context("opening a pseudo-terminal (/dev/ptmx)")?;
        grantpt(&master).context("grantpt")?;
        unlockpt(&master).context("unlockpt")?;
        let slave = PathBuf::from(
            ptsname(&master, Vec::new())
                .context("ptsname")?
                .into_string()
                .context("a pty name that is not UTF-8")?,
        );
        let pty = Pty {
            master,
            slave,
            screen: Arc::default(),
        };
        pty.resize(rows, cols)?;
        let mut reader = File::from(pty.master.try_clone()?);
        let screen = Arc::clone(&pty.screen);
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // EIO once every holder of the terminal's other side has closed it.
            while let Ok(n @ 1..) = reader.read(&mut buf) {
                screen.0.lock().unwrap().0.extend_from_slice(&buf[..n]);
                screen.1.notify_all();
            }
            screen.0.lock().unwrap().1 = true;
            screen.1.notify_all();
        });
        Ok(pty)
    }

    /// Makes the terminal `command`'s stdin, stdout, stderr and controlling terminal, in a
    /// session of its own (so it is the terminal's foreground process group).
    pub fn attach(&self, command: &mut Command) -> anyhow::Result<()> {
        let open = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.slave)
                .with_context(|| format!("opening {}", self.slave.display()))
        };
        command
            .stdin(Stdio::from(open()?))
            .stdout(Stdio::from(open()?))
            .stderr(Stdio::from(open()?));
        // SAFETY: runs in the child between fork and exec, after stdio is set up; setsid and
        // ioctl are async-signal-safe system calls and nothing is allocated.
        unsafe {
            command.pre_exec(|| {
                rustix::process::setsid()?;
                rustix::process::ioctl_tiocsctty(rustix::stdio::stdin())?;
                Ok(())
            });
        }
        Ok(())
    }

    /// Sets the window size, as a terminal emulator does when its window is resized.
    pub fn resize(&self, rows: u16, cols: u16) -> anyhow::Result<()> {
        let size = Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        tcsetwinsize(self.master.as_fd(), size)
            .with_context(|| format!("resizing {} to {rows}x{cols}", self.slave.display()))
    }

    /// Types `bytes`.
    pub fn type_in(&self, bytes: &[u8]) -> anyhow::Result<()> {
        File::from(self.master.try_clone()?)
            .write_all(bytes)
            .with_context(|| format!("writing to {}", self.slave.display()))
    }

    /// Everything shown so far (with the terminal's `\r\n`s).
    pub fn screen(&self) -> String {
        String::from_utf8_lossy(&self.screen.0.lock().unwrap().0).into_owned()
    }

    /// Waits until the screen shows `needle`; fails once the terminal is closed without it,
    /// or after `timeout` (a hang guard).
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let (state, changed) = &*self.screen;
        let mut guard = state.lock().unwrap();
        loop {
            let shown = String::from_utf8_lossy(&guard.0);
            if shown.contains(needle) {
                return Ok(());
            }
            if guard.1 {
                bail!("the terminal closed without showing {needle:?}; it showed:\n{shown}");
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "the terminal did not show {needle:?} within {timeout:?}; it showed:\n{shown}"
                );
            }
            guard = changed.wait_timeout(guard, left).unwrap().0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_sees_the_size_a_resize_and_what_is_typed() {
        let pty = Pty::open(24, 80).unwrap();
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "stty size; echo ready; read line; echo got $line; stty size",
        ]);
        pty.attach(&mut cmd).unwrap();
        let mut child = cmd.spawn().unwrap();
        drop(cmd);
        let guard = Duration::from_secs(60);
        pty.wait_for("ready", guard).unwrap();
        assert!(pty.screen().contains("24 80"), "{}", pty.screen());
        pty.resize(50, 132).unwrap();
        pty.type_in(b"hello\n").unwrap();
        pty.wait_for("got hello", guard).unwrap();
        pty.wait_for("50 132", guard).unwrap();
        assert!(child.wait().unwrap().success());
    }
}
