//! Reading a dist tarball: every entry classified against the store layout, or refused.
//!
//! Shared by `dist verify` and `artifacts --from`, so nothing installs what verify would
//! refuse: only directories of the layout, `system/artifacts.lock`, regular files at
//! `system/blobs/sha256/<hex>`, and symlinks at `system/kernel/<v>/<arch>/<file>` and
//! `system/initrd/<v>/<arch>/initrd` whose target stays in `system/blobs/sha256/`. Any other
//! path, type, duplicate, or a link leaving the blobs is an error naming the entry.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Component, Path, PathBuf};

use anyhow::{Context as _, bail};
use system::lock::Version;
use system::{Arch, Kind, Sha256};

/// What an entry of a dist tarball is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Dir,
    /// `system/artifacts.lock`.
    Lock,
    /// `system/blobs/sha256/<hex>`, named by the digest its content must have.
    Blob(Sha256),
    /// A named link to the blob `target`.
    Link {
        kind: Kind,
        version: Version,
        arch: Arch,
        target: Sha256,
    },
}

/// Calls `visit` with every entry of the gzip tar at `path` in order: its archive path, what
/// it is, and its content. Fails at the first entry outside the layout.
pub fn for_each(
    path: &Path,
    mut visit: impl FnMut(&Path, Item, &mut dyn Read) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(BufReader::new(file)));
    let mut seen = BTreeSet::new();
    let entries = archive
        .entries()
        .with_context(|| format!("reading {}", path.display()))?;
    for entry in entries {
        let mut entry = entry
            .with_context(|| format!("reading {}: not a whole gzip tar stream", path.display()))?;
        let name: PathBuf = entry
            .path()
            .with_context(|| format!("{}: an entry's path", path.display()))?
            .into_owned();
        let link = entry
            .link_name()
            .with_context(|| format!("{}: {}'s link target", path.display(), name.display()))?
            .map(|l| l.into_owned());
        let item = classify(&name, entry.header().entry_type(), link.as_deref())
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if !seen.insert(name.clone()) {
            bail!(
                "{}: {} appears twice (a later copy would replace the verified one)",
                path.display(),
                name.display()
            );
        }
        visit(&name, item, &mut entry)
            .with_context(|| format!("{}: {}", path.display(), name.display()))?;
    }
    Ok(())
}

/// What `path` (of type `kind`, linking to `link`) is in a dist tarball, or why it may not be
/// there.
pub fn classify(path: &Path, kind: tar::EntryType, link: Option<&Path>) -> Result<Item, String> {
    let shown = path.display();
    let mut parts = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => {
                parts.push(part.to_str().ok_or_else(|| format!("{shown}: not UTF-8"))?)
            }
            _ => {
                return Err(format!(
                    "entry {shown} is not a plain relative path (absolute, `.` or `..`): \
                     everything must lie under system/"
                ));
            }
        }
    }
    if parts.first() != Some(&"system") {
        return Err(format!(
            "entry {shown} lies outside system/: a dist tarball holds only a store subtree"
        ));
    }
    let is = |t: tar::EntryType| kind == t;
    let dir = is(tar::EntryType::Directory);
    let item = match (&parts[1..], dir) {
        ([], true) | (["blobs"], true) | (["blobs", "sha256"], true) => Item::Dir,
        (["kernel" | "initrd"], true) => Item::Dir,
        (["kernel" | "initrd", version], true) => {
            version_of(version, &shown)?;
            Item::Dir
        }
        (["kernel" | "initrd", version, arch], true) => {
            version_of(version, &shown)?;
            arch_of(arch, &shown)?;
            Item::Dir
        }
        (["artifacts.lock"], false) if is(tar::EntryType::Regular) => Item::Lock,
        (["blobs", "sha256", hex], false) if is(tar::EntryType::Regular) => {
            Item::Blob(Sha256::from_hex(hex).map_err(|e| format!("blob {shown}: its name is {e}"))?)
        }
        ([which @ ("kernel" | "initrd"), version, arch, file], false)
            if is(tar::EntryType::Symlink) =>
        {
            let version = version_of(version, &shown)?;
            let arch = arch_of(arch, &shown)?;
            let (kind, expected) = match *which {
                "kernel" => (Kind::Kernel, arch.kernel_file_name()),
                _ => (Kind::Initrd, "initrd"),
            };
            if *file != expected {
                return Err(format!(
                    "link {shown}: a {kind} for {arch} is named {expected}, not {file}"
                ));
            }
            let target = link.ok_or_else(|| format!("link {shown} has no target"))?;
            Item::Link {
                kind,
                version,
                arch,
                target: link_target(path, target)?,
            }
        }
        _ => {
            return Err(format!(
                "unexpected entry {shown} ({kind:?}): a dist tarball holds only \
                 system/artifacts.lock, files in system/blobs/sha256/, and symlinks at \
                 system/kernel/<v>/<arch>/ and system/initrd/<v>/<arch>/initrd"
            ));
        }
    };
    Ok(item)
}

