//! A client for the OCI distribution API (pull only): manifests and blobs, through the one HTTP
//! transport ([`crate::fetch::Transport`]: timeouts, retries, resume, progress), with the
//! registry's `401` challenges answered by [`RegistryAuth`].
//!
//! Transport policy: HTTPS, except plain HTTP where [`super::plain_http`] allows it (loopback,
//! or hosts the user lists), for the registry, its token realm and redirects alike.

use std::io::Read;

use anyhow::{Context, bail};
use reqwest::StatusCode;
use reqwest::Url;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap};
use system::hash::sha256_bytes;
use system::lock::Digest;

use super::auth::{self, RegistryAuth};
use super::plain_http::{allows_plain_http, redirect_policy};
use super::reference::ImageRef;
use crate::fetch::{self, Download, Expected, FetchError, Request, Sink, Transport};

/// Every manifest kind we can read, OCI and Docker.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// Manifests are small; a bigger one is a misbehaving server, not an image.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;

const DIGEST_HEADER: &str = "docker-content-digest";

/// A manifest (or index) as served: its exact bytes and their digest.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub bytes: Vec<u8>,
    pub digest: Digest,
}

/// A client for one repository on one registry.
pub struct Registry {
    pub(super) transport: Transport,
    base: Url,
    pub(super) auth: RegistryAuth,
}

impl Registry {
    /// `transfer`: timeouts, attempts and progress, as for every download; `plain_http_hosts`:
    /// hosts besides loopback that may be reached without TLS.
    pub fn new(
        image: &ImageRef,
        transfer: &fetch::Options,
        plain_http_hosts: &[String],
    ) -> anyhow::Result<Registry> {
        let credentials = auth::credentials_for(&image.registry, image.api_host())?;
        Registry::with_credentials(image, transfer, plain_http_hosts, credentials)
    }

    /// [`Registry::new`] with the credentials given instead of looked up.
    pub fn with_credentials(
        image: &ImageRef,
        transfer: &fetch::Options,
        plain_http_hosts: &[String],
        credentials: Option<auth::Credentials>,
    ) -> anyhow::Result<Registry> {
        let host = image.api_host().to_owned();
        let scheme = if allows_plain_http(&host, plain_http_hosts) {
            "http"
        } else {
            "https"
        };
        let base = Url::parse(&format!("{scheme}://{host}/"))
            .with_context(|| format!("`{host}` is not a usable registry host"))?;
        let transport = Transport::with_redirects(
            transfer.clone(),
            redirect_policy(plain_http_hosts.to_vec()),
        )?;
        Ok(Registry {
            transport,
            base,
            auth: RegistryAuth::new(
                host,
                image.repository.clone(),
                credentials,
                plain_http_hosts.to_vec(),
            ),
        })
    }

    pub fn host(&self) -> &str {
        &self.auth.host
    }

    pub(super) fn url(&self, kind: &str, reference: &str) -> anyhow::Result<Url> {
        self.base
            .join(&format!("v2/{}/{kind}/{reference}", self.auth.repository))
            .context("building a registry URL")
    }

    /// The digest a tag points to, from a HEAD request (which registries such as Docker Hub do
    /// not count against pull limits). `None` when the registry does not say.
    pub fn head_manifest(&mut self, reference: &str) -> anyhow::Result<Option<Digest>> {
        let url = self.url("manifests", reference)?;
        let request = Request::head(url.as_str()).header(ACCEPT, MANIFEST_ACCEPT);
        let response = self.send(&request, &format!("manifest `{reference}`"))?;
        Ok(header_digest(response.headers()))
    }

