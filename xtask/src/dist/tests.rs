//! dist: packing, determinism, verify's refusals, and installing back into a store.

use std::collections::BTreeMap;
use std::process::Command;

use system::lock::{Defaults, Initrd, InitrdOutput, KernelFile, SCHEMA};
use system::{Check, Digest, Store};

use super::*;
use crate::store::StoreWriter;

const KERNEL: &str = "k-1";
const INITRD: &str = "i-1";

fn v(name: &str) -> Version {
    Version::new(name).unwrap()
}

fn bytes(what: &str, arch: Arch) -> Vec<u8> {
    let seed = what
        .bytes()
        .fold(arch as u64, |h, b| h.wrapping_mul(131) ^ u64::from(b));
    testkit::noise::Noise::new(0x9e37_79b9_7f4a_7c15 ^ seed).bytes(50_000)
}

/// A data dir whose store holds kernel `k-1` and initrd `i-1` for both arches, and the lock
/// (written beside it) that records them.
struct Fixture {
    dir: tempfile::TempDir,
    lock: Lock,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let store = StoreWriter::open(&data).unwrap();
        let mut kernels = UniqueMap::default();
        let mut files = UniqueMap::default();
        let mut outputs = UniqueMap::default();
        for arch in Arch::ALL {
            let k = bytes("kernel", arch);
            let (sha, size, _) = store.put_bytes(&k).unwrap();
            store
                .link(&store.layout().kernel_link(KERNEL, arch), &sha)
                .unwrap();
            files.insert(
                arch,
                KernelFile {
                    url: format!("https://example.invalid/{arch}"),
                    sha256: sha,
                    size: Some(size),
                },
            );
            let i = bytes("initrd", arch);
            let (sha, size, _) = store.put_bytes(&i).unwrap();
            store
                .link(&store.layout().initrd_link(INITRD, arch), &sha)
                .unwrap();
            let mut inputs = BTreeMap::new();
            inputs.insert("recipe".to_owned(), Digest(sha));
            outputs.insert(
                arch,
                InitrdOutput {
                    inputs,
                    sha256: sha,
                    size,
                },
            );
        }
        kernels.insert(v(KERNEL), files);
        let mut initrds = UniqueMap::default();
        initrds.insert(
            v(INITRD),
            Initrd {
                base: None,
                modules: vec![],
                module_groups: Default::default(),
                compression: Default::default(),
                agent: false,
                outputs,
            },
        );
        let lock = Lock {
            schema: SCHEMA,
            defaults: Defaults {
                kernel: v(KERNEL),
                initrd: v(INITRD),
            },
            kernels,
            bases: UniqueMap::default(),
            initrds,
        };
        crate::lock::write(&dir.path().join("artifacts.lock"), &lock).unwrap();
        Fixture { dir, lock }
    }

    fn options(&self, out: &str) -> Options {
        Options {
            lock: self.dir.path().join("artifacts.lock"),
            data_dir: self.dir.path().join("data"),
            out: self.dir.path().join(out),
            kernels: vec![],
            initrds: vec![],
            arches: vec![],
            mtime: 0,
        }
    }

    fn tarball(&self, out: &str, arch: Arch) -> PathBuf {
        self.dir
            .path()
            .join(out)
            .join(format!("system-{KERNEL}-{INITRD}-{arch}.tar.gz"))
    }
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_tarball_installed_with_plain_tar_resolves_through_system() {
    let fx = Fixture::new();
    let written = run(&fx.options("out")).unwrap();
    let names: Vec<_> = written
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        names,
        [
            "system-k-1-i-1-aarch64.tar.gz",
            "system-k-1-i-1-x86_64.tar.gz",
            "dist.json",
            "SHA256SUMS"
        ]
    );
    run_ok(
        Command::new("sha256sum")
            .args(["-c", "--strict", SHA256SUMS])
            .current_dir(fx.dir.path().join("out")),
    );

    for arch in Arch::ALL {
        let host = tempfile::tempdir().unwrap();
        run_ok(
            Command::new("tar")
                .arg("-C")
                .arg(host.path())
                .arg("-xzf")
                .arg(fx.tarball("out", arch)),
        );
        let lock = crate::lock::read(&Layout::new(host.path()).lock_file()).unwrap();
        assert_eq!(
            lock,
            reduce(&fx.lock, &[v(KERNEL)], &[v(INITRD)], arch).unwrap()
        );
        let store = Store::with_lock(host.path(), lock);
        assert_eq!(store.verify_all(Check::Full).unwrap().len(), 2);
        let kernel = store
            .kernel_path(&KernelVersion::new(KERNEL), arch)
            .unwrap();
        assert_eq!(fs::read(kernel).unwrap(), bytes("kernel", arch));
        let initrd = store
            .initrd_path(&InitrdVersion::new(INITRD), arch)
            .unwrap();
        assert_eq!(fs::read(initrd).unwrap(), bytes("initrd", arch));
        let summary = verify::verify(&fx.tarball("out", arch)).unwrap();
        assert_eq!(summary.artifacts.len(), 2);
    }

    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(fx.dir.path().join("out/dist.json")).unwrap()).unwrap();
    let x86 = &manifest["tarballs"][1];
    assert_eq!(x86["arch"], "x86_64");
    assert_eq!(x86["kernels"][0]["version"], KERNEL);
    assert_eq!(x86["kernels"][0]["size"], 50_000);
    assert_eq!(
        x86["initrds"][0]["sha256"],
        system::hash::sha256_bytes(&bytes("initrd", Arch::X86_64)).hex()
    );
    let lock_text = fs::read(fx.dir.path().join("artifacts.lock")).unwrap();
    assert_eq!(
        manifest["lock_sha256"],
        system::hash::sha256_bytes(&lock_text).hex()
    );
}

