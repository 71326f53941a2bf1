//! `user` resolution lives in guest-protocol, shared with the guest agent.
pub use guest_protocol::user::*;
