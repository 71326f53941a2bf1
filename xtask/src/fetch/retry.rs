//! The retry policy every request follows, downloads and registry calls alike: bounded attempts
//! with exponential backoff on connection errors, timeouts, 5xx, 408 and 429 (`Retry-After`
//! honoured up to a cap); an attempt that received bytes resets the count, so a long download
//! on a flaky link still finishes. Other 4xx are answers, not failures: asking again will not
//! change them.

use std::io;
use std::time::Duration;

use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{Method, StatusCode};

use super::{FetchError, Options};

/// What one attempt ended with, when it did not succeed.
pub(crate) enum Attempt {
    /// Worth another try.
    Retry(Retry),
    /// The server asks for credentials: the caller's authorizer may answer once.
    Unauthorized(Box<reqwest::blocking::Response>),
    Fatal(FetchError),
}

/// Why an attempt failed, in a way that may pass.
pub(crate) struct Retry {
    pub reason: String,
    pub timed_out: bool,
    /// The last status, when the server answered.
    pub status: Option<StatusCode>,
    /// The server's `Retry-After`.
    pub after: Option<Duration>,
    /// The body came, but below the stall floor: the bytes do not count as progress.
    pub slow: bool,
}

impl Retry {
    pub fn network(reason: String, timed_out: bool) -> Retry {
        Retry {
            reason,
            timed_out,
            status: None,
            after: None,
            slow: false,
        }
    }

    /// A body below the stall floor: retried, but without the reset progress earns.
    pub fn slow(reason: String) -> Retry {
        Retry {
            slow: true,
            ..Retry::network(reason, true)
        }
    }

    /// A retry for 5xx, 408 and 429; `None` for statuses that are answers.
    pub fn for_status(status: StatusCode, headers: &HeaderMap) -> Option<Retry> {
        let transient = status.is_server_error()
            || status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT;
        transient.then(|| Retry {
            reason: format!("the server answered {status}"),
            timed_out: false,
            status: Some(status),
            after: retry_after(headers),
            slow: false,
        })
    }
}

/// Counts the attempts of one request or download and decides whether to go on.
pub(crate) struct Retries<'a> {
    options: &'a Options,
    /// Failed attempts in a row without progress.
    failures: u32,
    /// Requests sent, successful or not.
    pub requests: u32,
}

/// The wait before the next attempt, and how much of the budget is used.
pub(crate) struct Backoff {
    pub wait: Duration,
    pub failures: u32,
    pub attempts: u32,
}

impl Backoff {
    /// The log line for a failed attempt: `what: attempt N failed: reason; next in Xs (...)`.
    pub fn line(&self, what: &str, request: u32, reason: &str, next: &str) -> String {
        format!(
            "{what}: attempt {request} failed: {reason}; {next} in {:.1}s \
             ({} of {} consecutive attempts used)",
            self.wait.as_secs_f64(),
            self.failures,
            self.attempts
        )
    }
}

impl<'a> Retries<'a> {
    pub fn new(options: &'a Options) -> Retries<'a> {
        Retries {
            options,
            failures: 0,
            requests: 0,
        }
    }

    /// After a failed attempt: how long to wait before the next one, or the error that ends
    /// the request when the attempts ran out. `progressed`: the attempt received bytes.
    pub fn after_failure(
        &mut self,
        method: &Method,
        url: &str,
        retry: Retry,
        progressed: bool,
    ) -> Result<Backoff, FetchError> {
        let attempts = self.options.attempts.max(1);
        // Attempts that received bytes do not count, but even those are bounded.
        let ceiling = attempts.saturating_mul(16);
        if progressed {
            self.failures = 0;
        }
        self.failures += 1;
        if self.failures >= attempts || self.requests >= ceiling {
            return Err(match retry.status {
                Some(status) => FetchError::Status {
                    method: method.clone(),
                    url: url.to_owned(),
                    status,
                    attempts: self.requests,
                },
                None => FetchError::Network {
                    method: method.clone(),
                    url: url.to_owned(),
                    attempts: self.requests,
                    timed_out: retry.timed_out,
                    detail: retry.reason,
                },
            });
        }
        let backoff = self
            .options
            .backoff
            .saturating_mul(1 << (self.failures - 1).min(16))
            .min(self.options.backoff_cap);
        let wait = retry
            .after
            .map(|a| a.min(self.options.backoff_cap))
            .unwrap_or(backoff);
        Ok(Backoff {
            wait,
            failures: self.failures,
            attempts,
        })
    }
}

/// Turns a failed send into a retry (the network may come back) or a fatal error.
pub(crate) fn classify(method: &Method, url: &str, e: reqwest::Error) -> Attempt {
    // The URL is in every message already; reqwest's copy of it only makes lines longer.
    let e = e.without_url();
    if e.is_redirect() || e.is_builder() {
        return Attempt::Fatal(FetchError::Network {
            method: method.clone(),
            url: url.to_owned(),
            attempts: 1,
            timed_out: false,
            detail: chain(&e),
        });
    }
    Attempt::Retry(Retry::network(chain(&e), e.is_timeout()))
}

/// An error with its causes: reqwest's own message alone hides "dns error" or "refused".
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
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

pub(crate) fn is_timeout(e: &io::Error) -> bool {
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

pub(crate) fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// `Retry-After` in seconds. (The HTTP-date form falls back to our own backoff.)
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    header_u64(headers, RETRY_AFTER.as_str()).map(Duration::from_secs)
}
