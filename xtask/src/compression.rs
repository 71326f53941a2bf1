//! The one decoder for the compressed streams the generator reads: OCI layers (gzip, zstd),
//! kernel modules (`.ko.gz`, `.ko.zst`, `.ko.xz`) and its own initrds (gzip, zstd, legacy lz4).
//!
//! Callers say how they know the format ([`Compression::from_magic`] for content,
//! [`Compression::from_suffix`] for file names; OCI media types stay with the layer model, which
//! also decides what a layer may be) and get a [`Read`] back from [`Compression::decoder`].
//! Every format is read whole, as its tools write it: gzip members and zstd frames (skippable
//! ones included) may follow each other, and a stream that ends early is an error, never a
//! silently short result. This is the only module that knows the decompression crates.

use std::fmt;
use std::io::{self, BufRead, Read};

/// How a stream is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
    Xz,
    /// The legacy lz4 frame (`lz4 -l`), the one the kernel's initrd unpacker reads: a magic, then
    /// blocks of at most [`LZ4_LEGACY_BLOCK`] bytes, each prefixed by its compressed size.
    Lz4Legacy,
}

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];
const XZ_MAGIC: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0x00];
/// `0x184C2102`, little-endian.
pub const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
/// The uncompressed size of a legacy lz4 block (the last may be shorter): 8 MiB, as `lz4 -l`
/// writes and the kernel's `decompress_unlz4.c` allocates.
pub const LZ4_LEGACY_BLOCK: usize = 8 << 20;

/// The largest compressed legacy block the kernel accepts for `plain` bytes (its
/// `LZ4_COMPRESSBOUND`); a longer one is refused as corrupt.
pub fn lz4_compress_bound(plain: usize) -> usize {
    plain + plain / 255 + 16
}

/// Skippable zstd frames have the magic `0x184D2A5?` (little-endian); `pzstd` starts with one.
fn is_zstd_skippable_magic(head: &[u8]) -> bool {
    matches!(head, [low, 0x2a, 0x4d, 0x18, ..] if low & 0xf0 == 0x50)
}

impl Compression {
    /// The format `head` (the first bytes of a stream) starts like; `None` when it is none of
    /// them. Six bytes are enough to tell.
    pub fn from_magic(head: &[u8]) -> Compression {
        if head.starts_with(GZIP_MAGIC) {
            Compression::Gzip
        } else if head.starts_with(ZSTD_MAGIC) || is_zstd_skippable_magic(head) {
            Compression::Zstd
        } else if head.starts_with(XZ_MAGIC) {
            Compression::Xz
        } else if head.starts_with(&LZ4_LEGACY_MAGIC) {
            Compression::Lz4Legacy
        } else {
            Compression::None
        }
    }

    /// The format a file-name suffix announces: `""` is uncompressed, `.gz`, `.zst`, `.xz` are
    /// the compressed ones; anything else is unknown (`None`).
    pub fn from_suffix(suffix: &str) -> Option<Compression> {
        match suffix {
            "" => Some(Compression::None),
            ".gz" => Some(Compression::Gzip),
            ".zst" => Some(Compression::Zstd),
            ".xz" => Some(Compression::Xz),
            _ => None,
        }
    }

