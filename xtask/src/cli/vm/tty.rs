//! The local side of `vm exec`: stdin and the terminal's window size into the exec, and the
//! local terminal in raw mode while a `--tty` exec runs.
//!
//! The window size goes in the exec's start, and every later local resize (SIGWINCH) follows
//! as a resize request. [`feed`] is the logic; the input ([`ExecSink`]), the resize events
//! ([`WindowChanges`]) and the size reader are seams the tests replace.

use std::io::IsTerminal;
use std::os::fd::AsFd;

use anyhow::Context;
use guest_client::{ClientError, ExecInput};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::signal::unix::{Signal, SignalKind, signal};

/// A terminal's (rows, cols).
pub type WindowSize = (u16, u16);

/// The size of the local terminal: stdout's, else stdin's or stderr's (a piped stdout still
/// runs on a terminal). `None` when none is a terminal or it reports no size (0×0).
pub fn local_window_size() -> Option<WindowSize> {
    window_size_of(std::io::stdout())
        .or_else(|| window_size_of(std::io::stdin()))
        .or_else(|| window_size_of(std::io::stderr()))
}

fn window_size_of(fd: impl AsFd) -> Option<WindowSize> {
    let size = rustix::termios::tcgetwinsize(fd).ok()?;
    known((size.ws_row, size.ws_col))
}

/// A size of 0 rows or 0 columns is a terminal nobody sized (a fresh pty): not worth sending.
fn known((rows, cols): WindowSize) -> Option<WindowSize> {
    (rows > 0 && cols > 0).then_some((rows, cols))
}

/// The last size the guest was told; decides whether a new reading is worth a resize request
/// (a SIGWINCH may come without a change, and several may carry the same one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeFollower {
    sent: Option<WindowSize>,
}

impl SizeFollower {
    /// `sent`: the size the exec started with.
    pub fn new(sent: Option<WindowSize>) -> SizeFollower {
        SizeFollower { sent }
    }

    /// The size to send after a window change read `now`, or `None` when the guest already
    /// has it (or it is unknown).
    pub fn changed(&mut self, now: Option<WindowSize>) -> Option<WindowSize> {
        let now = now.and_then(known)?;
        if self.sent == Some(now) {
            return None;
        }
        self.sent = Some(now);
        Some(now)
    }
}

/// Where the exec's input goes: `guest-client`'s [`ExecInput`], or a recorder in tests.
pub trait ExecSink {
    async fn stdin(&mut self, data: &[u8]) -> Result<(), ClientError>;
    async fn close_stdin(&mut self) -> Result<(), ClientError>;
    async fn resize(&mut self, size: WindowSize) -> Result<(), ClientError>;
}

impl ExecSink for ExecInput {
    async fn stdin(&mut self, data: &[u8]) -> Result<(), ClientError> {
        self.write(data).await
    }

    async fn close_stdin(&mut self) -> Result<(), ClientError> {
        ExecInput::close_stdin(self).await
    }

    async fn resize(&mut self, (rows, cols): WindowSize) -> Result<(), ClientError> {
        ExecInput::resize(self, rows, cols).await
    }
}

/// Notices that the local window may have changed size.
pub trait WindowChanges {
    /// Waits for the next change; `false` when no more will come.
    async fn next(&mut self) -> bool;
}

/// SIGWINCH, which the kernel sends to a terminal's foreground process group on a resize.
pub struct Sigwinch(Signal);

impl Sigwinch {
    /// Listens from now on: call before reading the size the exec starts with, so that a
    /// resize between the two is not lost.
    pub fn listen() -> anyhow::Result<Sigwinch> {
        signal(SignalKind::window_change())
            .map(Sigwinch)
            .context("listening for SIGWINCH (the local terminal's resizes)")
    }
}

impl WindowChanges for Sigwinch {
    async fn next(&mut self) -> bool {
        self.0.recv().await.is_some()
    }
}

/// No window to follow (a pipe exec).
pub struct NoWindow;

impl WindowChanges for NoWindow {
    async fn next(&mut self) -> bool {
        false
    }
}

/// Moves `stdin` into the exec (and its end as a stdin close) and, for each window change,
/// the new size from `read_size` as a resize request when it differs from what the guest has.
/// Resizes keep flowing after stdin's end. Returns when both are done, or on the first send
/// that fails (the command has exited; its exit code is what matters).
pub async fn feed(
    sink: &mut impl ExecSink,
    mut stdin: impl AsyncRead + Unpin,
    mut changes: impl WindowChanges,
    mut read_size: impl FnMut() -> Option<WindowSize>,
    mut follower: SizeFollower,
) -> Result<(), ClientError> {
    let mut buf = vec![0u8; 32 << 10];
    let (mut reading, mut following) = (true, true);
    while reading || following {
        tokio::select! {
            read = stdin.read(&mut buf), if reading => {
                // A local read error ends the input like EOF: the guest sees its stdin close.
                match read.unwrap_or(0) {
                    0 => {
                        reading = false;
                        sink.close_stdin().await?;
                    }
                    n => sink.stdin(&buf[..n]).await?,
                }
            }
            more = changes.next(), if following => {
                following = more;
                if let Some(size) = more.then(&mut read_size).and_then(|now| follower.changed(now)) {
                    sink.resize(size).await?;
                }
            }
        }
    }
    Ok(())
}

/// The local terminal in raw mode while a tty exec runs (keys go to the guest as typed);
/// restored when dropped.
pub struct RawMode(rustix::termios::Termios);

