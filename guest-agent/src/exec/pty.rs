//! A pseudo-terminal for tty execs: the master side, non-blocking on the runtime, and the
//! slave the process gets as its controlling terminal.

use std::io;
use std::os::fd::OwnedFd;

use rustix::pty::OpenptFlags;
use rustix::termios::{SpecialCodeIndex, Winsize};
use tokio::io::unix::AsyncFd;

pub(crate) struct Pty {
    master: AsyncFd<OwnedFd>,
}

impl Pty {
    /// A new terminal pair with the given size (rows, cols); the slave is returned to become
    /// the process's stdin, stdout and stderr.
    pub(crate) fn open(size: (u16, u16)) -> io::Result<(Pty, OwnedFd)> {
        let flags = OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC;
        let master = rustix::pty::openpt(flags)?;
        rustix::pty::grantpt(&master)?;
        rustix::pty::unlockpt(&master)?;
        let slave = rustix::pty::ioctl_tiocgptpeer(&master, flags)?;
        set_size(&master, size)?;
        rustix::io::ioctl_fionbio(&master, true)?;
        // SAFETY: an OwnedFd keeps its descriptor open and unchanged until dropped.
        let master = unsafe { AsyncFd::register(master) }?;
        Ok((Pty { master }, slave))
    }

    /// Output of the terminal; 0 once every process holding the slave has closed it (the
    /// kernel reports EIO then).
    pub(crate) async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.master.readable().await?;
            match guard
                .try_io(|fd| rustix::io::read(fd.get_ref(), &mut *buf).map_err(io::Error::from))
            {
                Ok(Ok(n)) => return Ok(n),
                Ok(Err(err)) if err.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(Err(err)) => return Err(err),
                Err(_would_block) => continue,
            }
        }
    }

    pub(crate) async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.master.writable().await?;
            match guard.try_io(|fd| rustix::io::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(err)) => return Err(err),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    pub(crate) fn resize(&self, size: (u16, u16)) -> io::Result<()> {
        set_size(self.master.get_ref(), size)
    }

    /// The terminal's end-of-file character (usually Ctrl-D): a tty's "stdin close".
    pub(crate) fn eof_char(&self) -> u8 {
        rustix::termios::tcgetattr(self.master.get_ref())
            .map(|t| t.special_codes[SpecialCodeIndex::VEOF])
            .unwrap_or(4)
    }
}

fn set_size(fd: &OwnedFd, (rows, cols): (u16, u16)) -> io::Result<()> {
    let size = Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    rustix::termios::tcsetwinsize(fd, size).map_err(io::Error::from)
}
