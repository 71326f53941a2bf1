//! The pinned toolchain's cross targets. guest-init is built for the musl targets
//! `rust-toolchain.toml` lists, and rustup installs a pinned toolchain without them, so every
//! command that builds guest-init (`artifacts`, `test`) adds the missing ones first.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use xshell::{Shell, cmd};

/// Adds the targets `rust-toolchain.toml` in `workspace` lists that the toolchain lacks, with
/// `rustup target add`, saying so; `offline` refuses instead (rustup downloads). The check is
/// one `rustc --print sysroot` and a directory lookup per target, so a machine that has them
/// pays about 0.1 s.
pub fn ensure_targets(sh: &Shell, workspace: &Path, offline: bool) -> anyhow::Result<()> {
    let toml_path = workspace.join("rust-toolchain.toml");
    let toml = std::fs::read_to_string(&toml_path)
        .with_context(|| format!("reading {}", toml_path.display()))?;
    // rustup resolves rust-toolchain.toml from the current directory, as for cargo.
    let _dir = sh.push_dir(workspace);
    ensure(&Rustup { sh }, &toolchain_targets(&toml), offline).map(drop)
}

/// The two toolchain commands, behind a seam so the decision is tested without rustup.
trait Toolchain {
    /// The sysroot of the rustc cargo builds with.
    fn sysroot(&self) -> anyhow::Result<PathBuf>;
    /// Installs the targets' standard libraries into that sysroot.
    fn add_targets(&self, targets: &[String]) -> anyhow::Result<()>;
}

struct Rustup<'a> {
    sh: &'a Shell,
}

impl Toolchain for Rustup<'_> {
    fn sysroot(&self) -> anyhow::Result<PathBuf> {
        let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
        let sysroot = cmd!(self.sh, "{rustc} --print sysroot")
            .quiet()
            .read()
            .context("asking rustc for its sysroot (is the Rust toolchain installed?)")?;
        Ok(PathBuf::from(sysroot))
    }

    fn add_targets(&self, targets: &[String]) -> anyhow::Result<()> {
        cmd!(self.sh, "rustup target add {targets...}")
            .run()
            .context("rustup target add")
    }
}

/// Adds the targets of `wanted` the toolchain lacks; returns them.
fn ensure(
    toolchain: &dyn Toolchain,
    wanted: &[String],
    offline: bool,
) -> anyhow::Result<Vec<String>> {
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let sysroot = toolchain.sysroot()?;
    let missing = missing_targets(wanted, &sysroot);
    if missing.is_empty() {
        return Ok(missing);
    }
    let (names, args) = (missing.join(", "), missing.join(" "));
    let sysroot = sysroot.display();
    if offline {
        bail!(
            "--offline: the toolchain at {sysroot} lacks the Rust target(s) {names} that \
             rust-toolchain.toml lists (guest-init is built for them); run `rustup target add \
             {args}` where there is network, or run without --offline to have it done"
        );
    }
    eprintln!(
        "adding the Rust target(s) {names} to the toolchain at {sysroot} (rust-toolchain.toml \
         lists them; guest-init is built for them)"
    );
    toolchain.add_targets(&missing).with_context(|| {
        format!(
            "adding the Rust target(s) {names} failed; install them where rustup can reach its \
             server with `rustup target add {args}` (without rustup, install their rust-std \
             component into {sysroot})"
        )
    })?;
    Ok(missing)
}

