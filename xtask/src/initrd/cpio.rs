//! The deterministic initramfs writer: a [`Tree`] as a newc cpio archive, compressed as the
//! recipe says (`initrd::compress`).
//!
//! Same tree, same bytes, on any machine: entries in tree order (sorted, parents first), inode
//! numbers assigned in that order, one fixed mtime for every entry, owners and modes from the
//! tree (never from the builder), and a pinned compressor (a gzip header without file name or
//! time). Hard links share an inode; as GNU cpio and the kernel's unpacker expect, the data
//! travels with the last entry of the group and the earlier ones are empty with the group's
//! link count.

use std::collections::HashMap;
use std::io::Write;

use anyhow::{Context, bail};
use cpio::newc::{Builder, ModeFileType};
use system::lock::InitrdCompression;

use crate::rootfs::{Node, NodeKind, Tree, TreePath};

/// The mtime of every entry when `SOURCE_DATE_EPOCH` is unset: the Unix epoch.
pub const DEFAULT_MTIME: u32 = 0;

/// The name of newc's end-of-archive entry: no entry of the tree may carry it.
pub const TRAILER_NAME: &str = "TRAILER!!!";

/// The archive's mtime: `SOURCE_DATE_EPOCH` when set and not empty (seconds, must fit the
/// format's 32 bits), [`DEFAULT_MTIME`] otherwise.
pub fn mtime_from_env() -> anyhow::Result<u32> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Err(std::env::VarError::NotPresent) => Ok(DEFAULT_MTIME),
        Err(e) => bail!("SOURCE_DATE_EPOCH: {e}"),
        // Set but empty means unset, as reproducible-builds.org's tools read it.
        Ok(text) if text.trim().is_empty() => Ok(DEFAULT_MTIME),
        Ok(text) => text.trim().parse::<u32>().with_context(|| {
            format!(
                "SOURCE_DATE_EPOCH={text:?} is not a number of seconds between 0 and {}; \
                 unset it to use {DEFAULT_MTIME}",
                u32::MAX
            )
        }),
    }
}

/// The whole initrd: newc cpio of `tree`, compressed as `compression` with its pinned encoder.
/// The archive is written whole first: libdeflate compresses a buffer, not a stream.
pub fn write_initrd(
    tree: &Tree,
    mtime: u32,
    compression: InitrdCompression,
) -> anyhow::Result<Vec<u8>> {
    let archive = write_newc(tree, mtime, Vec::new())?;
    super::compress::compress(compression, &archive)
}

