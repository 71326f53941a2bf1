//! One pull, step by step: the pinned index by digest, the architecture's manifest (checked
//! against its pin), config and layers into the cache (verified, and cached copies re-hashed),
//! names in the cache's `index.json`, the layers applied.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;

use anyhow::{Context, bail};
use oci_spec::image::{ImageIndex, ImageManifest};
use system::Arch;
use system::lock::{Base, Digest, UniqueMap};

use super::cache::{BlobState, LayoutEntry, OciLayout};
use super::layers::{Applier, LayerInfo, LayerLimits};
use super::reference::Source;
use super::registry::{MAX_MANIFEST_BYTES, Registry};
use super::{
    DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, PullOptions, PulledBase, convert,
    media_type_of, platform,
};
use crate::rootfs::Tree;

/// Where blobs the cache lacks come from.
pub(super) enum Remote {
    Registry(Box<Registry>),
    Layout(OciLayout),
    Offline,
}

pub(super) struct Puller {
    pub cache: OciLayout,
    pub remote: Remote,
    /// The source as the user wrote it, for messages.
    pub source: String,
    /// Offline: blobs the cache lacks, described.
    pub missing: Vec<String>,
}

/// The architecture's image manifest, and the index it was chosen from (if any).
struct ArchManifest {
    index: Option<ImageIndex>,
    digest: Digest,
    bytes: Vec<u8>,
}

impl Puller {
    /// A puller for `base` through the cache at `cache_dir`, from `options.source` or the
    /// reference; also returns the parsed source.
    pub fn open(
        options: &PullOptions,
        base: &Base,
        cache_dir: &Path,
    ) -> anyhow::Result<(Puller, Source)> {
        let source_text = options.source.as_deref().unwrap_or(&base.reference);
        let source = Source::parse(source_text)?;
        let cache = OciLayout::create(cache_dir)?;
        let remote = if options.offline {
            Remote::Offline
        } else {
            match &source {
                Source::Registry(image) => Remote::Registry(Box::new(Registry::new(
                    image,
                    &options.transfer,
                    &options.plain_http_hosts,
                )?)),
                Source::Layout(layout) => Remote::Layout(OciLayout::open(&layout.path)?),
            }
        };
        let puller = Puller {
            cache,
            remote,
            source: source_text.to_owned(),
            missing: Vec::new(),
        };
        Ok((puller, source))
    }

    /// Pulls what the lock pins: the index by its digest (a tag is never looked up here;
    /// `lock update-base` does that), the architecture's manifest from it, then config and
    /// layers.
    pub fn pull(
        &mut self,
        options: &PullOptions,
        base: &Base,
        arch: Arch,
    ) -> anyhow::Result<PulledBase> {
        let top = base.index;
        let Some(top_bytes) = self.manifest(&top, "index")? else {
            return Err(self.missing_error(base, arch));
        };
        let chosen = self.arch_manifest(base, arch, &top, &top_bytes)?;
        let changed = check_manifest_pin(options, base, arch, &top, &chosen.digest)?;
        let manifest = ImageManifest::from_reader(chosen.bytes.as_slice())
            .with_context(|| format!("manifest {} is not a valid image manifest", chosen.digest))?;
        let (layers, diff_ids) = self.fetch_blobs(base, arch, &manifest)?;
        self.name_in_cache(base, arch, (&top, &top_bytes), &chosen)?;
        let tree = self.apply_layers(options.limits, &layers, &diff_ids)?;
        let updated_pins = if changed {
            Some(updated_pins(base, arch, &top, &chosen)?)
        } else {
            None
        };
        Ok(PulledBase {
            tree,
            index_digest: top,
            manifest_digest: chosen.digest,
            updated_pins,
        })
    }

    /// The architecture's manifest: chosen from the index, or the top itself for a
    /// single-platform image.
    fn arch_manifest(
        &mut self,
        base: &Base,
        arch: Arch,
        top: &Digest,
        top_bytes: &[u8],
    ) -> anyhow::Result<ArchManifest> {
        let top_type = media_type_of(top_bytes).unwrap_or_default();
        match top_type.as_str() {
            OCI_INDEX | DOCKER_LIST => {
                let index = ImageIndex::from_reader(top_bytes)
                    .with_context(|| format!("index {top} is not a valid image index"))?;
                let chosen =
                    platform::select(&index, arch).with_context(|| format!("in index {top}"))?;
                let digest = descriptor_digest(chosen.digest())?;
                let what = format!("linux/{} manifest", arch.oci_arch());
                match self.manifest(&digest, &what)? {
                    Some(bytes) => Ok(ArchManifest {
                        index: Some(index),
                        digest,
                        bytes,
                    }),
                    None => Err(self.missing_error(base, arch)),
                }
            }
            OCI_MANIFEST | DOCKER_MANIFEST => Ok(ArchManifest {
                index: None,
                digest: *top,
                bytes: top_bytes.to_vec(),
            }),
            other => bail!(
                "{top} has media type `{other}`, which is neither an image index nor an image \
                 manifest"
            ),
        }
    }

