//! Copy in and out and stat against the real agent (in-process: the "guest" paths are this
//! machine's, inside temp dirs).

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;
use std::time::{Duration, SystemTime};

use guest_agent_proto::grpc;
use guest_agent_proto::pb::copy_to_guest_request::Request;
use guest_agent_proto::pb::{CopyToGuestRequest, CopyToGuestStart};

fn set_mtime(path: &Path, secs: u64) {
    let file = std::fs::File::open(path).unwrap();
    file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
        .unwrap();
}

fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A tree with a nested dir, modes, mtimes and a symlink.
fn make_tree(root: &Path) {
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(root.join("a.txt"), b"alpha\n").unwrap();
    std::fs::write(root.join("sub/b.bin"), noise(3 << 20, 7)).unwrap();
    std::fs::set_permissions(root.join("a.txt"), std::fs::Permissions::from_mode(0o640)).unwrap();
    std::fs::set_permissions(
        root.join("sub/b.bin"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    symlink("a.txt", root.join("link")).unwrap();
    set_mtime(&root.join("a.txt"), 1_000_000_000);
    set_mtime(&root.join("sub/b.bin"), 1_100_000_000);
    std::fs::set_permissions(root.join("sub"), std::fs::Permissions::from_mode(0o750)).unwrap();
    set_mtime(&root.join("sub"), 1_200_000_000);
}

/// Same entries, bytes, modes, mtimes (dirs and files) and link targets.
fn assert_same_tree(a: &Path, b: &Path) {
    for rel in ["", "a.txt", "sub", "sub/b.bin", "link"] {
        let (pa, pb) = (a.join(rel), b.join(rel));
        let (ma, mb) = (
            std::fs::symlink_metadata(&pa).unwrap(),
            std::fs::symlink_metadata(&pb).unwrap(),
        );
        assert_eq!(ma.file_type(), mb.file_type(), "{rel}: type");
        if ma.file_type().is_symlink() {
            assert_eq!(
                std::fs::read_link(&pa).unwrap(),
                std::fs::read_link(&pb).unwrap(),
                "{rel}: target"
            );
            continue;
        }
        assert_eq!(ma.mode() & 0o7777, mb.mode() & 0o7777, "{rel}: mode");
        if !rel.is_empty() {
            assert_eq!(ma.mtime(), mb.mtime(), "{rel}: mtime");
        }
        if ma.is_file() {
            assert!(
                std::fs::read(&pa).unwrap() == std::fs::read(&pb).unwrap(),
                "{rel}: bytes"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_a_tree_in_and_out() {
    let dir = common::temp_dir();
    let client = common::connect(&common::agent_socket(dir.path())).await;
    let src = dir.path().join("src");
    make_tree(&src);

    let guest = dir.path().join("guest/tree");
    let written = client
        .copy_to_guest(&src, guest.to_str().unwrap())
        .await
        .unwrap();
    assert_eq!(written, 6 + (3 << 20));
    assert_same_tree(&src, &guest);

    let out = dir.path().join("out");
    let report = client
        .copy_from_guest(guest.to_str().unwrap(), &out, false, false)
        .await
        .unwrap();
    assert_eq!(report.entries, 5);
    assert_eq!(report.bytes, 6 + (3 << 20));
    assert_same_tree(&src, &out.join("tree"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_a_single_file_and_report_missing_paths() {
    let dir = common::temp_dir();
    let client = common::connect(&common::agent_socket(dir.path())).await;
    let src = dir.path().join("one.bin");
    std::fs::write(&src, noise(50 << 20, 3)).unwrap();
    let guest = dir.path().join("guest-one.bin");
    client
        .copy_to_guest(&src, guest.to_str().unwrap())
        .await
        .unwrap();
    let out = dir.path().join("out");
    client
        .copy_from_guest(guest.to_str().unwrap(), &out, false, false)
        .await
        .unwrap();
    assert!(std::fs::read(&src).unwrap() == std::fs::read(out.join("guest-one.bin")).unwrap());

    let missing = dir.path().join("nope");
    let err = client
        .copy_from_guest(missing.to_str().unwrap(), &out, false, false)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("nope") && text.contains("No such file"),
        "{text}"
    );
}

/// A transfer cut in the middle of a file (the host's stream reset) leaves neither the file
/// nor its temporary behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_copy_leaves_no_file() {
    let dir = common::temp_dir();
    let socket = common::agent_socket(dir.path());
    let target_dir = dir.path().join("landing");
    std::fs::create_dir(&target_dir).unwrap();
    let target = target_dir.join("big.bin");

    let stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = stream;
    stream.write_all(b"CONNECT 2222\n").await.unwrap();
    let mut ok = [0u8; 8];
    stream.read_exact(&mut ok).await.unwrap();
    let (h2, connection) = h2::client::handshake(stream).await.unwrap();
    let driver = tokio::spawn(connection);
    let mut h2 = h2.ready().await.unwrap();
    let request = http::Request::post(format!("http://agent{}", grpc::method::COPY_TO_GUEST))
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    let (_response, mut send) = h2.send_request(request, false).unwrap();
    let start = CopyToGuestStart {
        path: target.to_str().unwrap().to_owned(),
        size: 1 << 20,
        ..Default::default()
    };
    let msg = |r| CopyToGuestRequest { request: Some(r) };
    grpc::send_message(&mut send, &msg(Request::Start(start)))
        .await
        .unwrap();
    grpc::send_message(&mut send, &msg(Request::Data(vec![7; 64 << 10])))
        .await
        .unwrap();
    // The temporary exists while the transfer runs...
    for _ in 0..200 {
        if std::fs::read_dir(&target_dir).unwrap().count() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        std::fs::read_dir(&target_dir).unwrap().count(),
        1,
        "the temporary file"
    );
    // ...and the connection is cut.
    drop(send);
    drop(h2);
    driver.abort();
    for _ in 0..200 {
        if std::fs::read_dir(&target_dir).unwrap().count() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let left: Vec<_> = std::fs::read_dir(&target_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stat_file_dir_symlink_and_missing() {
    let dir = common::temp_dir();
    let client = common::connect(&common::agent_socket(dir.path())).await;
    let file = dir.path().join("f");
    std::fs::write(&file, b"12345").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o604)).unwrap();
    symlink("f", dir.path().join("l")).unwrap();

    let s = client.stat(file.to_str().unwrap(), false).await.unwrap();
    assert!(s.exists && s.is_file && !s.is_dir && !s.is_symlink);
    assert_eq!((s.size, s.mode), (5, 0o604));

    let s = client
        .stat(dir.path().to_str().unwrap(), false)
        .await
        .unwrap();
    assert!(s.exists && s.is_dir && !s.is_file);

    let link = dir.path().join("l");
    let s = client.stat(link.to_str().unwrap(), false).await.unwrap();
    assert!(s.exists && s.is_symlink && !s.is_file);
    assert_eq!(s.link_target, "f");
    let s = client.stat(link.to_str().unwrap(), true).await.unwrap();
    assert!(s.exists && s.is_file && !s.is_symlink);

    let s = client
        .stat(dir.path().join("missing").to_str().unwrap(), false)
        .await
        .unwrap();
    assert!(!s.exists && s.error.is_empty());
}