/// Writes `tree` as a newc archive (with its trailer) to `out` and returns `out`.
pub fn write_newc<W: Write>(tree: &Tree, mtime: u32, mut out: W) -> anyhow::Result<W> {
    let links = LinkGroups::of(tree)?;
    let subdirs = subdir_counts(tree);
    let mut next_ino = 1u32;
    let mut group_ino: HashMap<&TreePath, u32> = HashMap::new();

    for (path, node) in tree.iter() {
        if path.as_str() == TRAILER_NAME {
            bail!(
                "{path}: newc marks the end of an archive with an entry of this name, so the \
                 kernel would skip it (and cpio readers stop there); remove or rename it in the \
                 image"
            );
        }
        // A hard link is the file it names, under another name.
        let (inode_node, group) = match &node.kind {
            NodeKind::HardLink(target) => (links.file(tree, target)?, Some(target)),
            NodeKind::File(_) if links.members.contains_key(path) => (node, Some(path)),
            _ => (node, None),
        };
        let ino = match group {
            Some(leader) => *group_ino.entry(leader).or_insert_with(|| {
                next_ino += 1;
                next_ino - 1
            }),
            None => {
                next_ino += 1;
                next_ino - 1
            }
        };
        let (file_type, data, nlink, rdev): (ModeFileType, &[u8], u32, (u32, u32)) =
            match &inode_node.kind {
                NodeKind::Dir => (
                    ModeFileType::Directory,
                    &[],
                    2 + subdirs.get(path).copied().unwrap_or(0),
                    (0, 0),
                ),
                NodeKind::File(data) => match group {
                    Some(leader) => {
                        let members = &links.members[leader];
                        let last = members.last() == Some(&path);
                        let data: &[u8] = if last { data } else { &[] };
                        (ModeFileType::Regular, data, members.len() as u32, (0, 0))
                    }
                    None => (ModeFileType::Regular, data, 1, (0, 0)),
                },
                NodeKind::Symlink(target) => (ModeFileType::Symlink, target.as_bytes(), 1, (0, 0)),
                NodeKind::CharDevice { major, minor } => {
                    (ModeFileType::Char, &[], 1, (*major, *minor))
                }
                NodeKind::BlockDevice { major, minor } => {
                    (ModeFileType::Block, &[], 1, (*major, *minor))
                }
                NodeKind::Fifo => (ModeFileType::Fifo, &[], 1, (0, 0)),
                NodeKind::HardLink(_) => unreachable!("LinkGroups resolves links to files"),
            };
        let size = entry_size(path, data.len())?;
        let header = Builder::new(path.as_str())
            .ino(ino)
            .mode(inode_node.mode & 0o7777)
            .set_mode_file_type(file_type)
            .uid(inode_node.uid)
            .gid(inode_node.gid)
            .nlink(nlink)
            .mtime(mtime)
            .rdev_major(rdev.0)
            .rdev_minor(rdev.1);
        let mut entry = header.write(out, size);
        entry
            .write_all(data)
            .with_context(|| format!("writing {path} into the archive"))?;
        out = entry.finish()?;
    }
    cpio::newc::trailer(out).context("writing the archive trailer")
}

/// An entry's size as newc stores it: 32 bits, so 4 GiB or more is refused.
fn entry_size(path: &TreePath, len: usize) -> anyhow::Result<u32> {
    u32::try_from(len).map_err(|_| {
        anyhow::anyhow!(
            "{path}: {len} bytes; the newc format stores sizes in 32 bits, so entries of 4 GiB \
             or more cannot be packed. Leave the file out of the initrd (put it on a disk)"
        )
    })
}

/// The hard-link groups of a tree: each linked file with every path naming it, in archive order.
struct LinkGroups<'t> {
    members: HashMap<&'t TreePath, Vec<&'t TreePath>>,
}

