//! Downloads against a scripted server on 127.0.0.1: retries, resume, restarts, 429, stalls,
//! redirects, mirrors, sizes and digests. Each fetches into a blob writer of a fresh blob dir
//! and commits only what the fetcher accepted, as the kernel stage does.

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{CONTENT_RANGE, HeaderMap, RETRY_AFTER};
use testkit::http::{Reply, Server};

use super::download::content_range;
use super::retry::retry_after;
use super::*;
use crate::store::{Blob, BlobDir};

fn content(len: usize) -> Arc<Vec<u8>> {
    Arc::new(testkit::noise::Noise::new(0x2545_f491_4f6c_dd1d).bytes(len))
}

/// Fast retries and short timeouts: fault tests finish in milliseconds.
pub(crate) fn options() -> Options {
    Options {
        connect_timeout: Duration::from_secs(2),
        read_timeout: Duration::from_millis(500),
        min_rate: 1024,
        stall_window: Duration::from_secs(30),
        attempts: 3,
        backoff: Duration::from_millis(10),
        backoff_cap: Duration::from_millis(200),
        progress: Progress::Lines,
    }
}

fn fetcher() -> Fetcher {
    Fetcher::new(options(), Mirrors::default()).unwrap()
}

/// A blob dir in a temp dir: where the fetched bytes land, and where nothing else may.
struct Blobs {
    _dir: tempfile::TempDir,
    blobs: BlobDir,
}

impl Blobs {
    fn new() -> Blobs {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobDir::create(dir.path()).unwrap();
        Blobs { _dir: dir, blobs }
    }

    /// Fetches `url` pinned to `bytes` (and `size`), committing what the fetcher accepted.
    fn fetch(
        &self,
        fetcher: &Fetcher,
        url: &str,
        bytes: &[u8],
        size: Option<u64>,
    ) -> Result<(Download, Blob), FetchError> {
        let expected = Expected {
            sha256: Some(system::hash::sha256_bytes(bytes)),
            size,
        };
        let mut writer = self.blobs.writer().unwrap();
        let download = fetcher.fetch(url, "kernel t", expected, &mut writer)?;
        let blob = writer
            .commit(expected.sha256.as_ref(), expected.size)
            .unwrap();
        Ok((download, blob))
    }

    /// Nothing: no blob, no partial file.
    fn assert_empty(&self) {
        let left: Vec<_> = std::fs::read_dir(self.blobs.dir()).unwrap().collect();
        assert!(left.is_empty(), "blobs should be empty: {left:?}");
    }

    fn assert_holds(&self, bytes: &[u8]) {
        let path = self.blobs.path(&system::hash::sha256_bytes(bytes));
        assert_eq!(std::fs::read(path).unwrap(), bytes);
    }
}

#[test]
fn a_wrong_digest_stores_nothing() {
    let pinned = content(10_000);
    let server = Server::serving(&Arc::new(b"some other kernel".to_vec()), false);
    let blobs = Blobs::new();
    let url = server.url("/vmlinux");
    let err = blobs.fetch(&fetcher(), &url, &pinned, None).unwrap_err();
    assert!(matches!(err, FetchError::Digest { .. }), "{err:?}");
    let text = err.to_string();
    for needle in [
        url.as_str(),
        &system::hash::sha256_bytes(&pinned).hex(),
        &system::hash::sha256_bytes(b"some other kernel").hex(),
        "nothing was stored",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in: {text}");
    }
    blobs.assert_empty();
}

#[test]
fn a_wrong_size_stores_nothing_and_is_caught_before_downloading() {
    let body = content(10_000);
    let server = Server::serving(&body, false);
    let blobs = Blobs::new();
    let err = blobs
        .fetch(&fetcher(), &server.url("/k"), &body, Some(9_999))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("expected 9999 bytes, the server announced 10000"),
        "{err}"
    );
    assert_eq!(server.count(), 1, "a size mismatch is not retried");
    blobs.assert_empty();
}

/// A 400 kB download whose first response is cut at 150 kB, fetched to the end: the server
/// then serves the whole body, honouring Range requests only if `ranges`.
fn cut_at_150k_then_whole(ranges: bool) -> (Server, Arc<Vec<u8>>, Blobs, Download, Blob) {
    let body = content(400_000);
    let served = body.clone();
    let server = Server::start(move |i, _| match i {
        0 => Reply::Cut {
            body: served.clone(),
            cut: 150_000,
        },
        _ => Reply::Body {
            body: served.clone(),
            ranges,
        },
    })
    .unwrap();
    let blobs = Blobs::new();
    let (download, blob) = blobs
        .fetch(&fetcher(), &server.url("/k"), &body, None)
        .unwrap();
    (server, body, blobs, download, blob)
}

