//! Test helpers: fixture images written as OCI layouts, Debian's `docker-registry` as a child
//! process, and a small in-process registry for faults (token auth, corrupt bytes, 503s).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use system::Arch;
use system::hash::sha256_bytes;
use system::lock::{Base, Digest, UniqueMap};

mod fake_registry;
pub use fake_registry::{FakeRegistry, Faults};

/// The annotation an OCI layout's index names its images by.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// The `mediaType` a manifest or index declares.
pub fn media_type_of(bytes: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    Some(value.get("mediaType")?.as_str()?.to_owned())
}

/// The linux image manifests of an index by architecture (attestations have no linux platform).
fn manifests_by_arch(index: &[u8]) -> BTreeMap<Arch, Digest> {
    let index: serde_json::Value = serde_json::from_slice(index).expect("an index is JSON");
    let mut found = BTreeMap::new();
    for m in index["manifests"]
        .as_array()
        .expect("an index lists manifests")
    {
        let platform = &m["platform"];
        if platform["os"] != "linux" {
            continue;
        }
        let arch = match platform["architecture"].as_str() {
            Some("amd64") => Arch::X86_64,
            Some("arm64") => Arch::Aarch64,
            _ => continue,
        };
        let digest = m["digest"].as_str().expect("a descriptor has a digest");
        found.insert(arch, digest.parse().expect("a valid digest"));
    }
    found
}

/// Fails with the install command when a tool the tests need is missing (never skips).
pub fn require_tool(path: &str, package: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} is missing: this test needs Debian's `{package}` \
         (`apt-get install -y {package}`; `cargo xtask test` installs it)"
    );
}

/// One tar entry with raw name/link bytes.
pub struct Entry {
    pub name: &'static str,
    pub kind: tar::EntryType,
    pub data: Vec<u8>,
    pub link: &'static str,
    pub mode: u32,
    pub owner: (u64, u64),
    pub dev: (u32, u32),
}

pub fn entry(name: &'static str, kind: tar::EntryType, mode: u32) -> Entry {
    Entry {
        name,
        kind,
        data: Vec::new(),
        link: "",
        mode,
        owner: (0, 0),
        dev: (0, 0),
    }
}

