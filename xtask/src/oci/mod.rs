//! The base image: pulled from an OCI registry (or a local OCI image layout), pinned by digest,
//! cached as a standard OCI image layout, and turned into a [`Tree`] by the layer model.
//!
//! ```text
//! lock bases.<name> {reference, index, manifests}
//!   └─ resolve the reference (tag → digest; a moved tag is an error under --locked)
//!   └─ index → linux/<arch> manifest (attestations skipped) → config + layers
//!   └─ every blob verified against its digest before it is visible in oci-cache/
//!   └─ layers applied in order (crate::layers) → Tree
//! ```
//!
//! Sources: a registry reference (`docker.io/library/alpine:3.22`, `alpine:3.22@sha256:…`,
//! `127.0.0.1:5000/base:v1`) or a local layout (`oci:/path/to/layout[:ref]`, as skopeo spells
//! it). With `offline`, only the cache is read.

pub mod auth;
pub mod cache;
pub mod layers;
pub mod platform;
pub mod reference;
pub mod registry;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::IsTerminal;
use std::path::Path;

use anyhow::{Context, bail};
use oci_spec::image::{ImageIndex, ImageManifest};
use system::Arch;
use system::lock::{Base, Digest, UniqueMap};

use crate::oci::layers::{Applier, LayerInfo, LayerLimits};
use crate::rootfs::Tree;
use cache::{LayoutEntry, OciLayout};
use reference::Source;
use registry::{MAX_MANIFEST_BYTES, NetworkOptions, Registry};

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// Comma-separated hosts that may be reached over plain HTTP (besides loopback).
pub const PLAIN_HTTP_ENV: &str = "XTASK_REGISTRY_PLAIN_HTTP";

/// How to pull.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Read only the cache; fail listing what is missing.
    pub offline: bool,
    /// The lock may not change: a moved tag or a missing pin is an error.
    pub locked: bool,
    /// Pull from here instead of the lock's reference (e.g. `oci:/mnt/usb/alpine:3.22` on an
    /// air-gapped host); the lock's digests still have to match.
    pub source: Option<String>,
    pub network: NetworkOptions,
    pub limits: LayerLimits,
}

impl PullOptions {
    /// Defaults, with `XTASK_REGISTRY_PLAIN_HTTP` and the layer limits' variables applied.
    pub fn from_env() -> anyhow::Result<PullOptions> {
        let mut options = PullOptions {
            limits: LayerLimits::from_env()?,
            ..PullOptions::default()
        };
        if let Ok(hosts) = std::env::var(PLAIN_HTTP_ENV) {
            options.network.plain_http_hosts = hosts
                .split(',')
                .map(str::trim)
                .filter(|h| !h.is_empty())
                .map(str::to_owned)
                .collect();
        }
        Ok(options)
    }
}

/// A pulled base image for one architecture.
#[derive(Debug)]
pub struct PulledBase {
    /// The root filesystem, all layers applied.
    pub tree: Tree,
    /// What the reference resolved to (an index, or a manifest for single-platform images).
    pub index_digest: Digest,
    /// The architecture's image manifest.
    pub manifest_digest: Digest,
    /// New pins for the lock when the reference moved or the lock lacked this architecture
    /// (never under `locked`); `None` when the lock already says exactly this.
    pub updated_pins: Option<Base>,
}

/// Pulls `base` for `arch` through the OCI cache at `cache_dir` (the store's `oci-cache/`,
/// [`system::layout::Layout::oci_cache`]) and applies its layers.
pub fn pull_base(
    options: &PullOptions,
    base: &Base,
    arch: Arch,
    cache_dir: &Path,
) -> anyhow::Result<PulledBase> {
    let source_text = options.source.as_deref().unwrap_or(&base.reference);
    let source = Source::parse(source_text)?;
    let cache = OciLayout::create(cache_dir)?;
    let remote = if options.offline {
        Remote::Offline
    } else {
        match &source {
            Source::Registry(image) => {
                Remote::Registry(Box::new(Registry::new(image, &options.network)?))
            }
            Source::Layout(layout) => Remote::Layout(OciLayout::open(&layout.path)?),
        }
    };
    let mut puller = Puller {
        cache,
        remote,
        source: source_text.to_owned(),
        progress: std::io::stderr().is_terminal(),
        missing: Vec::new(),
    };
    let what = format!("base `{}` ({arch})", base.reference);
    puller
        .pull(options, base, arch, &source)
        .with_context(|| what)
}