impl<'t> LinkGroups<'t> {
    fn of(tree: &'t Tree) -> anyhow::Result<LinkGroups<'t>> {
        let mut members: HashMap<&TreePath, Vec<&TreePath>> = HashMap::new();
        for (path, node) in tree.iter() {
            if let NodeKind::HardLink(target) = &node.kind {
                match tree.get(target) {
                    Some(Node {
                        kind: NodeKind::File(_),
                        ..
                    }) => members.entry(target).or_default().push(path),
                    Some(_) => bail!(
                        "{path} is a hard link to {target}, which is not a regular file; \
                         only regular files can be hard-linked"
                    ),
                    None => bail!("{path} is a hard link to {target}, which is not in the tree"),
                }
            }
        }
        for (leader, paths) in &mut members {
            paths.push(leader);
            paths.sort();
        }
        Ok(LinkGroups { members })
    }

    fn file(&self, tree: &'t Tree, target: &TreePath) -> anyhow::Result<&'t Node> {
        tree.get(target)
            .with_context(|| format!("hard link target {target} is not in the tree"))
    }
}

/// How many subdirectories each directory has (a directory's link count is 2 plus that).
fn subdir_counts(tree: &Tree) -> HashMap<TreePath, u32> {
    let mut counts = HashMap::new();
    for (path, node) in tree.iter() {
        if node.kind == NodeKind::Dir
            && let Some(parent) = path.parent()
        {
            *counts.entry(parent).or_insert(0) += 1;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    fn p(s: &str) -> TreePath {
        TreePath::new(s).unwrap()
    }

    /// Every entry of an archive: (name, ino, mode, uid, gid, nlink, mtime, rdev, data).
    type Entry = (String, u32, u32, u32, u32, u32, u32, (u32, u32), Vec<u8>);

    fn entries(archive: &[u8]) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut rest = archive;
        loop {
            let mut reader = cpio::NewcReader::new(rest).unwrap();
            if reader.entry().is_trailer() {
                break;
            }
            let e = reader.entry();
            let meta = (
                e.name().to_owned(),
                e.ino(),
                e.mode(),
                e.uid(),
                e.gid(),
                e.nlink(),
                e.mtime(),
                (e.rdev_major(), e.rdev_minor()),
            );
            let mut data = Vec::new();
            reader.read_to_end(&mut data).unwrap();
            out.push((
                meta.0, meta.1, meta.2, meta.3, meta.4, meta.5, meta.6, meta.7, data,
            ));
            rest = reader.finish().unwrap();
        }
        out
    }

    fn sample() -> Tree {
        let mut tree = Tree::new();
        tree.insert(p("bin/busybox"), Node::file(0o4755, "BB"))
            .unwrap();
        tree.insert(p("bin/ls"), Node::symlink("busybox")).unwrap();
        tree.insert(
            p("a/link"),
            Node {
                kind: NodeKind::HardLink(p("bin/busybox")),
                mode: 0o644,
                uid: 9,
                gid: 9,
            },
        )
        .unwrap();
        tree.insert(p("dev/console"), Node::char_device(0o600, 5, 1))
            .unwrap();
        tree.insert(p("home/u/f"), Node::file(0o640, "x").owned_by(1000, 100))
            .unwrap();
        tree
    }

    #[test]
    fn entries_are_sorted_with_types_owners_devices_and_fixed_mtime() {
        let archive = write_newc(&sample(), 1234, Vec::new()).unwrap();
        let all = entries(&archive);
        let names: Vec<&str> = all.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "a",
                "a/link",
                "bin",
                "bin/busybox",
                "bin/ls",
                "dev",
                "dev/console",
                "home",
                "home/u",
                "home/u/f"
            ]
        );
        assert!(all.iter().all(|e| e.6 == 1234));
        let console = &all[6];
        assert_eq!(console.2, 0o020600);
        assert_eq!(console.7, (5, 1));
        let f = &all[9];
        assert_eq!(
            (f.2, f.3, f.4, f.8.as_slice()),
            (0o100640, 1000, 100, &b"x"[..])
        );
        let ls = &all[4];
        assert_eq!((ls.2, ls.8.as_slice()), (0o120777, &b"busybox"[..]));
        // `home` holds one directory: two links plus one.
        assert_eq!(all[7].5, 3);
    }

    #[test]
    fn hard_links_share_an_inode_and_carry_the_data_once_on_the_last_entry() {
        let archive = write_newc(&sample(), 0, Vec::new()).unwrap();
        let all = entries(&archive);
        let link = &all[1];
        let file = &all[3];
        assert_eq!(link.1, file.1, "one inode");
        assert_eq!((link.5, file.5), (2, 2));
        // The file's metadata, not the link node's.
        assert_eq!((link.2, link.3), (0o104755, 0));
        assert_eq!(link.8, b"");
        assert_eq!(file.8, b"BB");
        let mut inos: Vec<u32> = Vec::new();
        for e in &all {
            if !inos.contains(&e.1) {
                inos.push(e.1);
            }
        }
        assert_eq!(inos, (1..=9).collect::<Vec<u32>>(), "numbered in order");
    }

    #[test]
    fn a_link_to_a_missing_or_non_file_target_is_refused() {
        let mut tree = Tree::new();
        tree.insert(p("d"), Node::dir(0o755)).unwrap();
        let link = |to: &str| Node {
            kind: NodeKind::HardLink(p(to)),
            mode: 0o644,
            uid: 0,
            gid: 0,
        };
        tree.insert(p("l"), link("d")).unwrap();
        let err = write_newc(&tree, 0, Vec::new()).unwrap_err();
        assert!(err.to_string().contains("/l is a hard link to /d"), "{err}");
        tree.insert(p("l"), link("nowhere")).unwrap();
        let err = write_newc(&tree, 0, Vec::new()).unwrap_err();
        assert!(err.to_string().contains("not in the tree"), "{err}");
    }

    /// Found with the `newc_roundtrip` fuzz target's oracle: an image's top-level `TRAILER!!!`
    /// was written as the end of the archive (readers lost every entry after it; the kernel
    /// skipped it and forgot the hard links before it).
    #[test]
    fn an_entry_named_like_the_trailer_is_refused() {
        let mut tree = sample();
        tree.insert(p("TRAILER!!!"), Node::file(0o644, "x"))
            .unwrap();
        let err = write_newc(&tree, 0, Vec::new()).unwrap_err().to_string();
        assert!(err.starts_with("/TRAILER!!!: newc marks the end"), "{err}");
        // Below the root the name is an ordinary one.
        let mut tree = sample();
        tree.insert(p("a/TRAILER!!!"), Node::file(0o644, "x"))
            .unwrap();
        let archive = write_newc(&tree, 0, Vec::new()).unwrap();
        assert!(entries(&archive).iter().any(|e| e.0 == "a/TRAILER!!!"));
    }

    #[test]
    fn entries_of_4_gib_or_more_are_refused() {
        assert_eq!(entry_size(&p("big"), (1 << 32) - 1).unwrap(), u32::MAX);
        let err = entry_size(&p("big"), 1 << 32).unwrap_err().to_string();
        assert!(err.starts_with("/big: 4294967296 bytes"), "{err}");
        assert!(err.contains("4 GiB"), "{err}");
    }

    #[test]
    fn same_tree_same_bytes_and_gzip_header_is_fixed() {
        let a = write_initrd(&sample(), 0, InitrdCompression::Gzip).unwrap();
        let b = write_initrd(&sample(), 0, InitrdCompression::Gzip).unwrap();
        assert_eq!(a, b);
        // magic, CM=deflate, FLG=0 (no name, no comment), MTIME=0, XFL, OS=Unix.
        assert_eq!(&a[..8], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0]);
        assert_eq!(a[9], 3);
        let plain = crate::compression::Compression::Gzip
            .decode_all(&a)
            .unwrap();
        assert_eq!(plain, write_newc(&sample(), 0, Vec::new()).unwrap());
        assert_ne!(
            a,
            write_initrd(&sample(), 1, InitrdCompression::Gzip).unwrap(),
            "mtime is in the bytes"
        );
    }

