//! Typed version names, so a kernel version is never passed where an initrd version belongs.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

macro_rules! version_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(Cow<'static, str>);

        impl $name {
            /// For the generated constants.
            pub const fn from_static(name: &'static str) -> $name {
                $name(Cow::Borrowed(name))
            }

            /// For a name read at run time, e.g. from an instance's metadata.
            pub fn new(name: impl Into<String>) -> $name {
                $name(Cow::Owned(name.into()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<$name, D::Error> {
                String::deserialize(d).map($name::new)
            }
        }
    };
}

version_type!(
    /// A kernel version, a key of `kernels` in artifacts.lock (`ch-release-v6.16.9-20260508`).
    KernelVersion
);
version_type!(
    /// An initrd version, a key of `initrds` in artifacts.lock (`v1.0.0`).
    InitrdVersion
);
