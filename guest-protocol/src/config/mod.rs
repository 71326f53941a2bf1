//! `config.json` on the config disk, in the established host format.
//!
//! Every key is optional; `null` and `""` mean "not set" (Go hosts write nil slices as `null`).
//! Unknown keys produce a warning, never an error. Invalid values produce an error naming the
//! key, the value and what is allowed.
//!
//! guest-init reads the file with [`parse`]; a host builds a [`Config`] (e.g.
//! `Config::exec(["/bin/app"]).with_env("LANG", "C.UTF-8")`) and writes
//! [`Config::to_json`], which applies the same validation.

mod parse;
#[cfg(test)]
mod tests;
mod write;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

pub use parse::parse;

/// The file name on the config disk's root.
pub const FILE_NAME: &str = "config.json";

/// The keys guest-init reads; anything else is warned about and ignored.
pub mod key {
    pub const ENTRYPOINT: &str = "entrypoint";
    pub const CMD: &str = "cmd";
    pub const WORKDIR: &str = "workdir";
    pub const ENV: &str = "env";
    pub const NETWORK_ENABLED: &str = "network_enabled";
    pub const GUEST_IP: &str = "guest_ip";
    pub const GUEST_CIDR: &str = "guest_cidr";
    pub const GUEST_GW: &str = "guest_gw";
    pub const GUEST_DNS: &str = "guest_dns";
    pub const GUEST_MAC: &str = "guest_mac";
    pub const GUEST_MTU: &str = "guest_mtu";
    pub const VOLUME_MOUNTS: &str = "volume_mounts";
    pub const INIT_MODE: &str = "init_mode";
    pub const USER: &str = "user";
    pub const HOSTNAME: &str = "hostname";
    pub const SHUTDOWN_GRACE_MS: &str = "shutdown_grace_ms";
    pub const DEBUG_SHELL: &str = "debug_shell";
    pub const GPU: &str = "gpu";

    /// The fields of each `volume_mounts` entry.
    pub mod volume {
        pub const DEVICE: &str = "device";
        pub const PATH: &str = "path";
        pub const MODE: &str = "mode";
        pub const OVERLAY_DEVICE: &str = "overlay_device";
    }

    /// Every key above.
    pub const ALL: [&str; 18] = [
        ENTRYPOINT,
        CMD,
        WORKDIR,
        ENV,
        NETWORK_ENABLED,
        GUEST_IP,
        GUEST_CIDR,
        GUEST_GW,
        GUEST_DNS,
        GUEST_MAC,
        GUEST_MTU,
        VOLUME_MOUNTS,
        INIT_MODE,
        USER,
        HOSTNAME,
        SHUTDOWN_GRACE_MS,
        DEBUG_SHELL,
        GPU,
    ];
}

/// Upper bound of `shutdown_grace_ms`: one hour.
pub const MAX_SHUTDOWN_GRACE: Duration = Duration::from_millis(3_600_000);
/// `shutdown_grace_ms` when not set.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_millis(10_000);
/// `guest_cidr` when not set.
pub const DEFAULT_PREFIX_LEN: u8 = 24;
/// Bounds of `guest_mtu`: IPv4's minimum (RFC 791) to the largest jumbo frame a link carries.
pub const MTU_RANGE: std::ops::RangeInclusive<u32> = 68..=65535;

/// Commands that mean "this image boots its own init".
pub const SYSTEMD_COMMANDS: [&str; 3] = [
    "/sbin/init",
    "/lib/systemd/systemd",
    "/usr/lib/systemd/systemd",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitMode {
    /// The entrypoint runs as a child of guest-init.
    Exec,
    /// PID 1 is handed to the image's init (systemd).
    Systemd,
}

impl InitMode {
    /// The value of `init_mode`.
    pub const fn name(self) -> &'static str {
        match self {
            InitMode::Exec => "exec",
            InitMode::Systemd => "systemd",
        }
    }
}

/// An Ethernet address, written `52:54:00:12:34:56` (case-insensitive when read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddress(pub [u8; 6]);

impl std::fmt::Display for MacAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl std::str::FromStr for MacAddress {
    type Err = ();

    /// Six colon-separated pairs of hex digits.
    fn from_str(text: &str) -> Result<MacAddress, ()> {
        let mut bytes = [0u8; 6];
        let mut parts = text.split(':');
        for byte in &mut bytes {
            let part = parts.next().ok_or(())?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(());
            }
            *byte = u8::from_str_radix(part, 16).map_err(drop)?;
        }
        match parts.next() {
            None => Ok(MacAddress(bytes)),
            Some(_) => Err(()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    /// The interface to configure (`guest_mac`); `None`: the first virtio-net interface.
    pub mac: Option<MacAddress>,
    /// `guest_mtu`; `None`: the driver's default.
    pub mtu: Option<u32>,
}

impl Network {
    pub fn new(ip: Ipv4Addr, prefix_len: u8) -> Network {
        Network {
            ip,
            prefix_len,
            gateway: None,
            dns: Vec::new(),
            mac: None,
            mtu: None,
        }
    }

    pub fn with_gateway(mut self, gateway: Ipv4Addr) -> Network {
        self.gateway = Some(gateway);
        self
    }

    pub fn with_dns(mut self, server: Ipv4Addr) -> Network {
        self.dns.push(server);
        self
    }

    /// Configure the interface with this MAC address instead of the first virtio-net one.
    pub fn with_mac(mut self, mac: MacAddress) -> Network {
        self.mac = Some(mac);
        self
    }

    pub fn with_mtu(mut self, mtu: u32) -> Network {
        self.mtu = Some(mtu);
        self
    }

    /// The subnet `ip/prefix_len` covers, e.g. `192.0.2.0` for `192.0.2.15/24`.
    pub fn subnet(&self) -> Ipv4Addr {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len))
            .unwrap_or(0);
        Ipv4Addr::from(u32::from(self.ip) & mask)
    }

