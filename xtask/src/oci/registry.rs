//! A client for the OCI distribution API (pull only): manifests and blobs, with anonymous bearer
//! tokens or basic credentials, timeouts and bounded retries.
//!
//! Transport policy: HTTPS, except plain HTTP for loopback hosts (`localhost`, `127.0.0.0/8`,
//! `::1`) and hosts the user allows (`--plain-http HOST` / `XTASK_REGISTRY_PLAIN_HTTP`, a comma
//! separated list). The same rule applies to token realms and redirects, so credentials never
//! travel in the clear to a host nobody allowed.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use reqwest::blocking::{Client, RequestBuilder, Response};
use reqwest::header::{ACCEPT, HeaderMap, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode, Url};
use system::hash::sha256_bytes;
use system::lock::Digest;

use super::auth::{self, Challenge, Credentials};
use super::reference::ImageRef;

/// Every manifest kind we can read, OCI and Docker.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// Manifests are small; a bigger one is a misbehaving server, not an image.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;

const DIGEST_HEADER: &str = "docker-content-digest";

/// Timeouts and retries.
#[derive(Debug, Clone)]
pub struct NetworkOptions {
    pub connect_timeout: Duration,
    /// The longest a single read or write may stall.
    pub read_timeout: Duration,
    /// Attempts per request on connection errors, 429 and 5xx (at least 1).
    pub attempts: u32,
    /// The wait before the second attempt; doubled for each further one (capped at 30 s).
    pub first_backoff: Duration,
    /// Hosts (`host` or `host:port`) that may be reached over plain HTTP besides loopback.
    pub plain_http_hosts: Vec<String>,
}

impl Default for NetworkOptions {
    fn default() -> Self {
        NetworkOptions {
            connect_timeout: Duration::from_secs(15),
            read_timeout: Duration::from_secs(60),
            attempts: 4,
            first_backoff: Duration::from_millis(500),
            plain_http_hosts: Vec::new(),
        }
    }
}

/// True for hosts plain HTTP may be used with: loopback, or listed by the user.
pub fn allows_plain_http(host_port: &str, allowed: &[String]) -> bool {
    if allowed.iter().any(|a| a == host_port) {
        return true;
    }
    let host = split_host(host_port);
    if allowed.iter().any(|a| a == host) {
        return true;
    }
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// `host` of `host:port`, `[v6]:port` or `host`.
fn split_host(host_port: &str) -> &str {
    if let Some(rest) = host_port.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host_port.rsplit_once(':') {
        // A bare IPv6 address has several colons and no port.
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            host
        }
        _ => host_port,
    }
}

fn url_host_port(url: &Url) -> String {
    // IPv6 hosts come bracketed, as `split_host` expects.
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    }
}

/// A manifest (or index) as served: its exact bytes and their digest.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub bytes: Vec<u8>,
    pub digest: Digest,
}

/// A client for one repository on one registry.
pub struct Registry {
    http: Client,
    base: Url,
    host: String,
    repository: String,
    credentials: Option<Credentials>,
    /// The `Authorization` header value once a challenge has been answered.
    authorization: Option<String>,
    options: NetworkOptions,
}

