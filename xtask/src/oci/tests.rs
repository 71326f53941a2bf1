//! Pulls against a real registry (Debian's `docker-registry`, images pushed with skopeo), an
//! in-process registry for faults, and umoci/skopeo reading our cache.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use system::Arch;
use system::lock::Digest;

use super::*;
use crate::rootfs::{NodeKind, TreePath};
use testkit::oci::{DockerRegistry, build_layout, require_tool};

pub(super) fn options() -> PullOptions {
    let mut options = PullOptions::default();
    options.transfer.backoff = std::time::Duration::from_millis(10);
    options
}

/// [`options`] with the network off: the cache alone.
pub(super) fn offline() -> PullOptions {
    PullOptions {
        offline: true,
        ..options()
    }
}

/// Runs an OCI tool that must succeed (`what` names it in the failure) and returns its stdout.
fn run_tool(command: &mut Command, what: &str) -> Vec<u8> {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `skopeo inspect` of the image tagged `name` in the OCI layout `cache`.
fn skopeo_inspect(cache: &Path, name: &str) -> serde_json::Value {
    let out = run_tool(
        Command::new("/usr/bin/skopeo")
            .args(["--insecure-policy", "inspect"])
            .arg(format!("oci:{}:{name}", cache.display())),
        &format!("skopeo inspect oci:…:{name}"),
    );
    serde_json::from_slice(&out).unwrap()
}

pub(super) fn p(s: &str) -> TreePath {
    TreePath::new(s).unwrap()
}

/// What the fixture's three layers add up to, for `arch`.
pub(super) fn assert_fixture_tree(tree: &Tree, arch: Arch) {
    let file = |path: &str| match &tree.get(&p(path)).unwrap_or_else(|| panic!("{path}")).kind {
        NodeKind::File(data) => String::from_utf8(data.clone()).unwrap(),
        other => panic!("{path} is {other:?}"),
    };
    assert_eq!(file("etc/arch"), arch.oci_arch());
    assert_eq!(file("etc/passwd"), "root:x:0:0::/root:/bin/ash\n");
    // busybox was whited out; its hard link keeps the content.
    assert_eq!(file("bin/ls"), format!("busybox for {arch}"));
    assert_eq!(
        tree.get(&p("bin/busybox")).unwrap().kind,
        NodeKind::Symlink("ls".into())
    );
    assert_eq!(tree.get(&p("bin/su")).unwrap().mode, 0o4755);
    assert_eq!(tree.get(&p("tmp")).unwrap().mode, 0o1777);
    assert!(tree.get(&p("var/cache/apk")).is_none());
    assert!(tree.get(&p("usr/lib/old")).is_none());
    assert_eq!(file("usr/lib/new/b"), "new");
    assert_eq!(
        tree.get(&p("dev/loop0")).unwrap().kind,
        NodeKind::BlockDevice { major: 7, minor: 0 }
    );
    assert_eq!(tree.get(&p("home/user")).unwrap().uid, 1000);
    assert_eq!(
        tree.get(&p("etc/motd2")).unwrap().kind,
        NodeKind::HardLink(p("etc/motd"))
    );
}

#[test]
fn pulls_by_tag_and_digest_from_a_real_registry_per_arch() {
    let registry = DockerRegistry::start();
    let work = tempfile::tempdir().unwrap();
    let fixture = build_layout(&work.path().join("layout"), "v1", 1);
    let base = registry.push(&fixture.dir, "v1", "fixture:v1");
    let reference = base.reference.clone();
    let cache = work.path().join("oci-cache");

    for arch in [Arch::X86_64, Arch::Aarch64] {
        let pulled = pull_base(&options(), &base, arch, &cache).unwrap();
        assert_eq!(pulled.index_digest, base.index);
        assert_eq!(pulled.manifest_digest, base.manifests[&arch]);
        assert!(pulled.updated_pins.is_none());
        assert_fixture_tree(&pulled.tree, arch);
    }

    // By digest: the reference cannot move, and the cache already has everything.
    let by_digest = Base {
        reference: format!("{reference}@{}", base.index),
        ..base.clone()
    };
    let pulled = pull_base(&options(), &by_digest, Arch::X86_64, &cache).unwrap();
    assert!(pulled.updated_pins.is_none());
    assert_eq!(pulled.manifest_digest, base.manifests[&Arch::X86_64]);

    // A second pull by tag downloads no blob.
    let before = registry.blob_requests();
    assert!(before > 0, "the first pulls fetched blobs");
    let again = pull_base(&options(), &base, Arch::X86_64, &cache).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(
        registry.blob_requests(),
        before,
        "no blob requests on a warm cache"
    );
    assert_fixture_tree(&again.tree, Arch::X86_64);

    // Other OCI tools read the cache.
    require_tool("/usr/bin/skopeo", "skopeo");
    let name = format!("{reference}-amd64");
    let inspected = skopeo_inspect(&cache, &name);
    assert_eq!(inspected["Architecture"], "amd64");
    assert_eq!(inspected["Layers"].as_array().unwrap().len(), 3);
    let out = run_tool(
        Command::new("/usr/bin/skopeo")
            .args(["--insecure-policy", "inspect", "--raw"])
            .arg(format!("oci:{}:{reference}", cache.display())),
        &format!("skopeo inspect --raw oci:…:{reference}"),
    );
    assert_eq!(Digest(system::hash::sha256_bytes(&out)), base.index);
}

#[test]
fn our_tree_matches_what_umoci_unpacks() {
    require_tool("/usr/bin/umoci", "umoci");
    let work = tempfile::tempdir().unwrap();
    let fixture = build_layout(&work.path().join("layout"), "v1", 1);
    let cache = work.path().join("oci-cache");
    let source = format!("oci:{}:v1", fixture.dir.display());
    let base = fixture.base("fixture.example/fixture:v1");
    let options = PullOptions {
        source: Some(source),
        ..options()
    };
    let pulled = pull_base(&options, &base, Arch::X86_64, &cache).unwrap();
    assert_fixture_tree(&pulled.tree, Arch::X86_64);

    let rootfs = work.path().join("rootfs");
    let root = unsafe_is_root();
    let mut umoci = Command::new("/usr/bin/umoci");
    umoci.args(["raw", "unpack"]);
    if !root {
        umoci.arg("--rootless");
    }
    umoci
        .arg("--image")
        .arg(format!(
            "{}:fixture.example/fixture:v1-amd64",
            cache.display()
        ))
        .arg(&rootfs);
    run_tool(&mut umoci, "umoci raw unpack");
    let theirs = describe_dir(&rootfs, root);
    let ours = describe_tree(&pulled.tree, root);
    let only_theirs: Vec<_> = theirs
        .iter()
        .filter(|(k, v)| ours.get(*k) != Some(v))
        .collect();
    let only_ours: Vec<_> = ours
        .iter()
        .filter(|(k, v)| theirs.get(*k) != Some(v))
        .collect();
    assert!(
        only_theirs.is_empty() && only_ours.is_empty(),
        "umoci differs:\n umoci: {only_theirs:#?}\n ours: {only_ours:#?}"
    );
}

fn unsafe_is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// path → a comparable description: type, mode, owner, content or target, device numbers;
/// hard links are named by the first path (in sorted order) of their inode.
fn describe_dir(root: &Path, with_owners: bool) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut first_of_inode: BTreeMap<u64, String> = BTreeMap::new();
    let mut paths: Vec<_> = walkdir::WalkDir::new(root)
        .min_depth(1)
        .sort_by_file_name()
        .into_iter()
        .map(|e| e.unwrap().into_path())
        .collect();
    paths.sort();
    for path in paths {
        let rel = path
            .strip_prefix(root)
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let ft = meta.file_type();
        let owner = if with_owners {
            format!(" {}:{}", meta.uid(), meta.gid())
        } else {
            String::new()
        };
        let mode = meta.mode() & 0o7777;
        let what = if ft.is_dir() {
            format!("dir {mode:o}{owner}")
        } else if ft.is_symlink() {
            format!(
                "symlink -> {}{owner}",
                std::fs::read_link(&path).unwrap().display()
            )
        } else if ft.is_file() {
            let content = String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned();
            let first = first_of_inode.entry(meta.ino()).or_insert(rel.clone());
            format!("file {mode:o}{owner} {content:?} inode-of {first}")
        } else if ft.is_char_device() || ft.is_block_device() {
            let rdev = meta.rdev();
            let (major, minor) = (
                ((rdev >> 8) & 0xfff) as u32,
                ((rdev & 0xff) | ((rdev >> 12) & 0xfff00)) as u32,
            );
            let kind = if ft.is_char_device() { "char" } else { "block" };
            format!("{kind} {mode:o}{owner} {major}:{minor}")
        } else if ft.is_fifo() {
            format!("fifo {mode:o}{owner}")
        } else {
            format!("other {ft:?}")
        };
        out.insert(rel, what);
    }
    out
}

