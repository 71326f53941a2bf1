//! Verified HTTP downloads into the store.
//!
//! A download streams into a temp file beside the blobs while SHA-256 runs over the same bytes,
//! so the content is read once. It survives what real networks do:
//! - connect and read timeouts (a stalled server is an error, not a hang);
//! - bounded retries with exponential backoff on connection errors, timeouts, 5xx, 408 and 429
//!   (`Retry-After` honoured up to a cap), every attempt logged; an attempt that received bytes
//!   resets the count, so a long download on a flaky link still finishes;
//! - resume with `Range: bytes=N-` (and `If-Range`, so a replaced file restarts instead of
//!   splicing), checking the `206`'s `Content-Range`; a `200` answer means the server ignored
//!   the range, and the download restarts from zero;
//! - redirects (release assets move to a CDN host) and the proxy environment variables
//!   (`HTTPS_PROXY`, `NO_PROXY`, ...), both reqwest's defaults, left on;
//! - 4xx other than 408/429 fail at once: a missing file does not come back by asking again.
//!
//! A [`Mirrors`] table rewrites URL prefixes, for hosts that reach the internet through a copy.

use std::fmt;
use std::fs::File;
use std::io::{self, IsTerminal, Read, Seek, Write};
use std::str::FromStr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::{
    CONTENT_LENGTH, CONTENT_RANGE, ETAG, HeaderMap, IF_RANGE, LAST_MODIFIED, RANGE, RETRY_AFTER,
};
use sha2::Digest as _;
use system::Sha256;

use crate::store::StoreWriter;

/// How hard to try.
#[derive(Debug, Clone)]
pub struct Options {
    /// Per connection attempt (DNS + TCP + TLS).
    pub connect_timeout: Duration,
    /// Waiting for the response head, and between two reads of the body.
    pub read_timeout: Duration,
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

/// One `FROM=TO` URL prefix rewrite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    pub from: String,
    pub to: String,
}

impl FromStr for Mirror {
    type Err = String;
    fn from_str(text: &str) -> Result<Mirror, String> {
        let (from, to) = text.split_once('=').ok_or_else(|| {
            format!(
                "mirror `{text}`: expected FROM=TO, e.g. \
                 `https://github.com/=https://mirror.example/github/`"
            )
        })?;
        let (from, to) = (from.trim(), to.trim());
        if from.is_empty() || to.is_empty() {
            return Err(format!(
                "mirror `{text}`: both FROM and TO must be non-empty URL prefixes"
            ));
        }
        if !(to.starts_with("http://") || to.starts_with("https://")) {
            return Err(format!(
                "mirror `{text}`: TO `{to}` is not an http(s) URL prefix"
            ));
        }
        Ok(Mirror {
            from: from.to_owned(),
            to: to.to_owned(),
        })
    }
}

/// URL prefix rewrites; the longest matching prefix wins.
#[derive(Debug, Clone, Default)]
pub struct Mirrors(pub Vec<Mirror>);

impl Mirrors {
    /// Where to fetch `url` from, when a mirror covers it.
    pub fn rewrite(&self, url: &str) -> Option<String> {
        self.0
            .iter()
            .filter(|m| url.starts_with(&m.from))
            .max_by_key(|m| m.from.len())
            .map(|m| format!("{}{}", m.to, &url[m.from.len()..]))
    }
}

/// Why a download failed. Each names the URL it was fetching (the mirror's, when one applied).
#[derive(Debug)]
pub enum FetchError {
    /// The server answered with a status that asking again will not change, or kept answering
    /// with a retryable one until the attempts ran out.
    Status {
        url: String,
        status: StatusCode,
        attempts: u32,
    },
    /// No answer: DNS, connection, TLS, timeout or a dropped connection, after every attempt.
    Network {
        url: String,
        attempts: u32,
        timed_out: bool,
        detail: String,
    },
    /// More or fewer bytes than the lock records (announced by the server or counted).
    Size {
        url: String,
        expected: u64,
        actual: u64,
        announced: bool,
    },
    /// The content is not the pinned one.
    Digest {
        url: String,
        expected: Sha256,
        actual: Sha256,
        size: u64,
    },
    /// Writing the temp file or committing the blob failed.
    Local(anyhow::Error),
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchError::Status {
                url,
                status,
                attempts,
            } => write!(
                f,
                "GET {url}: the server answered {status} (after {attempts} attempt(s))"
            ),
            FetchError::Network {
                url,
                attempts,
                timed_out,
                detail,
            } => {
                let what = if *timed_out { "timed out" } else { "failed" };
                write!(f, "GET {url}: {what} after {attempts} attempt(s): {detail}")
            }
            FetchError::Size {
                url,
                expected,
                actual,
                announced,
            } => {
                let how = if *announced {
                    "the server announced"
                } else {
                    "received"
                };
                write!(
                    f,
                    "GET {url}: expected {expected} bytes, {how} {actual}; nothing was stored"
                )
            }
            FetchError::Digest {
                url,
                expected,
                actual,
                size,
            } => write!(
                f,
                "GET {url}: expected sha256 {expected}, got sha256 {actual} ({size} bytes); \
                 nothing was stored"
            ),
            FetchError::Local(e) => write!(f, "{e:#}"),
        }
    }
}

