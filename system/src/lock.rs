//! `artifacts.lock`, schema 1: every pinned input and every produced output, by digest.
//!
//! This file is compiled twice: as `system::lock`, and by `system`'s build script (via `#[path]`),
//! which validates the committed lock before anything can embed it. It may therefore only use
//! `crate::arch` and external crates that are build-dependencies too.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::arch::Arch;

/// The lock schema this code reads and writes.
pub const SCHEMA: u32 = 1;

/// The whole lock file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lock {
    pub schema: u32,
    pub defaults: Defaults,
    /// Kernel versions, each with one pinned file per architecture.
    #[serde(default)]
    pub kernels: UniqueMap<Version, UniqueMap<Arch, KernelFile>>,
    /// Base images by name (`alpine`), pinned by digest.
    #[serde(default)]
    pub bases: UniqueMap<Version, Base>,
    /// Initrd versions: a recipe plus the outputs built from it.
    #[serde(default)]
    pub initrds: UniqueMap<Version, Initrd>,
}

/// What a host boots when it does not ask for a version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    pub kernel: Version,
    pub initrd: Version,
}

/// One downloadable kernel image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelFile {
    /// `https://`, `http://`, or `file:///` (a local file: air-gapped hosts, local builds).
    pub url: String,
    pub sha256: Sha256,
    /// Bytes; recorded on the first verified download when the publisher does not state it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

/// An OCI base image pinned by its index digest and per-architecture manifest digests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Base {
    /// Where it comes from, e.g. `docker.io/library/alpine:3.22`.
    pub reference: String,
    /// The digest of the image index (manifest list) the tag pointed to when pinned.
    pub index: Digest,
    pub manifests: UniqueMap<Arch, Digest>,
}

/// An initrd version: how to build it, and what building it produced. The default is what an
/// empty entry (`{}`) parses to: the minimal profile, no modules, gzip, nothing built yet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Initrd {
    /// The base image (a key of `bases`), or none for the minimal profile: only guest-init and
    /// what it needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<Version>,
    /// Kernel modules to carry and load at boot, by name; dependencies are added at build time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modules: Vec<String>,
    /// Modules carried but loaded only when a matching PCI device is present (drivers on
    /// demand), by group name. `gpu` is the group guest-init makes NVIDIA device nodes for and
    /// config.json's `gpu` asks for.
    #[serde(default, skip_serializing_if = "is_empty_map")]
    pub module_groups: UniqueMap<Version, ModuleGroup>,
    /// How the archive is compressed; `gzip` when absent (locks written before the field).
    #[serde(default, skip_serializing_if = "InitrdCompression::is_default")]
    pub compression: InitrdCompression,
    /// The initrd carries the guest agent (built from this workspace like guest-init, its
    /// digest recorded as the `agent` input) and guest-init starts it. Left out when false,
    /// so locks written before the field read and write back unchanged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub agent: bool,
    /// What was built, per architecture.
    #[serde(default)]
    pub outputs: UniqueMap<Arch, InitrdOutput>,
}

/// Kernel modules an initrd loads only when matching hardware is present.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleGroup {
    /// PCI patterns in `lspci -d` syntax, `VENDOR[:DEVICE[:CLASS]]` (hex; CLASS a 2-, 4- or
    /// 6-digit prefix), e.g. `10de::03`; a device matching any of them loads the group.
    pub pci: Vec<String>,
    /// Module names; dependencies are added at build time, in modules.dep order.
    pub modules: Vec<String>,
    /// Firmware files or directories the group's drivers request, relative to the firmware
    /// directory the initrd is built with (e.g. `nvidia/570.86.15`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub firmware: Vec<String>,
}

fn is_empty_map<K, V>(map: &UniqueMap<K, V>) -> bool {
    map.is_empty()
}

/// How an initrd's cpio archive is compressed. The kernel must be built with the matching
/// `CONFIG_RD_*`: every kernel has gzip; `zstd` needs `CONFIG_RD_ZSTD`, `lz4` `CONFIG_RD_LZ4`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InitrdCompression {
    #[default]
    Gzip,
    Zstd,
    /// The legacy lz4 frame (`lz4 -l`), the only lz4 format the kernel unpacks.
    Lz4,
    None,
}

impl InitrdCompression {
    pub const ALL: [InitrdCompression; 4] = [
        InitrdCompression::Gzip,
        InitrdCompression::Zstd,
        InitrdCompression::Lz4,
        InitrdCompression::None,
    ];

    pub fn is_default(&self) -> bool {
        *self == InitrdCompression::default()
    }

