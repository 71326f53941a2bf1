//! `cargo xtask test`: the one test command. It prepares what the tests need on a fresh machine,
//! then runs the formatting and lint gates and every test in the workspace.

use std::path::Path;

use anyhow::{Context, bail};
use xshell::{Shell, cmd};

/// Debian packages the tests use: (package, why). Installed when missing and running as root.
const APT_PACKAGES: &[(&str, &str)] = &[
    (
        "cpio",
        "GNU cpio reads initrds back in the reproducibility tests",
    ),
    ("curl", "the download benchmark's baseline"),
    (
        "docker-registry",
        "the OCI pull tests run a real registry on 127.0.0.1",
    ),
    (
        "skopeo",
        "the OCI tests push fixture images and read the cache back",
    ),
    (
        "umoci",
        "the OCI tests cross-check the layer model against umoci's unpack",
    ),
    (
        "qemu-system-x86",
        "the VM tests boot guest-init under qemu-system-x86_64",
    ),
    (
        "linux-image-cloud-amd64",
        "the VM tests boot Debian's cloud kernel and its virtio modules",
    ),
    (
        "e2fsprogs",
        "mkfs.ext4 -d makes the VM tests' disks; debugfs reads them back",
    ),
    (
        "busybox-static",
        "the VM tests' rootfs has a shell and tools",
    ),
];

/// Prepare the machine (rustup targets, apt packages), then run fmt, clippy, every test, and
/// the check that the committed lock's default initrd rebuilds byte-identically.
#[derive(clap::Args)]
pub struct Test {
    /// Skip `cargo fmt --check` and clippy (they still run in CI).
    #[arg(long)]
    no_lint: bool,
    /// Passed to `cargo test` (e.g. a test name filter).
    #[arg(last = true)]
    cargo_test_args: Vec<String>,
}

impl Test {
    pub fn run(self, sh: &Shell) -> anyhow::Result<()> {
        install_rust_targets(sh)?;
        install_apt_packages(sh)?;
        if !self.no_lint {
            cmd!(sh, "cargo fmt --all -- --check")
                .run()
                .context("formatting differs: run `cargo fmt --all`")?;
            cmd!(sh, "cargo clippy --workspace --all-targets -- -D warnings")
                .run()
                .context("clippy found problems (see above)")?;
        }
        let args = &self.cargo_test_args;
        cmd!(sh, "cargo test --workspace {args...}")
            .run()
            .context("tests failed (see above)")?;
        if args.is_empty() {
            check_committed_initrd_reproduces(sh)?;
        }
        Ok(())
    }
}

/// The reproducibility check: the default (minimal) initrd rebuilds from this checkout,
/// offline, into a fresh store, byte-identical to what the committed lock records.
fn check_committed_initrd_reproduces(sh: &Shell) -> anyhow::Result<()> {
    let store = tempfile::tempdir()?;
    let data_dir = store.path();
    let initrd = system::embedded_lock().defaults.initrd.to_string();
    cmd!(
        sh,
        "cargo xtask artifacts --only initrds --initrd {initrd} --offline --locked --data-dir {data_dir}"
    )
    .run()
    .with_context(|| {
        format!(
            "initrd {initrd} does not rebuild to the digests artifacts.lock records; if guest-init \
             changed on purpose, record the new outputs with `cargo xtask artifacts --only initrds \
             --initrd {initrd} --offline` and commit artifacts.lock"
        )
    })?;
    eprintln!("reproducibility: initrd {initrd} rebuilt byte-identical to artifacts.lock");
    Ok(())
}

/// The targets rust-toolchain.toml lists, added with rustup (a no-op when present).
fn install_rust_targets(sh: &Shell) -> anyhow::Result<()> {
    let toolchain = sh.read_file("rust-toolchain.toml")?;
    let targets = toolchain_targets(&toolchain);
    if targets.is_empty() {
        return Ok(());
    }
    cmd!(sh, "rustup target add {targets...}")
        .quiet()
        .run()
        .context("adding the rustup targets rust-toolchain.toml lists")
}

/// The `targets = [...]` array of a rust-toolchain.toml.
fn toolchain_targets(toml: &str) -> Vec<String> {
    let Some(line) = toml.lines().find(|l| l.trim_start().starts_with("targets")) else {
        return Vec::new();
    };
    line.split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

fn install_apt_packages(sh: &Shell) -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .map(|(package, _)| *package)
        .filter(|package| !apt_installed(sh, package))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let is_root = cmd!(sh, "id -u")
        .quiet()
        .read()
        .map(|uid| uid == "0")
        .unwrap_or(false);
    if !is_root || !Path::new("/usr/bin/apt-get").exists() {
        let why: Vec<String> = APT_PACKAGES
            .iter()
            .filter(|(p, _)| missing.contains(p))
            .map(|(p, why)| format!("  {p}: {why}"))
            .collect();
        bail!(
            "the tests need these Debian packages:\n{}\ninstall them with:\n  sudo apt-get install -y {}",
            why.join("\n"),
            missing.join(" ")
        );
    }
    eprintln!("installing test dependencies: {}", missing.join(" "));
    cmd!(sh, "apt-get update -q")
        .run()
        .context("apt-get update")?;
    let _frontend = sh.push_env("DEBIAN_FRONTEND", "noninteractive");
    cmd!(
        sh,
        "apt-get install -y -q --no-install-recommends {missing...}"
    )
    .run()
    .context("installing the tests' Debian packages")
}

fn apt_installed(sh: &Shell, package: &str) -> bool {
    let format = "-f=${Status}";
    cmd!(sh, "dpkg-query -W {format} {package}")
        .quiet()
        .ignore_stderr()
        .read()
        .map(|status| status.ends_with("install ok installed"))
        .unwrap_or(false)
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
}
