//! `guest_init.<key>=<value>` options on the kernel command line.
//!
//! | parameter                          | default     | meaning                                     |
//! |------------------------------------|-------------|---------------------------------------------|
//! | `guest_init.rootfs=<dev>`          | `/dev/vda`  | read-only image (ext4 or erofs)             |
//! | `guest_init.writable=<dev>`        | `/dev/vdb`  | ext4 overlay upper; `tmpfs` forces a tmpfs  |
//! | `guest_init.config=<dev>`          | `/dev/vdc`  | disk holding `config.json`                  |
//! | `guest_init.device_timeout_ms=<n>` | `10000`     | how long to wait for required block devices |
//! | `guest_init.debug=shell`           | off         | on a fatal error run /bin/sh on the console |
//!
//! A host writes them with [`BootOptions::kernel_params`]; guest-init reads them with [`parse`].

use std::path::PathBuf;
use std::time::Duration;

/// What every guest-init parameter starts with.
pub const PREFIX: &str = "guest_init.";

/// Upper bound of `guest_init.device_timeout_ms`.
pub const MAX_DEVICE_TIMEOUT_MS: u64 = 600_000;

/// Declares [`CmdlineKey`] once: variant and the name after `guest_init.`.
macro_rules! cmdline_keys {
    ($($(#[$doc:meta])* $variant:ident = $name:literal;)+) => {
        /// Every `guest_init.<key>` guest-init understands.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum CmdlineKey {
            $($(#[$doc])* $variant,)+
        }

        impl CmdlineKey {
            pub const ALL: &'static [CmdlineKey] = &[$(CmdlineKey::$variant,)+];

            /// The key without the `guest_init.` prefix.
            pub const fn name(self) -> &'static str {
                match self {
                    $(CmdlineKey::$variant => $name,)+
                }
            }
        }
    };
}

cmdline_keys! {
    /// The image disk.
    Rootfs = "rootfs";
    /// The overlay's writable disk, or `tmpfs`.
    Writable = "writable";
    /// The disk holding `config.json`.
    Config = "config";
    /// How long to wait for block devices, in milliseconds.
    DeviceTimeoutMs = "device_timeout_ms";
    /// `shell`: a debug shell on a fatal error.
    Debug = "debug";
}

impl CmdlineKey {
    pub fn from_name(name: &str) -> Option<CmdlineKey> {
        CmdlineKey::ALL
            .iter()
            .copied()
            .find(|key| key.name() == name)
    }

    /// One kernel parameter, `guest_init.<key>=<value>`.
    pub fn param(self, value: &str) -> String {
        format!("{PREFIX}{}={value}", self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Writable {
    Device(PathBuf),
    /// Upper and work directories on a tmpfs: changes are lost at power off.
    Tmpfs,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootOptions {
    pub rootfs: PathBuf,
    pub writable: Writable,
    pub config: PathBuf,
    pub device_timeout: Duration,
    pub debug_shell: bool,
}

impl Default for BootOptions {
    fn default() -> Self {
        BootOptions {
            rootfs: PathBuf::from("/dev/vda"),
            writable: Writable::Device(PathBuf::from("/dev/vdb")),
            config: PathBuf::from("/dev/vdc"),
            device_timeout: Duration::from_millis(10_000),
            debug_shell: false,
        }
    }
}

impl BootOptions {
    /// The parameters a host appends to the kernel command line: only those that differ from
    /// the defaults. Device paths are written as they are (they must not contain spaces).
    /// The timeout is written in whole milliseconds.
    pub fn kernel_params(&self) -> Vec<String> {
        let default = BootOptions::default();
        let mut params = Vec::new();
        if self.rootfs != default.rootfs {
            params.push(CmdlineKey::Rootfs.param(&self.rootfs.to_string_lossy()));
        }
        if self.writable != default.writable {
            let value = match &self.writable {
                Writable::Device(device) => device.to_string_lossy().into_owned(),
                Writable::Tmpfs => "tmpfs".to_owned(),
            };
            params.push(CmdlineKey::Writable.param(&value));
        }
        if self.config != default.config {
            params.push(CmdlineKey::Config.param(&self.config.to_string_lossy()));
        }
        if self.device_timeout != default.device_timeout {
            let ms = self.device_timeout.as_millis().to_string();
            params.push(CmdlineKey::DeviceTimeoutMs.param(&ms));
        }
        if self.debug_shell {
            params.push(CmdlineKey::Debug.param("shell"));
        }
        params
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    #[error("kernel parameter guest_init.{key}={value:?} is invalid: {allowed}")]
    Invalid {
        key: String,
        value: String,
        allowed: &'static str,
    },
}

/// Parse the whole command line. Unknown `guest_init.*` keys are returned as warnings.
pub fn parse(cmdline: &str) -> Result<(BootOptions, Vec<String>), CmdlineError> {
    let mut options = BootOptions::default();
    let mut warnings = Vec::new();
    for word in split_words(cmdline) {
        let Some(rest) = word.strip_prefix(PREFIX) else {
            continue;
        };
        let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
        let invalid = |allowed| CmdlineError::Invalid {
            key: key.to_owned(),
            value: value.to_owned(),
            allowed,
        };
        let Some(known) = CmdlineKey::from_name(key) else {
            warnings.push(format!("unknown kernel parameter guest_init.{key} ignored"));
            continue;
        };
        match known {
            CmdlineKey::Rootfs => {
                options.rootfs = device_path(value).ok_or_else(|| invalid(DEVICE))?
            }
            CmdlineKey::Config => {
                options.config = device_path(value).ok_or_else(|| invalid(DEVICE))?
            }
            CmdlineKey::Writable => {
                options.writable = match value {
                    "tmpfs" | "none" => Writable::Tmpfs,
                    _ => Writable::Device(
                        device_path(value).ok_or_else(|| invalid("\"tmpfs\" or a /dev/ path"))?,
                    ),
                }
            }
            CmdlineKey::DeviceTimeoutMs => {
                let ms: u64 = value
                    .parse()
                    .map_err(|_| invalid("milliseconds, an integer from 0 to 600000"))?;
                if ms > MAX_DEVICE_TIMEOUT_MS {
                    return Err(invalid("milliseconds, an integer from 0 to 600000"));
                }
                options.device_timeout = Duration::from_millis(ms);
            }
            CmdlineKey::Debug => {
                options.debug_shell = match value {
                    "shell" => true,
                    "off" | "" => false,
                    _ => return Err(invalid("\"shell\" or \"off\"")),
                }
            }
        }
    }
    Ok((options, warnings))
}

const DEVICE: &str = "an absolute /dev/ path, e.g. /dev/vda";

fn device_path(value: &str) -> Option<PathBuf> {
    (value.starts_with("/dev/") && value.len() > 5 && !value.contains(".."))
        .then(|| PathBuf::from(value))
}

/// Split like the kernel does: whitespace separates, double quotes group (and are dropped).
fn split_words(cmdline: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    words.push(std::mem::take(&mut current));
                    any = false;
                }
            }
            c => {
                current.push(c);
                any = true;
            }
        }
    }
    if any {
        words.push(current);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_without_options() {
        let (options, warnings) = parse("console=ttyS0 panic=-1 quiet\n").unwrap();
        assert_eq!(options, BootOptions::default());
        assert!(warnings.is_empty());
    }

    #[test]
    fn all_options() {
        let (options, warnings) = parse(
            "console=ttyS0 guest_init.rootfs=/dev/vdb guest_init.writable=tmpfs \
             guest_init.config=/dev/vdd guest_init.device_timeout_ms=2500 guest_init.debug=shell",
        )
        .unwrap();
        assert_eq!(options.rootfs, PathBuf::from("/dev/vdb"));
        assert_eq!(options.writable, Writable::Tmpfs);
        assert_eq!(options.config, PathBuf::from("/dev/vdd"));
        assert_eq!(options.device_timeout, Duration::from_millis(2500));
        assert!(options.debug_shell);
        assert!(warnings.is_empty());
    }

    #[test]
    fn writable_device_and_quotes() {
        let (options, _) = parse("a=\"x y\" guest_init.writable=\"/dev/vde\"").unwrap();
        assert_eq!(
            options.writable,
            Writable::Device(PathBuf::from("/dev/vde"))
        );
    }

    #[test]
    fn unknown_key_warns() {
        let (_, warnings) = parse("guest_init.colour=blue").unwrap();
        assert_eq!(
            warnings,
            vec!["unknown kernel parameter guest_init.colour ignored"]
        );
    }

    #[test]
    fn invalid_values_name_key_value_and_allowed() {
        let err = parse("guest_init.device_timeout_ms=soon").unwrap_err();
        assert_eq!(
            err.to_string(),
            "kernel parameter guest_init.device_timeout_ms=\"soon\" is invalid: \
             milliseconds, an integer from 0 to 600000"
        );
        let err = parse("guest_init.rootfs=vda").unwrap_err();
        assert!(err.to_string().contains("guest_init.rootfs=\"vda\""));
        assert!(err.to_string().contains("/dev/"));
        let err = parse("guest_init.debug=yes").unwrap_err();
        assert!(err.to_string().contains("\"shell\" or \"off\""));
    }

    #[test]
    fn key_names_are_distinct_and_round_trip() {
        for key in CmdlineKey::ALL {
            assert_eq!(CmdlineKey::from_name(key.name()), Some(*key));
        }
        assert_eq!(
            CmdlineKey::DeviceTimeoutMs.param("5"),
            "guest_init.device_timeout_ms=5"
        );
    }

    #[test]
    fn kernel_params_round_trip() {
        assert!(BootOptions::default().kernel_params().is_empty());
        let options = BootOptions {
            rootfs: PathBuf::from("/dev/vdb"),
            writable: Writable::Tmpfs,
            config: PathBuf::from("/dev/vdd"),
            device_timeout: Duration::from_millis(2500),
            debug_shell: true,
        };
        let params = options.kernel_params();
        assert_eq!(params.len(), CmdlineKey::ALL.len());
        let (parsed, warnings) = parse(&format!("console=ttyS0 {}", params.join(" "))).unwrap();
        assert_eq!(parsed, options);
        assert!(warnings.is_empty());

        let device = BootOptions {
            writable: Writable::Device(PathBuf::from("/dev/vde")),
            ..BootOptions::default()
        };
        assert_eq!(device.kernel_params(), ["guest_init.writable=/dev/vde"]);
        assert_eq!(parse(&device.kernel_params()[0]).unwrap().0, device);
    }
}