#[test]
fn a_dropped_connection_resumes_with_a_range_request() {
    let (server, body, blobs, download, _) = cut_at_150k_then_whole(true);
    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(download.requests, 2);
    assert_eq!(requests[0].range_start(), None);
    let resumed_at = requests[1].range_start().expect("a Range request");
    assert!(resumed_at > 0 && resumed_at <= 150_000, "{resumed_at}");
    assert_eq!(requests[1].header("if-range"), Some("\"fixture\""));
    blobs.assert_holds(&body);
}

#[test]
fn a_dropped_connection_restarts_when_ranges_are_unsupported() {
    let (server, body, blobs, download, blob) = cut_at_150k_then_whole(false);
    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    assert!(requests[1].range_start().is_some(), "asked to resume");
    // The server sent everything again with 200; the result is still exactly the file.
    blobs.assert_holds(&body);
    assert_eq!(
        (download.size, blob.size),
        (body.len() as u64, body.len() as u64)
    );
}

/// What a run killed after `held` bytes of `body` (from `url`, ETag "fixture") leaves.
fn killed_after(blobs: &Blobs, url: &str, body: &[u8], held: usize) {
    let digest = system::hash::sha256_bytes(body);
    let mut writer = blobs.blobs.resumable_writer(&digest, url).unwrap();
    writer.begin(Some("\"fixture\"")).unwrap();
    std::io::Write::write_all(&mut writer, &body[..held]).unwrap();
    std::mem::forget(writer);
}

/// Fetches `url` pinned to `body` through a resumable writer, as the kernel stage does.
fn fetch_resumable(blobs: &Blobs, url: &str, body: &[u8]) -> Download {
    let digest = system::hash::sha256_bytes(body);
    let expected = Expected {
        sha256: Some(digest),
        size: Some(body.len() as u64),
    };
    let mut writer = blobs.blobs.resumable_writer(&digest, url).unwrap();
    let download = fetcher()
        .fetch(url, "kernel t", expected, &mut writer)
        .unwrap();
    writer.commit(Some(&digest), expected.size).unwrap();
    blobs.assert_holds(body);
    download
}

#[test]
fn a_partial_from_another_url_is_not_resumed() {
    let body = content(100_000);
    let server = Server::serving(&body, true);
    let blobs = Blobs::new();
    killed_after(&blobs, "https://elsewhere.invalid/k", &body, 40_000);
    let download = fetch_resumable(&blobs, &server.url("/k"), &body);
    assert_eq!(server.requests()[0].range_start(), None);
    assert_eq!(download.resumed_from, 0);
}

#[test]
fn a_partial_the_server_will_not_continue_restarts_from_zero() {
    let body = content(100_000);
    let server = Server::serving(&body, false);
    let blobs = Blobs::new();
    let url = server.url("/k");
    killed_after(&blobs, &url, &body, 40_000);
    let download = fetch_resumable(&blobs, &url, &body);
    assert_eq!(server.requests()[0].range_start(), Some(40_000));
    assert_eq!((download.requests, download.size), (1, 100_000));
}

#[test]
fn a_partial_that_is_already_whole_needs_no_request() {
    // Killed between the last byte and the commit.
    let body = content(100_000);
    let server = Server::serving(&body, true);
    let blobs = Blobs::new();
    let url = server.url("/k");
    killed_after(&blobs, &url, &body, body.len());
    let download = fetch_resumable(&blobs, &url, &body);
    assert_eq!((server.count(), download.requests), (0, 0));
}

#[test]
fn a_wrong_digest_leaves_nothing_to_resume() {
    let pinned = content(10_000);
    let server = Server::serving(&Arc::new(b"some other kernel".to_vec()), true);
    let blobs = Blobs::new();
    let digest = system::hash::sha256_bytes(&pinned);
    let url = server.url("/k");
    let mut writer = blobs.blobs.resumable_writer(&digest, &url).unwrap();
    let expected = Expected {
        sha256: Some(digest),
        size: None,
    };
    let err = fetcher()
        .fetch(&url, "k", expected, &mut writer)
        .unwrap_err();
    assert!(matches!(err, FetchError::Digest { .. }), "{err:?}");
    drop(writer);
    blobs.assert_empty();
}

