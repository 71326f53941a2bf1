//! The contract between a host and guest-init, PID 1 of every microVM: what the host writes
//! (`config.json`, `guest_init.*` kernel parameters) and what the guest answers (one exit
//! line on the console). Pure data and logic, no OS calls: it builds for the host and for
//! the guest's musl targets alike.
//!
//! - [`config`]: `config.json` types, the parser guest-init runs, a builder and writer for
//!   hosts ([`Config::exec`], [`Config::to_json`]).
//! - [`cmdline`]: the `guest_init.<key>=` parameters ([`CmdlineKey`], [`BootOptions`]).
//! - [`exit`]: [`ExitReason`] (every `reason=` with its code), [`ExitLine`] and
//!   [`parse_exit_line`].

pub mod cmdline;
pub mod config;
pub mod exit;

pub use cmdline::{BootOptions, CmdlineKey, Writable};
pub use config::{Config, ConfigError, InitMode, MacAddress, Network, VolumeMode, VolumeMount};
pub use exit::{AppExit, EXIT_LINE_PREFIX, ExitLine, ExitReason, find_exit_line, parse_exit_line};