/// The blob a named link leads to, refused unless the target, resolved lexically from the
/// link's directory, is `system/blobs/sha256/<hex>` (no climbing out on the way).
fn link_target(path: &Path, target: &Path) -> Result<Sha256, String> {
    let escapes = || {
        format!(
            "symlink {} -> {} escapes system/blobs/sha256/: a named link must lead to a blob \
             of the tarball (../../../blobs/sha256/<hex>)",
            path.display(),
            target.display()
        )
    };
    let mut resolved: Vec<&str> = path
        .parent()
        .into_iter()
        .flat_map(|p| p.iter())
        .map(|c| c.to_str().unwrap_or(""))
        .collect();
    for component in target.components() {
        match component {
            Component::Normal(part) => resolved.push(part.to_str().ok_or_else(escapes)?),
            Component::ParentDir => {
                resolved.pop().ok_or_else(escapes)?;
            }
            Component::CurDir => {}
            _ => return Err(escapes()),
        }
    }
    match resolved.as_slice() {
        ["system", "blobs", "sha256", hex] => Sha256::from_hex(hex).map_err(|_| escapes()),
        _ => Err(escapes()),
    }
}

fn version_of(name: &str, shown: &impl std::fmt::Display) -> Result<Version, String> {
    Version::new(name).map_err(|e| format!("entry {shown}: version `{name}`: {e}"))
}

fn arch_of(name: &str, shown: &impl std::fmt::Display) -> Result<Arch, String> {
    name.parse()
        .map_err(|e| format!("entry {shown}: `{name}` is not an architecture ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "9d3570b47d5abb069ca00edfbfcef4c68306a9c3d078a01f10082b258f1001b8";

    #[test]
    fn the_layout_classifies() {
        use tar::EntryType::{Directory, Regular, Symlink};
        let blob = format!("system/blobs/sha256/{HEX}");
        assert_eq!(
            classify(Path::new(&blob), Regular, None),
            Ok(Item::Blob(Sha256::from_hex(HEX).unwrap()))
        );
        assert_eq!(
            classify(Path::new("system/artifacts.lock"), Regular, None),
            Ok(Item::Lock)
        );
        assert_eq!(
            classify(Path::new("system/kernel/v1/x86_64"), Directory, None),
            Ok(Item::Dir)
        );
        let target = format!("../../../blobs/sha256/{HEX}");
        assert!(matches!(
            classify(
                Path::new("system/kernel/v1/aarch64/Image"),
                Symlink,
                Some(Path::new(&target))
            ),
            Ok(Item::Link {
                kind: Kind::Kernel,
                arch: Arch::Aarch64,
                ..
            })
        ));
    }

    #[test]
    fn anything_else_is_refused_naming_the_entry() {
        use tar::EntryType::{Directory, Regular, Symlink};
        let refused = |path: &str, kind, link: Option<&str>| {
            classify(Path::new(path), kind, link.map(Path::new)).unwrap_err()
        };
        assert!(refused("etc/passwd", Regular, None).contains("outside system/"));
        assert!(refused("/system/artifacts.lock", Regular, None).contains("plain relative"));
        assert!(refused("system/../x", Regular, None).contains("plain relative"));
        assert!(refused("system/blobs/sha256/abc", Regular, None).contains("abc"));
        assert!(refused("system/oci-cache", Directory, None).contains("unexpected entry"));
        let e = refused("system/kernel/v1/x86_64/Image", Symlink, Some("x"));
        assert!(e.contains("named vmlinux"), "{e}");
        for target in [
            "/etc/shadow",
            "../../../../../etc/shadow",
            "../../../../../../../system/blobs/sha256/x",
            "../../../kernel/v1/x86_64/vmlinux",
        ] {
            let e = refused("system/initrd/v1/x86_64/initrd", Symlink, Some(target));
            assert!(e.contains("escapes system/blobs/sha256/"), "{target}: {e}");
        }
        assert!(
            refused("system/artifacts.lock", tar::EntryType::Link, Some("x"))
                .contains("unexpected entry")
        );
    }
}
