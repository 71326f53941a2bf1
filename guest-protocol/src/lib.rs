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
//! - [`module_groups`]: drivers on demand: PCI patterns and the initrd's groups file, written
//!   by the initrd builder and read by guest-init.
//! - [`user`]: `user` (name, uid, name:group, uid:gid) resolved against an image's
//!   /etc/passwd and /etc/group; guest-init and the guest agent both use it.
//! - [`log_line`]: the console log line guest-init and the guest agent both write.

pub mod cmdline;
pub mod config;
pub mod exit;
pub mod log_line;
pub mod module_groups;
pub mod user;

pub use cmdline::{BootOptions, CmdlineKey, Writable};
pub use config::{Config, ConfigError, InitMode, MacAddress, Network, VolumeMode, VolumeMount};
pub use exit::{AppExit, EXIT_LINE_PREFIX, ExitLine, ExitReason, find_exit_line, parse_exit_line};