impl std::error::Error for FetchError {}

/// What a download produced.
#[derive(Debug, Clone)]
pub struct Download {
    pub sha256: Sha256,
    pub size: u64,
    /// HTTP requests made (1 when nothing went wrong).
    pub requests: u32,
}

/// Downloads with one configured client.
pub struct Fetcher {
    client: reqwest::blocking::Client,
    options: Options,
    mirrors: Mirrors,
}

/// What one attempt ended with, when it did not finish the download.
enum Attempt {
    /// Worth another try, after at least this long when the server said so.
    Retry {
        reason: String,
        timed_out: bool,
        status: Option<StatusCode>,
        after: Option<Duration>,
    },
    Fatal(FetchError),
}

/// Makes ring rustls' process-wide crypto provider (reqwest is built without one, so no C is
/// compiled for aws-lc). Idempotent.
pub fn use_ring_for_tls() {
    // An error only says a provider is installed already, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl Fetcher {
    pub fn new(options: Options, mirrors: Mirrors) -> anyhow::Result<Fetcher> {
        use_ring_for_tls();
        // Proxies from the environment and up to 10 redirects are reqwest's defaults: keep them.
        let client = reqwest::blocking::Client::builder()
            .connect_timeout(options.connect_timeout)
            // The blocking client applies this to the response head and to each body read.
            .timeout(options.read_timeout)
            .user_agent(concat!("system-xtask/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| anyhow::anyhow!("building the HTTP client: {e}"))?;
        Ok(Fetcher {
            client,
            options,
            mirrors,
        })
    }

    /// The URL actually requested for `url`.
    pub fn effective_url(&self, url: &str) -> String {
        self.mirrors.rewrite(url).unwrap_or_else(|| url.to_owned())
    }

    /// Downloads `url` into the store. With `expected`, the blob becomes visible only if its
    /// digest (and `expected_size`, when given) match; without, whatever arrived is stored under
    /// its own digest (pinning a new input). Either way the content is hashed once, while it
    /// streams.
    pub fn fetch_blob(
        &self,
        store: &StoreWriter,
        url: &str,
        label: &str,
        expected: Option<&Sha256>,
        expected_size: Option<u64>,
    ) -> Result<Download, FetchError> {
        let effective = self.effective_url(url);
        let mut temp = store.temp_blob().map_err(FetchError::Local)?;
        let download = self.download(&effective, label, expected_size, temp.as_file_mut())?;
        let expected = match expected {
            Some(expected) if *expected != download.sha256 => {
                return Err(FetchError::Digest {
                    url: effective,
                    expected: *expected,
                    actual: download.sha256,
                    size: download.size,
                });
            }
            Some(expected) => *expected,
            None => download.sha256,
        };
        store
            .commit_verified_blob(
                temp,
                &expected,
                expected_size,
                &download.sha256,
                download.size,
                label,
            )
            .map_err(FetchError::Local)?;
        Ok(download)
    }

    /// Streams `url` into `out` (an empty file), hashing as it goes. `url` is requested as is
    /// (mirrors are applied by [`Fetcher::fetch_blob`]).
    pub fn download(
        &self,
        url: &str,
        label: &str,
        expected_size: Option<u64>,
        out: &mut File,
    ) -> Result<Download, FetchError> {
        // Hashing and writing run on their own thread, overlapping the network reads.
        std::thread::scope(|scope| {
            let (chunks, received) = mpsc::sync_channel(4);
            let (free, buffers) = mpsc::channel();
            let sink = scope.spawn(move || sink(received, free, out));
            let state = State {
                written: 0,
                validator: None,
                chunks,
                buffers,
                bar: None,
            };
            let transfer = self.transfer(url, label, expected_size, state);
            let sunk = sink.join().expect("the hashing thread does not panic");
            match (transfer, sunk) {
                // A local write error is what stopped the transfer, if both failed.
                (_, Err(e)) => Err(FetchError::Local(e)),
                (Err(e), Ok(_)) => Err(e),
                (Ok((size, requests)), Ok((sha256, hashed))) => {
                    debug_assert_eq!(size, hashed);
                    Ok(Download {
                        sha256,
                        size,
                        requests,
                    })
                }
            }
        })
    }

    /// The retry loop of [`Fetcher::download`]: returns the size and the number of requests.
    fn transfer(
        &self,
        url: &str,
        label: &str,
        expected_size: Option<u64>,
        mut state: State,
    ) -> Result<(u64, u32), FetchError> {
        let started = Instant::now();
        let bar_wanted = self.options.progress == Progress::Auto && io::stderr().is_terminal();
        let lines = self.options.progress == Progress::Lines
            || (self.options.progress == Progress::Auto && !bar_wanted);
        if lines {
            eprintln!("fetching {label}: {url}");
        }
        let attempts = self.options.attempts.max(1);
        // Attempts that received bytes do not count, but even those are bounded.
        let ceiling = attempts.saturating_mul(16);
        let mut failures = 0u32;
        let mut requests = 0u32;
        loop {
            requests += 1;
            let before = state.written;
            let outcome = self.attempt(url, expected_size, &mut state, bar_wanted);
            let (reason, timed_out, status, after) = match outcome {
                Ok(()) => break,
                Err(Attempt::Fatal(e)) => {
                    state.finish_bar();
                    return Err(e);
                }
                Err(Attempt::Retry {
                    reason,
                    timed_out,
                    status,
                    after,
                }) => (reason, timed_out, status, after),
            };
            if state.written > before {
                failures = 0;
            }
            failures += 1;
            if failures >= attempts || requests >= ceiling {
                state.finish_bar();
                return Err(match status {
                    Some(status) => FetchError::Status {
                        url: url.to_owned(),
                        status,
                        attempts: requests,
                    },
                    None => FetchError::Network {
                        url: url.to_owned(),
                        attempts: requests,
                        timed_out,
                        detail: reason,
                    },
                });
            }
            let backoff = self
                .options
                .backoff
                .saturating_mul(1 << (failures - 1).min(16))
                .min(self.options.backoff_cap);
            let wait = after
                .map(|a| a.min(self.options.backoff_cap))
                .unwrap_or(backoff);
            state.log(&format!(
                "{label}: attempt {requests} failed: {reason}; {} in {:.1}s \
                 ({} of {attempts} consecutive attempts used)",
                if state.written > 0 {
                    format!("resuming at byte {}", state.written)
                } else {
                    "retrying".to_owned()
                },
                wait.as_secs_f64(),
                failures,
            ));
            std::thread::sleep(wait);
        }
        state.finish_bar();
        let size = state.written;
        if let Some(expected) = expected_size
            && expected != size
        {
            return Err(FetchError::Size {
                url: url.to_owned(),
                expected,
                actual: size,
                announced: false,
            });
        }
        if lines {
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "fetched {label}: {size} bytes in {secs:.1}s ({:.1} MiB/s, {requests} request(s))",
                size as f64 / (1 << 20) as f64 / secs.max(1e-6)
            );
        }
        Ok((size, requests))
    }

    /// One request: resumes from `state.written` when there is something to resume.
    fn attempt(
        &self,
        url: &str,
        expected_size: Option<u64>,
        state: &mut State,
        bar_wanted: bool,
    ) -> Result<(), Attempt> {
        let mut request = self.client.get(url);
        if state.written > 0 {
            request = request.header(RANGE, format!("bytes={}-", state.written));
            if let Some(validator) = &state.validator {
                request = request.header(IF_RANGE, validator);
            }
        }
        // The URL is in every message already; reqwest's copy of it only makes lines longer.
        let mut response = request.send().map_err(|e| classify(url, e.without_url()))?;
        let status = response.status();
        let headers = response.headers().clone();
        let total = match status {
            StatusCode::OK => {
                if state.written > 0 {
                    state.log(&format!(
                        "{url}: the server ignored the range request (200 instead of 206); \
                         restarting from byte 0"
                    ));
                    state.restart().map_err(Attempt::Fatal)?;
                }
                state.validator = validator(&headers);
                header_u64(&headers, CONTENT_LENGTH.as_str())
            }
            StatusCode::PARTIAL_CONTENT => match content_range(&headers) {
                Some((start, total)) if start == state.written && state.written > 0 => total,
                other => {
                    state.restart().map_err(Attempt::Fatal)?;
                    return Err(Attempt::Retry {
                        reason: format!(
                            "206 with Content-Range {other:?} does not continue at byte {}; \
                             restarting from byte 0",
                            state.written
                        ),
                        timed_out: false,
                        status: None,
                        after: None,
                    });
                }
            },
            s if s.is_server_error()
                || s == StatusCode::TOO_MANY_REQUESTS
                || s == StatusCode::REQUEST_TIMEOUT =>
            {
                return Err(Attempt::Retry {
                    reason: format!("the server answered {s}"),
                    timed_out: false,
                    status: Some(s),
                    after: retry_after(&headers),
                });
            }
            s => {
                return Err(Attempt::Fatal(FetchError::Status {
                    url: url.to_owned(),
                    status: s,
                    attempts: 1,
                }));
            }
        };
        if let (Some(expected), Some(total)) = (expected_size, total)
            && expected != total
        {
            return Err(Attempt::Fatal(FetchError::Size {
                url: url.to_owned(),
                expected,
                actual: total,
                announced: true,
            }));
        }
        if bar_wanted && state.bar.is_none() {
            state.bar = Some(progress_bar(url, total.or(expected_size)));
        }
        if let Some(bar) = &state.bar {
            bar.set_position(state.written);
        }
        loop {
            let mut buf = state
                .buffers
                .try_recv()
                .unwrap_or_else(|_| vec![0u8; CHUNK]);
            let n = match response.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(Attempt::Retry {
                        timed_out: is_timeout(&e),
                        reason: format!("reading the body at byte {}: {e}", state.written),
                        status: None,
                        after: None,
                    });
                }
            };
            state.send(Chunk::Data(buf, n)).map_err(Attempt::Fatal)?;
            state.written += n as u64;
            if let Some(bar) = &state.bar {
                bar.set_position(state.written);
            }
            if let Some(expected) = expected_size
                && state.written > expected
            {
                return Err(Attempt::Fatal(FetchError::Size {
                    url: url.to_owned(),
                    expected,
                    actual: state.written,
                    announced: false,
                }));
            }
        }
        if let Some(total) = total
            && state.written < total
        {
            return Err(Attempt::Retry {
                reason: format!("the connection closed at byte {} of {total}", state.written),
                timed_out: false,
                status: None,
                after: None,
            });
        }
        Ok(())
    }
}

