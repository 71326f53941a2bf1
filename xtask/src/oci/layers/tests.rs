//! The layer model against hand-made layers, including a corpus of malicious ones.

use system::hash::sha256_bytes;

use super::*;
use crate::rootfs::{Node, NodeKind};

fn p(s: &str) -> TreePath {
    TreePath::new(s).unwrap()
}

/// One tar entry, with the name and link written into the header as raw bytes, so that
/// entries no well-behaved writer would produce (`..`, absolute paths) can be made.
struct E {
    name: String,
    kind: tar::EntryType,
    data: Vec<u8>,
    link: String,
    mode: u32,
    uid: u64,
    gid: u64,
    dev: (u32, u32),
}

fn e(name: &str, kind: tar::EntryType) -> E {
    E {
        name: name.into(),
        kind,
        data: Vec::new(),
        link: String::new(),
        mode: if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        },
        uid: 0,
        gid: 0,
        dev: (0, 0),
    }
}

fn file(name: &str, data: &[u8]) -> E {
    E {
        data: data.to_vec(),
        ..e(name, tar::EntryType::Regular)
    }
}

fn dir(name: &str) -> E {
    e(name, tar::EntryType::Directory)
}

fn symlink(name: &str, target: &str) -> E {
    E {
        link: target.into(),
        mode: 0o777,
        ..e(name, tar::EntryType::Symlink)
    }
}

fn hardlink(name: &str, target: &str) -> E {
    E {
        link: target.into(),
        ..e(name, tar::EntryType::Link)
    }
}

fn whiteout(name: &str) -> E {
    file(name, b"")
}

fn tar_of(entries: &[E]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        {
            let gnu = header.as_gnu_mut().unwrap();
            gnu.name[..entry.name.len()].copy_from_slice(entry.name.as_bytes());
            gnu.linkname[..entry.link.len()].copy_from_slice(entry.link.as_bytes());
        }
        header.set_entry_type(entry.kind);
        header.set_mode(entry.mode);
        header.set_uid(entry.uid);
        header.set_gid(entry.gid);
        header.set_size(entry.data.len() as u64);
        if matches!(entry.kind, tar::EntryType::Char | tar::EntryType::Block) {
            header.set_device_major(entry.dev.0).unwrap();
            header.set_device_minor(entry.dev.1).unwrap();
        }
        header.set_cksum();
        builder.append(&header, entry.data.as_slice()).unwrap();
    }
    builder.into_inner().unwrap()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    Compression::Gzip.encode(bytes)
}

const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

fn apply_to(applier: &mut Applier, media_type: &str, blob: &[u8]) -> anyhow::Result<()> {
    let digest = Digest(sha256_bytes(blob));
    applier.apply(
        LayerInfo {
            digest: &digest,
            media_type,
            diff_id: None,
        },
        blob,
    )
}

/// Applies gzip layers made of `layers` in order.
fn apply(layers: &[&[E]]) -> anyhow::Result<Tree> {
    let mut applier = Applier::new(LayerLimits::default());
    for layer in layers {
        apply_to(&mut applier, GZIP, &gzip(&tar_of(layer)))?;
    }
    Ok(applier.into_tree())
}

fn names(tree: &Tree) -> Vec<&str> {
    tree.iter().map(|(path, _)| path.as_str()).collect()
}

