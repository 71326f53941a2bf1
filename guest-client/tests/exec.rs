//! Exec against the real agent (in-process, over a Unix socket with the hybrid vsock
//! handshake): outputs, exit codes, stdin, tty, timeouts, cancellation, concurrency.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use guest_client::{ExecEvent, ExecSpec, Output};
use sha2::{Digest, Sha256};

fn sh(script: &str) -> ExecSpec {
    ExecSpec::command(["sh", "-c", script])
}

async fn run(client: &guest_client::Client, spec: ExecSpec, stdin: &[u8]) -> Output {
    client.exec_output(spec, stdin).await.expect("exec runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_exit_codes_env_cwd_and_default_shell() {
    let dir = common::temp_dir();
    let client = common::connect(&common::agent_socket(dir.path())).await;

    let out = run(&client, ExecSpec::command(["echo", "hi"]), b"").await;
    assert_eq!((out.stdout.as_slice(), out.exit_code), (&b"hi\n"[..], 0));

    assert_eq!(run(&client, sh("exit 7"), b"").await.exit_code, 7);

    let out = run(&client, sh("echo out; echo err >&2"), b"").await;
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");

    let mut spec = sh("echo $GREETING; pwd");
    spec.env = HashMap::from([("GREETING".to_owned(), "hello there".to_owned())]);
    spec.cwd = dir.path().display().to_string();
    let out = run(&client, spec, b"").await;
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("hello there\n{}\n", dir.path().display())
    );

    // An empty command is /bin/sh, reading its script from stdin.
    let out = run(&client, ExecSpec::default(), b"echo from-sh; exit 3\n").await;
    assert_eq!(
        (out.stdout.as_slice(), out.exit_code),
        (&b"from-sh\n"[..], 3)
    );

    let out = run(&client, ExecSpec::command(["/nonexistent/tool"]), b"").await;
    assert_eq!(out.exit_code, 127);
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/tool"));

    let mut spec = ExecSpec::command(["true"]);
    spec.cwd = "/nonexistent/dir".to_owned();
    let out = run(&client, spec, b"").await;
    assert_eq!(out.exit_code, 126);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cwd \"/nonexistent/dir\""), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_is_applied() {
    let dir = common::temp_dir();
    let client = common::connect(&common::agent_socket(dir.path())).await;
    let mut spec = sh("id -u; id -g");
    spec.user = "4242:4343".to_owned();
    let out = run(&client, spec, b"").await;
    if rustix::process::geteuid().is_root() {
        assert_eq!(out.stdout, b"4242\n4343\n");
        assert_eq!(out.exit_code, 0);
    } else {
        // Without root the switch is refused, and said so.
        assert_eq!(out.exit_code, 126);
        assert!(String::from_utf8_lossy(&out.stderr).contains("cannot run"));
    }
    let mut spec = sh("true");
    spec.user = "no-such-user-here".to_owned();
    let out = run(&client, spec, b"").await;
    assert_eq!(out.exit_code, 126);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-user-here"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_mib_of_stdin_round_trips_through_cat() {
    let dir = common::temp_dir();
    let client = common::connect(&common::agent_socket(dir.path())).await;
    let mut data = vec![0u8; 20 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for byte in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *byte = x as u8;
    }
    let out = run(&client, ExecSpec::command(["cat"]), &data).await;
    assert_eq!(out.exit_code, 0);
    assert_eq!(out.stdout.len(), data.len());
    assert_eq!(Sha256::digest(&out.stdout), Sha256::digest(&data));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_arrives_while_the_process_runs() {
    let dir = common::temp_dir();
    let client = common::connect(&common::agent_socket(dir.path())).await;
    // The process cannot go on until we answer: its first line must reach us before that.
    let mut exec = client
        .exec(sh("echo first; read reply; echo second $reply"))
        .await
        .unwrap();
    assert_eq!(
        exec.output.next().await.unwrap(),
        Some(ExecEvent::Stdout(b"first\n".to_vec()))
    );
    exec.input.write(b"go\n").await.unwrap();
    exec.input.close().await.unwrap();
    assert_eq!(
        exec.output.next().await.unwrap(),
        Some(ExecEvent::Stdout(b"second go\n".to_vec()))
    );
    assert_eq!(exec.output.next().await.unwrap(), Some(ExecEvent::Exit(0)));
}

async fn collect(exec: &mut guest_client::Exec) -> (String, i32) {
    let mut text = Vec::new();
    loop {
        match exec.output.next().await.unwrap() {
            Some(ExecEvent::Stdout(bytes)) | Some(ExecEvent::Stderr(bytes)) => text.extend(bytes),
            Some(ExecEvent::Exit(code)) => {
                return (String::from_utf8_lossy(&text).into_owned(), code);
            }
            None => panic!("exec ended without an exit code"),
        }
    }
}

async fn read_until(exec: &mut guest_client::Exec, needle: &str) -> String {
    let mut text = Vec::new();
    while !String::from_utf8_lossy(&text).contains(needle) {
        match exec.output.next().await.unwrap() {
            Some(ExecEvent::Stdout(bytes)) => text.extend(bytes),
            other => panic!(
                "waiting for {needle:?}, got {other:?} after {:?}",
                String::from_utf8_lossy(&text)
            ),
        }
    }
    String::from_utf8_lossy(&text).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tty_size_resize_ctrl_c_and_eof() {
    let dir = common::temp_dir();
    let client = common::connect(&common::agent_socket(dir.path())).await;

    let mut spec = ExecSpec::command(["tty"]);
    spec.tty = true;
    let mut exec = client.exec(spec).await.unwrap();
    let (text, code) = collect(&mut exec).await;
    assert!(text.starts_with("/dev/pts/"), "tty printed {text:?}");
    assert_eq!(code, 0);

    let mut spec = sh("stty size; read line; stty size");
    spec.tty = true;
    spec.window_size = Some((33, 111));
    let mut exec = client.exec(spec).await.unwrap();
    read_until(&mut exec, "33 111").await;
    exec.input.resize(50, 132).await.unwrap();
    exec.input.write(b"go\n").await.unwrap();
    let (text, code) = collect(&mut exec).await;
    assert!(text.contains("50 132"), "after the resize: {text:?}");
    assert_eq!(code, 0);

    // Ctrl-C through the terminal interrupts the foreground process.
    let mut spec = sh("echo ready; exec sleep 100");
    spec.tty = true;
    let mut exec = client.exec(spec).await.unwrap();
    read_until(&mut exec, "ready").await;
    exec.input.write(&[0x03]).await.unwrap();
    let (_, code) = collect(&mut exec).await;
    assert_eq!(code, 128 + 2, "sleep dies of SIGINT");

    // Closing stdin on a tty is end-of-file for the reader.
    let mut spec = ExecSpec::command(["cat"]);
    spec.tty = true;
    let mut exec = client.exec(spec).await.unwrap();
    exec.input.write(b"abc\n").await.unwrap();
    exec.input.close_stdin().await.unwrap();
    let (text, code) = collect(&mut exec).await;
    assert!(text.contains("abc"), "{text:?}");
    assert_eq!(code, 0, "cat saw EOF and exited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_and_reports_124_and_signals_reach_the_group() {
    let dir = common::temp_dir();
    let client = common::connect(&common::agent_socket(dir.path())).await;
    let mut spec = ExecSpec::command(["sleep", "100"]);
    spec.timeout_seconds = 1;
    let out = run(&client, spec, b"").await;
    assert_eq!(out.exit_code, 124);

    let mut exec = client.exec(sh("echo ready; exec sleep 100")).await.unwrap();
    read_until(&mut exec, "ready").await;
    exec.input.signal(15).await.unwrap();
    let (_, code) = collect(&mut exec).await;
    assert_eq!(code, 128 + 15);
}

fn alive(pid: u32) -> bool {
    // A zombie is dead: it only waits for its parent to reap it.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

async fn wait_dead(pid: u32) {
    for _ in 0..200 {
        if !alive(pid) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("process {pid} still runs after its client went away");
}

async fn background_sleep_pid(client: &guest_client::Client) -> (guest_client::Exec, u32) {
    // The shell's background child shares its process group.
    let mut exec = client.exec(sh("sleep 1000 & echo $!; wait")).await.unwrap();
    let line = read_until(&mut exec, "\n").await;
    let pid: u32 = line.trim().parse().unwrap();
    assert!(alive(pid));
    (exec, pid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_kills_the_process_group() {
    let dir = common::temp_dir();
    let socket = common::agent_socket(dir.path());

    // The call is cancelled (its stream reset).
    let client = common::connect(&socket).await;
    let (exec, pid) = background_sleep_pid(&client).await;
    drop(exec);
    wait_dead(pid).await;

    // The whole connection goes.
    let client = common::connect(&socket).await;
    let (exec, pid) = background_sleep_pid(&client).await;
    drop(exec);
    drop(client);
    wait_dead(pid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_execs_on_one_connection() {
    let dir = common::temp_dir();
    let client = common::connect(&common::agent_socket(dir.path())).await;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..16 {
        let client = client.clone();
        calls.spawn(async move {
            let out = client
                .exec_output(sh(&format!("read x; echo exec-{i}-$x")), b"ok\n")
                .await
                .unwrap();
            (i, out)
        });
    }
    let mut seen = Vec::new();
    while let Some(done) = calls.join_next().await {
        let (i, out) = done.unwrap();
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            format!("exec-{i}-ok\n")
        );
        assert_eq!(out.exit_code, 0);
        seen.push(i);
    }
    seen.sort();
    assert_eq!(seen, (0..16).collect::<Vec<_>>());
}

/// A host that does not read holds the process back (a full pipe), not the agent's memory:
/// 64 MiB of output cannot all be produced while nobody reads, and all of it arrives later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_is_held_back_by_a_host_that_does_not_read() {
    let dir = common::temp_dir();
    let client = common::connect(&common::agent_socket(dir.path())).await;
    let marker = dir.path().join("all-written");
    let script = format!("head -c 67108864 /dev/zero; touch {}", marker.display());
    let mut exec = client.exec(sh(&script)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !marker.exists(),
        "64 MiB were written while nobody read: the agent buffered them"
    );
    let mut received = 0usize;
    loop {
        match exec.output.next().await.unwrap() {
            Some(ExecEvent::Stdout(bytes)) => received += bytes.len(),
            Some(ExecEvent::Exit(code)) => {
                assert_eq!(code, 0);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(received, 64 << 20);
    assert!(marker.exists());
}
