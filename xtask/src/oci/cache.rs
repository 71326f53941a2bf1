//! An OCI image layout on disk (`oci-layout`, `index.json`, `blobs/sha256/<hex>`): the store's
//! `oci-cache/`, and local layouts used as a source.
//!
//! Blobs go through the store's [`BlobDir`], as the system store's do: hashed while written to a
//! temp file in the blob directory, fsynced, checked, made read-only, renamed into place, and
//! the directory fsynced. A crash leaves at most a `.partial-*` file behind, never a wrong
//! blob. `index.json` is replaced with [`atomic_write`], under an advisory lock on the layout
//! directory, and entries other tools wrote are kept.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use system::hash::{sha256_bytes, sha256_reader};
use system::lock::Digest;

use crate::store::{BlobDir, BlobWriter, atomic_write};

pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
const LAYOUT_VERSION: &str = r#"{"imageLayoutVersion":"1.0.0"}"#;

/// One OCI image layout directory.
#[derive(Debug, Clone)]
pub struct OciLayout {
    root: PathBuf,
    blobs: BlobDir,
}

/// What [`OciLayout::check_blob`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobState {
    Missing,
    Whole,
    /// Present but not the blob: `why` names the file and what is wrong with it.
    Corrupt {
        why: String,
    },
}

/// An `index.json` entry: what a ref name points to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutEntry {
    pub ref_name: String,
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    /// `linux/amd64` style platform, for per-architecture entries.
    pub platform: Option<(String, String)>,
}

impl OciLayout {
    /// Opens the layout at `root`, creating it (and `oci-layout`, `index.json`) when missing.
    pub fn create(root: &Path) -> anyhow::Result<OciLayout> {
        let layout = OciLayout {
            root: root.to_owned(),
            blobs: BlobDir::create(&root.join("blobs/sha256")).context("creating the OCI cache")?,
        };
        if !layout.root.join("oci-layout").exists() {
            atomic_write(&layout.root.join("oci-layout"), LAYOUT_VERSION.as_bytes())?;
        }
        if !layout.root.join("index.json").exists() {
            let empty = json!({"schemaVersion": 2, "manifests": []});
            atomic_write(&layout.root.join("index.json"), &to_json_bytes(&empty))?;
        }
        Ok(layout)
    }

