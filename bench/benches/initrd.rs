//! `cargo xtask bench initrd`: (a) our newc + gzip writer against `find | sort | cpio -o -H newc
//! | gzip -9` on the same tree, time and size, in one run; (b) every candidate compressor
//! (zlib-rs and libdeflate at several levels, zstd, lz4, none) on the same archive against
//! `gzip -9` of it; (c) a no-op `artifacts` run of the built xtask binary (initrds only,
//! everything already in the store).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use system::lock::InitrdCompression;
use testkit::bench::{Figure, Target, format_duration, median, median_time};
use xshell::{Shell, cmd};

use xtask::compression::Compression;
use xtask::initrd::{compress, cpio};
use xtask::rootfs::{Node, Tree, TreePath};

const ROUNDS: usize = 5;
/// Rounds per candidate compressor: the slow ones (libdeflate 12, ruzstd) take seconds each.
const COMPRESSOR_ROUNDS: usize = 3;

fn run(sh: &Shell) -> anyhow::Result<()> {
    assemble_vs_gnu(sh)?;
    noop_artifacts(sh)
}

/// A deterministic tree on disk: 1500 small text-like files in nested directories, 40 larger
/// binary-like files, symlinks. About 10 MB.
fn write_fixture(root: &Path) -> anyhow::Result<()> {
    let mut noise = testkit::noise::Noise::new(0x2545_f491_4f6c_dd1d);
    let mut next = move || noise.next_u64();
    const WORDS: [&str; 8] = [
        "module", "virtio", "init", "mount", "overlay", "config", "kernel", "device",
    ];
    for i in 0..1500 {
        let dir = root.join(format!("usr/share/d{:02}/s{}", i % 37, i % 5));
        std::fs::create_dir_all(&dir)?;
        let text: String = (0..(200 + next() % 800))
            .map(|_| WORDS[(next() % 8) as usize])
            .collect::<Vec<_>>()
            .join(" ");
        std::fs::write(dir.join(format!("f{i}.txt")), text)?;
    }
    for i in 0..40 {
        let dir = root.join("usr/lib");
        std::fs::create_dir_all(&dir)?;
        // Half structured, half noise: compresses like a binary.
        let bytes: Vec<u8> = (0..150_000)
            .map(|j| {
                if j % 2 == 0 {
                    (j / 64) as u8
                } else {
                    next() as u8
                }
            })
            .collect();
        std::fs::write(dir.join(format!("lib{i}.so")), bytes)?;
        std::os::unix::fs::symlink(format!("lib{i}.so"), dir.join(format!("lib{i}.so.1")))?;
    }
    Ok(())
}

/// Reads a directory into a [`Tree`], the way the initrd stage would hold it.
fn load_tree(root: &Path) -> anyhow::Result<Tree> {
    use std::os::unix::fs::MetadataExt;
    let mut tree = Tree::new();
    for entry in walkdir::WalkDir::new(root).min_depth(1).sort_by_file_name() {
        let entry = entry?;
        let rel = entry.path().strip_prefix(root)?;
        let path = TreePath::new(rel.to_str().context("non-UTF-8 fixture path")?)?;
        let meta = entry.path().symlink_metadata()?;
        let mode = meta.mode() & 0o7777;
        let node = if meta.is_dir() {
            Node::dir(mode)
        } else if meta.file_type().is_symlink() {
            Node::symlink(
                std::fs::read_link(entry.path())?
                    .to_str()
                    .context("non-UTF-8 link")?,
            )
        } else {
            Node::file(mode, std::fs::read(entry.path())?)
        };
        tree.insert(path, node.owned_by(meta.uid(), meta.gid()))?;
    }
    Ok(tree)
}

