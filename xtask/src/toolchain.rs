//! The pinned toolchain's cross targets. guest-init is built for the musl targets
//! `rust-toolchain.toml` lists, and rustup installs a pinned toolchain without them, so every
//! command that builds guest-init (`artifacts`, `test`) adds the missing ones first.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use xshell::{Shell, cmd};

/// Adds the targets `rust-toolchain.toml` in `workspace` lists that the toolchain lacks, with
/// `rustup target add`, saying so; `offline` refuses instead (rustup downloads). The check is one `rustc --print sysroot` and a directory
/// lookup per target, so a machine that has them pays a few milliseconds.
pub fn ensure_targets(sh: &Shell, workspace: &Path, offline: bool) -> anyhow::Result<()> {
    let toml_path = workspace.join("rust-toolchain.toml");
    let toml = std::fs::read_to_string(&toml_path)
        .with_context(|| format!("reading {}", toml_path.display()))?;
    let wanted = toolchain_targets(&toml);
    if wanted.is_empty() {
        return Ok(());
    }
    let _dir = sh.push_dir(workspace);
    // The rustc cargo builds with: rustup resolves rust-toolchain.toml from this directory.
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let sysroot = cmd!(sh, "{rustc} --print sysroot")
        .quiet()
        .read()
        .context("asking rustc for its sysroot (is the Rust toolchain installed?)")?;
    let missing = missing_targets(&wanted, Path::new(&sysroot));
    if missing.is_empty() {
        return Ok(());
    }
    if offline {
        anyhow::bail!(
            "--offline: the toolchain at {sysroot} lacks the Rust target(s) {} that \
             rust-toolchain.toml lists (guest-init is built for them); run `rustup target add {}` \
             where there is network, or run without --offline to have it done",
            missing.join(", "),
            missing.join(" ")
        );
    }
    eprintln!(
        "adding the Rust target(s) {} to the toolchain at {sysroot} (rust-toolchain.toml lists \
         them; guest-init is built for them)",
        missing.join(", ")
    );
    let targets = &missing;
    cmd!(sh, "rustup target add {targets...}")
        .run()
        .with_context(|| {
            format!(
                "adding the Rust target(s) {} failed; install them where rustup can reach its \
                 server with `rustup target add {}` (without rustup, install the rust-std \
                 component of these targets into {sysroot})",
                missing.join(", "),
                missing.join(" ")
            )
        })
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