fn describe_tree(tree: &Tree, with_owners: bool) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    // The first name (sorted) of each hard-linked file, as describe_dir sees it.
    let mut first: BTreeMap<String, String> = BTreeMap::new();
    for (path, node) in tree.iter() {
        let file = match &node.kind {
            NodeKind::HardLink(target) => target.as_str().to_owned(),
            NodeKind::File(_) => path.as_str().to_owned(),
            _ => continue,
        };
        first.entry(file).or_insert(path.as_str().to_owned());
    }
    for (path, node) in tree.iter() {
        let owner = if with_owners {
            format!(" {}:{}", node.uid, node.gid)
        } else {
            String::new()
        };
        let mode = node.mode;
        let file = |data: &[u8], of: &str| {
            format!(
                "file {mode:o}{owner} {:?} inode-of {}",
                String::from_utf8_lossy(data),
                first[of]
            )
        };
        let what = match &node.kind {
            NodeKind::Dir => format!("dir {mode:o}{owner}"),
            NodeKind::Symlink(t) => format!("symlink -> {t}{owner}"),
            NodeKind::File(data) => file(data, path.as_str()),
            NodeKind::HardLink(target) => match &tree.get(target).unwrap().kind {
                NodeKind::File(data) => file(data, target.as_str()),
                other => panic!("link to {other:?}"),
            },
            NodeKind::CharDevice { major, minor } => {
                format!("char {mode:o}{owner} {major}:{minor}")
            }
            NodeKind::BlockDevice { major, minor } => {
                format!("block {mode:o}{owner} {major}:{minor}")
            }
            NodeKind::Fifo => format!("fifo {mode:o}{owner}"),
        };
        out.insert(path.as_str().to_owned(), what);
    }
    if !with_owners {
        // Rootless umoci creates no device nodes.
        out.retain(|_, v| !v.starts_with("char") && !v.starts_with("block"));
    }
    out
}