pub fn tar_of(entries: &[Entry]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for e in entries {
        let mut header = tar::Header::new_gnu();
        {
            let gnu = header.as_gnu_mut().expect("a GNU header");
            gnu.name[..e.name.len()].copy_from_slice(e.name.as_bytes());
            gnu.linkname[..e.link.len()].copy_from_slice(e.link.as_bytes());
        }
        header.set_entry_type(e.kind);
        header.set_mode(e.mode);
        header.set_uid(e.owner.0);
        header.set_gid(e.owner.1);
        header.set_mtime(1_700_000_000);
        header.set_size(e.data.len() as u64);
        if matches!(e.kind, tar::EntryType::Char | tar::EntryType::Block) {
            header.set_device_major(e.dev.0).unwrap();
            header.set_device_minor(e.dev.1).unwrap();
        }
        header.set_cksum();
        builder.append(&header, e.data.as_slice()).unwrap();
    }
    builder.into_inner().unwrap()
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::GzBuilder::new().write(Vec::new(), flate2::Compression::default());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

/// The layers of the fixture image for `arch`; `generation` changes content (a "new release").
fn fixture_layers(arch: Arch, generation: u8) -> Vec<(&'static str, Vec<u8>)> {
    use tar::EntryType as T;
    let file = |name: &'static str, mode: u32, data: &[u8]| Entry {
        data: data.to_vec(),
        ..entry(name, T::Regular, mode)
    };
    let link = |name: &'static str, kind: T, target: &'static str| Entry {
        link: target,
        ..entry(name, kind, if kind == T::Symlink { 0o777 } else { 0o755 })
    };
    let dev = |name: &'static str, kind: T, mode: u32, major: u32, minor: u32| Entry {
        dev: (major, minor),
        ..entry(name, kind, mode)
    };
    let base = vec![
        entry("bin/", T::Directory, 0o755),
        file(
            "bin/busybox",
            0o755,
            format!("busybox for {arch}").as_bytes(),
        ),
        link("bin/sh", T::Symlink, "busybox"),
        link("bin/ls", T::Link, "bin/busybox"),
        file("bin/su", 0o4755, b"su"),
        entry("etc/", T::Directory, 0o755),
        file("etc/passwd", 0o644, b"root:x:0:0::/root:/bin/sh\n"),
        file("etc/arch", 0o644, arch.oci_arch().as_bytes()),
        entry("tmp/", T::Directory, 0o1777),
        entry("dev/", T::Directory, 0o755),
        dev("dev/null", T::Char, 0o666, 1, 3),
        dev("dev/console", T::Char, 0o600, 5, 1),
        dev("dev/loop0", T::Block, 0o660, 7, 0),
        entry("run/", T::Directory, 0o755),
        entry("run/initctl", T::Fifo, 0o600),
        entry("usr/", T::Directory, 0o755),
        entry("usr/bin/", T::Directory, 0o755),
        link("usr/bin/env", T::Symlink, "/bin/busybox"),
        entry("usr/lib/", T::Directory, 0o755),
        entry("usr/lib/old/", T::Directory, 0o755),
        file("usr/lib/old/a", 0o644, b"old"),
        entry("var/", T::Directory, 0o755),
        entry("var/cache/", T::Directory, 0o755),
        entry("var/cache/apk/", T::Directory, 0o755),
        file("var/cache/apk/index", 0o644, b"index"),
        entry("home/", T::Directory, 0o755),
        Entry {
            owner: (1000, 1000),
            ..entry("home/user/", T::Directory, 0o2750)
        },
        Entry {
            owner: (1000, 1000),
            ..file("home/user/.profile", 0o600, b"export PS1='$ '\n")
        },
    ];
    let changes = vec![
        entry("var/cache/", T::Directory, 0o755),
        file("var/cache/.wh.apk", 0o644, b""),
        entry("usr/lib/", T::Directory, 0o755),
        file("usr/lib/.wh..wh..opq", 0o644, b""),
        entry("usr/lib/new/", T::Directory, 0o755),
        file("usr/lib/new/b", 0o644, b"new"),
        file("etc/passwd", 0o644, b"root:x:0:0::/root:/bin/ash\n"),
        file(
            "etc/motd",
            0o644,
            format!("release {generation}\n").as_bytes(),
        ),
        link("etc/motd2", T::Link, "etc/motd"),
    ];
    // Uncompressed: busybox goes; its hard link `bin/ls` keeps the content.
    let last = vec![
        entry("bin/", T::Directory, 0o755),
        file("bin/.wh.busybox", 0o644, b""),
        link("bin/busybox", T::Symlink, "ls"),
    ];
    vec![
        (
            "application/vnd.oci.image.layer.v1.tar+gzip",
            gzip(&tar_of(&base)),
        ),
        (
            "application/vnd.oci.image.layer.v1.tar+gzip",
            gzip(&tar_of(&changes)),
        ),
        ("application/vnd.oci.image.layer.v1.tar", tar_of(&last)),
    ]
}

/// A fixture image written as an OCI layout.
pub struct Fixture {
    pub dir: PathBuf,
    pub index: Digest,
    pub manifests: BTreeMap<Arch, Digest>,
    pub layers: BTreeMap<Arch, Vec<Digest>>,
}

impl Fixture {
    /// The lock entry that pins exactly this image under `reference`.
    pub fn base(&self, reference: &str) -> Base {
        Base {
            reference: reference.to_owned(),
            index: self.index,
            manifests: UniqueMap(self.manifests.clone()),
        }
    }
}

fn put_blob(dir: &Path, bytes: &[u8]) -> Digest {
    let digest = Digest(sha256_bytes(bytes));
    let path = dir.join("blobs/sha256").join(digest.0.hex());
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
    digest
}

