//! `cargo xtask bench layers`: applying an Alpine-sized gzip layer to a [`Tree`].
//!
//! The layer is synthetic but shaped like Alpine's (about 500 entries, about 8 MB of tar, about
//! 4 MB of gzip): a mix of incompressible "binaries" and repetitive "text", a few symlinks and
//! hard links. Baselines from the same run: gunzip of the blob alone (the floor the layer model
//! adds to), and GNU `tar -xzf` into a temp dir (what a disk-based unpack costs).

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use system::hash::sha256_bytes;
use system::lock::Digest;
use testkit::bench::{Figure, median_time};
use xshell::{Shell, cmd};

use xtask::oci::layers::{Applier, LayerInfo, LayerLimits};

const ROUNDS: usize = 7;
const MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

fn run(sh: &Shell) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (blob, tar_len, entries) = synthetic_layer()?;
    let digest = Digest(sha256_bytes(&blob));
    let blob_path = dir.path().join("layer.tar.gz");
    std::fs::write(&blob_path, &blob)?;
    println!(
        "layer: {entries} entries, {:.1} MB tar, {:.1} MB gzip ({digest})",
        mb(tar_len),
        mb(blob.len() as u64)
    );
    drop(blob);

    let gunzip = median_time(ROUNDS, || {
        let file = std::fs::File::open(&blob_path)?;
        let mut decoder = flate2::read::MultiGzDecoder::new(std::io::BufReader::new(file));
        std::io::copy(&mut decoder, &mut std::io::sink())?;
        Ok(())
    })?;

    // Peak memory of the apply alone: reset the high-water mark first (Linux `clear_refs` 5).
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let rss_before = status_kib("VmRSS")?;
    let mut tree_entries = 0;
    let apply = median_time(ROUNDS, || {
        let file = std::fs::File::open(&blob_path)?;
        let mut applier = Applier::new(LayerLimits::default());
        applier.apply(
            LayerInfo {
                digest: &digest,
                media_type: MEDIA_TYPE,
                diff_id: None,
            },
            std::io::BufReader::with_capacity(1 << 20, file),
        )?;
        tree_entries = applier.tree().len();
        Ok(())
    })?;
    let hwm = status_kib("VmHWM")?;

    let extract_dir = dir.path().join("x");
    let blob_arg = &blob_path;
    let tar_xzf = median_time(ROUNDS, || {
        let _ = std::fs::remove_dir_all(&extract_dir);
        std::fs::create_dir(&extract_dir)?;
        cmd!(sh, "tar -xzf {blob_arg} -C {extract_dir}")
            .quiet()
            .run()
            .context("running GNU tar (the baseline)")?;
        Ok(())
    })?;

    println!(
        "apply to Tree ({tree_entries} entries): {:>8.1} ms (median of {ROUNDS})",
        ms(apply)
    );
    println!(
        "gunzip only:                  {:>8.1} ms  → apply / gunzip = {:.2}",
        ms(gunzip),
        ratio(apply, gunzip)
    );
    println!(
        "tar -xzf to disk:             {:>8.1} ms  → apply / tar    = {:.2}",
        ms(tar_xzf),
        ratio(apply, tar_xzf)
    );
    Figure::time(
        "apply an Alpine-sized layer",
        apply,
        "tar -xzf to disk",
        tar_xzf,
    )
    .print();
    if reset {
        println!(
            "peak RSS during apply: {:.1} MB (RSS before: {:.1} MB; peak − before = {:.1} MB, \
             the tree holds {:.1} MB of tar)",
            hwm as f64 / 1024.0,
            rss_before as f64 / 1024.0,
            (hwm.saturating_sub(rss_before)) as f64 / 1024.0,
            mb(tar_len)
        );
    } else {
        println!(
            "peak RSS (whole process, clear_refs unavailable): {:.1} MB",
            hwm as f64 / 1024.0
        );
    }
    Ok(())
}

/// About 500 entries and 8 MB of tar, gzipped at the default level like `docker push` does.
fn synthetic_layer() -> anyhow::Result<(Vec<u8>, u64, usize)> {
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let words = [
        "alpine", "musl", "busybox", "config", "return", "static", "include", "define", "the",
        "of", "and", "file", "path", "error", "value", "struct", "function", "if", "else", "for",
    ];
    let mut builder = tar::Builder::new(Vec::new());
    let mut entries = 0;
    let mut append = |builder: &mut tar::Builder<Vec<u8>>,
                      path: &str,
                      kind: tar::EntryType,
                      mode: u32,
                      data: &[u8],
                      link: Option<&str>|
     -> anyhow::Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_size(data.len() as u64);
        header.set_mtime(1_700_000_000);
        match link {
            Some(target) => builder.append_link(&mut header, path, target)?,
            None => builder.append_data(&mut header, path, data)?,
        }
        entries += 1;
        Ok(())
    };
    for d in [
        "bin",
        "sbin",
        "etc",
        "lib",
        "usr",
        "usr/bin",
        "usr/lib",
        "usr/share",
        "var",
    ] {
        append(&mut builder, d, tar::EntryType::Directory, 0o755, &[], None)?;
    }
    for i in 0..40 {
        let d = format!("usr/share/pkg{i}");
        append(
            &mut builder,
            &d,
            tar::EntryType::Directory,
            0o755,
            &[],
            None,
        )?;
    }
    let mut files = Vec::new();
    for i in 0..400 {
        let binary = i % 5 == 0;
        // Binaries ~45 KB of noise; text ~10 KB of words: about 3.6 + 3.2 MB in all.
        let data: Vec<u8> = if binary {
            (0..45_000).map(|_| next() as u8).collect()
        } else {
            let mut text = Vec::new();
            while text.len() < 10_000 {
                let w = words[(next() % words.len() as u64) as usize];
                text.extend_from_slice(w.as_bytes());
                text.push(if next() % 12 == 0 { b'\n' } else { b' ' });
            }
            text
        };
        let path = if binary {
            format!("usr/lib/lib{i}.so.1")
        } else {
            format!("usr/share/pkg{}/file{i}.txt", i % 40)
        };
        append(
            &mut builder,
            &path,
            tar::EntryType::Regular,
            0o644,
            &data,
            None,
        )?;
        files.push(path);
    }
    for i in 0..60 {
        let path = format!("bin/tool{i}");
        append(
            &mut builder,
            &path,
            tar::EntryType::Symlink,
            0o777,
            &[],
            Some("/bin/busybox"),
        )?;
    }
    append(
        &mut builder,
        "bin/busybox",
        tar::EntryType::Regular,
        0o755,
        &[7u8; 800_000],
        None,
    )?;
    for (i, target) in files.iter().enumerate().take(10) {
        let path = format!("sbin/link{i}");
        append(
            &mut builder,
            &path,
            tar::EntryType::Link,
            0o755,
            &[],
            Some(target),
        )?;
    }
    let tar = builder.into_inner()?;
    let mut gz = flate2::GzBuilder::new().write(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar)?;
    Ok((gz.finish()?, tar.len() as u64, entries))
}

/// A `kB` line of /proc/self/status.
fn status_kib(key: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {key} in /proc/self/status"))
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

fn main() -> anyhow::Result<()> {
    run(&testkit::bench::workspace_shell()?)
}