#[test]
fn keeps_every_kind_mode_and_owner() {
    let tree = apply(&[&[
        dir("./"),
        dir("bin"),
        E {
            mode: 0o4755,
            uid: 0,
            ..file("bin/su", b"su")
        },
        E {
            mode: 0o1777,
            ..dir("tmp")
        },
        E {
            mode: 0o2755,
            uid: 1000,
            gid: 50,
            ..dir("home/user")
        },
        symlink("bin/sh", "/bin/busybox"),
        hardlink("bin/su2", "bin/su"),
        E {
            dev: (5, 1),
            mode: 0o600,
            ..e("dev/console", tar::EntryType::Char)
        },
        E {
            dev: (8, 0),
            mode: 0o660,
            gid: 6,
            ..e("dev/sda", tar::EntryType::Block)
        },
        e("run/fifo", tar::EntryType::Fifo),
    ]])
    .unwrap();
    assert_eq!(
        names(&tree),
        [
            "bin",
            "bin/sh",
            "bin/su",
            "bin/su2",
            "dev",
            "dev/console",
            "dev/sda",
            "home",
            "home/user",
            "run",
            "run/fifo",
            "tmp"
        ]
    );
    assert_eq!(tree.get(&p("bin/su")).unwrap(), &Node::file(0o4755, "su"));
    assert_eq!(tree.get(&p("tmp")).unwrap().mode, 0o1777);
    assert_eq!(
        tree.get(&p("home/user")).unwrap(),
        &Node::dir(0o2755).owned_by(1000, 50)
    );
    assert_eq!(
        tree.get(&p("bin/sh")).unwrap().kind,
        NodeKind::Symlink("/bin/busybox".into())
    );
    let link = tree.get(&p("bin/su2")).unwrap();
    assert_eq!(link.kind, NodeKind::HardLink(p("bin/su")));
    assert_eq!(link.mode, 0o4755);
    assert_eq!(
        tree.get(&p("dev/console")).unwrap(),
        &Node::char_device(0o600, 5, 1)
    );
    assert_eq!(
        tree.get(&p("dev/sda")).unwrap().kind,
        NodeKind::BlockDevice { major: 8, minor: 0 }
    );
    assert_eq!(tree.get(&p("run/fifo")).unwrap().kind, NodeKind::Fifo);
}

#[test]
fn later_layers_replace_and_whiteouts_remove() {
    let tree = apply(&[
        &[
            file("etc/a", b"1"),
            file("etc/b", b"1"),
            dir("var/cache/x"),
            file("var/cache/x/y", b"1"),
        ],
        &[
            file("etc/a", b"2"),
            whiteout("etc/.wh.b"),
            whiteout("var/.wh.cache"),
            whiteout("etc/.wh.never-existed"),
            E {
                mode: 0o700,
                ..dir("etc")
            },
        ],
    ])
    .unwrap();
    assert_eq!(names(&tree), ["etc", "etc/a", "var"]);
    assert_eq!(tree.get(&p("etc/a")).unwrap(), &Node::file(0o644, "2"));
    // A directory entry over a directory changes its metadata and keeps its content.
    assert_eq!(tree.get(&p("etc")).unwrap().mode, 0o700);
}

#[test]
fn opaque_directories_hide_lower_layers_only() {
    let lower: &[E] = &[
        file("d/old", b"1"),
        file("d/sub/old", b"1"),
        file("keep/x", b"1"),
    ];
    // The whiteout first (as Docker writes it) and last (as nothing forbids).
    for opaque_first in [true, false] {
        let mut upper = vec![file("d/new", b"2"), dir("d/sub2"), file("d/sub/new", b"2")];
        let opq = whiteout("d/.wh..wh..opq");
        if opaque_first {
            upper.insert(0, opq);
        } else {
            upper.push(opq);
        }
        let tree = apply(&[lower, &upper]).unwrap();
        assert_eq!(
            names(&tree),
            [
                "d",
                "d/new",
                "d/sub",
                "d/sub/new",
                "d/sub2",
                "keep",
                "keep/x"
            ],
            "opaque first: {opaque_first}"
        );
    }
}

#[test]
fn hard_links_survive_their_target_being_replaced() {
    let tree = apply(&[
        &[file("a", b"data"), hardlink("b", "a"), hardlink("c", "b")],
        &[whiteout(".wh.a")],
    ])
    .unwrap();
    assert_eq!(names(&tree), ["b", "c"]);
    assert_eq!(tree.get(&p("b")).unwrap(), &Node::file(0o644, "data"));
    assert_eq!(tree.get(&p("c")).unwrap().kind, NodeKind::HardLink(p("b")));

    let tree = apply(&[
        &[file("a", b"old"), hardlink("b", "a")],
        &[file("a", b"new")],
    ])
    .unwrap();
    assert_eq!(tree.get(&p("a")).unwrap(), &Node::file(0o644, "new"));
    assert_eq!(tree.get(&p("b")).unwrap(), &Node::file(0o644, "old"));

    // Replacing the link itself leaves the file alone.
    let tree = apply(&[
        &[file("a", b"old"), hardlink("b", "a")],
        &[file("b", b"mine"), hardlink("b", "a"), whiteout(".wh.b")],
    ])
    .unwrap();
    assert_eq!(names(&tree), ["a", "b"]);
}