    /// Opens an existing layout (a source); it must have `oci-layout` and `index.json`.
    pub fn open(root: &Path) -> anyhow::Result<OciLayout> {
        for name in ["oci-layout", "index.json"] {
            if !root.join(name).is_file() {
                bail!(
                    "{} is not an OCI image layout: it has no `{name}` (create one with \
                     `skopeo copy docker://IMAGE oci:{}:TAG`)",
                    root.display(),
                    root.display()
                );
            }
        }
        Ok(OciLayout {
            root: root.to_owned(),
            // A source is read, never written: nothing is created in it.
            blobs: BlobDir::new(&root.join("blobs/sha256")),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs.path(&digest.0)
    }

    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blobs.contains(&digest.0)
    }

    /// Whether the blob `digest` is present and whole: a regular file that hashes to its name.
    /// Reads it all; callers check before they use a cached blob, since a disk, a hand edit or
    /// another tool may have changed it since it was verified.
    pub fn check_blob(&self, digest: &Digest) -> anyhow::Result<BlobState> {
        let path = self.blob_path(digest);
        let meta = match fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BlobState::Missing),
            Err(e) => return Err(e).with_context(|| format!("inspecting {}", path.display())),
        };
        if !meta.is_file() {
            return Ok(BlobState::Corrupt {
                why: format!("{} is not a regular file", path.display()),
            });
        }
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let (actual, size) =
            sha256_reader(file).with_context(|| format!("reading {}", path.display()))?;
        if actual == digest.0 {
            return Ok(BlobState::Whole);
        }
        Ok(BlobState::Corrupt {
            why: format!(
                "{} is corrupt: its {size} bytes hash to sha256:{actual}",
                path.display()
            ),
        })
    }

    /// Reads a small blob (a manifest, index or config) and checks it against its digest.
    pub fn read_blob(&self, digest: &Digest, max: u64) -> anyhow::Result<Vec<u8>> {
        let path = self.blob_path(digest);
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let mut bytes = Vec::new();
        file.take(max + 1)
            .read_to_end(&mut bytes)
            .with_context(|| format!("reading {}", path.display()))?;
        if bytes.len() as u64 > max {
            bail!("{} is larger than {max} bytes; refusing it", path.display());
        }
        let actual = Digest(sha256_bytes(&bytes));
        if actual != *digest {
            bail!(
                "{} is corrupt: it hashes to {actual}, not {digest}; delete it and pull again",
                path.display()
            );
        }
        Ok(bytes)
    }

    /// Stores `bytes` as the blob `digest`, after checking they hash to it.
    pub fn put_bytes(&self, digest: &Digest, bytes: &[u8]) -> anyhow::Result<()> {
        let actual = Digest(sha256_bytes(bytes));
        if actual != *digest {
            bail!("refusing to cache {digest}: the bytes hash to {actual}");
        }
        // A corrupt copy is replaced (the rename overwrites it).
        if self.check_blob(digest)? == BlobState::Whole {
            return Ok(());
        }
        self.put_with(digest, Some(bytes.len() as u64), |writer| {
            std::io::Write::write_all(writer, bytes)?;
            Ok(())
        })
    }

    /// Stores the blob `digest` with the bytes `fill` writes into a blob writer; it becomes
    /// visible only if they have the expected size and digest. A failed `fill` or a mismatch
    /// leaves nothing behind.
    pub fn put_with(
        &self,
        digest: &Digest,
        size: Option<u64>,
        fill: impl FnOnce(&mut BlobWriter) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let mut writer = self.blobs.writer()?;
        fill(&mut writer)?;
        writer.commit(Some(&digest.0), size).with_context(|| {
            format!(
                "blob {digest}: nothing was cached (the source served corrupt or tampered \
                 content)"
            )
        })?;
        Ok(())
    }

    #[cfg(test)]
    /// The entries of `index.json` that carry a ref name.
    pub fn entries(&self) -> anyhow::Result<Vec<LayoutEntry>> {
        let index = self.read_index()?;
        let mut out = Vec::new();
        for m in index["manifests"].as_array().into_iter().flatten() {
            let Some(ref_name) = m["annotations"][REF_NAME].as_str() else {
                continue;
            };
            out.push(parse_entry(m, ref_name).with_context(|| {
                format!(
                    "entry `{ref_name}` of {}",
                    self.root.join("index.json").display()
                )
            })?);
        }
        Ok(out)
    }

    /// The entry a ref name points to; without a name, the only entry of the layout.
    pub fn resolve(&self, ref_name: Option<&str>) -> anyhow::Result<LayoutEntry> {
        let index = self.read_index()?;
        let manifests: Vec<&Value> = index["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .collect();
        let names = || {
            manifests
                .iter()
                .filter_map(|m| m["annotations"][REF_NAME].as_str())
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let chosen = match ref_name {
            Some(name) => manifests
                .iter()
                .rev()
                .find(|m| m["annotations"][REF_NAME].as_str() == Some(name))
                .with_context(|| {
                    format!(
                        "the OCI layout {} has no image named `{name}`; it has: {}",
                        self.root.display(),
                        names()
                    )
                })?,
            None if manifests.len() == 1 => &manifests[0],
            None => bail!(
                "the OCI layout {} holds {} images; name one (`oci:{}:REF`), one of: {}",
                self.root.display(),
                manifests.len(),
                self.root.display(),
                names()
            ),
        };
        parse_entry(chosen, ref_name.unwrap_or_default())
    }

    /// Points each entry's ref name at its descriptor, replacing earlier entries of the same
    /// name and keeping everything else in `index.json`.
    pub fn tag(&self, entries: &[LayoutEntry]) -> anyhow::Result<()> {
        // flock on the directory: serializes writers without an extra file in the layout.
        let dir =
            File::open(&self.root).with_context(|| format!("opening {}", self.root.display()))?;
        dir.lock()
            .with_context(|| format!("locking {}", self.root.display()))?;
        let mut index = self.read_index()?;
        if !index["manifests"].is_array() {
            index["manifests"] = json!([]);
        }
        let manifests = index["manifests"]
            .as_array_mut()
            .expect("just made an array");
        manifests.retain(|m| {
            let name = m["annotations"][REF_NAME].as_str();
            !entries.iter().any(|e| Some(e.ref_name.as_str()) == name)
        });
        for e in entries {
            let mut descriptor = json!({
                "mediaType": e.media_type,
                "digest": e.digest.to_string(),
                "size": e.size,
                "annotations": { REF_NAME: e.ref_name },
            });
            if let Some((os, arch)) = &e.platform {
                descriptor["platform"] = json!({"os": os, "architecture": arch});
            }
            manifests.push(descriptor);
        }
        if index.get("schemaVersion").is_none() {
            index["schemaVersion"] = json!(2);
        }
        atomic_write(&self.root.join("index.json"), &to_json_bytes(&index))
    }

    fn read_index(&self) -> anyhow::Result<Value> {
        let path = self.root.join("index.json");
        let text = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("{} is not JSON", path.display()))
    }
}

