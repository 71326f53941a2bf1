//! The dist as an OCI artifact: `cargo xtask dist push REF`, and `artifacts --from oci:REF`.
//!
//! ```text
//! index (REF's tag)            application/vnd.oci.image.index.v1+json
//!   manifest per arch          artifactType ARTIFACT_TYPE, platform linux/<amd64|arm64>,
//!                              annotations: arch, kernel and initrd versions
//!     config                   the empty descriptor (`{}`)
//!     layers, one per blob     KERNEL / INITRD / LOCK media types, annotated with kind,
//!                              version, arch and the store path (org.opencontainers.image.title)
//! ```
//! Pushed through the registry client the base pull uses (token auth; plain HTTP only for
//! loopback and `XTASK_REGISTRY_PLAIN_HTTP` hosts). Pulled back by digest: every manifest and
//! blob is checked against its digest, and only blobs the lock records are taken.

use std::fs;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use system::Lock;
use system::lock::Digest;

use super::install::Installed;
use super::tarball::{Node, Source};
use super::verify::recorded;
use super::{Options, select};
use crate::fetch;
use crate::oci::reference::ImageRef;
use crate::oci::registry::Registry;
use crate::store::StoreWriter;

pub const ARTIFACT_TYPE: &str = "application/vnd.microvm-system.dist.v1";
pub const KERNEL: &str = "application/vnd.microvm-system.kernel.v1";
pub const INITRD: &str = "application/vnd.microvm-system.initrd.v1+gzip";
pub const LOCK: &str = "application/vnd.microvm-system.lock.v1+json";
const EMPTY: &str = "application/vnd.oci.empty.v1+json";
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const ANNOTATION: &str = "dev.microvm-system";

fn registry(reference: &str, transfer: &fetch::Options) -> anyhow::Result<(ImageRef, Registry)> {
    let image = ImageRef::parse(reference)?;
    let hosts = crate::oci::PullOptions::from_env()?.plain_http_hosts;
    let registry = Registry::new(&image, transfer, &hosts)?;
    Ok((image, registry))
}

/// Pushes the selection `options` names (as `dist` would pack it) to `reference` (a tag);
/// returns the index digest.
pub fn push(
    options: &Options,
    reference: &str,
    transfer: &fetch::Options,
) -> anyhow::Result<Digest> {
    let lock = crate::lock::read(&options.lock)?;
    let selection = select(&lock, options)?;
    let (image, mut registry) = registry(reference, transfer)?;
    if image.digest.is_some() {
        bail!("dist push {reference}: push to a tag (`REPO:TAG`); the digest is the result");
    }
    let tag = image.tag.clone().unwrap_or_else(|| "latest".to_owned());
    let store = system::Store::with_lock(&options.data_dir, lock.clone());
    let empty = registry.push_blob(Arc::new(b"{}".to_vec()))?;
    let mut manifests = Vec::new();
    for &arch in &selection.arches {
        let (entries, packed) = super::pack_arch(&store, &lock, &selection, arch)?;
        let mut layers = Vec::new();
        let kinds = packed
            .kernels
            .iter()
            .map(|a| ("kernel", KERNEL, a))
            .chain(packed.initrds.iter().map(|a| ("initrd", INITRD, a)));
        for (kind, media_type, artifact) in kinds {
            let blob = system::Layout::new(&options.data_dir).blob(&artifact.sha256);
            let bytes = fs::read(&blob).with_context(|| format!("reading {}", blob.display()))?;
            // Verified through `system` by pack_arch; a change since is caught here.
            let digest = registry.push_blob(Arc::new(bytes))?;
            if digest.0 != artifact.sha256 {
                bail!("{} changed while it was pushed", blob.display());
            }
            layers.push(json!({
                "mediaType": media_type,
                "digest": digest.to_string(),
                "size": artifact.size,
                "annotations": {
                    "org.opencontainers.image.title": artifact.path,
                    format!("{ANNOTATION}.kind"): kind,
                    format!("{ANNOTATION}.version"): artifact.version.as_str(),
                    format!("{ANNOTATION}.arch"): arch.as_str(),
                },
            }));
        }
        let lock_bytes = entries
            .0
            .values()
            .find_map(|node| match node {
                Node::File {
                    source: Source::Bytes(bytes),
                    ..
                } => Some(bytes.clone()),
                _ => None,
            })
            .expect("every arch's entries carry the reduced lock");
        let lock_size = lock_bytes.len();
        let lock_digest = registry.push_blob(Arc::new(lock_bytes))?;
        layers.push(json!({
            "mediaType": LOCK,
            "digest": lock_digest.to_string(),
            "size": lock_size,
            "annotations": { "org.opencontainers.image.title": "system/artifacts.lock" },
        }));
        let versions = |list: &[super::Artifact]| {
            list.iter()
                .map(|a| a.version.as_str())
                .collect::<Vec<_>>()
                .join(",")
        };
        let annotations = json!({
            format!("{ANNOTATION}.arch"): arch.as_str(),
            format!("{ANNOTATION}.kernels"): versions(&packed.kernels),
            format!("{ANNOTATION}.initrds"): versions(&packed.initrds),
        });
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "artifactType": ARTIFACT_TYPE,
            "config": { "mediaType": EMPTY, "digest": empty.to_string(), "size": 2, "data": "e30=" },
            "layers": layers,
            "annotations": annotations,
        });
        let bytes = serde_json::to_vec(&manifest)?;
        let size = bytes.len();
        let digest = Digest(system::hash::sha256_bytes(&bytes));
        registry.push_manifest(&digest.to_string(), MANIFEST, bytes)?;
        manifests.push(json!({
            "mediaType": MANIFEST,
            "artifactType": ARTIFACT_TYPE,
            "digest": digest.to_string(),
            "size": size,
            "platform": { "architecture": arch.oci_arch(), "os": "linux" },
            "annotations": annotations,
        }));
    }
    let index = json!({
        "schemaVersion": 2,
        "mediaType": INDEX,
        "artifactType": ARTIFACT_TYPE,
        "manifests": manifests,
    });
    registry.push_manifest(&tag, INDEX, serde_json::to_vec(&index)?)
}

