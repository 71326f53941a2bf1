//! Reading `config.json`: each key is taken out of the JSON object and validated; what is left
//! over is an unknown key (a warning).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::key;
use super::{
    Config, ConfigError, DEFAULT_PREFIX_LEN, InitMode, MAX_SHUTDOWN_GRACE, MTU_RANGE, MacAddress,
    Network, VolumeMode, VolumeMount,
};

/// Parse the text of `config.json`; `path` only names the file in errors. Returns the config
/// and one warning per unknown key.
pub fn parse(text: &str, path: &Path) -> Result<(Config, Vec<String>), ConfigError> {
    let value: Value = serde_json::from_str(text).map_err(|source| ConfigError::Syntax {
        path: path.to_owned(),
        source,
    })?;
    from_value(value, path)
}

pub(super) fn from_value(value: Value, path: &Path) -> Result<(Config, Vec<String>), ConfigError> {
    let Value::Object(mut map) = value else {
        return Err(ConfigError::NotObject {
            path: path.to_owned(),
            found: json_kind(&value),
        });
    };
    let mut config = Config::default();
    let mut warnings = Vec::new();

    config.entrypoint = take(&mut map, key::ENTRYPOINT, "an array of strings")?.unwrap_or_default();
    config.cmd = take(&mut map, key::CMD, "an array of strings")?.unwrap_or_default();
    config.workdir = take_string(&mut map, key::WORKDIR)?
        .map(|workdir| absolute_path(key::WORKDIR, &workdir))
        .transpose()?;
    config.env = take_env(&mut map)?;
    config.user = take_string(&mut map, key::USER)?;
    config.hostname = take_string(&mut map, key::HOSTNAME)?
        .map(|hostname| valid_hostname(&hostname))
        .transpose()?;
    if let Some(ms) = take::<u64>(
        &mut map,
        key::SHUTDOWN_GRACE_MS,
        "milliseconds, an integer from 0 to 3600000",
    )? {
        if ms > MAX_SHUTDOWN_GRACE.as_millis() as u64 {
            return Err(invalid(
                key::SHUTDOWN_GRACE_MS,
                &Value::from(ms),
                "milliseconds, an integer from 0 to 3600000",
            ));
        }
        config.shutdown_grace = Duration::from_millis(ms);
    }
    config.debug_shell = take(&mut map, key::DEBUG_SHELL, "true or false")?.unwrap_or(false);
    config.init_mode = match take_string(&mut map, key::INIT_MODE)?.as_deref() {
        None => None,
        Some("exec") => Some(InitMode::Exec),
        Some("systemd") => Some(InitMode::Systemd),
        Some(other) => {
            return Err(invalid(
                key::INIT_MODE,
                &Value::from(other),
                "\"exec\" or \"systemd\"",
            ));
        }
    };
    config.gpu = !matches!(
        map.remove(key::GPU),
        None | Some(Value::Null) | Some(Value::Bool(false))
    );
    config.network = take_network(&mut map)?;
    config.volume_mounts = take_volumes(&mut map)?;

    for unknown in map.keys() {
        warnings.push(format!("unknown config key `{unknown}` ignored"));
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
            key::HOSTNAME,
            &Value::from(name),
            "at most 64 characters of letters, digits, '-' and '.'",
        ))
    }
}

