//! FakeRegistry: a tiny registry on the test HTTP server, serving one OCI layout with the
//! faults a test asks for (token auth, required credentials, corrupt blobs, 503s).

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use system::lock::Digest;

use super::{REF_NAME, media_type_of};
use crate::http::{Reply, Request, Server};

/// Knobs for the in-process registry.
#[derive(Default)]
pub struct Faults {
    /// Require `Authorization: Bearer <token>` obtained from `/token`.
    pub bearer: bool,
    /// Serve these blobs with one byte flipped.
    pub corrupt: Vec<Digest>,
    /// Answer this many requests with 503 first.
    pub unavailable: AtomicUsize,
    /// Require credentials: this exact `Authorization: Basic …` value, on `/token` with
    /// `bearer`, else on every registry request.
    pub basic: Option<String>,
}

/// A tiny registry serving one OCI layout over plain HTTP on 127.0.0.1 (on [`Server`]), with
/// the faults [`Faults`] asks for.
pub struct FakeRegistry {
    server: Server,
    /// Requests already handed out by [`FakeRegistry::take_requests`].
    taken: AtomicUsize,
}

const TOKEN: &str = "secret-token";

impl FakeRegistry {
    pub fn start(layout: &Path, faults: Faults) -> FakeRegistry {
        let layout = layout.to_owned();
        let server = Server::start(move |_, request| {
            let (status, headers, body) = respond(request, &layout, &faults);
            Reply::Full {
                code: status,
                headers: headers
                    .into_iter()
                    .map(|(name, value)| (name.to_owned(), value))
                    .collect(),
                body,
            }
        })
        .expect("starting the fake registry");
        FakeRegistry {
            server,
            taken: AtomicUsize::new(0),
        }
    }

    pub fn host(&self) -> String {
        self.server.url("").trim_start_matches("http://").to_owned()
    }

    /// The requests since the last call, as `METHOD TARGET`, with ` (auth)` when authorized.
    pub fn take_requests(&self) -> Vec<String> {
        let all = self.server.requests();
        let from = self.taken.swap(all.len(), Ordering::SeqCst);
        all[from.min(all.len())..]
            .iter()
            .map(|r| {
                let auth = if r.header("authorization").is_some() {
                    " (auth)"
                } else {
                    ""
                };
                format!("{} {}{auth}", r.method, r.path)
            })
            .collect()
    }
}

type Answer = (u16, Vec<(&'static str, String)>, Vec<u8>);

fn respond(request: &Request, layout: &Path, faults: &Faults) -> Answer {
    let target = request.path.as_str();
    let authorization = request.header("authorization");
    let host = request.header("host").unwrap_or_default();
    let not_found = (404, vec![], b"{}".to_vec());
    if faults
        .unavailable
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return (503, vec![], Vec::new());
    }
    let refused = |realm: &str| {
        let challenge = format!(r#"Basic realm="{realm}""#);
        let body = br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#;
        (401, vec![("WWW-Authenticate", challenge)], body.to_vec())
    };
    if let Some(query) = target.strip_prefix("/token?") {
        if let Some(basic) = &faults.basic
            && authorization != Some(basic.as_str())
        {
            return refused("token");
        }
        assert!(query.contains("service=fake"), "token query {query}");
        assert!(
            query.contains("scope=repository%3Afixture%3Apull"),
            "token query {query}"
        );
        let body = format!(r#"{{"token":"{TOKEN}"}}"#).into_bytes();
        return (200, vec![("Content-Type", "application/json".into())], body);
    }
    if faults.bearer && authorization != Some(&format!("Bearer {TOKEN}")) {
        let challenge = format!(
            r#"Bearer realm="http://{host}/token",service="fake",scope="repository:fixture:pull""#
        );
        return (401, vec![("WWW-Authenticate", challenge)], Vec::new());
    }
    if !faults.bearer
        && let Some(basic) = &faults.basic
        && authorization != Some(basic.as_str())
    {
        return refused("fake");
    }
    let Some(rest) = target.strip_prefix("/v2/fixture/") else {
        return not_found;
    };
    let blob_of = |digest: &str| -> Option<(Digest, Vec<u8>)> {
        let d: Digest = digest.parse().ok()?;
        std::fs::read(layout.join("blobs/sha256").join(d.0.hex()))
            .ok()
            .map(|b| (d, b))
    };
    if let Some(reference) = rest.strip_prefix("manifests/") {
        let digest = if reference.starts_with("sha256:") {
            reference.to_owned()
        } else {
            let index: serde_json::Value =
                serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
            let found = index["manifests"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["annotations"][REF_NAME] == reference);
            match found {
                Some(m) => m["digest"].as_str().unwrap().to_owned(),
                None => return not_found,
            }
        };
        let Some((d, bytes)) = blob_of(&digest) else {
            return not_found;
        };
        let media_type = media_type_of(&bytes).unwrap_or_default();
        return (
            200,
            vec![
                ("Content-Type", media_type),
                ("Docker-Content-Digest", d.to_string()),
            ],
            bytes,
        );
    }
    if let Some(digest) = rest.strip_prefix("blobs/") {
        let Some((d, mut bytes)) = blob_of(digest) else {
            return not_found;
        };
        if faults.corrupt.contains(&d)
            && let Some(b) = bytes.last_mut()
        {
            *b ^= 0xff;
        }
        return (
            200,
            vec![("Content-Type", "application/octet-stream".into())],
            bytes,
        );
    }
    not_found
}