    /// A reader of the decompressed bytes of `compressed`.
    ///
    /// gzip and zstd stream, so a caller can cap what it reads. xz is decoded whole into memory
    /// on the first read (lzma-rs has no streaming xz reader): use it for small inputs such as
    /// kernel modules only.
    pub fn decoder<'a, R: BufRead + 'a>(self, compressed: R) -> Box<dyn Read + 'a> {
        match self {
            Compression::None => Box::new(compressed),
            Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(compressed)),
            Compression::Zstd => Box::new(ZstdFrames::new(compressed)),
            Compression::Xz => Box::new(XzWhole::Pending(compressed)),
            Compression::Lz4Legacy => Box::new(Lz4Legacy::new(compressed)),
        }
    }

    /// All of `compressed`, decompressed.
    pub fn decode_all(self, compressed: &[u8]) -> io::Result<Vec<u8>> {
        let mut plain = Vec::new();
        self.decoder(compressed).read_to_end(&mut plain)?;
        Ok(plain)
    }

    /// `bytes` compressed in this format with the crates' defaults: for tests that need
    /// compressed fixtures (the generator writes initrds with `initrd::compress`).
    #[cfg(test)]
    pub(crate) fn encode(self, bytes: &[u8]) -> Vec<u8> {
        use std::io::Write;
        match self {
            Compression::None => bytes.to_vec(),
            Compression::Gzip => {
                let mut gz =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                gz.write_all(bytes).expect("writing to a Vec");
                gz.finish().expect("writing to a Vec")
            }
            Compression::Zstd => ruzstd::encoding::compress_to_vec(
                bytes,
                ruzstd::encoding::CompressionLevel::Fastest,
            ),
            Compression::Xz => {
                let mut out = Vec::new();
                lzma_rs::xz_compress(&mut &bytes[..], &mut out).expect("writing to a Vec");
                out
            }
            Compression::Lz4Legacy => {
                let mut out = LZ4_LEGACY_MAGIC.to_vec();
                for block in bytes.chunks(LZ4_LEGACY_BLOCK) {
                    let packed = lz4_flex::block::compress(block);
                    out.extend_from_slice(&(packed.len() as u32).to_le_bytes());
                    out.extend_from_slice(&packed);
                }
                out
            }
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::None => "uncompressed",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
            Compression::Xz => "xz",
            Compression::Lz4Legacy => "lz4",
        })
    }
}

/// Zstandard with any number of frames (and skippable frames), as `zstd` and `pzstd` write it.
/// Each frame's content checksum, when it has one, is checked at its end.
struct ZstdFrames<R> {
    source: R,
    frame: ruzstd::decoding::FrameDecoder,
    in_frame: bool,
    /// Frames (skippable ones included) started so far: an empty input is not a zstd stream.
    frames_seen: u64,
}

impl<R: BufRead> ZstdFrames<R> {
    fn new(source: R) -> Self {
        ZstdFrames {
            source,
            frame: ruzstd::decoding::FrameDecoder::new(),
            in_frame: false,
            frames_seen: 0,
        }
    }

    /// Starts the next frame, or skips a skippable one; `false` at the end of the input.
    fn next_frame(&mut self) -> io::Result<bool> {
        use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
        if self.source.fill_buf()?.is_empty() {
            if self.frames_seen == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "zstd: empty input, not a single frame",
                ));
            }
            return Ok(false);
        }
        self.frames_seen += 1;
        match self.frame.reset(&mut self.source) {
            Ok(()) => self.in_frame = true,
            Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame {
                length,
                ..
            })) => {
                let skipped =
                    io::copy(&mut (&mut self.source).take(length.into()), &mut io::sink())?;
                if skipped < u64::from(length) {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "zstd: truncated skippable frame",
                    ));
                }
            }
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
        Ok(true)
    }

    /// At the end of a frame: its checksum (when it carries one) must match what was decoded.
    fn check_frame_checksum(&self) -> io::Result<()> {
        if let (Some(stored), Some(computed)) = (
            self.frame.get_checksum_from_data(),
            self.frame.get_calculated_checksum(),
        ) && stored != computed
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "zstd: frame checksum mismatch (stored {stored:#010x}, content hashes to \
                     {computed:#010x}); the data is corrupt"
                ),
            ));
        }
        Ok(())
    }
}

impl<R: BufRead> Read for ZstdFrames<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use ruzstd::decoding::BlockDecodingStrategy;
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if !self.in_frame {
                if !self.next_frame()? {
                    return Ok(0);
                }
                continue;
            }
            while self.frame.can_collect() < buf.len() && !self.frame.is_finished() {
                let wanted = buf.len() - self.frame.can_collect();
                self.frame
                    .decode_blocks(&mut self.source, BlockDecodingStrategy::UptoBytes(wanted))
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            }
            let n = self.frame.read(buf)?;
            if n > 0 {
                return Ok(n);
            }
            if !self.frame.is_finished() {
                // The loop above stops only with bytes to collect or at the frame's end.
                return Err(io::Error::other("zstd: the decoder stalled inside a frame"));
            }
            self.check_frame_checksum()?;
            self.in_frame = false;
        }
    }
}

