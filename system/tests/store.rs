//! `Store` over a temp data dir: what a host sees for good, missing, corrupt and hostile stores.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use system::hash::sha256_bytes;
use system::{Arch, Check, Error, InitrdVersion, KernelVersion, Layout, Lock, Store};

const KERNEL: &[u8] = b"pretend this is a vmlinux";
const INITRD: &[u8] = b"pretend this is an initrd";

fn lock_json(kernel: &[u8], initrd: &[u8]) -> String {
    format!(
        r#"{{
  "schema": 1,
  "defaults": {{ "kernel": "k1", "initrd": "i1" }},
  "kernels": {{
    "k1": {{
      "x86_64": {{ "url": "https://example.invalid/vmlinux", "sha256": "{}", "size": {} }},
      "aarch64": {{ "url": "https://example.invalid/Image", "sha256": "{}" }}
    }}
  }},
  "initrds": {{
    "i1": {{ "outputs": {{ "x86_64": {{ "inputs": {{}}, "sha256": "{}", "size": {} }} }} }}
  }}
}}"#,
        sha256_bytes(kernel),
        kernel.len(),
        sha256_bytes(kernel),
        sha256_bytes(initrd),
        initrd.len()
    )
}

/// A data dir holding the x86_64 kernel and initrd of [`lock_json`], laid out as xtask lays it.
struct Fixture {
    dir: tempfile::TempDir,
    lock: Lock,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let lock = Lock::parse(&lock_json(KERNEL, INITRD)).unwrap();
        let fixture = Fixture { dir, lock };
        let layout = fixture.layout();
        fixture.put(&layout.kernel_link("k1", Arch::X86_64), KERNEL);
        fixture.put(&layout.initrd_link("i1", Arch::X86_64), INITRD);
        fixture
    }

    fn layout(&self) -> Layout {
        Layout::new(self.dir.path())
    }

    fn store(&self) -> Store {
        Store::with_lock(self.dir.path(), self.lock.clone())
    }

    /// Writes `content` as a blob and points `link` at it.
    fn put(&self, link: &Path, content: &[u8]) -> PathBuf {
        let digest = sha256_bytes(content);
        let blob = self.layout().blob(&digest);
        fs::create_dir_all(blob.parent().unwrap()).unwrap();
        fs::write(&blob, content).unwrap();
        fs::create_dir_all(link.parent().unwrap()).unwrap();
        let _ = fs::remove_file(link);
        symlink(Layout::link_target(&digest), link).unwrap();
        blob
    }

    /// Resolving k1 (x86_64) through a fresh [`Store`], which the test expects to fail.
    fn kernel_error(&self) -> Error {
        self.store().kernel_path(&k1(), Arch::X86_64).unwrap_err()
    }

    fn kernel_blob(&self) -> PathBuf {
        self.layout().blob(&sha256_bytes(KERNEL))
    }
}

fn k1() -> KernelVersion {
    KernelVersion::new("k1")
}

#[test]
fn resolves_verified_paths() {
    let fixture = Fixture::new();
    let store = fixture.store();
    let kernel = store.kernel_path(&k1(), Arch::X86_64).unwrap();
    assert_eq!(fs::read(&kernel).unwrap(), KERNEL);
    assert!(kernel.starts_with(fs::canonicalize(fixture.layout().blobs()).unwrap()));
    let initrd = store
        .initrd_path(&InitrdVersion::new("i1"), Arch::X86_64)
        .unwrap();
    assert_eq!(fs::read(initrd).unwrap(), INITRD);
}

