//! `cargo xtask dist`: release artifacts a pipeline publishes and a host installs.
//!
//! ```text
//! lock + store ─► per arch: the selected kernels' and initrds' blobs (verified through
//!                 system::Store), their named links, the lock reduced to them
//!              ─► system-<kernel>-<initrd>-<arch>.tar.gz   (tarball.rs: deterministic)
//!              ─► dist.json (versions, digests, sizes, lock digests) + SHA256SUMS
//! ```
//!
//! A tarball is a store subtree: `tar -C <data_dir> -xzf` installs it, and
//! `system::Store::open(<data_dir>)` resolves and verifies it. [`verify`] checks a tarball
//! without installing it; [`install`] takes its blobs into a store for `artifacts --from`.

pub mod install;
pub mod oci;
mod read;
pub mod tarball;
pub mod verify;

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde::Serialize;
use system::lock::{UniqueMap, Version};
use system::{Arch, InitrdVersion, KernelVersion, Layout, Lock, Sha256};

use tarball::{Entries, Node, Source};

/// The manifest's file name in the output directory.
pub const MANIFEST: &str = "dist.json";
/// The checksum file's name (coreutils format: `sha256sum -c SHA256SUMS`).
pub const SHA256SUMS: &str = "SHA256SUMS";

/// What to pack, from where, to where.
#[derive(Debug, Clone)]
pub struct Options {
    /// The lock whose artifacts are packed.
    pub lock: PathBuf,
    /// The data dir holding the store (`<data_dir>/system`).
    pub data_dir: PathBuf,
    /// Where the tarballs, `dist.json` and `SHA256SUMS` are written.
    pub out: PathBuf,
    /// Kernel versions; empty means the lock's default.
    pub kernels: Vec<Version>,
    /// Initrd versions; empty means the lock's default.
    pub initrds: Vec<Version>,
    /// Architectures; empty means every arch all selected versions have.
    pub arches: Vec<Arch>,
    /// Every entry's mtime (`SOURCE_DATE_EPOCH`, default 0).
    pub mtime: u64,
}

/// The manifest: what each tarball holds.
#[derive(Debug, Serialize)]
pub struct Manifest {
    pub schema: u32,
    /// sha256 of the lock the set was packed from.
    pub lock_sha256: Sha256,
    pub source_date_epoch: u64,
    pub tarballs: Vec<TarballManifest>,
}

#[derive(Debug, Serialize)]
pub struct TarballManifest {
    pub file: String,
    pub arch: Arch,
    pub sha256: Sha256,
    pub size: u64,
    /// sha256 of the reduced lock inside (`system/artifacts.lock`).
    pub lock_sha256: Sha256,
    pub kernels: Vec<Artifact>,
    pub initrds: Vec<Artifact>,
}

#[derive(Debug, Serialize)]
pub struct Artifact {
    pub version: Version,
    pub sha256: Sha256,
    pub size: u64,
    /// The named link inside the tarball.
    pub path: String,
}

/// Packs the selection: one tarball per arch, then `dist.json` and `SHA256SUMS`. Returns the
/// paths written.
pub fn run(options: &Options) -> anyhow::Result<Vec<PathBuf>> {
    let lock_text = fs::read(&options.lock)
        .with_context(|| format!("reading the lock {}", options.lock.display()))?;
    let lock = crate::lock::read(&options.lock)?;
    let selection = select(&lock, options)?;
    fs::create_dir_all(&options.out)
        .with_context(|| format!("creating {}", options.out.display()))?;

    let store = system::Store::with_lock(&options.data_dir, lock.clone());
    let mut tarballs = Vec::new();
    let mut written = Vec::new();
    for &arch in &selection.arches {
        let (entries, manifest) = pack_arch(&store, &lock, &selection, arch)?;
        let dest = options.out.join(&manifest.file);
        tarball::write_file(&entries, options.mtime, &dest)?;
        let (sha256, size) = system::hash::sha256_reader(
            fs::File::open(&dest).with_context(|| format!("opening {}", dest.display()))?,
        )
        .with_context(|| format!("hashing {}", dest.display()))?;
        tarballs.push(TarballManifest {
            sha256,
            size,
            ..manifest
        });
        written.push(dest);
    }

    let manifest = Manifest {
        schema: 1,
        lock_sha256: system::hash::sha256_bytes(&lock_text),
        source_date_epoch: options.mtime,
        tarballs,
    };
    let mut json = serde_json::to_string_pretty(&manifest).context("serializing dist.json")?;
    json.push('\n');
    let manifest_path = options.out.join(MANIFEST);
    crate::store::atomic_write(&manifest_path, json.as_bytes())?;
    written.push(manifest_path);

    let mut sums: Vec<(String, Sha256)> = manifest
        .tarballs
        .iter()
        .map(|t| (t.file.clone(), t.sha256))
        .collect();
    sums.push((
        MANIFEST.to_owned(),
        system::hash::sha256_bytes(json.as_bytes()),
    ));
    sums.sort();
    let mut text = String::new();
    for (file, sha) in &sums {
        let _ = writeln!(text, "{sha}  {file}");
    }
    let sums_path = options.out.join(SHA256SUMS);
    crate::store::atomic_write(&sums_path, text.as_bytes())?;
    written.push(sums_path);
    Ok(written)
}