enum Remote {
    Registry(Box<Registry>),
    Layout(OciLayout),
    Offline,
}

struct Puller {
    cache: OciLayout,
    remote: Remote,
    /// The source as the user wrote it, for messages.
    source: String,
    progress: bool,
    /// Offline: blobs the cache lacks, described.
    missing: Vec<String>,
}

impl Puller {
    fn pull(
        &mut self,
        options: &PullOptions,
        base: &Base,
        arch: Arch,
        source: &Source,
    ) -> anyhow::Result<PulledBase> {
        let mut changed = false;

        // 1. What the reference points to, checked against the pinned index digest.
        let (top, top_bytes) = self.resolve(base, arch, source)?;
        if top != base.index {
            if options.locked {
                bail!(
                    "`{}` now resolves to {top}, but artifacts.lock pins index {}; --locked \
                     forbids changing the lock. Run without --locked to record the new digest, \
                     or pin the reference by digest (`…@{}`) to keep the old image",
                    self.source,
                    base.index,
                    base.index
                );
            }
            eprintln!(
                "base `{}`: resolves to {top} instead of the pinned {}; the lock will be updated",
                self.source, base.index
            );
            changed = true;
        }

        // 2. The architecture's manifest.
        let top_type = media_type_of(&top_bytes).unwrap_or_default();
        let (index, manifest_digest, manifest_bytes) = match top_type.as_str() {
            OCI_INDEX | DOCKER_LIST => {
                let index = ImageIndex::from_reader(top_bytes.as_slice())
                    .with_context(|| format!("index {top} is not a valid image index"))?;
                let chosen =
                    platform::select(&index, arch).with_context(|| format!("in index {top}"))?;
                let digest = descriptor_digest(chosen.digest())?;
                let bytes =
                    self.manifest(&digest, &format!("linux/{} manifest", arch.oci_arch()))?;
                (Some(index), digest, bytes)
            }
            OCI_MANIFEST | DOCKER_MANIFEST => (None, top, Some(top_bytes.clone())),
            other => bail!(
                "{top} has media type `{other}`, which is neither an image index nor an image \
                 manifest"
            ),
        };
        let manifest_bytes = match manifest_bytes {
            Some(bytes) => bytes,
            None => return Err(self.missing_error(base, arch)),
        };
        match base.manifests.get(&arch) {
            Some(pinned) if *pinned == manifest_digest => {}
            pinned => {
                let pinned = pinned.map_or("nothing".to_owned(), |d| d.to_string());
                if options.locked {
                    bail!(
                        "index {top} lists {manifest_digest} for linux/{}, but artifacts.lock \
                         pins {pinned} (bases.*.manifests.{arch}); --locked forbids changing the \
                         lock. Run without --locked to record it",
                        arch.oci_arch()
                    );
                }
                changed = true;
            }
        }
        let manifest = ImageManifest::from_reader(manifest_bytes.as_slice())
            .with_context(|| format!("manifest {manifest_digest} is not a valid image manifest"))?;

        // 3. Config and layers into the cache.
        let config = manifest.config();
        let config_digest = descriptor_digest(config.digest())?;
        self.blob(&config_digest, config.size(), "config")?;
        let mut layers = Vec::new();
        for (i, layer) in manifest.layers().iter().enumerate() {
            let digest = descriptor_digest(layer.digest())?;
            let what = format!("layer {}/{}", i + 1, manifest.layers().len());
            self.blob(&digest, layer.size(), &what)?;
            layers.push((digest, layer.media_type().to_string()));
        }
        if !self.missing.is_empty() {
            return Err(self.missing_error(base, arch));
        }

        let config_bytes = self.cache.read_blob(&config_digest, MAX_MANIFEST_BYTES)?;
        let diff_ids = check_config(&config_bytes, &config_digest, arch, layers.len())?;

        // 4. Names in the cache's index.json, so other OCI tools find the image.
        let name = cache_ref_name(base);
        let size = |bytes: &[u8]| bytes.len() as u64;
        self.cache.tag(&[
            LayoutEntry {
                ref_name: name.clone(),
                media_type: top_type.clone(),
                digest: top,
                size: size(&top_bytes),
                platform: None,
            },
            LayoutEntry {
                ref_name: format!("{name}-{}", arch.oci_arch()),
                media_type: media_type_of(&manifest_bytes).unwrap_or(OCI_MANIFEST.into()),
                digest: manifest_digest,
                size: size(&manifest_bytes),
                platform: Some(("linux".into(), arch.oci_arch().into())),
            },
        ])?;

        // 5. The layer model.
        let mut applier = Applier::new(options.limits);
        for (i, (digest, media_type)) in layers.iter().enumerate() {
            eprintln!("applying layer {}/{} {digest}", i + 1, layers.len());
            let path = self.cache.blob_path(digest);
            let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
            applier.apply(
                LayerInfo {
                    digest,
                    media_type,
                    diff_id: diff_ids.get(i),
                },
                std::io::BufReader::with_capacity(1 << 20, file),
            )?;
        }

        let updated_pins = if changed {
            let mut manifests = UniqueMap::default();
            let wanted: Vec<Arch> = base.manifests.keys().copied().chain([arch]).collect();
            let offered: BTreeMap<Arch, Digest> = match &index {
                Some(index) => platform::manifests_by_arch(index)?,
                None => [(arch, manifest_digest)].into(),
            };
            for a in wanted {
                match offered.get(&a) {
                    Some(d) => {
                        manifests.insert(a, *d);
                    }
                    None => eprintln!(
                        "base `{}`: {top} has no linux/{} image any more; dropping its pin",
                        base.reference,
                        a.oci_arch()
                    ),
                }
            }
            Some(Base {
                reference: base.reference.clone(),
                index: top,
                manifests,
            })
        } else {
            None
        };

        Ok(PulledBase {
            tree: applier.into_tree(),
            index_digest: top,
            manifest_digest,
            updated_pins,
        })
    }

