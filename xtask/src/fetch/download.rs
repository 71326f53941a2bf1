//! Streaming downloads: the body goes into a [`Sink`] (a store's blob writer, which hashes
//! what it writes) on its own thread, overlapping the network reads, and is checked against
//! the expected size and digest. It survives what real networks do:
//! - the retry policy of [`super::retry`] (timeouts, 5xx, 408, 429, `Retry-After`);
//! - the stall floor of [`super::floor`]: a body slower than the minimum rate is retried;
//! - resume with `Range: bytes=N-` (and `If-Range`, so a replaced file restarts instead of
//!   splicing), checking the `206`'s `Content-Range`; a `200` answer means the server ignored
//!   the range, and the sink restarts from zero;
//! - a size the server announces or sends that is not the expected one fails at once.
//!
//! The downloader never commits anything: the caller commits the sink once this returned.

use std::io::{self, Read, Write};
use std::sync::mpsc;
use std::time::Instant;

use reqwest::StatusCode;
use reqwest::header::{
    CONTENT_LENGTH, CONTENT_RANGE, ETAG, HeaderMap, HeaderValue, IF_RANGE, LAST_MODIFIED, RANGE,
};
use system::Sha256;

use super::FetchError;
use super::floor::RateFloor;
use super::progress::Reporter;
use super::retry::{Attempt, Retries, Retry, header_u64, is_timeout};
use super::transport::{Authorizer, Request, Transport};
use crate::store::BlobWriter;

/// Where a download's bytes go, in order, hashed as they are written.
pub trait Sink: Write + Send {
    /// Forgets everything written: the server is sending the file again from byte 0.
    fn restart(&mut self) -> io::Result<()>;
    /// The sha256 of what was written since the start or the last restart.
    fn sha256(&self) -> Sha256;
    /// What an earlier run left to resume: the bytes held (part of [`Sink::sha256`]) and the
    /// validator of the answer they came from.
    fn resumable(&self) -> Option<(u64, String)> {
        None
    }
    /// A `200` answer is about to send the body from byte 0, with this validator (`ETag` or
    /// `Last-Modified`): a sink that outlives the run records it to resume later.
    fn begin(&mut self, _validator: Option<&str>) -> io::Result<()> {
        Ok(())
    }
}

impl Sink for BlobWriter {
    fn restart(&mut self) -> io::Result<()> {
        BlobWriter::restart(self)
    }

    fn sha256(&self) -> Sha256 {
        BlobWriter::sha256(self)
    }

    fn resumable(&self) -> Option<(u64, String)> {
        BlobWriter::resumable(self)
    }

    fn begin(&mut self, validator: Option<&str>) -> io::Result<()> {
        BlobWriter::begin(self, validator)
    }
}

/// What the content must be; `None` accepts anything (pinning a new input).
#[derive(Debug, Clone, Copy, Default)]
pub struct Expected {
    pub sha256: Option<Sha256>,
    pub size: Option<u64>,
}

/// What a download produced.
#[derive(Debug, Clone)]
pub struct Download {
    pub sha256: Sha256,
    pub size: u64,
    /// HTTP requests made (1 when nothing went wrong; 0 when an earlier run had received it
    /// all).
    pub requests: u32,
    /// Bytes an earlier, interrupted run had received, that this one continued from.
    pub resumed_from: u64,
}

