//! Where a base image comes from: a registry reference or a local OCI image layout.

use std::fmt;
use std::path::PathBuf;

use anyhow::{Context, bail};
use system::lock::Digest;

/// Docker Hub's name in references, and the host that actually serves its registry API.
const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A parsed image reference: `alpine:3.22`, `docker.io/library/alpine:3.22@sha256:…`,
/// `127.0.0.1:5000/repo:tag`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// The registry as written (after normalization: `docker.io` for Docker Hub).
    pub registry: String,
    /// `library/alpine`.
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

impl ImageRef {
    pub fn parse(text: &str) -> anyhow::Result<ImageRef> {
        let parsed: oci_spec::distribution::Reference = text.parse().with_context(|| {
            format!(
                "`{text}` is not an image reference; expected e.g. `alpine:3.22`, \
                 `docker.io/library/alpine:3.22@sha256:<hex>` or `host:port/repo:tag`"
            )
        })?;
        let digest = parsed
            .digest()
            .map(|d| {
                Digest::parse(d)
                    .map_err(anyhow::Error::msg)
                    .with_context(|| format!("in reference `{text}`"))
            })
            .transpose()?;
        // oci-spec's domain split lacks one of Docker's rules: a first component with upper-case
        // letters is a registry host, since repositories are lower case (`Host/app` is `app` on
        // `Host`, not `Host/app` on Docker Hub, a name no registry accepts).
        let (registry, repository) = match parsed.repository().split_once('/') {
            Some((host, rest)) if host.bytes().any(|b| b.is_ascii_uppercase()) => {
                (host.to_owned(), rest.to_owned())
            }
            _ => (parsed.registry().to_owned(), parsed.repository().to_owned()),
        };
        // oci-spec fills in `latest` only when there is neither a tag nor a digest; keep that.
        Ok(ImageRef {
            registry,
            repository,
            tag: parsed.tag().map(str::to_owned),
            digest,
        })
    }

    /// The host (and port) that serves the distribution API for this registry.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// What to ask the registry for: the digest when there is one (it cannot move), else the tag.
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".into(),
        }
    }

    /// The name recorded in the cache's `index.json` (`org.opencontainers.image.ref.name`): the
    /// reference without its digest when it has a tag, so `skopeo inspect oci:<cache>:<name>`
    /// reads naturally.
    pub fn ref_name(&self) -> String {
        match (&self.tag, &self.digest) {
            (Some(t), _) => format!("{}/{}:{t}", self.registry, self.repository),
            (None, Some(d)) => format!("{}/{}@{d}", self.registry, self.repository),
            (None, None) => format!("{}/{}:latest", self.registry, self.repository),
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// A local OCI image layout used as the source (air-gapped hosts): `oci:/path/to/layout[:ref]`,
/// the same spelling skopeo uses. `ref` is an `org.opencontainers.image.ref.name` in the
/// layout's `index.json`; without one the layout must hold exactly one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutRef {
    pub path: PathBuf,
    pub ref_name: Option<String>,
}

impl fmt::Display for LayoutRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "oci:{}", self.path.display())?;
        if let Some(r) = &self.ref_name {
            write!(f, ":{r}")?;
        }
        Ok(())
    }
}

/// Either kind of source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Registry(ImageRef),
    Layout(LayoutRef),
}

impl Source {
    pub fn parse(text: &str) -> anyhow::Result<Source> {
        if let Some(rest) = text.strip_prefix("oci:") {
            // Like skopeo: the path ends at the first `:`.
            let (path, ref_name) = match rest.split_once(':') {
                Some((path, r)) if !r.is_empty() => (path, Some(r.to_owned())),
                Some((path, _)) => (path, None),
                None => (rest, None),
            };
            if path.is_empty() {
                bail!("`{text}` names no directory; expected `oci:/path/to/layout[:ref]`");
            }
            return Ok(Source::Layout(LayoutRef {
                path: PathBuf::from(path),
                ref_name,
            }));
        }
        ImageRef::parse(text).map(Source::Registry)
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Registry(r) => r.fmt(f),
            Source::Layout(l) => l.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "365499d9dccb7c8cfaffef995a6c382e71174585e0556f6476ead1c5971c39fb";

    #[test]
    fn short_names_are_docker_hub_library_images() {
        let r = ImageRef::parse("alpine:3.22").unwrap();
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(r.repository, "library/alpine");
        assert_eq!(r.tag.as_deref(), Some("3.22"));
        assert_eq!(r.digest, None);
        assert_eq!(r.manifest_reference(), "3.22");
        assert_eq!(r.ref_name(), "docker.io/library/alpine:3.22");
        let latest = ImageRef::parse("alpine").unwrap();
        assert_eq!(latest.manifest_reference(), "latest");
    }

    #[test]
    fn digests_win_over_tags() {
        let text = format!("docker.io/library/alpine:3.22@sha256:{HEX}");
        let r = ImageRef::parse(&text).unwrap();
        assert_eq!(r.tag.as_deref(), Some("3.22"));
        assert_eq!(r.digest.unwrap().to_string(), format!("sha256:{HEX}"));
        assert_eq!(r.manifest_reference(), format!("sha256:{HEX}"));
        assert_eq!(r.to_string(), text);
        assert!(ImageRef::parse("alpine@sha256:abc").is_err());
    }

    #[test]
    fn hosts_with_ports_are_registries() {
        let r = ImageRef::parse("127.0.0.1:5000/base/alpine:v1").unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.api_host(), "127.0.0.1:5000");
        assert_eq!(r.repository, "base/alpine");
        let r = ImageRef::parse("localhost/alpine:v1").unwrap();
        assert_eq!(r.registry, "localhost");
        assert_eq!(r.repository, "alpine");
        let r = ImageRef::parse("someone/tool:1").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("docker.io", "someone/tool")
        );
    }

    /// Found by the `oci_reference` fuzz target: `TTTd/a` became `docker.io/TTTd/a`, which
    /// prints as a reference that does not parse (and a repository no registry accepts).
    #[test]
    fn a_first_component_with_capitals_is_a_registry_host_as_in_docker() {
        let r = ImageRef::parse("Registry/team/app:1").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("Registry", "team/app")
        );
        assert_eq!(r.api_host(), "Registry");
        assert_eq!(ImageRef::parse(&r.to_string()).unwrap(), r);
        let r = ImageRef::parse("TTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTd/a").unwrap();
        assert_eq!(r.repository, "a");
        assert_eq!(ImageRef::parse(&r.to_string()).unwrap(), r);
        assert_eq!(ImageRef::parse(&r.ref_name()).unwrap(), r);
    }

    #[test]
    fn layout_sources_split_like_skopeo() {
        assert_eq!(
            Source::parse("oci:/srv/layout:3.22").unwrap(),
            Source::Layout(LayoutRef {
                path: "/srv/layout".into(),
                ref_name: Some("3.22".into())
            })
        );
        assert_eq!(
            Source::parse("oci:/srv/layout:docker.io/library/alpine:3.22").unwrap(),
            Source::Layout(LayoutRef {
                path: "/srv/layout".into(),
                ref_name: Some("docker.io/library/alpine:3.22".into())
            })
        );
        assert_eq!(
            Source::parse("oci:rel").unwrap(),
            Source::Layout(LayoutRef {
                path: "rel".into(),
                ref_name: None
            })
        );
        assert!(Source::parse("oci::x").is_err());
        assert!(matches!(
            Source::parse("alpine:3.22").unwrap(),
            Source::Registry(_)
        ));
    }
}