    /// A tree with every kind of entry, odd modes and owners.
    fn rich() -> Tree {
        let mut tree = sample();
        tree.insert(p("etc"), Node::dir(0o700).owned_by(5, 6))
            .unwrap();
        tree.insert(p("etc/empty"), Node::file(0o600, "")).unwrap();
        tree.insert(p("etc/big"), Node::file(0o644, vec![7u8; 300_000]))
            .unwrap();
        tree.insert(p("tmp"), Node::dir(0o1777)).unwrap();
        tree.insert(p("usr/bin/sudo"), Node::file(0o6711, "s"))
            .unwrap();
        tree.insert(p("usr/lib/abs"), Node::symlink("/etc/big"))
            .unwrap();
        tree.insert(
            p("dev/vda"),
            Node {
                kind: NodeKind::BlockDevice {
                    major: 254,
                    minor: 0,
                },
                mode: 0o660,
                uid: 0,
                gid: 6,
            },
        )
        .unwrap();
        tree.insert(
            p("run/fifo"),
            Node {
                kind: NodeKind::Fifo,
                mode: 0o620,
                uid: 0,
                gid: 0,
            },
        )
        .unwrap();
        tree.insert(
            p("z/second-link"),
            Node {
                kind: NodeKind::HardLink(p("bin/busybox")),
                mode: 0,
                uid: 0,
                gid: 0,
            },
        )
        .unwrap();
        tree
    }

