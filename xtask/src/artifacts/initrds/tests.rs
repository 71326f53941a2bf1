//! The initrd stage against fake guest-init builds, fixture module trees and local OCI layouts.

use system::lock::{Base, Defaults, Initrd, UniqueMap};

use super::*;

fn v(name: &str) -> Version {
    Version::new(name).unwrap()
}

fn lock() -> Lock {
    let mut initrds = UniqueMap::default();
    for name in ["v1", "v2"] {
        initrds.insert(v(name), Initrd::default());
    }
    Lock {
        schema: system::lock::SCHEMA,
        defaults: Defaults {
            kernel: v("k"),
            initrd: v("v1"),
        },
        kernels: UniqueMap::default(),
        bases: UniqueMap::default(),
        initrds,
    }
}

fn plan() -> Plan {
    Plan {
        arches: Arch::ALL.to_vec(),
        ..Plan::default()
    }
}

/// A stand-in for the cross build: fast, and its bytes are under the test's control.
fn fake_guest_init(content: &'static str) -> impl FnMut(Arch) -> anyhow::Result<GuestBinaries> {
    move |arch| {
        let binary = |name: &str| {
            let bytes = format!("\x7fELF {name} {content} {arch}").into_bytes();
            let sha256 = system::hash::sha256_bytes(&bytes);
            crate::initrd::guest_init::GuestInit { bytes, sha256 }
        };
        Ok(GuestBinaries {
            guest_init: binary("init"),
            agent: binary("agent"),
        })
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: StoreWriter,
    lock: Lock,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = StoreWriter::open(dir.path()).unwrap();
        Fixture {
            _dir: dir,
            store,
            lock: lock(),
        }
    }

    fn sync(&mut self, plan: &Plan, content: &'static str) -> anyhow::Result<Report> {
        let mut report = Report::default();
        sync_initrds(
            &mut self.lock,
            &self.store,
            plan,
            &mut fake_guest_init(content),
            &mut report,
        )?;
        Ok(report)
    }

    fn output(&self, version: &str, arch: Arch) -> InitrdOutput {
        self.lock.initrds[version].outputs[&arch].clone()
    }
}

#[test]
fn built_once_then_reused_and_the_link_resolves_through_the_system_crate() {
    let mut f = Fixture::new();
    let report = f.sync(&plan(), "a").unwrap();
    assert_eq!(
        (report.built.len(), report.reused.len()),
        (4, 0),
        "{report}"
    );
    let out = f.output("v1", Arch::X86_64);
    assert_eq!(
        out.inputs.keys().collect::<Vec<_>>(),
        [INPUT_GUEST_INIT, INPUT_RECIPE]
    );
    let report = f.sync(&plan(), "a").unwrap();
    assert_eq!(
        (report.built.len(), report.reused.len()),
        (0, 4),
        "{report}"
    );

    let store = system::Store::with_lock(f._dir.path(), f.lock.clone());
    let path = store
        .initrd_path(&system::InitrdVersion::new("v1"), Arch::X86_64)
        .unwrap();
    assert_eq!(std::fs::metadata(path).unwrap().len(), out.size);
}

#[test]
fn one_changed_input_byte_rebuilds_and_only_what_it_feeds() {
    let mut f = Fixture::new();
    f.sync(&plan(), "a").unwrap();
    let before = f.output("v1", Arch::X86_64);
    let report = f.sync(&plan(), "b").unwrap();
    assert_eq!(report.built.len(), 4, "{report}");
    assert!(report.built[0].contains("was sha256:"), "{report}");
    let after = f.output("v1", Arch::X86_64);
    assert_ne!(before.sha256, after.sha256);
    assert_ne!(
        before.inputs[INPUT_GUEST_INIT],
        after.inputs[INPUT_GUEST_INIT]
    );
    assert_eq!(before.inputs[INPUT_RECIPE], after.inputs[INPUT_RECIPE]);

    // The mtime is a recipe input.
    let later = Plan {
        mtime: 1_700_000_000,
        ..plan()
    };
    let report = f.sync(&later, "b").unwrap();
    assert_eq!(report.built.len(), 4, "{report}");
    assert_ne!(
        f.output("v1", Arch::X86_64).inputs[INPUT_RECIPE],
        after.inputs[INPUT_RECIPE]
    );
}

