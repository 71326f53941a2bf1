//! Module groups: kernel modules an initrd carries but guest-init loads only when a matching PCI
//! device is present (drivers on demand). The initrd builder writes the groups file, guest-init
//! reads it, so its format and the PCI pattern syntax are defined once, here.
//!
//! ## PCI patterns
//!
//! `VENDOR[:DEVICE[:CLASS]]`, as `lspci -d` takes them: VENDOR and DEVICE are 4 hex digits,
//! CLASS is 2, 4 or 6 hex digits (base class, + subclass, + programming interface) and matches
//! the device's 24-bit class code by prefix. An empty part or `*` matches anything; at least
//! one part must be given. `10de::03` is every NVIDIA display controller, `1af4:1005` QEMU's
//! virtio-rng, `::0c03` any USB controller.
//!
//! ## The groups file (`/lib/modules/groups`)
//!
//! One `<keyword> <value>` per line; blank lines and `#` comments are ignored. `group <name>`
//! starts a group; the lines after it until the next `group` belong to it:
//!
//! ```text
//! group gpu
//! pci 10de::03
//! firmware lib/firmware/nvidia
//! module lib/modules/6.1.0-56-cloud-amd64/kernel/drivers/video/nvidia.ko
//! module lib/modules/6.1.0-56-cloud-amd64/kernel/drivers/video/nvidia-uvm.ko
//! ```
//!
//! `pci`: a pattern (at least one per group; any of them matching selects the group).
//! `module`: a module file relative to `/`, in load order (dependencies first; modules the
//! always-loaded list already has are left out). `firmware`: a file or directory relative to
//! `/` that holds firmware the group's drivers request (relative paths below it are kept).

use std::fmt;
use std::str::FromStr;

/// Where guest-init reads the groups, relative to `/`.
pub const GROUPS_FILE: &str = "lib/modules/groups";
/// The group whose device nodes guest-init creates and which `gpu` in config.json asks for.
pub const GPU_GROUP: &str = "gpu";
/// Where an initrd's firmware lives, relative to `/` (the kernel's default search path).
pub const FIRMWARE_DIR: &str = "lib/firmware";

/// One PCI function as sysfs describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciId {
    pub vendor: u16,
    pub device: u16,
    /// Base class, subclass and programming interface: `0x030000` is a VGA controller.
    pub class: u32,
}

/// A prefix of the 24-bit class code: `digits` hex digits (2, 4 or 6) of `value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassPrefix {
    pub value: u32,
    pub digits: u8,
}

/// `VENDOR[:DEVICE[:CLASS]]`, each part optional.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciPattern {
    pub vendor: Option<u16>,
    pub device: Option<u16>,
    pub class: Option<ClassPrefix>,
}

impl PciPattern {
    pub fn matches(&self, id: &PciId) -> bool {
        self.vendor.is_none_or(|v| v == id.vendor)
            && self.device.is_none_or(|d| d == id.device)
            && self.class.is_none_or(|c| {
                let shift = 4 * (6 - u32::from(c.digits));
                (id.class & 0x00ff_ffff) >> shift == c.value
            })
    }
}

/// Why a pattern does not parse; the message says what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "PCI pattern {pattern:?}: {problem}; expected VENDOR[:DEVICE[:CLASS]] with 4-digit hex \
     vendor and device ids and a 2-, 4- or 6-digit hex class, e.g. `10de::03` or `1af4:1005`"
)]
pub struct PatternError {
    pub pattern: String,
    pub problem: String,
}

fn hex_part(part: &str, digits: &[usize], what: &str) -> Result<Option<u32>, String> {
    if part.is_empty() || part == "*" {
        return Ok(None);
    }
    if !digits.contains(&part.len()) || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "{what} {part:?} is not hex digits of the right length"
        ));
    }
    u32::from_str_radix(part, 16)
        .map(Some)
        .map_err(|e| format!("{what} {part:?}: {e}"))
}

impl FromStr for PciPattern {
    type Err = PatternError;

    fn from_str(text: &str) -> Result<PciPattern, PatternError> {
        let fail = |problem: String| PatternError {
            pattern: text.to_owned(),
            problem,
        };
        let parts: Vec<&str> = text.trim().split(':').collect();
        if parts.len() > 3 {
            return Err(fail("more than three parts".into()));
        }
        let part = |i: usize| parts.get(i).copied().unwrap_or("");
        let vendor = hex_part(part(0), &[4], "vendor").map_err(fail)?;
        let device = hex_part(part(1), &[4], "device").map_err(fail)?;
        let class = hex_part(part(2), &[2, 4, 6], "class").map_err(fail)?;
        let pattern = PciPattern {
            vendor: vendor.map(|v| v as u16),
            device: device.map(|d| d as u16),
            class: class.map(|value| ClassPrefix {
                value,
                digits: part(2).len() as u8,
            }),
        };
        if pattern.vendor.is_none() && pattern.device.is_none() && pattern.class.is_none() {
            return Err(fail("matches every device".into()));
        }
        Ok(pattern)
    }
}

