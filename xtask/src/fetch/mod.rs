//! HTTP: the one transport every download and registry request goes through.
//!
//! ```text
//! Transport  one reqwest client (timeouts, ring TLS, proxies, redirects) + the retry policy
//!   send()      a request; retries, backoff, Retry-After, a 401 answered by an Authorizer
//!   download()  a body streamed into a Sink (a store's BlobWriter), resumed with Range/If-Range,
//!               checked against the expected size and sha256; never commits anything
//! Fetcher    a Transport plus Mirrors, for files pinned by URL (kernels)
//! ```
//!
//! Modules: `transport` (client, requests, auth hook), `retry` (the policy), `download`
//! (streaming and resume), `floor` (the minimum rate), `progress` (bar or lines), `mirror`,
//! `error`.

mod download;
mod error;
mod floor;
mod local;
mod mirror;
mod progress;
mod retry;
#[cfg(test)]
pub(crate) mod tests;
mod transport;

use std::time::Duration;

pub use download::{Download, Expected, Sink};
pub use error::FetchError;
pub use local::local_path;
pub use mirror::{Mirror, Mirrors};
pub use transport::{Authorizer, Request, Transport};

/// How hard to try.
#[derive(Debug, Clone)]
pub struct Options {
    /// Per connection attempt (DNS + TCP + TLS).
    pub connect_timeout: Duration,
    /// Waiting for the response head, and between two reads of the body.
    pub read_timeout: Duration,
    /// The stall floor: a body arriving slower than this many bytes per second over a whole
    /// `stall_window` is stalled, and the attempt fails (0 turns the floor off).
    pub min_rate: u64,
    pub stall_window: Duration,
    /// Attempts in a row without receiving a byte before giving up (at least 1).
    pub attempts: u32,
    /// The first backoff; it doubles with every failed attempt.
    pub backoff: Duration,
    /// The longest wait between two attempts, also for a server's `Retry-After`.
    pub backoff_cap: Duration,
    pub progress: Progress,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            min_rate: 1024,
            stall_window: Duration::from_secs(30),
            attempts: 4,
            backoff: Duration::from_millis(250),
            backoff_cap: Duration::from_secs(30),
            progress: Progress::Auto,
        }
    }
}

/// How a download reports its progress on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// A progress bar (bytes, rate, ETA) when stderr is a terminal, plain lines otherwise.
    Auto,
    /// Plain lines: start, retries, end.
    Lines,
    /// Retries and failures only.
    Quiet,
}

/// Makes ring rustls' process-wide crypto provider (reqwest is built without one, so no C is
/// compiled for aws-lc). Idempotent; [`Transport`] calls it before building its client.
pub fn use_ring_for_tls() {
    // An error only says a provider is installed already, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Downloads of files pinned by URL: a [`Transport`] and the [`Mirrors`] that rewrite URLs.
pub struct Fetcher {
    transport: Transport,
    mirrors: Mirrors,
}

impl Fetcher {
    pub fn new(options: Options, mirrors: Mirrors) -> anyhow::Result<Fetcher> {
        Ok(Fetcher {
            transport: Transport::new(options)?,
            mirrors,
        })
    }

    /// The URL actually requested for `url`.
    pub fn effective_url(&self, url: &str) -> String {
        self.mirrors.rewrite(url).unwrap_or_else(|| url.to_owned())
    }

    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// Downloads `url` (from its mirror, when one covers it) into `sink`, checked against
    /// `expected`. The content is hashed once, while it streams; committing it is the caller's.
    pub fn fetch(
        &self,
        url: &str,
        label: &str,
        expected: Expected,
        sink: &mut dyn Sink,
    ) -> Result<Download, FetchError> {
        let request = Request::get(self.effective_url(url));
        self.transport
            .download(&request, label, expected, sink, None)
    }
}
