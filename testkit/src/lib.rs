//! What the tests and benchmarks need around the code under test, and nothing a shipped binary
//! contains: a scripted HTTP server on 127.0.0.1 ([`http`]), OCI fixture images and registries
//! ([`oci`]), a QEMU runner for booting guest-init ([`vm`]) and deterministic payloads
//! ([`noise`]), guest vsock through `vhost-device-vsock` ([`vsock`]), the guest agent in a VM
//! over it ([`agent_guest`]), and a pseudo-terminal for driving a command as a user's terminal
//! would ([`pty`]).

/// How a developer installs what the VM tests need (kernels, busybox, the vsock daemon).
pub const PREPARE_COMMAND: &str = "cargo xtask test --prepare-only";

pub mod agent_guest;
pub mod bench;
pub mod http;
pub mod noise;
pub mod oci;
pub mod pty;
pub mod vm;
pub mod vsock;
