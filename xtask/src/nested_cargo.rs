//! Cargo started from inside cargo: `cargo xtask` is itself a `cargo run`, and the tests and
//! benchmarks are `cargo test`/`cargo bench` children. Cargo gives the program it runs variables
//! that describe that package (`CARGO_PKG_NAME=xtask`, `CARGO_MANIFEST_DIR=…/xtask`, …), and a
//! nested cargo inherits them. Cargo reruns a build script whenever a variable it declared with
//! `rerun-if-env-changed` differs from the last build's, and ring's declares `CARGO_PKG_*` and
//! `CARGO_MANIFEST_DIR`: every switch between a plain `cargo xtask …` and a cargo that xtask
//! started rebuilt ring and everything above it (rustls, reqwest, xtask; ~15 s each way).
//! Nested runs therefore get the environment a shell would have given them: `cargo xtask`
//! forgets the variables as it starts, and the tests start cargo through [`cargo`].

use std::ffi::{OsStr, OsString};
use std::process::Command;

/// Whether cargo sets `name` for the package it runs, tests or builds a script of. `CARGO` (the
/// cargo binary) stays: the nested run should use the same cargo.
fn set_for_the_running_package(name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    const PREFIXES: [&str; 3] = ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_BIN_EXE_"];
    const NAMES: [&str; 6] = [
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
        "OUT_DIR",
    ];
    PREFIXES.iter().any(|prefix| name.starts_with(prefix)) || NAMES.contains(&name)
}

/// The package variables in this process's environment.
fn package_vars() -> Vec<OsString> {
    std::env::vars_os()
        .map(|(name, _)| name)
        .filter(|name| set_for_the_running_package(name))
        .collect()
}

/// Drops the package variables from this process's own environment, so that every command it
/// starts, through xshell or `Command`, inherits a shell's environment. `cargo xtask` calls it
/// first thing in `main`.
///
/// # Safety
/// No other thread may exist yet (the environment is not synchronized).
pub unsafe fn forget_the_running_package() {
    for name in package_vars() {
        // SAFETY: single-threaded, as the caller promises.
        unsafe { std::env::remove_var(name) };
    }
}

/// `command` without the package variables: for processes that keep theirs (the tests).
pub fn scrub(command: &mut Command) -> &mut Command {
    for name in package_vars() {
        command.env_remove(name);
    }
    command
}

/// `cargo` (the one running us, when we run under cargo) without the package variables.
pub fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    scrub(&mut command);
    command
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_package_s_variables_go_and_the_user_s_stay() {
        for name in [
            "CARGO_PKG_NAME",
            "CARGO_PKG_VERSION_MAJOR",
            "CARGO_MANIFEST_DIR",
            "CARGO_MANIFEST_PATH",
            "CARGO_BIN_EXE_xtask",
            "CARGO_CRATE_NAME",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_TARGET_TMPDIR",
            "OUT_DIR",
        ] {
            assert!(set_for_the_running_package(OsStr::new(name)), "{name}");
        }
        for name in [
            "CARGO",
            "CARGO_HOME",
            "CARGO_TARGET_DIR",
            "CARGO_ENCODED_RUSTFLAGS",
            "CARGO_NET_OFFLINE",
            "RUSTFLAGS",
            "PATH",
        ] {
            assert!(!set_for_the_running_package(OsStr::new(name)), "{name}");
        }
    }

    /// This test runs under `cargo test`, which sets the package variables for it.
    #[test]
    fn a_scrubbed_command_runs_without_what_cargo_test_set() {
        assert!(std::env::var_os("CARGO_PKG_NAME").is_some());
        let out = scrub(&mut Command::new("env")).output().unwrap();
        let env = String::from_utf8(out.stdout).unwrap();
        assert!(!env.contains("CARGO_PKG_NAME="), "{env}");
        assert!(!env.contains("CARGO_MANIFEST_DIR="), "{env}");
        assert!(env.contains("PATH="), "{env}");
        let cargo = cargo();
        let removed: Vec<_> = cargo.get_envs().filter(|(_, v)| v.is_none()).collect();
        assert!(
            removed.iter().any(|(name, _)| *name == "CARGO_PKG_NAME"),
            "{removed:?}"
        );
    }
}
