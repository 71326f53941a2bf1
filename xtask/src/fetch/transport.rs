//! The one HTTP transport: a configured reqwest client and the request loop every caller goes
//! through (retries, backoff, authentication challenges).
//!
//! Redirects (release assets move to a CDN host) and the proxy environment variables
//! (`HTTPS_PROXY`, `NO_PROXY`, ...) are reqwest's defaults and stay on; a caller with stricter
//! rules (the registry client refuses plain-HTTP redirects) brings its own redirect policy.

use reqwest::StatusCode;
use reqwest::blocking::{Client, Response};
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderName, HeaderValue, WWW_AUTHENTICATE};
use reqwest::redirect::Policy;

use super::retry::{Attempt, Retries, Retry, classify};
use super::{FetchError, Options, use_ring_for_tls};

/// A request to make: method, URL and extra headers (`Accept`, ...). Credentials come from an
/// [`Authorizer`], not from here, so that they are renewed when the server asks.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: reqwest::Method,
    pub url: String,
    pub headers: HeaderMap,
    /// What to send (a registry push); shared, because every retry sends it again.
    pub body: Option<std::sync::Arc<Vec<u8>>>,
}

impl Request {
    pub fn get(url: impl Into<String>) -> Request {
        Request {
            method: reqwest::Method::GET,
            url: url.into(),
            headers: HeaderMap::new(),
            body: None,
        }
    }

    /// A request of another method (`POST`, `PUT`) with `body`.
    pub fn with_body(
        method: reqwest::Method,
        url: impl Into<String>,
        body: std::sync::Arc<Vec<u8>>,
    ) -> Request {
        Request {
            method,
            body: Some(body),
            ..Request::get(url)
        }
    }

    pub fn head(url: impl Into<String>) -> Request {
        Request {
            method: reqwest::Method::HEAD,
            ..Request::get(url)
        }
    }

    /// With one more header. Panics on a value that is not a valid header value: callers pass
    /// constants or values they built.
    pub fn header(mut self, name: HeaderName, value: &str) -> Request {
        let value = HeaderValue::from_str(value).expect("a valid header value");
        self.headers.insert(name, value);
        self
    }
}

/// Adds credentials to a caller's requests and answers a server's `401` challenge (the registry
/// client's bearer tokens and basic auth).
pub trait Authorizer {
    /// The `Authorization` header value for the next request, if any.
    fn authorization(&self) -> Option<String>;

    /// Called with the `WWW-Authenticate` header of a `401` for `url` (`None` when the server
    /// sent none). `Ok(true)`: try again with the new [`Authorizer::authorization`];
    /// `Ok(false)`: the `401` is the answer. May make requests itself through `transport`.
    fn answer(
        &mut self,
        transport: &Transport,
        url: &str,
        challenge: Option<&str>,
    ) -> anyhow::Result<bool>;
}

/// The one place HTTP clients are built: timeouts, TLS provider, proxies, redirects.
pub struct Transport {
    client: Client,
    options: Options,
}

impl Transport {
    /// With reqwest's default redirect policy (up to 10, any host).
    pub fn new(options: Options) -> anyhow::Result<Transport> {
        Transport::with_redirects(options, Policy::default())
    }

    pub fn with_redirects(options: Options, redirects: Policy) -> anyhow::Result<Transport> {
        use_ring_for_tls();
        // Proxies from the environment are reqwest's default: keep them.
        let client = Client::builder()
            .connect_timeout(options.connect_timeout)
            // The blocking client applies this to the response head and to each body read.
            .timeout(options.read_timeout)
            .redirect(redirects)
            .user_agent(concat!("system-xtask/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| anyhow::anyhow!("building the HTTP client: {e}"))?;
        Ok(Transport { client, options })
    }

    pub fn options(&self) -> &Options {
        &self.options
    }

    /// Sends `request` under the retry policy and returns the first answer that is not worth
    /// retrying, whatever its status (a `404` is the caller's to explain). A `401` is answered
    /// once by `auth` when given. Fails when the attempts ran out.
    pub fn send(
        &self,
        request: &Request,
        mut auth: Option<&mut dyn Authorizer>,
    ) -> Result<Response, FetchError> {
        let mut retries = Retries::new(&self.options);
        let mut answered = false;
        loop {
            retries.requests += 1;
            let outcome = self
                .send_once(request, &HeaderMap::new(), auth.as_deref())
                .and_then(|response| {
                    match Retry::for_status(response.status(), response.headers()) {
                        Some(retry) => Err(Attempt::Retry(retry)),
                        None if response.status() == StatusCode::UNAUTHORIZED => {
                            Err(Attempt::Unauthorized(Box::new(response)))
                        }
                        None => Ok(response),
                    }
                });
            let retry = match outcome {
                Ok(response) => return Ok(response),
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Unauthorized(response)) => {
                    if self.answer(&mut auth, &mut answered, request, &response)? {
                        continue;
                    }
                    return Ok(*response);
                }
                Err(Attempt::Retry(retry)) => retry,
            };
            let reason = retry.reason.clone();
            let backoff = retries.after_failure(&request.method, &request.url, retry, false)?;
            let what = format!("{} {}", request.method, request.url);
            eprintln!(
                "{}",
                backoff.line(&what, retries.requests, &reason, "retrying")
            );
            std::thread::sleep(backoff.wait);
        }
    }

    /// One request, with `extra` headers (a range) and the authorizer's credentials. Network
    /// errors are classified; the status is the caller's to judge.
    pub(crate) fn send_once(
        &self,
        request: &Request,
        extra: &HeaderMap,
        auth: Option<&dyn Authorizer>,
    ) -> Result<Response, Attempt> {
        let mut builder = self
            .client
            .request(request.method.clone(), &request.url)
            .headers(request.headers.clone())
            .headers(extra.clone());
        if let Some(authorization) = auth.and_then(|a| a.authorization()) {
            builder = builder.header(AUTHORIZATION, authorization);
        }
        if let Some(body) = &request.body {
            builder = builder.body(body.as_ref().clone());
        }
        builder
            .send()
            .map_err(|e| classify(&request.method, &request.url, e))
    }

    /// Lets `auth` answer a `401` once per request. `true`: send again.
    pub(crate) fn answer(
        &self,
        auth: &mut Option<&mut dyn Authorizer>,
        answered: &mut bool,
        request: &Request,
        response: &Response,
    ) -> Result<bool, FetchError> {
        let Some(auth) = auth.as_deref_mut() else {
            return Ok(false);
        };
        if *answered {
            return Ok(false);
        }
        *answered = true;
        let challenge = response
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok());
        auth.answer(self, &request.url, challenge)
            .map_err(FetchError::Auth)
    }
}
