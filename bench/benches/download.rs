//! `cargo xtask bench download`: 256 MiB over loopback from an in-process server, our fetcher
//! (streaming sha256, temp file, fsync, verify, rename into the store) against
//! `curl -o /dev/null` (no hashing, no disk) from the same server, median of a few rounds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use testkit::bench::{Figure, median};
use xshell::{Shell, cmd};

use testkit::http::{Reply, Server};
use xtask::fetch::{Expected, Fetcher, Mirrors, Options, Progress};
use xtask::store::{BlobDir, StoreWriter};

const SIZE: usize = 256 << 20;
const ROUNDS: usize = 5;

fn run(sh: &Shell) -> anyhow::Result<()> {
    let body: Arc<Vec<u8>> =
        Arc::new(testkit::noise::Noise::new(0x9e37_79b9_7f4a_7c15).bytes(SIZE));
    let digest = system::hash::sha256_bytes(&body);
    let served = body.clone();
    let server = Server::start(move |_, _| Reply::Body {
        body: served.clone(),
        ranges: true,
    })?;
    let url = server.url("/kernel");
    let fetcher = Fetcher::new(
        Options {
            progress: Progress::Quiet,
            ..Options::default()
        },
        Mirrors::default(),
    )?;

    let mut ours = Vec::new();
    let mut curl = Vec::new();
    let mut unsynced = Vec::new();
    for _ in 0..ROUNDS {
        let dir = tempfile::tempdir()?;
        let store = StoreWriter::open(dir.path())?;
        let expected = Expected {
            sha256: Some(digest),
            size: Some(SIZE as u64),
        };
        let start = Instant::now();
        let mut writer = store.blob_writer()?;
        let fetched = fetcher
            .fetch(&url, "bench", expected, &mut writer)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        store.commit(writer, Some(&digest), Some(SIZE as u64), "bench")?;
        ours.push(start.elapsed());
        anyhow::ensure!(fetched.requests == 1, "the benchmark retried");
        drop(dir);

        // The same transfer and hash into a blob writer, without the commit's fsync and rename.
        let unsynced_dir = tempfile::tempdir()?;
        let mut writer = BlobDir::create(unsynced_dir.path())?.writer()?;
        let start = Instant::now();
        fetcher
            .fetch(&url, "bench", expected, &mut writer)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        unsynced.push(start.elapsed());

        let start = Instant::now();
        cmd!(sh, "curl --silent --show-error --fail -o /dev/null {url}")
            .quiet()
            .run()
            .context("running curl (apt install curl)")?;
        curl.push(start.elapsed());
    }
    let rate = |d: Duration| SIZE as f64 / d.as_secs_f64() / (1 << 20) as f64;
    let (ours, curl, unsynced) = (median(ours), median(curl), median(unsynced));
    println!("download 256 MiB over loopback, median of {ROUNDS} rounds:");
    println!(
        "  xtask fetch into store (sha256 + fsync): {:>8.2?}  {:>7.0} MiB/s",
        ours,
        rate(ours)
    );
    println!(
        "  of which transfer + sha256 (no fsync):  {:>8.2?}  {:>7.0} MiB/s",
        unsynced,
        rate(unsynced)
    );
    println!(
        "  curl -o /dev/null (baseline):            {:>8.2?}  {:>7.0} MiB/s",
        curl,
        rate(curl)
    );
    println!(
        "  ratio (ours / curl time): {:.2}",
        ours.as_secs_f64() / curl.as_secs_f64()
    );
    Figure::time(
        "download 256 MiB into the store",
        ours,
        "curl -o /dev/null",
        curl,
    )
    .print();
    Ok(())
}

fn main() -> anyhow::Result<()> {
    run(&testkit::bench::workspace_shell()?)
}
