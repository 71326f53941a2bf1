//! Streaming SHA-256, shared by the store's verification and the generator's downloads.

use std::io::{self, Read};

use sha2::Digest as _;

use crate::lock::Sha256;

/// Hashes everything `reader` yields. Returns the digest and the byte count.
pub fn sha256_reader(mut reader: impl Read) -> io::Result<(Sha256, u64)> {
    let mut hasher = sha2::Sha256::new();
    // Large reads: hashing, not syscalls, should dominate.
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((Sha256(hasher.finalize().into()), total))
}

/// Hashes a byte slice.
pub fn sha256_bytes(bytes: &[u8]) -> Sha256 {
    Sha256(sha2::Sha256::digest(bytes).into())
}
