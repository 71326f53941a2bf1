//! The client against a hostile fake agent: a guest that owns its VM may answer anything.
//! Nothing may land outside the destination, nothing may be written through a symlink, and
//! no answer may make the client hold more than a bounded amount of memory.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use guest_agent_proto::grpc;
use guest_agent_proto::pb::copy_from_guest_response::Response;
use guest_agent_proto::pb::exec_response;
use guest_agent_proto::pb::{
    CopyFromGuestEnd, CopyFromGuestError, CopyFromGuestHeader, CopyFromGuestResponse, ExecResponse,
};
use guest_client::{Client, ClientError, ExecSpec, Limits};
use tokio::net::UnixStream;

/// What the fake answers every call with.
enum Fake {
    /// These CopyFromGuest messages, then an OK status.
    Copy(Vec<Response>),
    /// A file header announcing `announced` bytes, then `total` bytes of data.
    Oversized { announced: i64, total: u64 },
    /// Empty files, forever.
    EndlessEntries,
    /// Per-path errors with long messages, forever.
    EndlessErrors,
    /// Exec output, forever.
    EndlessStdout,
    /// One 5 MiB message.
    HugeMessage,
}

async fn serve_fake(stream: UnixStream, fake: Arc<Fake>, sent: Arc<AtomicU64>) {
    let Ok(mut conn) = h2::server::handshake(stream).await else {
        return;
    };
    while let Some(Ok((request, mut respond))) = conn.accept().await {
        let (fake, sent) = (fake.clone(), sent.clone());
        tokio::spawn(async move {
            let _request = request;
            let head = http::Response::builder()
                .header("content-type", "application/grpc")
                .body(())
                .unwrap();
            let Ok(mut stream) = respond.send_response(head, false) else {
                return;
            };
            let send = |msg: Response| CopyFromGuestResponse {
                response: Some(msg),
            };
            let mut n = 0u64;
            loop {
                let message = match &*fake {
                    Fake::Copy(script) => match script.get(n as usize) {
                        Some(msg) => grpc::encode(&send(msg.clone())),
                        None => break,
                    },
                    Fake::Oversized { announced, total } => {
                        if n == 0 {
                            grpc::encode(&send(Response::Header(file("root", *announced))))
                        } else if (n - 1) * (32 << 10) < *total {
                            grpc::encode(&send(Response::Data(vec![b'x'; 32 << 10])))
                        } else {
                            break;
                        }
                    }
                    Fake::EndlessEntries => {
                        if n.is_multiple_of(2) {
                            grpc::encode(&send(Response::Header(file(&format!("f{n}"), 0))))
                        } else {
                            grpc::encode(&send(Response::End(CopyFromGuestEnd { r#final: false })))
                        }
                    }
                    Fake::EndlessErrors => {
                        grpc::encode(&send(Response::Error(CopyFromGuestError {
                            message: "e".repeat(1 << 20),
                            path: format!("f{n}"),
                        })))
                    }
                    Fake::EndlessStdout => grpc::encode(&ExecResponse {
                        response: Some(exec_response::Response::Stdout(vec![b'y'; 32 << 10])),
                    }),
                    Fake::HugeMessage => {
                        if n > 0 {
                            break;
                        }
                        grpc::encode(&send(Response::Data(vec![0; 5 << 20])))
                    }
                };
                let len = message.len() as u64;
                if grpc::send_bytes(&mut stream, message).await.is_err() {
                    return; // the client stopped the call
                }
                sent.fetch_add(len, Ordering::Relaxed);
                n += 1;
            }
            let _ = stream.send_trailers(grpc::trailers(grpc::Code::Ok, ""));
        });
    }
}

fn file(path: &str, size: i64) -> CopyFromGuestHeader {
    CopyFromGuestHeader {
        path: path.to_owned(),
        mode: 0o644,
        size,
        ..Default::default()
    }
}

fn dir_entry(path: &str) -> CopyFromGuestHeader {
    CopyFromGuestHeader {
        path: path.to_owned(),
        mode: 0o755,
        is_dir: true,
        ..Default::default()
    }
}

fn link(path: &str, target: &str) -> CopyFromGuestHeader {
    CopyFromGuestHeader {
        path: path.to_owned(),
        is_symlink: true,
        link_target: target.to_owned(),
        ..Default::default()
    }
}

fn end() -> Response {
    Response::End(CopyFromGuestEnd { r#final: false })
}

async fn fake_client(dir: &Path, fake: Fake, limits: Limits) -> (Client, Arc<AtomicU64>) {
    let fake = Arc::new(fake);
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    let socket = common::hybrid_socket(dir, move |stream| {
        serve_fake(stream, fake.clone(), counter.clone())
    });
    (common::connect(&socket).await.with_limits(limits), sent)
}

/// Every file under `dir`, relative, sorted (symlinks not followed).
fn listing(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            out.push(path.strip_prefix(base).unwrap().display().to_string());
            if std::fs::symlink_metadata(&path).unwrap().is_dir() {
                walk(base, &path, out);
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn assert_refused(err: ClientError, expected_path: &str) {
    match &err {
        ClientError::Refused { path, .. } => assert_eq!(path, expected_path, "{err}"),
        other => panic!("expected a refusal of {expected_path:?}, got {other}"),
    }
}

fn assert_too_large(err: &ClientError, expected_what: &str) {
    match err {
        ClientError::TooLarge { what, .. } => assert_eq!(*what, expected_what, "{err}"),
        other => panic!("expected {expected_what} to be too large, got {other}"),
    }
}

/// Copies the fake's answer into `dir/dest`; also returns how many bytes the fake pushed.
async fn copy_from_fake(
    dir: &Path,
    fake: Fake,
    limits: Limits,
) -> (Result<(), ClientError>, Arc<AtomicU64>) {
    let (client, sent) = fake_client(dir, fake, limits).await;
    let result = client
        .copy_from_guest("/x", &dir.join("dest"), false, false)
        .await
        .map(drop);
    (result, sent)
}

async fn copy_script(script: Vec<Response>) -> (tempfile::TempDir, Result<(), ClientError>) {
    let dir = common::temp_dir();
    let (result, _) = copy_from_fake(dir.path(), Fake::Copy(script), Limits::default()).await;
    (dir, result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn climbing_and_absolute_paths_are_refused() {
    for bad in [
        "../escape",
        "root/../../escape",
        "root/./x",
        "/tmp/guest-client-abs-escape",
    ] {
        let script = vec![
            Response::Header(dir_entry("root")),
            end(),
            Response::Header(file(bad, 5)),
            Response::Data(b"pwned".to_vec()),
            end(),
        ];
        let (dir, result) = copy_script(script).await;
        assert_refused(result.unwrap_err(), bad);
        assert_eq!(
            listing(dir.path()),
            ["dest", "dest/root", "vsock.sock"],
            "for {bad:?}"
        );
        assert!(!Path::new("/tmp/guest-client-abs-escape").exists());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_targets_that_leave_the_destination_are_refused() {
    for target in ["../../outside", "/etc", "sub/../../.."] {
        let script = vec![
            Response::Header(dir_entry("root")),
            end(),
            Response::Header(link("root/l", target)),
            end(),
        ];
        let (dir, result) = copy_script(script).await;
        assert_refused(result.unwrap_err(), "root/l");
        assert_eq!(
            listing(dir.path()),
            ["dest", "dest/root", "vsock.sock"],
            "for {target:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_written_through_a_symlink() {
    // A link the transfer itself created (to a directory inside), then a file through it.
    let script = vec![
        Response::Header(dir_entry("root")),
        end(),
        Response::Header(dir_entry("root/sub")),
        end(),
        Response::Header(link("root/l", "sub")),
        end(),
        Response::Header(file("root/l/x", 5)),
        Response::Data(b"pwned".to_vec()),
        end(),
    ];
    let (dir, result) = copy_script(script).await;
    assert_refused(result.unwrap_err(), "root/l/x");
    assert_eq!(
        listing(dir.path()),
        [
            "dest",
            "dest/root",
            "dest/root/l",
            "dest/root/sub",
            "vsock.sock"
        ]
    );

    // A file over a link replaces the link; the link's target is untouched.
    let script = vec![
        Response::Header(dir_entry("root")),
        end(),
        Response::Header(link("root/f", "target")),
        end(),
        Response::Header(file("root/f", 5)),
        Response::Data(b"plain".to_vec()),
        end(),
    ];
    let (dir, result) = copy_script(script).await;
    result.unwrap();
    let f = dir.path().join("dest/root/f");
    assert!(std::fs::symlink_metadata(&f).unwrap().is_file());
    assert_eq!(std::fs::read(&f).unwrap(), b"plain");
    assert!(!dir.path().join("dest/root/target").exists());

    // A link already in the destination, pointing outside it, is not followed either.
    let dir = common::temp_dir();
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::create_dir_all(dir.path().join("dest/root")).unwrap();
    std::os::unix::fs::symlink(&outside, dir.path().join("dest/root/escape")).unwrap();
    let script = vec![
        Response::Header(file("root/escape/x", 5)),
        Response::Data(b"pwned".to_vec()),
        end(),
    ];
    let (result, _) = copy_from_fake(dir.path(), Fake::Copy(script), Limits::default()).await;
    let err = result.unwrap_err();
    assert_refused(err, "root/escape/x");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_of_1_kib_followed_by_2_gib_is_stopped_early() {
    let dir = common::temp_dir();
    let fake = Fake::Oversized {
        announced: 1024,
        total: 2 << 30,
    };
    let (result, sent) = copy_from_fake(dir.path(), fake, Limits::default()).await;
    let err = result.unwrap_err();
    assert_refused(err, "root");
    assert!(
        listing(&dir.path().join("dest")).is_empty(),
        "no file, no temporary"
    );
    // HTTP/2 flow control held the guest back: it could send no more than our windows.
    let sent = sent.load(Ordering::Relaxed);
    assert!(sent < 16 << 20, "the fake pushed {sent} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announced_sizes_and_entry_counts_are_capped() {
    let dir = common::temp_dir();
    let limits = Limits {
        max_copy_bytes: 1 << 20,
        max_copy_entries: 100,
        ..Limits::default()
    };
    let fake = Fake::Oversized {
        announced: 1 << 40,
        total: 0,
    };
    let (result, _) = copy_from_fake(dir.path(), fake, limits).await;
    let err = result.unwrap_err();
    assert_too_large(&err, "file bytes");

    let dir = common::temp_dir();
    let (result, _) = copy_from_fake(dir.path(), Fake::EndlessEntries, limits).await;
    let err = result.unwrap_err();
    assert_too_large(&err, "entries");

    // Errors count as entries: 1 MiB messages, forever, are cut off at the same limit.
    let dir = common::temp_dir();
    let (result, _) = copy_from_fake(dir.path(), Fake::EndlessErrors, limits).await;
    let err = result.unwrap_err();
    assert_too_large(&err, "entries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_output_and_huge_messages_are_cut_off() {
    let dir = common::temp_dir();
    let limits = Limits {
        max_captured_output: 1 << 20,
        ..Limits::default()
    };
    let (client, sent) = fake_client(dir.path(), Fake::EndlessStdout, limits).await;
    let err = client
        .exec_output(ExecSpec::command(["yes"]), b"")
        .await
        .unwrap_err();
    assert_too_large(&err, "exec output");
    let sent = sent.load(Ordering::Relaxed);
    assert!(sent < 16 << 20, "the fake pushed {sent} bytes");

    let dir = common::temp_dir();
    let (result, _) = copy_from_fake(dir.path(), Fake::HugeMessage, Limits::default()).await;
    let err = result.unwrap_err();
    assert!(
        matches!(err, ClientError::Grpc(grpc::GrpcError::TooLarge { .. })),
        "{err}"
    );
}