    /// The digest and bytes the reference points to now.
    fn resolve(
        &mut self,
        base: &Base,
        arch: Arch,
        source: &Source,
    ) -> anyhow::Result<(Digest, Vec<u8>)> {
        let top = match (&mut self.remote, source) {
            (Remote::Offline, Source::Registry(image)) => image.digest.unwrap_or(base.index),
            (Remote::Offline, Source::Layout(_)) => base.index,
            (Remote::Layout(layout), Source::Layout(layout_ref)) => {
                layout.resolve(layout_ref.ref_name.as_deref())?.digest
            }
            (Remote::Registry(_), Source::Registry(image)) if image.digest.is_some() => {
                image.digest.expect("checked")
            }
            (Remote::Registry(registry), Source::Registry(image)) => {
                let tag = image.manifest_reference();
                eprintln!("resolving {image} at {}", registry.host());
                // HEAD first: a tag that did not move costs no download (and no Docker Hub
                // pull).
                match registry.head_manifest(&tag)? {
                    Some(digest) if self.cache.has_blob(&digest) => digest,
                    _ => {
                        let fetched = registry.get_manifest(&tag)?;
                        self.cache.put_bytes(&fetched.digest, &fetched.bytes)?;
                        return Ok((fetched.digest, fetched.bytes));
                    }
                }
            }
            _ => unreachable!("the remote is made from the source"),
        };
        match self.manifest(&top, "index")? {
            Some(bytes) => Ok((top, bytes)),
            None => Err(self.missing_error(base, arch)),
        }
    }

    /// A manifest or index by digest: from the cache, else the source (then cached). `None`
    /// offline when the cache lacks it (recorded in `missing`).
    fn manifest(&mut self, digest: &Digest, what: &str) -> anyhow::Result<Option<Vec<u8>>> {
        if self.cache.has_blob(digest) {
            return self.cache.read_blob(digest, MAX_MANIFEST_BYTES).map(Some);
        }
        let bytes = match &mut self.remote {
            Remote::Offline => {
                self.missing.push(format!("{what} {digest}"));
                return Ok(None);
            }
            Remote::Layout(layout) => layout.read_blob(digest, MAX_MANIFEST_BYTES)?,
            Remote::Registry(registry) => registry.get_manifest(&digest.to_string())?.bytes,
        };
        self.cache.put_bytes(digest, &bytes)?;
        Ok(Some(bytes))
    }

