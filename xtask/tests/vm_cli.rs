//! `cargo xtask vm exec|cp` against the real agent behind a stand-in for Cloud Hypervisor's
//! hybrid vsock socket (`CONNECT 2222` → `OK 2222`), the agent in this test process.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

fn hybrid_agent_socket(dir: &Path) -> PathBuf {
    let path = dir.join("vsock.sock");
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut line = [0u8; 13];
            stream.read_exact(&mut line).await.unwrap();
            assert_eq!(&line, b"CONNECT 2222\n");
            stream.write_all(b"OK 2222\n").await.unwrap();
            tokio::spawn(guest_agent::serve_connection(stream));
        }
    });
    path
}

async fn xtask(args: &[&str], stdin: &[u8]) -> std::process::Output {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).await.unwrap();
    drop(input);
    child.wait_with_output().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_exec_streams_and_returns_the_exit_code_and_vm_cp_copies_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let socket = hybrid_agent_socket(dir.path());
    let socket = socket.to_str().unwrap();

    let out = xtask(
        &[
            "vm",
            "exec",
            "--socket",
            socket,
            "-e",
            "WHO=dev",
            "--",
            "sh",
            "-c",
            "cat; echo $WHO; echo oops >&2; exit 3",
        ],
        b"from stdin\n",
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from stdin\ndev\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n");
    assert_eq!(out.status.code(), Some(3));

    let src = dir.path().join("src.txt");
    std::fs::write(&src, b"payload").unwrap();
    let guest = dir.path().join("guest/copy.txt");
    let out = xtask(
        &[
            "vm",
            "cp",
            "--socket",
            socket,
            src.to_str().unwrap(),
            &format!("guest:{}", guest.display()),
        ],
        b"",
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&guest).unwrap(), b"payload");

    let back = dir.path().join("back");
    let out = xtask(
        &[
            "vm",
            "cp",
            "--socket",
            socket,
            &format!("guest:{}", guest.display()),
            back.to_str().unwrap(),
        ],
        b"",
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(back.join("copy.txt")).unwrap(), b"payload");

    let out = xtask(&["vm", "cp", "--socket", socket, "a", "b"], b"").await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("guest:PATH"));
}

/// `vm exec --tty` on a terminal (a pty of the test's, whatever runs the tests): the command
/// starts with the local terminal's size, and a resize of the local terminal (SIGWINCH to
/// `vm exec`) reaches the command's terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_exec_tty_starts_with_the_local_size_and_follows_a_resize() {
    let dir = tempfile::tempdir().unwrap();
    let socket = hybrid_agent_socket(dir.path());
    let pty = testkit::pty::Pty::open(24, 80).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_xtask"));
    cmd.args(["vm", "exec", "--tty", "--socket"])
        .arg(&socket)
        .args(["--", "sh", "-c", testkit::pty::FOLLOWS_A_RESIZE]);
    pty.attach(&mut cmd).unwrap();
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    // Hang guards, not timings.
    let guard = std::time::Duration::from_secs(60);
    tokio::task::block_in_place(|| {
        pty.wait_for("ready", guard).unwrap();
        assert!(pty.screen().contains("size 24 80\r\n"), "{}", pty.screen());
        pty.resize(50, 132).unwrap();
        pty.wait_for("resized to 50 132", guard).unwrap();
        // `vm exec` ends with the command although its stdin (the terminal) never ends.
        let deadline = std::time::Instant::now() + guard;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() >= deadline {
                child.kill().unwrap();
                panic!(
                    "vm exec --tty did not exit after its command:\n{}",
                    pty.screen()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        assert_eq!(status.code(), Some(4), "{}", pty.screen());
    });
}
