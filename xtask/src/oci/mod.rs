//! The base image: pulled from an OCI registry (or a local OCI image layout), pinned by digest,
//! cached as a standard OCI image layout, and turned into a [`Tree`] by the layer model.
//!
//! ```text
//! lock bases.<name> {reference, index, manifests}
//!   └─ the pinned index, by digest (the lock wins: tags are resolved by `lock update-base`)
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
mod convert;
#[cfg(test)]
mod fault_tests;
pub mod layers;
pub mod plain_http;
pub mod platform;
mod pull;
mod push;
pub mod reference;
pub mod registry;
#[cfg(test)]
mod tests;
mod update;

use std::path::Path;

use anyhow::Context;
use system::Arch;
use system::lock::{Base, Digest};

use crate::fetch;
use crate::oci::layers::LayerLimits;
use crate::rootfs::Tree;
use pull::Puller;
pub use update::resolve_base;

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
    /// The lock may not change: a missing pin is an error.
    pub locked: bool,
    /// Pull from here instead of the lock's reference (e.g. `oci:/mnt/usb/alpine:3.22` on an
    /// air-gapped host); the lock's digests still have to match.
    pub source: Option<String>,
    /// Timeouts, attempts and progress: the same as for every other download.
    pub transfer: fetch::Options,
    /// Hosts (`host` or `host:port`) that may be reached over plain HTTP besides loopback.
    pub plain_http_hosts: Vec<String>,
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
            options.plain_http_hosts = hosts
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
    /// New pins for the lock when it lacked this architecture's manifest (never under
    /// `locked`); `None` when the lock already says exactly this.
    pub updated_pins: Option<Base>,
}

/// Pulls `base` for `arch` through the OCI cache at `cache_dir` (the store's `oci-cache/`,
/// [`system::layout::Layout::oci_cache`]) and applies its layers. The lock wins: the pinned
/// index is fetched by digest and the reference's tag is not looked up, so a tag that moved
/// changes nothing until `lock update-base` ([`resolve_base`]) records where it points now.
pub fn pull_base(
    options: &PullOptions,
    base: &Base,
    arch: Arch,
    cache_dir: &Path,
) -> anyhow::Result<PulledBase> {
    let (mut puller, _) = Puller::open(options, base, cache_dir)?;
    let what = format!("base `{}` ({arch})", base.reference);
    puller.pull(options, base, arch).with_context(|| what)
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
