//! guest-init and the guest agent for the initrd: cross-built for `<arch>-unknown-linux-musl`
//! by one cargo run, reproducibly, and refused unless each is a static ELF for the right
//! machine with no trace of the build paths.
//!
//! Reproducible means no trace of where it was built: `--remap-path-prefix` maps the workspace,
//! the target dir and the cargo home to fixed names, the release profile pins codegen units,
//! LTO and stripping, and the toolchain is pinned by `rust-toolchain.toml`. The builds use their
//! own target dir (`guest/` in `$CARGO_TARGET_DIR` or `<workspace>/target`) so their flags never
//! invalidate the host build.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use system::{Arch, Sha256};
use xshell::{Shell, cmd};

use super::fingerprint::{self, Fingerprint};

/// The name guest-init's package and binary have.
pub const PACKAGE: &str = "guest-init";
/// The name the guest agent's package and binary have.
pub const AGENT_PACKAGE: &str = "guest-agent";
/// Every package (= binary) a guest build makes, in one cargo run.
const PACKAGES: [&str; 2] = [PACKAGE, AGENT_PACKAGE];

/// A built, checked static guest binary (guest-init or the agent).
#[derive(Debug, Clone)]
pub struct GuestInit {
    pub bytes: Vec<u8>,
    pub sha256: Sha256,
}