#[test]
fn missing_file_names_the_path_and_the_fix() {
    let fixture = Fixture::new();
    // aarch64 is pinned but was never fetched.
    let err = fixture
        .store()
        .kernel_path(&k1(), Arch::Aarch64)
        .unwrap_err();
    assert!(matches!(err, Error::Missing { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("kernel/k1/aarch64/Image"), "{message}");
    assert!(message.contains("cargo xtask artifacts"), "{message}");
}

#[test]
fn a_dangling_link_is_missing() {
    let fixture = Fixture::new();
    fs::remove_file(fixture.kernel_blob()).unwrap();
    let err = fixture.kernel_error();
    assert!(matches!(err, Error::Missing { .. }), "{err:?}");
}

#[test]
fn one_flipped_byte_is_reported_with_both_digests() {
    let fixture = Fixture::new();
    let blob = fixture.kernel_blob();
    let mut bytes = fs::read(&blob).unwrap();
    bytes[3] ^= 0x01;
    fs::write(&blob, &bytes).unwrap();
    let err = fixture.kernel_error();
    let message = err.to_string();
    assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
    assert!(
        message.contains(&blob.file_name().unwrap().to_string_lossy().to_string()),
        "{message}"
    );
    assert!(message.contains(&sha256_bytes(KERNEL).hex()), "{message}");
    assert!(message.contains(&sha256_bytes(&bytes).hex()), "{message}");
}

#[test]
fn a_wrong_size_is_caught_before_hashing() {
    let fixture = Fixture::new();
    fs::write(fixture.kernel_blob(), b"short").unwrap();
    let err = fixture.kernel_error();
    assert!(
        matches!(err, Error::WrongSize { expected, actual: 5, .. } if expected == KERNEL.len() as u64)
    );
}

#[test]
fn unknown_version_lists_the_known_ones() {
    let fixture = Fixture::new();
    let err = fixture
        .store()
        .kernel_path(&KernelVersion::new("k9"), Arch::X86_64)
        .unwrap_err();
    assert!(matches!(err, Error::UnknownVersion { .. }), "{err:?}");
    assert!(err.to_string().contains("`k1`"), "{err}");
    let err = fixture
        .store()
        .initrd_path(&InitrdVersion::new("i9"), Arch::X86_64)
        .unwrap_err();
    assert!(err.to_string().contains("`i1`"), "{err}");
}

#[test]
fn an_arch_the_lock_does_not_cover_is_refused() {
    let fixture = Fixture::new();
    // The initrd was only built for x86_64.
    let err = fixture
        .store()
        .initrd_path(&InitrdVersion::new("i1"), Arch::Aarch64)
        .unwrap_err();
    assert!(matches!(err, Error::NotBuilt { .. }), "{err:?}");
    assert!(err.to_string().contains("--arch aarch64"), "{err}");

    let mut lock = fixture.lock.clone();
    lock.kernels.get_mut("k1").unwrap().remove(&Arch::Aarch64);
    let store = Store::with_lock(fixture.dir.path(), lock);
    let err = store.kernel_path(&k1(), Arch::Aarch64).unwrap_err();
    assert!(matches!(err, Error::ArchNotPinned { .. }), "{err:?}");
    assert!(err.to_string().contains("x86_64"), "{err}");
}

#[test]
fn a_link_leaving_the_store_is_refused() {
    let fixture = Fixture::new();
    let outside = tempfile::tempdir().unwrap();
    let evil = outside.path().join("vmlinux");
    fs::write(&evil, KERNEL).unwrap(); // even with the right content
    let link = fixture.layout().kernel_link("k1", Arch::X86_64);
    for target in [
        evil.clone(),
        PathBuf::from("../../../../../").join(evil.strip_prefix("/").unwrap()),
    ] {
        fs::remove_file(&link).unwrap();
        symlink(&target, &link).unwrap();
        let err = fixture.kernel_error();
        assert!(
            matches!(err, Error::LinkEscapes { .. }),
            "{target:?}: {err:?}"
        );
    }
}

#[test]
fn a_blob_that_is_itself_a_link_is_corrupt_not_the_named_link() {
    let fixture = Fixture::new();
    let outside = tempfile::tempdir().unwrap();
    let evil = outside.path().join("vmlinux");
    fs::write(&evil, KERNEL).unwrap();
    // The named link stays inside; the blob it names is a link out (to identical content).
    fs::remove_file(fixture.kernel_blob()).unwrap();
    symlink(&evil, fixture.kernel_blob()).unwrap();
    let err = fixture.kernel_error();
    assert!(matches!(err, Error::NotAFile { .. }), "{err:?}");
    let message = err.to_string();
    for needle in [
        fixture.kernel_blob().display().to_string(),
        format!("a symlink to {}", evil.display()),
        "not a regular file".into(),
        "corrupt".into(),
        "cargo xtask artifacts".into(),
    ] {
        assert!(message.contains(&needle), "missing {needle} in: {message}");
    }
    let link = fixture.layout().kernel_link("k1", Arch::X86_64);
    assert!(
        !message.contains(&link.display().to_string()),
        "the named link is fine: {message}"
    );

    // A directory in the blob's place is no better.
    fs::remove_file(fixture.kernel_blob()).unwrap();
    fs::create_dir(fixture.kernel_blob()).unwrap();
    let err = fixture.kernel_error();
    assert!(
        matches!(&err, Error::NotAFile { found, .. } if found == "a directory"),
        "{err:?}"
    );
}

#[test]
fn a_store_filled_from_another_lock_is_not_called_corrupt() {
    const OTHER: &[u8] = b"the kernel a newer lock pins";
    let fixture = Fixture::new();
    let layout = fixture.layout();
    // The generator filled the store from a newer lock that re-pinned k1.
    let blob = fixture.put(&layout.kernel_link("k1", Arch::X86_64), OTHER);
    fs::write(layout.lock_file(), lock_json(OTHER, INITRD)).unwrap();
    let built = SystemTime::now() - Duration::from_secs(86_400);
    let store = fixture
        .store()
        .with_lock_origin("/src/host/artifacts.lock", Some(built));

    let err = store.kernel_path(&k1(), Arch::X86_64).unwrap_err();
    assert!(matches!(err, Error::LockMismatch(_)), "{err:?}");
    let message = err.to_string();
    for needle in [
        "`kernels.k1.x86_64.sha256`".to_owned(),
        sha256_bytes(KERNEL).hex(),
        sha256_bytes(OTHER).hex(),
        layout.lock_file().display().to_string(),
        "/src/host/artifacts.lock".into(),
        "the store's lock is newer".into(),
        "not corrupt, do not delete it".into(),
        blob.display().to_string(),
    ] {
        assert!(message.contains(&needle), "missing {needle} in: {message}");
    }

    // Built from a lock newer than the store's: said the other way round.
    let store = fixture.store().with_lock_origin(
        "/src/host/artifacts.lock",
        Some(SystemTime::now() + Duration::from_secs(86_400)),
    );
    let message = store
        .kernel_path(&k1(), Arch::X86_64)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("this program's lock is newer"),
        "{message}"
    );

    // A blob that matches neither lock is corrupt after all.
    fs::set_permissions(&blob, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&blob, b"the kernel a newer lock pinz").unwrap();
    let err = fixture.kernel_error();
    assert!(matches!(err, Error::WrongSize { .. }), "{err:?}");

    // So is one that does not match when both locks agree.
    fs::write(layout.lock_file(), lock_json(KERNEL, INITRD)).unwrap();
    fs::write(&blob, OTHER).unwrap();
    let err = fixture.kernel_error();
    assert!(matches!(err, Error::WrongSize { .. }), "{err:?}");
}

#[test]
fn the_cache_is_not_trusted_after_the_file_changes() {
    let fixture = Fixture::new();
    let store = fixture.store();
    let blob = fixture.kernel_blob();
    store.kernel_path(&k1(), Arch::X86_64).unwrap();

    // Same size, new content, mtime forged back: ctime still moves.
    let before = fs::metadata(&blob).unwrap().modified().unwrap();
    let mut evil = KERNEL.to_vec();
    evil[0] ^= 0xff;
    std::thread::sleep(Duration::from_millis(20));
    fs::write(&blob, &evil).unwrap();
    fs::File::options()
        .write(true)
        .open(&blob)
        .unwrap()
        .set_modified(before)
        .unwrap();
    assert!(matches!(
        store.kernel_path(&k1(), Arch::X86_64),
        Err(Error::Corrupt { .. })
    ));

    // Restored content with a new mtime: verified again, then trusted.
    fs::write(&blob, KERNEL).unwrap();
    fs::File::options()
        .write(true)
        .open(&blob)
        .unwrap()
        .set_modified(SystemTime::now() + Duration::from_secs(5))
        .unwrap();
    store.kernel_path(&k1(), Arch::X86_64).unwrap();

    // A different inode with the same bytes, then corrupted in place with a new size.
    let replacement = blob.with_extension("new");
    fs::write(&replacement, KERNEL).unwrap();
    fs::rename(&replacement, &blob).unwrap();
    store.kernel_path(&k1(), Arch::X86_64).unwrap();
    fs::write(&blob, b"x").unwrap();
    assert!(matches!(
        store.kernel_path(&k1(), Arch::X86_64),
        Err(Error::WrongSize { .. })
    ));
}

#[test]
fn a_warm_cache_does_not_rehash_but_a_full_check_does() {
    let fixture = Fixture::new();
    let store = fixture.store();
    store.kernel_path(&k1(), Arch::X86_64).unwrap();
    assert_eq!(store.files_hashed(), 1);
    store.kernel_path(&k1(), Arch::X86_64).unwrap();
    assert_eq!(store.files_hashed(), 1, "a second resolve must not re-hash");
    fixture.put(&fixture.layout().kernel_link("k1", Arch::Aarch64), KERNEL);
    // Full re-verification hashes every artifact (the shared kernel blob counts once per name).
    store.verify_all(Check::Full).unwrap();
    assert_eq!(store.files_hashed(), 4);
    store.verify_all(Check::Cached).unwrap();
    assert_eq!(store.files_hashed(), 4);
}

#[test]
fn verify_all_reports_every_problem() {
    let fixture = Fixture::new();
    // Problem 1: the aarch64 kernel was never fetched. Problem 2: the initrd is corrupt.
    let initrd_blob = fixture.layout().blob(&sha256_bytes(INITRD));
    fs::write(&initrd_blob, b"pretend this is an initrD").unwrap();
    let err = fixture.store().verify_all(Check::Full).unwrap_err();
    let Error::Incomplete(problems) = &err else {
        panic!("{err:?}")
    };
    assert_eq!(problems.len(), 2, "{err}");
    assert!(matches!(problems[0], Error::Missing { .. }), "{err}");
    assert!(matches!(problems[1], Error::Corrupt { .. }), "{err}");
    assert!(
        err.to_string()
            .starts_with("2 artifact(s) failed verification"),
        "{err}"
    );

    // Restricted to x86_64 only the initrd is wrong.
    let err = fixture
        .store()
        .verify_arch(Arch::X86_64, Check::Full)
        .unwrap_err();
    assert!(
        matches!(&err, Error::Incomplete(p) if p.len() == 1),
        "{err}"
    );
}

#[test]
fn verify_all_passes_on_a_complete_store() {
    let fixture = Fixture::new();
    fixture.put(&fixture.layout().kernel_link("k1", Arch::Aarch64), KERNEL);
    let verified = fixture.store().verify_all(Check::Full).unwrap();
    assert_eq!(verified.len(), 3);
}
