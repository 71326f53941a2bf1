//! Kernel modules the initrd carries, loaded in the order the initrd builder wrote.
//!
//! `/lib/modules/load-order`: one module file per line, relative to `/` (for example
//! `lib/modules/6.1.0-56-cloud-amd64/kernel/drivers/virtio/virtio_ring.ko`), dependencies first.
//! Blank lines and lines starting with `#` are ignored. A missing file means the kernel has
//! everything built in (the Cloud Hypervisor kernels do).

use std::io;
use std::path::{Path, PathBuf};

use crate::syscalls::Syscalls;

pub const LOAD_ORDER: &str = "/lib/modules/load-order";

#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("cannot read the module load order {path}: {source}")]
    ReadLoadOrder { path: PathBuf, source: io::Error },
    #[error(
        "{path}:{line}: {entry:?} is not a relative path to a .ko file; \
         the initrd builder must write paths relative to /"
    )]
    BadEntry {
        path: PathBuf,
        line: usize,
        entry: String,
    },
    #[error("loading kernel module {module}: {source}")]
    Load { module: PathBuf, source: io::Error },
}

/// Parse the load-order file's text into absolute module paths.
pub fn parse_load_order(text: &str, path: &Path) -> Result<Vec<PathBuf>, ModuleError> {
    let mut modules = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let entry = raw.trim();
        if entry.is_empty() || entry.starts_with('#') {
            continue;
        }
        let relative = entry.trim_start_matches('/');
        if !relative.ends_with(".ko") || relative.split('/').any(|part| part == "..") {
            return Err(ModuleError::BadEntry {
                path: path.to_owned(),
                line: index + 1,
                entry: entry.to_owned(),
            });
        }
        modules.push(Path::new("/").join(relative));
    }
    Ok(modules)
}

/// What happened to each module, for the log.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Loaded,
    AlreadyLoaded,
    /// The driver found no hardware to bind (ENODEV): harmless, e.g. no ACPI on this machine.
    NoDevice,
}

pub fn load_all(sys: &dyn Syscalls, modules: &[PathBuf]) -> Result<Vec<Outcome>, ModuleError> {
    let mut outcomes = Vec::with_capacity(modules.len());
    for module in modules {
        let outcome = match sys.finit_module(module) {
            Ok(()) => Outcome::Loaded,
            Err(err) if err.raw_os_error() == Some(rustix::io::Errno::EXIST.raw_os_error()) => {
                Outcome::AlreadyLoaded
            }
            Err(err) if err.raw_os_error() == Some(rustix::io::Errno::NODEV.raw_os_error()) => {
                Outcome::NoDevice
            }
            Err(source) => {
                return Err(ModuleError::Load {
                    module: module.clone(),
                    source,
                });
            }
        };
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscalls::fake::{Call, Op, Recorder};

    fn finit(path: &str) -> Op {
        Op::FinitModule { path: path.into() }
    }

    #[test]
    fn parses_comments_blanks_and_relative_paths() {
        let text = "# virtio first\n\
                    lib/modules/6.1/kernel/drivers/virtio/virtio_ring.ko\n\
                    \n   \n\
                    /lib/modules/6.1/kernel/drivers/virtio/virtio.ko  \n\
                    lib/modules/6.1/kernel/fs/overlayfs/overlay.ko\n";
        let modules = parse_load_order(text, Path::new(LOAD_ORDER)).unwrap();
        assert_eq!(
            modules,
            [
                PathBuf::from("/lib/modules/6.1/kernel/drivers/virtio/virtio_ring.ko"),
                PathBuf::from("/lib/modules/6.1/kernel/drivers/virtio/virtio.ko"),
                PathBuf::from("/lib/modules/6.1/kernel/fs/overlayfs/overlay.ko"),
            ]
        );
    }

    #[test]
    fn rejects_bad_entries_with_line_numbers() {
        let err = parse_load_order("a.ko\nvirtio_blk\n", Path::new(LOAD_ORDER)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "/lib/modules/load-order:2: \"virtio_blk\" is not a relative path to a .ko file; \
             the initrd builder must write paths relative to /"
        );
        assert!(parse_load_order("../x.ko", Path::new(LOAD_ORDER)).is_err());
    }

    #[test]
    fn loads_in_order_and_tolerates_already_loaded_and_no_device() {
        let sys = Recorder::default();
        sys.fail(finit("/b.ko"), rustix::io::Errno::EXIST.raw_os_error());
        sys.fail(finit("/c.ko"), rustix::io::Errno::NODEV.raw_os_error());
        let modules = [
            PathBuf::from("/a.ko"),
            PathBuf::from("/b.ko"),
            PathBuf::from("/c.ko"),
        ];
        let outcomes = load_all(&sys, &modules).unwrap();
        assert_eq!(
            outcomes,
            [Outcome::Loaded, Outcome::AlreadyLoaded, Outcome::NoDevice]
        );
        assert_eq!(
            sys.calls(),
            modules
                .iter()
                .cloned()
                .map(Call::FinitModule)
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn other_errors_stop_with_the_module_named() {
        let sys = Recorder::default();
        sys.fail(finit("/a.ko"), rustix::io::Errno::NOEXEC.raw_os_error());
        let err = load_all(&sys, &[PathBuf::from("/a.ko"), PathBuf::from("/b.ko")]).unwrap_err();
        assert!(err.to_string().starts_with("loading kernel module /a.ko: "));
        assert_eq!(sys.calls().len(), 1);
    }
}
