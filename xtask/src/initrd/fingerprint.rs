//! Whether guest-init's last build is still current, decided without running cargo.
//!
//! Asking cargo costs ~60 ms per target even when nothing changed: more than the rest of a
//! no-op `artifacts` run. So after a checked build, a digest of everything that build read is
//! recorded next to the binary (`guest-init.fingerprint`). When the digest still matches and the
//! binary still hashes to what was recorded, cargo is skipped. Anything the digest does not
//! cover is a reason to run cargo, never to skip it:
//! - the files of the built packages (guest-init and the guest agent: one cargo run builds
//!   both) and of every path dependency their `Cargo.toml`s name;
//! - the workspace's `Cargo.toml` (profiles), `Cargo.lock`, `rust-toolchain.toml` and
//!   `.cargo/config.toml` (linkers);
//! - the toolchain: the `rustc` beside the running `$CARGO`, or rustup's for the pinned channel
//!   (path, size, mtime, ctime); when neither is found, cargo always runs;
//! - the target triple and the rustflags;
//! - the environment cargo reads for a build (`CARGO_PROFILE_*`, `CARGO_BUILD_*`,
//!   `CARGO_TARGET_<TRIPLE>_*`, `RUSTC*`, `RUSTFLAGS`).

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256 as Hasher};
use system::Sha256;
use system::stamp::FileStamp;

use crate::store::atomic_write;

/// Files at the workspace root that shape every build.
const WORKSPACE_FILES: [&str; 4] = [
    "Cargo.toml",
    "Cargo.lock",
    "rust-toolchain.toml",
    ".cargo/config.toml",
];

/// The digest of one build's inputs, in hex.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint(String);

impl Fingerprint {
    /// The inputs of building `packages` (directories of `workspace`) for `triple` with
    /// `flags`. `None` when the toolchain cannot be identified: then only cargo can tell.
    pub fn of_build(
        workspace: &Path,
        packages: &[&str],
        triple: &str,
        flags: &str,
    ) -> anyhow::Result<Option<Fingerprint>> {
        let Some(toolchain) = toolchain_identity(workspace) else {
            return Ok(None);
        };
        let mut digest = Framed::default();
        digest.field("toolchain", toolchain.as_bytes());
        digest.field("triple", triple.as_bytes());
        digest.field("rustflags", flags.as_bytes());
        for (key, value) in build_environment(triple) {
            digest.field(&key, value.as_bytes());
        }
        for name in WORKSPACE_FILES {
            // A missing file is an input too ("absent"), so creating one changes the digest.
            let bytes = fs::read(workspace.join(name)).ok();
            digest.field(name, bytes.as_deref().unwrap_or(b"\0absent"));
        }
        let mut dirs = BTreeSet::new();
        for package in packages {
            dirs.extend(package_closure(workspace, &workspace.join(package))?);
        }
        for dir in dirs {
            for file in source_files(&dir)? {
                let bytes = fs::read(&file)?;
                let name = file.strip_prefix(workspace).unwrap_or(&file);
                digest.field(&name.to_string_lossy(), &bytes);
            }
        }
        Ok(Some(Fingerprint(digest.finish())))
    }
}

/// The record kept beside a built binary.
fn record_path(binary: &Path) -> PathBuf {
    let mut name = binary.as_os_str().to_owned();
    name.push(".fingerprint");
    PathBuf::from(name)
}

/// The binary at `binary`, if it was built from exactly `fingerprint`'s inputs and is unchanged
/// since (its sha256 is the recorded one). Any doubt returns `None`: the caller runs cargo.
pub fn current(binary: &Path, fingerprint: &Fingerprint) -> Option<(Vec<u8>, Sha256)> {
    let record = fs::read_to_string(record_path(binary)).ok()?;
    let (recorded, sha256) = parse_record(&record)?;
    if recorded != fingerprint.0 {
        return None;
    }
    let bytes = fs::read(binary).ok()?;
    let actual = system::hash::sha256_bytes(&bytes);
    (actual == sha256).then_some((bytes, actual))
}

/// Records that `binary` (with digest `sha256`, already checked) was built from `fingerprint`.
pub fn record(binary: &Path, fingerprint: &Fingerprint, sha256: &Sha256) -> anyhow::Result<()> {
    let text = format!("fingerprint {}\nsha256 {}\n", fingerprint.0, sha256.hex());
    atomic_write(&record_path(binary), text.as_bytes())
}

fn parse_record(text: &str) -> Option<(&str, Sha256)> {
    let mut lines = text.lines();
    let fingerprint = lines.next()?.strip_prefix("fingerprint ")?;
    let sha256 = lines.next()?.strip_prefix("sha256 ")?.parse().ok()?;
    Some((fingerprint, sha256))
}

/// Length-framed fields, so no two different input sets hash the same byte stream.
#[derive(Default)]
struct Framed(Hasher);

