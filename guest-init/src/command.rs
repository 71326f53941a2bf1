//! The application's command line: argv, PATH lookup and environment, like a container
//! runtime. Runs after the root switch, so `/` is the image.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CommandError {
    #[error("no command: both `entrypoint` and `cmd` are empty in config.json")]
    Empty,
    #[error("command {command:?} not found in PATH {path:?} of the image")]
    NotFound { command: String, path: String },
    #[error("command {command:?} resolves to {resolved}, which is not an executable file")]
    NotExecutable { command: String, resolved: PathBuf },
}

/// The environment the application sees: config `env` over PATH and HOME defaults.
pub fn environment(config_env: &BTreeMap<String, String>, home: &str) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert("PATH".to_owned(), DEFAULT_PATH.to_owned());
    env.insert("HOME".to_owned(), home.to_owned());
    for (name, value) in config_env {
        env.insert(name.clone(), value.clone());
    }
    env
}

/// Find the program for `argv0` like execvp: names with a `/` are used as they are
/// (relative to `workdir`), others are searched in `path`. `root` prefixes every lookup
/// (`/` in production; a fixture directory in tests). Returns the path inside the root.
pub fn resolve(
    argv0: &str,
    path: &str,
    workdir: &Path,
    root: &Path,
) -> Result<PathBuf, CommandError> {
    if argv0.is_empty() {
        return Err(CommandError::Empty);
    }
    if argv0.contains('/') {
        let candidate = workdir.join(argv0);
        return if is_executable(&inside(root, &candidate)) {
            Ok(candidate)
        } else {
            Err(CommandError::NotExecutable {
                command: argv0.to_owned(),
                resolved: candidate,
            })
        };
    }
    for dir in path.split(':') {
        // An empty PATH entry means the working directory, as in execvp.
        let dir = if dir.is_empty() {
            workdir
        } else {
            Path::new(dir)
        };
        let candidate = workdir.join(dir).join(argv0);
        if is_executable(&inside(root, &candidate)) {
            return Ok(candidate);
        }
    }
    Err(CommandError::NotFound {
        command: argv0.to_owned(),
        path: path.to_owned(),
    })
}

fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn fixture_root() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        for (path, mode) in [
            ("usr/bin/env", 0o755),
            ("bin/sh", 0o755),
            ("usr/local/bin/app", 0o755),
            ("usr/bin/app", 0o755),
            ("usr/bin/readme", 0o644),
            ("srv/run.sh", 0o755),
        ] {
            let full = root.path().join(path);
            fs::create_dir_all(full.parent().unwrap()).unwrap();
            fs::write(&full, "#!/bin/sh\n").unwrap();
            fs::set_permissions(&full, fs::Permissions::from_mode(mode)).unwrap();
        }
        fs::create_dir_all(root.path().join("usr/sbin/dir")).unwrap();
        root
    }

    #[test]
    fn path_search_in_order_inside_the_root() {
        let root = fixture_root();
        let found = resolve("app", DEFAULT_PATH, Path::new("/"), root.path()).unwrap();
        assert_eq!(found, PathBuf::from("/usr/local/bin/app"));
        let found = resolve("sh", DEFAULT_PATH, Path::new("/"), root.path()).unwrap();
        assert_eq!(found, PathBuf::from("/bin/sh"));
        let found = resolve("app", "/usr/bin", Path::new("/"), root.path()).unwrap();
        assert_eq!(found, PathBuf::from("/usr/bin/app"));
    }

    #[test]
    fn skips_non_executables_and_directories() {
        let root = fixture_root();
        let err = resolve("readme", DEFAULT_PATH, Path::new("/"), root.path()).unwrap_err();
        assert_eq!(
            err,
            CommandError::NotFound {
                command: "readme".into(),
                path: DEFAULT_PATH.into()
            }
        );
        assert!(resolve("dir", DEFAULT_PATH, Path::new("/"), root.path()).is_err());
    }

    #[test]
    fn slash_paths_absolute_and_relative_to_workdir() {
        let root = fixture_root();
        let found = resolve("/usr/bin/env", DEFAULT_PATH, Path::new("/"), root.path()).unwrap();
        assert_eq!(found, PathBuf::from("/usr/bin/env"));
        let found = resolve("./run.sh", DEFAULT_PATH, Path::new("/srv"), root.path()).unwrap();
        assert_eq!(found, PathBuf::from("/srv/./run.sh"));
        let err =
            resolve("/usr/bin/readme", DEFAULT_PATH, Path::new("/"), root.path()).unwrap_err();
        assert!(err.to_string().contains("not an executable file"));
    }

    #[test]
    fn empty_and_missing() {
        let root = fixture_root();
        assert_eq!(
            resolve("", DEFAULT_PATH, Path::new("/"), root.path()),
            Err(CommandError::Empty)
        );
        let err = resolve("nginx", DEFAULT_PATH, Path::new("/"), root.path()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("command \"nginx\" not found in PATH \"{DEFAULT_PATH}\" of the image")
        );
    }

    #[test]
    fn environment_layers_config_over_defaults() {
        let mut config = BTreeMap::new();
        config.insert("PATH".to_owned(), "/opt/bin".to_owned());
        config.insert("LANG".to_owned(), "C.UTF-8".to_owned());
        let env = environment(&config, "/home/app");
        assert_eq!(env["PATH"], "/opt/bin");
        assert_eq!(env["HOME"], "/home/app");
        assert_eq!(env["LANG"], "C.UTF-8");
        let env = environment(&BTreeMap::new(), "/root");
        assert_eq!(env["PATH"], DEFAULT_PATH);
    }
}
