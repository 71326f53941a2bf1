//! What a transfer can fail with: typed, so that callers add the next step that fits (a kernel
//! download suggests `--mirror`, a registry pull `--offline` with a filled cache).

use std::fmt;

use reqwest::{Method, StatusCode};
use system::Sha256;

/// Why a request or download failed. Each names the URL it was fetching (the mirror's, when one
/// applied).
#[derive(Debug)]
pub enum FetchError {
    /// The server answered with a status that asking again will not change, or kept answering
    /// with a retryable one until the attempts ran out.
    Status {
        method: Method,
        url: String,
        status: StatusCode,
        attempts: u32,
    },
    /// No answer: DNS, connection, TLS, timeout or a dropped connection, after every attempt.
    Network {
        method: Method,
        url: String,
        attempts: u32,
        timed_out: bool,
        detail: String,
    },
    /// More or fewer bytes than expected (announced by the server or counted).
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
    /// Answering the server's authentication challenge failed (e.g. the token service).
    Auth(anyhow::Error),
    /// Writing what arrived failed.
    Local(anyhow::Error),
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchError::Status {
                method,
                url,
                status,
                attempts,
            } => write!(
                f,
                "{method} {url}: the server answered {status} (after {attempts} attempt(s))"
            ),
            FetchError::Network {
                method,
                url,
                attempts,
                timed_out,
                detail,
            } => {
                let what = if *timed_out { "timed out" } else { "failed" };
                write!(
                    f,
                    "{method} {url}: {what} after {attempts} attempt(s): {detail}"
                )
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
            FetchError::Auth(e) | FetchError::Local(e) => write!(f, "{e:#}"),
        }
    }
}

impl std::error::Error for FetchError {}