impl Transport {
    /// Streams the answer to `request` (a GET) into `sink`, resuming or restarting after
    /// failures, and checks it against `expected`. `auth` answers `401`s (registry blobs).
    pub fn download(
        &self,
        request: &Request,
        label: &str,
        expected: Expected,
        sink: &mut dyn Sink,
        auth: Option<&mut dyn Authorizer>,
    ) -> Result<Download, FetchError> {
        let report = Reporter::new(self.options().progress);
        let mut resume = sink.resumable();
        if let Some((held, _)) = &resume
            && expected.size.is_some_and(|size| *held > size)
        {
            report.log(&format!(
                "{label}: the {held} bytes an earlier run left are more than the expected {}; \
                 starting from byte 0",
                expected.size.unwrap_or_default()
            ));
            sink.restart().map_err(|e| FetchError::Local(e.into()))?;
            resume = None;
        }
        let resumed_from = resume.as_ref().map_or(0, |(held, _)| *held);
        if resumed_from > 0 && expected.size == Some(resumed_from) {
            // Interrupted between the last byte and the commit: nothing left to ask for.
            if expected.sha256.is_none_or(|digest| digest == sink.sha256()) {
                return Ok(Download {
                    sha256: sink.sha256(),
                    size: resumed_from,
                    requests: 0,
                    resumed_from,
                });
            }
        }
        if resumed_from > 0 {
            report.log(&format!(
                "{label}: resuming at byte {resumed_from}, where an earlier run stopped"
            ));
        }
        let (size, requests) = std::thread::scope(|scope| {
            let (chunks, received) = mpsc::sync_channel(4);
            let (free, buffers) = mpsc::channel();
            let out = &mut *sink;
            let writer = scope.spawn(move || write_chunks(received, free, out, resumed_from));
            let state = State {
                written: resumed_from,
                validator: resume.map(|(_, validator)| validator),
                chunks,
                buffers,
                report,
            };
            let transfer = self.transfer(request, label, expected.size, state, auth);
            let written = writer.join().expect("the writing thread does not panic");
            match (transfer, written) {
                // A local write error is what stopped the transfer, if both failed.
                (_, Err(e)) => Err(FetchError::Local(e)),
                (Err(e), Ok(_)) => Err(e),
                (Ok(done), Ok(written)) => {
                    debug_assert_eq!(done.0, written);
                    Ok(done)
                }
            }
        })
        .inspect_err(|e| {
            if matches!(e, FetchError::Size { .. }) {
                // Not the pinned file: nothing of it is worth resuming.
                let _ = sink.restart();
            }
        })?;
        let sha256 = sink.sha256();
        if let Some(expected) = expected.sha256
            && expected != sha256
        {
            let _ = sink.restart();
            return Err(FetchError::Digest {
                url: request.url.clone(),
                expected,
                actual: sha256,
                size,
            });
        }
        Ok(Download {
            sha256,
            size,
            requests,
            resumed_from,
        })
    }

    /// The retry loop of [`Transport::download`]: returns the size and the number of requests.
    fn transfer(
        &self,
        request: &Request,
        label: &str,
        expected_size: Option<u64>,
        mut state: State,
        mut auth: Option<&mut dyn Authorizer>,
    ) -> Result<(u64, u32), FetchError> {
        state.report.start(label, &request.url);
        let mut retries = Retries::new(self.options());
        let mut answered = false;
        let outcome = loop {
            retries.requests += 1;
            let before = state.written;
            let retry =
                match self.attempt(request, label, expected_size, &mut state, auth.as_deref()) {
                    Ok(()) => break Ok(state.written),
                    Err(Attempt::Fatal(e)) => break Err(e),
                    Err(Attempt::Unauthorized(response)) => {
                        match self.answer(&mut auth, &mut answered, request, &response) {
                            Ok(true) => continue,
                            Ok(false) => {
                                break Err(FetchError::Status {
                                    method: request.method.clone(),
                                    url: request.url.clone(),
                                    status: response.status(),
                                    attempts: retries.requests,
                                });
                            }
                            Err(e) => break Err(e),
                        }
                    }
                    Err(Attempt::Retry(retry)) => retry,
                };
            let reason = retry.reason.clone();
            // A body below the stall floor keeps its bytes but has not earned another round.
            let progressed = state.written > before && !retry.slow;
            let backoff =
                match retries.after_failure(&request.method, &request.url, retry, progressed) {
                    Ok(backoff) => backoff,
                    Err(e) => break Err(e),
                };
            let next = match state.written {
                0 => "retrying".to_owned(),
                n => format!("resuming at byte {n}"),
            };
            state
                .report
                .log(&backoff.line(label, retries.requests, &reason, &next));
            std::thread::sleep(backoff.wait);
        };
        let outcome = outcome.and_then(|size| match expected_size {
            Some(expected) if expected != size => Err(FetchError::Size {
                url: request.url.clone(),
                expected,
                actual: size,
                announced: false,
            }),
            _ => Ok((size, retries.requests)),
        });
        state.report.finish(label, outcome.as_ref().ok().copied());
        outcome
    }