#[test]
fn server_errors_and_429_are_retried() {
    let body = content(5_000);
    let served = body.clone();
    let server = Server::start(move |i, _| match i {
        0 => Reply::Status {
            code: 500,
            headers: vec![],
        },
        1 => Reply::Status {
            code: 429,
            headers: vec![("Retry-After".into(), "0".into())],
        },
        _ => Reply::Body {
            body: served.clone(),
            ranges: true,
        },
    })
    .unwrap();
    let blobs = Blobs::new();
    blobs
        .fetch(&fetcher(), &server.url("/k"), &body, None)
        .unwrap();
    assert_eq!(server.count(), 3);
    blobs.assert_holds(&body);
}

#[test]
fn persistent_server_errors_give_up_after_the_bounded_attempts() {
    let server = Server::start(|_, _| Reply::Status {
        code: 503,
        headers: vec![],
    })
    .unwrap();
    let blobs = Blobs::new();
    let err = blobs
        .fetch(&fetcher(), &server.url("/k"), b"k", None)
        .unwrap_err()
        .to_string();
    assert_eq!(server.count(), options().attempts as usize);
    assert!(err.contains("503"), "{err}");
    blobs.assert_empty();
}

#[test]
fn not_found_fails_at_once() {
    let server = Server::start(|_, _| Reply::Status {
        code: 404,
        headers: vec![],
    })
    .unwrap();
    let blobs = Blobs::new();
    let url = server.url("/gone");
    let err = blobs.fetch(&fetcher(), &url, b"k", None).unwrap_err();
    assert!(
        matches!(&err, FetchError::Status { status, .. } if status.as_u16() == 404),
        "{err:?}"
    );
    let err = err.to_string();
    assert_eq!(server.count(), 1, "no retry storm on 404");
    for needle in ["404", &url] {
        assert!(err.contains(needle), "missing {needle:?} in: {err}");
    }
    blobs.assert_empty();
}