impl Registry {
    pub fn new(image: &ImageRef, options: &NetworkOptions) -> anyhow::Result<Registry> {
        let host = image.api_host().to_owned();
        let scheme = if allows_plain_http(&host, &options.plain_http_hosts) {
            "http"
        } else {
            "https"
        };
        let base = Url::parse(&format!("{scheme}://{host}/"))
            .with_context(|| format!("`{host}` is not a usable registry host"))?;
        let credentials = auth::credentials_for(&image.registry, &host)?;
        let allowed = options.plain_http_hosts.clone();
        // Follow redirects (blob storage usually lives elsewhere), but never downgrade to plain
        // HTTP on a host that was not allowed. reqwest drops `Authorization` across hosts.
        let redirects = reqwest::redirect::Policy::custom(move |attempt| {
            let url = attempt.url();
            if url.scheme() == "http" && !allows_plain_http(&url_host_port(url), &allowed) {
                let to = url.to_string();
                return attempt.error(format!(
                    "refusing a redirect to plain HTTP ({to}); allow the host with --plain-http \
                     if that is intended"
                ));
            }
            if attempt.previous().len() >= 10 {
                return attempt.error("more than 10 redirects");
            }
            attempt.follow()
        });
        crate::fetch::use_ring_for_tls();
        let http = Client::builder()
            .connect_timeout(options.connect_timeout)
            .timeout(options.read_timeout)
            .redirect(redirects)
            .user_agent(concat!("xtask/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the HTTP client")?;
        Ok(Registry {
            http,
            base,
            host,
            repository: image.repository.clone(),
            credentials,
            authorization: None,
            options: options.clone(),
        })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    fn url(&self, kind: &str, reference: &str) -> anyhow::Result<Url> {
        self.base
            .join(&format!("v2/{}/{kind}/{reference}", self.repository))
            .context("building a registry URL")
    }

    /// The digest a tag points to, from a HEAD request (which registries such as Docker Hub do
    /// not count against pull limits). `None` when the registry does not say.
    pub fn head_manifest(&mut self, reference: &str) -> anyhow::Result<Option<Digest>> {
        let url = self.url("manifests", reference)?;
        let response = self.send(Method::HEAD, &url, Some(MANIFEST_ACCEPT))?;
        let response = self.check(response, &url, &format!("manifest `{reference}`"))?;
        Ok(header_digest(response.headers()))
    }

    /// A manifest by tag or digest, verified: by digest, the bytes must hash to it; by tag, to
    /// the digest the registry announces (when it does).
    pub fn get_manifest(&mut self, reference: &str) -> anyhow::Result<FetchedManifest> {
        let url = self.url("manifests", reference)?;
        let what = format!("manifest `{reference}`");
        let response = self.send(Method::GET, &url, Some(MANIFEST_ACCEPT))?;
        let response = self.check(response, &url, &what)?;
        let announced = header_digest(response.headers());
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
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

    /// Streams a blob into `file` (truncated first, and again on each retry). The caller
    /// verifies size and digest before the file becomes visible. Calls `progress` with the bytes
    /// written so far.
    pub fn get_blob(
        &mut self,
        digest: &Digest,
        file: &mut File,
        progress: &mut dyn FnMut(u64),
    ) -> anyhow::Result<u64> {
        let url = self.url("blobs", &digest.to_string())?;
        let what = format!("blob {digest}");
        let mut attempt = 1;
        loop {
            file.set_len(0)?;
            file.seek(SeekFrom::Start(0))?;
            let response = self.send(Method::GET, &url, None)?;
            let mut response = self.check(response, &url, &what)?;
            match copy_with_progress(&mut response, file, progress) {
                Ok(n) => return Ok(n),
                Err(e) if attempt < self.options.attempts => {
                    eprintln!("{what}: transfer from {url} broke off ({e}); retrying");
                    std::thread::sleep(self.backoff(attempt, None));
                    attempt += 1;
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("downloading {what} from {url} ({attempt} attempts)")
                    });
                }
            }
        }
    }

    /// Sends a request, answering an auth challenge once and retrying transient failures.
    fn send(
        &mut self,
        method: Method,
        url: &Url,
        accept: Option<&str>,
    ) -> anyhow::Result<Response> {
        let mut attempt = 1;
        let mut answered_challenge = false;
        loop {
            let mut request: RequestBuilder = self.http.request(method.clone(), url.clone());
            if let Some(accept) = accept {
                request = request.header(ACCEPT, accept);
            }
            if let Some(authorization) = &self.authorization {
                request = request.header(reqwest::header::AUTHORIZATION, authorization);
            }
            let retry_after;
            match request.send() {
                Ok(response) if response.status() == StatusCode::UNAUTHORIZED => {
                    if answered_challenge {
                        return Ok(response);
                    }
                    let Some(challenge) = response
                        .headers()
                        .get(WWW_AUTHENTICATE)
                        .and_then(|v| v.to_str().ok())
                    else {
                        return Ok(response);
                    };
                    let challenge = Challenge::parse(challenge)
                        .with_context(|| format!("answering the challenge of {url}"))?;
                    self.answer(&challenge, url)?;
                    answered_challenge = true;
                    continue;
                }
                Ok(response)
                    if response.status() == StatusCode::TOO_MANY_REQUESTS
                        || response.status().is_server_error() =>
                {
                    if attempt >= self.options.attempts {
                        return Ok(response);
                    }
                    retry_after = response
                        .headers()
                        .get(RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok());
                    eprintln!(
                        "{} {url}: HTTP {}; retrying (attempt {} of {})",
                        method,
                        response.status(),
                        attempt + 1,
                        self.options.attempts
                    );
                }
                Ok(response) => return Ok(response),
                Err(e) => {
                    if attempt >= self.options.attempts {
                        return Err(anyhow::Error::new(e).context(format!(
                            "{method} {url} failed after {attempt} attempt(s); check the network, \
                             or use --offline with a filled cache, or a local layout source \
                             (`oci:/path/to/layout:tag`)"
                        )));
                    }
                    eprintln!(
                        "{method} {url}: {e}; retrying (attempt {} of {})",
                        attempt + 1,
                        self.options.attempts
                    );
                    retry_after = None;
                }
            }
            std::thread::sleep(self.backoff(attempt, retry_after));
            attempt += 1;
        }
    }

    fn backoff(&self, attempt: u32, retry_after: Option<u64>) -> Duration {
        let cap = Duration::from_secs(30);
        if let Some(secs) = retry_after {
            return Duration::from_secs(secs).min(cap);
        }
        self.options
            .first_backoff
            .saturating_mul(1 << (attempt - 1).min(16))
            .min(cap)
    }

    /// Obtains the `Authorization` header a challenge asks for.
    fn answer(&mut self, challenge: &Challenge, url: &Url) -> anyhow::Result<()> {
        match challenge.scheme.as_str() {
            "basic" => {
                let Some(c) = &self.credentials else {
                    bail!(
                        "{url} requires credentials (HTTP basic); set {} and {}, or log in with \
                         `docker login {}`",
                        auth::USER_ENV,
                        auth::PASSWORD_ENV,
                        self.host
                    );
                };
                self.authorization = Some(basic_header(c));
                Ok(())
            }
            "bearer" => {
                let token = self.fetch_token(challenge, url)?;
                self.authorization = Some(format!("Bearer {token}"));
                Ok(())
            }
            other => bail!("{url} asks for unsupported authentication scheme `{other}`"),
        }
    }

    fn fetch_token(&mut self, challenge: &Challenge, url: &Url) -> anyhow::Result<String> {
        let realm = challenge
            .params
            .get("realm")
            .ok_or_else(|| anyhow!("the bearer challenge of {url} names no realm"))?;
        let mut token_url =
            Url::parse(realm).with_context(|| format!("token realm `{realm}` is not a URL"))?;
        match token_url.scheme() {
            "https" => {}
            "http"
                if allows_plain_http(
                    &url_host_port(&token_url),
                    &self.options.plain_http_hosts,
                ) => {}
            _ => bail!(
                "token realm {realm} (from {url}) is not HTTPS; allow its host with --plain-http \
                 if that is intended"
            ),
        }
        {
            let mut query = token_url.query_pairs_mut();
            if let Some(service) = challenge.params.get("service") {
                query.append_pair("service", service);
            }
            let scope = challenge
                .params
                .get("scope")
                .cloned()
                .unwrap_or_else(|| format!("repository:{}:pull", self.repository));
            query.append_pair("scope", &scope);
        }
        let mut attempt = 1;
        let response = loop {
            let mut request = self.http.get(token_url.clone());
            if let Some(c) = &self.credentials {
                request = request.header(reqwest::header::AUTHORIZATION, basic_header(c));
            }
            match request.send() {
                Ok(r) if r.status().is_server_error() && attempt < self.options.attempts => {}
                Ok(r) => break r,
                Err(e) if attempt < self.options.attempts => {
                    eprintln!("token request {token_url}: {e}; retrying");
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("requesting a token from {token_url}"));
                }
            }
            std::thread::sleep(self.backoff(attempt, None));
            attempt += 1;
        };
        if !response.status().is_success() {
            bail!(
                "the token service {token_url} answered HTTP {}; for a private image set {} and \
                 {} (or `docker login {}`)",
                response.status(),
                auth::USER_ENV,
                auth::PASSWORD_ENV,
                self.host
            );
        }
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
        }
        let mut body = Vec::new();
        response
            .take(1 << 20)
            .read_to_end(&mut body)
            .with_context(|| format!("reading the token from {token_url}"))?;
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .with_context(|| format!("the token service {token_url} answered no JSON token"))?;
        parsed
            .token
            .or(parsed.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| anyhow!("the token service {token_url} answered no token"))
    }

    /// Turns error statuses into messages naming the registry, repository and next step.
    fn check(&self, response: Response, url: &Url, what: &str) -> anyhow::Result<Response> {
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let repo = format!("{}/{}", self.host, self.repository);
        match status {
            StatusCode::NOT_FOUND => bail!(
                "{repo} has no {what} ({url}: HTTP 404); check the reference in artifacts.lock \
                 (bases.<name>.reference), or pull from a local layout (`oci:/path:tag`)"
            ),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => bail!(
                "{repo} denied access to {what} ({url}: HTTP {status}); for a private image set \
                 {} and {} (or `docker login {}`)",
                auth::USER_ENV,
                auth::PASSWORD_ENV,
                self.host
            ),
            _ => bail!(
                "{repo}: {what} failed ({url}: HTTP {status}) after {} attempt(s); try again \
                 later, or use --offline with a filled cache",
                self.options.attempts
            ),
        }
    }
}

