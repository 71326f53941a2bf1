//! `cargo xtask dist` and `artifacts --from` against plain tar, on a store holding Debian's
//! cloud kernel from this machine (a real, already compressed kernel image) and an
//! initrd-sized incompressible blob (a gzip initrd does not compress further).
//!
//! - pack: `dist::run` (verify every blob through `system`, deterministic tar + gzip -6,
//!   dist.json, SHA256SUMS) vs `tar -czf` of the same store files; time and size;
//! - install: `artifacts --from` (structure checks, streamed sha256 into blob writers, fsync,
//!   rename, links) vs `tar -xzf` followed by a full `Store::verify_all`.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use system::lock::{Defaults, Initrd, InitrdOutput, KernelFile, SCHEMA, UniqueMap, Version};
use system::{Arch, Check, Digest, Lock, Store};
use testkit::bench::{Figure, median_time};
use xshell::{Shell, cmd};
use xtask::store::StoreWriter;

const ROUNDS: usize = 5;
const INITRD_SIZE: usize = 340 << 10;

fn main() -> anyhow::Result<()> {
    let sh = Shell::new()?;
    let work = tempfile::tempdir()?;
    let data = work.path().join("data");
    let kernel = testkit::vm::Kernel::debian_cloud()?;
    let kernel_bytes = fs::read(&kernel.image)?;
    let initrd_bytes = testkit::noise::Noise::new(0x5eed).bytes(INITRD_SIZE);

    let store = StoreWriter::open(&data)?;
    let (k_sha, k_size, _) = store.put_bytes(&kernel_bytes)?;
    store.link(&store.layout().kernel_link("k", Arch::X86_64), &k_sha)?;
    let (i_sha, i_size, _) = store.put_bytes(&initrd_bytes)?;
    store.link(&store.layout().initrd_link("i", Arch::X86_64), &i_sha)?;
    drop(store);
    let lock = lock(k_sha, k_size, i_sha, i_size);
    let lock_path = work.path().join("artifacts.lock");
    xtask::lock::write(&lock_path, &lock)?;
    xtask::lock::write(&system::Layout::new(&data).lock_file(), &lock)?;

    // Pack.
    let out = work.path().join("out");
    let options = xtask::dist::Options {
        lock: lock_path.clone(),
        data_dir: data.clone(),
        out: out.clone(),
        kernels: vec![],
        initrds: vec![],
        arches: vec![],
        mtime: 0,
    };
    let dist_time = median_time(ROUNDS, || xtask::dist::run(&options).map(|_| ()))?;
    let tarball = out.join("system-k-i-x86_64.tar.gz");
    let plain = work.path().join("plain.tar.gz");
    let tar_time = median_time(ROUNDS, || {
        cmd!(
            sh,
            "tar -C {data} -czf {plain} system/artifacts.lock system/blobs/sha256 system/kernel system/initrd"
        )
        .quiet()
        .run()
        .context("tar -czf")
    })?;
    let (ours, theirs) = (fs::metadata(&tarball)?.len(), fs::metadata(&plain)?.len());

    // Install.
    let mut n = 0;
    let from_time = median_time(ROUNDS, || {
        n += 1;
        let host = work.path().join(format!("from-{n}"));
        xtask::artifacts::run(&from_options(&lock_path, &host, &out))
    })?;
    let untar_time = median_time(ROUNDS, || {
        n += 1;
        let host = work.path().join(format!("untar-{n}"));
        fs::create_dir_all(&host)?;
        cmd!(sh, "tar -C {host} -xzf {tarball}").quiet().run()?;
        Store::with_lock(&host, lock.clone()).verify_all(Check::Full)?;
        Ok(())
    })?;

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "payload: kernel {} ({k_size} B) + initrd-sized blob ({i_size} B), median of {ROUNDS}",
        kernel.image.display()
    );
    println!(
        "pack:    dist {:.0} ms vs tar -czf {:.0} ms (ratio {:.2}); size {ours} vs {theirs} B (ratio {:.4})",
        ms(dist_time),
        ms(tar_time),
        ms(dist_time) / ms(tar_time),
        ours as f64 / theirs as f64
    );
    println!(
        "install: artifacts --from {:.0} ms vs tar -xzf + verify_all(Full) {:.0} ms (ratio {:.2})",
        ms(from_time),
        ms(untar_time),
        ms(from_time) / ms(untar_time)
    );
    Figure::time("dist pack", dist_time, "tar -czf", tar_time).print();
    Figure::time(
        "install with artifacts --from",
        from_time,
        "tar -xzf + full verify",
        untar_time,
    )
    .print();
    Ok(())
}

fn from_options(lock: &Path, data_dir: &Path, dist: &Path) -> xtask::artifacts::Options {
    xtask::artifacts::Options {
        lock: lock.to_owned(),
        data_dir: data_dir.to_owned(),
        workspace: xtask::workspace_root(),
        arches: vec![],
        kernels: vec![],
        initrds: vec![],
        offline: true,
        locked: true,
        transfer: xtask::fetch::Options::default(),
        mirrors: Default::default(),
        stages: vec![],
        modules_dir: None,
        modules: None,
        base_sources: Default::default(),
        from: vec![xtask::dist::install::DistSource::Path(dist.to_owned())],
        firmware_dir: None,
    }
}

fn lock(k_sha: system::Sha256, k_size: u64, i_sha: system::Sha256, i_size: u64) -> Lock {
    let v = |s: &str| Version::new(s).unwrap();
    let mut files = UniqueMap::default();
    files.insert(
        Arch::X86_64,
        KernelFile {
            url: "https://example.invalid/k".into(),
            sha256: k_sha,
            size: Some(k_size),
        },
    );
    let mut kernels = UniqueMap::default();
    kernels.insert(v("k"), files);
    let mut outputs = UniqueMap::default();
    outputs.insert(
        Arch::X86_64,
        InitrdOutput {
            inputs: BTreeMap::from([("recipe".to_owned(), Digest(i_sha))]),
            sha256: i_sha,
            size: i_size,
        },
    );
    let mut initrds = UniqueMap::default();
    initrds.insert(
        v("i"),
        Initrd {
            base: None,
            modules: vec![],
            module_groups: Default::default(),
            compression: Default::default(),
            agent: false,
            outputs,
        },
    );
    Lock {
        schema: SCHEMA,
        defaults: Defaults {
            kernel: v("k"),
            initrd: v("i"),
        },
        kernels,
        bases: UniqueMap::default(),
        initrds,
    }
}
