//! Pulls against the in-process registry's faults: token auth, refused credentials, corrupt
//! blobs served or cached, 503s.

use std::path::Path;

use system::Arch;
use system::lock::Digest;

use super::tests::{assert_fixture_tree, offline, options};
use super::*;
use testkit::oci::{FakeRegistry, Faults, build_layout};

#[test]
fn anonymous_bearer_tokens_and_a_warm_cache() {
    let work = tempfile::tempdir().unwrap();
    let fixture = build_layout(&work.path().join("layout"), "v1", 1);
    let server = FakeRegistry::start(
        &fixture.dir,
        Faults {
            bearer: true,
            ..Faults::default()
        },
    );
    let base = fixture.base(&format!("{}/fixture:v1", server.host()));
    let cache = work.path().join("oci-cache");
    pull_base(&options(), &base, Arch::X86_64, &cache).unwrap();
    let first = server.take_requests();
    let by_digest = format!("GET /v2/fixture/manifests/{}", fixture.index);
    assert!(
        first[0] == by_digest && !first[0].ends_with("(auth)"),
        "the pinned index, by digest: {first:?}"
    );
    assert!(first[1].starts_with("GET /token?"), "{first:?}");
    assert!(
        first[2..].iter().all(|r| r.ends_with("(auth)")),
        "{first:?}"
    );
    assert!(first.iter().any(|r| r.contains("/blobs/")), "{first:?}");

    let again = pull_base(&options(), &base, Arch::X86_64, &cache).unwrap();
    assert_fixture_tree(&again.tree, Arch::X86_64);
    let second = server.take_requests();
    assert!(
        second.is_empty(),
        "a warm cache needs no request: {second:?}"
    );

    // `lock update-base` asks the registry where the tag points now.
    let resolved = resolve_base(&options(), &base, &cache).unwrap();
    assert_eq!(resolved, base);
    let third = server.take_requests();
    assert!(
        third.iter().any(|r| r.contains("/manifests/v1")),
        "{third:?}"
    );
}