impl RawMode {
    /// Raw mode when stdin is a terminal; `None` otherwise (nothing to change).
    pub fn enter_if_terminal() -> anyhow::Result<Option<RawMode>> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Ok(None);
        }
        let saved = rustix::termios::tcgetattr(&stdin).context("reading the terminal's mode")?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw)
            .context("setting the terminal to raw mode")?;
        Ok(Some(RawMode(saved)))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin(),
            rustix::termios::OptionalActions::Now,
            &self.0,
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::io::AsyncWriteExt;
    use tokio::sync::mpsc;

    use super::*;

    #[test]
    fn only_a_new_known_size_is_sent() {
        let mut follower = SizeFollower::new(Some((24, 80)));
        assert_eq!(follower.changed(Some((24, 80))), None, "unchanged");
        assert_eq!(follower.changed(Some((50, 132))), Some((50, 132)));
        assert_eq!(follower.changed(Some((50, 132))), None, "sent already");
        assert_eq!(follower.changed(None), None, "no terminal any more");
        assert_eq!(follower.changed(Some((0, 0))), None, "an unsized terminal");
        assert_eq!(
            follower.changed(Some((24, 80))),
            Some((24, 80)),
            "back again"
        );

        let mut unsized_start = SizeFollower::new(None);
        assert_eq!(unsized_start.changed(Some((30, 100))), Some((30, 100)));
    }

    #[derive(Debug, PartialEq, Eq)]
    enum Sent {
        Stdin(Vec<u8>),
        CloseStdin,
        Resize(WindowSize),
    }

    /// Hands each request to the test as it is sent.
    struct Recorder(mpsc::UnboundedSender<Sent>);

    impl ExecSink for Recorder {
        async fn stdin(&mut self, data: &[u8]) -> Result<(), ClientError> {
            let _ = self.0.send(Sent::Stdin(data.to_vec()));
            Ok(())
        }
        async fn close_stdin(&mut self) -> Result<(), ClientError> {
            let _ = self.0.send(Sent::CloseStdin);
            Ok(())
        }
        async fn resize(&mut self, size: WindowSize) -> Result<(), ClientError> {
            let _ = self.0.send(Sent::Resize(size));
            Ok(())
        }
    }

    /// Window changes the test triggers, as SIGWINCH would.
    struct Changes(mpsc::UnboundedReceiver<()>);

    impl WindowChanges for Changes {
        async fn next(&mut self) -> bool {
            self.0.recv().await.is_some()
        }
    }

    /// The next request sent; a hang guard, not a timing assertion.
    async fn next(sent: &mut mpsc::UnboundedReceiver<Sent>) -> Option<Sent> {
        tokio::time::timeout(std::time::Duration::from_secs(60), sent.recv())
            .await
            .expect("the feed sent nothing within 60 s")
    }

    #[tokio::test]
    async fn a_window_change_becomes_a_resize_request_between_stdin_and_after_its_end() {
        let (sent_tx, mut sent) = mpsc::unbounded_channel();
        let (change, changes) = mpsc::unbounded_channel();
        let (mut keyboard, stdin) = tokio::io::duplex(64);
        let size = Arc::new(Mutex::new(Some((24, 80))));
        let read_size = {
            let size = Arc::clone(&size);
            move || *size.lock().unwrap()
        };
        let mut recorder = Recorder(sent_tx);
        let feeding = feed(
            &mut recorder,
            stdin,
            Changes(changes),
            read_size,
            SizeFollower::new(Some((24, 80))),
        );
        let script = async {
            keyboard.write_all(b"ls\r").await.unwrap();
            assert_eq!(next(&mut sent).await, Some(Sent::Stdin(b"ls\r".to_vec())));

            // The terminal is resized: the guest is told.
            *size.lock().unwrap() = Some((50, 132));
            change.send(()).unwrap();
            assert_eq!(next(&mut sent).await, Some(Sent::Resize((50, 132))));

            // A change that is none, then a real one: only the real one is sent.
            change.send(()).unwrap();
            *size.lock().unwrap() = Some((40, 100));
            change.send(()).unwrap();
            assert_eq!(next(&mut sent).await, Some(Sent::Resize((40, 100))));

            // After stdin's end, resizes still reach the guest.
            drop(keyboard);
            assert_eq!(next(&mut sent).await, Some(Sent::CloseStdin));
            *size.lock().unwrap() = Some((10, 20));
            change.send(()).unwrap();
            assert_eq!(next(&mut sent).await, Some(Sent::Resize((10, 20))));
            drop(change);
        };
        let (fed, ()) = tokio::join!(feeding, script);
        fed.unwrap();
        drop(recorder);
        assert_eq!(sent.recv().await, None, "nothing more was sent");
    }

    #[tokio::test]
    async fn without_a_window_the_feed_ends_with_stdin() {
        let (sent_tx, mut sent) = mpsc::unbounded_channel();
        let mut recorder = Recorder(sent_tx);
        let stdin: &[u8] = b"input";
        feed(
            &mut recorder,
            stdin,
            NoWindow,
            || panic!("no window to read"),
            SizeFollower::new(None),
        )
        .await
        .unwrap();
        drop(recorder);
        assert_eq!(sent.recv().await, Some(Sent::Stdin(b"input".to_vec())));
        assert_eq!(sent.recv().await, Some(Sent::CloseStdin));
        assert_eq!(sent.recv().await, None);
    }

    /// The production source of window changes: a SIGWINCH to this process is one.
    #[tokio::test]
    async fn sigwinch_is_a_window_change() {
        let mut changes = Sigwinch::listen().unwrap();
        // SIGWINCH's default action is to ignore it, so the test process is safe either way.
        rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::WINCH)
            .unwrap();
        assert!(changes.next().await);
    }
}