/// The versions and arches to pack, checked against the lock.
#[derive(Debug)]
struct Selection {
    kernels: Vec<Version>,
    initrds: Vec<Version>,
    arches: Vec<Arch>,
}

fn select(lock: &Lock, options: &Options) -> anyhow::Result<Selection> {
    let path = options.lock.display();
    let or_default = |asked: &[Version], default: &Version| {
        let mut v = if asked.is_empty() {
            vec![default.clone()]
        } else {
            asked.to_vec()
        };
        v.sort();
        v.dedup();
        v
    };
    let kernels = or_default(&options.kernels, &lock.defaults.kernel);
    let initrds = or_default(&options.initrds, &lock.defaults.initrd);
    // Per arch, which selected versions lack it.
    let mut lacking: Vec<(Arch, Vec<String>)> = Vec::new();
    for arch in Arch::ALL {
        let mut names = Vec::new();
        for version in &kernels {
            let files = lock.kernels.get(version).with_context(|| {
                format!(
                    "--kernel {version}: not in {path}; pin it with `cargo xtask lock add-kernel`"
                )
            })?;
            if !files.contains_key(&arch) {
                names.push(format!("kernel {version} (pins no {arch} file)"));
            }
        }
        for version in &initrds {
            let initrd = lock
                .initrds
                .get(version)
                .with_context(|| format!("--initrd {version}: not in {path}"))?;
            if !initrd.outputs.contains_key(&arch) {
                names.push(format!(
                    "initrd {version} (no {arch} output; build it with `cargo xtask artifacts \
                     --initrd {version} --arch {arch}`)"
                ));
            }
        }
        lacking.push((arch, names));
    }
    let arches: Vec<Arch> = if options.arches.is_empty() {
        let all: Vec<Arch> = lacking
            .iter()
            .filter(|(_, names)| names.is_empty())
            .map(|(arch, _)| *arch)
            .collect();
        if all.is_empty() {
            let mut msg =
                String::from("no architecture has every selected kernel and initrd in the lock:");
            for (arch, names) in &lacking {
                let _ = write!(msg, "\n  {arch}: lacks {}", names.join(", "));
            }
            bail!(msg);
        }
        all
    } else {
        let mut asked = options.arches.clone();
        asked.sort();
        asked.dedup();
        for arch in &asked {
            let names = &lacking
                .iter()
                .find(|(a, _)| a == arch)
                .expect("every arch")
                .1;
            if !names.is_empty() {
                bail!("--arch {arch}: {path} lacks {}", names.join(", "));
            }
        }
        asked
    };
    Ok(Selection {
        kernels,
        initrds,
        arches,
    })
}