/// xz, decoded whole on the first read (lzma-rs decodes into a writer, not through a reader).
/// lzma-rs refuses data after the stream, so concatenated xz streams are an error, not a short
/// read; kmod and the kernel's build write one stream per module.
enum XzWhole<R> {
    Pending(R),
    Decoded(io::Cursor<Vec<u8>>),
    /// The decode failed: the first read returned why, later reads only say that it did.
    Failed,
}

impl<R: BufRead> Read for XzWhole<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let XzWhole::Pending(source) = self {
            let mut plain = Vec::new();
            match lzma_rs::xz_decompress(source, &mut plain) {
                Ok(()) => *self = XzWhole::Decoded(io::Cursor::new(plain)),
                Err(e) => {
                    *self = XzWhole::Failed;
                    return Err(xz_error(e));
                }
            }
        }
        match self {
            XzWhole::Decoded(plain) => plain.read(buf),
            XzWhole::Pending(_) | XzWhole::Failed => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "xz: the stream failed to decode",
            )),
        }
    }
}

/// The legacy lz4 frame, block by block, read the way the kernel's `decompress_unlz4.c` reads
/// it: the magic may recur between blocks (concatenated archives) and the input ends after a
/// whole block. A block whose size exceeds the kernel's bound, that fails to decode or decodes
/// to more than [`LZ4_LEGACY_BLOCK`] bytes is corrupt.
struct Lz4Legacy<R> {
    source: R,
    started: bool,
    block: io::Cursor<Vec<u8>>,
    packed: Vec<u8>,
}

impl<R: BufRead> Lz4Legacy<R> {
    fn new(source: R) -> Self {
        Lz4Legacy {
            source,
            started: false,
            block: io::Cursor::new(Vec::new()),
            packed: Vec::new(),
        }
    }

    /// The next 4-byte little-endian word, or `None` at a clean end of input.
    fn word(&mut self) -> io::Result<Option<[u8; 4]>> {
        let mut word = [0u8; 4];
        let mut filled = 0;
        while filled < 4 {
            let n = self.source.read(&mut word[filled..])?;
            if n == 0 {
                return match filled {
                    0 => Ok(None),
                    _ => Err(lz4_truncated("a block size")),
                };
            }
            filled += n;
        }
        Ok(Some(word))
    }

    /// Decodes the next block into `self.block`; `false` at the end of the input.
    fn next_block(&mut self) -> io::Result<bool> {
        loop {
            let Some(word) = self.word()? else {
                return Ok(false);
            };
            if word == LZ4_LEGACY_MAGIC {
                continue;
            }
            let size = u32::from_le_bytes(word) as usize;
            if size > lz4_compress_bound(LZ4_LEGACY_BLOCK) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "lz4: a block of {size} compressed bytes, more than an 8 MiB block can                          take ({}); the data is corrupt",
                        lz4_compress_bound(LZ4_LEGACY_BLOCK)
                    ),
                ));
            }
            self.packed.resize(size, 0);
            self.source
                .read_exact(&mut self.packed)
                .map_err(|_| lz4_truncated("a block"))?;
            let mut plain = std::mem::take(self.block.get_mut());
            plain.resize(LZ4_LEGACY_BLOCK, 0);
            let n = lz4_flex::block::decompress_into(&self.packed, &mut plain).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("lz4: a block does not decode ({e}); the data is corrupt"),
                )
            })?;
            plain.truncate(n);
            self.block = io::Cursor::new(plain);
            return Ok(true);
        }
    }
}

fn lz4_truncated(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("lz4: the input ends inside {what}"),
    )
}

impl<R: BufRead> Read for Lz4Legacy<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.started {
            match self.word()? {
                Some(magic) if magic == LZ4_LEGACY_MAGIC => self.started = true,
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "lz4: not a legacy lz4 frame (no magic 0x184C2102)",
                    ));
                }
            }
        }
        loop {
            let n = self.block.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            if !self.next_block()? {
                return Ok(0);
            }
        }
    }
}

