//! `lock update-base`: where a base image's reference points now, as new pins for the lock.
//! Like `cargo update`, this is the only place a tag is looked up; pulls use the lock's digests.
//! The index and the per-architecture manifests (and a single-platform image's config) land in
//! the OCI cache, verified, so the next pull only fetches layers.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use oci_spec::image::{ImageIndex, ImageManifest};
use system::Arch;
use system::lock::{Base, Digest, UniqueMap};

use super::pull::{Puller, Remote};
use super::reference::Source;
use super::registry::MAX_MANIFEST_BYTES;
use super::{DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, PullOptions, media_type_of};
use super::{platform, pull};

/// The pins `base`'s reference (or `options.source`) resolves to now: the index (or
/// single-platform manifest) digest and every linux architecture we build for that it offers.
pub fn resolve_base(options: &PullOptions, base: &Base, cache_dir: &Path) -> anyhow::Result<Base> {
    if options.offline {
        bail!(
            "resolving `{}` needs its registry or layout; it cannot be done --offline",
            base.reference
        );
    }
    let (mut puller, source) = Puller::open(options, base, cache_dir)?;
    let (top, bytes) = puller
        .resolve_tag(&source)
        .with_context(|| format!("resolving `{}`", puller.source))?;
    let manifests = puller
        .arch_pins(&top, &bytes)
        .with_context(|| format!("`{}` (resolved to {top})", puller.source))?;
    Ok(Base {
        reference: base.reference.clone(),
        index: top,
        manifests: UniqueMap(manifests),
    })
}

impl Puller {
    /// The digest and bytes the source's tag (or digest) points to now, cached.
    fn resolve_tag(&mut self, source: &Source) -> anyhow::Result<(Digest, Vec<u8>)> {
        let top = match (&mut self.remote, source) {
            (Remote::Registry(_), Source::Registry(image)) if image.digest.is_some() => {
                image.digest.expect("checked")
            }
            (Remote::Registry(registry), Source::Registry(image)) => {
                let tag = image.manifest_reference();
                eprintln!("resolving {image} at {}", registry.host());
                // HEAD first: when the cache holds what the tag points to, no download (and no
                // Docker Hub pull) is needed.
                match registry.head_manifest(&tag)? {
                    Some(digest) if self.cache.has_blob(&digest) => digest,
                    _ => {
                        let fetched = registry.get_manifest(&tag)?;
                        self.cache.put_bytes(&fetched.digest, &fetched.bytes)?;
                        return Ok((fetched.digest, fetched.bytes));
                    }
                }
            }
            (Remote::Layout(layout), Source::Layout(layout_ref)) => {
                layout.resolve(layout_ref.ref_name.as_deref())?.digest
            }
            (Remote::Offline, _) => unreachable!("refused above"),
            _ => unreachable!("the remote is made from the source"),
        };
        let bytes = self
            .manifest(&top, "index")?
            .expect("online pulls fetch what the cache lacks");
        Ok((top, bytes))
    }

    /// The manifest digest of every architecture the resolved image offers, each manifest
    /// fetched into the cache (so the registry is known to serve it).
    fn arch_pins(&mut self, top: &Digest, bytes: &[u8]) -> anyhow::Result<BTreeMap<Arch, Digest>> {
        let media_type = media_type_of(bytes).unwrap_or_default();
        match media_type.as_str() {
            OCI_INDEX | DOCKER_LIST => {
                let index = ImageIndex::from_reader(bytes)
                    .with_context(|| format!("index {top} is not a valid image index"))?;
                let offered = platform::manifests_by_arch(&index)?;
                if offered.is_empty() {
                    // `select` explains what the index offers instead.
                    platform::select(&index, Arch::host())
                        .with_context(|| format!("index {top} offers no image we build for"))?;
                }
                for (arch, digest) in &offered {
                    let what = format!("linux/{} manifest", arch.oci_arch());
                    self.manifest(digest, &what)?
                        .expect("online pulls fetch what the cache lacks");
                }
                Ok(offered)
            }
            OCI_MANIFEST | DOCKER_MANIFEST => {
                // A single-platform image: its config says which architecture it is.
                let manifest = ImageManifest::from_reader(bytes)
                    .with_context(|| format!("manifest {top} is not a valid image manifest"))?;
                let config = manifest.config();
                let digest = pull::descriptor_digest(config.digest())?;
                self.blob(&digest, config.size(), "config")?;
                let config: serde_json::Value =
                    serde_json::from_slice(&self.cache.read_blob(&digest, MAX_MANIFEST_BYTES)?)
                        .with_context(|| format!("config {digest} is not JSON"))?;
                let (os, arch) = (
                    config["os"].as_str().unwrap_or_default(),
                    config["architecture"].as_str().unwrap_or_default(),
                );
                let found = Arch::ALL
                    .into_iter()
                    .find(|a| os == "linux" && a.oci_arch() == arch);
                match found {
                    Some(a) => Ok([(a, *top)].into()),
                    None => bail!(
                        "the image is for {os}/{arch} (config {digest}); we build for linux/amd64 \
                         and linux/arm64"
                    ),
                }
            }
            other => bail!(
                "{top} has media type `{other}`, which is neither an image index nor an image \
                 manifest"
            ),
        }
    }
}
