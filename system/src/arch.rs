//! CPU architectures the artifacts are built for.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A guest (and host) architecture. Spelled as Rust and the kernel spell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Arch {
    // Declared in alphabetical order: maps keyed by arch serialize sorted.
    #[serde(rename = "aarch64")]
    Aarch64,
    #[serde(rename = "x86_64")]
    X86_64,
}

impl Arch {
    pub const ALL: [Arch; 2] = [Arch::Aarch64, Arch::X86_64];

    /// The architecture this program runs on: what a host boots its guests as.
    #[cfg(target_arch = "x86_64")]
    pub const fn host() -> Arch {
        Arch::X86_64
    }

    /// The architecture this program runs on: what a host boots its guests as.
    #[cfg(target_arch = "aarch64")]
    pub const fn host() -> Arch {
        Arch::Aarch64
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    /// The kernel image Cloud Hypervisor boots: an uncompressed ELF on x86_64, `Image` on arm64.
    pub const fn kernel_file_name(self) -> &'static str {
        match self {
            Arch::X86_64 => "vmlinux",
            Arch::Aarch64 => "Image",
        }
    }

    /// The OCI platform architecture (`linux/<this>`).
    pub const fn oci_arch(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
        }
    }

    /// The Rust target guest-init is built for.
    pub const fn musl_target(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-unknown-linux-musl",
            Arch::Aarch64 => "aarch64-unknown-linux-musl",
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error for an architecture name that is not one of [`Arch::ALL`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownArch(pub String);

impl fmt::Display for UnknownArch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown arch `{}`: expected x86_64 or aarch64", self.0)
    }
}

impl std::error::Error for UnknownArch {}

impl FromStr for Arch {
    type Err = UnknownArch;

    fn from_str(s: &str) -> Result<Arch, UnknownArch> {
        match s {
            "x86_64" => Ok(Arch::X86_64),
            "aarch64" => Ok(Arch::Aarch64),
            _ => Err(UnknownArch(s.to_owned())),
        }
    }
}