/// What one guest build gives for an arch: guest-init and the guest agent.
#[derive(Debug, Clone)]
pub struct GuestBinaries {
    pub guest_init: GuestInit,
    pub agent: GuestInit,
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

/// Builds guest-init and the agent for `arch` (release) and returns them, checked.
pub fn build(
    sh: &Shell,
    workspace: &Path,
    arch: Arch,
    options: &BuildOptions,
) -> anyhow::Result<GuestBinaries> {
    let mut built = build_all(sh, workspace, &[arch], options)?;
    Ok(built
        .remove(&arch)
        .expect("build_all returns every arch asked for"))
}

/// Builds guest-init and the agent for every arch in `arches` (release) and returns them,
/// checked. An arch whose two binaries both carry a recorded [`Fingerprint`] that still
/// matches their inputs (both packages' sources) is taken as is, without running cargo; the
/// others are built by one cargo invocation for both packages and all their targets.
pub fn build_all(
    sh: &Shell,
    workspace: &Path,
    arches: &[Arch],
    options: &BuildOptions,
) -> anyhow::Result<BTreeMap<Arch, GuestBinaries>> {
    let target_dir = options
        .target_dir
        .clone()
        .unwrap_or_else(|| target_dir(workspace));
    let flags = encoded_rustflags(workspace, &target_dir, cargo_home().as_deref());
    let binary = |arch: Arch, package: &str| {
        target_dir
            .join(arch.musl_target())
            .join("release")
            .join(package)
    };
    let mut built = BTreeMap::new();
    let mut stale = Vec::new();
    for &arch in arches {
        let fingerprint = Fingerprint::of_build(workspace, &PACKAGES, arch.musl_target(), &flags)?;
        let current = |package| {
            let (bytes, sha256) =
                fingerprint::current(&binary(arch, package), fingerprint.as_ref()?)?;
            Some(GuestInit { bytes, sha256 })
        };
        match (current(PACKAGE), current(AGENT_PACKAGE)) {
            (Some(guest_init), Some(agent)) => {
                built.insert(arch, GuestBinaries { guest_init, agent });
            }
            _ => stale.push((arch, fingerprint)),
        }
    }
    if stale.is_empty() {
        return Ok(built);
    }
    // A fresh machine has the pinned toolchain but not its musl targets. Checked only here,
    // when cargo must run: a no-op run spawns nothing.
    crate::toolchain::ensure_targets(sh, workspace, options.offline)?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut args = vec![];
    for (arch, _) in &stale {
        args.extend(["--target", arch.musl_target()]);
    }
    if options.locked {
        args.push("--locked");
    }
    if options.offline {
        args.push("--offline");
    }
    let triples: Vec<&str> = stale.iter().map(|(arch, _)| arch.musl_target()).collect();
    let _dir = sh.push_dir(workspace);
    let _flags = sh.push_env("CARGO_ENCODED_RUSTFLAGS", &flags);
    // CARGO_ENCODED_RUSTFLAGS wins over RUSTFLAGS and config rustflags: flags from the builder's
    // environment cannot make the binary depend on who built it.
    let _target = sh.push_env("CARGO_TARGET_DIR", &target_dir);
    cmd!(
        sh,
        "{cargo} build --package {PACKAGE} --bin {PACKAGE} --package {AGENT_PACKAGE} --bin {AGENT_PACKAGE} --release {args...}"
    )
    .run()
    .with_context(|| {
        format!(
            "building {PACKAGE} and {AGENT_PACKAGE} for {}; if a target is missing, run \
             `rustup target add {}`",
            triples.join(" and "),
            triples.join(" ")
        )
    })?;
    for (arch, fingerprint) in stale {
        let checked = |package| -> anyhow::Result<GuestInit> {
            let path = binary(arch, package);
            let binary = read_checked(&path, arch, workspace, &target_dir, &flags)?;
            if let Some(fingerprint) = &fingerprint {
                fingerprint::record(&path, fingerprint, &binary.sha256)?;
            }
            Ok(binary)
        };
        let guest_init = checked(PACKAGE)?;
        let agent = checked(AGENT_PACKAGE)?;
        built.insert(arch, GuestBinaries { guest_init, agent });
    }
    Ok(built)
}

/// Reads a freshly built binary and refuses it unless it is a static ELF for `arch` with no
/// trace of the paths it was built in.
fn read_checked(
    path: &Path,
    arch: Arch,
    workspace: &Path,
    target_dir: &Path,
    flags: &str,
) -> anyhow::Result<GuestInit> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    check_static_elf(&bytes, arch).with_context(|| {
        format!(
            "refusing to pack {} into an initrd for {arch}",
            path.display()
        )
    })?;
    for build_path in [workspace, target_dir] {
        let needle = build_path.as_os_str().as_encoded_bytes();
        if let Some(at) = memchr::memmem::find(&bytes, needle) {
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

/// Refuses anything but a 64-bit little-endian ELF executable for `arch` that needs no dynamic
/// loader and no shared library (no `PT_INTERP`, no `DT_NEEDED`): the initrd has no libc.
/// Static-PIE binaries (musl's default) have a `PT_DYNAMIC` for self-relocation; that is fine.
/// Parsing is `object`'s, which bounds-checks every read: any input gives an answer, not a panic.
pub fn check_static_elf(bytes: &[u8], arch: Arch) -> anyhow::Result<()> {
    use object::elf;
    use object::read::elf::{Dyn as _, FileHeader as _, ProgramHeader as _};

    let header = match elf::FileHeader64::<object::LittleEndian>::parse(bytes) {
        Ok(header) => header,
        Err(e) => return Err(explain_unparsable_elf(bytes, e)),
    };
    let ident = header.e_ident();
    if ident.data != elf::ELFDATA2LSB {
        bail!(
            "not a 64-bit little-endian ELF (class {}, data {})",
            ident.class.0,
            ident.data.0
        );
    }
    let endian = object::LittleEndian;
    let file_type = header.e_type(endian);
    if file_type != elf::ET_EXEC && file_type != elf::ET_DYN {
        bail!(
            "ELF type {} is not an executable (2) or position-independent executable (3)",
            file_type.0
        );
    }
    let machine = header.e_machine(endian);
    let expected = match arch {
        Arch::X86_64 => elf::EM_X86_64,
        Arch::Aarch64 => elf::EM_AARCH64,
    };
    if machine != expected {
        bail!(
            "ELF machine is {}, expected {} ({arch})",
            machine.0,
            expected.0
        );
    }
    let segments = header
        .program_headers(endian, bytes)
        .map_err(|e| anyhow::anyhow!("truncated or malformed ELF program headers: {e}"))?;
    for segment in segments {
        if segment.p_type(endian) == elf::PT_INTERP {
            // The loader's name makes the message actionable; a broken one is still a loader.
            let loader = match segment.interpreter(endian, bytes) {
                Ok(Some(name)) => String::from_utf8_lossy(name).into_owned(),
                _ => String::new(),
            };
            bail!(
                "dynamically linked: it asks for the loader {loader:?} (PT_INTERP); build for a \
                 musl target with static linking"
            );
        }
        let Some(dynamic) = segment
            .dynamic(endian, bytes)
            .map_err(|e| anyhow::anyhow!("truncated or malformed ELF dynamic segment: {e}"))?
        else {
            continue;
        };
        for entry in dynamic {
            match entry.d_tag(endian) {
                elf::DT_NULL => break,
                elf::DT_NEEDED => bail!(
                    "dynamically linked: it needs shared libraries (DT_NEEDED); build for a musl \
                     target with static linking"
                ),
                _ => {}
            }
        }
    }
    Ok(())
}

/// Why `object` could not read an ELF file header, in the terms of the checks above.
fn explain_unparsable_elf(bytes: &[u8], parse_error: object::read::Error) -> anyhow::Error {
    use object::elf;
    if !bytes.starts_with(&elf::ELFMAG) {
        return anyhow::anyhow!("not an ELF file");
    }
    let class = bytes.get(std::mem::offset_of!(elf::Ident, class));
    let data = bytes.get(std::mem::offset_of!(elf::Ident, data));
    match (class, data) {
        (Some(&class), Some(&data))
            if elf::FileClass(class) != elf::ELFCLASS64
                || elf::DataEncoding(data) != elf::ELFDATA2LSB =>
        {
            anyhow::anyhow!("not a 64-bit little-endian ELF (class {class}, data {data})")
        }
        _ => anyhow::anyhow!(
            "truncated or malformed ELF header ({} bytes): {parse_error}",
            bytes.len()
        ),
    }
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

    const PT_LOAD: u32 = 1;
    const PT_DYNAMIC: u32 = 2;
    const PT_INTERP: u32 = 3;
    const DT_NULL: u64 = 0;
    const DT_NEEDED: u64 = 1;
    const DT_DEBUG: u64 = 21;

    /// A minimal 64-bit little-endian ELF: the header, then one program header per segment,
    /// then each segment's content in order (so the last segment ends the file).
    fn elf(e_type: u16, machine: u16, segments: &[(u32, Vec<u8>)]) -> Vec<u8> {
        let headers_end = 64 + 56 * segments.len();
        let mut out = Vec::new();
        out.extend_from_slice(b"\x7fELF\x02\x01\x01");
        out.resize(16, 0);
        out.extend_from_slice(&e_type.to_le_bytes());
        out.extend_from_slice(&machine.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes()); // e_version
        out.extend_from_slice(&0u64.to_le_bytes()); // e_entry
        out.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
        out.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
        out.extend_from_slice(&0u32.to_le_bytes()); // e_flags
        for half in [64u16, 56, segments.len() as u16, 64, 0, 0] {
            // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
            out.extend_from_slice(&half.to_le_bytes());
        }
        let mut offset = headers_end as u64;
        for (p_type, content) in segments {
            let size = content.len() as u64;
            out.extend_from_slice(&p_type.to_le_bytes());
            out.extend_from_slice(&4u32.to_le_bytes()); // p_flags
            for field in [offset, 0, 0, size, size, 8] {
                // p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
                out.extend_from_slice(&field.to_le_bytes());
            }
            offset += size;
        }
        for (_, content) in segments {
            out.extend_from_slice(content);
        }
        out
    }

    fn dynamic(entries: &[(u64, u64)]) -> Vec<u8> {
        entries
            .iter()
            .flat_map(|(tag, value)| [tag.to_le_bytes(), value.to_le_bytes()])
            .flatten()
            .collect()
    }

    fn machine_of(arch: Arch) -> u16 {
        match arch {
            Arch::X86_64 => 62,
            Arch::Aarch64 => 183,
        }
    }

    /// What a static-PIE looks like to the check: a PT_DYNAMIC for self-relocation, no needs.
    fn static_pie(arch: Arch) -> Vec<u8> {
        elf(
            3,
            machine_of(arch),
            &[
                (PT_LOAD, Vec::new()),
                (PT_DYNAMIC, dynamic(&[(DT_DEBUG, 0), (DT_NULL, 0)])),
            ],
        )
    }

    #[test]
    fn static_executables_pass_and_every_rule_refuses_its_case() {
        for arch in [Arch::X86_64, Arch::Aarch64] {
            check_static_elf(&static_pie(arch), arch).unwrap();
            let exec = elf(2, machine_of(arch), &[(PT_LOAD, Vec::new())]);
            check_static_elf(&exec, arch).unwrap();
        }
        let arch = Arch::X86_64;
        let refused = |bytes: Vec<u8>, expect: &str| {
            let err = check_static_elf(&bytes, arch).unwrap_err();
            assert!(err.to_string().contains(expect), "{expect}: {err}");
        };
        let needed = dynamic(&[(DT_NEEDED, 1), (DT_NULL, 0)]);
        refused(elf(3, 62, &[(PT_DYNAMIC, needed)]), "DT_NEEDED");
        // Entries after DT_NULL are padding, not needs.
        let padded = dynamic(&[(DT_NULL, 0), (DT_NEEDED, 1)]);
        check_static_elf(&elf(3, 62, &[(PT_DYNAMIC, padded)]), arch).unwrap();
        let loader = b"/lib/ld-musl-x86_64.so.1\0".to_vec();
        refused(
            elf(3, 62, &[(PT_INTERP, loader)]),
            "\"/lib/ld-musl-x86_64.so.1\"",
        );
        refused(elf(1, 62, &[]), "ELF type 1 is not an executable");
        refused(elf(2, 183, &[]), "ELF machine is 183, expected 62");
        let mut big_endian = static_pie(arch);
        big_endian[5] = 2;
        refused(
            big_endian,
            "not a 64-bit little-endian ELF (class 2, data 2)",
        );
        let mut class32 = static_pie(arch);
        class32[4] = 1;
        refused(class32, "not a 64-bit little-endian ELF (class 1, data 1)");
        refused(b"#!/bin/sh\n".to_vec(), "not an ELF file");
    }

    /// Whatever the bytes, the check answers with an error instead of panicking: every
    /// truncation of a real ELF and of a hand-made static one, and headers that point anywhere.
    #[test]
    fn no_input_makes_the_check_panic() {
        let refuses_without_panicking = |what: &str, bytes: &[u8]| {
            let outcome = std::panic::catch_unwind(|| check_static_elf(bytes, Arch::X86_64));
            match outcome {
                Ok(result) => assert!(result.is_err(), "{what}: accepted"),
                Err(_) => panic!("{what}: the check panicked"),
            }
        };
        let real = std::fs::read("/bin/true").expect("reading /bin/true");
        let hand_made = static_pie(Arch::X86_64);
        check_static_elf(&hand_made, Arch::X86_64).unwrap();
        for (name, whole) in [("/bin/true", &real), ("static-pie", &hand_made)] {
            for len in 0..whole.len() {
                refuses_without_panicking(&format!("{name} cut to {len} bytes"), &whole[..len]);
            }
        }

        let mut garbage: Vec<(&str, Vec<u8>)> = vec![
            ("empty", Vec::new()),
            ("half a magic", b"\x7fE".to_vec()),
            ("magic only", b"\x7fELF".to_vec()),
            ("magic and class", b"\x7fELF\x02".to_vec()),
            ("magic, class, data", b"\x7fELF\x02\x01".to_vec()),
            ("magic then 0xff", [&b"\x7fELF"[..], &[0xff; 60]].concat()),
        ];
        let patched = |at: usize, value: &[u8]| {
            let mut bytes = static_pie(Arch::X86_64);
            bytes[at..at + value.len()].copy_from_slice(value);
            bytes
        };
        let max = u64::MAX.to_le_bytes();
        let first_segment = 64;
        let dynamic_segment = 64 + 56;
        garbage.extend([
            ("program headers far away", patched(32, &max)),
            (
                "65535 program headers",
                patched(56, &u16::MAX.to_le_bytes()),
            ),
            (
                "huge program header entries",
                patched(54, &u16::MAX.to_le_bytes()),
            ),
            (
                "tiny program header entries",
                patched(54, &8u16.to_le_bytes()),
            ),
            (
                "dynamic at the end of memory",
                patched(dynamic_segment + 8, &max),
            ),
            ("dynamic of any size", patched(dynamic_segment + 32, &max)),
            ("interp at the end of memory", {
                let mut bytes = patched(first_segment, &PT_INTERP.to_le_bytes());
                bytes[first_segment + 8..first_segment + 16].copy_from_slice(&max);
                bytes[first_segment + 32..first_segment + 40].copy_from_slice(&16u64.to_le_bytes());
                bytes
            }),
            ("interp without its NUL", {
                elf(3, 62, &[(PT_INTERP, b"/lib/ld.so".to_vec())])
            }),
        ]);
        for (what, bytes) in &garbage {
            refuses_without_panicking(what, bytes);
        }
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
    /// The workspace's files a build reads: the root manifests, the toolchain files and every
    /// member the root `Cargo.toml` lists (cargo refuses a workspace with a member missing).
    fn copy_workspace(from: &Path, to: &Path) {
        let manifest = std::fs::read_to_string(from.join("Cargo.toml")).unwrap();
        let members = manifest
            .lines()
            .find_map(|line| line.trim().strip_prefix("members = ["))
            .expect("the root Cargo.toml lists its members on one line");
        let members = members
            .trim_end_matches(']')
            .split(',')
            .map(|member| member.trim().trim_matches('"'))
            .filter(|member| !member.is_empty());
        let files = ["Cargo.toml", "Cargo.lock", "rust-toolchain.toml", ".cargo"];
        for item in files.into_iter().chain(members) {
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
            let tree = crate::initrd::recipe::assemble(
                None,
                &built.guest_init.bytes,
                Some(&built.agent.bytes),
                None,
            )
            .unwrap();
            let initrd = crate::initrd::cpio::write_initrd(
                &tree,
                0,
                system::lock::InitrdCompression::default(),
            )
            .unwrap();
            digests.push((
                built.guest_init.sha256,
                built.agent.sha256,
                system::hash::sha256_bytes(&initrd),
            ));
        }
        assert_eq!(digests[0], digests[1]);
    }
}
