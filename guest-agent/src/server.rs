//! One HTTP/2 connection: accept gRPC calls, route them by method path, and run each as its
//! own task. When the connection ends (the host went away), every call still running is
//! dropped, which kills the process groups of its execs.

use bytes::Bytes;
use guest_agent_proto::grpc::{self, Code, MessageReader, method};
use h2::server::SendResponse;
use http::Request;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinSet;

use crate::call::trailers_only;

/// Concurrent calls per connection; HTTP/2 refuses more, so a host cannot exhaust the guest.
const MAX_CONCURRENT_CALLS: u32 = 256;

/// Serves gRPC calls on `io` until the peer closes it. Errors end this connection only.
pub async fn serve_connection<IO>(io: IO) -> Result<(), h2::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = h2::server::Builder::new()
        .initial_window_size(grpc::STREAM_WINDOW)
        .initial_connection_window_size(grpc::CONNECTION_WINDOW)
        .max_concurrent_streams(MAX_CONCURRENT_CALLS)
        .max_frame_size(1 << 20)
        .handshake::<_, Bytes>(io)
        .await?;
    let mut calls = JoinSet::new();
    let result = loop {
        tokio::select! {
            accepted = conn.accept() => match accepted {
                Some(Ok((request, respond))) => {
                    calls.spawn(call(request, respond));
                }
                Some(Err(err)) => break Err(err),
                None => break Ok(()),
            },
            // Reap finished calls so the set does not grow with the connection's age.
            Some(_) = calls.join_next(), if !calls.is_empty() => {}
        }
    };
    // The host is gone: dropping the calls kills what they started.
    calls.abort_all();
    while calls.join_next().await.is_some() {}
    result
}

async fn call(request: Request<h2::RecvStream>, mut respond: SendResponse<Bytes>) {
    if let Err(refusal) = check_request(&request) {
        let (code, message) = refusal;
        trailers_only(&mut respond, code, &message);
        return;
    }
    let path = request.uri().path().to_owned();
    let reader = MessageReader::new(request.into_body(), grpc::MAX_MESSAGE_SIZE);
    match path.as_str() {
        method::EXEC => crate::exec::serve(reader, respond).await,
        method::COPY_TO_GUEST => crate::copy_to::serve(reader, respond).await,
        method::COPY_FROM_GUEST => crate::copy_from::serve(reader, respond).await,
        method::STAT_PATH => crate::stat::serve(reader, respond).await,
        other => trailers_only(
            &mut respond,
            Code::Unimplemented,
            &format!("unknown method {other}: this agent serves guest.GuestService"),
        ),
    }
}

fn check_request(request: &Request<h2::RecvStream>) -> Result<(), (Code, String)> {
    if request.method() != http::Method::POST {
        return Err((Code::Unimplemented, "gRPC calls are POST requests".into()));
    }
    let content_type = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type.starts_with(grpc::CONTENT_TYPE) {
        return Err((
            Code::Unimplemented,
            format!("content-type {content_type:?} is not application/grpc"),
        ));
    }
    match request.headers().get("grpc-encoding").map(|v| v.as_bytes()) {
        None | Some(b"identity") => Ok(()),
        Some(other) => Err((
            Code::Unimplemented,
            format!(
                "grpc-encoding {:?} is not supported: send uncompressed messages",
                String::from_utf8_lossy(other)
            ),
        )),
    }
}
