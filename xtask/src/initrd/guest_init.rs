//! guest-init for the initrd: cross-built for `<arch>-unknown-linux-musl`, reproducibly, and
//! refused unless it is a static ELF for the right machine.
//!
//! Reproducible means no trace of where it was built: `--remap-path-prefix` maps the workspace,
//! the target dir and the cargo home to fixed names, the release profile pins codegen units,
//! LTO and stripping, and the toolchain is pinned by `rust-toolchain.toml`. The builds use their
//! own target dir (`guest/` in `$CARGO_TARGET_DIR` or `<workspace>/target`) so their flags never
//! invalidate the host build.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use system::{Arch, Sha256};
use xshell::{Shell, cmd};

/// The name guest-init's package and binary have.
pub const PACKAGE: &str = "guest-init";

/// A built, checked guest-init binary.
#[derive(Debug, Clone)]
pub struct GuestInit {
    pub bytes: Vec<u8>,
    pub sha256: Sha256,
}

/// How to call cargo.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// Pass `--locked` (Cargo.lock must not change).
    pub locked: bool,
    /// Pass `--offline`.
    pub offline: bool,
    /// Override the target dir (default: [`target_dir`]).
    pub target_dir: Option<PathBuf>,
}

/// Where guest-init builds go: `guest/` in the target dir (`$CARGO_TARGET_DIR` when set, else
/// `<workspace>/target`). Its own directory, so the remap flags never invalidate other builds
/// and a build started from `cargo test` or `cargo run` never waits on their lock.
pub fn target_dir(workspace: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => workspace.join(dir).join("guest"),
        _ => workspace.join("target/guest"),
    }
}

/// The cargo home whose registry sources the build reads.
fn cargo_home() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
}

/// The target-only rustflags, in `CARGO_ENCODED_RUSTFLAGS` form (0x1f-separated). The linker
/// comes from `.cargo/config.toml` (`target.<triple>.linker`), which these do not touch. When
/// several prefixes match, rustc applies the last one, so the more specific come later.
pub fn encoded_rustflags(workspace: &Path, target_dir: &Path, cargo_home: Option<&Path>) -> String {
    let mut flags = Vec::new();
    if let Some(home) = cargo_home {
        flags.push(format!("--remap-path-prefix={}=/cargo", home.display()));
    }
    flags.push(format!(
        "--remap-path-prefix={}=/workspace",
        workspace.display()
    ));
    flags.push(format!(
        "--remap-path-prefix={}=/target",
        target_dir.display()
    ));
    flags.join("\x1f")
}