/// `env` as a map (host format) or as `["K=V", ...]` (OCI format).
fn take_env(map: &mut Map<String, Value>) -> Result<BTreeMap<String, String>, ConfigError> {
    const ALLOWED: &str = "an object of string values, or an array of \"NAME=value\" strings";
    let mut env = BTreeMap::new();
    match map.remove(key::ENV) {
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
        Some(other) => return Err(invalid(key::ENV, &other, ALLOWED)),
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
    let enabled: bool = take(map, key::NETWORK_ENABLED, "true or false")?.unwrap_or(false);
    // Validate the addresses even when disabled, so a typo is caught before it matters.
    let ip = take_ipv4(map, key::GUEST_IP)?;
    let prefix_len: Option<u8> = match map.remove(key::GUEST_CIDR) {
        None | Some(Value::Null) => None,
        Some(value) => match value.as_u64() {
            Some(n) if n <= 32 => Some(n as u8),
            _ => {
                return Err(invalid(
                    key::GUEST_CIDR,
                    &value,
                    "a prefix length, an integer from 0 to 32",
                ));
            }
        },
    };
    let gateway = take_ipv4(map, key::GUEST_GW)?;
    let dns = match map.remove(key::GUEST_DNS) {
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
                        invalid(key::GUEST_DNS, &value, "IPv4 addresses (string or array)")
                    })?,
                _ => {
                    return Err(invalid(
                        key::GUEST_DNS,
                        &value,
                        "IPv4 addresses (string or array)",
                    ));
                }
            };
            texts
                .iter()
                .map(|t| t.parse())
                .collect::<Result<_, _>>()
                .map_err(|_| invalid(key::GUEST_DNS, &value, "IPv4 addresses (string or array)"))?
        }
    };
    let mac = take_string(map, key::GUEST_MAC)?
        .map(|text| {
            text.parse::<MacAddress>().map_err(|()| {
                invalid(
                    key::GUEST_MAC,
                    &Value::from(text),
                    "a MAC address like 52:54:00:12:34:56",
                )
            })
        })
        .transpose()?;
    let mtu = match map.remove(key::GUEST_MTU) {
        None | Some(Value::Null) => None,
        Some(value) => match value.as_u64() {
            Some(n) if MTU_RANGE.contains(&n.try_into().unwrap_or(u32::MAX)) => Some(n as u32),
            _ => {
                return Err(invalid(
                    key::GUEST_MTU,
                    &value,
                    "an MTU, an integer from 68 to 65535",
                ));
            }
        },
    };
    if !enabled {
        return Ok(None);
    }
    let Some(ip) = ip else {
        return Err(invalid(
            key::GUEST_IP,
            &Value::Null,
            "an IPv4 address when network_enabled is true",
        ));
    };
    Ok(Some(Network {
        ip,
        prefix_len: prefix_len.unwrap_or(DEFAULT_PREFIX_LEN),
        gateway,
        dns,
        mac,
        mtu,
    }))
}

fn take_volumes(map: &mut Map<String, Value>) -> Result<Vec<VolumeMount>, ConfigError> {
    let items: Vec<Value> =
        take(map, key::VOLUME_MOUNTS, "an array of objects")?.unwrap_or_default();
    let mut volumes = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let Value::Object(mut fields) = item else {
            return Err(invalid(
                &format!("volume_mounts[{i}]"),
                &item,
                "an object with device, path, mode",
            ));
        };
        let field_key = |field: &str| format!("volume_mounts[{i}].{field}");
        let device = take_string(&mut fields, key::volume::DEVICE)
            .map_err(|_| invalid(&field_key("device"), &Value::Null, "a device path"))?
            .ok_or_else(|| {
                invalid(
                    &field_key("device"),
                    &Value::Null,
                    "a device path under /dev/",
                )
            })?;
        let path = take_string(&mut fields, key::volume::PATH)
            .map_err(|_| invalid(&field_key("path"), &Value::Null, "an absolute path"))?
            .ok_or_else(|| invalid(&field_key("path"), &Value::Null, "an absolute path"))?;
        let mode = match fields.remove(key::volume::MODE) {
            None | Some(Value::Null) => VolumeMode::ReadWrite,
            Some(Value::String(m)) if m == "rw" || m.is_empty() => VolumeMode::ReadWrite,
            Some(Value::String(m)) if m == "ro" => VolumeMode::ReadOnly,
            Some(Value::String(m)) if m == "overlay" => VolumeMode::Overlay,
            Some(other) => {
                return Err(invalid(
                    &field_key("mode"),
                    &other,
                    "\"ro\", \"rw\" or \"overlay\"",
                ));
            }
        };
        let overlay_device = take_string(&mut fields, key::volume::OVERLAY_DEVICE)
            .map_err(|_| invalid(&field_key("overlay_device"), &Value::Null, "a device path"))?
            .map(|d| device_path(&field_key("overlay_device"), &d))
            .transpose()?;
        if mode == VolumeMode::Overlay && overlay_device.is_none() {
            return Err(invalid(
                &field_key("overlay_device"),
                &Value::Null,
                "a device path under /dev/ when mode is \"overlay\"",
            ));
        }
        volumes.push(VolumeMount {
            device: device_path(&field_key("device"), &device)?,
            path: absolute_path(&field_key("path"), &path)?,
            mode,
            overlay_device,
        });
    }
    Ok(volumes)
}
