//! Paths inside the image as the image sees them, before it is `/`: where a volume's `path`
//! really leads once the image's symbolic links are followed from the image's own root.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io;
use std::path::{Component, Path, PathBuf};

use crate::syscalls::Syscalls;

/// Symbolic links followed while resolving one volume path, as the kernel allows.
const MAX_LINKS: usize = 40;

/// `path` inside `root` as the image sees it: symbolic links are followed with `root` as `/`
/// (an absolute target starts again at `root`, `..` stops there), so a volume whose path
/// crosses a link in the image lands where the application looks, and never outside the image.
/// Components that do not exist yet are kept as they are (the mount point is created).
pub fn resolve_in_root(sys: &dyn Syscalls, root: &Path, path: &Path) -> io::Result<PathBuf> {
    let mut resolved = PathBuf::new();
    let mut pending: VecDeque<OsString> = parts(path).collect();
    let mut links = 0;
    while let Some(part) = pending.pop_front() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        let candidate = resolved.join(&part);
        match sys.read_link(&root.join(&candidate)) {
            Ok(target) => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(io::Error::from_raw_os_error(libc::ELOOP));
                }
                if target.is_absolute() {
                    resolved = PathBuf::new();
                }
                for part in parts(&target).collect::<Vec<_>>().into_iter().rev() {
                    pending.push_front(part);
                }
            }
            // Not a link, or not there yet.
            Err(_) => resolved = candidate,
        }
    }
    Ok(root.join(resolved))
}

/// The names and `..`s of a path, without its root and `.`s.
fn parts(path: &Path) -> impl Iterator<Item = OsString> + '_ {
    path.components().filter_map(|part| match part {
        Component::Normal(name) => Some(name.to_owned()),
        Component::ParentDir => Some("..".into()),
        Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscalls::fake::Recorder;

    #[test]
    fn volume_paths_follow_the_image_s_links_without_leaving_it() {
        let sys = Recorder::default();
        sys.add_link("/newroot/data", "/srv/data");
        sys.add_link("/newroot/var/run", "../run");
        sys.add_link("/newroot/escape", "../../../../etc");
        sys.add_link("/newroot/loop", "/loop");
        let root = Path::new("/newroot");
        let resolve = |path: &str| resolve_in_root(&sys, root, Path::new(path));
        assert_eq!(resolve("/data").unwrap(), Path::new("/newroot/srv/data"));
        assert_eq!(
            resolve("/data/cache").unwrap(),
            Path::new("/newroot/srv/data/cache")
        );
        assert_eq!(
            resolve("/var/run/app").unwrap(),
            Path::new("/newroot/run/app")
        );
        assert_eq!(resolve("/escape/x").unwrap(), Path::new("/newroot/etc/x"));
        assert_eq!(
            resolve("/plain/dir").unwrap(),
            Path::new("/newroot/plain/dir")
        );
        let err = resolve("/loop").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP));
    }
}
