//! The wire contract holds for a client that is not ours: Python's grpcio, with stubs
//! generated independently from guest.proto by grpc_tools, runs an exec, a stat and copies
//! against the agent (served on a plain Unix socket, which grpcio dials as `unix:PATH`).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

const PYTHON: &str = "/usr/bin/python3";

fn require_grpcio() {
    let ok = Command::new(PYTHON)
        .args(["-c", "import grpc, grpc_tools.protoc"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "this test needs Debian's grpcio and grpc-tools: apt-get install -y python3-grpcio python3-grpc-tools \
         (cargo xtask test installs them)"
    );
}

#[tokio::test]
async fn python_grpcio_runs_exec_stat_and_copies() {
    require_grpcio();
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let proto_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-agent-proto/proto");
    let status = Command::new(PYTHON)
        .args(["-m", "grpc_tools.protoc"])
        .arg(format!("-I{}", proto_dir.display()))
        .arg(format!("--python_out={}", work.display()))
        .arg(format!("--grpc_python_out={}", work.display()))
        .arg("guest.proto")
        .status()
        .unwrap();
    assert!(status.success(), "grpc_tools.protoc failed on guest.proto");
    std::fs::write(work.join("data.txt"), b"from the guest\n").unwrap();

    let socket = work.join("agent.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(guest_agent::serve_connection(stream));
        }
    });

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python_client.py");
    let output = tokio::process::Command::new(PYTHON)
        .arg(&script)
        .arg(&socket)
        .arg(work)
        .env("PYTHONPATH", work)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "python client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "exec hi err 3",
            "stat True True 15",
            "header data.txt 15",
            "end True",
            "data from the guest",
            "copy True 5",
        ]
    );
    let uploaded = work.join("up.txt");
    assert_eq!(std::fs::read(&uploaded).unwrap(), b"hello");
    assert_eq!(std::fs::metadata(&uploaded).unwrap().mode() & 0o777, 0o600);
}