#[test]
fn the_compression_is_a_recipe_input_and_the_blob_is_in_that_format() {
    use crate::compression::Compression;
    use system::lock::InitrdCompression;
    let only_v1 = Plan {
        versions: vec![v("v1")],
        arches: vec![Arch::X86_64],
        ..plan()
    };
    let mut f = Fixture::new();
    f.sync(&only_v1, "a").unwrap();
    let gzip = f.output("v1", Arch::X86_64);
    let blob = |f: &Fixture, out: &InitrdOutput| {
        std::fs::read(f.store.layout().blob(&out.sha256)).unwrap()
    };
    let archive = Compression::Gzip.decode_all(&blob(&f, &gzip)).unwrap();
    let mut seen = vec![gzip.inputs[INPUT_RECIPE]];
    for (compression, reader) in [
        (InitrdCompression::Zstd, Compression::Zstd),
        (InitrdCompression::Lz4, Compression::Lz4Legacy),
        (InitrdCompression::None, Compression::None),
    ] {
        f.lock.initrds.get_mut("v1").unwrap().compression = compression;
        let report = f.sync(&only_v1, "a").unwrap();
        assert_eq!(report.built.len(), 1, "{compression}: {report}");
        let out = f.output("v1", Arch::X86_64);
        assert!(!seen.contains(&out.inputs[INPUT_RECIPE]), "{compression}");
        seen.push(out.inputs[INPUT_RECIPE]);
        assert_eq!(out.inputs[INPUT_GUEST_INIT], gzip.inputs[INPUT_GUEST_INIT]);
        let bytes = blob(&f, &out);
        assert_eq!(Compression::from_magic(&bytes), reader, "{compression}");
        assert_eq!(reader.decode_all(&bytes).unwrap(), archive, "{compression}");
    }
    // With --locked, another compression than the recorded one is a changed input.
    f.lock.initrds.get_mut("v1").unwrap().compression = InitrdCompression::Gzip;
    let locked = Plan {
        locked: true,
        ..only_v1
    };
    let err = f.sync(&locked, "a").unwrap_err();
    let err = format!("{err:#}");
    assert!(err.contains("compression, SOURCE_DATE_EPOCH"), "{err}");
}

