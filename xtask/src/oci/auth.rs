//! Registry authentication: `WWW-Authenticate` challenges and where credentials come from.
//!
//! Credentials, first match wins:
//! 1. `XTASK_REGISTRY_USER` and `XTASK_REGISTRY_PASSWORD`, for the registry being pulled from
//!    (and its token service); never sent anywhere else.
//! 2. `auths.<host>.auth` (base64 `user:password`) in `$DOCKER_CONFIG/config.json`, else
//!    `~/.docker/config.json`; Docker Hub's key may be `https://index.docker.io/v1/`.
//!
//! Without credentials, pulls are anonymous: a bearer token is requested from the realm the
//! registry names, which is how public images on Docker Hub are pulled. [`RegistryAuth`] is
//! the transport's [`Authorizer`] for one repository: it answers `401` challenges that way.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, anyhow, bail};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_PAD_INDIFFERENT};
use reqwest::Url;
use reqwest::header::AUTHORIZATION;

use super::plain_http::{allows_plain_http, url_host_port};
use crate::fetch::{Authorizer, Request, Transport};

pub const USER_ENV: &str = "XTASK_REGISTRY_USER";
pub const PASSWORD_ENV: &str = "XTASK_REGISTRY_PASSWORD";

/// A user name and password (or identity token) for basic auth and token requests.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
    /// Where they were found, for messages (`XTASK_REGISTRY_USER/XTASK_REGISTRY_PASSWORD`, or
    /// the config file and its `auths` key).
    pub origin: String,
}

impl Credentials {
    /// The `Authorization` value for HTTP basic auth.
    pub fn basic_header(&self) -> String {
        let pair = format!("{}:{}", self.user, self.password);
        format!("Basic {}", STANDARD.encode(pair))
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.user)
    }
}

/// Finds credentials for `registry` (as written in the reference, e.g. `docker.io`) served at
/// `api_host` (e.g. `registry-1.docker.io`).
pub fn credentials_for(registry: &str, api_host: &str) -> anyhow::Result<Option<Credentials>> {
    let user = std::env::var(USER_ENV).ok().filter(|s| !s.is_empty());
    let password = std::env::var(PASSWORD_ENV).ok();
    match (user, password) {
        (Some(user), Some(password)) => {
            return Ok(Some(Credentials {
                user,
                password,
                origin: format!("{USER_ENV}/{PASSWORD_ENV}"),
            }));
        }
        (Some(_), None) => {
            bail!("{USER_ENV} is set but {PASSWORD_ENV} is not; set both or neither")
        }
        _ => {}
    }
    let Some(path) = docker_config_path() else {
        return Ok(None);
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut found = from_docker_config(&text, registry, api_host)
        .with_context(|| format!("reading registry credentials from {}", path.display()))?;
    if let Some(c) = &mut found {
        c.origin = format!("{} in {}", c.origin, path.display());
    }
    Ok(found)
}

fn docker_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".docker/config.json"))
}

/// The `auths` entry of a Docker `config.json` for this registry, if any.
pub fn from_docker_config(
    text: &str,
    registry: &str,
    api_host: &str,
) -> anyhow::Result<Option<Credentials>> {
    #[derive(serde::Deserialize)]
    struct Config {
        #[serde(default)]
        auths: BTreeMap<String, Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        auth: Option<String>,
    }
    let config: Config = serde_json::from_str(text).context("not a Docker config.json")?;
    let mut wanted = vec![registry, api_host];
    if registry == "docker.io" {
        wanted.extend(["index.docker.io", "registry-1.docker.io"]);
    }
    for (key, entry) in &config.auths {
        // Keys are hosts, sometimes written as URLs (`https://index.docker.io/v1/`).
        let host = key
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or_default();
        if !wanted.contains(&host) {
            continue;
        }
        let Some(auth) = &entry.auth else { continue };
        let decoded = STANDARD_PAD_INDIFFERENT
            .decode(auth.trim())
            .with_context(|| format!("auths.{key:?}.auth is not base64"))?;
        let decoded = String::from_utf8(decoded)
            .with_context(|| format!("auths.{key:?}.auth is not UTF-8"))?;
        let Some((user, password)) = decoded.split_once(':') else {
            bail!("auths.{key:?}.auth does not decode to `user:password`");
        };
        return Ok(Some(Credentials {
            user: user.to_owned(),
            password: password.to_owned(),
            origin: format!("auths.{key:?}"),
        }));
    }
    Ok(None)
}