fn assemble_vs_gnu(sh: &Shell) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("root");
    write_fixture(&root)?;
    let out = dir.path().join("gnu.cpio.gz");

    let mut ours = Vec::new();
    let mut ours_write = Vec::new();
    let mut gnu = Vec::new();
    let mut sizes = (0, 0);
    let mut tree_len = 0;
    for _ in 0..ROUNDS {
        let start = Instant::now();
        let tree = load_tree(&root)?;
        let written = Instant::now();
        let bytes = cpio::write_initrd(&tree, 0, InitrdCompression::Gzip)?;
        ours.push(start.elapsed());
        ours_write.push(written.elapsed());
        sizes.0 = bytes.len();
        tree_len = tree.len();

        let _dir = sh.push_dir(&root);
        let _c = sh.push_env("LC_ALL", "C");
        let script = format!(
            "find . | sort | cpio -o -H newc --quiet | gzip -9 > {}",
            out.display()
        );
        let start = Instant::now();
        cmd!(sh, "sh -c {script}")
            .quiet()
            .run()
            .context("running the find | cpio | gzip baseline (is cpio installed?)")?;
        gnu.push(start.elapsed());
        sizes.1 = std::fs::metadata(&out)?.len() as usize;
    }
    let (ours, ours_write, gnu) = (median(ours), median(ours_write), median(gnu));
    let raw: u64 = walkdir::WalkDir::new(&root)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();
    println!(
        "initrd assembly, {tree_len} entries, {:.1} MB of files, median of {ROUNDS} rounds:",
        raw as f64 / 1e6
    );
    println!(
        "  ours (read tree + newc + gzip, libdeflate level {}): {ours:>9.2?}  (newc + gzip \
         alone: {ours_write:.2?})",
        compress::GZIP_LEVEL
    );
    println!("  find | sort | cpio | gzip -9:      {gnu:>9.2?}");
    println!(
        "  time ratio (ours / baseline): {:.2} (target ≤ 0.30)",
        ours.as_secs_f64() / gnu.as_secs_f64()
    );
    println!(
        "  size: ours {} bytes, baseline {} bytes, ratio {:.3} (target within 1 %)",
        sizes.0,
        sizes.1,
        sizes.0 as f64 / sizes.1 as f64
    );
    Figure::time(
        "initrd assembly (newc + gzip)",
        ours,
        "find|sort|cpio|gzip -9",
        gnu,
    )
    .with_target(Target::TimeRatioAtMost(0.3))
    .print();
    Figure {
        ratio: Some(sizes.0 as f64 / sizes.1 as f64),
        baseline: format!("gzip -9 {} B", sizes.1),
        ..Figure::plain("initrd size", format!("{} B", sizes.0))
    }
    .print();
    let tree = load_tree(&root)?;
    compressors(sh, &cpio::write_newc(&tree, 0, Vec::new())?, dir.path())
}

/// One compressor's figures on the benchmark's archive.
struct Row {
    name: String,
    time: Duration,
    size: usize,
    /// Host time to decompress it again, with the generator's decoder.
    unpack: Option<Duration>,
}

