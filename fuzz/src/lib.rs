//! What the layer-based targets share: splitting an input into layers, mending tar header
//! checksums so that mutated headers reach the applier instead of failing the checksum, and
//! applying one layer under small caps.

use system::Digest;
use xtask::oci::layers::{Applier, LayerInfo, LayerLimits};

/// Small caps, so a bomb is refused within a run's memory (the real caps are 2 GiB).
pub const LIMITS: LayerLimits = LayerLimits {
    max_bytes: 8 << 20,
    max_entries: 20_000,
    max_content_bytes: 8 << 20,
};

/// Applies `blob` as the next layer (its media type found by its magic bytes, as a layer
/// without one is). On failure returns the layer's digest with the error, for the caller to
/// check that the error names it.
pub fn apply_layer(applier: &mut Applier, blob: &[u8]) -> Result<(), (Digest, anyhow::Error)> {
    let digest = Digest(system::hash::sha256_bytes(blob));
    let layer = LayerInfo {
        digest: &digest,
        media_type: "",
        diff_id: None,
    };
    applier.apply(layer, blob).map_err(|e| (digest, e))
}

/// Separates the layers of one input.
pub const LAYER_SEPARATOR: &[u8] = b"%%LAYER%%";

/// At most this many layers per input.
pub const MAX_LAYERS: usize = 4;

/// The layers of `data`, each with its tar header checksums recomputed (see [`mend_checksums`]).
pub fn layers(data: &[u8]) -> Vec<Vec<u8>> {
    let mut parts = Vec::new();
    let mut rest = data;
    while parts.len() + 1 < MAX_LAYERS
        && let Some(at) = rest
            .windows(LAYER_SEPARATOR.len())
            .position(|w| w == LAYER_SEPARATOR)
    {
        parts.push(&rest[..at]);
        rest = &rest[at + LAYER_SEPARATOR.len()..];
    }
    parts.push(rest);
    parts
        .into_iter()
        .map(|part| {
            let mut layer = part.to_vec();
            mend_checksums(&mut layer);
            layer
        })
        .collect()
}

/// Walks an uncompressed tar from header to header (each followed by its content, padded to 512
/// bytes) and writes each header's correct checksum. Compressed layers are left as they are.
/// A mutated size sends the walk elsewhere: whatever it lands on gets a valid checksum too.
pub fn mend_checksums(layer: &mut [u8]) {
    const BLOCK: usize = 512;
    if layer.starts_with(&[0x1f, 0x8b]) || layer.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return;
    }
    let mut at: usize = 0;
    while at.checked_add(BLOCK).is_some_and(|end| end <= layer.len()) {
        let block = &mut layer[at..at + BLOCK];
        if block.iter().all(|&b| b == 0) {
            at += BLOCK;
            continue;
        }
        let mut header = tar::Header::new_old();
        header.as_mut_bytes().copy_from_slice(block);
        let size = header.entry_size().unwrap_or(0);
        header.set_cksum();
        block.copy_from_slice(header.as_bytes());
        let padded = size.div_ceil(BLOCK as u64).saturating_mul(BLOCK as u64);
        match usize::try_from(padded)
            .ok()
            .and_then(|p| at.checked_add(BLOCK)?.checked_add(p))
        {
            Some(next) => at = next,
            None => return,
        }
    }
}