/// A parsed `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// `bearer` or `basic`, lowercased.
    pub scheme: String,
    /// Parameter names lowercased (`realm`, `service`, `scope`).
    pub params: BTreeMap<String, String>,
}

impl Challenge {
    /// Parses `Bearer realm="https://auth.example/token",service="x",scope="repository:a:pull"`.
    /// Quoted values may contain commas and escaped quotes.
    pub fn parse(header: &str) -> anyhow::Result<Challenge> {
        let header = header.trim();
        let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
        if scheme.is_empty() {
            bail!("empty WWW-Authenticate header");
        }
        let mut params = BTreeMap::new();
        let mut chars = rest.chars().peekable();
        loop {
            while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
                chars.next();
            }
            if chars.peek().is_none() {
                break;
            }
            let mut name = String::new();
            while let Some(&c) = chars.peek() {
                if c == '=' {
                    break;
                }
                name.push(c);
                chars.next();
            }
            if chars.next() != Some('=') {
                bail!("malformed WWW-Authenticate header `{header}`: `{name}` has no value");
            }
            let mut value = String::new();
            if chars.peek() == Some(&'"') {
                chars.next();
                loop {
                    match chars.next() {
                        Some('\\') => value.extend(chars.next()),
                        Some('"') => break,
                        Some(c) => value.push(c),
                        None => bail!(
                            "malformed WWW-Authenticate header `{header}`: unterminated quote"
                        ),
                    }
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ',' {
                        break;
                    }
                    value.push(c);
                    chars.next();
                }
            }
            params.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
        }
        Ok(Challenge {
            scheme: scheme.to_ascii_lowercase(),
            params,
        })
    }
}

/// Credentials for one repository, and the `Authorization` header once a challenge has been
/// answered (basic, or a bearer token from the realm the challenge names).
pub struct RegistryAuth {
    /// The registry's `host[:port]`, for messages.
    pub host: String,
    pub repository: String,
    pub credentials: Option<Credentials>,
    /// Hosts besides loopback a token realm may be reached at over plain HTTP.
    pub plain_http_hosts: Vec<String>,
    authorization: Option<String>,
}

impl RegistryAuth {
    pub fn new(
        host: String,
        repository: String,
        credentials: Option<Credentials>,
        plain_http_hosts: Vec<String>,
    ) -> RegistryAuth {
        RegistryAuth {
            host,
            repository,
            credentials,
            plain_http_hosts,
            authorization: None,
        }
    }