#[test]
fn a_corrupt_blob_is_an_error_and_is_not_cached() {
    let work = tempfile::tempdir().unwrap();
    let fixture = build_layout(&work.path().join("layout"), "v1", 1);
    let bad = fixture.layers[&Arch::X86_64][1];
    let server = FakeRegistry::start(
        &fixture.dir,
        Faults {
            corrupt: vec![bad],
            ..Faults::default()
        },
    );
    let base = fixture.base(&format!("{}/fixture:v1", server.host()));
    let cache = work.path().join("oci-cache");
    let err = format!(
        "{:#}",
        pull_base(&options(), &base, Arch::X86_64, &cache).unwrap_err()
    );
    assert!(
        err.contains(&bad.to_string()) && err.contains("nothing was cached"),
        "{err}"
    );
    let blobs: Vec<String> = std::fs::read_dir(cache.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(!blobs.contains(&bad.0.hex()), "{blobs:?}");
    assert!(blobs.iter().all(|b| !b.starts_with('.')), "{blobs:?}");
}

#[test]
fn transient_failures_are_retried() {
    let work = tempfile::tempdir().unwrap();
    let fixture = build_layout(&work.path().join("layout"), "v1", 1);
    let server = FakeRegistry::start(
        &fixture.dir,
        Faults {
            unavailable: 2.into(),
            ..Faults::default()
        },
    );
    let base = fixture.base(&format!("{}/fixture:v1", server.host()));
    let pulled = pull_base(&options(), &base, Arch::Aarch64, &work.path().join("c")).unwrap();
    assert_fixture_tree(&pulled.tree, Arch::Aarch64);

    // Plain HTTP is for loopback (or allowed hosts) only: another host gets HTTPS, and a
    // refused connection is retried a bounded number of times, then named.
    let mut quick = options();
    quick.transfer.attempts = 2;
    let base = fixture.base("127.0.0.1:9/fixture:v1");
    let err = format!(
        "{:#}",
        pull_base(&quick, &base, Arch::X86_64, &work.path().join("d")).unwrap_err()
    );
    let url = format!("http://127.0.0.1:9/v2/fixture/manifests/{}", fixture.index);
    assert!(err.contains(&url) && err.contains("2 attempt"), "{err}");
}

#[test]
fn refused_credentials_are_named_with_host_and_user() {
    use auth::Credentials;
    use reference::ImageRef;
    let work = tempfile::tempdir().unwrap();
    let fixture = build_layout(&work.path().join("layout"), "v1", 1);
    let credentials = |password: &str| Credentials {
        user: "ci-bot".into(),
        password: password.into(),
        origin: "XTASK_REGISTRY_USER/XTASK_REGISTRY_PASSWORD".into(),
    };
    let right = credentials("right").basic_header();
    // Basic auth on the registry itself, and basic auth on its token service.
    for bearer in [false, true] {
        let server = FakeRegistry::start(
            &fixture.dir,
            Faults {
                bearer,
                basic: Some(right.clone()),
                ..Faults::default()
            },
        );
        let image = ImageRef::parse(&format!("{}/fixture:v1", server.host())).unwrap();
        let connect = |c: Option<Credentials>| {
            registry::Registry::with_credentials(&image, &options().transfer, &[], c).unwrap()
        };
        let err = format!(
            "{:#}",
            connect(Some(credentials("wrong")))
                .get_manifest("v1")
                .unwrap_err()
        );
        for needle in [
            "refused the credentials",
            "`ci-bot`",
            &server.host(),
            "XTASK_REGISTRY_USER/XTASK_REGISTRY_PASSWORD",
        ] {
            assert!(err.contains(needle), "bearer {bearer}: {needle}: {err}");
        }
        assert!(!err.contains("set XTASK_REGISTRY_USER"), "{err}");
        // Anonymous: the advice to set credentials stands.
        let err = format!("{:#}", connect(None).get_manifest("v1").unwrap_err());
        assert!(err.contains("set XTASK_REGISTRY_USER"), "{err}");
        connect(Some(credentials("right")))
            .get_manifest("v1")
            .unwrap();
    }
}

/// Overwrites a read-only cached blob in place, as a failing disk or a stray tool would.
fn damage(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = std::fs::read(path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    bytes.truncate(bytes.len() - 3);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_corrupt_cached_blob_is_fetched_again_or_named_offline() {
    let work = tempfile::tempdir().unwrap();
    let fixture = build_layout(&work.path().join("layout"), "v1", 1);
    let server = FakeRegistry::start(&fixture.dir, Faults::default());
    let base = fixture.base(&format!("{}/fixture:v1", server.host()));
    let cache = work.path().join("oci-cache");
    pull_base(&options(), &base, Arch::X86_64, &cache).unwrap();
    server.take_requests();

    let layer = fixture.layers[&Arch::X86_64][0];
    let manifest = fixture.manifests[&Arch::X86_64];
    let path_of = |d: &Digest| cache.join("blobs/sha256").join(d.0.hex());
    damage(&path_of(&layer));
    damage(&path_of(&manifest));

    // Offline: the corrupt files are named, with the way out.
    let offline = offline();
    let err = format!(
        "{:#}",
        pull_base(&offline, &base, Arch::X86_64, &cache).unwrap_err()
    );
    let shown = path_of(&manifest).display().to_string();
    assert!(
        err.contains(&shown) && err.contains("corrupt") && err.contains("without --offline"),
        "{err}"
    );

    // Online: fetched again, the build goes on.
    let pulled = pull_base(&options(), &base, Arch::X86_64, &cache).unwrap();
    assert_fixture_tree(&pulled.tree, Arch::X86_64);
    let requests = server.take_requests();
    for d in [layer, manifest] {
        assert!(
            requests.iter().any(|r| r.contains(&d.to_string())),
            "{d} fetched again: {requests:?}"
        );
    }
    let layout = cache::OciLayout::open(&cache).unwrap();
    for d in [layer, manifest] {
        assert_eq!(layout.check_blob(&d).unwrap(), cache::BlobState::Whole);
    }

    // Offline with only the layer corrupt: named too, instead of a tar or gzip error.
    damage(&path_of(&layer));
    let err = format!(
        "{:#}",
        pull_base(&offline, &base, Arch::X86_64, &cache).unwrap_err()
    );
    let shown = path_of(&layer).display().to_string();
    assert!(err.contains(&shown) && err.contains("corrupt"), "{err}");
}