    /// The name the lock and the command line use.
    pub fn as_str(self) -> &'static str {
        match self {
            InitrdCompression::Gzip => "gzip",
            InitrdCompression::Zstd => "zstd",
            InitrdCompression::Lz4 => "lz4",
            InitrdCompression::None => "none",
        }
    }
}

impl fmt::Display for InitrdCompression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for InitrdCompression {
    type Err = String;
    fn from_str(s: &str) -> Result<InitrdCompression, String> {
        InitrdCompression::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| {
                format!("unknown initrd compression `{s}`; allowed: gzip, zstd, lz4, none")
            })
    }
}

/// A built initrd: the digests of everything it was made from, and its own digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitrdOutput {
    /// Input name (`base`, `guest-init`, `agent`, `modules`, `recipe`) to digest.
    pub inputs: BTreeMap<String, Digest>,
    pub sha256: Sha256,
    pub size: u64,
}

/// A problem with a lock file: where it is (a JSON path) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockError {
    /// Like `kernels."ch-release-v6.16.9-20260508".x86_64.sha256`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for LockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "artifacts.lock: at `{}`: {}", self.path, self.message)
    }
}

impl std::error::Error for LockError {}

impl Lock {
    /// Parses and validates a lock. Every error names the JSON path and what is allowed there.
    pub fn parse(text: &str) -> Result<Lock, LockError> {
        // Read the schema on its own first: a newer schema should say so, not fail on a field.
        let probe: serde_json::Value = serde_json::from_str(text).map_err(|e| LockError {
            path: "(document)".into(),
            message: format!("not valid JSON: {e}"),
        })?;
        match probe.get("schema") {
            Some(serde_json::Value::Number(n)) if n.as_u64() == Some(SCHEMA.into()) => {}
            Some(other) => {
                return Err(LockError {
                    path: "schema".into(),
                    message: format!(
                        "unsupported schema {other}: this build reads schema {SCHEMA}; \
                         use the tool version that wrote the lock"
                    ),
                });
            }
            None => {
                return Err(LockError {
                    path: "schema".into(),
                    message: format!("missing; this build reads schema {SCHEMA}"),
                });
            }
        }

        let deserializer = &mut serde_json::Deserializer::from_str(text);
        let lock: Lock = serde_path_to_error::deserialize(deserializer).map_err(|e| LockError {
            path: render_path(e.path()),
            message: e.inner().to_string(),
        })?;
        lock.validate()?;
        Ok(lock)
    }

    /// The lock as it is written to disk: pretty, keys in stable order, trailing newline.
    pub fn to_json(&self) -> String {
        let mut text = serde_json::to_string_pretty(self).expect("a lock always serializes");
        text.push('\n');
        text
    }