    fn fetch_token(
        &self,
        transport: &Transport,
        challenge: &Challenge,
        url: &str,
    ) -> anyhow::Result<String> {
        let realm = challenge
            .params
            .get("realm")
            .ok_or_else(|| anyhow!("the bearer challenge of {url} names no realm"))?;
        let mut token_url =
            Url::parse(realm).with_context(|| format!("token realm `{realm}` is not a URL"))?;
        match token_url.scheme() {
            "https" => {}
            "http" if allows_plain_http(&url_host_port(&token_url), &self.plain_http_hosts) => {}
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
        let mut request = Request::get(token_url.as_str());
        if let Some(c) = &self.credentials {
            request = request.header(AUTHORIZATION, &c.basic_header());
        }
        let response = transport
            .send(&request, None)
            .with_context(|| format!("requesting a token from {token_url}"))?;
        let status = response.status();
        if !status.is_success() {
            if let Some(refused) = self.refusal(status) {
                bail!("the token service {token_url} answered HTTP {status}: {refused}");
            }
            bail!(
                "the token service {token_url} answered HTTP {status}; for a private image set \
                 {USER_ENV} and {PASSWORD_ENV} (or `docker login {}`)",
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
}

impl RegistryAuth {
    /// When credentials were sent and the answer is `401`/`403`: that the registry refused
    /// them, for which host and user, and where they came from. `None` for anonymous pulls.
    pub fn refusal(&self, status: reqwest::StatusCode) -> Option<String> {
        let c = self.credentials.as_ref()?;
        if status != reqwest::StatusCode::UNAUTHORIZED && status != reqwest::StatusCode::FORBIDDEN {
            return None;
        }
        Some(format!(
            "{} refused the credentials of user `{}` (from {}) for repository `{}`: the password \
             or token is wrong, or the user may not pull it; correct them (or `docker login {}`)",
            self.host, c.user, c.origin, self.repository, self.host
        ))
    }
}

impl Authorizer for RegistryAuth {
    fn authorization(&self) -> Option<String> {
        self.authorization.clone()
    }

    fn answer(
        &mut self,
        transport: &Transport,
        url: &str,
        challenge: Option<&str>,
    ) -> anyhow::Result<bool> {
        let Some(challenge) = challenge else {
            return Ok(false);
        };
        let challenge = Challenge::parse(challenge)
            .with_context(|| format!("answering the challenge of {url}"))?;
        self.authorization = Some(match challenge.scheme.as_str() {
            "basic" => match &self.credentials {
                Some(c) => c.basic_header(),
                None => bail!(
                    "{url} requires credentials (HTTP basic); set {USER_ENV} and {PASSWORD_ENV}, \
                     or log in with `docker login {}`",
                    self.host
                ),
            },
            "bearer" => format!("Bearer {}", self.fetch_token(transport, &challenge, url)?),
            other => bail!("{url} asks for unsupported authentication scheme `{other}`"),
        });
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_hub_challenges() {
        let c = Challenge::parse(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull,push""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params["realm"], "https://auth.docker.io/token");
        assert_eq!(c.params["service"], "registry.docker.io");
        assert_eq!(c.params["scope"], "repository:library/alpine:pull,push");
        let c = Challenge::parse(r#"Basic realm="Registry Realm""#).unwrap();
        assert_eq!(c.scheme, "basic");
        assert_eq!(c.params["realm"], "Registry Realm");
        let c = Challenge::parse(r#"Bearer realm=http://x/t, service="a\"b""#).unwrap();
        assert_eq!(c.params["realm"], "http://x/t");
        assert_eq!(c.params["service"], "a\"b");
        assert!(Challenge::parse(r#"Bearer realm="open"#).is_err());
    }

    #[test]
    fn reads_docker_config_auths() {
        // "user:p:ss" in base64.
        let config = r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dXNlcjpwOnNz"},
                         "other.example":{"auth":"b3RoZXI6eA=="}}}"#;
        let c = from_docker_config(config, "docker.io", "registry-1.docker.io")
            .unwrap()
            .unwrap();
        assert_eq!((c.user.as_str(), c.password.as_str()), ("user", "p:ss"));
        let c = from_docker_config(config, "other.example", "other.example")
            .unwrap()
            .unwrap();
        assert_eq!((c.user.as_str(), c.password.as_str()), ("other", "x"));
        assert!(
            from_docker_config(config, "127.0.0.1:5000", "127.0.0.1:5000")
                .unwrap()
                .is_none()
        );
        assert!(from_docker_config(r#"{"auths":{"h":{"auth":"!!"}}}"#, "h", "h").is_err());
    }

    #[test]
    fn basic_headers_encode_user_and_password() {
        let c = |user: &str, password: &str| Credentials {
            user: user.into(),
            password: password.into(),
            origin: "test".into(),
        };
        assert_eq!(c("user", "p:ss").basic_header(), "Basic dXNlcjpwOnNz");
        assert_eq!(c("other", "x").basic_header(), "Basic b3RoZXI6eA==");
        assert_eq!(c("a", "").basic_header(), "Basic YTo=");
    }
}