#[test]
fn output_is_byte_identical_across_runs_and_paths_and_follows_source_date_epoch() {
    let a = Fixture::new();
    let b = Fixture::new();
    run(&a.options("one")).unwrap();
    run(&a.options("two")).unwrap();
    run(&b.options("elsewhere/deeper")).unwrap();
    let files = [
        "system-k-1-i-1-x86_64.tar.gz",
        "system-k-1-i-1-aarch64.tar.gz",
        MANIFEST,
        SHA256SUMS,
    ];
    for file in files {
        let one = fs::read(a.dir.path().join("one").join(file)).unwrap();
        assert_eq!(
            one,
            fs::read(a.dir.path().join("two").join(file)).unwrap(),
            "{file}"
        );
        assert_eq!(
            one,
            fs::read(b.dir.path().join("elsewhere/deeper").join(file)).unwrap(),
            "{file}"
        );
    }
    let mut later = a.options("later");
    later.mtime = 1_700_000_000;
    run(&later).unwrap();
    let tarball = a.tarball("later", Arch::X86_64);
    assert_ne!(
        fs::read(&tarball).unwrap(),
        fs::read(a.tarball("one", Arch::X86_64)).unwrap()
    );
    // Every entry: owner 0:0, the given mtime, fixed modes.
    let listing = Command::new("tar")
        .args(["--numeric-owner", "--full-time", "-tvzf"])
        .arg(&tarball)
        .env("TZ", "UTC")
        .output()
        .unwrap();
    let listing = String::from_utf8(listing.stdout).unwrap();
    assert_eq!(listing.lines().count(), 14, "{listing}");
    for line in listing.lines() {
        assert!(line.contains(" 0/0 "), "{line}");
        assert!(line.contains("2023-11-14 22:13:20"), "{line}");
        let mode = line.split_whitespace().next().unwrap();
        assert!(
            ["drwxr-xr-x", "-r--r--r--", "-rw-r--r--", "lrwxrwxrwx"].contains(&mode),
            "{line}"
        );
    }
}

#[test]
fn the_selection_defaults_to_the_lock_defaults_and_refuses_what_it_lacks() {
    let fx = Fixture::new();
    let mut options = fx.options("out");
    options.arches = vec![Arch::X86_64];
    let written = run(&options).unwrap();
    assert_eq!(written.len(), 3, "{written:?}");

    let mut options = fx.options("out");
    options.kernels = vec![v("nope")];
    let err = run(&options).unwrap_err().to_string();
    assert!(err.contains("--kernel nope"), "{err}");

    // A blob gone from the store: named, with the next step.
    let data = fx.dir.path().join("data");
    let sha = fx.lock.initrds[&v(INITRD)].outputs[&Arch::X86_64].sha256;
    fs::remove_file(Layout::new(&data).blob(&sha)).unwrap();
    let err = format!("{:#}", run(&fx.options("out")).unwrap_err());
    assert!(
        err.contains(&sha.hex()) || err.contains("initrd i-1"),
        "{err}"
    );
    assert!(err.contains("cargo xtask artifacts"), "{err}");
}

