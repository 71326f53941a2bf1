//! The guest agent proven in a real VM over real virtio-vsock, through `guest-client` (and,
//! for the wire contract, Python's grpcio): exec, tty, timeouts, cancellation, concurrency,
//! copies and stat. Every test shares one VM booted once per process (`agent_vm`); each works
//! in its own guest directory. Waits are hang guards, never assertions on speed.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;
use std::time::Duration;

use guest_client::{Client, ExecEvent, ExecOutput, ExecSpec, Output};
use sha2::{Digest, Sha256};
use testkit::agent_guest::{self, AgentVm, eventually, shared_agent_vm};
use testkit::noise::Noise;

/// How long one step may hang before the test gives up (TCG on a shared machine is slow).
const STEP: Duration = Duration::from_secs(300);

async fn client() -> (&'static AgentVm, Client) {
    let vm = tokio::task::block_in_place(shared_agent_vm);
    let client = vm.connect().await.unwrap();
    (vm, client)
}

/// Runs `spec` with `stdin` to its end.
async fn run(client: &Client, spec: ExecSpec, stdin: &[u8]) -> Output {
    let what = format!("{:?}", spec.command);
    tokio::time::timeout(STEP, client.exec_output(spec, stdin))
        .await
        .unwrap_or_else(|_| panic!("exec {what}: no exit within {STEP:?}"))
        .unwrap_or_else(|e| panic!("exec {what}: {e}"))
}

