//! The initrd's compressors: the cpio archive in the format the recipe names, with one pinned
//! encoder and level each, so the same archive gives the same bytes on any machine.
//!
//! | format | encoder                | why                                                    |
//! |--------|------------------------|--------------------------------------------------------|
//! | gzip   | libdeflate, level 6    | every kernel unpacks it; chosen by `cargo xtask bench initrd` |
//! | zstd   | libzstd, level 9       | `CONFIG_RD_ZSTD`; ruzstd's encoder (its one level) is far larger |
//! | lz4    | lz4_flex (safe), legacy frame | the fastest to write; `CONFIG_RD_LZ4`          |
//! | none   | —                      | no unpack cost, the largest file                      |
//!
//! Each writes one stream (one gzip member, one zstd frame, one legacy lz4 frame): the kernel
//! reads concatenations too, but one stream is what `gzip`, `zstd` and `lz4 -l` write.

use anyhow::{Context, bail};
use serde::Serialize;
use system::lock::InitrdCompression;

use crate::compression::{LZ4_LEGACY_BLOCK, LZ4_LEGACY_MAGIC, lz4_compress_bound};

/// The libdeflate level for gzip initrds: level 6 compresses the benchmark archive as small as
/// `gzip -9` (0.9995×) in under a seventh of `gzip -9`'s or libdeflate level 9's time, and
/// zlib-rs at level 6 misses the 1 % size bound (see README "Initrds").
pub const GZIP_LEVEL: i32 = 6;

/// The zstd level for zstd initrds: a fifth smaller than `gzip -9` at a few times libdeflate's
/// time; level 19 saves a few percent more at forty times the time (see README "Initrds").
pub const ZSTD_LEVEL: i32 = 9;

/// The gzip header's OS byte: Unix, whatever the builder runs on.
const GZIP_OS_UNIX: u8 = 3;

/// The encoder behind a format, as the recipe records it: changing any of this changes the
/// initrd's bytes, so it is part of the recipe digest. Fields in alphabetical order (canonical
/// JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Encoder {
    pub encoder: Option<&'static str>,
    pub format: InitrdCompression,
    pub level: Option<String>,
}

impl Encoder {
    /// The pinned encoder for `format`.
    pub fn of(format: InitrdCompression) -> Encoder {
        let (encoder, level) = match format {
            InitrdCompression::Gzip => (Some("libdeflate"), Some(GZIP_LEVEL.to_string())),
            InitrdCompression::Zstd => (Some("libzstd"), Some(ZSTD_LEVEL.to_string())),
            InitrdCompression::Lz4 => (Some("lz4_flex"), None),
            InitrdCompression::None => (None, None),
        };
        Encoder {
            encoder,
            format,
            level,
        }
    }
}

/// `archive` compressed as `format` with its pinned encoder.
pub fn compress(format: InitrdCompression, archive: &[u8]) -> anyhow::Result<Vec<u8>> {
    match format {
        InitrdCompression::Gzip => gzip(archive, GZIP_LEVEL),
        InitrdCompression::Zstd => zstd(archive, ZSTD_LEVEL),
        InitrdCompression::Lz4 => lz4_legacy(archive),
        InitrdCompression::None => Ok(archive.to_vec()),
    }
}

/// One gzip member: a fixed header (no name, mtime 0, OS Unix), libdeflate's raw deflate at
/// `level`, CRC-32 and size. libdeflate's own gzip writer would put its own XFL and OS bytes.
pub fn gzip(data: &[u8], level: i32) -> anyhow::Result<Vec<u8>> {
    let level = libdeflater::CompressionLvl::new(level)
        .map_err(|e| anyhow::anyhow!("libdeflate level {level}: {e:?}"))?;
    let mut compressor = libdeflater::Compressor::new(level);
    let mut out = vec![0u8; 10 + compressor.deflate_compress_bound(data.len()) + 8];
    // magic, CM = deflate, FLG = 0 (no name, no comment), MTIME = 0, XFL = 0, OS.
    out[..10].copy_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, GZIP_OS_UNIX]);
    let body = compressor
        .deflate_compress(data, &mut out[10..])
        .context("libdeflate: compressing the initrd")?;
    out.truncate(10 + body);
    out.extend_from_slice(&libdeflater::crc32(data).to_le_bytes());
    // ISIZE is the length modulo 2^32, as the format defines it.
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    Ok(out)
}

/// One zstd frame at `level`, single-threaded (libzstd's multi-threaded mode is not built), with
/// the content size and a checksum in the frame.
pub fn zstd(data: &[u8], level: i32) -> anyhow::Result<Vec<u8>> {
    let mut compressor =
        zstd::bulk::Compressor::new(level).with_context(|| format!("libzstd: level {level}"))?;
    compressor.include_checksum(true)?;
    compressor.include_contentsize(true)?;
    compressor
        .compress(data)
        .context("libzstd: compressing the initrd")
}