/// Writes a multi-arch image (amd64 and arm64, plus an attestation entry) as an OCI layout in
/// `dir`, tagged `tag`.
pub fn build_layout(dir: &Path, tag: &str, generation: u8) -> Fixture {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let mut descriptors = Vec::new();
    let mut manifests = BTreeMap::new();
    let mut all_layers = BTreeMap::new();
    for arch in [Arch::X86_64, Arch::Aarch64] {
        let layers = fixture_layers(arch, generation);
        let mut layer_descriptors = Vec::new();
        let mut diff_ids = Vec::new();
        let mut digests = Vec::new();
        for (media_type, blob) in &layers {
            let digest = put_blob(dir, blob);
            digests.push(digest);
            let tar = if media_type.ends_with("gzip") {
                let mut out = Vec::new();
                flate2::read::GzDecoder::new(blob.as_slice())
                    .read_to_end(&mut out)
                    .unwrap();
                out
            } else {
                blob.clone()
            };
            diff_ids.push(Digest(sha256_bytes(&tar)).to_string());
            layer_descriptors.push(json!({
                "mediaType": media_type, "digest": digest.to_string(), "size": blob.len(),
            }));
        }
        let config = serde_json::to_vec(&json!({
            "architecture": arch.oci_arch(),
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .unwrap();
        let config_digest = put_blob(dir, &config);
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest.to_string(), "size": config.len(),
            },
            "layers": layer_descriptors,
        }))
        .unwrap();
        let digest = put_blob(dir, &manifest);
        let mut platform = json!({"os": "linux", "architecture": arch.oci_arch()});
        if arch == Arch::Aarch64 {
            platform["variant"] = json!("v8");
        }
        descriptors.push(json!({
            "mediaType": OCI_MANIFEST, "digest": digest.to_string(),
            "size": manifest.len(), "platform": platform,
        }));
        manifests.insert(arch, digest);
        all_layers.insert(arch, digests);
    }
    // An attestation manifest, as BuildKit adds: platform unknown/unknown, skipped on pull.
    let statement = put_blob(dir, br#"{"_type":"https://in-toto.io/Statement/v0.1"}"#);
    let empty = put_blob(dir, b"{}");
    let attestation = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": empty.to_string(), "size": 2},
        "layers": [{"mediaType": "application/vnd.in-toto+json",
                    "digest": statement.to_string(), "size": 44}],
    }))
    .unwrap();
    let att_digest = put_blob(dir, &attestation);
    descriptors.push(json!({
        "mediaType": OCI_MANIFEST, "digest": att_digest.to_string(),
        "size": attestation.len(),
        "platform": {"os": "unknown", "architecture": "unknown"},
        "annotations": {
            "vnd.docker.reference.type": "attestation-manifest",
            "vnd.docker.reference.digest": manifests[&Arch::X86_64].to_string(),
        },
    }));
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors,
    }))
    .unwrap();
    let index_digest = put_blob(dir, &index);
    let layout_index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": OCI_INDEX, "digest": index_digest.to_string(),
            "size": index.len(), "annotations": {REF_NAME: tag},
        }],
    });
    std::fs::write(dir.join("index.json"), layout_index.to_string()).unwrap();
    Fixture {
        dir: dir.to_owned(),
        index: index_digest,
        manifests,
        layers: all_layers,
    }
}

/// Drops the attestation entry from a fixture layout's index (Docker's v2s2 format cannot carry
/// one, so `skopeo copy --all --format v2s2` refuses it); returns the new index digest.
pub fn strip_attestations(fixture: &mut Fixture) -> Digest {
    let dir = &fixture.dir;
    let old = std::fs::read(dir.join("blobs/sha256").join(fixture.index.0.hex())).unwrap();
    let mut index: serde_json::Value = serde_json::from_slice(&old).unwrap();
    index["manifests"]
        .as_array_mut()
        .unwrap()
        .retain(|m| m["platform"]["os"] == "linux");
    let bytes = serde_json::to_vec(&index).unwrap();
    let digest = put_blob(dir, &bytes);
    let mut layout: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    layout["manifests"][0]["digest"] = json!(digest.to_string());
    layout["manifests"][0]["size"] = json!(bytes.len());
    std::fs::write(dir.join("index.json"), layout.to_string()).unwrap();
    fixture.index = digest;
    digest
}

