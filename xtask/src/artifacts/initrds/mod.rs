//! The initrd stage: for every `initrds.<version>` of the lock and every selected architecture,
//! a gzip-compressed newc archive of the recipe's tree, stored as a blob with its named link
//! `initrd/<version>/<arch>/initrd`, and recorded in the lock with the digests of its inputs.
//!
//! ```text
//! inputs: base manifest digest ─┐ (lock.bases[base].manifests[arch])
//!         guest-init sha256 ────┤ (cargo build --target <arch>-unknown-linux-musl, static check)
//!         agent sha256 ─────────┤ (the same cargo run; only for recipes with `agent`)
//!         modules digest ───────┤ (modules.dep closure, decompressed, in load order;
//!                               │  module groups with their firmware)
//!         recipe digest ────────┘ (canonical JSON: agent, base, builder, module_groups, modules, mtime)
//!   same as the lock and blob verified → reused (nothing is pulled or assembled)
//!   otherwise → assemble tree → newc + gzip → store blob → link → lock outputs
//! ```
//!
//! Under `--locked` a rebuilt initrd must come out byte for byte as the lock says: that is the
//! reproducibility check.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use system::lock::{Initrd, InitrdOutput, ModuleGroup, Version};
use system::{Arch, Digest, Lock};

use super::Report;
use crate::initrd::compress::Encoder;
use crate::initrd::guest_init::GuestBinaries;
use crate::initrd::modules::ModuleSet;
use crate::initrd::modules_dir::ModulesDir;
use crate::initrd::recipe::{self, Recipe, RecipeGroup};
use crate::initrd::{INPUT_AGENT, INPUT_BASE, INPUT_GUEST_INIT, INPUT_MODULES, INPUT_RECIPE, cpio};
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
    /// Where module groups' firmware comes from.
    pub firmware_dir: Option<PathBuf>,
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
/// whose blob is gone) and recording them in `lock`. `guest_init` builds guest-init and the
/// agent for an architecture; it is called once per architecture.
pub fn sync_initrds(
    lock: &mut Lock,
    store: &StoreWriter,
    plan: &Plan,
    guest_init: &mut dyn FnMut(Arch) -> anyhow::Result<GuestBinaries>,
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
    let mut guest_inits: BTreeMap<Arch, GuestBinaries> = BTreeMap::new();
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

fn load_modules(
    dir: Option<&ModulesDir>,
    initrd: &Initrd,
    firmware_dir: Option<&Path>,
) -> anyhow::Result<Option<ModuleSet>> {
    let names = &initrd.modules;
    if names.is_empty() && initrd.module_groups.is_empty() {
        return Ok(None);
    }
    let Some(dir) = dir else {
        let listed: Vec<&str> = names
            .iter()
            .map(String::as_str)
            .chain(
                initrd
                    .module_groups
                    .values()
                    .flat_map(|g| g.modules.iter().map(String::as_str)),
            )
            .collect();
        bail!(
            "the recipe lists kernel modules ({}) but no --modules-dir was given; pass the \
             kernel's module directory, e.g. --modules-dir /lib/modules/<kver>",
            listed.join(", ")
        );
    };
    let groups: Vec<(String, ModuleGroup)> = initrd
        .module_groups
        .iter()
        .map(|(name, group)| (name.as_str().to_owned(), group.clone()))
        .collect();
    ModuleSet::load_with_groups(dir, names, &groups, firmware_dir).map(Some)
}

fn sync_one(
    lock: &mut Lock,
    store: &StoreWriter,
    plan: &Plan,
    modules_dir: Option<&ModulesDir>,
    built: &GuestBinaries,
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
        agent: recipe_entry.agent,
        base: recipe_entry.base.as_ref().map(|b| b.as_str().to_owned()),
        builder: recipe::BUILDER,
        module_groups: recipe_entry
            .module_groups
            .iter()
            .map(|(name, group)| (name.as_str().to_owned(), RecipeGroup::from_lock(group)))
            .collect(),
        compression: Encoder::of(recipe_entry.compression),
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
    let modules = load_modules(modules_dir, &recipe_entry, plan.firmware_dir.as_deref())?;

    let mut inputs = BTreeMap::new();
    if let Some((_, manifest)) = &base_pin {
        inputs.insert(INPUT_BASE.to_owned(), *manifest);
    }
    inputs.insert(INPUT_GUEST_INIT.to_owned(), Digest(built.guest_init.sha256));
    let agent = recipe_entry.agent.then_some(&built.agent);
    if let Some(agent) = agent {
        inputs.insert(INPUT_AGENT.to_owned(), Digest(agent.sha256));
    }
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
            // The manifest the lock pins (a pin missing for this arch is recorded by the pull).
            inputs.insert(INPUT_BASE.to_owned(), pulled);
            Some(tree)
        }
    };
    let tree = recipe::assemble(
        base_tree,
        &built.guest_init.bytes,
        agent.map(|a| a.bytes.as_slice()),
        modules.as_ref(),
    )?;
    let bytes = cpio::write_initrd(&tree, plan.mtime, recipe_entry.compression)?;
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
            "base `{base}`: the lock pinned no {arch} manifest; recording {} from its pinned \
             index {}",
            pulled.manifest_digest, pulled.index_digest
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
                INPUT_RECIPE => {
                    " (agent, base, modules, module_groups, compression, SOURCE_DATE_EPOCH or the builder version)"
                }
                INPUT_GUEST_INIT => " (guest-init's sources, Cargo.lock or the toolchain)",
                INPUT_AGENT => " (the guest agent's sources, Cargo.lock or the toolchain)",
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
mod tests;
