//! Writing `config.json` on the host, and serde for embedding a [`Config`] elsewhere.

use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use super::{Config, ConfigError, DEFAULT_SHUTDOWN_GRACE, FILE_NAME, key, parse};

impl Config {
    /// The JSON object guest-init reads. Unset keys are left out; nothing is validated.
    pub fn to_value(&self) -> Value {
        let mut map = Map::new();
        let mut put = |key: &str, value: Value| {
            map.insert(key.to_owned(), value);
        };
        let path = |path: &Path| Value::from(path.to_string_lossy().into_owned());
        if !self.entrypoint.is_empty() {
            put(key::ENTRYPOINT, Value::from(self.entrypoint.clone()));
        }
        if !self.cmd.is_empty() {
            put(key::CMD, Value::from(self.cmd.clone()));
        }
        if let Some(workdir) = &self.workdir {
            put(key::WORKDIR, path(workdir));
        }
        if !self.env.is_empty() {
            let env = self
                .env
                .iter()
                .map(|(name, value)| (name.clone(), Value::from(value.as_str())))
                .collect();
            put(key::ENV, Value::Object(env));
        }
        if let Some(network) = &self.network {
            put(key::NETWORK_ENABLED, Value::Bool(true));
            put(key::GUEST_IP, Value::from(network.ip.to_string()));
            put(key::GUEST_CIDR, Value::from(network.prefix_len));
            if let Some(gateway) = network.gateway {
                put(key::GUEST_GW, Value::from(gateway.to_string()));
            }
            if !network.dns.is_empty() {
                let dns: Vec<String> = network.dns.iter().map(ToString::to_string).collect();
                put(key::GUEST_DNS, Value::from(dns));
            }
            if let Some(mac) = network.mac {
                put(key::GUEST_MAC, Value::from(mac.to_string()));
            }
            if let Some(mtu) = network.mtu {
                put(key::GUEST_MTU, Value::from(mtu));
            }
        }
        if !self.volume_mounts.is_empty() {
            let volumes = self
                .volume_mounts
                .iter()
                .map(|volume| {
                    let mut fields = Map::new();
                    fields.insert(key::volume::DEVICE.into(), path(&volume.device));
                    fields.insert(key::volume::PATH.into(), path(&volume.path));
                    fields.insert(key::volume::MODE.into(), volume.mode.name().into());
                    if let Some(overlay) = &volume.overlay_device {
                        fields.insert(key::volume::OVERLAY_DEVICE.into(), path(overlay));
                    }
                    Value::Object(fields)
                })
                .collect();
            put(key::VOLUME_MOUNTS, Value::Array(volumes));
        }
        if let Some(mode) = self.init_mode {
            put(key::INIT_MODE, Value::from(mode.name()));
        }
        if let Some(user) = &self.user {
            put(key::USER, Value::from(user.as_str()));
        }
        if let Some(hostname) = &self.hostname {
            put(key::HOSTNAME, Value::from(hostname.as_str()));
        }
        if self.shutdown_grace != DEFAULT_SHUTDOWN_GRACE {
            let ms = u64::try_from(self.shutdown_grace.as_millis()).unwrap_or(u64::MAX);
            put(key::SHUTDOWN_GRACE_MS, Value::from(ms));
        }
        if self.debug_shell {
            put(key::DEBUG_SHELL, Value::Bool(true));
        }
        if self.gpu {
            put(key::GPU, Value::Bool(true));
        }
        Value::Object(map)
    }

    /// `config.json` as guest-init will accept it: the same validation guest-init applies
    /// (same error texts), so a host cannot write a config that fails at boot for its values.
    pub fn to_json(&self) -> Result<String, ConfigError> {
        let value = self.to_value();
        super::parse::from_value(value.clone(), Path::new(FILE_NAME))?;
        Ok(serde_json::to_string_pretty(&value).expect("a JSON value always serializes"))
    }

    /// Parse `config.json` text (errors name the file `config.json`); returns the config and
    /// one warning per unknown key.
    pub fn from_json(text: &str) -> Result<(Config, Vec<String>), ConfigError> {
        parse(text, Path::new(FILE_NAME))
    }
}

impl Serialize for Config {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_value().serialize(serializer)
    }
}

/// Validates like guest-init; unknown keys are dropped silently (use [`super::parse`] to see
/// them).
impl<'de> Deserialize<'de> for Config {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Config, D::Error> {
        let value = Value::deserialize(deserializer)?;
        super::parse::from_value(value, Path::new(FILE_NAME))
            .map(|(config, _)| config)
            .map_err(serde::de::Error::custom)
    }
}
