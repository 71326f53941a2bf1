//! Writing what a guest sends, confined to a destination directory.
//!
//! Every path is checked before use: relative, `/`-separated normal components only (no
//! `..`, no `.`, no empty component, no NUL). It is then reached from the destination's own
//! descriptor one component at a time with `O_NOFOLLOW`, so no symlink is ever traversed,
//! including one the same transfer created a moment ago. Files are written to a temporary
//! name in their directory and renamed over the final name (a rename replaces a symlink, it
//! never follows it). Link targets must stay inside the destination, lexically.
//! Modes lose set-id and sticky bits; owners are applied only when asked.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{AtFlags, Mode, OFlags, Timespec, Timestamps};
use rustix::io::Errno;

const MAX_PATH: usize = 4096;
const MAX_COMPONENT: usize = 255;

/// Why a path was refused or failed.
pub type Reason = String;

/// The components of a guest path, or why it is refused.
pub fn check_path(path: &str) -> Result<Vec<&str>, Reason> {
    if path.is_empty() {
        return Err("empty path".into());
    }
    if path.len() > MAX_PATH {
        return Err(format!("path longer than {MAX_PATH} bytes"));
    }
    if path.contains('\0') {
        return Err("path contains a NUL byte".into());
    }
    if path.starts_with('/') {
        return Err("absolute path: every path from the guest must be relative".into());
    }
    let components: Vec<&str> = path.split('/').collect();
    for component in &components {
        match *component {
            "" => return Err("empty path component".into()),
            "." | ".." => return Err(format!("`{component}` component: paths must not climb")),
            c if c.len() > MAX_COMPONENT => {
                return Err(format!("component longer than {MAX_COMPONENT} bytes"));
            }
            _ => {}
        }
    }
    Ok(components)
}

/// Whether a symlink at `components` pointing to `target` stays inside the destination.
pub fn check_link_target(components: &[&str], target: &str) -> Result<(), Reason> {
    if target.is_empty() || target.contains('\0') {
        return Err("empty or NUL-containing link target".into());
    }
    if target.starts_with('/') {
        return Err(format!("absolute link target {target:?}"));
    }
    // `..` only as a prefix: after a name, the name may itself be a link (to `.`, say), and
    // the kernel climbs from where that link leads, not from where it sits. The link's own
    // directory is a real one (reached without following links), so counting the prefix
    // against its depth is exact.
    let mut depth = components.len() as i64 - 1;
    let mut descended = false;
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." if descended => {
                return Err(format!(
                    "link target {target:?} climbs after a name (`..` only as a prefix)"
                ));
            }
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return Err(format!(
                        "link target {target:?} leads outside the destination"
                    ));
                }
            }
            _ => descended = true,
        }
    }
    Ok(())
}

/// The destination directory, held open: every operation starts from this descriptor.
pub struct Destination {
    root: OwnedFd,
    preserve_owner: bool,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn errno(what: &str, err: Errno) -> Reason {
    match err {
        Errno::LOOP | Errno::NOTDIR => {
            format!("{what}: a component is a symlink or not a directory; refusing to follow it")
        }
        err => format!("{what}: {}", std::io::Error::from(err)),
    }
}

impl Destination {
    /// Opens (creating it if needed) the directory everything is written under.
    pub fn open(dir: &Path, preserve_owner: bool) -> std::io::Result<Destination> {
        std::fs::create_dir_all(dir)?;
        let root = rustix::fs::open(
            dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Destination {
            root,
            preserve_owner,
        })
    }

    /// The directory holding the last component, reached without following any symlink;
    /// missing directories on the way are created.
    fn parent(&self, components: &[&str]) -> Result<OwnedFd, Reason> {
        let mut dir = self.root.try_clone().map_err(|e| e.to_string())?;
        for component in &components[..components.len() - 1] {
            dir = open_dir(&dir, component, true)?;
        }
        Ok(dir)
    }

    pub fn create_dir(&self, components: &[&str]) -> Result<(), Reason> {
        let parent = self.parent(components)?;
        open_dir(&parent, components[components.len() - 1], true).map(drop)
    }

    /// Mode, owner and mtime of a directory: applied after its contents are written (a
    /// read-only mode would stop them, and writing them changes the mtime).
    pub fn finish_dir(
        &self,
        components: &[&str],
        mode: u32,
        uid: u32,
        gid: u32,
        mtime: i64,
    ) -> Result<(), Reason> {
        let parent = self.parent(components)?;
        let dir = open_dir(&parent, components[components.len() - 1], false)?;
        self.apply(&dir, mode, uid, gid, mtime)
    }