#[test]
fn a_moved_tag_changes_nothing_until_update_base_records_it() {
    let registry = DockerRegistry::start();
    let work = tempfile::tempdir().unwrap();
    let v1 = build_layout(&work.path().join("v1"), "v1", 1);
    let v2 = build_layout(&work.path().join("v2"), "v1", 2);
    assert_ne!(v1.index, v2.index);
    assert_ne!(v1.manifests, v2.manifests);
    let pinned = registry.push(&v1.dir, "v1", "fixture:stable");
    let cache = work.path().join("oci-cache");
    let locked = PullOptions {
        locked: true,
        ..options()
    };
    // Locked: a lock without this arch's pin is drift.
    let mut partial = pinned.clone();
    partial.manifests.remove(&Arch::Aarch64);
    let err = format!(
        "{:#}",
        pull_base(&locked, &partial, Arch::Aarch64, &cache).unwrap_err()
    );
    assert!(err.contains("aarch64") && err.contains("--locked"), "{err}");
    // Unlocked, it is recorded from the pinned index (the tag is not looked up).
    let pulled = pull_base(&options(), &partial, Arch::Aarch64, &cache).unwrap();
    assert_eq!(pulled.updated_pins.as_ref(), Some(&pinned));
    pull_base(&locked, &pinned, Arch::X86_64, &cache).unwrap();

    let moved = registry.push(&v2.dir, "v1", "fixture:stable");
    assert_ne!(moved.index, pinned.index);
    // The lock wins, with or without --locked: the pinned image, no new pins.
    for opts in [&locked, &options()] {
        let pulled = pull_base(opts, &pinned, Arch::X86_64, &cache).unwrap();
        assert!(pulled.updated_pins.is_none());
        assert_eq!(pulled.index_digest, pinned.index);
        assert_eq!(
            pulled.tree.get(&p("etc/motd")).unwrap().kind,
            NodeKind::File(b"release 1\n".to_vec())
        );
    }

    // `lock update-base`: the tag is resolved, every architecture pinned anew.
    let resolved = resolve_base(&options(), &partial, &cache).unwrap();
    assert_eq!(resolved, moved);
    let pulled = pull_base(&locked, &resolved, Arch::X86_64, &cache).unwrap();
    assert_eq!(
        pulled.tree.get(&p("etc/motd")).unwrap().kind,
        NodeKind::File(b"release 2\n".to_vec())
    );
    let offline = offline();
    let err = format!("{:#}", resolve_base(&offline, &pinned, &cache).unwrap_err());
    assert!(err.contains("--offline"), "{err}");
}