fn parse_entry(m: &Value, ref_name: &str) -> anyhow::Result<LayoutEntry> {
    let digest = m["digest"]
        .as_str()
        .context("has no digest")?
        .parse::<Digest>()
        .map_err(anyhow::Error::msg)?;
    let platform = match (
        m["platform"]["os"].as_str(),
        m["platform"]["architecture"].as_str(),
    ) {
        (Some(os), Some(arch)) => Some((os.to_owned(), arch.to_owned())),
        _ => None,
    };
    Ok(LayoutEntry {
        ref_name: ref_name.to_owned(),
        media_type: m["mediaType"].as_str().unwrap_or_default().to_owned(),
        digest,
        size: m["size"].as_u64().context("has no size")?,
        platform,
    })
}

fn to_json_bytes(value: &Value) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(value).expect("JSON values serialize");
    bytes.push(b'\n');
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_are_verified_before_they_are_visible() {
        let dir = tempfile::tempdir().unwrap();
        let layout = OciLayout::create(dir.path()).unwrap();
        let good = Digest(sha256_bytes(b"hello"));
        let err = layout
            .put_with(&good, Some(5), |f| {
                Ok(std::io::Write::write_all(f, b"hellO")?)
            })
            .unwrap_err();
        assert!(err.to_string().contains("nothing was cached"), "{err:#}");
        assert!(!layout.has_blob(&good));
        let leftovers = fs::read_dir(dir.path().join("blobs/sha256"))
            .unwrap()
            .count();
        assert_eq!(leftovers, 0);
        layout.put_bytes(&good, b"hello").unwrap();
        assert_eq!(layout.read_blob(&good, 100).unwrap(), b"hello");
        assert!(layout.put_bytes(&good, b"other").is_err());
    }

    #[test]
    fn tagging_replaces_by_name_and_keeps_other_entries() {
        let dir = tempfile::tempdir().unwrap();
        let layout = OciLayout::create(dir.path()).unwrap();
        let entry = |name: &str, data: &[u8]| LayoutEntry {
            ref_name: name.into(),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            digest: Digest(sha256_bytes(data)),
            size: data.len() as u64,
            platform: Some(("linux".into(), "amd64".into())),
        };
        layout.tag(&[entry("a", b"1"), entry("b", b"2")]).unwrap();
        layout.tag(&[entry("a", b"3")]).unwrap();
        let entries = layout.entries().unwrap();
        assert_eq!(entries, [entry("b", b"2"), entry("a", b"3")]);
        assert_eq!(
            layout.resolve(Some("a")).unwrap().digest,
            entry("a", b"3").digest
        );
        assert!(
            layout
                .resolve(None)
                .unwrap_err()
                .to_string()
                .contains("holds 2 images")
        );
        assert!(layout.resolve(Some("c")).is_err());
        assert!(OciLayout::open(dir.path()).is_ok());
        assert!(OciLayout::open(&dir.path().join("blobs")).is_err());
    }
}
