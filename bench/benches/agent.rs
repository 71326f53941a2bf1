//! Guest agent figures over real virtio-vsock under QEMU (TCG here):
//! - the exec round trip of `true` (median of 50) next to a StatPath call on the same
//!   connection (the gRPC and vsock round trip without a process) and to one byte echoed by a
//!   running `cat` (the exec stream's round trip without starting a process);
//! - copy throughput in and out next to the same bytes as a plain exec stream (`cat >/dev/null`
//!   fed on stdin, `cat FILE` read from stdout) over the same transport;
//! - the agent binary's size. One VM serves every figure.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use guest_client::{Client, ExecSpec};
use system::Arch;
use testkit::agent_guest;
use testkit::bench::{Figure, format_duration, median};
use testkit::noise::Noise;

const ROUND_TRIPS: usize = 50;
const COPY_MIB: usize = 32;
const COPY_ROUNDS: usize = 3;

async fn exec_ok(client: &Client, command: &[&str], stdin: &[u8]) -> anyhow::Result<Vec<u8>> {
    let out = client
        .exec_output(ExecSpec::command(command.iter().copied()), stdin)
        .await?;
    if out.exit_code != 0 {
        bail!(
            "{command:?} exited {}: {}",
            out.exit_code,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

/// The median of `rounds` timings of `f`.
async fn median_of<F, Fut>(rounds: usize, mut f: F) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let start = Instant::now();
        f().await?;
        times.push(start.elapsed());
    }
    Ok(median(times))
}

/// The median time for one byte to go to a running `cat` and come back: the transport's echo
/// (gRPC messages both ways, the agent's pipes), without starting a process.
async fn echo_round_trip(client: &Client) -> anyhow::Result<Duration> {
    let guest_client::Exec {
        mut input,
        mut output,
    } = client.exec(ExecSpec::command(["cat"])).await?;
    let mut times = Vec::with_capacity(ROUND_TRIPS);
    for _ in 0..ROUND_TRIPS {
        let start = Instant::now();
        input.write(b"x").await?;
        match output.next().await? {
            Some(guest_client::ExecEvent::Stdout(bytes)) if bytes == b"x" => {}
            other => bail!("cat echoed {other:?}, not one byte"),
        }
        times.push(start.elapsed());
    }
    input.close().await?;
    match output.next().await? {
        Some(guest_client::ExecEvent::Exit(0)) => Ok(median(times)),
        other => bail!("cat ended with {other:?}"),
    }
}

fn mib_per_s(bytes: usize, time: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / time.as_secs_f64()
}

/// A throughput figure against a baseline throughput: ratio = ours / baseline speed.
fn throughput(
    what: &str,
    bytes: usize,
    ours: Duration,
    baseline_name: &str,
    base: Duration,
) -> Figure {
    Figure {
        ours: format!("{:.1} MiB/s", mib_per_s(bytes, ours)),
        baseline: format!("{baseline_name} {:.1} MiB/s", mib_per_s(bytes, base)),
        ratio: Some(base.as_secs_f64() / ours.as_secs_f64()),
        ..Figure::plain(what, "")
    }
}

async fn measure(vm: &agent_guest::AgentVm) -> anyhow::Result<Vec<Figure>> {
    let client = vm.connect().await?;
    let mut figures = Vec::new();

    // Warm up: the first exec pages busybox in.
    exec_ok(&client, &["true"], b"").await?;
    let exec = median_of(ROUND_TRIPS, || async {
        exec_ok(&client, &["true"], b"").await.map(drop)
    })
    .await?;
    let stat = median_of(ROUND_TRIPS, || async {
        client.stat("/", false).await.map(drop).map_err(Into::into)
    })
    .await?;
    figures.push(Figure::time(
        &format!("agent exec `true` round trip over vsock, TCG (median of {ROUND_TRIPS})"),
        exec,
        "StatPath /",
        stat,
    ));
    let echo = echo_round_trip(&client).await?;
    figures.push(Figure::time(
        &format!("agent exec `true` round trip vs an echo, TCG (median of {ROUND_TRIPS})"),
        exec,
        "1 byte through a running `cat`",
        echo,
    ));

    let bytes = COPY_MIB << 20;
    let payload = Noise::new(7).bytes(bytes);
    let host = tempfile::tempdir()?;
    let file = host.path().join("payload.bin");
    std::fs::write(&file, &payload)?;
    exec_ok(&client, &["mkdir", "-p", "/tmp/bench"], b"").await?;

    let copy_in = median_of(COPY_ROUNDS, || async {
        let written = client
            .copy_to_guest(&file, "/tmp/bench/payload.bin")
            .await?;
        if written != bytes as i64 {
            bail!("copied {written} of {bytes} bytes in");
        }
        Ok(())
    })
    .await?;
    let stdin_in = median_of(COPY_ROUNDS, || async {
        exec_ok(&client, &["sh", "-c", "cat >/dev/null"], &payload)
            .await
            .map(drop)
    })
    .await?;
    figures.push(throughput(
        &format!("agent copy in, {COPY_MIB} MiB file over vsock, TCG"),
        bytes,
        copy_in,
        "exec stdin to `cat >/dev/null`",
        stdin_in,
    ));

    let out_dir = host.path().join("out");
    let copy_out = median_of(COPY_ROUNDS, || async {
        let _ = std::fs::remove_dir_all(&out_dir);
        std::fs::create_dir(&out_dir)?;
        let report = client
            .copy_from_guest("/tmp/bench/payload.bin", &out_dir, false, false)
            .await?;
        if report.bytes != bytes as u64 {
            bail!("copied {} of {bytes} bytes out", report.bytes);
        }
        Ok(())
    })
    .await?;
    let stdout_out = median_of(COPY_ROUNDS, || async {
        let out = exec_ok(&client, &["cat", "/tmp/bench/payload.bin"], b"").await?;
        if out.len() != bytes {
            bail!("cat returned {} of {bytes} bytes", out.len());
        }
        Ok(())
    })
    .await?;
    figures.push(throughput(
        &format!("agent copy out, {COPY_MIB} MiB file over vsock, TCG"),
        bytes,
        copy_out,
        "exec stdout of `cat FILE`",
        stdout_out,
    ));
    eprintln!(
        "agent: exec {} vs stat {}; copy in {} vs stdin {}; copy out {} vs stdout {}",
        format_duration(exec),
        format_duration(stat),
        format_duration(copy_in),
        format_duration(stdin_in),
        format_duration(copy_out),
        format_duration(stdout_out)
    );
    Ok(figures)
}

fn main() -> anyhow::Result<()> {
    let size = agent_guest::agent_binary(Arch::X86_64)?.len();
    let vm = agent_guest::agent_vm()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let figures = runtime
        .block_on(measure(&vm))
        .with_context(|| vm.context())?;
    for figure in figures {
        figure.print();
    }
    Figure::plain(
        "guest-agent binary (x86_64 musl, static, stripped)",
        format!("{size} bytes"),
    )
    .print();
    Ok(())
}
