//! Reading a newc archive back into a [`Tree`]: the check that what [`super::cpio::write_newc`]
//! wrote is the tree it was given (the round-trip test and the `newc_roundtrip` fuzz target).
//!
//! Hard links come back as the writer numbers them: entries sharing an inode form a group, the
//! first entry in archive order is the file, the later ones link to it, and the content is the
//! one entry that carries data (the writer puts it on the last).

use std::collections::HashMap;
use std::io::Read;

use anyhow::{Context, bail};

use crate::rootfs::{Node, NodeKind, Tree, TreePath};

/// The file type bits of a newc `mode`.
const S_IFMT: u32 = 0o170000;

/// Parses `archive` (uncompressed newc, up to its trailer) into a tree.
pub fn read_newc(archive: &[u8]) -> anyhow::Result<Tree> {
    let mut tree = Tree::new();
    let mut groups: HashMap<u32, TreePath> = HashMap::new();
    let mut rest = archive;
    loop {
        let offset = archive.len() - rest.len();
        let mut reader =
            cpio::NewcReader::new(rest).with_context(|| format!("newc header at byte {offset}"))?;
        let entry = reader.entry();
        if entry.is_trailer() {
            return Ok(tree);
        }
        let name = entry.name().to_owned();
        let path = TreePath::new(&name).with_context(|| format!("newc entry at byte {offset}"))?;
        let (ino, mode, uid, gid, nlink) = (
            entry.ino(),
            entry.mode(),
            entry.uid(),
            entry.gid(),
            entry.nlink(),
        );
        let (major, minor) = (entry.rdev_major(), entry.rdev_minor());
        let mut data = Vec::new();
        reader
            .read_to_end(&mut data)
            .with_context(|| format!("reading the content of {path}"))?;
        rest = reader
            .finish()
            .with_context(|| format!("the end of {path}"))?;
        let kind = match mode & S_IFMT {
            0o040000 => NodeKind::Dir,
            0o100000 if nlink > 1 => match groups.get(&ino) {
                Some(first) => {
                    if !data.is_empty() {
                        match tree.get(first).map(|n| n.kind.clone()) {
                            Some(NodeKind::File(_)) => {
                                let node = tree.get(first).expect("just read").clone();
                                tree.insert(
                                    first.clone(),
                                    Node {
                                        kind: NodeKind::File(data),
                                        ..node
                                    },
                                )?;
                            }
                            _ => bail!(
                                "{path}: inode {ino}'s first name {first} is no longer a file"
                            ),
                        }
                    }
                    NodeKind::HardLink(first.clone())
                }
                None => {
                    groups.insert(ino, path.clone());
                    NodeKind::File(data)
                }
            },
            0o100000 => NodeKind::File(data),
            0o120000 => NodeKind::Symlink(
                String::from_utf8(data).with_context(|| format!("{path}: symlink target"))?,
            ),
            0o020000 => NodeKind::CharDevice { major, minor },
            0o060000 => NodeKind::BlockDevice { major, minor },
            0o010000 => NodeKind::Fifo,
            other => bail!("{path}: unknown file type {other:o} in mode {mode:o}"),
        };
        tree.insert(
            path,
            Node {
                kind,
                mode: mode & 0o7777,
                uid,
                gid,
            },
        )?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::initrd::cpio::write_newc;

    fn p(s: &str) -> TreePath {
        TreePath::new(s).unwrap()
    }

    #[test]
    fn what_the_writer_writes_reads_back_as_the_tree() {
        let mut tree = Tree::new();
        tree.insert(p("bin/a"), Node::file(0o4755, "AA").owned_by(1, 2))
            .unwrap();
        tree.insert(p("bin/z"), Node::symlink("a")).unwrap();
        tree.insert(
            p("b-link"),
            Node {
                kind: NodeKind::HardLink(p("bin/a")),
                mode: 0o4755,
                uid: 1,
                gid: 2,
            },
        )
        .unwrap();
        tree.insert(p("dev/console"), Node::char_device(0o600, 5, 1))
            .unwrap();
        tree.insert(
            p("dev/vda"),
            Node {
                kind: NodeKind::BlockDevice {
                    major: u32::MAX,
                    minor: 7,
                },
                mode: 0o660,
                uid: 0,
                gid: 6,
            },
        )
        .unwrap();
        tree.insert(p("tmp"), Node::dir(0o1777)).unwrap();
        let archive = write_newc(&tree, 5, Vec::new()).unwrap();
        let back = read_newc(&archive).unwrap();
        // The first name of a hard-link group in archive order is the file.
        let mut expected = tree.clone();
        expected
            .insert(p("b-link"), Node::file(0o4755, "AA").owned_by(1, 2))
            .unwrap();
        expected
            .insert(
                p("bin/a"),
                Node {
                    kind: NodeKind::HardLink(p("b-link")),
                    mode: 0o4755,
                    uid: 1,
                    gid: 2,
                },
            )
            .unwrap();
        assert_eq!(back, expected);
    }

    #[test]
    fn garbage_and_truncation_are_errors_naming_the_offset() {
        let err = read_newc(b"not an archive").unwrap_err();
        assert!(
            format!("{err:#}").contains("newc header at byte 0"),
            "{err:#}"
        );
        let mut tree = Tree::new();
        tree.insert(p("f"), Node::file(0o644, "x")).unwrap();
        let archive = write_newc(&tree, 0, Vec::new()).unwrap();
        let err = read_newc(&archive[..archive.len() - 120]).unwrap_err();
        assert!(
            format!("{err:#}").contains("newc header at byte"),
            "{err:#}"
        );
    }
}