#[test]
fn absolute_paths_are_confined() {
    let tree = apply(&[&[
        file("/etc/passwd", b"root"),
        hardlink("/etc/p2", "/etc/passwd"),
    ]])
    .unwrap();
    assert_eq!(names(&tree), ["etc", "etc/p2", "etc/passwd"]);
    assert_eq!(
        tree.get(&p("etc/p2")).unwrap().kind,
        NodeKind::HardLink(p("etc/passwd"))
    );
}

/// Every escape a real extractor must defend against; each is an error naming the layer.
#[test]
fn malicious_layers_are_refused() {
    let cases: Vec<(&str, Vec<E>, &str)> = vec![
        ("dot-dot", vec![file("../../etc/passwd", b"x")], "`..`"),
        ("dot-dot inside", vec![file("a/../../b", b"x")], "`..`"),
        (
            "write through a symlink",
            vec![symlink("etc", "/host/etc"), file("etc/passwd", b"x")],
            "below the symlink",
        ),
        (
            "write through a relative symlink",
            vec![dir("a"), symlink("a/up", "../../.."), file("a/up/x", b"x")],
            "below the symlink",
        ),
        (
            "directory through a symlink",
            vec![symlink("d", "/"), dir("d/x")],
            "below the symlink",
        ),
        (
            "whiteout through a symlink",
            vec![symlink("d", "/etc"), whiteout("d/.wh.passwd")],
            "below the symlink",
        ),
        (
            "opaque through a symlink",
            vec![symlink("d", "/etc"), whiteout("d/.wh..wh..opq")],
            "below the symlink",
        ),
        ("whiteout climbing", vec![whiteout("a/.wh...")], "`..`"),
        (
            "hard link outside",
            vec![hardlink("x", "../../etc/shadow")],
            "`..`",
        ),
        (
            "hard link to nothing",
            vec![hardlink("x", "etc/shadow")],
            "does not exist",
        ),
        (
            "hard link through a symlink",
            vec![symlink("s", "/etc"), hardlink("x", "s/shadow")],
            "below the symlink",
        ),
        (
            "hard link to a directory",
            vec![dir("d"), hardlink("x", "d")],
            "not a regular file",
        ),
        (
            "hard link to a symlink",
            vec![symlink("s", "/etc/shadow"), hardlink("x", "s")],
            "not a regular file",
        ),
        (
            "a file as a parent",
            vec![file("f", b"x"), file("f/g", b"y")],
            "not a directory",
        ),
        (
            "unknown entry type",
            vec![e("s", tar::EntryType::new(b'Z'))],
            "unsupported tar entry type",
        ),
    ];
    for (what, entries, expect) in cases {
        let blob = gzip(&tar_of(&entries));
        let digest = Digest(sha256_bytes(&blob));
        let mut applier = Applier::new(LayerLimits::default());
        let err = apply_to(&mut applier, GZIP, &blob).expect_err(what);
        let msg = format!("{err:#}");
        assert!(msg.contains(expect), "{what}: {msg}");
        assert!(msg.contains(&digest.to_string()), "{what}: {msg}");
    }
}

#[test]
fn decompression_bombs_stop_at_the_limit() {
    let big = vec![0u8; 8 << 20];
    let blob = gzip(&tar_of(&[file("zeros", &big)]));
    assert!(
        blob.len() < 64 << 10,
        "gzip of zeros is tiny: {}",
        blob.len()
    );
    let digest = Digest(sha256_bytes(&blob));
    let limits = LayerLimits {
        max_bytes: 1 << 20,
        ..LayerLimits::default()
    };
    let mut applier = Applier::new(limits);
    let msg = format!("{:#}", apply_to(&mut applier, GZIP, &blob).unwrap_err());
    assert!(msg.contains(&digest.to_string()), "{msg}");
    assert!(msg.contains("1048576"), "{msg}");

    // The limit counts across layers, and stops a stream of many small files too.
    let many: Vec<E> = (0..100)
        .map(|i| file(&format!("f{i}"), &[1u8; 20_000]))
        .collect();
    let blob = gzip(&tar_of(&many));
    let mut applier = Applier::new(limits);
    let msg = format!("{:#}", apply_to(&mut applier, GZIP, &blob).unwrap_err());
    assert!(msg.contains("decompressed bytes"), "{msg}");
}