    /// Whether `address` lies in the interface's subnet (a gateway must).
    pub fn contains(&self, address: Ipv4Addr) -> bool {
        let other = Network {
            ip: address,
            ..self.clone()
        };
        other.subnet() == self.subnet()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeMode {
    ReadOnly,
    ReadWrite,
    /// Read-only device as lower, changes on `overlay_device`.
    Overlay,
}

impl VolumeMode {
    /// The value of `mode`.
    pub const fn name(self) -> &'static str {
        match self {
            VolumeMode::ReadOnly => "ro",
            VolumeMode::ReadWrite => "rw",
            VolumeMode::Overlay => "overlay",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMount {
    pub device: PathBuf,
    pub path: PathBuf,
    pub mode: VolumeMode,
    pub overlay_device: Option<PathBuf>,
}

impl VolumeMount {
    pub fn read_only(device: impl Into<PathBuf>, path: impl Into<PathBuf>) -> VolumeMount {
        VolumeMount {
            device: device.into(),
            path: path.into(),
            mode: VolumeMode::ReadOnly,
            overlay_device: None,
        }
    }

    pub fn read_write(device: impl Into<PathBuf>, path: impl Into<PathBuf>) -> VolumeMount {
        VolumeMount {
            mode: VolumeMode::ReadWrite,
            ..VolumeMount::read_only(device, path)
        }
    }

    pub fn overlay(
        device: impl Into<PathBuf>,
        path: impl Into<PathBuf>,
        overlay_device: impl Into<PathBuf>,
    ) -> VolumeMount {
        VolumeMount {
            mode: VolumeMode::Overlay,
            overlay_device: Some(overlay_device.into()),
            ..VolumeMount::read_only(device, path)
        }
    }
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
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            debug_shell: false,
            gpu: false,
        }
    }
}

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

/// Building a config on the host. Each method sets one key; [`Config::to_json`] validates.
impl Config {
    /// Exec mode running `entrypoint` (argv[0] first) as a child of guest-init.
    pub fn exec<I, S>(entrypoint: I) -> Config
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Config {
            entrypoint: entrypoint.into_iter().map(Into::into).collect(),
            init_mode: Some(InitMode::Exec),
            ..Config::default()
        }
    }

    /// Systemd mode: the image's `/sbin/init` becomes PID 1 (see [`Config::with_cmd`] for
    /// another init).
    pub fn systemd() -> Config {
        Config {
            init_mode: Some(InitMode::Systemd),
            ..Config::default()
        }
    }

    /// Arguments after the entrypoint.
    pub fn with_cmd<I, S>(mut self, cmd: I) -> Config
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.cmd = cmd.into_iter().map(Into::into).collect();
        self
    }

    pub fn with_workdir(mut self, workdir: impl Into<PathBuf>) -> Config {
        self.workdir = Some(workdir.into());
        self
    }

    /// One environment variable (over guest-init's `PATH` and `HOME`).
    pub fn with_env(mut self, name: impl Into<String>, value: impl Into<String>) -> Config {
        self.env.insert(name.into(), value.into());
        self
    }

    pub fn with_network(mut self, network: Network) -> Config {
        self.network = Some(network);
        self
    }

    pub fn with_volume(mut self, volume: VolumeMount) -> Config {
        self.volume_mounts.push(volume);
        self
    }

    /// `name`, `uid`, `name:group` or `uid:gid`, resolved in the image.
    pub fn with_user(mut self, user: impl Into<String>) -> Config {
        self.user = Some(user.into());
        self
    }

    pub fn with_hostname(mut self, hostname: impl Into<String>) -> Config {
        self.hostname = Some(hostname.into());
        self
    }

    /// Time between SIGTERM and SIGKILL on a graceful shutdown; written in whole
    /// milliseconds.
    pub fn with_shutdown_grace(mut self, grace: Duration) -> Config {
        self.shutdown_grace = grace;
        self
    }

    pub fn with_debug_shell(mut self, debug_shell: bool) -> Config {
        self.debug_shell = debug_shell;
        self
    }

    pub fn with_gpu(mut self, gpu: bool) -> Config {
        self.gpu = gpu;
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
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