    /// A file under a temporary name beside its destination.
    pub fn create_file(&self, components: &[&str]) -> Result<PendingFile, Reason> {
        let parent = self.parent(components)?;
        let name = components[components.len() - 1].to_owned();
        let temp = temp_name(&name);
        let fd = rustix::fs::openat(
            &parent,
            temp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| errno("creating a temporary file", e))?;
        Ok(PendingFile {
            parent,
            name,
            temp,
            file: Some(File::from(fd)),
        })
    }

    pub fn commit_file(
        &self,
        mut file: PendingFile,
        mode: u32,
        uid: u32,
        gid: u32,
        mtime: i64,
    ) -> Result<(), Reason> {
        let handle = file.file.take().expect("open until committed");
        self.apply(&handle.as_fd(), mode, uid, gid, mtime)?;
        handle.sync_all().map_err(|e| format!("fsync: {e}"))?;
        drop(handle);
        rustix::fs::renameat(
            &file.parent,
            file.temp.as_str(),
            &file.parent,
            file.name.as_str(),
        )
        .map_err(|e| errno("renaming into place", e))?;
        file.temp.clear();
        let _ = rustix::fs::fsync(&file.parent);
        Ok(())
    }

    pub fn create_symlink(&self, components: &[&str], target: &str) -> Result<(), Reason> {
        check_link_target(components, target)?;
        let parent = self.parent(components)?;
        let name = components[components.len() - 1];
        let temp = temp_name(name);
        rustix::fs::symlinkat(target, &parent, temp.as_str()).map_err(|e| errno("symlink", e))?;
        rustix::fs::renameat(&parent, temp.as_str(), &parent, name).map_err(|e| {
            let _ = rustix::fs::unlinkat(&parent, temp.as_str(), AtFlags::empty());
            errno("renaming into place", e)
        })
    }

    fn apply(
        &self,
        fd: &impl AsFd,
        mode: u32,
        uid: u32,
        gid: u32,
        mtime: i64,
    ) -> Result<(), Reason> {
        if self.preserve_owner {
            rustix::fs::fchown(
                fd,
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
            )
            .map_err(|e| errno("chown", e))?;
        }
        rustix::fs::fchmod(fd, Mode::from_raw_mode(mode & 0o777)).map_err(|e| errno("chmod", e))?;
        let time = Timespec {
            tv_sec: mtime,
            tv_nsec: 0,
        };
        let times = Timestamps {
            last_access: time,
            last_modification: time,
        };
        rustix::fs::futimens(fd, &times).map_err(|e| errno("setting mtime", e))
    }
}

fn temp_name(name: &str) -> String {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let short: String = name.chars().take(100).collect();
    format!(".{short}.guest-client-{}-{n}", std::process::id())
}

/// `name` inside `dir` as a directory, never through a symlink; created when asked.
fn open_dir(dir: &OwnedFd, name: &str, create: bool) -> Result<OwnedFd, Reason> {
    if create {
        match rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(err) => return Err(errno("mkdir", err)),
        }
    }
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| errno(&format!("opening directory {name:?}"), e))
}

/// A file being received; its temporary is removed unless committed.
pub struct PendingFile {
    parent: OwnedFd,
    name: String,
    temp: String,
    file: Option<File>,
}

impl PendingFile {
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), Reason> {
        self.file
            .as_mut()
            .expect("open until committed")
            .write_all(bytes)
            .map_err(|e| format!("write: {e}"))
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.temp.is_empty() {
            let _ = rustix::fs::unlinkat(&self.parent, self.temp.as_str(), AtFlags::empty());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_be_relative_and_not_climb() {
        assert_eq!(check_path("a/b/c").unwrap(), ["a", "b", "c"]);
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a/./b",
            "a//b",
            "a/",
            "a\0b",
        ] {
            assert!(check_path(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn link_targets_stay_inside() {
        assert!(check_link_target(&["root", "link"], "file").is_ok());
        assert!(check_link_target(&["root", "sub", "link"], "../file").is_ok());
        assert!(check_link_target(&["root", "link"], "../x").is_ok()); // root/link -> x at top
        assert!(check_link_target(&["root", "link"], "../../x").is_err());
        assert!(check_link_target(&["link"], "../x").is_err());
        assert!(check_link_target(&["root", "link"], "/etc/passwd").is_err());
        assert!(check_link_target(&["root", "link"], "a/../../../x").is_err());
        // `a` may be a link to `.`: climbing after it could leave the destination.
        assert!(check_link_target(&["root", "link"], "a/..").is_err());
    }
}