/// `sh -c script`'s output, asserting it exited 0.
async fn sh(client: &Client, script: &str) -> String {
    let out = run(client, ExecSpec::command(["sh", "-c", script]), b"").await;
    assert_eq!(
        out.exit_code,
        0,
        "sh -c {script:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Reads output until what arrived so far contains `needle`; returns everything read.
async fn read_until(output: &mut ExecOutput, seen: &mut Vec<u8>, needle: &str) {
    let wait = async {
        while !text(seen).contains(needle) {
            match output.next().await.unwrap() {
                Some(ExecEvent::Stdout(bytes) | ExecEvent::Stderr(bytes)) => {
                    seen.extend_from_slice(&bytes)
                }
                other => panic!(
                    "waiting for {needle:?}, got {other:?} after {:?}",
                    text(seen)
                ),
            }
        }
    };
    tokio::time::timeout(STEP, wait)
        .await
        .unwrap_or_else(|_| panic!("no {needle:?} within {STEP:?}; so far {:?}", text(seen)));
}

/// Reads to the exit code, keeping the output.
async fn exit_code(output: &mut ExecOutput, seen: &mut Vec<u8>) -> i32 {
    let wait = async {
        loop {
            match output.next().await.unwrap() {
                Some(ExecEvent::Stdout(bytes) | ExecEvent::Stderr(bytes)) => {
                    seen.extend_from_slice(&bytes)
                }
                Some(ExecEvent::Exit(code)) => return code,
                None => panic!("the exec ended without an exit code"),
            }
        }
    };
    tokio::time::timeout(STEP, wait)
        .await
        .unwrap_or_else(|_| panic!("no exit within {STEP:?}; output {:?}", text(seen)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_output_exit_codes_env_cwd_user_and_the_default_shell() {
    let (_vm, client) = client().await;

    let out = run(&client, ExecSpec::command(["echo", "hi"]), b"").await;
    assert_eq!((text(&out.stdout).as_str(), out.exit_code), ("hi\n", 0));

    let out = run(&client, ExecSpec::command(["sh", "-c", "exit 7"]), b"").await;
    assert_eq!(out.exit_code, 7, "exit 7");

    let out = run(
        &client,
        ExecSpec::command(["sh", "-c", "echo to-out; echo to-err >&2"]),
        b"",
    )
    .await;
    assert_eq!(
        (text(&out.stdout).as_str(), text(&out.stderr).as_str()),
        ("to-out\n", "to-err\n"),
        "stdout and stderr kept apart"
    );

    // The exec's env sits over the application's (config.json's `env`).
    let mut spec = ExecSpec::command(["sh", "-c", "echo $GREETING $APP_DEFAULT"]);
    spec.env.insert("GREETING".into(), "hello".into());
    let out = run(&client, spec, b"").await;
    assert_eq!(
        text(&out.stdout),
        "hello from-config\n",
        "env over the app's"
    );
    let mut spec = ExecSpec::command(["sh", "-c", "echo $APP_DEFAULT"]);
    spec.env.insert("APP_DEFAULT".into(), "overridden".into());
    assert_eq!(text(&run(&client, spec, b"").await.stdout), "overridden\n");

    let mut spec = ExecSpec::command(["pwd"]);
    spec.cwd = "/tmp".into();
    assert_eq!(text(&run(&client, spec, b"").await.stdout), "/tmp\n", "cwd");

    let mut spec = ExecSpec::command(["sh", "-c", "id -u; id -g; echo $HOME"]);
    spec.user = "app".into();
    assert_eq!(
        text(&run(&client, spec, b"").await.stdout),
        "1000\n1000\n/home/app\n",
        "user app"
    );
    let mut spec = ExecSpec::command(["id", "-u"]);
    spec.user = "1000:2000".into();
    let mut spec_group = spec.clone();
    assert_eq!(text(&run(&client, spec, b"").await.stdout), "1000\n");
    spec_group.command = vec!["id".into(), "-g".into()];
    assert_eq!(text(&run(&client, spec_group, b"").await.stdout), "2000\n");

    // No command: /bin/sh, reading its script from stdin.
    let out = run(
        &client,
        ExecSpec::default(),
        b"echo from-the-default-shell; exit 4\n",
    )
    .await;
    assert_eq!(
        (text(&out.stdout).as_str(), out.exit_code),
        ("from-the-default-shell\n", 4),
        "an empty command runs /bin/sh"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_mib_of_stdin_round_trip_through_cat() {
    let (_vm, client) = client().await;
    let input = Noise::new(20).bytes(20 << 20);
    let out = run(&client, ExecSpec::command(["cat"]), &input).await;
    assert_eq!(out.exit_code, 0, "{}", text(&out.stderr));
    assert_eq!(out.stdout.len(), input.len(), "bytes through cat");
    assert_eq!(
        sha256_hex(&out.stdout),
        sha256_hex(&input),
        "sha256 through cat"
    );
}

/// Output is live: the first line arrives while the process is still blocked before its
/// second (the process waits for a file only the test creates, after seeing the first line).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_arrives_while_the_process_runs() {
    let (_vm, client) = client().await;
    sh(&client, "rm -rf /tmp/live && mkdir -p /tmp/live").await;
    let script = "echo first; while [ ! -e /tmp/live/gate ]; do sleep 0.2; done; \
                  echo second; sleep 3; echo third";
    let mut exec = client
        .exec(ExecSpec::command(["sh", "-c", script]))
        .await
        .unwrap();
    let mut seen = Vec::new();
    read_until(&mut exec.output, &mut seen, "first\n").await;
    assert_eq!(text(&seen), "first\n", "nothing past the gate yet");
    sh(&client, "touch /tmp/live/gate").await;
    read_until(&mut exec.output, &mut seen, "second\n").await;
    assert_eq!(text(&seen), "first\nsecond\n", "the sleep 3 still runs");
    assert_eq!(exit_code(&mut exec.output, &mut seen).await, 0);
    assert_eq!(text(&seen), "first\nsecond\nthird\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tty_names_resizes_and_interrupts() {
    let (_vm, client) = client().await;
    let tty = |command: &[&str]| ExecSpec {
        tty: true,
        window_size: Some((24, 80)),
        ..ExecSpec::command(command.iter().copied())
    };

    let out = run(&client, tty(&["tty"]), b"").await;
    let name = text(&out.stdout);
    assert!(
        name.trim_end()
            .strip_prefix("/dev/pts/")
            .is_some_and(|n| n.parse::<u32>().is_ok()),
        "tty printed {name:?}"
    );
    assert_eq!(out.exit_code, 0);

    // The initial size, then the size after a resize, from the same shell.
    let mut exec = client.exec(tty(&["sh"])).await.unwrap();
    let mut seen = Vec::new();
    exec.input
        .write(b"stty size; echo SIZE-\"\"ONE\n")
        .await
        .unwrap();
    read_until(&mut exec.output, &mut seen, "SIZE-ONE").await;
    assert!(
        text(&seen).contains("24 80"),
        "initial size: {:?}",
        text(&seen)
    );
    exec.input.resize(50, 132).await.unwrap();
    exec.input
        .write(b"stty size; echo SIZE-\"\"TWO\n")
        .await
        .unwrap();
    read_until(&mut exec.output, &mut seen, "SIZE-TWO").await;
    let after = text(&seen);
    let after = &after[after.find("SIZE-ONE").unwrap()..];
    assert!(after.contains("50 132"), "size after the resize: {after:?}");
    exec.input.write(b"exit 0\n").await.unwrap();
    assert_eq!(exit_code(&mut exec.output, &mut seen).await, 0);

    // Ctrl-C through the tty's line discipline interrupts the foreground process.
    let mut exec = client
        .exec(tty(&["sh", "-c", "echo READY; exec sleep 100"]))
        .await
        .unwrap();
    let mut seen = Vec::new();
    read_until(&mut exec.output, &mut seen, "READY").await;
    exec.input.write(&[0x03]).await.unwrap();
    assert_eq!(
        exit_code(&mut exec.output, &mut seen).await,
        128 + 2,
        "Ctrl-C: SIGINT"
    );

    // Closing stdin (not the call) is EOF for a tty process too; the call stays open for the
    // exit code.
    let mut exec = client.exec(tty(&["cat"])).await.unwrap();
    let mut seen = Vec::new();
    exec.input.write(b"typed\n").await.unwrap();
    read_until(&mut exec.output, &mut seen, "typed\r\ntyped\r\n").await;
    exec.input.close_stdin().await.unwrap();
    assert_eq!(
        exit_code(&mut exec.output, &mut seen).await,
        0,
        "cat saw EOF"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_signals_and_dropped_clients_end_their_processes() {
    let (vm, client) = client().await;
    let spec = ExecSpec {
        timeout_seconds: 1,
        ..ExecSpec::command(["sleep", "100"])
    };
    assert_eq!(
        run(&client, spec, b"").await.exit_code,
        124,
        "timeout_seconds 1"
    );

    // A signal request reaches the running process.
    let mut exec = client
        .exec(ExecSpec::command([
            "sh",
            "-c",
            "echo READY; exec sleep 100",
        ]))
        .await
        .unwrap();
    let mut seen = Vec::new();
    read_until(&mut exec.output, &mut seen, "READY").await;
    exec.input.signal(15).await.unwrap();
    assert_eq!(
        exit_code(&mut exec.output, &mut seen).await,
        128 + 15,
        "SIGTERM"
    );

    // One exec dropped (its stream reset) while the connection stays: its process group dies.
    let mut exec = client
        .exec(ExecSpec::command([
            "sh",
            "-c",
            "sleep 1000 & echo $$ $!; wait",
        ]))
        .await
        .unwrap();
    let mut seen = Vec::new();
    read_until(&mut exec.output, &mut seen, "\n").await;
    drop(exec);
    assert_all_gone(&client, &text(&seen)).await;

    // A client in its own runtime starts a process group (a shell and its background sleep),
    // reads their pids, then goes away with its runtime (the vsock connection closes).
    let socket = vm.socket.clone();
    let pids = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let client = Client::connect(&socket, guest_client::AGENT_PORT)
                .await
                .unwrap();
            let script = "sleep 1000 & echo $$ $!; wait";
            let mut exec = client
                .exec(ExecSpec::command(["sh", "-c", script]))
                .await
                .unwrap();
            let mut seen = Vec::new();
            read_until(&mut exec.output, &mut seen, "\n").await;
            text(&seen)
        })
    })
    .join()
    .unwrap();
    assert_all_gone(&client, &pids).await;
}

/// Waits until every pid in `pids` (whitespace-separated: a shell's and its child's) is gone
/// from the guest's /proc, asked through `client`.
async fn assert_all_gone(client: &Client, pids: &str) {
    let pids: Vec<u32> = pids
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 2, "the shell's and the sleep's pids");
    for pid in pids {
        let check = format!("if [ -d /proc/{pid} ]; then echo alive; else echo gone; fi");
        eventually(&format!("pid {pid} killed"), STEP, || {
            let check = check.clone();
            let client = client.clone();
            async move { (sh(&client, &check).await == "gone\n").then_some(()) }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_execs_on_one_connection() {
    let (_vm, client) = client().await;
    let tasks: Vec<_> = (0..16)
        .map(|n| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut spec = ExecSpec::command([
                    "sh",
                    "-c",
                    "echo out-$N; sleep 1; echo err-$N >&2; exit $N",
                ]);
                spec.env.insert("N".into(), n.to_string());
                (n, run(&client, spec, b"").await)
            })
        })
        .collect();
    for task in tasks {
        let (n, out) = task.await.unwrap();
        assert_eq!(
            (text(&out.stdout), text(&out.stderr), out.exit_code),
            (format!("out-{n}\n"), format!("err-{n}\n"), n),
            "exec {n}"
        );
    }
}

/// A host tree's entries by relative path: (kind, mode, mtime of files, bytes or link target).
fn tree_of(root: &Path) -> BTreeMap<String, (char, u32, i64, Vec<u8>)> {
    let mut entries = BTreeMap::new();
    for entry in walkdir::WalkDir::new(root).sort_by_file_name() {
        let entry = entry.unwrap();
        let rel = entry
            .path()
            .strip_prefix(root)
            .unwrap()
            .display()
            .to_string();
        let meta = entry.path().symlink_metadata().unwrap();
        let (kind, mtime, content) = if meta.is_symlink() {
            let target = std::fs::read_link(entry.path()).unwrap();
            ('l', 0, target.into_os_string().into_encoded_bytes())
        } else if meta.is_dir() {
            ('d', 0, Vec::new())
        } else {
            ('f', meta.mtime(), std::fs::read(entry.path()).unwrap())
        };
        let mode = if kind == 'l' { 0 } else { meta.mode() & 0o7777 };
        entries.insert(rel, (kind, mode, mtime, content));
    }
    entries
}

fn set_mtime(path: &Path, secs: i64) {
    let file = std::fs::File::options().write(true).open(path).unwrap();
    let time = std::time::UNIX_EPOCH + Duration::from_secs(secs as u64);
    file.set_times(
        std::fs::FileTimes::new()
            .set_modified(time)
            .set_accessed(time),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_a_big_file_and_a_tree_in_and_out_with_their_metadata() {
    let (_vm, client) = client().await;
    let host = tempfile::tempdir().unwrap();
    sh(&client, "rm -rf /tmp/copy && mkdir -p /tmp/copy").await;

    // 50 MiB in, checked in the guest, and out again.
    let big = Noise::new(50).bytes(50 << 20);
    let big_path = host.path().join("big.bin");
    std::fs::write(&big_path, &big).unwrap();
    let written = tokio::time::timeout(STEP, client.copy_to_guest(&big_path, "/tmp/copy/big.bin"))
        .await
        .expect("copying 50 MiB in: hang guard")
        .unwrap();
    assert_eq!(written, big.len() as i64);
    let guest_sum = sh(&client, "sha256sum /tmp/copy/big.bin").await;
    assert_eq!(
        guest_sum.split_whitespace().next(),
        Some(sha256_hex(&big).as_str()),
        "the guest's copy"
    );
    let out = host.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let report = tokio::time::timeout(
        STEP,
        client.copy_from_guest("/tmp/copy/big.bin", &out, false, false),
    )
    .await
    .expect("copying 50 MiB out: hang guard")
    .unwrap();
    assert_eq!((report.entries, report.bytes), (1, big.len() as u64));
    let back = std::fs::read(out.join("big.bin")).unwrap();
    assert!(back == big, "the 50 MiB file came back different");

    // A tree with modes, an mtime and a symlink.
    let tree = host.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("a.txt"), b"alpha\n").unwrap();
    std::fs::write(tree.join("sub/run.sh"), b"#!/bin/sh\necho run\n").unwrap();
    symlink("a.txt", tree.join("link")).unwrap();
    for (path, mode) in [("a.txt", 0o640), ("sub/run.sh", 0o755), ("sub", 0o750)] {
        std::fs::set_permissions(tree.join(path), std::fs::Permissions::from_mode(mode)).unwrap();
    }
    set_mtime(&tree.join("a.txt"), 1_000_000_000);
    set_mtime(&tree.join("sub/run.sh"), 1_234_567_890);
    client.copy_to_guest(&tree, "/tmp/copy/tree").await.unwrap();

    // The guest sees the metadata.
    let s = client.stat("/tmp/copy/tree/a.txt", false).await.unwrap();
    assert!(s.exists && s.is_file, "{s:?}");
    assert_eq!(
        (s.mode & 0o7777, s.size, s.mtime),
        (0o640, 6, 1_000_000_000)
    );
    let s = client.stat("/tmp/copy/tree/link", false).await.unwrap();
    assert!(s.is_symlink && s.link_target == "a.txt", "{s:?}");
    assert_eq!(sh(&client, "/tmp/copy/tree/sub/run.sh").await, "run\n");

    let out = host.path().join("tree-out");
    std::fs::create_dir(&out).unwrap();
    client
        .copy_from_guest("/tmp/copy/tree", &out, false, false)
        .await
        .unwrap();
    let (sent, got) = (tree_of(&tree), tree_of(&out.join("tree")));
    assert_eq!(
        sent.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>(),
        "the same entries"
    );
    for (path, entry) in &sent {
        assert_eq!(&got[path], entry, "{path}: (kind, mode, mtime, content)");
    }
}

/// A copy in whose connection is cut mid-file leaves neither the file nor a temporary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_in_cut_mid_transfer_leaves_no_file() {
    use guest_agent_proto::grpc;
    use guest_agent_proto::pb::copy_to_guest_request::Request;
    use guest_agent_proto::pb::{CopyToGuestRequest, CopyToGuestStart};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

    let (vm, client) = client().await;
    sh(&client, "rm -rf /tmp/cut && mkdir -p /tmp/cut").await;

    let mut stream = tokio::net::UnixStream::connect(&vm.socket).await.unwrap();
    stream.write_all(b"CONNECT 2222\n").await.unwrap();
    let mut stream = tokio::io::BufReader::new(stream);
    let mut ok = String::new();
    stream.read_line(&mut ok).await.unwrap();
    assert!(ok.starts_with("OK "), "{ok:?}");
    let (h2, connection) = h2::client::handshake(stream.into_inner()).await.unwrap();
    let driver = tokio::spawn(connection);
    let mut h2 = h2.ready().await.unwrap();
    let request = http::Request::post(format!("http://agent{}", grpc::method::COPY_TO_GUEST))
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    let (_response, mut send) = h2.send_request(request, false).unwrap();
    let msg = |r| CopyToGuestRequest { request: Some(r) };
    let start = CopyToGuestStart {
        path: "/tmp/cut/big.bin".into(),
        mode: 0o644,
        size: 8 << 20,
        ..Default::default()
    };
    grpc::send_message(&mut send, &msg(Request::Start(start)))
        .await
        .unwrap();
    grpc::send_message(&mut send, &msg(Request::Data(vec![7; 256 << 10])))
        .await
        .unwrap();
    // The temporary exists while the transfer runs...
    eventually("the copy's temporary file", STEP, || {
        let client = client.clone();
        async move { (sh(&client, "ls -A /tmp/cut").await.lines().count() == 1).then_some(()) }
    })
    .await;
    // ...and the connection is cut.
    drop(send);
    drop(h2);
    driver.abort();
    eventually("nothing left of the cut copy", STEP, || {
        let client = client.clone();
        async move { sh(&client, "ls -A /tmp/cut").await.is_empty().then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stat_of_a_file_a_directory_a_symlink_and_a_missing_path() {
    let (_vm, client) = client().await;
    sh(
        &client,
        "rm -rf /tmp/stat && mkdir -p /tmp/stat/dir && printf 12345 > /tmp/stat/file && \
         chmod 604 /tmp/stat/file && ln -s file /tmp/stat/link",
    )
    .await;
    let s = client.stat("/tmp/stat/file", false).await.unwrap();
    assert!(s.exists && s.is_file && !s.is_dir && !s.is_symlink, "{s:?}");
    assert_eq!((s.size, s.mode & 0o7777), (5, 0o604));
    let s = client.stat("/tmp/stat/dir", false).await.unwrap();
    assert!(s.exists && s.is_dir && !s.is_file, "{s:?}");
    let s = client.stat("/tmp/stat/link", false).await.unwrap();
    assert!(s.exists && s.is_symlink && !s.is_file, "{s:?}");
    assert_eq!(s.link_target, "file");
    let s = client.stat("/tmp/stat/link", true).await.unwrap();
    assert!(s.exists && s.is_file && !s.is_symlink, "following: {s:?}");
    let s = client.stat("/tmp/stat/missing", false).await.unwrap();
    assert!(!s.exists && s.error.is_empty(), "{s:?}");
}

/// A relay for a client that knows nothing of hybrid vsock (grpcio dials `unix:PATH`): each
/// connection to `listen` is connected through `hybrid` with `CONNECT 2222`, then spliced.
fn connect_relay(listen: &Path, hybrid: &Path) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let listener = tokio::net::UnixListener::bind(listen).unwrap();
    let hybrid = hybrid.to_owned();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let hybrid = hybrid.clone();
            tokio::spawn(async move {
                let mut guest = tokio::net::UnixStream::connect(&hybrid).await?;
                guest.write_all(b"CONNECT 2222\n").await?;
                // One byte at a time: nothing past the reply line is consumed here.
                let mut reader = tokio::io::BufReader::with_capacity(1, guest);
                let mut line = String::new();
                reader.read_line(&mut line).await?;
                if !line.starts_with("OK ") {
                    return Err(std::io::Error::other(format!("CONNECT 2222: {line:?}")));
                }
                let mut guest = reader.into_inner();
                tokio::io::copy_bidirectional(&mut client, &mut guest).await?;
                std::io::Result::Ok(())
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_runs_an_exec_a_copy_and_a_stat_against_the_vm() {
    const PYTHON: &str = "/usr/bin/python3";
    let ok = std::process::Command::new(PYTHON)
        .args(["-c", "import grpc, grpc_tools.protoc"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "this test needs Debian's grpcio and grpc-tools: apt-get install -y python3-grpcio \
         python3-grpc-tools (cargo xtask test installs them)"
    );
    let (vm, client) = client().await;
    sh(
        &client,
        "rm -rf /tmp/py && mkdir -p /tmp/py && echo 'from the guest' > /tmp/py/data.txt",
    )
    .await;

    let host = tempfile::tempdir().unwrap();
    let workspace = xtask::workspace_root();
    let status = std::process::Command::new(PYTHON)
        .args(["-m", "grpc_tools.protoc"])
        .arg(format!(
            "-I{}",
            workspace.join("guest-agent-proto/proto").display()
        ))
        .arg(format!("--python_out={}", host.path().display()))
        .arg(format!("--grpc_python_out={}", host.path().display()))
        .arg("guest.proto")
        .status()
        .unwrap();
    assert!(status.success(), "grpc_tools.protoc failed on guest.proto");
    let relay = host.path().join("relay.sock");
    connect_relay(&relay, &vm.socket);

    // The script guest-agent's own Python test runs, here against the VM: its work dir is the
    // guest's /tmp/py.
    let output = tokio::time::timeout(
        STEP,
        tokio::process::Command::new(PYTHON)
            .arg(workspace.join("guest-agent/tests/python_client.py"))
            .arg(&relay)
            .arg("/tmp/py")
            .env("PYTHONPATH", host.path())
            .output(),
    )
    .await
    .expect("the python client: hang guard")
    .unwrap();
    let stdout = text(&output.stdout);
    assert!(
        output.status.success(),
        "python client failed:\n{stdout}\n{}",
        text(&output.stderr)
    );
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            "exec hi err 3",
            "stat True True 15",
            "header data.txt 15",
            "end True",
            "data from the guest",
            "copy True 5",
        ]
    );
    assert_eq!(sh(&client, "cat /tmp/py/up.txt").await, "hello");
    let s = client.stat("/tmp/py/up.txt", false).await.unwrap();
    assert_eq!(s.mode & 0o7777, 0o600, "{s:?}");
}

/// `cargo xtask vm run --vsock-socket S` (a store made by `cargo xtask artifacts` from a lock
/// pinning this machine's Debian kernel, its initrd carrying the vsock modules and the agent) gives the
/// guest a vsock device whose host side is S: `cargo xtask vm exec --socket S` reaches the
/// agent (`--tty` too, following the local terminal's size), and the run ends with the app's
/// exit code. Its own VM: this is the CLI's path.
#[test]
fn vm_run_with_a_vsock_socket_is_reached_by_vm_exec() {
    use std::process::{Command, Stdio};
    use testkit::vm::{Kernel, TEST_MODULES, VSOCK_MODULES, busybox_rootfs};

    let xtask = env!("CARGO_BIN_EXE_xtask");
    let work = tempfile::tempdir().unwrap();
    let kernel = Kernel::debian_cloud().unwrap();
    let image = std::fs::read(&kernel.image).unwrap();
    let modules: Vec<&str> = TEST_MODULES.iter().chain(VSOCK_MODULES).copied().collect();
    let lock = serde_json::json!({
        "schema": 1,
        "defaults": { "kernel": "debian-cloud", "initrd": "vsock-e2e" },
        "kernels": { "debian-cloud": { "x86_64": {
            "url": format!("file://{}", kernel.image.display()),
            "sha256": system::hash::sha256_bytes(&image).hex(),
            "size": image.len(),
        } } },
        "initrds": { "vsock-e2e": { "modules": modules, "agent": true, "outputs": {} } },
    });
    let lock_path = work.path().join("artifacts.lock");
    let lock = system::Lock::parse(&lock.to_string()).unwrap();
    std::fs::write(&lock_path, lock.to_json()).unwrap();
    let data_dir = work.path().join("data");
    let out = Command::new(xtask)
        .args(["artifacts", "--lock"])
        .arg(&lock_path)
        .arg("--data-dir")
        .arg(&data_dir)
        .args(["--arch", "x86_64", "--offline", "--modules-dir"])
        .arg(&kernel.modules)
        .env_remove("SYSTEM_DATA_DIR")
        .output()
        .unwrap();
    assert!(out.status.success(), "artifacts: {}", text(&out.stderr));

    let rootfs = work.path().join("rootfs");
    busybox_rootfs(system::Arch::X86_64, &rootfs, Path::new("/")).unwrap();
    let socket = work.path().join("vm.vsock");
    // The app waits until an exec creates /tmp/done; guest-init started the agent beside it.
    let app = "while [ ! -e /tmp/done ]; do sleep 0.2; done; exit 5";
    let mut run = Command::new(xtask)
        .args(["vm", "run", "--lock"])
        .arg(&lock_path)
        .arg("--data-dir")
        .arg(&data_dir)
        .arg("--rootfs")
        .arg(&rootfs)
        .arg("--vsock-socket")
        .arg(&socket)
        .args(["--", "/bin/sh", "-c", app])
        .env_remove("SYSTEM_DATA_DIR")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + testkit::vm::BOOT_TIMEOUT;
    let exec = loop {
        let exec = Command::new(xtask)
            .args(["vm", "exec", "--socket"])
            .arg(&socket)
            .args(["--", "sh", "-c", "echo hi-from-vm-exec; exit 3"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        // Until the guest's agent listens, the connect or the CONNECT handshake fails; a run
        // that already ended will never answer (its output below says why).
        let ended = run.try_wait().unwrap().is_some();
        if exec.status.code() == Some(3) || ended || std::time::Instant::now() >= deadline {
            break exec;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    // `vm exec --tty` on a terminal: the guest command starts with its size and follows a
    // resize. Whatever it shows, the app is then told to end.
    let tty_exec = (exec.status.code() == Some(3)).then(|| tty_exec_follows_a_resize(&socket));
    let done = Command::new(xtask)
        .args(["vm", "exec", "--socket"])
        .arg(&socket)
        .args(["--", "touch", "/tmp/done"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let run = run.wait_with_output().unwrap();
    let (console, log) = (text(&run.stdout), text(&run.stderr));
    assert_eq!(
        (exec.status.code(), text(&exec.stdout).as_str()),
        (Some(3), "hi-from-vm-exec\n"),
        "vm exec: {}\nvm run:\n{console}\n{log}",
        text(&exec.stderr)
    );
    if let Some(Err(err)) = tty_exec {
        panic!("vm exec --tty: {err:#}\nvm run:\n{console}\n{log}");
    }
    assert!(
        done.status.success(),
        "vm exec touch: {}",
        text(&done.stderr)
    );
    assert!(
        log.contains(&format!(
            "cargo xtask vm exec --socket {}",
            socket.display()
        )),
        "vm run names the exec command line:\n{log}"
    );
    assert_eq!(
        run.status.code(),
        Some(5),
        "the app's exit code:\n{console}\n{log}"
    );
    assert!(
        !socket.exists(),
        "the hybrid socket is removed with the daemon"
    );
}

/// `cargo xtask vm exec --tty` on a pty of the test's: the guest command prints the size it
/// started with (the pty's), then waits until a resize of the pty reaches it.
fn tty_exec_follows_a_resize(socket: &Path) -> anyhow::Result<()> {
    use std::process::Command;

    let pty = testkit::pty::Pty::open(24, 80)?;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xtask"));
    cmd.args(["vm", "exec", "--tty", "--socket"])
        .arg(socket)
        .args(["--", "sh", "-c", testkit::pty::FOLLOWS_A_RESIZE]);
    pty.attach(&mut cmd)?;
    let mut child = cmd.spawn()?;
    drop(cmd);
    let outcome = (|| {
        pty.wait_for("ready", STEP)?;
        anyhow::ensure!(
            pty.screen().contains("size 24 80\r\n"),
            "the guest started at another size:\n{}",
            pty.screen()
        );
        pty.resize(50, 132)?;
        pty.wait_for("resized to 50 132", STEP)?;
        let deadline = std::time::Instant::now() + STEP;
        loop {
            if let Some(status) = child.try_wait()? {
                anyhow::ensure!(
                    status.code() == Some(4),
                    "exited {status}:\n{}",
                    pty.screen()
                );
                return Ok(());
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "vm exec --tty did not exit after its command:\n{}",
                pty.screen()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    })();
    let _ = child.kill();
    let _ = child.wait();
    outcome
}

/// The same transport for an aarch64 guest (`-M virt`, TCG): the agent answers an exec and a
/// stat over vsock. Its own VM, dropped at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aarch64_guest_agent_answers_over_vsock() {
    let vm =
        tokio::task::block_in_place(|| agent_guest::agent_vm_for(system::Arch::Aarch64)).unwrap();
    let client = vm.connect().await.unwrap();
    let out = run(
        &client,
        ExecSpec::command(["sh", "-c", "uname -m; exit 6"]),
        b"",
    )
    .await;
    assert_eq!(
        (text(&out.stdout).as_str(), out.exit_code),
        ("aarch64\n", 6),
        "{}",
        vm.context()
    );
    let s = client.stat("/bin/busybox", false).await.unwrap();
    assert!(s.exists && s.is_file && s.size > 0, "{s:?}");
    // The agent answering came from the initrd: the image has none.
    let s = client.stat("/bin/guest-agent", false).await.unwrap();
    assert!(!s.exists, "{s:?}");
}