impl fmt::Display for PciPattern {
    /// The canonical form: lowercase, empty parts for "any", no trailing colons.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let vendor = self.vendor.map(|v| format!("{v:04x}")).unwrap_or_default();
        let device = self.device.map(|d| format!("{d:04x}")).unwrap_or_default();
        match self.class {
            Some(c) => write!(
                f,
                "{vendor}:{device}:{:0width$x}",
                c.value,
                width = usize::from(c.digits)
            ),
            None if self.device.is_some() => write!(f, "{vendor}:{device}"),
            None => write!(f, "{vendor}"),
        }
    }
}

/// One group of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleGroup {
    pub name: String,
    pub pci: Vec<PciPattern>,
    /// Firmware files or directories, relative to `/`.
    pub firmware: Vec<String>,
    /// Module files relative to `/`, in load order.
    pub modules: Vec<String>,
}

impl ModuleGroup {
    pub fn matches(&self, id: &PciId) -> bool {
        self.pci.iter().any(|p| p.matches(id))
    }
}

/// A malformed groups file: the line and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct GroupsError {
    pub line: usize,
    pub message: String,
}

/// A group name: letters, digits, `.`, `_`, `+`, `-` (the lock's entry names); not empty.
pub fn check_group_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "group name {name:?} is not usable; allowed are letters, digits, `.`, `_`, `+`, `-`"
        ))
    }
}

/// A path relative to `/` that stays inside it.
fn check_relative(path: &str, module: bool) -> Result<(), String> {
    let inside = !path.is_empty()
        && !path.starts_with('/')
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..");
    if !inside {
        return Err(format!("{path:?} is not a plain path relative to /"));
    }
    if module && !path.ends_with(".ko") {
        return Err(format!("{path:?} is not a .ko module file"));
    }
    Ok(())
}

/// Parses the groups file. Every group has at least one pattern and one module, and names
/// are unique.
pub fn parse_groups(text: &str) -> Result<Vec<ModuleGroup>, GroupsError> {
    let mut groups: Vec<ModuleGroup> = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let fail = |message: String| GroupsError { line, message };
        let entry = raw.trim();
        if entry.is_empty() || entry.starts_with('#') {
            continue;
        }
        let (keyword, value) = entry
            .split_once(char::is_whitespace)
            .map(|(k, v)| (k, v.trim()))
            .ok_or_else(|| fail(format!("{entry:?} has no value after its keyword")))?;
        if keyword == "group" {
            check_group_name(value).map_err(fail)?;
            if let Some(done) = groups.last() {
                finish(done).map_err(fail)?;
            }
            if groups.iter().any(|g| g.name == value) {
                return Err(fail(format!("group `{value}` appears twice")));
            }
            groups.push(ModuleGroup {
                name: value.to_owned(),
                pci: Vec::new(),
                firmware: Vec::new(),
                modules: Vec::new(),
            });
            continue;
        }
        let group = groups
            .last_mut()
            .ok_or_else(|| fail(format!("`{keyword}` before the first `group` line")))?;
        match keyword {
            "pci" => group.pci.push(
                value
                    .parse()
                    .map_err(|e: PatternError| fail(e.to_string()))?,
            ),
            "module" => {
                check_relative(value, true).map_err(fail)?;
                group.modules.push(value.to_owned());
            }
            "firmware" => {
                check_relative(value, false).map_err(fail)?;
                group.firmware.push(value.to_owned());
            }
            other => {
                return Err(fail(format!(
                    "unknown keyword `{other}`; expected group, pci, module or firmware"
                )));
            }
        }
    }
    if let Some(last) = groups.last() {
        finish(last).map_err(|message| GroupsError {
            line: text.lines().count(),
            message,
        })?;
    }
    Ok(groups)
}

fn finish(group: &ModuleGroup) -> Result<(), String> {
    if group.pci.is_empty() {
        return Err(format!("group `{}` has no `pci` pattern", group.name));
    }
    if group.modules.is_empty() {
        return Err(format!("group `{}` has no `module`", group.name));
    }
    Ok(())
}

