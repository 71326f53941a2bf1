//! `config.json` from the config disk, in the established host format.
//!
//! Every key is optional; `null` and `""` mean "not set" (Go hosts write nil slices as `null`).
//! Unknown keys produce a warning, never an error. Invalid values produce an error naming the
//! key, the value and what is allowed.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// The file name on the config disk's root.
pub const FILE_NAME: &str = "config.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitMode {
    /// The entrypoint runs as a child of guest-init.
    Exec,
    /// PID 1 is handed to the image's init (systemd).
    Systemd,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeMode {
    ReadOnly,
    ReadWrite,
    /// Read-only device as lower, changes on `overlay_device`.
    Overlay,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMount {
    pub device: PathBuf,
    pub path: PathBuf,
    pub mode: VolumeMode,
    pub overlay_device: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub workdir: Option<PathBuf>,
    pub env: BTreeMap<String, String>,
    /// `Some` when `network_enabled` is true.
    pub network: Option<Network>,
    pub volume_mounts: Vec<VolumeMount>,
    /// `None`: detect from the command (systemd paths) and default to exec.
    pub init_mode: Option<InitMode>,
    pub user: Option<String>,
    pub hostname: Option<String>,
    pub shutdown_grace: Duration,
    pub debug_shell: bool,
    /// A GPU was requested (`gpu` key set to anything but null/false).
    pub gpu: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            entrypoint: Vec::new(),
            cmd: Vec::new(),
            workdir: None,
            env: BTreeMap::new(),
            network: None,
            volume_mounts: Vec::new(),
            init_mode: None,
            user: None,
            hostname: None,
            shutdown_grace: Duration::from_millis(10_000),
            debug_shell: false,
            gpu: false,
        }
    }
}

/// Commands that mean "this image boots its own init".
pub const SYSTEMD_COMMANDS: [&str; 3] = [
    "/sbin/init",
    "/lib/systemd/systemd",
    "/usr/lib/systemd/systemd",
];

impl Config {
    /// argv of the application: entrypoint followed by cmd (container semantics).
    pub fn argv(&self) -> Vec<String> {
        self.entrypoint.iter().chain(&self.cmd).cloned().collect()
    }

    pub fn effective_init_mode(&self) -> InitMode {
        match self.init_mode {
            Some(mode) => mode,
            None => match self.argv().first() {
                Some(first) if SYSTEMD_COMMANDS.contains(&first.as_str()) => InitMode::Systemd,
                _ => InitMode::Exec,
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}; the host must write config.json on the config disk")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON: {source}")]
    Syntax {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: the top level must be a JSON object, found {found}")]
    NotObject { path: PathBuf, found: &'static str },
    #[error("config key `{key}` has invalid value {value}: expected {allowed}")]
    Invalid {
        key: String,
        value: String,
        allowed: String,
    },
}

pub fn load(path: &Path) -> Result<(Config, Vec<String>), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, path)
}

pub fn parse(text: &str, path: &Path) -> Result<(Config, Vec<String>), ConfigError> {
    let value: Value = serde_json::from_str(text).map_err(|source| ConfigError::Syntax {
        path: path.to_owned(),
        source,
    })?;
    let Value::Object(mut map) = value else {
        return Err(ConfigError::NotObject {
            path: path.to_owned(),
            found: json_kind(&value),
        });
    };
    let mut config = Config::default();
    let mut warnings = Vec::new();

    config.entrypoint = take(&mut map, "entrypoint", "an array of strings")?.unwrap_or_default();
    config.cmd = take(&mut map, "cmd", "an array of strings")?.unwrap_or_default();
    config.workdir = take_string(&mut map, "workdir")?
        .map(|workdir| absolute_path("workdir", &workdir))
        .transpose()?;
    config.env = take_env(&mut map)?;
    config.user = take_string(&mut map, "user")?;
    config.hostname = take_string(&mut map, "hostname")?
        .map(|hostname| valid_hostname(&hostname))
        .transpose()?;
    if let Some(ms) = take::<u64>(
        &mut map,
        "shutdown_grace_ms",
        "milliseconds, an integer from 0 to 3600000",
    )? {
        if ms > 3_600_000 {
            return Err(invalid(
                "shutdown_grace_ms",
                &Value::from(ms),
                "milliseconds, an integer from 0 to 3600000",
            ));
        }
        config.shutdown_grace = Duration::from_millis(ms);
    }
    config.debug_shell = take(&mut map, "debug_shell", "true or false")?.unwrap_or(false);
    config.init_mode = match take_string(&mut map, "init_mode")?.as_deref() {
        None => None,
        Some("exec") => Some(InitMode::Exec),
        Some("systemd") => Some(InitMode::Systemd),
        Some(other) => {
            return Err(invalid(
                "init_mode",
                &Value::from(other),
                "\"exec\" or \"systemd\"",
            ));
        }
    };
    config.gpu = !matches!(
        map.remove("gpu"),
        None | Some(Value::Null) | Some(Value::Bool(false))
    );
    config.network = take_network(&mut map)?;
    config.volume_mounts = take_volumes(&mut map)?;

    for key in map.keys() {
        warnings.push(format!("unknown config key `{key}` ignored"));
    }
    Ok((config, warnings))
}