impl Framed {
    fn field(&mut self, name: &str, bytes: &[u8]) {
        for part in [name.as_bytes(), bytes] {
            self.0.update((part.len() as u64).to_le_bytes());
            self.0.update(part);
        }
    }

    fn finish(self) -> String {
        Sha256(self.0.finalize().into()).hex()
    }
}

/// The compiler cargo will use, identified by its file (a reinstall changes its ctime): the
/// `rustc` beside the running `$CARGO` (rustup puts a toolchain's binaries in one `bin/`), or,
/// when xtask runs outside cargo, the one rustup installed for `rust-toolchain.toml`'s channel.
fn toolchain_identity(workspace: &Path) -> Option<String> {
    let rustc = match std::env::var_os("CARGO") {
        Some(cargo) => PathBuf::from(cargo).with_file_name("rustc"),
        None => pinned_rustc(workspace)?,
    };
    let meta = fs::metadata(&rustc).ok()?;
    Some(format!(
        "{} {}",
        rustc.display(),
        FileStamp::of(&meta).to_line()
    ))
}

/// `$RUSTUP_HOME/toolchains/<channel>-<host>/bin/rustc` for the pinned channel, if exactly one
/// host's toolchain of that channel is installed.
fn pinned_rustc(workspace: &Path) -> Option<PathBuf> {
    let pin = fs::read_to_string(workspace.join("rust-toolchain.toml")).ok()?;
    let channel = pin
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel"))?
        .trim_start()
        .strip_prefix('=')?
        .trim()
        .trim_matches('"')
        .to_owned();
    let rustup_home = std::env::var_os("RUSTUP_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".rustup")))?;
    let prefix = format!("{channel}-");
    let mut matches = fs::read_dir(rustup_home.join("toolchains"))
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix));
    let only = matches.next()?;
    matches
        .next()
        .is_none()
        .then(|| only.path().join("bin/rustc"))
}

/// The environment variables that can change what cargo builds for `triple`, sorted.
fn build_environment(triple: &str) -> Vec<(String, String)> {
    let target_prefix = format!(
        "CARGO_TARGET_{}_",
        triple.to_ascii_uppercase().replace('-', "_")
    );
    let mut vars: Vec<(String, String)> = std::env::vars()
        .filter(|(key, _)| {
            key.starts_with("CARGO_PROFILE_")
                || key.starts_with("CARGO_BUILD_")
                || key.starts_with(&target_prefix)
                || key.starts_with("RUSTC")
                || key == "RUSTFLAGS"
        })
        .collect();
    vars.sort();
    vars
}

/// `package` and every package it reaches through `path = "…"` dependencies, sorted.
fn package_closure(workspace: &Path, package: &Path) -> anyhow::Result<BTreeSet<PathBuf>> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![package.to_path_buf()];
    while let Some(dir) = todo.pop() {
        let dir = dir.canonicalize().unwrap_or(dir);
        if !seen.insert(dir.clone()) {
            continue;
        }
        let manifest = dir.join("Cargo.toml");
        let text = fs::read_to_string(&manifest).map_err(|e| {
            anyhow::anyhow!("reading {} (a path dependency): {e}", manifest.display())
        })?;
        for path in path_dependencies(&text) {
            let dep = dir.join(path);
            // Only the workspace's own packages: anything else cargo tracks itself.
            if dep.starts_with(workspace)
                || dep.canonicalize().is_ok_and(|d| d.starts_with(workspace))
            {
                todo.push(dep);
            }
        }
    }
    Ok(seen)
}

/// The values of `path = "…"` keys in a manifest: every local dependency, whatever the table.
/// Over-matching (a `path` key of another meaning) only adds inputs, which is safe.
fn path_dependencies(manifest: &str) -> Vec<&str> {
    let mut paths = Vec::new();
    for line in manifest.lines() {
        let mut rest = line;
        while let Some(at) = rest.find("path") {
            let after = rest[at + 4..].trim_start();
            rest = &rest[at + 4..];
            let Some(value) = after.strip_prefix('=') else {
                continue;
            };
            let Some(quoted) = value.trim_start().strip_prefix('"') else {
                continue;
            };
            if let Some(end) = quoted.find('"') {
                paths.push(&quoted[..end]);
            }
        }
    }
    paths
}