/// lzma-rs errors as I/O errors, keeping "ended early" recognisable as such.
fn xz_error(e: lzma_rs::error::Error) -> io::Error {
    match e {
        lzma_rs::error::Error::IoError(io) | lzma_rs::error::Error::HeaderTooShort(io) => {
            io::Error::new(io.kind(), format!("xz: {io}"))
        }
        other => io::Error::new(io::ErrorKind::InvalidData, format!("xz: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compressible but not trivial, and over one zstd block (128 KiB) so frames hold several.
    fn sample() -> Vec<u8> {
        (0u32..300_000)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 % 17)
            .collect()
    }

    const ALL: [Compression; 5] = [
        Compression::None,
        Compression::Gzip,
        Compression::Zstd,
        Compression::Xz,
        Compression::Lz4Legacy,
    ];

    #[test]
    fn every_format_round_trips_and_is_recognised_by_its_magic() {
        let plain = sample();
        for compression in ALL {
            let packed = compression.encode(&plain);
            assert_eq!(
                compression.decode_all(&packed).unwrap(),
                plain,
                "{compression}"
            );
            assert_eq!(Compression::from_magic(&packed), compression);
        }
        assert_eq!(Compression::from_magic(b""), Compression::None);
        assert_eq!(Compression::from_magic(b"\x1f"), Compression::None);
    }

    #[test]
    fn suffixes_name_formats_and_unknown_ones_are_none() {
        assert_eq!(Compression::from_suffix(""), Some(Compression::None));
        assert_eq!(Compression::from_suffix(".gz"), Some(Compression::Gzip));
        assert_eq!(Compression::from_suffix(".zst"), Some(Compression::Zstd));
        assert_eq!(Compression::from_suffix(".xz"), Some(Compression::Xz));
        assert_eq!(Compression::from_suffix(".bz2"), None);
        assert_eq!(Compression::from_suffix("gz"), None);
    }

    #[test]
    fn concatenated_gzip_members_are_read_whole() {
        let plain = sample();
        let (first, second) = plain.split_at(1234);
        let mut packed = Compression::Gzip.encode(first);
        packed.extend(Compression::Gzip.encode(second));
        assert_eq!(Compression::Gzip.decode_all(&packed).unwrap(), plain);
        // Bytes after the last member that are no gzip member are not silently dropped.
        packed.extend_from_slice(b"trailing garbage");
        assert!(Compression::Gzip.decode_all(&packed).is_err());
    }

    fn skippable_frame(low_nibble: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = (0x184D_2A50u32 | u32::from(low_nibble))
            .to_le_bytes()
            .to_vec();
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    #[test]
    fn multi_frame_zstd_with_skippable_frames_is_read_whole() {
        let plain = sample();
        let (first, rest) = plain.split_at(3000);
        let (second, third) = rest.split_at(200_000);
        // As pzstd writes it: a skippable frame first, then data frames.
        let mut packed = skippable_frame(0, b"pzstd");
        packed.extend(Compression::Zstd.encode(first));
        packed.extend(skippable_frame(0xf, b""));
        packed.extend(Compression::Zstd.encode(second));
        packed.extend(Compression::Zstd.encode(third));
        assert_eq!(Compression::from_magic(&packed), Compression::Zstd);
        assert_eq!(Compression::Zstd.decode_all(&packed).unwrap(), plain);

        // Tiny reads cross frame boundaries the same way.
        let mut decoder = Compression::Zstd.decoder(&packed[..]);
        let mut byte_by_byte = Vec::new();
        let mut byte = [0u8; 1];
        while decoder.read(&mut byte).unwrap() == 1 {
            byte_by_byte.push(byte[0]);
        }
        assert_eq!(byte_by_byte, plain);
    }

    #[test]
    fn truncated_streams_are_errors_not_short_reads() {
        let plain = sample()[..5000].to_vec();
        for compression in [Compression::Gzip, Compression::Zstd, Compression::Xz] {
            let packed = compression.encode(&plain);
            for len in 0..packed.len() {
                let result = compression.decode_all(&packed[..len]);
                assert!(
                    result.is_err(),
                    "{compression} cut to {len} of {} bytes decoded to {} bytes",
                    packed.len(),
                    result.unwrap().len()
                );
            }
        }
        // A skippable zstd frame cut short, after a complete data frame.
        let mut packed = Compression::Zstd.encode(&plain);
        packed.extend(&skippable_frame(3, b"twelve bytes")[..10]);
        assert!(Compression::Zstd.decode_all(&packed).is_err());
    }

    #[test]
    fn a_corrupt_zstd_frame_is_refused_by_its_checksum() {
        let plain = sample();
        let mut packed = Compression::Zstd.encode(&plain);
        let last = packed.len() - 1;
        packed[last] ^= 0xff;
        let err = Compression::Zstd.decode_all(&packed).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
    }

    #[test]
    fn xz_errors_stay_errors_on_later_reads() {
        let mut decoder = Compression::Xz.decoder(&b"\xfd7zXZ\0 not really"[..]);
        let mut buf = [0u8; 16];
        assert!(decoder.read(&mut buf).is_err());
        assert!(decoder.read(&mut buf).is_err());
    }
}

#[cfg(test)]
mod lz4_tests {
    use super::*;

    fn block(size: u32, packed: &[u8]) -> Vec<u8> {
        let mut out = size.to_le_bytes().to_vec();
        out.extend_from_slice(packed);
        out
    }

    #[test]
    fn legacy_lz4_reads_several_blocks_and_a_repeated_magic() {
        // Over one 8 MiB block, so the stream holds two.
        let plain: Vec<u8> = (0..LZ4_LEGACY_BLOCK + 5000)
            .map(|i| (i % 251) as u8 ^ (i / 4096) as u8)
            .collect();
        let packed = Compression::Lz4Legacy.encode(&plain);
        assert_eq!(Compression::Lz4Legacy.decode_all(&packed).unwrap(), plain);
        // Two archives back to back read as one, as the kernel reads them.
        let mut twice = Compression::Lz4Legacy.encode(b"first ");
        twice.extend(Compression::Lz4Legacy.encode(b"second"));
        assert_eq!(
            Compression::Lz4Legacy.decode_all(&twice).unwrap(),
            b"first second"
        );
        // The magic alone is an empty archive.
        assert_eq!(
            Compression::Lz4Legacy
                .decode_all(&LZ4_LEGACY_MAGIC)
                .unwrap(),
            b""
        );
    }

    /// The legacy frame has no end marker and no checksum: a cut between blocks cannot be seen
    /// (the store's sha256 catches it); a cut anywhere else is an error.
    #[test]
    fn legacy_lz4_cut_inside_a_block_is_an_error() {
        let plain: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 13) as u8).collect();
        let packed = Compression::Lz4Legacy.encode(&plain);
        for len in (0..packed.len()).filter(|&len| len != LZ4_LEGACY_MAGIC.len()) {
            assert!(
                Compression::Lz4Legacy.decode_all(&packed[..len]).is_err(),
                "cut to {len} of {} bytes",
                packed.len()
            );
        }
    }

    #[test]
    fn legacy_lz4_refuses_a_missing_magic_oversized_or_corrupt_blocks() {
        let err = Compression::Lz4Legacy
            .decode_all(b"\x04\x22\x4d\x18 a modern frame")
            .unwrap_err();
        assert!(err.to_string().contains("0x184C2102"), "{err}");

        let mut oversized = LZ4_LEGACY_MAGIC.to_vec();
        oversized.extend(block(u32::MAX, b""));
        let err = Compression::Lz4Legacy.decode_all(&oversized).unwrap_err();
        assert!(
            err.to_string().contains("more than an 8 MiB block"),
            "{err}"
        );

        // A match reaching back before the start of the block.
        let mut corrupt = LZ4_LEGACY_MAGIC.to_vec();
        corrupt.extend(block(3, &[0x0f, 0xff, 0xff]));
        let err = Compression::Lz4Legacy.decode_all(&corrupt).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }
}
