//! `file:///…` URLs: kernels from a local file (air-gapped hosts, local builds). No transport is
//! involved; callers copy the file through the same blob writer a download streams into.

use std::os::unix::ffi::OsStringExt as _;
use std::path::PathBuf;

/// The local path of a `file:///…` URL (percent-escapes decoded), or `None` for other schemes.
pub fn local_path(url: &str) -> Option<PathBuf> {
    let path = url.strip_prefix("file://")?;
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                decoded.push(byte);
                i += 3;
            }
            (byte, _) => {
                decoded.push(byte);
                i += 1;
            }
        }
    }
    Some(PathBuf::from(std::ffi::OsString::from_vec(decoded)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_urls_map_to_paths_with_escapes_decoded() {
        assert_eq!(
            local_path("file:///boot/vmlinuz"),
            Some(PathBuf::from("/boot/vmlinuz"))
        );
        assert_eq!(
            local_path("file:///a%20b/%zz"),
            Some(PathBuf::from("/a b/%zz"))
        );
        assert_eq!(local_path("https://e.invalid/k"), None);
    }
}