    /// Makes sure the cache has blob `digest` of `size` bytes.
    fn blob(&mut self, digest: &Digest, size: u64, what: &str) -> anyhow::Result<()> {
        if self.cache.has_blob(digest) {
            return Ok(());
        }
        match &mut self.remote {
            Remote::Offline => {
                self.missing.push(format!("{what} {digest} ({size} bytes)"));
                Ok(())
            }
            Remote::Layout(layout) => {
                let from = layout.blob_path(digest);
                self.cache.put_with(digest, Some(size), |file| {
                    let mut src = File::open(&from).with_context(|| {
                        format!("opening {} in the source layout", from.display())
                    })?;
                    std::io::copy(&mut src, file)?;
                    Ok(())
                })
            }
            Remote::Registry(registry) => {
                let bar = progress_bar(self.progress, what, digest, size, registry.host());
                let result = self.cache.put_with(digest, Some(size), |file| {
                    registry.get_blob(digest, file, &mut |n| {
                        if let Some(bar) = &bar {
                            bar.set_position(n)
                        }
                    })?;
                    Ok(())
                });
                if let Some(bar) = bar {
                    bar.finish_and_clear();
                }
                result
            }
        }
    }

    fn missing_error(&self, base: &Base, arch: Arch) -> anyhow::Error {
        anyhow::anyhow!(
            "--offline: the OCI cache {} lacks what base `{}` needs for {arch}:\n  {}\n\
             run once without --offline on a connected host, or copy the image in from a local \
             layout (source `oci:/path/to/layout:TAG`, made with `skopeo copy --all \
             docker://{} oci:/path/to/layout:TAG`)",
            self.cache.root().display(),
            base.reference,
            self.missing.join("\n  "),
            base.reference
        )
    }
}

fn progress_bar(
    interactive: bool,
    what: &str,
    digest: &Digest,
    size: u64,
    host: &str,
) -> Option<indicatif::ProgressBar> {
    let short = &digest.0.hex()[..12];
    if !interactive {
        eprintln!("pulling {what} sha256:{short} ({size} bytes) from {host}");
        return None;
    }
    let bar = indicatif::ProgressBar::new(size);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_message(format!("{what} sha256:{short}"));
    Some(bar)
}

/// The name the cache's `index.json` gives this base (`docker.io/library/alpine:3.22`); the
/// per-architecture manifest gets `<name>-<oci arch>`.
fn cache_ref_name(base: &Base) -> String {
    match Source::parse(&base.reference) {
        Ok(Source::Registry(image)) => image.ref_name(),
        Ok(Source::Layout(layout)) => layout.ref_name.unwrap_or_else(|| "base".into()),
        Err(_) => "base".into(),
    }
}

fn descriptor_digest(d: &oci_spec::image::Digest) -> anyhow::Result<Digest> {
    let text = d.to_string();
    text.parse::<Digest>()
        .map_err(|e| anyhow::anyhow!("{e} (only sha256 digests are supported)"))
}

/// Checks the image config against the arch and layer count; returns its `rootfs.diff_ids`.
fn check_config(
    bytes: &[u8],
    digest: &Digest,
    arch: Arch,
    layers: usize,
) -> anyhow::Result<Vec<Digest>> {
    let config: serde_json::Value =
        serde_json::from_slice(bytes).with_context(|| format!("config {digest} is not JSON"))?;
    if let Some(a) = config["architecture"].as_str()
        && a != arch.oci_arch()
    {
        bail!(
            "config {digest} is for architecture `{a}`, not {} ({arch})",
            arch.oci_arch()
        );
    }
    if let Some(os) = config["os"].as_str()
        && os != "linux"
    {
        bail!("config {digest} is for os `{os}`, not linux");
    }
    let diff_ids: Vec<Digest> = config["rootfs"]["diff_ids"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            d.as_str()
                .unwrap_or_default()
                .parse::<Digest>()
                .map_err(anyhow::Error::msg)
        })
        .collect::<anyhow::Result<_>>()
        .with_context(|| format!("config {digest}: rootfs.diff_ids"))?;
    if diff_ids.len() != layers {
        bail!(
            "config {digest} lists {} diff_ids for {layers} layers; the image is inconsistent",
            diff_ids.len()
        );
    }
    Ok(diff_ids)
}

/// The media type a manifest or index declares, or infers from its shape when it omits it.
pub fn media_type_of(bytes: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    if let Some(t) = value["mediaType"].as_str() {
        return Some(t.to_owned());
    }
    if value["manifests"].is_array() {
        Some(OCI_INDEX.into())
    } else if value["layers"].is_array() {
        Some(OCI_MANIFEST.into())
    } else {
        None
    }
}
