//! Resolve + verify of a 64 MiB blob through `system::Store`.

use std::time::{Duration, Instant};

use anyhow::Context;
use system::lock::{Defaults, KernelFile, UniqueMap, Version};
use system::{Arch, KernelVersion, Lock, Store};
use testkit::bench::{Figure, Target, median};
use xshell::{Shell, cmd};

use xtask::store::StoreWriter;

const SIZE: usize = 64 << 20;
const ROUNDS: usize = 5;

fn run(sh: &Shell) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = testkit::noise::Noise::new(0x9e37_79b9_7f4a_7c15).bytes(SIZE);
    let writer = StoreWriter::open(dir.path())?;
    let (digest, size, blob) = writer.put_bytes(&data)?;
    let version = "bench";
    writer.link(&writer.layout().kernel_link(version, Arch::X86_64), &digest)?;
    drop(writer);

    let mut kernels = UniqueMap::default();
    let mut files = UniqueMap::default();
    files.insert(
        Arch::X86_64,
        KernelFile {
            url: "https://example.invalid/k".into(),
            sha256: digest,
            size: Some(size),
        },
    );
    kernels.insert(Version::new(version).unwrap(), files);
    let mut initrds = UniqueMap::default();
    initrds.insert(
        Version::new("i").unwrap(),
        system::lock::Initrd {
            base: None,
            modules: vec![],
            module_groups: Default::default(),
            compression: Default::default(),
            agent: false,
            outputs: UniqueMap::default(),
        },
    );
    let lock = Lock {
        schema: system::lock::SCHEMA,
        defaults: Defaults {
            kernel: Version::new(version).unwrap(),
            initrd: Version::new("i").unwrap(),
        },
        kernels,
        bases: UniqueMap::default(),
        initrds,
    };
    let kernel = KernelVersion::new(version);

    let mut full = Vec::new();
    let mut warm = Vec::new();
    let mut baseline = Vec::new();
    let mut openssl = Vec::new();
    for _ in 0..ROUNDS {
        let store = Store::with_lock(dir.path(), lock.clone());
        let start = Instant::now();
        store.kernel_path(&kernel, Arch::X86_64)?;
        full.push(start.elapsed());
        let start = Instant::now();
        store.kernel_path(&kernel, Arch::X86_64)?;
        warm.push(start.elapsed());

        let start = Instant::now();
        cmd!(sh, "sha256sum {blob}")
            .quiet()
            .ignore_stdout()
            .run()
            .context("running sha256sum")?;
        baseline.push(start.elapsed());

        let start = Instant::now();
        cmd!(sh, "openssl dgst -sha256 {blob}")
            .quiet()
            .ignore_stdout()
            .run()
            .context("running openssl")?;
        openssl.push(start.elapsed());
    }
    let gbps = |d: Duration| SIZE as f64 / d.as_secs_f64() / 1e9;
    let (full, warm, baseline) = (median(full), median(warm), median(baseline));
    let openssl = median(openssl);
    println!("verify 64 MiB blob, median of {ROUNDS} rounds:");
    println!(
        "  system::Store full hash: {:>8.2?}  {:.2} GB/s",
        full,
        gbps(full)
    );
    println!(
        "  sha256sum (baseline):    {:>8.2?}  {:.2} GB/s",
        baseline,
        gbps(baseline)
    );
    println!(
        "  openssl dgst -sha256:     {:>8.2?}  {:.2} GB/s",
        openssl,
        gbps(openssl)
    );
    println!(
        "  speed vs sha256sum: {:.2}x, vs openssl: {:.2}x (target >= 1.0x openssl)",
        baseline.as_secs_f64() / full.as_secs_f64(),
        openssl.as_secs_f64() / full.as_secs_f64()
    );
    println!(
        "  cache warm resolve:      {:.1} µs",
        warm.as_secs_f64() * 1e6
    );
    Figure {
        ratio: Some(openssl.as_secs_f64() / full.as_secs_f64()),
        baseline: format!("openssl dgst {:.2} GB/s", gbps(openssl)),
        ..Figure::plain(
            "sha256 of a 64 MiB blob (speed)",
            format!("{:.2} GB/s", gbps(full)),
        )
    }
    .with_target(Target::SpeedRatioAtLeast(1.0))
    .print();
    Ok(())
}

fn main() -> anyhow::Result<()> {
    run(&testkit::bench::workspace_shell()?)
}