    /// GNU cpio, as root, reads the archive back into exactly the tree: types, modes, owners,
    /// link targets, device numbers, contents, hard links and mtimes.
    #[test]
    fn gnu_cpio_extracts_exactly_the_tree() {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let dir = tempfile::tempdir().unwrap();
        let probe = dir.path().join("probe");
        std::fs::write(&probe, "").unwrap();
        assert_eq!(
            std::fs::metadata(&probe).unwrap().uid(),
            0,
            "this test extracts owners and device nodes with GNU cpio, which needs root: run \
             `cargo xtask test` as root (CI does)"
        );
        let tree = rich();
        let mtime = 1_700_000_000;
        let gz = write_initrd(&tree, mtime, InitrdCompression::Gzip).unwrap();
        let archive = crate::compression::Compression::Gzip
            .decode_all(&gz)
            .unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let mut child = std::process::Command::new("cpio")
            .args([
                "-i",
                "-d",
                "-m",
                "--no-absolute-filenames",
                "--preserve-modification-time",
                "--quiet",
            ])
            .current_dir(&root)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("GNU cpio is installed (`cargo xtask test` installs it)");
        child.stdin.take().unwrap().write_all(&archive).unwrap();
        assert!(child.wait().unwrap().success());

        let mut seen = Vec::new();
        for entry in walkdir::WalkDir::new(&root)
            .min_depth(1)
            .sort_by_file_name()
        {
            let entry = entry.unwrap();
            let rel = entry
                .path()
                .strip_prefix(&root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            let meta = std::fs::symlink_metadata(entry.path()).unwrap();
            let node = tree
                .get(&p(&rel))
                .unwrap_or_else(|| panic!("extra entry {rel}"));
            let inode = match &node.kind {
                NodeKind::HardLink(target) => tree.get(target).unwrap(),
                _ => node,
            };
            let ft = meta.file_type();
            match &inode.kind {
                NodeKind::Dir => assert!(ft.is_dir(), "{rel}"),
                NodeKind::File(data) => {
                    assert!(ft.is_file(), "{rel}");
                    assert_eq!(&std::fs::read(entry.path()).unwrap(), data, "{rel}");
                }
                NodeKind::Symlink(target) => {
                    assert!(ft.is_symlink(), "{rel}");
                    assert_eq!(
                        std::fs::read_link(entry.path()).unwrap().to_str().unwrap(),
                        target
                    );
                }
                NodeKind::CharDevice { major, minor } | NodeKind::BlockDevice { major, minor } => {
                    assert!(ft.is_char_device() || ft.is_block_device(), "{rel}");
                    let is_char = matches!(inode.kind, NodeKind::CharDevice { .. });
                    assert_eq!(ft.is_char_device(), is_char, "{rel}");
                    let rdev = meta.rdev();
                    let (ma, mi) = (
                        ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff),
                        (rdev & 0xff) | ((rdev >> 12) & !0xff),
                    );
                    assert_eq!((ma as u32, mi as u32), (*major, *minor), "{rel}");
                }
                NodeKind::Fifo => assert!(ft.is_fifo(), "{rel}"),
                NodeKind::HardLink(_) => unreachable!(),
            }
            if !ft.is_symlink() {
                assert_eq!(meta.mode() & 0o7777, inode.mode, "{rel} mode");
            }
            assert_eq!(
                (meta.uid(), meta.gid()),
                (inode.uid, inode.gid),
                "{rel} owner"
            );
            // GNU cpio sets no mtime on symlinks, and directories' as it leaves them.
            if !ft.is_dir() && !ft.is_symlink() {
                assert_eq!(meta.mtime(), i64::from(mtime), "{rel} mtime");
            }
            seen.push(rel);
        }
        let expected: Vec<String> = tree
            .iter()
            .map(|(path, _)| path.as_str().to_owned())
            .collect();
        seen.sort();
        assert_eq!(seen, expected);
        let ino = |rel: &str| std::fs::metadata(root.join(rel)).unwrap().ino();
        assert_eq!(ino("a/link"), ino("bin/busybox"));
        assert_eq!(ino("z/second-link"), ino("bin/busybox"));
        assert_eq!(
            std::fs::metadata(root.join("bin/busybox")).unwrap().nlink(),
            3
        );
    }
}
