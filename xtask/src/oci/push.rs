//! Pushing to a registry (the registry client's write side, for `cargo xtask dist push`):
//! blobs by monolithic upload (`POST …/blobs/uploads/` then `PUT <location>?digest=`), skipped
//! when the registry has them, and manifests by `PUT …/manifests/<reference>`. Same transport,
//! retries and token auth as pulls; a registry asks for push scope in its challenge.

use std::sync::Arc;

use anyhow::{Context as _, bail};
use reqwest::header::{CONTENT_TYPE, LOCATION};
use reqwest::{Method, StatusCode, Url};
use system::hash::sha256_bytes;
use system::lock::Digest;

use super::registry::Registry;
use crate::fetch::Request;

impl Registry {
    /// Whether the repository has blob `digest` (HEAD; a 404 is `false`).
    pub fn has_blob(&mut self, digest: &Digest) -> anyhow::Result<bool> {
        let url = self.url("blobs", &digest.to_string())?;
        let response = self
            .transport
            .send(&Request::head(url.as_str()), Some(&mut self.auth))
            .map_err(|e| self.explain(e, &format!("blob {digest}")))?;
        match response.status() {
            status if status.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            status => bail!("HEAD {url}: HTTP {status}"),
        }
    }

    /// Uploads `bytes` as a blob unless the repository has it; returns its digest.
    pub fn push_blob(&mut self, bytes: Arc<Vec<u8>>) -> anyhow::Result<Digest> {
        let digest = Digest(sha256_bytes(&bytes));
        if self.has_blob(&digest)? {
            return Ok(digest);
        }
        let what = format!("upload of blob {digest}");
        let start = self.url("blobs", "uploads/")?;
        let response = self.send(
            &Request::with_body(Method::POST, start.as_str(), Arc::new(Vec::new())),
            &what,
        )?;
        let location = response
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .with_context(|| format!("{what}: POST {start} answered without a Location"))?;
        let mut put = start
            .join(location)
            .with_context(|| format!("{what}: unusable Location `{location}`"))?;
        put.query_pairs_mut()
            .append_pair("digest", &digest.to_string());
        let request = Request::with_body(Method::PUT, put.as_str(), bytes)
            .header(CONTENT_TYPE, "application/octet-stream");
        self.send(&request, &what)?;
        Ok(digest)
    }

    /// Puts a manifest or index (`media_type`) under `reference` (a tag or its digest);
    /// returns its digest.
    pub fn push_manifest(
        &mut self,
        reference: &str,
        media_type: &str,
        bytes: Vec<u8>,
    ) -> anyhow::Result<Digest> {
        let digest = Digest(sha256_bytes(&bytes));
        let url: Url = self.url("manifests", reference)?;
        let request = Request::with_body(Method::PUT, url.as_str(), Arc::new(bytes))
            .header(CONTENT_TYPE, media_type);
        self.send(&request, &format!("manifest `{reference}`"))?;
        Ok(digest)
    }
}