#[test]
fn an_agent_recipe_carries_the_agent_and_records_its_digest() {
    use crate::compression::Compression;
    use crate::rootfs::{NodeKind, TreePath};
    let mut f = Fixture::new();
    f.sync(&plan(), "a").unwrap();
    let without = f.output("v2", Arch::X86_64);
    f.lock.initrds.get_mut("v2").unwrap().agent = true;
    let report = f.sync(&plan(), "a").unwrap();
    // Only v2 changes; v1's recipe and inputs stay as they were.
    assert_eq!(
        (report.built.len(), report.reused.len()),
        (2, 2),
        "{report}"
    );
    let with = f.output("v2", Arch::X86_64);
    assert_eq!(
        with.inputs.keys().collect::<Vec<_>>(),
        [INPUT_AGENT, INPUT_GUEST_INIT, INPUT_RECIPE]
    );
    let agent = format!("\x7fELF agent a {}", Arch::X86_64).into_bytes();
    assert_eq!(
        with.inputs[INPUT_AGENT],
        Digest(system::hash::sha256_bytes(&agent))
    );
    assert_ne!(with.inputs[INPUT_RECIPE], without.inputs[INPUT_RECIPE]);
    assert_eq!(
        with.inputs[INPUT_GUEST_INIT],
        without.inputs[INPUT_GUEST_INIT]
    );
    let blob = std::fs::read(f.store.layout().blob(&with.sha256)).unwrap();
    let tree =
        crate::initrd::cpio_read::read_newc(&Compression::Gzip.decode_all(&blob).unwrap()).unwrap();
    let node = tree
        .get(&TreePath::new(recipe::AGENT_PATH).unwrap())
        .expect("the agent is in the archive");
    assert_eq!(
        (node.kind.clone(), node.mode),
        (NodeKind::File(agent), 0o755)
    );
    assert!(
        !f.output("v1", Arch::X86_64)
            .inputs
            .contains_key(INPUT_AGENT),
        "no agent input without the flag"
    );

    // The agent's bytes are an input: another agent rebuilds, and --locked refuses it.
    let locked = Plan {
        locked: true,
        versions: vec![v("v2")],
        ..plan()
    };
    let mut other_agent = |arch| {
        let mut built = fake_guest_init("a")(arch)?;
        built.agent.bytes = b"\x7fELF another agent".to_vec();
        built.agent.sha256 = system::hash::sha256_bytes(&built.agent.bytes);
        Ok(built)
    };
    let err = sync_initrds(
        &mut f.lock,
        &f.store,
        &locked,
        &mut other_agent,
        &mut Report::default(),
    )
    .unwrap_err();
    let err = format!("{err:#}");
    assert!(err.contains("agent (the guest agent's sources"), "{err}");
}

#[test]
fn the_same_inputs_give_the_same_initrd_in_another_store() {
    let mut a = Fixture::new();
    let mut b = Fixture::new();
    a.sync(&plan(), "a").unwrap();
    b.sync(&plan(), "a").unwrap();
    assert_eq!(a.lock, b.lock);
}

#[test]
fn a_missing_blob_is_rebuilt_even_when_locked() {
    let mut f = Fixture::new();
    f.sync(&plan(), "a").unwrap();
    let out = f.output("v1", Arch::Aarch64);
    let blob = f.store.layout().blob(&out.sha256);
    std::fs::remove_file(&blob).unwrap();
    let locked = Plan {
        locked: true,
        ..plan()
    };
    let report = f.sync(&locked, "a").unwrap();
    assert_eq!(
        (report.built.len(), report.reused.len()),
        (1, 3),
        "{report}"
    );
    assert!(
        report.built[0].contains("same digest as recorded"),
        "{report}"
    );
    assert!(blob.exists());
}

#[test]
fn locked_refuses_changed_inputs_naming_entry_and_digests() {
    let mut f = Fixture::new();
    f.sync(&plan(), "a").unwrap();
    let old = f.output("v2", Arch::X86_64);
    let locked = Plan {
        locked: true,
        versions: vec![v("v2")],
        arches: vec![Arch::X86_64],
        ..plan()
    };
    let err = f.sync(&locked, "b").unwrap_err().to_string();
    assert!(err.contains("initrd v2 x86_64"), "{err}");
    assert!(err.contains("guest-init (guest-init's sources"), "{err}");
    assert!(
        err.contains(&old.inputs[INPUT_GUEST_INIT].to_string()),
        "{err}"
    );
    assert_eq!(f.output("v2", Arch::X86_64), old, "the lock is untouched");
}

#[test]
fn locked_reproducibility_check_names_old_and_new_digest() {
    let mut f = Fixture::new();
    f.sync(&plan(), "a").unwrap();
    // Pretend the lock was written by a machine whose build came out differently.
    let real = f.output("v1", Arch::X86_64);
    let claimed = system::hash::sha256_bytes(b"another machine's initrd");
    f.lock
        .initrds
        .get_mut("v1")
        .unwrap()
        .outputs
        .get_mut(&Arch::X86_64)
        .unwrap()
        .sha256 = claimed;
    let locked = Plan {
        locked: true,
        versions: vec![v("v1")],
        arches: vec![Arch::X86_64],
        ..plan()
    };
    let err = f.sync(&locked, "a").unwrap_err().to_string();
    assert!(err.contains("initrd v1 x86_64"), "{err}");
    assert!(
        err.contains(&claimed.hex()) && err.contains(&real.sha256.hex()),
        "{err}"
    );
    assert!(err.contains("not reproducible"), "{err}");
}

