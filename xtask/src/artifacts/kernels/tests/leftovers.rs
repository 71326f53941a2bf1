//! The kernel stage over what earlier runs left behind: a download killed halfway is resumed
//! where it stopped, and a blob replaced by a symlink is fetched again.

use std::io::Write as _;

use super::*;

#[test]
fn a_download_killed_halfway_is_resumed_by_the_next_run() {
    let body = content(400_000);
    let digest = system::hash::sha256_bytes(&body);
    let server = Server::serving(&body, true);
    let url = server.url("/vmlinux");
    let dir = tempfile::tempdir().unwrap();

    // The killed run: it received 150 000 bytes of a `200` with ETag "fixture", then died
    // (no destructor ran, so nothing was cleaned up).
    {
        let store = StoreWriter::open(dir.path()).unwrap();
        let mut writer = store.resumable_blob_writer(&digest, &url).unwrap();
        writer.begin(Some("\"fixture\"")).unwrap();
        writer.write_all(&body[..150_000]).unwrap();
        std::mem::forget(writer);
    }

    let store = StoreWriter::open(dir.path()).unwrap();
    let mut lock = lock_for(&[(Arch::X86_64, &url, &body, Some(body.len() as u64))]);
    let report = sync(&mut lock, &store, &Plan::default()).unwrap();

    let requests = server.requests();
    assert_eq!(requests.len(), 1, "one request for the rest");
    assert_eq!(requests[0].range_start(), Some(150_000));
    assert_eq!(requests[0].header("if-range"), Some("\"fixture\""));
    assert!(
        report.fetched[0].contains("resumed at byte 150000"),
        "{report}"
    );
    assert_kernel(&store, Arch::X86_64, &body);
    let names: Vec<_> = fs::read_dir(store.layout().blobs())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        [std::ffi::OsString::from(digest.hex())],
        "no partial left"
    );
}

#[test]
fn a_failed_run_leaves_a_partial_the_next_run_continues() {
    let body = content(400_000);
    let served = body.clone();
    // The first run: the connection drops at 100 000 bytes, then the server is gone for the
    // rest of the run's attempts. The second run finds it back.
    let server = Server::start(move |i, _| match i {
        0 => Reply::Cut {
            body: served.clone(),
            cut: 100_000,
        },
        1..=2 => Reply::Status {
            code: 503,
            headers: vec![],
        },
        _ => Reply::Body {
            body: served.clone(),
            ranges: true,
        },
    })
    .unwrap();
    let (_dir, store) = temp_store();
    let mut lock = lock_for(&[(Arch::X86_64, &server.url("/k"), &body, None)]);
    let err = sync(&mut lock, &store, &Plan::default()).unwrap_err();
    assert!(format!("{err:#}").contains("503"), "{err:#}");

    sync(&mut lock, &store, &Plan::default()).unwrap();
    let requests = server.requests();
    let resumed_at = requests[3]
        .range_start()
        .expect("the next run sends a Range");
    assert!(resumed_at > 0 && resumed_at <= 100_000, "{resumed_at}");
    assert_kernel(&store, Arch::X86_64, &body);
}

#[test]
fn a_blob_replaced_by_a_symlink_is_fetched_again() {
    let body = content(50_000);
    let server = Server::serving(&body, true);
    let (dir, store) = temp_store();
    let mut lock = lock_for(&[(Arch::X86_64, &server.url("/vmlinux"), &body, None)]);
    sync(&mut lock, &store, &Plan::default()).unwrap();
    // Someone "deduplicates" the blob with a link to an identical copy outside the store.
    let blob = store.layout().blob(&system::hash::sha256_bytes(&body));
    let outside = dir.path().join("vmlinux-copy");
    fs::write(&outside, &*body).unwrap();
    fs::remove_file(&blob).unwrap();
    std::os::unix::fs::symlink(&outside, &blob).unwrap();

    let report = sync(&mut lock, &store, &Plan::default()).unwrap();
    assert_eq!(
        (report.fetched.len(), report.reused.len()),
        (1, 0),
        "{report}"
    );
    assert_eq!(server.count(), 2);
    assert!(fs::symlink_metadata(&blob).unwrap().file_type().is_file());
    assert_kernel(&store, Arch::X86_64, &body);
}