/// The file text for `groups`, which [`parse_groups`] reads back unchanged.
pub fn render_groups(groups: &[ModuleGroup]) -> String {
    let mut text = String::from(
        "# Module groups: guest-init loads a group's modules when a PCI device matches a pattern.\n",
    );
    for group in groups {
        text.push_str(&format!("group {}\n", group.name));
        for pattern in &group.pci {
            text.push_str(&format!("pci {pattern}\n"));
        }
        for path in &group.firmware {
            text.push_str(&format!("firmware {path}\n"));
        }
        for path in &group.modules {
            text.push_str(&format!("module {path}\n"));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(text: &str) -> PciPattern {
        text.parse().unwrap()
    }

    const NVIDIA_VGA: PciId = PciId {
        vendor: 0x10de,
        device: 0x2330,
        class: 0x030200,
    };
    const NVIDIA_AUDIO: PciId = PciId {
        vendor: 0x10de,
        device: 0x22bc,
        class: 0x040300,
    };
    const VIRTIO_RNG: PciId = PciId {
        vendor: 0x1af4,
        device: 0x1005,
        class: 0x00ff00,
    };

    #[test]
    fn vendor_only_matches_every_device_of_the_vendor() {
        let p = pattern("10de");
        assert!(p.matches(&NVIDIA_VGA) && p.matches(&NVIDIA_AUDIO));
        assert!(!p.matches(&VIRTIO_RNG));
        assert_eq!(pattern("10DE:"), p);
        assert_eq!(pattern("10de:*"), p);
    }

    #[test]
    fn vendor_and_device_match_one_function() {
        let p = pattern("1af4:1005");
        assert!(p.matches(&VIRTIO_RNG));
        assert!(!p.matches(&PciId {
            device: 0x1044,
            ..VIRTIO_RNG
        }));
        assert!(!p.matches(&NVIDIA_VGA));
        assert!(pattern(":1005").matches(&VIRTIO_RNG));
    }

    #[test]
    fn class_masks_match_by_prefix() {
        // Display controllers (0x03xxxx) of NVIDIA, not its HDMI audio function.
        let display = pattern("10de::03");
        assert!(display.matches(&NVIDIA_VGA));
        assert!(!display.matches(&NVIDIA_AUDIO));
        assert!(pattern("10de::0302").matches(&NVIDIA_VGA));
        assert!(!pattern("10de::0300").matches(&NVIDIA_VGA));
        assert!(pattern("::030200").matches(&NVIDIA_VGA));
        assert!(!pattern("::030201").matches(&NVIDIA_VGA));
        assert!(pattern("*:*:00ff").matches(&VIRTIO_RNG));
    }

    #[test]
    fn patterns_print_canonically_and_parse_back() {
        for (text, canonical) in [
            ("10DE", "10de"),
            ("10de:", "10de"),
            ("1af4:1005", "1af4:1005"),
            ("10de::03", "10de::03"),
            ("*:*:0c03", "::0c03"),
            (":1005", ":1005"),
        ] {
            let p = pattern(text);
            assert_eq!(p.to_string(), canonical, "{text}");
            assert_eq!(pattern(canonical), p);
        }
    }

    #[test]
    fn bad_patterns_say_what_is_allowed() {
        for bad in [
            "",
            "::",
            "*",
            "10d",
            "10de0",
            "10de:xyz1",
            "10de::3",
            "10de::03000",
            "a:b:c:d",
        ] {
            let err = bad.parse::<PciPattern>().unwrap_err();
            assert!(
                err.to_string().contains("expected VENDOR[:DEVICE[:CLASS]]"),
                "{bad}: {err}"
            );
        }
        let err = "10de::3".parse::<PciPattern>().unwrap_err();
        assert_eq!(
            err.problem,
            "class \"3\" is not hex digits of the right length"
        );
    }

    fn gpu_group() -> ModuleGroup {
        ModuleGroup {
            name: "gpu".into(),
            pci: vec![pattern("10de::03")],
            firmware: vec!["lib/firmware/nvidia".into()],
            modules: vec![
                "lib/modules/6.1/kernel/nvidia.ko".into(),
                "lib/modules/6.1/kernel/nvidia-uvm.ko".into(),
            ],
        }
    }

    #[test]
    fn the_file_round_trips() {
        let rng = ModuleGroup {
            name: "rng".into(),
            pci: vec![pattern("1af4:1005"), pattern("1af4:1044")],
            firmware: vec![],
            modules: vec!["lib/modules/6.1/kernel/virtio-rng.ko".into()],
        };
        let groups = vec![gpu_group(), rng];
        let text = render_groups(&groups);
        assert!(text.contains("group gpu\npci 10de::03\nfirmware lib/firmware/nvidia\nmodule "));
        assert_eq!(parse_groups(&text).unwrap(), groups);
        assert_eq!(parse_groups("").unwrap(), []);
        assert!(gpu_group().matches(&NVIDIA_VGA));
        assert!(!gpu_group().matches(&VIRTIO_RNG));
    }

    #[test]
    fn malformed_files_name_the_line() {
        for (text, line, needle) in [
            ("pci 10de\n", 1, "before the first `group`"),
            ("group a\npci 10de\n", 2, "has no `module`"),
            (
                "group a\nmodule x.ko\ngroup b\n",
                3,
                "group `a` has no `pci`",
            ),
            (
                "group a\npci 10de\nmodule a.ko\ngroup a\n",
                4,
                "appears twice",
            ),
            ("group a b\n", 1, "not usable"),
            ("group a\nmodule ../x.ko\n", 2, "not a plain path"),
            ("group a\nmodule /x.ko\n", 2, "not a plain path"),
            ("group a\nmodule x.o\n", 2, "not a .ko"),
            ("group a\npci 10d\n", 2, "PCI pattern"),
            ("group a\ndriver x\n", 2, "unknown keyword `driver`"),
            ("group\n", 1, "no value"),
        ] {
            let err = parse_groups(text).unwrap_err();
            assert_eq!(err.line, line, "{text:?}: {err}");
            assert!(err.message.contains(needle), "{text:?}: {err}");
        }
    }
}