    /// Config and layers into the cache; returns the layers (digest, media type) and the
    /// config's diff_ids, checked against the architecture.
    #[allow(clippy::type_complexity)]
    fn fetch_blobs(
        &mut self,
        base: &Base,
        arch: Arch,
        manifest: &ImageManifest,
    ) -> anyhow::Result<(Vec<(Digest, String)>, Vec<Digest>)> {
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
        Ok((layers, diff_ids))
    }

    /// Names in the cache's index.json, so other OCI tools find the image. Docker documents
    /// are named through their OCI rewrites ([`convert`]); OCI ones as pulled.
    fn name_in_cache(
        &self,
        base: &Base,
        arch: Arch,
        (top, top_bytes): (&Digest, &[u8]),
        chosen: &ArchManifest,
    ) -> anyhow::Result<()> {
        let name = cache_ref_name(base);
        let manifest = self.oci_manifest(&chosen.digest, &chosen.bytes)?;
        let index = if *top == chosen.digest {
            manifest.clone()
        } else {
            self.oci_index(top, top_bytes)?
        };
        self.cache.tag(&[
            LayoutEntry {
                ref_name: name.clone(),
                platform: None,
                ..index
            },
            LayoutEntry {
                ref_name: format!("{name}-{}", arch.oci_arch()),
                platform: Some(("linux".into(), arch.oci_arch().into())),
                ..manifest
            },
        ])
    }

    /// The descriptor to name for an image manifest: its OCI rewrite (cached here) when it is
    /// Docker's, else itself.
    fn oci_manifest(&self, digest: &Digest, bytes: &[u8]) -> anyhow::Result<LayoutEntry> {
        let (digest, bytes) = match convert::manifest(bytes)
            .with_context(|| format!("rewriting manifest {digest} with OCI media types"))?
        {
            Some(oci) => (self.put_rewrite(&oci)?, oci),
            None => (*digest, bytes.to_vec()),
        };
        Ok(LayoutEntry {
            ref_name: String::new(),
            media_type: media_type_of(&bytes).unwrap_or(OCI_MANIFEST.into()),
            digest,
            size: bytes.len() as u64,
            platform: None,
        })
    }

    /// The descriptor to name for an index: an OCI index over the OCI rewrites of the Docker
    /// manifests the cache holds (cached here) when it lists Docker manifests, else itself.
    fn oci_index(&self, digest: &Digest, bytes: &[u8]) -> anyhow::Result<LayoutEntry> {
        let rewritten = convert::index(bytes, |entry| {
            let Ok(entry) = entry.parse::<Digest>() else {
                return Ok(None);
            };
            if self.cache.check_blob(&entry)? != BlobState::Whole {
                return Ok(None);
            }
            let original = self.cache.read_blob(&entry, MAX_MANIFEST_BYTES)?;
            let oci = self.oci_manifest(&entry, &original)?;
            Ok(Some((oci.digest.to_string(), oci.size)))
        })
        .with_context(|| format!("rewriting index {digest} with OCI media types"))?;
        let (digest, bytes) = match rewritten {
            Some(oci) => (self.put_rewrite(&oci)?, oci),
            None => (*digest, bytes.to_vec()),
        };
        Ok(LayoutEntry {
            ref_name: String::new(),
            media_type: media_type_of(&bytes).unwrap_or(OCI_INDEX.into()),
            digest,
            size: bytes.len() as u64,
            platform: None,
        })
    }

    fn put_rewrite(&self, bytes: &[u8]) -> anyhow::Result<Digest> {
        let digest = Digest(system::hash::sha256_bytes(bytes));
        self.cache.put_bytes(&digest, bytes)?;
        Ok(digest)
    }

    /// The layer model, over the cached layers in order.
    fn apply_layers(
        &self,
        limits: LayerLimits,
        layers: &[(Digest, String)],
        diff_ids: &[Digest],
    ) -> anyhow::Result<Tree> {
        let mut applier = Applier::new(limits);
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
        Ok(applier.into_tree())
    }

    /// A manifest or index by digest: from the cache, else the source (then cached). `None`
    /// offline when the cache lacks it (recorded in `missing`).
    pub(super) fn manifest(
        &mut self,
        digest: &Digest,
        what: &str,
    ) -> anyhow::Result<Option<Vec<u8>>> {
        let damage = match self.cache.check_blob(digest)? {
            BlobState::Whole => return self.cache.read_blob(digest, MAX_MANIFEST_BYTES).map(Some),
            BlobState::Missing => None,
            BlobState::Corrupt { why } => Some(why),
        };
        if matches!(self.remote, Remote::Offline) {
            self.missing
                .push(format!("{what} {digest}{}", damage_note(damage.as_deref())));
            return Ok(None);
        }
        refetching(damage.as_deref(), what, &self.source);
        let bytes = self.fetch_manifest(digest)?;
        self.cache.put_bytes(digest, &bytes)?;
        Ok(Some(bytes))
    }

