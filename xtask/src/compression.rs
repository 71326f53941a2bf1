//! The one decoder for the compressed streams the generator reads: OCI layers (gzip, zstd) and
//! kernel modules (`.ko.gz`, `.ko.zst`, `.ko.xz`).
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
}

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];
const XZ_MAGIC: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0x00];

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
        }
    }

    /// All of `compressed`, decompressed.
    pub fn decode_all(self, compressed: &[u8]) -> io::Result<Vec<u8>> {
        let mut plain = Vec::new();
        self.decoder(compressed).read_to_end(&mut plain)?;
        Ok(plain)
    }

    /// `bytes` compressed in this format with the crates' defaults: for tests that need
    /// compressed fixtures (the generator itself only writes gzip, see `initrd::cpio`).
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

    const ALL: [Compression; 4] = [
        Compression::None,
        Compression::Gzip,
        Compression::Zstd,
        Compression::Xz,
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