/// Rewrites the tarball at `path` with its tar stream changed by `edit`.
fn edit_tar(path: &Path, edit: impl FnOnce(&mut Vec<u8>)) {
    let mut tar = crate::compression::Compression::Gzip
        .decode_all(&fs::read(path).unwrap())
        .unwrap();
    edit(&mut tar);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    fs::write(path, gz.finish().unwrap()).unwrap();
}

/// A tarball with the fixture's x86_64 entries plus `extra`.
fn tarball_with(fx: &Fixture, dest: &Path, extra: impl FnOnce(&mut Entries)) {
    let store = system::Store::with_lock(fx.dir.path().join("data"), fx.lock.clone());
    let selection = Selection {
        kernels: vec![v(KERNEL)],
        initrds: vec![v(INITRD)],
        arches: vec![Arch::X86_64],
    };
    let (mut entries, _) = pack_arch(&store, &fx.lock, &selection, Arch::X86_64).unwrap();
    extra(&mut entries);
    tarball::write_file(&entries, 0, dest).unwrap();
}

#[test]
fn verify_names_a_flipped_byte_with_both_digests() {
    let fx = Fixture::new();
    run(&fx.options("out")).unwrap();
    let tarball = fx.tarball("out", Arch::X86_64);
    let kernel = bytes("kernel", Arch::X86_64);
    edit_tar(&tarball, |tar| {
        let at = memchr::memmem::find(tar, &kernel[..64]).unwrap() + 1000;
        tar[at] ^= 0x01;
    });
    let err = format!("{:#}", verify::verify(&tarball).unwrap_err());
    let pinned = system::hash::sha256_bytes(&kernel);
    let mut flipped = kernel.clone();
    flipped[1000] ^= 0x01;
    assert!(
        err.contains(&format!("blob system/blobs/sha256/{pinned}")),
        "{err}"
    );
    assert!(
        err.contains(&system::hash::sha256_bytes(&flipped).hex()),
        "{err}"
    );

    // A flipped byte in the compressed file itself fails too, naming the file.
    run(&fx.options("out")).unwrap();
    let mut gz = fs::read(&tarball).unwrap();
    let at = gz.len() / 2;
    gz[at] ^= 0x40;
    fs::write(&tarball, gz).unwrap();
    let err = format!("{:#}", verify::verify(&tarball).unwrap_err());
    assert!(err.contains(&tarball.display().to_string()), "{err}");
}

#[test]
fn verify_refuses_entries_outside_system_escaping_links_and_unrecorded_blobs() {
    let fx = Fixture::new();
    let dest = fx.dir.path().join("bad.tar.gz");
    let file = |bytes: &[u8]| Node::File {
        source: Source::Bytes(bytes.to_vec()),
        size: bytes.len() as u64,
        mode: 0o644,
    };

    tarball_with(&fx, &dest, |e| {
        e.insert("etc/cron.d/evil", file(b"* * * * * root sh"))
    });
    let err = format!("{:#}", verify::verify(&dest).unwrap_err());
    // The first entry out of place is named: its parent directory `etc`.
    assert!(err.contains("entry etc lies outside system/"), "{err}");

    tarball_with(&fx, &dest, |e| {
        e.insert(
            "system/initrd/i-2/x86_64/initrd",
            Node::Link("../../../../../etc/shadow".into()),
        )
    });
    let err = format!("{:#}", verify::verify(&dest).unwrap_err());
    assert!(err.contains("system/initrd/i-2/x86_64/initrd"), "{err}");
    assert!(err.contains("escapes system/blobs/sha256/"), "{err}");

    let stray = b"a blob nobody pinned";
    let stray_sha = system::hash::sha256_bytes(stray);
    tarball_with(&fx, &dest, |e| {
        e.insert(Layout::new("").blob(&stray_sha), file(stray))
    });
    let err = format!("{:#}", verify::verify(&dest).unwrap_err());
    assert!(
        err.contains(&format!(
            "{stray_sha} is not recorded in the embedded artifacts.lock"
        )),
        "{err}"
    );

    // An installer must refuse what verify refuses.
    let (_store_dir, store) = crate::store::temp_store();
    let err = format!(
        "{:#}",
        install::install(
            &[install::DistSource::Path(dest.clone())],
            &fx.lock,
            Path::new("artifacts.lock"),
            &store,
            &Default::default(),
        )
        .unwrap_err()
    );
    assert!(
        err.contains(&stray_sha.hex()) && err.contains("refusing"),
        "{err}"
    );
}