/// Takes the kernel and initrd layers of the artifact at `reference` that `lock` records into
/// `store`, each verified against its digest before it is visible. A digest the lock does not
/// know is refused.
pub fn pull(
    reference: &str,
    lock: &Lock,
    store: &StoreWriter,
    transfer: &fetch::Options,
    installed: &mut Installed,
) -> anyhow::Result<()> {
    let (image, mut registry) = registry(reference, transfer)?;
    let top = match (&image.digest, &image.tag) {
        (Some(digest), _) => digest.to_string(),
        (None, Some(tag)) => tag.clone(),
        (None, None) => "latest".to_owned(),
    };
    let index = registry.get_manifest(&top)?;
    let index: Value = serde_json::from_slice(&index.bytes)
        .with_context(|| format!("{reference}: the index is not JSON"))?;
    let known = recorded(lock);
    let descriptors = index["manifests"]
        .as_array()
        .with_context(|| format!("{reference}: not an image index (no `manifests`)"))?;
    for descriptor in descriptors {
        if descriptor["artifactType"] != ARTIFACT_TYPE {
            continue;
        }
        let digest = descriptor["digest"]
            .as_str()
            .context("a manifest descriptor without a digest")?;
        let manifest = registry.get_manifest(digest)?;
        let manifest: Value = serde_json::from_slice(&manifest.bytes)?;
        for layer in manifest["layers"].as_array().into_iter().flatten() {
            if layer["mediaType"] != KERNEL && layer["mediaType"] != INITRD {
                continue;
            }
            let text = layer["digest"].as_str().unwrap_or_default();
            let digest: Digest = text
                .parse()
                .map_err(|e| anyhow::anyhow!("{reference}: layer digest `{text}`: {e}"))?;
            let size = layer["size"].as_u64().context("a layer without a size")?;
            let Some((kind, version, arch, _, _)) =
                known.iter().find(|(_, _, _, d, _)| *d == digest.0)
            else {
                bail!(
                    "{reference}: layer {digest} is not recorded in the lock: refusing it (the \
                     artifact was made for another lock)"
                );
            };
            let source = std::path::PathBuf::from(reference);
            if store.has_verified_blob(&digest.0, Some(size))? {
                installed.present.push((digest.0, source));
                continue;
            }
            let what = format!("{kind} {version} ({arch}) from {reference}");
            let mut writer = store.blob_writer()?;
            registry.get_blob(&digest, size, &mut writer, &what)?;
            let blob = store.commit(writer, Some(&digest.0), Some(size), &what)?;
            installed.written.push((blob.sha256, blob.size, source));
        }
    }
    Ok(())
}