fn basic_header(c: &Credentials) -> String {
    format!(
        "Basic {}",
        base64_encode(format!("{}:{}", c.user, c.password).as_bytes())
    )
}

fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn header_digest(headers: &HeaderMap) -> Option<Digest> {
    headers
        .get(DIGEST_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

fn copy_with_progress(
    from: &mut impl Read,
    to: &mut File,
    progress: &mut dyn FnMut(u64),
) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        total += n as u64;
        progress(total);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_for_loopback_or_allowed_hosts() {
        let none: Vec<String> = Vec::new();
        for host in [
            "127.0.0.1:5000",
            "127.1.2.3",
            "localhost:80",
            "[::1]:5000",
            "::1",
        ] {
            assert!(allows_plain_http(host, &none), "{host}");
        }
        for host in [
            "registry-1.docker.io",
            "10.0.0.1:5000",
            "example.com:5000",
            "[::2]:1",
        ] {
            assert!(!allows_plain_http(host, &none), "{host}");
        }
        let allowed = vec!["mirror.lan".to_owned(), "other.lan:5000".to_owned()];
        assert!(allows_plain_http("mirror.lan:5000", &allowed));
        assert!(allows_plain_http("other.lan:5000", &allowed));
        assert!(!allows_plain_http("other.lan:6000", &allowed));
    }

    #[test]
    fn base64_round_trips() {
        assert_eq!(base64_encode(b"user:p:ss"), "dXNlcjpwOnNz");
        assert_eq!(base64_encode(b"other:x"), "b3RoZXI6eA==");
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"ab"), "YWI=");
    }
}