/// A download in progress, carried across attempts.
struct State {
    /// Bytes received and handed to the sink.
    written: u64,
    /// ETag or Last-Modified of the first answer, for `If-Range`.
    validator: Option<String>,
    chunks: mpsc::SyncSender<Chunk>,
    /// Buffers the sink is done with.
    buffers: mpsc::Receiver<Vec<u8>>,
    bar: Option<indicatif::ProgressBar>,
}

/// Read size: large, so that hashing and writing, not channel traffic, dominate.
const CHUNK: usize = 1 << 20;

enum Chunk {
    /// A buffer and how many of its bytes are data.
    Data(Vec<u8>, usize),
    /// Drop everything so far: the server is sending the file from the start.
    Restart,
}

/// Hashes and writes what the transfer receives; returns the digest and the byte count.
fn sink(
    chunks: mpsc::Receiver<Chunk>,
    free: mpsc::Sender<Vec<u8>>,
    out: &mut File,
) -> anyhow::Result<(Sha256, u64)> {
    let mut hasher = sha2::Sha256::new();
    let mut total = 0u64;
    for chunk in chunks {
        match chunk {
            Chunk::Data(buf, n) => {
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n])
                    .map_err(|e| anyhow::Error::new(e).context("writing the download"))?;
                total += n as u64;
                let _ = free.send(buf);
            }
            Chunk::Restart => {
                hasher = sha2::Sha256::new();
                total = 0;
                out.set_len(0)
                    .and_then(|()| out.rewind())
                    .map_err(|e| anyhow::Error::new(e).context("truncating the download"))?;
            }
        }
    }
    Ok((Sha256(hasher.finalize().into()), total))
}