fn invalid(key: &str, value: &Value, allowed: &str) -> ConfigError {
    let mut shown = value.to_string();
    if shown.len() > 80 {
        let mut end = 77;
        while !shown.is_char_boundary(end) {
            end -= 1;
        }
        shown.truncate(end);
        shown.push_str("...");
    }
    ConfigError::Invalid {
        key: key.to_owned(),
        value: shown,
        allowed: allowed.to_owned(),
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Remove `key` and convert it; `null` is "not set".
fn take<T: DeserializeOwned>(
    map: &mut Map<String, Value>,
    key: &str,
    allowed: &str,
) -> Result<Option<T>, ConfigError> {
    match map.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => serde_json::from_value(value.clone())
            .map(Some)
            .map_err(|_| invalid(key, &value, allowed)),
    }
}

/// A string where `""` also means "not set".
fn take_string(map: &mut Map<String, Value>, key: &str) -> Result<Option<String>, ConfigError> {
    Ok(take::<String>(map, key, "a string")?.filter(|s| !s.is_empty()))
}

fn absolute_path(key: &str, value: &str) -> Result<PathBuf, ConfigError> {
    if value.starts_with('/') && !value.contains('\0') {
        Ok(PathBuf::from(value))
    } else {
        Err(invalid(key, &Value::from(value), "an absolute path"))
    }
}

fn device_path(key: &str, value: &str) -> Result<PathBuf, ConfigError> {
    if value.starts_with("/dev/") && value.len() > 5 && !value.contains("..") {
        Ok(PathBuf::from(value))
    } else {
        Err(invalid(
            key,
            &Value::from(value),
            "a device path under /dev/",
        ))
    }
}

fn valid_hostname(name: &str) -> Result<String, ConfigError> {
    let ok = name.len() <= 64
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(name.to_owned())
    } else {
        Err(invalid(
            "hostname",
            &Value::from(name),
            "at most 64 characters of letters, digits, '-' and '.'",
        ))
    }
}

/// `env` as a map (host format) or as `["K=V", ...]` (OCI format).
fn take_env(map: &mut Map<String, Value>) -> Result<BTreeMap<String, String>, ConfigError> {
    const ALLOWED: &str = "an object of string values, or an array of \"NAME=value\" strings";
    let mut env = BTreeMap::new();
    match map.remove("env") {
        None | Some(Value::Null) => {}
        Some(Value::Object(vars)) => {
            for (name, value) in vars {
                let key = format!("env.{name}");
                let Value::String(value) = value else {
                    return Err(invalid(&key, &value, "a string"));
                };
                check_env_name(&key, &name)?;
                env.insert(name, value);
            }
        }
        Some(Value::Array(items)) => {
            for (i, item) in items.into_iter().enumerate() {
                let key = format!("env[{i}]");
                let pair = item.as_str().and_then(|s| s.split_once('='));
                let Some((name, value)) = pair else {
                    return Err(invalid(&key, &item, "a \"NAME=value\" string"));
                };
                check_env_name(&key, name)?;
                env.insert(name.to_owned(), value.to_owned());
            }
        }
        Some(other) => return Err(invalid("env", &other, ALLOWED)),
    }
    Ok(env)
}

fn check_env_name(key: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() || name.contains('=') || name.contains('\0') {
        return Err(invalid(
            key,
            &Value::from(name),
            "a non-empty variable name without '=' or NUL",
        ));
    }
    Ok(())
}

fn take_ipv4(map: &mut Map<String, Value>, key: &str) -> Result<Option<Ipv4Addr>, ConfigError> {
    take_string(map, key)?
        .map(|text| {
            text.parse()
                .map_err(|_| invalid(key, &Value::from(text), "an IPv4 address like 10.0.0.2"))
        })
        .transpose()
}

