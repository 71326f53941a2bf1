//! The guest agent: hosts run commands (pipes or a tty), copy files in and out and stat paths
//! in a running microVM through gRPC on vsock port 2222, wire-compatible with the original
//! hosts (`guest-agent-proto`). See README.md for the protocol, its extensions and the
//! security model.
//!
//! [`serve_connection`] serves one connection on any byte stream; the binary hands it vsock
//! connections only (tests hand it Unix sockets). [`supervise`] is the binary's
//! `--supervise` mode, which guest-init starts: it keeps the serving agent running.
//! [`console`] writes the agent's log lines in guest-init's format.

mod call;
pub mod console;
mod copy_from;
mod copy_to;
mod exec;
mod server;
mod stat;
pub mod supervise;

pub use server::serve_connection;
