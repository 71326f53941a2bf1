//! Decompression bombs against the default limits, with the peak memory measured: each bomb is
//! applied in a child process (this test binary, running only this test) that reports its
//! `VmHWM`, so nothing else the test harness does counts.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::Path;
use std::process::Command;

use system::hash::sha256_reader;
use system::lock::Digest;

use super::{Applier, LayerInfo, LayerLimits};

const TEST: &str = "oci::layers::bomb_tests::gzip_bombs_are_refused_before_memory_grows";
const CHILD_ENV: &str = "XTASK_TEST_BOMB";
const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const CHUNK: u64 = 16 << 20;

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

/// A gzip layer of `files` files of `size` zero bytes each, as concatenated gzip members (one
/// per header, one per 16 MiB of zeros), so an 8 GiB bomb takes a fraction of a second to make.
fn write_bomb(path: &Path, files: u64, size: u64) {
    assert_eq!(size % CHUNK, 0);
    let zeros = gzip(&vec![0u8; CHUNK as usize]);
    let mut out = BufWriter::new(File::create(path).unwrap());
    for i in 0..files {
        let mut header = tar::Header::new_gnu();
        header.set_path(format!("zeros-{i}")).unwrap();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_size(size);
        header.set_cksum();
        out.write_all(&gzip(header.as_bytes())).unwrap();
        for _ in 0..size / CHUNK {
            out.write_all(&zeros).unwrap();
        }
    }
    out.write_all(&gzip(&[0u8; 1024])).unwrap();
    out.flush().unwrap();
}

/// In the child: applies the bomb at `path` with the default limits and prints the outcome and
/// the peak resident memory.
fn apply_and_report(path: &str) {
    let (sha256, _) = sha256_reader(File::open(path).unwrap()).unwrap();
    let digest = Digest(sha256);
    let mut applier = Applier::new(LayerLimits::default());
    let result = applier.apply(
        LayerInfo {
            digest: &digest,
            media_type: GZIP,
            diff_id: None,
        },
        BufReader::new(File::open(path).unwrap()),
    );
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status");
    let outcome = match result {
        Ok(()) => "applied".to_owned(),
        Err(e) => format!("{e:#}").replace('\n', " "),
    };
    println!("BOMB peak_kib={peak_kib} outcome={outcome}");
}

/// Runs this test alone in a child process on the bomb at `path`: (peak KiB, outcome).
fn measure(path: &Path) -> (u64, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the child failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("BOMB peak_kib=").map(|(_, report)| report))
        .unwrap_or_else(|| panic!("no report from the child: {stdout}"));
    let (peak, outcome) = line.split_once(" outcome=").unwrap();
    (peak.parse().unwrap(), outcome.to_owned())
}

#[test]
fn gzip_bombs_are_refused_before_memory_grows() {
    if let Ok(path) = std::env::var(CHILD_ENV) {
        apply_and_report(&path);
        return;
    }
    let limits = LayerLimits::default();
    let dir = tempfile::tempdir().unwrap();
    // Files bigger than the caps: refused on the first header, before any data is read.
    let big = dir.path().join("big.tar.gz");
    write_bomb(&big, 8, 1 << 30);
    // Files within the caps, many of them: refused once the contents reach the memory cap.
    let many = dir.path().join("many.tar.gz");
    write_bomb(&many, 64, 64 << 20);
    for (path, files, bound_kib) in [
        (&big, "8 files of 1 GiB", 64 << 10),
        (
            &many,
            "64 files of 64 MiB",
            (2 * limits.max_content_bytes) >> 10,
        ),
    ] {
        let compressed = std::fs::metadata(path).unwrap().len();
        let (peak_kib, outcome) = measure(path);
        eprintln!(
            "bomb of {files} ({compressed} bytes of gzip): peak RSS {} MiB; {outcome}",
            peak_kib >> 10
        );
        assert!(outcome.contains("refused before reading it"), "{outcome}");
        assert!(
            peak_kib < bound_kib,
            "bomb of {files}: peak RSS {peak_kib} KiB, expected below {bound_kib} KiB"
        );
    }
}