#[test]
fn modules_come_from_the_modules_dir_and_are_an_input() {
    let dir = tempfile::tempdir().unwrap();
    let modules_dir = crate::initrd::modules_dir::tests::fixture(dir.path());
    let mut f = Fixture::new();
    f.lock.initrds.get_mut("v1").unwrap().modules = vec!["virtio_blk".into()];
    let one = Plan {
        versions: vec![v("v1")],
        arches: vec![Arch::X86_64],
        ..plan()
    };
    let err = f.sync(&one, "a").unwrap_err().to_string();
    assert!(err.contains("--modules-dir"), "{err}");

    let with_dir = Plan {
        modules_dir: Some(modules_dir.root.clone()),
        ..one.clone()
    };
    f.sync(&with_dir, "a").unwrap();
    let first = f.output("v1", Arch::X86_64);
    assert!(first.inputs.contains_key(INPUT_MODULES));

    // A module's content is an input: change one byte of a dependency.
    let ring = modules_dir
        .root
        .join("kernel/drivers/virtio/virtio_ring.ko");
    let mut bytes = std::fs::read(&ring).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&ring, bytes).unwrap();
    let report = f.sync(&with_dir, "a").unwrap();
    assert_eq!(report.built.len(), 1, "{report}");
    assert_ne!(
        f.output("v1", Arch::X86_64).inputs[INPUT_MODULES],
        first.inputs[INPUT_MODULES]
    );

    // The command line's list replaces the recipe's, and the lock records it.
    let overridden = Plan {
        modules: Some(vec!["overlay".into()]),
        ..with_dir
    };
    f.sync(&overridden, "a").unwrap();
    assert_eq!(f.lock.initrds["v1"].modules, ["overlay"]);
    let none = Plan {
        modules: Some(vec![String::new()]),
        ..overridden
    };
    f.sync(&none, "a").unwrap();
    assert!(f.lock.initrds["v1"].modules.is_empty());
    assert!(
        !f.output("v1", Arch::X86_64)
            .inputs
            .contains_key(INPUT_MODULES)
    );
}

#[test]
fn module_groups_are_built_in_and_change_the_recipe_and_modules_inputs() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let modules_dir = crate::initrd::modules_dir::tests::fixture(dir.path());
    let mut f = Fixture::new();
    let one = Plan {
        versions: vec![v("v1")],
        arches: vec![Arch::X86_64],
        modules_dir: Some(modules_dir.root.clone()),
        ..plan()
    };
    f.sync(&one, "a").unwrap();
    let plain = f.output("v1", Arch::X86_64);

    // Groups alone are enough to need the modules directory and to carry modules.
    f.lock.initrds.get_mut("v1").unwrap().module_groups.insert(
        v("rng"),
        system::lock::ModuleGroup {
            pci: vec!["1af4:1005".into()],
            modules: vec!["virtio_blk".into()],
            firmware: vec![],
        },
    );
    let no_dir = Plan {
        modules_dir: None,
        ..one.clone()
    };
    let err = f.sync(&no_dir, "a").unwrap_err().to_string();
    assert!(
        err.contains("virtio_blk") && err.contains("--modules-dir"),
        "{err}"
    );
    let report = f.sync(&one, "a").unwrap();
    assert_eq!(report.built.len(), 1, "{report}");
    let grouped = f.output("v1", Arch::X86_64);
    assert_ne!(grouped.inputs[INPUT_RECIPE], plain.inputs[INPUT_RECIPE]);
    assert!(grouped.inputs.contains_key(INPUT_MODULES));

    let blob = std::fs::read(f.store.layout().blob(&grouped.sha256)).unwrap();
    let mut archive = String::new();
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(&blob[..])
        .read_to_end(&mut raw)
        .unwrap();
    archive.push_str(&String::from_utf8_lossy(&raw));
    assert!(
        archive.contains(
            "group rng\npci 1af4:1005\n\
             module lib/modules/6.1.0-test/kernel/drivers/virtio/virtio_ring.ko\n"
        ),
        "the groups file is missing from the initrd"
    );

    // An invalid pattern names the initrd and the group.
    f.lock
        .initrds
        .get_mut("v1")
        .unwrap()
        .module_groups
        .get_mut("rng")
        .unwrap()
        .pci = vec!["1af4:15".into()];
    let err = f.sync(&one, "a").unwrap_err().to_string();
    assert!(
        err.contains("initrd v1 x86_64") && err.contains("module group `rng`: pci[0]"),
        "{err}"
    );
}