/// The error of an attempt that ran out of time (read timeout or stall floor).
fn assert_timed_out(err: &FetchError) {
    assert!(
        matches!(
            err,
            FetchError::Network {
                timed_out: true,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn a_stalled_server_times_out() {
    let server = Server::start(|_, _| Reply::Stall).unwrap();
    let blobs = Blobs::new();
    let started = std::time::Instant::now();
    let err = blobs
        .fetch(&fetcher(), &server.url("/k"), b"k", None)
        .unwrap_err();
    assert_timed_out(&err);
    assert!(err.to_string().contains("timed out"), "{err}");
    assert_eq!(server.count(), options().attempts as usize);
    // Not asserting on time beyond "it came back at all, well before the stall ends".
    assert!(started.elapsed() < Duration::from_secs(30));
    blobs.assert_empty();
}

/// A server that sends a 3 kB body `chunk` bytes every 10 ms, on every request.
fn trickling_3k(chunk: usize) -> (Server, Arc<Vec<u8>>) {
    let body = content(3_000);
    let served = body.clone();
    let server = Server::start(move |_, _| Reply::Trickle {
        body: served.clone(),
        chunk,
        every: Duration::from_millis(10),
    })
    .unwrap();
    (server, body)
}

/// The test fetcher with a stall floor of `min_rate` bytes/s over `stall_window`.
fn with_floor(min_rate: u64, stall_window: Duration) -> Fetcher {
    Fetcher::new(
        Options {
            min_rate,
            stall_window,
            ..options()
        },
        Mirrors::default(),
    )
    .unwrap()
}

#[test]
fn a_trickling_server_is_a_stall_below_the_floor() {
    // 16 bytes every 10 ms (at most 1.6 KB/s): each read comes well within the read timeout,
    // so only the floor can tell. Unchecked, the body would finish after about 2 seconds.
    let (server, body) = trickling_3k(16);
    let blobs = Blobs::new();
    let url = server.url("/slow");
    let slow = with_floor(64 * 1024, Duration::from_millis(100));
    let err = blobs.fetch(&slow, &url, &body, None).unwrap_err();
    assert_timed_out(&err);
    let text = err.to_string();
    for needle in [
        url.as_str(),
        "too slow",
        "B/s over the last",
        "below the floor of 64.0 KiB/s",
        "--min-rate",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in: {text}");
    }
    // Slow attempts do not count as progress: the attempts are used up as for a dead server,
    // each one resuming where the last stopped.
    let requests = server.requests();
    assert_eq!(requests.len(), options().attempts as usize);
    assert!(requests[1].range_start().is_some_and(|start| start > 0));
    blobs.assert_empty();
}

#[test]
fn a_slow_body_above_the_floor_finishes() {
    let (server, body) = trickling_3k(1_000);
    let blobs = Blobs::new();
    let floor = with_floor(100, Duration::from_millis(5));
    blobs.fetch(&floor, &server.url("/k"), &body, None).unwrap();
    assert_eq!(server.count(), 1);
    blobs.assert_holds(&body);
}

#[test]
fn redirects_to_another_host_are_followed() {
    let body = content(20_000);
    let served = body.clone();
    let cdn = Server::start(move |_, _| Reply::Body {
        body: served.clone(),
        ranges: true,
    })
    .unwrap();
    let target = cdn.url("/asset");
    let origin = Server::start(move |_, _| Reply::Redirect(target.clone())).unwrap();
    let blobs = Blobs::new();
    blobs
        .fetch(&fetcher(), &origin.url("/release/k"), &body, None)
        .unwrap();
    assert_eq!((origin.count(), cdn.count()), (1, 1));
    blobs.assert_holds(&body);
}

#[test]
fn a_mirror_replaces_the_url_prefix() {
    let body = content(1_000);
    let server = Server::serving(&body, true);
    let blobs = Blobs::new();
    let mirror: Mirror = format!("https://releases.invalid/={}", server.url("/copy/"))
        .parse()
        .unwrap();
    let fetcher = Fetcher::new(options(), Mirrors(vec![mirror])).unwrap();
    // `.invalid` never resolves: reaching the file proves the mirror was used.
    blobs
        .fetch(&fetcher, "https://releases.invalid/linux/k", &body, None)
        .unwrap();
    assert_eq!(server.requests()[0].path, "/copy/linux/k");
    blobs.assert_holds(&body);
}

#[test]
fn unpinned_content_is_hashed_once_while_it_streams() {
    let body = content(300_000);
    let server = Server::serving(&body, true);
    let blobs = Blobs::new();
    let mut writer = blobs.blobs.writer().unwrap();
    let download = fetcher()
        .fetch(&server.url("/k"), "new", Expected::default(), &mut writer)
        .unwrap();
    assert_eq!(download.sha256, system::hash::sha256_bytes(&body));
    assert_eq!((download.size, download.requests), (body.len() as u64, 1));
    let blob = writer.commit(None, None).unwrap();
    assert_eq!(blob.sha256, download.sha256);
    blobs.assert_holds(&body);
}

#[test]
fn requests_answer_a_challenge_once_through_the_authorizer() {
    /// Offers `token` once it was asked to answer a challenge.
    struct Token {
        token: &'static str,
        answers: u32,
    }
    impl Authorizer for Token {
        fn authorization(&self) -> Option<String> {
            (self.answers > 0).then(|| self.token.to_owned())
        }
        fn answer(
            &mut self,
            _: &Transport,
            _: &str,
            challenge: Option<&str>,
        ) -> anyhow::Result<bool> {
            assert_eq!(challenge, Some("Bearer realm=\"x\""));
            self.answers += 1;
            Ok(true)
        }
    }
    let server = Server::start(|_, request| match request.header("authorization") {
        Some("Bearer good") => Reply::Full {
            code: 200,
            headers: vec![],
            body: b"ok".to_vec(),
        },
        _ => Reply::Status {
            code: 401,
            headers: vec![("WWW-Authenticate".into(), "Bearer realm=\"x\"".into())],
        },
    })
    .unwrap();
    let transport = Transport::new(options()).unwrap();
    let mut good = Token {
        token: "Bearer good",
        answers: 0,
    };
    let response = transport
        .send(&Request::get(server.url("/m")), Some(&mut good))
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!((server.count(), good.answers), (2, 1));

    // A token that does not help: the second 401 is the answer, not a loop.
    let mut bad = Token {
        token: "Bearer bad",
        answers: 0,
    };
    let response = transport
        .send(&Request::get(server.url("/m")), Some(&mut bad))
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    assert_eq!((server.count(), bad.answers), (4, 1));
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