/// The legacy lz4 frame the kernel unpacks (`lib/decompress_unlz4.c`): the magic `0x184C2102`,
/// then each 8 MiB block of `data` (the last one shorter) as its compressed size (32-bit
/// little-endian) and an lz4 block.
pub fn lz4_legacy(data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(data.len() / 2);
    out.extend_from_slice(&LZ4_LEGACY_MAGIC);
    for (i, block) in data.chunks(LZ4_LEGACY_BLOCK).enumerate() {
        let packed = lz4_flex::block::compress(block);
        // The kernel refuses a block over its bound; lz4 never exceeds it, but say so if it did.
        if packed.len() > lz4_compress_bound(block.len()) {
            bail!(
                "lz4_flex compressed block {i} ({} bytes) to {} bytes, over the kernel's bound \
                 of {}; the kernel would refuse this initrd. Use another compression",
                block.len(),
                packed.len(),
                lz4_compress_bound(block.len())
            );
        }
        out.extend_from_slice(&(packed.len() as u32).to_le_bytes());
        out.extend_from_slice(&packed);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compression::Compression;

    /// Text-like and binary-like, over one lz4 block and one zstd block.
    fn sample() -> Vec<u8> {
        let mut out = Vec::new();
        for i in 0u32..1_000_000 {
            out.extend_from_slice(format!("entry {} ", i % 977).as_bytes());
        }
        out.extend((0u32..200_000).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8));
        out
    }

    fn reader_for(format: InitrdCompression) -> Compression {
        match format {
            InitrdCompression::Gzip => Compression::Gzip,
            InitrdCompression::Zstd => Compression::Zstd,
            InitrdCompression::Lz4 => Compression::Lz4Legacy,
            InitrdCompression::None => Compression::None,
        }
    }

    #[test]
    fn every_format_round_trips_is_deterministic_and_starts_with_its_magic() {
        let plain = sample();
        assert!(
            plain.len() > LZ4_LEGACY_BLOCK,
            "the lz4 frame holds two blocks"
        );
        for format in InitrdCompression::ALL {
            let packed = compress(format, &plain).unwrap();
            assert_eq!(packed, compress(format, &plain).unwrap(), "{format}");
            let reader = reader_for(format);
            assert_eq!(Compression::from_magic(&packed), reader, "{format}");
            assert_eq!(reader.decode_all(&packed).unwrap(), plain, "{format}");
            if format != InitrdCompression::None {
                assert!(packed.len() < plain.len() / 2, "{format} compresses");
            }
        }
    }

    #[test]
    fn gzip_is_one_member_with_a_fixed_header_and_the_size_trailer() {
        let plain = sample();
        let gz = gzip(&plain, GZIP_LEVEL).unwrap();
        assert_eq!(&gz[..10], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3]);
        let trailer = &gz[gz.len() - 8..];
        assert_eq!(trailer[..4], libdeflater::crc32(&plain).to_le_bytes());
        assert_eq!(trailer[4..], (plain.len() as u32).to_le_bytes());
        // One member: a single-member decoder reads all of it and nothing is left.
        let mut decoder = flate2::read::GzDecoder::new(&gz[..]);
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut decoder, &mut out).unwrap();
        assert_eq!(out, plain);
        assert!(gzip(&plain, 13).is_err(), "libdeflate stops at level 12");
    }

    #[test]
    fn the_lz4_frame_is_the_legacy_one_with_8_mib_blocks() {
        let plain = sample();
        let packed = lz4_legacy(&plain).unwrap();
        assert_eq!(packed[..4], [0x02, 0x21, 0x4c, 0x18]);
        let first = u32::from_le_bytes(packed[4..8].try_into().unwrap()) as usize;
        let block = lz4_flex::block::decompress(&packed[8..8 + first], LZ4_LEGACY_BLOCK).unwrap();
        assert_eq!(block, plain[..LZ4_LEGACY_BLOCK]);
        let second = u32::from_le_bytes(packed[8 + first..12 + first].try_into().unwrap());
        assert_eq!(
            packed.len(),
            12 + first + second as usize,
            "two blocks, nothing else"
        );
    }

    #[test]
    fn the_recipe_names_each_encoder() {
        let json = |f| serde_json::to_string(&Encoder::of(f)).unwrap();
        assert_eq!(
            json(InitrdCompression::Gzip),
            r#"{"encoder":"libdeflate","format":"gzip","level":"6"}"#
        );
        assert_eq!(
            json(InitrdCompression::None),
            r#"{"encoder":null,"format":"none","level":null}"#
        );
        let all: std::collections::HashSet<String> =
            InitrdCompression::ALL.into_iter().map(json).collect();
        assert_eq!(all.len(), 4);
    }
}
