//! Docker v2s2 manifests and manifest lists rewritten with OCI media types, so the cache's
//! `index.json` names only OCI documents (the image layout spec's requirement, and what
//! `skopeo inspect oci:` and `umoci` read).
//!
//! The pulled documents stay in the cache under their own digests (the lock pins those, and
//! offline pulls verify against them); the rewrites are extra blobs that point to the same config
//! and layer blobs, as `skopeo copy docker://… oci:…` converts. A rewrite is a pure function of
//! the original's bytes, so every pull produces the same blob.

use anyhow::{Context, bail};
use serde_json::Value;

use super::{DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};

const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// The OCI layer media type for a Docker one; OCI types pass through.
fn layer_type(media_type: &str) -> anyhow::Result<&str> {
    Ok(match media_type {
        "application/vnd.docker.image.rootfs.diff.tar.gzip" => {
            "application/vnd.oci.image.layer.v1.tar+gzip"
        }
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        }
        "application/vnd.docker.image.rootfs.diff.tar" => "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.docker.image.rootfs.diff.tar.zstd" => {
            "application/vnd.oci.image.layer.v1.tar+zstd"
        }
        t if t.starts_with("application/vnd.docker.") => {
            bail!("layer media type `{t}` has no OCI equivalent")
        }
        t => t,
    })
}

/// A Docker v2s2 image manifest with OCI media types (manifest, config, layers); `None` when
/// `bytes` is not a Docker manifest.
pub fn manifest(bytes: &[u8]) -> anyhow::Result<Option<Vec<u8>>> {
    let mut doc: Value = serde_json::from_slice(bytes).context("a manifest that is not JSON")?;
    if doc["mediaType"] != DOCKER_MANIFEST {
        return Ok(None);
    }
    doc["mediaType"] = OCI_MANIFEST.into();
    let config = &mut doc["config"];
    if config["mediaType"] == DOCKER_CONFIG {
        config["mediaType"] = OCI_CONFIG.into();
    }
    for layer in doc["layers"].as_array_mut().into_iter().flatten() {
        let oci = layer_type(layer["mediaType"].as_str().unwrap_or_default())?.to_owned();
        layer["mediaType"] = oci.into();
    }
    Ok(Some(to_bytes(&doc)))
}

/// An index or manifest list with every Docker manifest entry replaced by its OCI rewrite:
/// `rewritten` maps an entry's digest to the rewrite's (digest, size), or `None` to drop the
/// entry (its manifest is not in the cache). `None` when nothing in `bytes` is Docker's.
pub fn index(
    bytes: &[u8],
    mut rewritten: impl FnMut(&str) -> anyhow::Result<Option<(String, u64)>>,
) -> anyhow::Result<Option<Vec<u8>>> {
    let mut doc: Value = serde_json::from_slice(bytes).context("an index that is not JSON")?;
    let entries = doc["manifests"].as_array().cloned().unwrap_or_default();
    let docker_entries = entries.iter().any(|m| m["mediaType"] == DOCKER_MANIFEST);
    if doc["mediaType"] != DOCKER_LIST && !docker_entries {
        return Ok(None);
    }
    doc["mediaType"] = OCI_INDEX.into();
    let mut kept = Vec::new();
    for mut entry in entries {
        if entry["mediaType"] == DOCKER_MANIFEST {
            let digest = entry["digest"].as_str().unwrap_or_default().to_owned();
            let Some((new_digest, size)) = rewritten(&digest)? else {
                continue;
            };
            entry["mediaType"] = OCI_MANIFEST.into();
            entry["digest"] = new_digest.into();
            entry["size"] = size.into();
        }
        kept.push(entry);
    }
    doc["manifests"] = kept.into();
    Ok(Some(to_bytes(&doc)))
}

fn to_bytes(doc: &Value) -> Vec<u8> {
    serde_json::to_vec(doc).expect("JSON values serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_manifests_get_oci_media_types_and_keep_their_blobs() {
        let docker = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",
            "config":{"mediaType":"application/vnd.docker.container.image.v1+json","size":2,"digest":"sha256:c"},
            "layers":[{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","size":3,"digest":"sha256:l"}]}"#;
        let oci: Value = serde_json::from_slice(&manifest(docker).unwrap().unwrap()).unwrap();
        assert_eq!(oci["mediaType"], OCI_MANIFEST);
        assert_eq!(oci["config"]["mediaType"], OCI_CONFIG);
        assert_eq!(oci["config"]["digest"], "sha256:c");
        assert_eq!(
            oci["layers"][0]["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
        assert_eq!(oci["layers"][0]["digest"], "sha256:l");
        assert_eq!(manifest(docker).unwrap(), manifest(docker).unwrap());
        let already =
            br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#;
        assert!(manifest(already).unwrap().is_none());
    }

    #[test]
    fn lists_point_to_the_rewrites_and_drop_what_is_not_cached() {
        let list = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json",
            "manifests":[
              {"mediaType":"application/vnd.docker.distribution.manifest.v2+json","digest":"sha256:a","size":1,
               "platform":{"os":"linux","architecture":"amd64"}},
              {"mediaType":"application/vnd.docker.distribution.manifest.v2+json","digest":"sha256:b","size":1,
               "platform":{"os":"linux","architecture":"arm64"}}]}"#;
        let out = index(list, |d| {
            Ok((d == "sha256:a").then(|| ("sha256:a2".to_owned(), 7)))
        })
        .unwrap()
        .unwrap();
        let oci: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(oci["mediaType"], OCI_INDEX);
        let entries = oci["manifests"].as_array().unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0]["digest"], "sha256:a2");
        assert_eq!(entries[0]["size"], 7);
        assert_eq!(entries[0]["mediaType"], OCI_MANIFEST);
        assert_eq!(entries[0]["platform"]["architecture"], "amd64");
    }
}
