//! Choosing an architecture's manifest from an image index.

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use oci_spec::image::{Descriptor, ImageIndex};
use system::Arch;
use system::lock::Digest;

const REFERENCE_TYPE: &str = "vnd.docker.reference.type";

/// True for entries that are not runnable images: BuildKit attestations and anything without
/// a real platform.
fn is_attestation(d: &Descriptor) -> bool {
    if d.annotations()
        .as_ref()
        .and_then(|a| a.get(REFERENCE_TYPE))
        .is_some_and(|t| t == "attestation-manifest")
    {
        return true;
    }
    match d.platform() {
        Some(p) => p.os().to_string() == "unknown" || p.architecture().to_string() == "unknown",
        None => false,
    }
}

/// How well a platform variant fits: lower is better, `None` is no fit.
fn variant_rank(arch: Arch, variant: Option<&str>) -> Option<u8> {
    match (arch, variant) {
        (_, None) => Some(0),
        (Arch::X86_64, Some("v1")) => Some(1),
        (Arch::Aarch64, Some("v8")) => Some(0),
        // Other variants (amd64/v3, arm64/v9) need CPUs we cannot assume.
        _ => None,
    }
}

/// The `linux/<arch>` manifest of `index`, skipping attestations.
pub fn select(index: &ImageIndex, arch: Arch) -> anyhow::Result<Descriptor> {
    let mut best: Option<(u8, &Descriptor)> = None;
    for d in index.manifests() {
        if is_attestation(d) {
            continue;
        }
        let Some(p) = d.platform() else { continue };
        if p.os().to_string() != "linux" || p.architecture().to_string() != arch.oci_arch() {
            continue;
        }
        let Some(rank) = variant_rank(arch, p.variant().as_deref()) else {
            continue;
        };
        if best.is_none_or(|(r, _)| rank < r) {
            best = Some((rank, d));
        }
    }
    match best {
        Some((_, d)) => Ok(d.clone()),
        None => bail!(
            "the image has no linux/{} manifest; it offers: {}",
            arch.oci_arch(),
            platforms(index)
        ),
    }
}

/// Every architecture we build for that the index offers, with its manifest digest.
pub fn manifests_by_arch(index: &ImageIndex) -> anyhow::Result<BTreeMap<Arch, Digest>> {
    let mut out = BTreeMap::new();
    for arch in Arch::ALL {
        if let Ok(d) = select(index, arch) {
            let digest = d
                .digest()
                .to_string()
                .parse::<Digest>()
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("the linux/{} entry of the index", arch.oci_arch()))?;
            out.insert(arch, digest);
        }
    }
    Ok(out)
}

fn platforms(index: &ImageIndex) -> String {
    let list: Vec<String> = index
        .manifests()
        .iter()
        .filter(|d| !is_attestation(d))
        .filter_map(|d| d.platform().as_ref())
        .map(|p| match p.variant() {
            Some(v) => format!("{}/{}/{v}", p.os(), p.architecture()),
            None => format!("{}/{}", p.os(), p.architecture()),
        })
        .collect();
    if list.is_empty() {
        "no platforms".into()
    } else {
        list.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(entries: &str) -> ImageIndex {
        let text = format!(r#"{{"schemaVersion":2,"manifests":[{entries}]}}"#);
        ImageIndex::from_reader(text.as_bytes()).unwrap()
    }

    fn entry(n: u8, platform: &str, annotations: &str) -> String {
        format!(
            r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","size":1,
                "digest":"sha256:{}","platform":{platform}{annotations}}}"#,
            format!("{n:02x}").repeat(32)
        )
    }

    #[test]
    fn picks_the_arch_and_skips_attestations() {
        let att = r#","annotations":{"vnd.docker.reference.type":"attestation-manifest"}"#;
        let idx = index(
            &[
                entry(1, r#"{"os":"unknown","architecture":"unknown"}"#, ""),
                entry(2, r#"{"os":"linux","architecture":"amd64"}"#, att),
                entry(3, r#"{"os":"linux","architecture":"amd64"}"#, ""),
                entry(
                    4,
                    r#"{"os":"linux","architecture":"arm","variant":"v7"}"#,
                    "",
                ),
                entry(
                    5,
                    r#"{"os":"linux","architecture":"arm64","variant":"v8"}"#,
                    "",
                ),
                entry(
                    6,
                    r#"{"os":"linux","architecture":"amd64","variant":"v3"}"#,
                    "",
                ),
            ]
            .join(","),
        );
        let pick = |arch| select(&idx, arch).unwrap().digest().to_string();
        assert!(pick(Arch::X86_64).ends_with(&"03".repeat(32)));
        assert!(pick(Arch::Aarch64).ends_with(&"05".repeat(32)));
        let all = manifests_by_arch(&idx).unwrap();
        assert_eq!(all.len(), 2);
    }

    #[test]
    fn says_what_is_offered_when_the_arch_is_missing() {
        let idx = index(&entry(
            4,
            r#"{"os":"linux","architecture":"arm","variant":"v7"}"#,
            "",
        ));
        let err = select(&idx, Arch::Aarch64).unwrap_err().to_string();
        assert!(err.contains("no linux/arm64 manifest"), "{err}");
        assert!(err.contains("linux/arm/v7"), "{err}");
    }
}