/// The tarball's entries for one arch (every blob verified on the way) and its manifest entry
/// (digest and size filled in once written).
fn pack_arch(
    store: &system::Store,
    lock: &Lock,
    selection: &Selection,
    arch: Arch,
) -> anyhow::Result<(Entries, TarballManifest)> {
    let inside = Layout::new("");
    let mut entries = Entries::default();
    let mut add = |version: &Version, link: PathBuf, blob: PathBuf| {
        let sha = blob_digest(&blob)?;
        let size = fs::metadata(&blob)
            .with_context(|| format!("reading {}", blob.display()))?
            .len();
        entries.insert(
            inside.blob(&sha),
            Node::File {
                source: Source::Path(blob),
                size,
                mode: 0o444,
            },
        );
        entries.insert(&link, Node::Link(Layout::link_target(&sha)));
        anyhow::Ok(Artifact {
            version: version.clone(),
            sha256: sha,
            size,
            path: link.display().to_string(),
        })
    };
    let not_in_store = |e: system::Error| {
        anyhow::anyhow!(
            "{e}\nnext step: run `cargo xtask artifacts` for it into this data dir first \
             (--data-dir), or pack another version (--kernel/--initrd)"
        )
    };
    let mut kernels = Vec::new();
    for version in &selection.kernels {
        let blob = store
            .kernel_path(&KernelVersion::new(version.as_str()), arch)
            .map_err(not_in_store)?;
        let link = inside.kernel_link(version.as_str(), arch);
        kernels.push(add(version, link, blob)?);
    }
    let mut initrds = Vec::new();
    for version in &selection.initrds {
        let blob = store
            .initrd_path(&InitrdVersion::new(version.as_str()), arch)
            .map_err(not_in_store)?;
        let link = inside.initrd_link(version.as_str(), arch);
        initrds.push(add(version, link, blob)?);
    }
    let reduced = reduce(lock, &selection.kernels, &selection.initrds, arch)?.to_json();
    let lock_sha256 = system::hash::sha256_bytes(reduced.as_bytes());
    entries.insert(
        inside.lock_file(),
        Node::File {
            size: reduced.len() as u64,
            source: Source::Bytes(reduced.into_bytes()),
            mode: 0o644,
        },
    );
    let file = format!(
        "system-{}-{}-{arch}.tar.gz",
        join(&selection.kernels),
        join(&selection.initrds)
    );
    Ok((
        entries,
        TarballManifest {
            file,
            arch,
            sha256: Sha256([0; 32]),
            size: 0,
            lock_sha256,
            kernels,
            initrds,
        },
    ))
}

/// The digest a verified blob path names (`…/blobs/sha256/<hex>`).
fn blob_digest(blob: &Path) -> anyhow::Result<Sha256> {
    let name = blob.file_name().and_then(|n| n.to_str()).unwrap_or("");
    Sha256::from_hex(name).map_err(|e| anyhow::anyhow!("{}: not a blob path ({e})", blob.display()))
}

fn join(versions: &[Version]) -> String {
    versions
        .iter()
        .map(|v| v.as_str())
        .collect::<Vec<_>>()
        .join("+")
}

/// The lock reduced to the selected versions on one arch: what a tarball holds, and a valid
/// lock on its own (defaults name packed versions; the bases the initrds name are kept, with
/// this arch's manifest only).
pub fn reduce(
    lock: &Lock,
    kernels: &[Version],
    initrds: &[Version],
    arch: Arch,
) -> anyhow::Result<Lock> {
    let mut out = Lock {
        schema: lock.schema,
        defaults: lock.defaults.clone(),
        kernels: UniqueMap::default(),
        bases: UniqueMap::default(),
        initrds: UniqueMap::default(),
    };
    for version in kernels {
        let file = lock
            .kernels
            .get(version)
            .and_then(|files| files.get(&arch))
            .with_context(|| format!("kernel {version} pins no {arch} file"))?;
        let mut files = UniqueMap::default();
        files.insert(arch, file.clone());
        out.kernels.insert(version.clone(), files);
    }
    for version in initrds {
        let initrd = lock
            .initrds
            .get(version)
            .with_context(|| format!("initrd {version} is not in the lock"))?;
        let output = initrd
            .outputs
            .get(&arch)
            .with_context(|| format!("initrd {version} has no {arch} output"))?;
        let mut reduced = initrd.clone();
        reduced.outputs = UniqueMap::default();
        reduced.outputs.insert(arch, output.clone());
        if let Some(name) = &initrd.base
            && let Some(base) = lock.bases.get(name)
        {
            let mut base = base.clone();
            base.manifests.retain(|a, _| *a == arch);
            out.bases.insert(name.clone(), base);
        }
        out.initrds.insert(version.clone(), reduced);
    }
    if !kernels.contains(&out.defaults.kernel) {
        out.defaults.kernel = kernels[0].clone();
    }
    if !initrds.contains(&out.defaults.initrd) {
        out.defaults.initrd = initrds[0].clone();
    }
    // Round-trip through the parser: what we pack must be a lock `system` accepts.
    Lock::parse(&out.to_json()).context("the reduced lock does not validate")
}

#[cfg(test)]
mod tests;
