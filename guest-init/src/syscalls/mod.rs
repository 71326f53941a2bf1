//! The seam between boot phases and the kernel.
//!
//! Every mount, module load, root switch and device probe the phases make goes through
//! [`Syscalls`]. Production uses [`Linux`]; unit tests use [`fake::Recorder`], which records the
//! calls so the order and flags of a sequence are checked without root.

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

pub use rustix::mount::MountFlags;

pub trait Syscalls {
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
    fn unmount(&self, target: &Path) -> io::Result<()>;
    fn mkdir_all(&self, path: &Path) -> io::Result<()>;
    fn chdir(&self, path: &Path) -> io::Result<()>;
    fn chroot(&self, path: &Path) -> io::Result<()>;
    /// Load a kernel module from a file.
    fn finit_module(&self, path: &Path) -> io::Result<()>;
    fn sethostname(&self, name: &str) -> io::Result<()>;
    fn exists(&self, path: &Path) -> bool;
    /// Monotonic clock, for bounded waits.
    fn now(&self) -> Duration;
    fn sleep(&self, duration: Duration);
}

/// The real kernel, through rustix (raw syscalls, no C).
pub struct Linux {
    epoch: Instant,
}

impl Linux {
    pub fn new() -> Self {
        Linux {
            epoch: Instant::now(),
        }
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
        let file = std::fs::File::open(path)?;
        rustix::system::finit_module(&file, c"", 0)?;
        Ok(())
    }

    fn sethostname(&self, name: &str) -> io::Result<()> {
        rustix::system::sethostname(name.as_bytes())?;
        Ok(())
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    fn sleep(&self, duration: Duration) {
        std::thread::sleep(duration);
    }
}

#[cfg(test)]
pub mod fake {
    //! A recording double: every call is appended to `calls`; paths in `existing` exist;
    //! `failures` makes a call fail with an errno; `sleep` advances a fake clock.

    use super::*;
    use std::cell::{Cell, RefCell};
    use std::collections::{HashMap, HashSet};
    use std::path::PathBuf;

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
        Unmount(PathBuf),
        MkdirAll(PathBuf),
        Chdir(PathBuf),
        Chroot(PathBuf),
        FinitModule(PathBuf),
        Sethostname(String),
    }

    #[derive(Default)]
    pub struct Recorder {
        pub calls: RefCell<Vec<Call>>,
        pub existing: RefCell<HashSet<PathBuf>>,
        /// Key: a call's target (mount target, module path, ...); value: errno to fail with.
        /// For mounts the key is `"<target>:<fstype>"` so one filesystem type can fail.
        pub failures: RefCell<HashMap<String, i32>>,
        pub clock: Cell<Duration>,
        /// Paths that appear once the fake clock reaches the given time.
        pub appears_at: RefCell<Vec<(PathBuf, Duration)>>,
    }

    impl Recorder {
        pub fn with_existing(paths: &[&str]) -> Self {
            let recorder = Recorder::default();
            for path in paths {
                recorder.existing.borrow_mut().insert(PathBuf::from(path));
            }
            recorder
        }

        pub fn fail(&self, key: &str, errno: i32) {
            self.failures.borrow_mut().insert(key.to_owned(), errno);
        }

        pub fn calls(&self) -> Vec<Call> {
            self.calls.borrow().clone()
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

        fn check(&self, key: &str) -> io::Result<()> {
            match self.failures.borrow().get(key) {
                Some(errno) => Err(io::Error::from_raw_os_error(*errno)),
                None => Ok(()),
            }
        }

        fn record(&self, call: Call) {
            self.calls.borrow_mut().push(call);
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
            self.record(Call::Mount {
                source: source.to_owned(),
                target: target.to_owned(),
                fstype: fstype.to_owned(),
                flags,
                data: data.to_owned(),
            });
            self.check(&format!("{}:{fstype}", target.display()))
        }

        fn mount_move(&self, from: &Path, to: &Path) -> io::Result<()> {
            self.record(Call::MountMove {
                from: from.to_owned(),
                to: to.to_owned(),
            });
            self.check(&from.display().to_string())
        }

        fn make_rprivate(&self, target: &Path) -> io::Result<()> {
            self.record(Call::MakeRprivate(target.to_owned()));
            Ok(())
        }

        fn unmount(&self, target: &Path) -> io::Result<()> {
            self.record(Call::Unmount(target.to_owned()));
            Ok(())
        }

        fn mkdir_all(&self, path: &Path) -> io::Result<()> {
            self.record(Call::MkdirAll(path.to_owned()));
            self.existing.borrow_mut().insert(path.to_owned());
            Ok(())
        }

        fn chdir(&self, path: &Path) -> io::Result<()> {
            self.record(Call::Chdir(path.to_owned()));
            Ok(())
        }

        fn chroot(&self, path: &Path) -> io::Result<()> {
            self.record(Call::Chroot(path.to_owned()));
            Ok(())
        }

        fn finit_module(&self, path: &Path) -> io::Result<()> {
            self.record(Call::FinitModule(path.to_owned()));
            self.check(&path.display().to_string())
        }

        fn sethostname(&self, name: &str) -> io::Result<()> {
            self.record(Call::Sethostname(name.to_owned()));
            Ok(())
        }

        fn exists(&self, path: &Path) -> bool {
            if self.existing.borrow().contains(path) {
                return true;
            }
            let now = self.clock.get();
            self.appears_at
                .borrow()
                .iter()
                .any(|(appearing, at)| appearing == path && *at <= now)
        }

        fn now(&self) -> Duration {
            self.clock.get()
        }

        fn sleep(&self, duration: Duration) {
            self.clock.set(self.clock.get() + duration);
        }
    }
}