    /// A manifest by digest from the source (online only).
    fn fetch_manifest(&mut self, digest: &Digest) -> anyhow::Result<Vec<u8>> {
        Ok(match &mut self.remote {
            Remote::Offline => unreachable!("offline pulls read the cache only"),
            Remote::Layout(layout) => {
                in_source_layout(layout, digest, &self.source)?;
                layout.read_blob(digest, MAX_MANIFEST_BYTES)?
            }
            Remote::Registry(registry) => registry.get_manifest(&digest.to_string())?.bytes,
        })
    }

    /// Makes sure the cache has blob `digest` of `size` bytes, whole: a cached copy is hashed
    /// before it is used, and a corrupt one fetched again (offline: listed as missing).
    pub(super) fn blob(&mut self, digest: &Digest, size: u64, what: &str) -> anyhow::Result<()> {
        let damage = match self.cache.check_blob(digest)? {
            BlobState::Whole => return Ok(()),
            BlobState::Missing => None,
            BlobState::Corrupt { why } => Some(why),
        };
        if !matches!(self.remote, Remote::Offline) {
            refetching(damage.as_deref(), what, &self.source);
        }
        match &mut self.remote {
            Remote::Offline => {
                self.missing.push(format!(
                    "{what} {digest} ({size} bytes){}",
                    damage_note(damage.as_deref())
                ));
                Ok(())
            }
            Remote::Layout(layout) => {
                in_source_layout(layout, digest, &self.source)?;
                let from = layout.blob_path(digest);
                self.cache.put_with(digest, Some(size), |writer| {
                    let mut src = File::open(&from).with_context(|| {
                        format!("opening {} in the source layout", from.display())
                    })?;
                    std::io::copy(&mut src, writer)?;
                    Ok(())
                })
            }
            Remote::Registry(registry) => {
                let label = format!("{what} sha256:{}", &digest.0.hex()[..12]);
                self.cache.put_with(digest, Some(size), |writer| {
                    registry.get_blob(digest, size, writer, &label)?;
                    Ok(())
                })
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

/// A source layout must hold what the lock pins; one that holds another image is named.
fn in_source_layout(layout: &OciLayout, digest: &Digest, source: &str) -> anyhow::Result<()> {
    if layout.has_blob(digest) {
        return Ok(());
    }
    bail!(
        "the source layout {} has no {digest}: it holds another image than the lock pins; pin \
         the layout's image with `cargo xtask lock update-base NAME --source {source}`",
        layout.root().display()
    )
}

/// Offline, a corrupt cached copy is listed with what is wrong; fetching replaces it.
fn damage_note(damage: Option<&str>) -> String {
    damage.map_or(String::new(), |why| {
        format!(" ({why}; it is replaced when fetched again)")
    })
}

/// Says that a corrupt cached copy is being replaced, and from where.
fn refetching(damage: Option<&str>, what: &str, source: &str) {
    if let Some(why) = damage {
        eprintln!("{why}; fetching {what} again from {source}");
    }
}

/// Whether the lock pins this manifest for `arch`: a missing pin is recorded (an error under
/// `--locked`), a different one is a lock that contradicts its own index.
fn check_manifest_pin(
    options: &PullOptions,
    base: &Base,
    arch: Arch,
    top: &Digest,
    manifest: &Digest,
) -> anyhow::Result<bool> {
    match base.manifests.get(&arch) {
        Some(pinned) if pinned == manifest => Ok(false),
        Some(pinned) => bail!(
            "artifacts.lock pins {pinned} as the {arch} manifest of `{}`, but its pinned index \
             {top} lists {manifest} for linux/{}: the lock contradicts itself (edited by hand?); \
             re-pin the base with `cargo xtask lock update-base NAME`",
            base.reference,
            arch.oci_arch()
        ),
        None if options.locked => bail!(
            "artifacts.lock pins no {arch} manifest for `{}` (index {top} lists {manifest} for \
             linux/{}); --locked forbids changing the lock. Run without --locked to record it",
            base.reference,
            arch.oci_arch()
        ),
        None => Ok(true),
    }
}

/// New pins for the lock: the new index and, for every architecture the lock pinned (and this
/// one), the manifest the index offers now.
fn updated_pins(
    base: &Base,
    arch: Arch,
    top: &Digest,
    chosen: &ArchManifest,
) -> anyhow::Result<Base> {
    let mut manifests = UniqueMap::default();
    let wanted: Vec<Arch> = base.manifests.keys().copied().chain([arch]).collect();
    let offered: BTreeMap<Arch, Digest> = match &chosen.index {
        Some(index) => platform::manifests_by_arch(index)?,
        None => [(arch, chosen.digest)].into(),
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
    Ok(Base {
        reference: base.reference.clone(),
        index: *top,
        manifests,
    })
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

pub(super) fn descriptor_digest(d: &oci_spec::image::Digest) -> anyhow::Result<Digest> {
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