#[test]
fn entry_counts_stop_at_the_limit() {
    let many: Vec<E> = (0..20).map(|i| file(&format!("f{i}"), b"")).collect();
    let blob = gzip(&tar_of(&many));
    let digest = Digest(sha256_bytes(&blob));
    let mut applier = Applier::new(LayerLimits {
        max_entries: 10,
        ..LayerLimits::default()
    });
    let msg = format!("{:#}", apply_to(&mut applier, GZIP, &blob).unwrap_err());
    assert!(
        msg.contains(&digest.to_string()) && msg.contains("10 entries"),
        "{msg}"
    );
}

#[test]
fn reads_plain_gzip_and_multi_frame_zstd_layers() {
    let tar = tar_of(&[file("a", b"hello"), file("b", &[7u8; 100_000])]);
    let mut expected = Applier::new(LayerLimits::default());
    apply_to(&mut expected, TAR, &tar).unwrap();
    let expected = expected.into_tree();
    assert_eq!(expected.len(), 2);

    let mut gz = Applier::new(LayerLimits::default());
    apply_to(&mut gz, GZIP, &gzip(&tar)).unwrap();
    assert_eq!(gz.into_tree(), expected);

    // Two zstd frames with a skippable frame between them.
    let (first, second) = tar.split_at(3000);
    let mut zst = Compression::Zstd.encode(first);
    zst.extend_from_slice(&0x184D2A50u32.to_le_bytes());
    zst.extend_from_slice(&4u32.to_le_bytes());
    zst.extend_from_slice(b"skip");
    zst.extend(Compression::Zstd.encode(second));
    let mut z = Applier::new(LayerLimits::default());
    apply_to(&mut z, ZSTD, &zst).unwrap();
    assert_eq!(z.into_tree(), expected);
    // Docker's media type, and an unknown (empty) one detected by magic.
    let mut z = Applier::new(LayerLimits::default());
    apply_to(&mut z, "", &zst).unwrap();
    assert_eq!(z.into_tree(), expected);
}

#[test]
fn media_type_and_content_must_agree() {
    let tar = tar_of(&[file("a", b"hello")]);
    let mut applier = Applier::new(LayerLimits::default());
    let msg = format!("{:#}", apply_to(&mut applier, GZIP, &tar).unwrap_err());
    assert!(msg.contains("refusing an ambiguous layer"), "{msg}");
    let msg = format!(
        "{:#}",
        apply_to(&mut applier, "application/vnd.in-toto+json", &tar).unwrap_err()
    );
    assert!(msg.contains("not a filesystem layer"), "{msg}");
}

#[test]
fn digests_and_diff_ids_are_checked() {
    let tar = tar_of(&[file("a", b"hello")]);
    let blob = gzip(&tar);
    let right = Digest(sha256_bytes(&blob));
    let wrong = Digest(sha256_bytes(b"other"));
    let diff_id = Digest(sha256_bytes(&tar));
    let mut applier = Applier::new(LayerLimits::default());
    let apply = |applier: &mut Applier, digest: &Digest, diff_id: Option<&Digest>| {
        applier.apply(
            LayerInfo {
                digest,
                media_type: GZIP,
                diff_id,
            },
            blob.as_slice(),
        )
    };
    apply(&mut applier, &right, Some(&diff_id)).unwrap();
    let msg = format!("{:#}", apply(&mut applier, &wrong, None).unwrap_err());
    assert!(msg.contains("corrupt"), "{msg}");
    let msg = format!(
        "{:#}",
        apply(&mut applier, &right, Some(&wrong)).unwrap_err()
    );
    assert!(msg.contains("diff_id"), "{msg}");
}

#[test]
fn xz_and_lz4_layers_are_refused_before_decoding() {
    for (compression, name) in [
        (Compression::Xz, "xz-compressed"),
        (Compression::Lz4Legacy, "lz4-compressed"),
    ] {
        let packed = compression.encode(&tar_of(&[file("a", b"hello")]));
        for media_type in ["", TAR] {
            let mut applier = Applier::new(LayerLimits::default());
            let msg = format!(
                "{:#}",
                apply_to(&mut applier, media_type, &packed).unwrap_err()
            );
            assert!(msg.contains(name), "{media_type:?}: {msg}");
            assert!(applier.into_tree().is_empty());
        }
    }
}
