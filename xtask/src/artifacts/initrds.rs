//! The initrd stage: for every `initrds.<version>` of the lock and every selected architecture,
//! a gzip-compressed newc archive of the recipe's tree, stored as a blob with its named link
//! `initrd/<version>/<arch>/initrd`, and recorded in the lock with the digests of its inputs.
//!
//! ```text
//! inputs: base manifest digest ─┐ (lock.bases[base].manifests[arch])
//!         guest-init sha256 ────┤ (cargo build --target <arch>-unknown-linux-musl, static check)
//!         modules digest ───────┤ (modules.dep closure, decompressed, in load order)
//!         recipe digest ────────┘ (canonical JSON: base, builder, modules, mtime)
//!   same as the lock and blob verified → reused (nothing is pulled or assembled)
//!   otherwise → assemble tree → newc + gzip → store blob → link → lock outputs
//! ```
//!
//! Under `--locked` a rebuilt initrd must come out byte for byte as the lock says: that is the
//! reproducibility check.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use system::lock::{InitrdOutput, Version};
use system::{Arch, Digest, Lock};

use super::Report;
use crate::initrd::guest_init::GuestInit;
use crate::initrd::modules::{ModuleSet, ModulesDir};
use crate::initrd::recipe::{self, Recipe};
use crate::initrd::{INPUT_BASE, INPUT_GUEST_INIT, INPUT_MODULES, INPUT_RECIPE, cpio};
use crate::rootfs::Tree;
use crate::store::StoreWriter;

/// Which initrds, and how.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Versions to sync; empty means every initrd in the lock.
    pub versions: Vec<Version>,
    pub arches: Vec<Arch>,
    pub offline: bool,
    pub locked: bool,
    /// Where recipes' kernel modules come from.
    pub modules_dir: Option<PathBuf>,
    /// Replaces the selected recipes' module lists (and is recorded in the lock).
    pub modules: Option<Vec<String>>,
    /// Every entry's mtime.
    pub mtime: u32,
    /// Sources that replace a base's lock reference (`--base-source`), by base name.
    pub base_sources: BTreeMap<Version, String>,
    /// Timeouts, attempts and progress of registry pulls (the same as for kernel downloads).
    pub transfer: crate::fetch::Options,
}

/// Makes the store hold every initrd `plan` selects, building those whose inputs changed (or
/// whose blob is gone) and recording them in `lock`. `guest_init` builds guest-init for an
/// architecture; it is called once per architecture.
pub fn sync_initrds(
    lock: &mut Lock,
    store: &StoreWriter,
    plan: &Plan,
    guest_init: &mut dyn FnMut(Arch) -> anyhow::Result<GuestInit>,
    report: &mut Report,
) -> anyhow::Result<()> {
    let versions: Vec<Version> = if plan.versions.is_empty() {
        lock.initrds.keys().cloned().collect()
    } else {
        plan.versions.clone()
    };
    for version in &versions {
        if !lock.initrds.contains_key(version) {
            bail!("initrd {version} is not in the lock");
        }
    }
    if let Some(names) = &plan.modules {
        // `--modules ""` means none.
        let names: Vec<String> = names
            .iter()
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty())
            .collect();
        for version in &versions {
            lock.initrds.get_mut(version).expect("checked").modules = names.clone();
        }
    }
    let modules_dir = plan
        .modules_dir
        .as_deref()
        .map(ModulesDir::locate)
        .transpose()?;
    let mut guest_inits: BTreeMap<Arch, GuestInit> = BTreeMap::new();
    let mut failures = Vec::new();
    for version in &versions {
        for &arch in &plan.arches {
            let entry = Entry {
                version,
                arch,
                name: format!("initrd {version} {arch}"),
            };
            let outcome = (|| {
                let built = match guest_inits.entry(arch) {
                    std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::btree_map::Entry::Vacant(e) => e.insert(guest_init(arch)?),
                };
                sync_one(
                    lock,
                    store,
                    plan,
                    modules_dir.as_ref(),
                    built,
                    &entry,
                    report,
                )
            })();
            if let Err(e) = outcome {
                failures.push(format!("{}: {e:#}", entry.name));
            }
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} initrd(s) could not be made (any others were stored and recorded):\n  {}",
            failures.len(),
            failures.join("\n  ")
        );
    }
    Ok(())
}