    /// One request: resumes from `state.written` when there is something to resume.
    fn attempt(
        &self,
        request: &Request,
        label: &str,
        expected_size: Option<u64>,
        state: &mut State,
        auth: Option<&dyn Authorizer>,
    ) -> Result<(), Attempt> {
        let url = &request.url;
        let mut range = HeaderMap::new();
        if state.written > 0 {
            let bytes = format!("bytes={}-", state.written);
            range.insert(RANGE, HeaderValue::from_str(&bytes).expect("ASCII"));
            if let Some(validator) = state.validator.as_deref().and_then(|v| v.parse().ok()) {
                range.insert(IF_RANGE, validator);
            }
        }
        let mut response = self.send_once(request, &range, auth)?;
        let status = response.status();
        let headers = response.headers().clone();
        let total = match status {
            StatusCode::OK => {
                if state.written > 0 {
                    state.report.log(&format!(
                        "{url}: the server ignored the range request (200 instead of 206); \
                         restarting from byte 0"
                    ));
                    state.restart().map_err(Attempt::Fatal)?;
                }
                state.validator = validator(&headers);
                state
                    .send(Chunk::Begin(state.validator.clone()))
                    .map_err(Attempt::Fatal)?;
                header_u64(&headers, CONTENT_LENGTH.as_str())
            }
            // What we hold is as long as the file or longer: it cannot be continued.
            StatusCode::RANGE_NOT_SATISFIABLE if state.written > 0 => {
                state.restart().map_err(Attempt::Fatal)?;
                return Err(Attempt::Retry(Retry::network(
                    "416: the server has nothing after the bytes received; restarting from byte 0"
                        .to_owned(),
                    false,
                )));
            }
            StatusCode::PARTIAL_CONTENT => match content_range(&headers) {
                Some((start, total)) if start == state.written && state.written > 0 => total,
                other => {
                    state.restart().map_err(Attempt::Fatal)?;
                    return Err(Attempt::Retry(Retry::network(
                        format!(
                            "206 with Content-Range {other:?} does not continue at byte {}; \
                             restarting from byte 0",
                            state.written
                        ),
                        false,
                    )));
                }
            },
            StatusCode::UNAUTHORIZED => return Err(Attempt::Unauthorized(Box::new(response))),
            s => {
                return Err(match Retry::for_status(s, &headers) {
                    Some(retry) => Attempt::Retry(retry),
                    None => Attempt::Fatal(FetchError::Status {
                        method: request.method.clone(),
                        url: url.clone(),
                        status: s,
                        attempts: 1,
                    }),
                });
            }
        };
        if let (Some(expected), Some(total)) = (expected_size, total)
            && expected != total
        {
            return Err(Attempt::Fatal(FetchError::Size {
                url: url.clone(),
                expected,
                actual: total,
                announced: true,
            }));
        }
        state
            .report
            .position(label, total.or(expected_size), state.written);
        let mut floor = RateFloor::new(self.options(), Instant::now());
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
                    return Err(Attempt::Retry(Retry::network(
                        format!("reading the body at byte {}: {e}", state.written),
                        is_timeout(&e),
                    )));
                }
            };
            state.send(Chunk::Data(buf, n)).map_err(Attempt::Fatal)?;
            state.written += n as u64;
            state
                .report
                .position(label, total.or(expected_size), state.written);
            if let Some(expected) = expected_size
                && state.written > expected
            {
                return Err(Attempt::Fatal(FetchError::Size {
                    url: url.clone(),
                    expected,
                    actual: state.written,
                    announced: false,
                }));
            }
            let complete = total == Some(state.written);
            if let Err(slow) = floor.record(n as u64, Instant::now())
                && !complete
            {
                return Err(Attempt::Retry(Retry::slow(format!(
                    "{url} is too slow at byte {}: {}",
                    state.written,
                    slow.describe()
                ))));
            }
        }
        if let Some(total) = total
            && state.written < total
        {
            return Err(Attempt::Retry(Retry::network(
                format!("the connection closed at byte {} of {total}", state.written),
                false,
            )));
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
    /// Buffers the writing thread is done with.
    buffers: mpsc::Receiver<Vec<u8>>,
    report: Reporter,
}

/// Read size: large, so that hashing and writing, not channel traffic, dominate.
const CHUNK: usize = 1 << 20;

enum Chunk {
    /// A `200` answer starts the body, with this validator.
    Begin(Option<String>),
    /// A buffer and how many of its bytes are data.
    Data(Vec<u8>, usize),
    /// Drop everything so far: the server is sending the file from the start.
    Restart,
}

/// Writes what the transfer receives into the sink (which hashes it) after the `held` bytes it
/// holds already; returns the byte count.
fn write_chunks(
    chunks: mpsc::Receiver<Chunk>,
    free: mpsc::Sender<Vec<u8>>,
    out: &mut dyn Sink,
    held: u64,
) -> anyhow::Result<u64> {
    let mut total = held;
    for chunk in chunks {
        match chunk {
            Chunk::Begin(validator) => out
                .begin(validator.as_deref())
                .map_err(|e| anyhow::Error::new(e).context("recording the download's source"))?,
            Chunk::Data(buf, n) => {
                out.write_all(&buf[..n])
                    .map_err(|e| anyhow::Error::new(e).context("writing the download"))?;
                total += n as u64;
                let _ = free.send(buf);
            }
            Chunk::Restart => {
                total = 0;
                out.restart()
                    .map_err(|e| anyhow::Error::new(e).context("truncating the download"))?;
            }
        }
    }
    Ok(total)
}

impl State {
    /// Hands a chunk to the writing thread; it only refuses when it stopped on a write error,
    /// which [`Transport::download`] then reports.
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
pub(crate) fn content_range(headers: &HeaderMap) -> Option<(u64, Option<u64>)> {
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