    /// Cross-references that the types alone cannot express.
    fn validate(&self) -> Result<(), LockError> {
        let fail = |path: String, message: String| Err(LockError { path, message });
        if !self.kernels.contains_key(&self.defaults.kernel) {
            return fail(
                "defaults.kernel".into(),
                format!(
                    "names kernel `{}`, which is not in `kernels`; allowed: {}",
                    self.defaults.kernel,
                    list(self.kernels.keys())
                ),
            );
        }
        if !self.initrds.contains_key(&self.defaults.initrd) {
            return fail(
                "defaults.initrd".into(),
                format!(
                    "names initrd `{}`, which is not in `initrds`; allowed: {}",
                    self.defaults.initrd,
                    list(self.initrds.keys())
                ),
            );
        }
        for (version, files) in self.kernels.iter() {
            if files.is_empty() {
                return fail(
                    format!("kernels.{}", key(version.as_str())),
                    "pins no architecture; add an x86_64 or aarch64 entry".into(),
                );
            }
            for (arch, file) in files.iter() {
                let url = &file.url;
                let local = url.strip_prefix("file://");
                if local.is_some_and(|path| !path.starts_with('/')) {
                    return fail(
                        format!("kernels.{}.{arch}.url", key(version.as_str())),
                        format!("`{url}` is not an absolute file URL; expected file:///path"),
                    );
                }
                if !(url.starts_with("https://") || url.starts_with("http://") || local.is_some()) {
                    return fail(
                        format!("kernels.{}.{arch}.url", key(version.as_str())),
                        format!("`{url}` is not an http(s) or file:/// URL"),
                    );
                }
            }
        }
        for (prefix, section, names) in [
            (
                KERNEL_PREFIX,
                "kernels",
                self.kernels.keys().collect::<Vec<_>>(),
            ),
            (INITRD_PREFIX, "initrds", self.initrds.keys().collect()),
        ] {
            let mut seen = BTreeMap::new();
            for name in names {
                if let Some(first) = seen.insert(constant_name(prefix, name.as_str()), name) {
                    return Err(collision(section, prefix, first, name));
                }
            }
        }
        for (name, base) in self.bases.iter() {
            if base.reference.trim().is_empty() {
                return fail(
                    format!("bases.{}.reference", key(name.as_str())),
                    "is empty; expected an image reference like `docker.io/library/alpine:3.22`"
                        .into(),
                );
            }
        }
        for (version, initrd) in self.initrds.iter() {
            if let Some(base) = &initrd.base
                && !self.bases.contains_key(base)
            {
                return fail(
                    format!("initrds.{}.base", key(version.as_str())),
                    format!(
                        "names base `{base}`, which is not in `bases`; allowed: {}",
                        list(self.bases.keys())
                    ),
                );
            }
            for (name, group) in initrd.module_groups.iter() {
                let at = format!(
                    "initrds.{}.module_groups.{}",
                    key(version.as_str()),
                    key(name.as_str())
                );
                if group.pci.is_empty() {
                    return fail(
                        format!("{at}.pci"),
                        "is empty; list PCI patterns like `10de::03` or `1af4:1005`".into(),
                    );
                }
                if group.modules.is_empty() {
                    return fail(
                        format!("{at}.modules"),
                        "is empty; list the module names the group loads".into(),
                    );
                }
                for (index, path) in group.firmware.iter().enumerate() {
                    let inside = !path.is_empty()
                        && !path.starts_with('/')
                        && path
                            .split('/')
                            .all(|c| !c.is_empty() && c != "." && c != "..");
                    if !inside {
                        return fail(
                            format!("{at}.firmware[{index}]"),
                            format!(
                                "`{path}` is not a plain relative path; name a file or directory \
                                 inside the firmware directory, e.g. `nvidia/570.86.15`"
                            ),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Refuses a kernel version whose generated constant would be another version's
    /// (`v6.16.9_1` next to `v6.16.9-1`): checked before `lock add-kernel` downloads anything.
    pub fn check_new_kernel(&self, version: &Version) -> Result<(), LockError> {
        let wanted = constant_name(KERNEL_PREFIX, version.as_str());
        match self
            .kernels
            .keys()
            .find(|v| *v != version && constant_name(KERNEL_PREFIX, v.as_str()) == wanted)
        {
            Some(existing) => Err(collision("kernels", KERNEL_PREFIX, existing, version)),
            None => Ok(()),
        }
    }
}

/// The prefixes of the constants `system`'s build script generates per kernel and initrd.
pub const KERNEL_PREFIX: &str = "KERNEL";
pub const INITRD_PREFIX: &str = "INITRD";

/// The constant `system`'s build script generates for a version: the prefix, `_`, and the name
/// upper-cased with every character other than a letter or digit as `_`
/// (`ch-release-v6.16.9-20260508` → `KERNEL_CH_RELEASE_V6_16_9_20260508`).
pub fn constant_name(prefix: &str, version: &str) -> String {
    let suffix: String = version
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("{prefix}_{suffix}")
}

/// Two versions that would become one constant: a host could not name them apart.
fn collision(section: &str, prefix: &str, first: &Version, second: &Version) -> LockError {
    LockError {
        path: format!("{section}.{}", key(second.as_str())),
        message: format!(
            "`{first}` and `{second}` both become the constant {} of the `system` crate; \
             rename one of them (names must differ in more than case and in `.`, `_`, `+`, `-`)",
            constant_name(prefix, second.as_str())
        ),
    }
}

fn list<'a>(names: impl Iterator<Item = &'a Version>) -> String {
    let names: Vec<String> = names.map(|n| format!("`{n}`")).collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// Renders a JSON path the way a reader types it: identifiers bare, other keys quoted.
fn render_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key: k } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&key(k));
            }
            Segment::Enum { variant } => {
                out.push('.');
                out.push_str(variant);
            }
            Segment::Unknown => out.push_str(".?"),
        }
    }
    if out.is_empty() { "(root)".into() } else { out }
}

/// A JSON key as a reader types it in a path: bare when an identifier, quoted otherwise.
pub(crate) fn key(k: &str) -> String {
    let bare = !k.is_empty()
        && !k.starts_with(|c: char| c.is_ascii_digit())
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if bare { k.to_owned() } else { format!("{k:?}") }
}

/// A version or entry name. It becomes a directory name in the store, so it is restricted to
/// `[A-Za-z0-9._+-]`, is not empty, and is not `.` or `..`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Version(String);