/// The `targets = [...]` array of a rust-toolchain.toml.
pub fn toolchain_targets(toml: &str) -> Vec<String> {
    let Some(line) = toml.lines().find(|l| l.trim_start().starts_with("targets")) else {
        return Vec::new();
    };
    line.split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// The targets of `wanted` whose standard library is not in `sysroot`
/// (`lib/rustlib/<target>/lib`, where rustup installs a target's rust-std).
pub fn missing_targets(wanted: &[String], sysroot: &Path) -> Vec<String> {
    wanted
        .iter()
        .filter(|target| !target_lib_dir(sysroot, target).is_dir())
        .cloned()
        .collect()
}

fn target_lib_dir(sysroot: &Path, target: &str) -> PathBuf {
    sysroot.join("lib/rustlib").join(target).join("lib")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_toolchain_targets() {
        let toml = "[toolchain]\nchannel = \"1.95.0\"\ntargets = [\"a-musl\", \"b-musl\"]\n";
        assert_eq!(toolchain_targets(toml), ["a-musl", "b-musl"]);
        assert!(toolchain_targets("[toolchain]\n").is_empty());
    }

    /// A sysroot in a temp dir; adding a target creates its library directory, as rustup does.
    struct FakeToolchain {
        sysroot: tempfile::TempDir,
        added: std::cell::RefCell<Vec<Vec<String>>>,
    }

    impl Toolchain for FakeToolchain {
        fn sysroot(&self) -> anyhow::Result<PathBuf> {
            Ok(self.sysroot.path().to_owned())
        }

        fn add_targets(&self, targets: &[String]) -> anyhow::Result<()> {
            for target in targets {
                std::fs::create_dir_all(target_lib_dir(self.sysroot.path(), target))?;
            }
            self.added.borrow_mut().push(targets.to_vec());
            Ok(())
        }
    }

    fn musl() -> Vec<String> {
        ["x86_64-unknown-linux-musl", "aarch64-unknown-linux-musl"]
            .map(str::to_owned)
            .to_vec()
    }

    #[test]
    fn a_fresh_toolchain_gets_the_missing_targets_once() {
        let toolchain = FakeToolchain {
            sysroot: tempfile::tempdir().unwrap(),
            added: Default::default(),
        };
        std::fs::create_dir_all(target_lib_dir(
            toolchain.sysroot.path(),
            "x86_64-unknown-linux-musl",
        ))
        .unwrap();
        let added = ensure(&toolchain, &musl(), false).unwrap();
        assert_eq!(added, ["aarch64-unknown-linux-musl"]);
        // The next run finds them and calls nothing.
        assert!(ensure(&toolchain, &musl(), false).unwrap().is_empty());
        assert_eq!(
            *toolchain.added.borrow(),
            [["aarch64-unknown-linux-musl"]],
            "rustup ran once, for the missing target only"
        );
    }

    #[test]
    fn offline_names_the_missing_targets_instead_of_downloading() {
        let toolchain = FakeToolchain {
            sysroot: tempfile::tempdir().unwrap(),
            added: Default::default(),
        };
        let err = format!("{:#}", ensure(&toolchain, &musl(), true).unwrap_err());
        assert!(
            err.contains("rustup target add x86_64-unknown-linux-musl aarch64-unknown-linux-musl"),
            "{err}"
        );
        assert!(err.contains("--offline"), "{err}");
        assert!(toolchain.added.borrow().is_empty());
    }

    #[test]
    fn only_targets_without_a_standard_library_are_missing() {
        let sysroot = tempfile::tempdir().unwrap();
        let wanted: Vec<String> = ["x86_64-unknown-linux-musl", "aarch64-unknown-linux-musl"]
            .map(str::to_owned)
            .to_vec();
        assert_eq!(
            missing_targets(&wanted, sysroot.path()),
            wanted,
            "a bare toolchain"
        );

        std::fs::create_dir_all(target_lib_dir(sysroot.path(), "x86_64-unknown-linux-musl"))
            .unwrap();
        // A target directory without its lib (a half-removed target) is still missing.
        std::fs::create_dir_all(
            sysroot
                .path()
                .join("lib/rustlib/aarch64-unknown-linux-musl"),
        )
        .unwrap();
        assert_eq!(
            missing_targets(&wanted, sysroot.path()),
            ["aarch64-unknown-linux-musl"]
        );

        std::fs::create_dir_all(target_lib_dir(sysroot.path(), "aarch64-unknown-linux-musl"))
            .unwrap();
        assert!(missing_targets(&wanted, sysroot.path()).is_empty());
    }
}