#[test]
fn install_takes_verified_blobs_and_a_bad_one_leaves_nothing() {
    let fx = Fixture::new();
    run(&fx.options("out")).unwrap();
    let out = fx.dir.path().join("out");

    let (_dir, store) = crate::store::temp_store();
    let installed = install::install(
        &[install::DistSource::Path(out.clone())],
        &fx.lock,
        Path::new("l"),
        &store,
        &Default::default(),
    )
    .unwrap();
    assert_eq!(installed.written.len(), 4);
    for (sha, _, _) in &installed.written {
        assert!(store.has_verified_blob(sha, None).unwrap());
    }
    // Again: everything is present, nothing is written.
    let again = install::install(
        &[install::DistSource::Path(out.clone())],
        &fx.lock,
        Path::new("l"),
        &store,
        &Default::default(),
    )
    .unwrap();
    assert_eq!((again.written.len(), again.present.len()), (0, 4));

    // One corrupt blob: both digests named, nothing of the tarball stored.
    let tarball = fx.tarball("out", Arch::X86_64);
    let initrd = bytes("initrd", Arch::X86_64);
    edit_tar(&tarball, |tar| {
        let at = memchr::memmem::find(tar, &initrd[..64]).unwrap() + 10;
        tar[at] ^= 0x80;
    });
    let (_dir, store) = crate::store::temp_store();
    let err = format!(
        "{:#}",
        install::install(
            &[install::DistSource::Path(tarball)],
            &fx.lock,
            Path::new("l"),
            &store,
            &Default::default()
        )
        .unwrap_err()
    );
    let pinned = system::hash::sha256_bytes(&initrd);
    let mut flipped = initrd.clone();
    flipped[10] ^= 0x80;
    assert!(err.contains(&pinned.hex()), "{err}");
    assert!(
        err.contains(&system::hash::sha256_bytes(&flipped).hex()),
        "{err}"
    );
    assert!(err.contains("nothing from"), "{err}");
    let left: Vec<_> = fs::read_dir(store.layout().blobs()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

fn artifacts_from(fx: &Fixture, data_dir: &Path, from: PathBuf) -> crate::artifacts::Options {
    crate::artifacts::Options {
        lock: fx.dir.path().join("artifacts.lock"),
        data_dir: data_dir.to_owned(),
        workspace: fx.dir.path().join("no-checkout-needed"),
        arches: vec![],
        kernels: vec![],
        initrds: vec![],
        offline: false,
        locked: true,
        transfer: crate::fetch::Options::default(),
        mirrors: Default::default(),
        stages: vec![],
        modules_dir: None,
        modules: None,
        base_sources: Default::default(),
        from: vec![install::DistSource::Path(from)],
        firmware_dir: None,
    }
}

#[test]
fn artifacts_from_a_dist_installs_links_and_builds_nothing() {
    let fx = Fixture::new();
    run(&fx.options("out")).unwrap();
    let host = tempfile::tempdir().unwrap();
    let lock_before = fs::read(fx.dir.path().join("artifacts.lock")).unwrap();
    // `workspace` points nowhere and the lock's URLs are unreachable: only the dist can serve.
    crate::artifacts::run(&artifacts_from(&fx, host.path(), fx.dir.path().join("out"))).unwrap();
    assert_eq!(
        fs::read(fx.dir.path().join("artifacts.lock")).unwrap(),
        lock_before
    );
    let store = Store::with_lock(host.path(), fx.lock.clone());
    assert_eq!(store.verify_all(Check::Full).unwrap().len(), 4);

    // Narrowed to one initrd version the dist lacks: named.
    let mut options = artifacts_from(&fx, host.path(), fx.dir.path().join("out"));
    options.initrds = vec![v("i-2")];
    let err = format!("{:#}", crate::artifacts::run(&options).unwrap_err());
    assert!(err.contains("--initrd i-2"), "{err}");
}

#[test]
fn artifacts_from_a_corrupt_or_foreign_dist_leaves_the_store_empty() {
    let fx = Fixture::new();
    run(&fx.options("out")).unwrap();
    let tarball = fx.tarball("out", Arch::Aarch64);
    let kernel = bytes("kernel", Arch::Aarch64);
    edit_tar(&tarball, |tar| {
        let at = memchr::memmem::find(tar, &kernel[..64]).unwrap() + 7;
        tar[at] ^= 0x02;
    });
    let host = tempfile::tempdir().unwrap();
    let err = format!(
        "{:#}",
        crate::artifacts::run(&artifacts_from(&fx, host.path(), tarball)).unwrap_err()
    );
    let mut flipped = kernel.clone();
    flipped[7] ^= 0x02;
    assert!(
        err.contains(&system::hash::sha256_bytes(&kernel).hex()),
        "{err}"
    );
    assert!(
        err.contains(&system::hash::sha256_bytes(&flipped).hex()),
        "{err}"
    );
    let layout = Layout::new(host.path());
    assert_eq!(fs::read_dir(layout.blobs()).unwrap().count(), 0);
    assert!(!layout.root().join("kernel").exists() && !layout.lock_file().exists());

    // A dist made for another lock: its digests are refused.
    let mut other_lock = fx.lock.clone();
    let k = other_lock.kernels.get_mut(&v(KERNEL)).unwrap();
    let sha = k[&Arch::X86_64].sha256;
    k.get_mut(&Arch::X86_64).unwrap().sha256 = system::hash::sha256_bytes(b"not this one");
    crate::lock::write(&fx.dir.path().join("artifacts.lock"), &other_lock).unwrap();
    let err = format!(
        "{:#}",
        crate::artifacts::run(&artifacts_from(
            &fx,
            host.path(),
            fx.tarball("out", Arch::X86_64)
        ))
        .unwrap_err()
    );
    assert!(
        err.contains(&format!("sha256:{sha} is not recorded")),
        "{err}"
    );
    assert_eq!(fs::read_dir(layout.blobs()).unwrap().count(), 0);
}

#[test]
fn a_from_argument_is_a_path_or_a_registry_reference() {
    use install::DistSource;
    let base = Path::new("/checkout");
    assert_eq!(
        DistSource::parse("target/dist", base),
        DistSource::Path("/checkout/target/dist".into())
    );
    assert_eq!(
        DistSource::parse("oci:127.0.0.1:5000/sys:v1", base),
        DistSource::Registry("127.0.0.1:5000/sys:v1".into())
    );
    let pinned = format!("ghcr.io/o/sys@sha256:{}", "a".repeat(64));
    assert_eq!(
        DistSource::parse(&pinned, base),
        DistSource::Registry(pinned.clone())
    );
}

#[test]
fn a_pushed_artifact_pulls_back_by_digest_and_a_foreign_lock_refuses_it() {
    let fx = Fixture::new();
    let registry = testkit::oci::DockerRegistry::start();
    let transfer = crate::fetch::tests::options();
    let reference = format!("{}/microvm/system:unit", registry.host());
    let index = oci::push(&fx.options("unused"), &reference, &transfer).unwrap();
    // Pushing the same set again gives the same index: the manifests are deterministic.
    assert_eq!(
        oci::push(&fx.options("unused"), &reference, &transfer).unwrap(),
        index
    );
    let pinned = format!("{}/microvm/system@{index}", registry.host());

    let (_dir, store) = crate::store::temp_store();
    let mut installed = install::Installed::default();
    oci::pull(&pinned, &fx.lock, &store, &transfer, &mut installed).unwrap();
    assert_eq!(installed.written.len(), 4, "{installed:?}");
    for arch in Arch::ALL {
        for what in ["kernel", "initrd"] {
            let sha = system::hash::sha256_bytes(&bytes(what, arch));
            assert_eq!(
                fs::read(store.layout().blob(&sha)).unwrap(),
                bytes(what, arch)
            );
        }
    }

    let mut other = fx.lock.clone();
    other
        .initrds
        .get_mut(&v(INITRD))
        .unwrap()
        .outputs
        .remove(&Arch::X86_64);
    let (_dir, store) = crate::store::temp_store();
    let err = format!(
        "{:#}",
        oci::pull(
            &pinned,
            &other,
            &store,
            &transfer,
            &mut install::Installed::default()
        )
        .unwrap_err()
    );
    let refused = system::hash::sha256_bytes(&bytes("initrd", Arch::X86_64));
    assert!(
        err.contains(&format!("sha256:{refused} is not recorded")),
        "{err}"
    );
    assert!(!store.layout().blob(&refused).exists());
}