/// Every candidate compressor on the same newc archive, against `gzip -9` of it: the figures
/// [`compress::GZIP_LEVEL`] and the encoder were chosen by, and what the other formats cost.
fn compressors(sh: &Shell, archive: &[u8], dir: &Path) -> anyhow::Result<()> {
    let cpio_file = dir.join("archive.cpio");
    std::fs::write(&cpio_file, archive)?;
    let gzip9 = dir.join("archive.cpio.gz");
    let mut rows = Vec::new();
    let time = median_time(COMPRESSOR_ROUNDS, || {
        let script = format!(
            "gzip -9 -n -c {} > {}",
            cpio_file.display(),
            gzip9.display()
        );
        cmd!(sh, "sh -c {script}").quiet().run()?;
        Ok(())
    })?;
    let baseline = std::fs::metadata(&gzip9)?.len() as usize;
    rows.push(Row {
        name: "gzip -9 (GNU gzip, the baseline)".into(),
        time,
        size: baseline,
        unpack: None,
    });
    let mut candidate = |name: String,
                         reader: Option<Compression>,
                         f: &dyn Fn() -> anyhow::Result<Vec<u8>>|
     -> anyhow::Result<()> {
        let mut packed = Vec::new();
        let time = median_time(COMPRESSOR_ROUNDS, || {
            packed = f()?;
            Ok(())
        })?;
        let unpack = match reader {
            None => None,
            Some(reader) => {
                anyhow::ensure!(reader.decode_all(&packed)? == archive, "{name} round trip");
                Some(median_time(COMPRESSOR_ROUNDS, || {
                    reader.decode_all(&packed)?;
                    Ok(())
                })?)
            }
        };
        rows.push(Row {
            name,
            time,
            size: packed.len(),
            unpack,
        });
        Ok(())
    };
    for level in [6, 9] {
        candidate(
            format!("gzip, flate2 + zlib-rs level {level}"),
            Some(Compression::Gzip),
            &|| {
                let mut gz = flate2::GzBuilder::new()
                    .mtime(0)
                    .write(Vec::new(), flate2::Compression::new(level));
                gz.write_all(archive)?;
                Ok(gz.finish()?)
            },
        )?;
    }
    for level in [6, 9, 12] {
        candidate(
            format!("gzip, libdeflate level {level}"),
            Some(Compression::Gzip),
            &|| compress::gzip(archive, level),
        )?;
    }
    for level in [3, 9, 12] {
        candidate(
            format!("zstd, libzstd level {level}"),
            Some(Compression::Zstd),
            &|| compress::zstd(archive, level),
        )?;
    }
    candidate(
        "zstd, ruzstd fastest (pure Rust)".into(),
        Some(Compression::Zstd),
        &|| {
            Ok(ruzstd::encoding::compress_to_vec(
                archive,
                ruzstd::encoding::CompressionLevel::Fastest,
            ))
        },
    )?;
    for (format, reader) in [
        (InitrdCompression::Lz4, Compression::Lz4Legacy),
        (InitrdCompression::None, Compression::None),
    ] {
        let encoder = compress::Encoder::of(format);
        candidate(
            format!(
                "{format}, {} {}",
                encoder.encoder.unwrap_or("(stored)"),
                encoder.level.unwrap_or_default()
            ),
            Some(reader),
            &|| compress::compress(format, archive),
        )?;
    }
    println!(
        "compressors on the same {:.1} MB archive, median of {COMPRESSOR_ROUNDS} (size ratio against gzip \
         -9's {baseline} bytes; unpack = this generator's decoder on the host):",
        archive.len() as f64 / 1e6
    );
    for row in rows {
        let unpack = row
            .unpack
            .map(|u| format!("  unpack {:>7.1} ms", u.as_secs_f64() * 1e3))
            .unwrap_or_default();
        println!(
            "  {:<38} {:>7.1} ms  {:>9} bytes  size ratio {:.3}{unpack}",
            row.name,
            row.time.as_secs_f64() * 1e3,
            row.size,
            row.size as f64 / baseline as f64,
        );
    }
    Ok(())
}

/// Times `artifacts --only initrds --offline` of the built binary with everything in place.
fn noop_artifacts(sh: &Shell) -> anyhow::Result<()> {
    cmd!(sh, "cargo build --package xtask --quiet")
        .run()
        .context("building xtask")?;
    let workspace = sh.current_dir();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(|t| workspace.join(t))
        .unwrap_or_else(|| workspace.join("target"));
    let xtask: PathBuf = target.join("debug/xtask");
    let dir = tempfile::tempdir()?;
    let lock = dir.path().join("artifacts.lock");
    std::fs::copy(workspace.join("artifacts.lock"), &lock)?;
    let data = dir.path().join("data");
    let version = "v1.0.0";
    let args = [
        "artifacts",
        "--only",
        "initrds",
        "--initrd",
        version,
        "--offline",
    ];
    // The first run builds (or finds) guest-init and the initrds.
    cmd!(sh, "{xtask} {args...} --lock {lock} --data-dir {data}")
        .quiet()
        .ignore_stderr()
        .run()
        .context("the first artifacts run")?;
    let mut samples = Vec::new();
    for _ in 0..ROUNDS {
        let start = Instant::now();
        let output = cmd!(sh, "{xtask} {args...} --lock {lock} --data-dir {data}")
            .quiet()
            .ignore_status()
            .output()?;
        samples.push(start.elapsed());
        let stderr = String::from_utf8_lossy(&output.stderr);
        anyhow::ensure!(
            output.status.success() && stderr.contains("built: 0"),
            "the no-op run was not a no-op:\n{stderr}"
        );
    }
    let noop = median(samples);
    println!(
        "no-op `artifacts --only initrds --initrd {version} --offline` ({} arches, guest-init \
         up to date), median of {ROUNDS}: {:.0} ms",
        system::Arch::ALL.len(),
        noop.as_secs_f64() * 1e3
    );
    Figure {
        value: Some(noop),
        ..Figure::plain(
            "no-op artifacts --only initrds --offline",
            format_duration(noop),
        )
    }
    .with_target(Target::TimeAtMost(Duration::from_millis(50)))
    .print();
    Ok(())
}

fn main() -> anyhow::Result<()> {
    run(&testkit::bench::workspace_shell()?)
}
