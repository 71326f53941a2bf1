//! One HTTP/2 connection: accept gRPC calls, route them by method path, and run each as its
//! own task. When the connection ends (the host went away), every call still running is
//! dropped, which kills the process groups of its execs.

use bytes::Bytes;
use guest_agent_proto::grpc::{self, Code, MessageReader, method};
use h2::server::SendResponse;
use http::{HeaderMap, Request, Response};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinSet;

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

/// The response headers that start a call's messages.
pub(crate) fn response_head() -> Response<()> {
    Response::builder()
        .status(200)
        .header(http::header::CONTENT_TYPE, grpc::CONTENT_TYPE)
        .header("grpc-accept-encoding", "identity")
        .body(())
        .expect("static response headers are valid")
}

/// A call answered by its status alone (gRPC's Trailers-Only response).
pub(crate) fn trailers_only(respond: &mut SendResponse<Bytes>, code: Code, message: &str) {
    let mut response = response_head();
    grpc::status_headers(response.headers_mut(), code, message);
    let _ = respond.send_response(response, true);
}

/// Ends a call's response stream with its status.
pub(crate) fn finish(stream: &mut h2::SendStream<Bytes>, code: Code, message: &str) {
    let trailers: HeaderMap = grpc::trailers(code, message);
    let _ = stream.send_trailers(trailers);
}

/// The request of a unary or server-streaming call: exactly one message.
pub(crate) async fn single_request<M: prost::Message + Default>(
    reader: &mut MessageReader,
    respond: &mut SendResponse<Bytes>,
) -> Option<M> {
    match reader.next::<M>().await {
        Ok(Some(msg)) => Some(msg),
        Ok(None) => {
            trailers_only(
                respond,
                Code::InvalidArgument,
                "the call carried no request message",
            );
            None
        }
        Err(err) => {
            trailers_only(
                respond,
                Code::InvalidArgument,
                &format!("reading the request: {err}"),
            );
            None
        }
    }
}