/// A free port on 127.0.0.1 (racy in theory; the registry fails loudly if it is taken).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Debian's `docker-registry`, listening on 127.0.0.1, killed on drop.
pub struct DockerRegistry {
    child: Child,
    pub port: u16,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl DockerRegistry {
    pub fn start() -> DockerRegistry {
        require_tool("/usr/bin/docker-registry", "docker-registry");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = dir.path().join("registry.log");
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdout(std::fs::File::create(dir.path().join("stdout.log")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting docker-registry");
        let registry = DockerRegistry {
            child,
            port,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n");
                let mut answer = String::new();
                let _ = s.read_to_string(&mut answer);
                if answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200") {
                    return registry;
                }
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not come up on 127.0.0.1:{port}; its log:\n{}",
                std::fs::read_to_string(&registry.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Pushes every image of an OCI layout tag with skopeo, and returns the pins of what the
    /// registry now serves (skopeo re-encodes the index, so its digest differs from the
    /// layout's).
    pub fn push(&self, layout: &Path, tag: &str, repo_tag: &str) -> Base {
        self.push_with(layout, tag, repo_tag, &["--all"])
    }

    /// [`DockerRegistry::push`] with other `skopeo copy` arguments instead of `--all`, e.g.
    /// `["--format", "v2s2", "--override-arch", "arm64"]` for a single-platform Docker v2s2
    /// image.
    pub fn push_with(&self, layout: &Path, tag: &str, repo_tag: &str, args: &[&str]) -> Base {
        require_tool("/usr/bin/skopeo", "skopeo");
        let out = Command::new("/usr/bin/skopeo")
            .args([
                "--insecure-policy",
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
            ])
            .args(args)
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{repo_tag}", self.host()))
            .stdin(Stdio::null())
            .output()
            .expect("running skopeo");
        assert!(
            out.status.success(),
            "skopeo copy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let reference = format!("{}/{repo_tag}", self.host());
        let raw = skopeo_inspect(&reference, true);
        let index = Digest(sha256_bytes(&raw));
        let top: serde_json::Value = serde_json::from_slice(&raw).expect("a manifest is JSON");
        let manifests = if top["manifests"].is_array() {
            manifests_by_arch(&raw)
        } else {
            // A single-platform image: the top is the architecture's manifest.
            let config: serde_json::Value =
                serde_json::from_slice(&skopeo_inspect(&reference, false)).unwrap();
            let arch = match config["Architecture"].as_str() {
                Some("amd64") => Arch::X86_64,
                Some("arm64") => Arch::Aarch64,
                other => panic!("{reference} is for {other:?}"),
            };
            [(arch, index)].into()
        };
        Base {
            reference,
            index,
            manifests: UniqueMap(manifests),
        }
    }

    /// Requests for blobs the registry has logged so far.
    pub fn blob_requests(&self) -> usize {
        let stdout = self.log.with_file_name("stdout.log");
        let logs = std::fs::read_to_string(&self.log).unwrap_or_default()
            + &std::fs::read_to_string(stdout).unwrap_or_default();
        logs.lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/"))
            .count()
    }
}

impl Drop for DockerRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `skopeo inspect [--raw] docker://REFERENCE` (plain HTTP) output.
fn skopeo_inspect(reference: &str, raw: bool) -> Vec<u8> {
    let out = Command::new("/usr/bin/skopeo")
        .args(["--insecure-policy", "inspect", "--tls-verify=false"])
        .args(raw.then_some("--raw"))
        .arg(format!("docker://{reference}"))
        .output()
        .expect("running skopeo");
    assert!(
        out.status.success(),
        "skopeo inspect: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}