    /// A manifest by tag or digest, verified: by digest, the bytes must hash to it; by tag, to
    /// the digest the registry announces (when it does).
    pub fn get_manifest(&mut self, reference: &str) -> anyhow::Result<FetchedManifest> {
        let url = self.url("manifests", reference)?;
        let what = format!("manifest `{reference}`");
        let request = Request::get(url.as_str()).header(ACCEPT, MANIFEST_ACCEPT);
        let response = self.send(&request, &what)?;
        let announced = header_digest(response.headers());
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_owned());
        let mut bytes = Vec::new();
        response
            .take(MAX_MANIFEST_BYTES + 1)
            .read_to_end(&mut bytes)
            .with_context(|| format!("reading {what} from {url}"))?;
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            bail!("{what} from {url} is larger than {MAX_MANIFEST_BYTES} bytes; refusing it");
        }
        let digest = Digest(sha256_bytes(&bytes));
        let expected = match reference.parse::<Digest>() {
            Ok(d) => Some(d),
            Err(_) => announced,
        };
        if let Some(expected) = expected
            && expected != digest
        {
            bail!(
                "{what} from {url} does not match its digest: expected {expected}, the bytes \
                 served hash to {digest}; the registry or a proxy altered it, nothing was cached"
            );
        }
        if super::media_type_of(&bytes).or(content_type).is_none() {
            bail!("{what} from {url} names no media type");
        }
        Ok(FetchedManifest { bytes, digest })
    }

    /// Streams blob `digest` of `size` bytes into `sink` (resumed after a broken transfer),
    /// checked against both; the caller commits the sink. `label` names it in progress lines.
    pub fn get_blob(
        &mut self,
        digest: &Digest,
        size: u64,
        sink: &mut dyn Sink,
        label: &str,
    ) -> anyhow::Result<Download> {
        let url = self.url("blobs", &digest.to_string())?;
        let expected = Expected {
            sha256: Some(digest.0),
            size: Some(size),
        };
        self.transport
            .download(
                &Request::get(url.as_str()),
                label,
                expected,
                sink,
                Some(&mut self.auth),
            )
            .map_err(|e| self.explain(e, &format!("blob {digest}")))
    }

    /// Sends a request (a `401` answered once by [`RegistryAuth`]) and insists on success.
    pub(super) fn send(
        &mut self,
        request: &Request,
        what: &str,
    ) -> anyhow::Result<reqwest::blocking::Response> {
        let response = self
            .transport
            .send(request, Some(&mut self.auth))
            .map_err(|e| self.explain(e, what))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        Err(self.explain(
            FetchError::Status {
                method: request.method.clone(),
                url: request.url.clone(),
                status,
                attempts: 1,
            },
            what,
        ))
    }

    /// A transport error as a message naming the registry, repository and next step.
    pub(super) fn explain(&self, error: FetchError, what: &str) -> anyhow::Error {
        let repo = format!("{}/{}", self.auth.host, self.auth.repository);
        let (user, password, host) = (auth::USER_ENV, auth::PASSWORD_ENV, &self.auth.host);
        match error {
            FetchError::Status {
                url,
                status: StatusCode::NOT_FOUND,
                ..
            } => anyhow::anyhow!(
                "{repo} has no {what} ({url}: HTTP 404); check the reference in artifacts.lock \
                 (bases.<name>.reference), or pull from a local layout (`oci:/path:tag`)"
            ),
            FetchError::Status {
                url,
                status: status @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN),
                ..
            } if self.auth.refusal(status).is_some() => anyhow::anyhow!(
                "{what} ({url}: HTTP {status}): {}",
                self.auth.refusal(status).expect("checked")
            ),
            FetchError::Status {
                url,
                status: status @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN),
                ..
            } => anyhow::anyhow!(
                "{repo} denied access to {what} ({url}: HTTP {status}); for a private image set \
                 {user} and {password} (or `docker login {host}`)"
            ),
            FetchError::Status {
                url,
                status,
                attempts,
                ..
            } => anyhow::anyhow!(
                "{repo}: {what} failed ({url}: HTTP {status}) after {attempts} attempt(s); try \
                 again later, or use --offline with a filled cache"
            ),
            e @ FetchError::Network { .. } => anyhow::anyhow!(
                "{e}; check the network, or use --offline with a filled cache, or a local layout \
                 source (`oci:/path/to/layout:tag`)"
            ),
            FetchError::Digest {
                url, actual, size, ..
            } => anyhow::anyhow!(
                "{what} from {url}: the {size} bytes received hash to sha256:{actual}; nothing \
                 was cached (the source served corrupt or tampered content)"
            ),
            FetchError::Size {
                url,
                expected,
                actual,
                announced,
            } => anyhow::anyhow!(
                "{what} from {url}: expected {expected} bytes, {} {actual}; nothing was cached",
                if announced {
                    "the registry announced"
                } else {
                    "received"
                }
            ),
            FetchError::Auth(e) => e.context(format!("{repo}: authenticating for {what}")),
            FetchError::Local(e) => e.context(format!("{repo}: writing {what}")),
        }
    }
}

fn header_digest(headers: &HeaderMap) -> Option<Digest> {
    headers
        .get(DIGEST_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}