impl Version {
    pub fn new(name: &str) -> Result<Version, String> {
        if name.is_empty() {
            return Err("empty version name; use a name like `ch-release-v6.16.9-20260508`".into());
        }
        if name == "." || name == ".." {
            return Err(format!("version `{name}` is not a usable directory name"));
        }
        if let Some(bad) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-')))
        {
            return Err(format!(
                "version `{name}` contains {bad:?}; allowed are letters, digits, `.`, `_`, `+`, `-`"
            ));
        }
        Ok(Version(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::borrow::Borrow<str> for Version {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl FromStr for Version {
    type Err = String;
    fn from_str(s: &str) -> Result<Version, String> {
        Version::new(s)
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Version, D::Error> {
        let raw = String::deserialize(d)?;
        Version::new(&raw).map_err(de::Error::custom)
    }
}

/// A SHA-256 digest, written as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sha256(pub [u8; 32]);

impl Sha256 {
    pub fn from_hex(hex: &str) -> Result<Sha256, String> {
        let bytes = hex.as_bytes();
        let valid =
            bytes.len() == 64 && bytes.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !valid {
            return Err(format!(
                "malformed sha256 `{hex}`: expected 64 lowercase hex digits"
            ));
        }
        let nibble = |b: u8| {
            if b.is_ascii_digit() {
                b - b'0'
            } else {
                b - b'a' + 10
            }
        };
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks(2).enumerate() {
            out[i] = nibble(pair[0]) << 4 | nibble(pair[1]);
        }
        Ok(Sha256(out))
    }

    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256({})", self.hex())
    }
}

impl FromStr for Sha256 {
    type Err = String;
    fn from_str(s: &str) -> Result<Sha256, String> {
        Sha256::from_hex(s)
    }
}

impl Serialize for Sha256 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.hex())
    }
}

impl<'de> Deserialize<'de> for Sha256 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Sha256, D::Error> {
        let raw = String::deserialize(d)?;
        Sha256::from_hex(&raw).map_err(de::Error::custom)
    }
}

/// An OCI content digest, `sha256:<64 hex digits>` (the only algorithm we accept).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest(pub Sha256);

impl Digest {
    pub fn parse(text: &str) -> Result<Digest, String> {
        let malformed = || {
            format!(
                "malformed digest `{text}`: expected `sha256:` followed by 64 lowercase hex digits"
            )
        };
        let hex = text.strip_prefix("sha256:").ok_or_else(malformed)?;
        Sha256::from_hex(hex).map(Digest).map_err(|_| malformed())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest(sha256:{})", self.0)
    }
}

impl FromStr for Digest {
    type Err = String;
    fn from_str(s: &str) -> Result<Digest, String> {
        Digest::parse(s)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let raw = String::deserialize(d)?;
        Digest::parse(&raw).map_err(de::Error::custom)
    }
}

/// A JSON object whose keys must be unique. `serde_json` otherwise keeps the last of two equal
/// keys silently, and a lock with two entries for one version is a mistake worth reporting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UniqueMap<K, V>(pub BTreeMap<K, V>);

impl<K, V> Default for UniqueMap<K, V> {
    fn default() -> Self {
        UniqueMap(BTreeMap::new())
    }
}

impl<K, V> std::ops::Deref for UniqueMap<K, V> {
    type Target = BTreeMap<K, V>;
    fn deref(&self) -> &BTreeMap<K, V> {
        &self.0
    }
}

impl<K, V> std::ops::DerefMut for UniqueMap<K, V> {
    fn deref_mut(&mut self) -> &mut BTreeMap<K, V> {
        &mut self.0
    }
}

impl<K: Serialize, V: Serialize> Serialize for UniqueMap<K, V> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de, K, V> Deserialize<'de> for UniqueMap<K, V>
where
    K: FromStr + Ord + fmt::Display,
    K::Err: fmt::Display,
    V: Deserialize<'de>,
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct UniqueVisitor<K, V>(PhantomData<(K, V)>);

        impl<'de, K, V> Visitor<'de> for UniqueVisitor<K, V>
        where
            K: FromStr + Ord + fmt::Display,
            K::Err: fmt::Display,
            V: Deserialize<'de>,
        {
            type Value = UniqueMap<K, V>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object with unique keys")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
                let mut map = BTreeMap::new();
                // Keys are read as strings (so error paths can name them) and parsed after.
                while let Some(raw) = access.next_key::<String>()? {
                    let k: K = raw.parse().map_err(de::Error::custom)?;
                    if map.contains_key(&k) {
                        return Err(de::Error::custom(format!(
                            "duplicate key `{k}`: each entry may appear once"
                        )));
                    }
                    let v = access.next_value()?;
                    map.insert(k, v);
                }
                Ok(UniqueMap(map))
            }
        }

        d.deserialize_map(UniqueVisitor(PhantomData))
    }
}