/// Builds guest-init for `arch` (release) and returns it, checked.
pub fn build(
    sh: &Shell,
    workspace: &Path,
    arch: Arch,
    options: &BuildOptions,
) -> anyhow::Result<GuestInit> {
    let target_dir = options
        .target_dir
        .clone()
        .unwrap_or_else(|| target_dir(workspace));
    let triple = arch.musl_target();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let flags = encoded_rustflags(workspace, &target_dir, cargo_home().as_deref());
    let mut extra = Vec::new();
    if options.locked {
        extra.push("--locked");
    }
    if options.offline {
        extra.push("--offline");
    }
    let _dir = sh.push_dir(workspace);
    let _flags = sh.push_env("CARGO_ENCODED_RUSTFLAGS", &flags);
    // CARGO_ENCODED_RUSTFLAGS wins over RUSTFLAGS and config rustflags: flags from the builder's
    // environment cannot make the binary depend on who built it.
    let _target = sh.push_env("CARGO_TARGET_DIR", &target_dir);
    cmd!(
        sh,
        "{cargo} build --package {PACKAGE} --bin {PACKAGE} --release --target {triple} {extra...}"
    )
    .run()
    .with_context(|| {
        format!(
            "building {PACKAGE} for {triple}; if the target is missing, run \
             `rustup target add {triple}`"
        )
    })?;
    let path = target_dir.join(triple).join("release").join(PACKAGE);
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    check_static_elf(&bytes, arch).with_context(|| {
        format!(
            "refusing to pack {} into an initrd for {arch}",
            path.display()
        )
    })?;
    for build_path in [workspace, &target_dir] {
        if let Some(at) = find(&bytes, build_path.as_os_str().as_encoded_bytes()) {
            bail!(
                "{} contains the build path {} at offset {at}: it would not be reproducible \
                 elsewhere. Check the --remap-path-prefix flags ({})",
                path.display(),
                build_path.display(),
                flags.replace('\x1f', " ")
            );
        }
    }
    let sha256 = system::hash::sha256_bytes(&bytes);
    Ok(GuestInit { bytes, sha256 })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

const EM_X86_64: u16 = 62;
const EM_AARCH64: u16 = 183;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;

/// Refuses anything but a 64-bit little-endian ELF executable for `arch` that needs no dynamic
/// loader and no shared library (no `PT_INTERP`, no `DT_NEEDED`): the initrd has no libc.
/// Static-PIE binaries (musl's default) have a `PT_DYNAMIC` for self-relocation; that is fine.
pub fn check_static_elf(bytes: &[u8], arch: Arch) -> anyhow::Result<()> {
    let u16_at = |at: usize| -> anyhow::Result<u16> {
        let b = bytes.get(at..at + 2).context("truncated ELF")?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| -> anyhow::Result<u32> {
        let b = bytes.get(at..at + 4).context("truncated ELF")?;
        Ok(u32::from_le_bytes(b.try_into().unwrap()))
    };
    let u64_at = |at: usize| -> anyhow::Result<u64> {
        let b = bytes.get(at..at + 8).context("truncated ELF")?;
        Ok(u64::from_le_bytes(b.try_into().unwrap()))
    };
    if bytes.get(..4) != Some(b"\x7fELF") {
        bail!("not an ELF file");
    }
    if bytes[4] != 2 || bytes[5] != 1 {
        bail!(
            "not a 64-bit little-endian ELF (class {}, data {})",
            bytes[4],
            bytes[5]
        );
    }
    let e_type = u16_at(16)?;
    if e_type != 2 && e_type != 3 {
        bail!("ELF type {e_type} is not an executable (2) or position-independent executable (3)");
    }
    let machine = u16_at(18)?;
    let expected = match arch {
        Arch::X86_64 => EM_X86_64,
        Arch::Aarch64 => EM_AARCH64,
    };
    if machine != expected {
        bail!("ELF machine is {machine}, expected {expected} ({arch})");
    }
    let phoff = usize::try_from(u64_at(32)?)?;
    let phentsize = usize::from(u16_at(54)?);
    let phnum = usize::from(u16_at(56)?);
    if phentsize < 56 {
        bail!("ELF program header entries are {phentsize} bytes, expected 56");
    }
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        match u32_at(ph)? {
            PT_INTERP => {
                let offset = usize::try_from(u64_at(ph + 8)?)?;
                let size = usize::try_from(u64_at(ph + 32)?)?;
                let interp = bytes
                    .get(offset..offset + size)
                    .map(|b| String::from_utf8_lossy(b).trim_end_matches('\0').to_owned())
                    .unwrap_or_default();
                bail!(
                    "dynamically linked: it asks for the loader {interp:?} (PT_INTERP); build \
                     for a musl target with static linking"
                );
            }
            PT_DYNAMIC => {
                let offset = usize::try_from(u64_at(ph + 8)?)?;
                let size = usize::try_from(u64_at(ph + 32)?)?;
                for entry in (offset..offset + size).step_by(16) {
                    match u64_at(entry)? {
                        DT_NULL => break,
                        DT_NEEDED => bail!(
                            "dynamically linked: it needs shared libraries (DT_NEEDED); build \
                             for a musl target with static linking"
                        ),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_executable_is_refused() {
        // The host's /bin/true is a dynamically linked x86_64 executable.
        let bytes = std::fs::read("/bin/true").expect("reading /bin/true");
        let err = check_static_elf(&bytes, Arch::host()).unwrap_err();
        assert!(err.to_string().contains("dynamically linked"), "{err}");
    }

    #[test]
    fn a_dynamic_executable_built_with_cc_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("hello.c");
        std::fs::write(&src, "int main(void) { return 0; }\n").unwrap();
        let out = dir.path().join("hello");
        // The host's Rust toolchain links through `cc`, so it is there wherever tests build.
        let status = std::process::Command::new("cc")
            .arg("-o")
            .arg(&out)
            .arg(&src)
            .status()
            .expect("running cc (apt-get install gcc)");
        assert!(status.success());
        let bytes = std::fs::read(&out).unwrap();
        let err = check_static_elf(&bytes, Arch::host()).unwrap_err();
        assert!(err.to_string().contains("PT_INTERP"), "{err}");
    }

    #[test]
    fn wrong_machine_and_garbage_are_refused() {
        let bytes = std::fs::read("/bin/true").expect("reading /bin/true");
        let other = match Arch::host() {
            Arch::X86_64 => Arch::Aarch64,
            Arch::Aarch64 => Arch::X86_64,
        };
        let err = check_static_elf(&bytes, other).unwrap_err();
        assert!(err.to_string().contains("ELF machine"), "{err}");
        assert!(check_static_elf(b"#!/bin/sh\n", Arch::X86_64).is_err());
        assert!(check_static_elf(b"\x7fELF\x02\x01", Arch::X86_64).is_err());
    }

    #[test]
    fn rustflags_remap_every_build_path_with_the_specific_last() {
        let flags = encoded_rustflags(
            Path::new("/src/ws"),
            Path::new("/src/ws/target/guest"),
            Some(Path::new("/home/u/.cargo")),
        );
        let flags: Vec<&str> = flags.split('\x1f').collect();
        assert_eq!(
            flags,
            [
                "--remap-path-prefix=/home/u/.cargo=/cargo",
                "--remap-path-prefix=/src/ws=/workspace",
                "--remap-path-prefix=/src/ws/target/guest=/target",
            ]
        );
    }

    /// Copies what a build of guest-init needs (not `target/`) to `to`.
    fn copy_workspace(from: &Path, to: &Path) {
        for item in [
            "Cargo.toml",
            "Cargo.lock",
            "rust-toolchain.toml",
            ".cargo",
            "system",
            "guest-init",
            "xtask",
        ] {
            let status = std::process::Command::new("cp")
                .arg("-r")
                .arg(from.join(item))
                .arg(to)
                .status()
                .unwrap();
            assert!(status.success(), "copying {item}");
        }
    }

    /// Two checkouts in different directories, built into different target dirs, give the same
    /// guest-init and so the same initrd, and neither binary names its build directory. Two
    /// release builds: the slowest test here, and the one that proves reproducibility.
    #[test]
    fn two_checkouts_build_the_same_guest_init_and_initrd() {
        let workspace = crate::workspace_root();
        let dir = tempfile::tempdir().unwrap();
        let mut digests = Vec::new();
        for (name, target) in [("first", "target"), ("second-checkout", "elsewhere/t")] {
            let ws = dir.path().join(name).join("ws");
            std::fs::create_dir_all(&ws).unwrap();
            copy_workspace(&workspace, &ws);
            let options = BuildOptions {
                locked: false,
                offline: true,
                target_dir: Some(dir.path().join(name).join(target)),
            };
            let sh = Shell::new().unwrap();
            // `build` refuses a binary that contains the workspace or target path.
            let built = build(&sh, &ws, Arch::X86_64, &options).unwrap();
            let tree = crate::initrd::recipe::assemble(None, &built.bytes, None).unwrap();
            let initrd = crate::initrd::cpio::write_initrd(&tree, 0).unwrap();
            digests.push((built.sha256, system::hash::sha256_bytes(&initrd)));
        }
        assert_eq!(digests[0], digests[1]);
    }
}