#[test]
fn a_base_image_initrd_fails_clearly_and_the_minimal_ones_are_still_built() {
    let mut f = Fixture::new();
    let digest = |s: &[u8]| Digest(system::hash::sha256_bytes(s));
    let mut manifests = UniqueMap::default();
    manifests.insert(Arch::X86_64, digest(b"manifest"));
    f.lock.bases.insert(
        v("alpine"),
        Base {
            reference: "127.0.0.1:9/library/alpine:3.22".into(),
            index: digest(b"index"),
            manifests,
        },
    );
    f.lock.initrds.get_mut("v2").unwrap().base = Some(v("alpine"));
    let offline = Plan {
        offline: true,
        arches: vec![Arch::X86_64],
        ..plan()
    };
    let err = f.sync(&offline, "a").unwrap_err().to_string();
    assert!(err.contains("initrd v2 x86_64"), "{err}");
    assert!(err.contains("base `alpine`"), "{err}");
    assert!(!f.lock.initrds["v1"].outputs.is_empty(), "v1 was built");
    assert!(
        f.lock.initrds["v2"].outputs.is_empty(),
        "nothing recorded for v2"
    );
}

#[test]
fn a_base_image_initrd_from_a_local_layout_carries_the_base_and_guest_init() {
    let mut f = Fixture::new();
    let images = tempfile::tempdir().unwrap();
    let layout = images.path().join("alpine");
    let image = testkit::oci::build_layout(&layout, "3.22", 1);
    f.lock.bases.insert(
        v("alpine"),
        Base {
            // Unreachable on purpose: the source flag must be what is used.
            reference: "registry.invalid/library/alpine:3.22".into(),
            index: image.index,
            manifests: UniqueMap(image.manifests.clone()),
        },
    );
    f.lock.initrds.get_mut("v2").unwrap().base = Some(v("alpine"));
    let mut plan = Plan {
        versions: vec![v("v2")],
        arches: vec![Arch::X86_64],
        ..plan()
    };
    plan.base_sources
        .insert(v("alpine"), format!("oci:{}:3.22", layout.display()));
    let report = f.sync(&plan, "a").unwrap();
    assert_eq!(report.built.len(), 1, "{report}");

    let out = f.output("v2", Arch::X86_64);
    assert_eq!(out.inputs[INPUT_BASE], image.manifests[&Arch::X86_64]);
    let blob = std::fs::read(f.store.layout().blob(&out.sha256)).unwrap();
    let mut archive = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&blob[..]), &mut archive).unwrap();
    let has = |needle: &[u8]| archive.windows(needle.len()).any(|w| w == needle);
    assert!(has(b"bin/busybox\0"), "the base's files are in the initrd");
    assert!(has(b"busybox for x86_64"), "the x86_64 layer was applied");
    assert!(has(b"\x7fELF init a x86_64"), "guest-init is /init");
    assert!(!has(b"\x7fELF agent"), "no agent without the recipe flag");
    assert!(has(b"init\0"));
}