impl State {
    /// Hands a chunk to the sink; it only refuses when it stopped on a write error, which
    /// [`Fetcher::download`] then reports.
    fn send(&self, chunk: Chunk) -> Result<(), FetchError> {
        self.chunks
            .send(chunk)
            .map_err(|_| FetchError::Local(anyhow::anyhow!("the download's writer stopped")))
    }

    fn restart(&mut self) -> Result<(), FetchError> {
        self.written = 0;
        self.validator = None;
        self.send(Chunk::Restart)
    }

    fn log(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    fn finish_bar(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

fn progress_bar(url: &str, total: Option<u64>) -> indicatif::ProgressBar {
    let name = url.rsplit('/').next().unwrap_or(url).to_owned();
    let bar = match total {
        Some(total) => indicatif::ProgressBar::new(total).with_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        ),
        None => indicatif::ProgressBar::new_spinner().with_style(
            indicatif::ProgressStyle::with_template("{msg} {spinner} {bytes} {bytes_per_sec}")
                .expect("a valid template"),
        ),
    };
    bar.with_message(name)
}

/// Turns a failed send into a retry (the network may come back) or a fatal error.
fn classify(url: &str, e: reqwest::Error) -> Attempt {
    if e.is_redirect() || e.is_builder() {
        return Attempt::Fatal(FetchError::Network {
            url: url.to_owned(),
            attempts: 1,
            timed_out: false,
            detail: chain(&e),
        });
    }
    Attempt::Retry {
        timed_out: e.is_timeout(),
        reason: chain(&e),
        status: None,
        after: None,
    }
}

/// An error with its causes: reqwest's own message alone hides "dns error" or "refused".
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn is_timeout(e: &io::Error) -> bool {
    if e.kind() == io::ErrorKind::TimedOut {
        return true;
    }
    let mut source = e.get_ref().map(|e| e as &(dyn std::error::Error + 'static));
    while let Some(cause) = source {
        if cause
            .downcast_ref::<reqwest::Error>()
            .is_some_and(|e| e.is_timeout())
        {
            return true;
        }
        source = cause.source();
    }
    e.to_string().contains("timed out")
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// A strong validator for `If-Range`: the ETag unless weak, else Last-Modified.
fn validator(headers: &HeaderMap) -> Option<String> {
    let etag = headers.get(ETAG).and_then(|v| v.to_str().ok());
    match etag {
        Some(tag) if !tag.starts_with("W/") => Some(tag.to_owned()),
        _ => headers
            .get(LAST_MODIFIED)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    }
}

/// `Content-Range: bytes START-END/TOTAL` → (START, TOTAL when known).
fn content_range(headers: &HeaderMap) -> Option<(u64, Option<u64>)> {
    let text = headers.get(CONTENT_RANGE)?.to_str().ok()?;
    let (range, total) = text.trim().strip_prefix("bytes ")?.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    let total = if total == "*" {
        None
    } else {
        Some(total.parse().ok()?)
    };
    Some((start.parse().ok()?, total))
}

/// `Retry-After` in seconds. (The HTTP-date form falls back to our own backoff.)
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    header_u64(headers, RETRY_AFTER.as_str()).map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_rewrite_the_longest_prefix() {
        let mirrors = Mirrors(vec![
            "https://github.com/=http://m/gh/".parse().unwrap(),
            "https://github.com/cloud-hypervisor/=http://m/ch/"
                .parse()
                .unwrap(),
        ]);
        assert_eq!(
            mirrors.rewrite("https://github.com/cloud-hypervisor/linux/x"),
            Some("http://m/ch/linux/x".into())
        );
        assert_eq!(
            mirrors.rewrite("https://github.com/other/y"),
            Some("http://m/gh/other/y".into())
        );
        assert_eq!(mirrors.rewrite("https://example.org/z"), None);
        assert!("no-equals-sign".parse::<Mirror>().is_err());
        assert!("a=ftp://x".parse::<Mirror>().is_err());
    }

    #[test]
    fn content_range_and_retry_after_parse() {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_RANGE, "bytes 100-199/200".parse().unwrap());
        headers.insert(RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(content_range(&headers), Some((100, Some(200))));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        headers.insert(CONTENT_RANGE, "bytes 5-9/*".parse().unwrap());
        assert_eq!(content_range(&headers), Some((5, None)));
        headers.insert(
            RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&headers), None);
    }
}