#[test]
fn offline_reads_the_cache_alone_and_lists_what_is_missing() {
    let work = tempfile::tempdir().unwrap();
    let fixture = build_layout(&work.path().join("layout"), "v1", 1);
    let cache = work.path().join("oci-cache");
    // Nothing listens here: offline must not try.
    let base = fixture.base("127.0.0.1:9/fixture:v1");
    let offline = offline();
    let err = format!(
        "{:#}",
        pull_base(&offline, &base, Arch::X86_64, &cache).unwrap_err()
    );
    assert!(
        err.contains(&fixture.index.to_string()) && err.contains("--offline"),
        "{err}"
    );

    // Fill the cache from the local layout, but only the index and manifest: then offline names
    // the config and each missing layer.
    let layout = cache::OciLayout::open(&fixture.dir).unwrap();
    let ours = cache::OciLayout::create(&cache).unwrap();
    for d in [fixture.index, fixture.manifests[&Arch::X86_64]] {
        ours.put_bytes(&d, &layout.read_blob(&d, 1 << 20).unwrap())
            .unwrap();
    }
    let err = format!(
        "{:#}",
        pull_base(&offline, &base, Arch::X86_64, &cache).unwrap_err()
    );
    assert!(err.contains("config"), "{err}");
    for layer in &fixture.layers[&Arch::X86_64] {
        assert!(err.contains(&layer.to_string()), "{layer}: {err}");
    }

    let from_layout = PullOptions {
        source: Some(format!("oci:{}:v1", fixture.dir.display())),
        ..options()
    };
    pull_base(&from_layout, &base, Arch::X86_64, &cache).unwrap();
    assert_eq!(resolve_base(&from_layout, &base, &cache).unwrap(), base);
    // A layout holding another image: the lock's digests decide, and the error says how to pin.
    let other = build_layout(&work.path().join("other"), "v1", 2);
    let from_other = PullOptions {
        source: Some(format!("oci:{}:v1", other.dir.display())),
        ..options()
    };
    let err = format!(
        "{:#}",
        pull_base(&from_other, &base, Arch::Aarch64, &cache).unwrap_err()
    );
    assert!(err.contains("lock update-base"), "{err}");
    let pulled = pull_base(&offline, &base, Arch::X86_64, &cache).unwrap();
    assert_fixture_tree(&pulled.tree, Arch::X86_64);
}

/// Reads a cached image back with skopeo (config) and umoci (unpack), as the README promises.
fn read_back_with_skopeo_and_umoci(cache: &Path, name: &str, arch: Arch, work: &Path) {
    require_tool("/usr/bin/skopeo", "skopeo");
    require_tool("/usr/bin/umoci", "umoci");
    let inspected = skopeo_inspect(cache, name);
    assert_eq!(inspected["Architecture"], arch.oci_arch());
    let rootfs = work.join(format!("unpacked-{}", arch.oci_arch()));
    run_tool(
        Command::new("/usr/bin/umoci")
            .args(["raw", "unpack", "--rootless", "--image"])
            .arg(format!("{}:{name}", cache.display()))
            .arg(&rootfs),
        &format!("umoci raw unpack {name}"),
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("etc/arch")).unwrap(),
        arch.oci_arch()
    );
}

#[test]
fn docker_v2s2_images_are_cached_so_skopeo_and_umoci_read_them() {
    let registry = DockerRegistry::start();
    let work = tempfile::tempdir().unwrap();
    let mut fixture = build_layout(&work.path().join("layout"), "v1", 1);
    testkit::oci::strip_attestations(&mut fixture);
    // A single-platform v2s2 image, and a v2s2 manifest list.
    let single = registry.push_with(
        &fixture.dir,
        "v1",
        "fixture:single",
        &["--format", "v2s2", "--override-arch", "arm64"],
    );
    let list = registry.push_with(
        &fixture.dir,
        "v1",
        "fixture:list",
        &["--format", "v2s2", "--all"],
    );
    let cache = work.path().join("oci-cache");
    for (base, arch) in [
        (&single, Arch::Aarch64),
        (&list, Arch::X86_64),
        (&list, Arch::Aarch64),
    ] {
        let pulled = pull_base(&options(), base, arch, &cache).unwrap();
        assert!(pulled.updated_pins.is_none(), "{base:?}");
        assert_fixture_tree(&pulled.tree, arch);
        let name = format!("{}-{}", base.reference, arch.oci_arch());
        read_back_with_skopeo_and_umoci(&cache, &name, arch, work.path());
        // The image as a whole too (skopeo picks the platform from the index).
        run_tool(
            Command::new("/usr/bin/skopeo")
                .args(["--insecure-policy", "--override-arch", arch.oci_arch()])
                .args(["inspect"])
                .arg(format!("oci:{}:{}", cache.display(), base.reference)),
            &format!("skopeo inspect {}", base.reference),
        );
    }
    // `lock update-base` finds a single-platform image's architecture in its config.
    let mut unpinned = single.clone();
    unpinned.manifests.clear();
    assert_eq!(resolve_base(&options(), &unpinned, &cache).unwrap(), single);
    // The pulled Docker documents stay in the cache under the pinned digests: offline works.
    let offline = offline();
    drop(registry);
    let pulled = pull_base(&offline, &list, Arch::X86_64, &cache).unwrap();
    assert_fixture_tree(&pulled.tree, Arch::X86_64);
}
