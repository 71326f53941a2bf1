use std::path::PathBuf;

use guest_agent_proto::grpc::GrpcError;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to the guest agent through {socket}: {message}")]
    Connect { socket: PathBuf, message: String },
    #[error("guest agent call: {0}")]
    Grpc(#[from] GrpcError),
    #[error("guest agent call: the agent's answer ended early: {0}")]
    Truncated(&'static str),
    #[error("guest agent sent {what} beyond the {limit}-byte limit; the call was stopped")]
    TooLarge { what: &'static str, limit: u64 },
    /// The guest sent something it must not: a path outside the destination, a write through
    /// a symlink, more bytes than announced. Nothing was written for it.
    #[error("refused {path:?} from the guest: {reason}")]
    Refused { path: String, reason: String },
    #[error("{path}: {message}")]
    Local { path: PathBuf, message: String },
    /// Some paths failed; the others were copied.
    #[error("{} path(s) failed:\n{}", .0.len(), .0.iter().map(|(p, m)| format!("  {p}: {m}")).collect::<Vec<_>>().join("\n"))]
    PathErrors(Vec<(String, String)>),
}

impl From<h2::Error> for ClientError {
    fn from(err: h2::Error) -> Self {
        ClientError::Grpc(GrpcError::H2(err))
    }
}