fn take_network(map: &mut Map<String, Value>) -> Result<Option<Network>, ConfigError> {
    let enabled: bool = take(map, "network_enabled", "true or false")?.unwrap_or(false);
    // Validate the addresses even when disabled, so a typo is caught before it matters.
    let ip = take_ipv4(map, "guest_ip")?;
    let prefix_len: Option<u8> = match map.remove("guest_cidr") {
        None | Some(Value::Null) => None,
        Some(value) => match value.as_u64() {
            Some(n) if n <= 32 => Some(n as u8),
            _ => {
                return Err(invalid(
                    "guest_cidr",
                    &value,
                    "a prefix length, an integer from 0 to 32",
                ));
            }
        },
    };
    let gateway = take_ipv4(map, "guest_gw")?;
    let dns = match map.remove("guest_dns") {
        None | Some(Value::Null) => Vec::new(),
        Some(value) => {
            let texts: Vec<String> = match &value {
                Value::String(s) => s
                    .split([',', ' '])
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
                Value::Array(items) => items
                    .iter()
                    .map(|item| item.as_str().map(str::to_owned))
                    .collect::<Option<_>>()
                    .ok_or_else(|| {
                        invalid("guest_dns", &value, "IPv4 addresses (string or array)")
                    })?,
                _ => {
                    return Err(invalid(
                        "guest_dns",
                        &value,
                        "IPv4 addresses (string or array)",
                    ));
                }
            };
            texts
                .iter()
                .map(|t| t.parse())
                .collect::<Result<_, _>>()
                .map_err(|_| invalid("guest_dns", &value, "IPv4 addresses (string or array)"))?
        }
    };
    if !enabled {
        return Ok(None);
    }
    let Some(ip) = ip else {
        return Err(invalid(
            "guest_ip",
            &Value::Null,
            "an IPv4 address when network_enabled is true",
        ));
    };
    Ok(Some(Network {
        ip,
        prefix_len: prefix_len.unwrap_or(24),
        gateway,
        dns,
    }))
}