struct Entry<'a> {
    version: &'a Version,
    arch: Arch,
    name: String,
}

fn load_modules(dir: Option<&ModulesDir>, names: &[String]) -> anyhow::Result<Option<ModuleSet>> {
    if names.is_empty() {
        return Ok(None);
    }
    let Some(dir) = dir else {
        bail!(
            "the recipe lists kernel modules ({}) but no --modules-dir was given; pass the \
             kernel's module directory, e.g. --modules-dir /lib/modules/<kver>",
            names.join(", ")
        );
    };
    ModuleSet::load(dir, names).map(Some)
}

fn sync_one(
    lock: &mut Lock,
    store: &StoreWriter,
    plan: &Plan,
    modules_dir: Option<&ModulesDir>,
    guest_init: &GuestInit,
    entry: &Entry,
    report: &mut Report,
) -> anyhow::Result<()> {
    let Entry {
        version,
        arch,
        name,
    } = entry;
    let arch = *arch;
    let recipe_entry = lock.initrds[*version].clone();
    let recipe = Recipe {
        base: recipe_entry.base.as_ref().map(|b| b.as_str().to_owned()),
        builder: recipe::BUILDER,
        modules: recipe_entry.modules.clone(),
        mtime: plan.mtime,
    };
    let base_pin =
        match &recipe_entry.base {
            None => None,
            Some(base) => {
                let manifest = lock.bases[base].manifests.get(&arch).copied().with_context(|| {
                format!("base `{base}` pins no {arch} manifest; pin it, or leave out --arch {arch}")
            })?;
                Some((base.clone(), manifest))
            }
        };
    let modules = load_modules(modules_dir, &recipe_entry.modules)?;

    let mut inputs = BTreeMap::new();
    if let Some((_, manifest)) = &base_pin {
        inputs.insert(INPUT_BASE.to_owned(), *manifest);
    }
    inputs.insert(INPUT_GUEST_INIT.to_owned(), Digest(guest_init.sha256));
    if let Some(modules) = &modules {
        inputs.insert(INPUT_MODULES.to_owned(), modules.digest());
    }
    inputs.insert(INPUT_RECIPE.to_owned(), recipe.digest());

    let recorded = recipe_entry.outputs.get(&arch).cloned();
    let link = store.layout().initrd_link(version.as_str(), arch);
    if let Some(old) = &recorded
        && old.inputs == inputs
        && store.has_verified_blob(&old.sha256, Some(old.size))?
    {
        store.link(&link, &old.sha256)?;
        report
            .reused
            .push(format!("{name} sha256:{} ({} bytes)", old.sha256, old.size));
        return Ok(());
    }
    if plan.locked {
        check_locked_inputs(name, recorded.as_ref(), &inputs)?;
    }

    let base_tree = match &base_pin {
        None => None,
        Some((base, manifest)) => {
            let (tree, pulled) = pull_base(lock, store, plan, base, *manifest, arch)
                .with_context(|| format!("pulling base `{base}` ({arch})"))?;
            // A moved tag (recorded above, never under --locked) changes this input.
            inputs.insert(INPUT_BASE.to_owned(), pulled);
            Some(tree)
        }
    };
    let tree = recipe::assemble(base_tree, &guest_init.bytes, modules.as_ref())?;
    let bytes = cpio::write_initrd(&tree, plan.mtime)?;
    let sha256 = system::hash::sha256_bytes(&bytes);
    let size = bytes.len() as u64;
    if plan.locked
        && let Some(old) = &recorded
        && old.sha256 != sha256
    {
        bail!(
            "--locked: rebuilding {name} from the inputs the lock records gave sha256 {sha256} \
             ({size} bytes), but the lock says {} ({} bytes): the build is not reproducible \
             here. Compare the toolchain, SOURCE_DATE_EPOCH and the guest-init sources with \
             those of the machine that wrote the lock",
            old.sha256,
            old.size
        );
    }
    store.put_bytes(&bytes)?;
    store.link(&link, &sha256)?;
    lock.initrds
        .get_mut(*version)
        .expect("selected from the lock")
        .outputs
        .insert(
            arch,
            InitrdOutput {
                inputs,
                sha256,
                size,
            },
        );
    let note = match &recorded {
        None => "new".to_owned(),
        Some(old) if old.sha256 == sha256 => "same digest as recorded".to_owned(),
        Some(old) => format!("was sha256:{}", old.sha256),
    };
    report
        .built
        .push(format!("{name} sha256:{sha256} ({size} bytes, {note})"));
    Ok(())
}