/// Every file under a package directory, sorted, without build output.
fn source_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let walk = walkdir::WalkDir::new(dir)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| e.file_name() != "target");
    for entry in walk {
        let entry = entry?;
        if !entry.file_type().is_dir() {
            files.push(entry.into_path());
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn package(root: &Path, name: &str, manifest: &str, main: &str) {
        fs::create_dir_all(root.join(name).join("src")).unwrap();
        fs::write(root.join(name).join("Cargo.toml"), manifest).unwrap();
        fs::write(root.join(name).join("src/main.rs"), main).unwrap();
    }

    /// A workspace with `app` depending on `lib` by path, and an unrelated `other`.
    fn workspace() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::write(root.join("Cargo.toml"), "[workspace]\n").unwrap();
        fs::write(root.join("Cargo.lock"), "# lock\n").unwrap();
        package(
            root,
            "app",
            "[package]\nname = \"app\"\n[dependencies]\nlib = { path = \"../lib\" }\n",
            "fn main() {}\n",
        );
        package(root, "lib", "[package]\nname = \"lib\"\n", "// lib\n");
        package(root, "other", "[package]\nname = \"other\"\n", "// other\n");
        dir
    }

    fn fingerprint(root: &Path, triple: &str) -> Fingerprint {
        // Tests run under cargo, which sets $CARGO: the toolchain is identifiable.
        Fingerprint::of_build(root, &["app"], triple, "-Cflag")
            .unwrap()
            .expect("$CARGO is set under cargo test")
    }

    #[test]
    fn path_dependencies_are_found_in_any_table_and_form() {
        let manifest = "[dependencies]\na = { path = \"../a\" }\nb = {version=\"1\",path=\"../b\"}\n\
                        [build-dependencies.c]\npath = \"../c\"\n[package]\nname = \"path\"\n";
        assert_eq!(path_dependencies(manifest), ["../a", "../b", "../c"]);
    }

    #[test]
    fn every_input_changes_the_fingerprint_and_nothing_else_does() {
        let dir = workspace();
        let root = dir.path();
        let base = fingerprint(root, "x86_64-unknown-linux-musl");
        assert_eq!(base, fingerprint(root, "x86_64-unknown-linux-musl"));
        assert_ne!(base, fingerprint(root, "aarch64-unknown-linux-musl"));

        fs::write(root.join("other/src/main.rs"), "// changed\n").unwrap();
        assert_eq!(
            base,
            fingerprint(root, "x86_64-unknown-linux-musl"),
            "unrelated package"
        );

        for (file, content) in [
            ("lib/src/main.rs", "// a dependency changed\n"),
            ("app/src/new.rs", "// a new file\n"),
            ("Cargo.lock", "# another lock\n"),
            ("rust-toolchain.toml", "[toolchain]\n"),
        ] {
            let before = fingerprint(root, "x86_64-unknown-linux-musl");
            fs::write(root.join(file), content).unwrap();
            assert_ne!(
                before,
                fingerprint(root, "x86_64-unknown-linux-musl"),
                "{file}"
            );
        }
        let other_flags = Fingerprint::of_build(root, &["app"], "x86_64-unknown-linux-musl", "-Cx")
            .unwrap()
            .unwrap();
        assert_ne!(other_flags, fingerprint(root, "x86_64-unknown-linux-musl"));
    }

    #[test]
    fn a_build_of_two_packages_covers_both_closures() {
        let dir = workspace();
        let root = dir.path();
        let both = |root: &Path| {
            Fingerprint::of_build(root, &["app", "other"], "x86_64-unknown-linux-musl", "-C")
                .unwrap()
                .unwrap()
        };
        let before = both(root);
        assert_ne!(before, fingerprint(root, "x86_64-unknown-linux-musl"));
        fs::write(
            root.join("other/src/main.rs"),
            "// the second package changed\n",
        )
        .unwrap();
        let after_other = both(root);
        assert_ne!(before, after_other, "the second package");
        fs::write(
            root.join("lib/src/main.rs"),
            "// the first one's dependency\n",
        )
        .unwrap();
        assert_ne!(after_other, both(root), "a dependency of the first package");
    }

    #[test]
    fn a_recorded_binary_is_current_until_it_or_its_inputs_change() {
        let dir = workspace();
        let root = dir.path();
        let binary = root.join("guest-init");
        fs::write(&binary, b"\x7fELF built").unwrap();
        let fp = fingerprint(root, "x86_64-unknown-linux-musl");
        assert!(current(&binary, &fp).is_none(), "nothing recorded yet");

        let sha256 = system::hash::sha256_bytes(b"\x7fELF built");
        record(&binary, &fp, &sha256).unwrap();
        let (bytes, digest) = current(&binary, &fp).expect("recorded and unchanged");
        assert_eq!((bytes.as_slice(), digest), (&b"\x7fELF built"[..], sha256));

        let other = fingerprint(root, "aarch64-unknown-linux-musl");
        assert!(current(&binary, &other).is_none(), "other inputs");

        fs::write(&binary, b"\x7fELF tampered").unwrap();
        assert!(
            current(&binary, &fp).is_none(),
            "binary changed after recording"
        );

        fs::write(record_path(&binary), "garbage").unwrap();
        assert!(current(&binary, &fp).is_none(), "unreadable record");
    }
}
