//! Which hosts may be reached over plain HTTP: loopback (`localhost`, `127.0.0.0/8`, `::1`) and
//! hosts the user allows (`XTASK_REGISTRY_PLAIN_HTTP`, a comma separated list). The same rule
//! applies to registries, token realms and redirects, so credentials never travel in the clear
//! to a host nobody allowed.

use std::net::IpAddr;

use reqwest::Url;
use reqwest::redirect::Policy;

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

/// `host:port` of a URL (IPv6 hosts bracketed, as [`allows_plain_http`] expects).
pub fn url_host_port(url: &Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    }
}

/// Follows redirects (blob storage usually lives elsewhere), but never downgrades to plain HTTP
/// on a host that was not allowed. reqwest drops `Authorization` across hosts.
pub fn redirect_policy(allowed: Vec<String>) -> Policy {
    Policy::custom(move |attempt| {
        let url = attempt.url();
        if url.scheme() == "http" && !allows_plain_http(&url_host_port(url), &allowed) {
            let to = url.to_string();
            return attempt.error(format!(
                "refusing a redirect to plain HTTP ({to}); allow the host with --plain-http if \
                 that is intended"
            ));
        }
        if attempt.previous().len() >= 10 {
            return attempt.error("more than 10 redirects");
        }
        attempt.follow()
    })
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
}