fn take_volumes(map: &mut Map<String, Value>) -> Result<Vec<VolumeMount>, ConfigError> {
    let items: Vec<Value> = take(map, "volume_mounts", "an array of objects")?.unwrap_or_default();
    let mut volumes = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let Value::Object(mut fields) = item else {
            return Err(invalid(
                &format!("volume_mounts[{i}]"),
                &item,
                "an object with device, path, mode",
            ));
        };
        let key = |field: &str| format!("volume_mounts[{i}].{field}");
        let device = take_string(&mut fields, "device")
            .map_err(|_| invalid(&key("device"), &Value::Null, "a device path"))?
            .ok_or_else(|| invalid(&key("device"), &Value::Null, "a device path under /dev/"))?;
        let path = take_string(&mut fields, "path")
            .map_err(|_| invalid(&key("path"), &Value::Null, "an absolute path"))?
            .ok_or_else(|| invalid(&key("path"), &Value::Null, "an absolute path"))?;
        let mode = match fields.remove("mode") {
            None | Some(Value::Null) => VolumeMode::ReadWrite,
            Some(Value::String(m)) if m == "rw" || m.is_empty() => VolumeMode::ReadWrite,
            Some(Value::String(m)) if m == "ro" => VolumeMode::ReadOnly,
            Some(Value::String(m)) if m == "overlay" => VolumeMode::Overlay,
            Some(other) => {
                return Err(invalid(
                    &key("mode"),
                    &other,
                    "\"ro\", \"rw\" or \"overlay\"",
                ));
            }
        };
        let overlay_device = take_string(&mut fields, "overlay_device")
            .map_err(|_| invalid(&key("overlay_device"), &Value::Null, "a device path"))?
            .map(|d| device_path(&key("overlay_device"), &d))
            .transpose()?;
        if mode == VolumeMode::Overlay && overlay_device.is_none() {
            return Err(invalid(
                &key("overlay_device"),
                &Value::Null,
                "a device path under /dev/ when mode is \"overlay\"",
            ));
        }
        volumes.push(VolumeMount {
            device: device_path(&key("device"), &device)?,
            path: absolute_path(&key("path"), &path)?,
            mode,
            overlay_device,
        });
    }
    Ok(volumes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(text: &str) -> (Config, Vec<String>) {
        parse(text, Path::new("/config/config.json")).unwrap()
    }

    fn parse_err(text: &str) -> String {
        parse(text, Path::new("/config/config.json"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn full_valid_config() {
        let (config, warnings) = parse_ok(
            r#"{
                "entrypoint": ["/docker-entrypoint.sh"],
                "cmd": ["nginx", "-g", "daemon off;"],
                "workdir": "/srv",
                "env": {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                "network_enabled": true,
                "guest_ip": "10.100.0.2",
                "guest_cidr": 16,
                "guest_gw": "10.100.0.1",
                "guest_dns": "1.1.1.1, 8.8.8.8",
                "volume_mounts": [
                    {"device": "/dev/vdd", "path": "/data", "mode": "rw"},
                    {"device": "/dev/vde", "path": "/cache", "mode": "overlay", "overlay_device": "/dev/vdf"}
                ],
                "init_mode": "exec",
                "user": "www-data",
                "hostname": "web-1",
                "shutdown_grace_ms": 2500,
                "debug_shell": true
            }"#,
        );
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            config.argv(),
            ["/docker-entrypoint.sh", "nginx", "-g", "daemon off;"]
        );
        assert_eq!(config.workdir, Some(PathBuf::from("/srv")));
        assert_eq!(config.env["LANG"], "C.UTF-8");
        let network = config.network.unwrap();
        assert_eq!(network.ip, Ipv4Addr::new(10, 100, 0, 2));
        assert_eq!(network.prefix_len, 16);
        assert_eq!(network.gateway, Some(Ipv4Addr::new(10, 100, 0, 1)));
        assert_eq!(network.dns.len(), 2);
        assert_eq!(config.volume_mounts.len(), 2);
        assert_eq!(config.volume_mounts[1].mode, VolumeMode::Overlay);
        assert_eq!(
            config.volume_mounts[1].overlay_device,
            Some(PathBuf::from("/dev/vdf"))
        );
        assert_eq!(config.init_mode, Some(InitMode::Exec));
        assert_eq!(config.user.as_deref(), Some("www-data"));
        assert_eq!(config.hostname.as_deref(), Some("web-1"));
        assert_eq!(config.shutdown_grace, Duration::from_millis(2500));
        assert!(config.debug_shell);
    }

    #[test]
    fn go_style_nulls_and_empty_strings_mean_unset() {
        let (config, warnings) = parse_ok(
            r#"{"entrypoint": null, "cmd": ["sh"], "workdir": "", "env": null,
                "network_enabled": false, "guest_ip": "", "guest_gw": "", "guest_dns": "",
                "volume_mounts": null, "init_mode": "", "user": ""}"#,
        );
        assert!(warnings.is_empty());
        assert_eq!(config.argv(), ["sh"]);
        assert_eq!(config.workdir, None);
        assert_eq!(config.network, None);
        assert_eq!(config.init_mode, None);
        assert_eq!(config.user, None);
        assert_eq!(config.shutdown_grace, Duration::from_millis(10_000));
    }

    #[test]
    fn env_as_oci_array() {
        let (config, _) = parse_ok(r#"{"env": ["A=1", "B=x=y"]}"#);
        assert_eq!(config.env["A"], "1");
        assert_eq!(config.env["B"], "x=y");
    }

    #[test]
    fn unknown_keys_warn() {
        let (config, warnings) = parse_ok(r#"{"cmd": ["true"], "colour": "blue", "zz": 1}"#);
        assert_eq!(config.cmd, ["true"]);
        assert_eq!(
            warnings,
            [
                "unknown config key `colour` ignored",
                "unknown config key `zz` ignored"
            ]
        );
    }

    #[test]
    fn systemd_is_detected_from_the_command() {
        for command in SYSTEMD_COMMANDS {
            let (config, _) = parse_ok(&format!(r#"{{"cmd": ["{command}"]}}"#));
            assert_eq!(config.effective_init_mode(), InitMode::Systemd);
        }
        let (config, _) = parse_ok(r#"{"cmd": ["/sbin/init"], "init_mode": "exec"}"#);
        assert_eq!(config.effective_init_mode(), InitMode::Exec);
        let (config, _) = parse_ok(r#"{"cmd": ["nginx"]}"#);
        assert_eq!(config.effective_init_mode(), InitMode::Exec);
    }

    #[test]
    fn each_invalid_value_is_named() {
        let cases: &[(&str, &str)] = &[
            (
                r#"{"cmd": "ls -l"}"#,
                "config key `cmd` has invalid value \"ls -l\": expected an array of strings",
            ),
            (
                r#"{"entrypoint": [1]}"#,
                "config key `entrypoint` has invalid value [1]: expected an array of strings",
            ),
            (
                r#"{"workdir": "srv"}"#,
                "config key `workdir` has invalid value \"srv\": expected an absolute path",
            ),
            (
                r#"{"env": {"A": 1}}"#,
                "config key `env.A` has invalid value 1: expected a string",
            ),
            (
                r#"{"env": ["A"]}"#,
                "config key `env[0]` has invalid value \"A\": expected a \"NAME=value\" string",
            ),
            (r#"{"env": 3}"#, "config key `env` has invalid value 3"),
            (
                r#"{"network_enabled": "yes"}"#,
                "config key `network_enabled` has invalid value \"yes\": expected true or false",
            ),
            (
                r#"{"guest_ip": "10.0.0.300"}"#,
                "config key `guest_ip` has invalid value \"10.0.0.300\": expected an IPv4 address",
            ),
            (
                r#"{"guest_cidr": 33}"#,
                "config key `guest_cidr` has invalid value 33: expected a prefix length, an integer from 0 to 32",
            ),
            (
                r#"{"guest_cidr": "24"}"#,
                "config key `guest_cidr` has invalid value \"24\"",
            ),
            (
                r#"{"guest_gw": "gateway"}"#,
                "config key `guest_gw` has invalid value \"gateway\"",
            ),
            (
                r#"{"guest_dns": "1.1.1"}"#,
                "config key `guest_dns` has invalid value \"1.1.1\"",
            ),
            (
                r#"{"network_enabled": true}"#,
                "config key `guest_ip` has invalid value null: expected an IPv4 address when network_enabled is true",
            ),
            (
                r#"{"volume_mounts": {}}"#,
                "config key `volume_mounts` has invalid value {}: expected an array of objects",
            ),
            (
                r#"{"volume_mounts": [{"device": "/dev/vdd", "path": "/d", "mode": "rx"}]}"#,
                "config key `volume_mounts[0].mode` has invalid value \"rx\": expected \"ro\", \"rw\" or \"overlay\"",
            ),
            (
                r#"{"volume_mounts": [{"device": "vdd", "path": "/d"}]}"#,
                "config key `volume_mounts[0].device` has invalid value \"vdd\": expected a device path under /dev/",
            ),
            (
                r#"{"volume_mounts": [{"device": "/dev/vdd", "path": "d"}]}"#,
                "config key `volume_mounts[0].path` has invalid value \"d\": expected an absolute path",
            ),
            (
                r#"{"volume_mounts": [{"device": "/dev/vdd", "path": "/d", "mode": "overlay"}]}"#,
                "config key `volume_mounts[0].overlay_device` has invalid value null",
            ),
            (
                r#"{"init_mode": "sysv"}"#,
                "config key `init_mode` has invalid value \"sysv\": expected \"exec\" or \"systemd\"",
            ),
            (
                r#"{"user": 1000}"#,
                "config key `user` has invalid value 1000: expected a string",
            ),
            (
                r#"{"hostname": "web_1"}"#,
                "config key `hostname` has invalid value \"web_1\"",
            ),
            (
                r#"{"shutdown_grace_ms": -1}"#,
                "config key `shutdown_grace_ms` has invalid value -1: expected milliseconds",
            ),
            (
                r#"{"shutdown_grace_ms": 3600001}"#,
                "config key `shutdown_grace_ms` has invalid value 3600001",
            ),
            (
                r#"{"debug_shell": "on"}"#,
                "config key `debug_shell` has invalid value \"on\": expected true or false",
            ),
        ];
        for (text, expected) in cases {
            let message = parse_err(text);
            assert!(
                message.starts_with(expected),
                "for {text}\n got: {message}\nwant: {expected}"
            );
        }
    }

    #[test]
    fn syntax_and_shape_errors_name_the_file() {
        assert!(parse_err("{").starts_with("/config/config.json is not valid JSON"));
        assert_eq!(
            parse_err("[]"),
            "/config/config.json: the top level must be a JSON object, found an array"
        );
    }

    #[test]
    fn gpu_requested() {
        assert!(parse_ok(r#"{"gpu": {"vendor": "nvidia"}}"#).0.gpu);
        assert!(!parse_ok(r#"{"gpu": null}"#).0.gpu);
        assert!(!parse_ok(r#"{"gpu": false}"#).0.gpu);
    }
}
