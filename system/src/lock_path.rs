//! Which lock file the build embeds: `SYSTEM_ARTIFACTS_LOCK`, or the workspace's
//! `artifacts.lock`. Compiled into the build script (via `#[path]`); the crate includes it only
//! for its tests.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// The lock to embed, given the value of `SYSTEM_ARTIFACTS_LOCK` (if set) and the crate's
/// manifest dir. A relative value is refused: a build script runs in the crate's directory,
/// not where cargo was started, so it would silently name another file than the user meant.
pub fn resolve(var: Option<&OsStr>, manifest_dir: &Path) -> Result<PathBuf, String> {
    let Some(value) = var else {
        return Ok(normalize(&manifest_dir.join("../artifacts.lock")));
    };
    let path = Path::new(value);
    if value.is_empty() {
        return Err(
            "SYSTEM_ARTIFACTS_LOCK is set but empty; unset it to embed the workspace's \
             artifacts.lock, or set it to the absolute path of a lock"
                .into(),
        );
    }
    if path.is_relative() {
        return Err(format!(
            "SYSTEM_ARTIFACTS_LOCK=`{}` is a relative path; it must be absolute, because the \
             build script runs in {} (it would read {}), not where cargo was started. \
             Set it to an absolute path, e.g. SYSTEM_ARTIFACTS_LOCK=\"$PWD/{}\"",
            path.display(),
            manifest_dir.display(),
            normalize(&manifest_dir.join(path)).display(),
            path.display()
        ));
    }
    Ok(path.to_path_buf())
}

/// Resolves `..` lexically, so paths in messages read plainly.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_the_workspace_lock() {
        let path = resolve(None, Path::new("/ws/system")).unwrap();
        assert_eq!(path, Path::new("/ws/artifacts.lock"));
    }

    #[test]
    fn an_absolute_path_is_used_as_given() {
        let path = resolve(
            Some(OsStr::new("/etc/host/artifacts.lock")),
            Path::new("/ws/system"),
        );
        assert_eq!(path.unwrap(), Path::new("/etc/host/artifacts.lock"));
    }

    #[test]
    fn a_relative_path_is_refused_showing_where_it_would_lead() {
        let err = resolve(
            Some(OsStr::new("host/artifacts.lock")),
            Path::new("/ws/system"),
        )
        .unwrap_err();
        for needle in [
            "`host/artifacts.lock`",
            "absolute",
            "/ws/system/host/artifacts.lock",
            "$PWD/host/artifacts.lock",
        ] {
            assert!(err.contains(needle), "missing {needle} in: {err}");
        }
        assert!(resolve(Some(OsStr::new("")), Path::new("/ws/system")).is_err());
    }
}