fn pull_base(
    lock: &mut Lock,
    store: &StoreWriter,
    plan: &Plan,
    base: &Version,
    manifest: Digest,
    arch: Arch,
) -> anyhow::Result<(Tree, Digest)> {
    let mut options = crate::oci::PullOptions::from_env()?;
    options.offline = plan.offline;
    options.locked = plan.locked;
    options.transfer = plan.transfer.clone();
    if let Some(source) = plan.base_sources.get(base) {
        options.source = Some(source.clone());
    }
    let pins = lock.bases[base].clone();
    let pulled = crate::oci::pull_base(&options, &pins, arch, &store.layout().oci_cache())?;
    if let Some(updated) = pulled.updated_pins {
        eprintln!(
            "base `{base}`: `{}` now resolves to index {} ({arch} manifest {}); was index {} \
             ({arch} manifest {manifest}): recording the new pins in the lock",
            pins.reference, pulled.index_digest, pulled.manifest_digest, pins.index
        );
        lock.bases.insert(base.clone(), updated);
    } else if pulled.manifest_digest != manifest {
        bail!(
            "the lock pins the {arch} manifest {manifest}, the pull gave {} (index {})",
            pulled.manifest_digest,
            pulled.index_digest
        );
    }
    Ok((pulled.tree, pulled.manifest_digest))
}

/// Under `--locked`, an initrd whose inputs differ from the lock cannot be recorded.
fn check_locked_inputs(
    name: &str,
    recorded: Option<&InitrdOutput>,
    inputs: &BTreeMap<String, Digest>,
) -> anyhow::Result<()> {
    let Some(old) = recorded else {
        bail!(
            "--locked: {name} is not recorded in the lock; run `cargo xtask artifacts` without \
             --locked to build and record it"
        );
    };
    let keys: std::collections::BTreeSet<&String> =
        old.inputs.keys().chain(inputs.keys()).collect();
    let mut changes = Vec::new();
    for key in keys {
        let (was, now) = (old.inputs.get(key), inputs.get(key));
        if was != now {
            let show = |d: Option<&Digest>| d.map_or("(none)".to_owned(), Digest::to_string);
            let why = match key.as_str() {
                INPUT_RECIPE => " (base, modules, SOURCE_DATE_EPOCH or the builder version)",
                INPUT_GUEST_INIT => " (guest-init's sources, Cargo.lock or the toolchain)",
                _ => "",
            };
            changes.push(format!("{key}{why}: lock {}, now {}", show(was), show(now)));
        }
    }
    if changes.is_empty() {
        // Same inputs, blob missing or corrupt: rebuilding is allowed and checked.
        return Ok(());
    }
    bail!(
        "--locked: the inputs of {name} changed ({}); run without --locked to rebuild and \
         record it",
        changes.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use system::lock::{Base, Defaults, Initrd, UniqueMap};

    use super::*;

    fn v(name: &str) -> Version {
        Version::new(name).unwrap()
    }

    fn lock() -> Lock {
        let mut initrds = UniqueMap::default();
        for name in ["v1", "v2"] {
            initrds.insert(
                v(name),
                Initrd {
                    base: None,
                    modules: vec![],
                    outputs: UniqueMap::default(),
                },
            );
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
    fn fake_guest_init(content: &'static str) -> impl FnMut(Arch) -> anyhow::Result<GuestInit> {
        move |arch| {
            let bytes = format!("\x7fELF {content} {arch}").into_bytes();
            let sha256 = system::hash::sha256_bytes(&bytes);
            Ok(GuestInit { bytes, sha256 })
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
        let modules_dir = crate::initrd::modules::tests::fixture(dir.path());
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
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&blob[..]), &mut archive)
            .unwrap();
        let has = |needle: &[u8]| archive.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"bin/busybox\0"), "the base's files are in the initrd");
        assert!(has(b"busybox for x86_64"), "the x86_64 layer was applied");
        assert!(has(b"\x7fELF a x86_64"), "guest-init is /init");
        assert!(has(b"init\0"));
    }
}
