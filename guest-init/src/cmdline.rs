//! `guest_init.<key>=<value>` options from the kernel command line (`/proc/cmdline`).
//!
//! | parameter                          | default     | meaning                                     |
//! |------------------------------------|-------------|---------------------------------------------|
//! | `guest_init.rootfs=<dev>`          | `/dev/vda`  | read-only image (ext4 or erofs)             |
//! | `guest_init.writable=<dev>`        | `/dev/vdb`  | ext4 overlay upper; `tmpfs` forces a tmpfs  |
//! | `guest_init.config=<dev>`          | `/dev/vdc`  | disk holding `config.json`                  |
//! | `guest_init.device_timeout_ms=<n>` | `10000`     | how long to wait for required block devices |
//! | `guest_init.debug=shell`           | off         | on a fatal error run /bin/sh on the console |

use std::path::PathBuf;
use std::time::Duration;

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
        let Some(rest) = word.strip_prefix("guest_init.") else {
            continue;
        };
        let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
        let invalid = |allowed| CmdlineError::Invalid {
            key: key.to_owned(),
            value: value.to_owned(),
            allowed,
        };
        match key {
            "rootfs" => options.rootfs = device_path(value).ok_or_else(|| invalid(DEVICE))?,
            "config" => options.config = device_path(value).ok_or_else(|| invalid(DEVICE))?,
            "writable" => {
                options.writable = match value {
                    "tmpfs" | "none" => Writable::Tmpfs,
                    _ => Writable::Device(
                        device_path(value).ok_or_else(|| invalid("\"tmpfs\" or a /dev/ path"))?,
                    ),
                }
            }
            "device_timeout_ms" => {
                let ms: u64 = value
                    .parse()
                    .map_err(|_| invalid("milliseconds, an integer from 0 to 600000"))?;
                if ms > 600_000 {
                    return Err(invalid("milliseconds, an integer from 0 to 600000"));
                }
                options.device_timeout = Duration::from_millis(ms);
            }
            "debug" => {
                options.debug_shell = match value {
                    "shell" => true,
                    "off" | "" => false,
                    _ => return Err(invalid("\"shell\" or \"off\"")),
                }
            }
            _ => warnings.push(format!("unknown kernel parameter guest_init.{key} ignored")),
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
}
