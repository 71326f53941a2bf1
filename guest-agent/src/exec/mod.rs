//! The Exec call: start a process, stream its output as it comes, feed it stdin, apply
//! resizes and signals, enforce the timeout, and report its exit code last.
//!
//! Memory per exec is bounded: output is read in `CHUNK_SIZE` pieces through a small channel
//! and sent only as fast as the host's HTTP/2 window allows (a host that stops reading stops
//! the process on a full pipe); stdin is taken from the stream only as fast as the process
//! reads it. Stdin, output and the call's control run as separate tasks so that a process
//! blocked on one never deadlocks the other.

mod pty;
mod spawn;

use std::io;
use std::pin::pin;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use guest_agent_proto::grpc::{self, CHUNK_SIZE, Code, GrpcError, MessageReader};
use guest_agent_proto::pb::exec_request::Request;
use guest_agent_proto::pb::exec_response::Response;
use guest_agent_proto::pb::{ExecRequest, ExecResponse};
use h2::server::SendResponse;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::call::{finish, response_head, trailers_only};
use pty::Pty;
use spawn::Io;

/// GNU timeout's exit code for a command it killed.
pub(crate) const TIMEOUT_EXIT_CODE: i32 = 124;
/// After the process exits, output still arriving is forwarded until the pipes close or stay
/// quiet this long (a background process it left may hold them open forever).
const DRAIN_QUIET: Duration = Duration::from_millis(200);

enum Output {
    Stdout(Bytes),
    Stderr(Bytes),
}

enum Stdin {
    Pipe(tokio::process::ChildStdin),
    Tty(Arc<Pty>),
}

pub(crate) async fn serve(mut reader: MessageReader, mut respond: SendResponse<Bytes>) {
    let start = match reader.next::<ExecRequest>().await {
        Ok(Some(ExecRequest {
            request: Some(Request::Start(start)),
        })) => start,
        Ok(_) => {
            let message = "the first message of an Exec call must be `start`";
            return trailers_only(&mut respond, Code::InvalidArgument, message);
        }
        Err(err) => {
            let message = format!("reading the Exec start: {err}");
            return trailers_only(&mut respond, Code::InvalidArgument, &message);
        }
    };
    let Ok(mut stream) = respond.send_response(response_head(), false) else {
        return;
    };
    let process = match spawn::spawn(&start) {
        Ok(process) => process,
        Err(err) => {
            let text = format!("guest-agent: {err}\n");
            let _ = grpc::send_message(&mut stream, &response(Response::Stderr(text.into()))).await;
            let _ = grpc::send_message(&mut stream, &response(Response::ExitCode(err.exit_code())))
                .await;
            return finish(&mut stream, Code::Ok, "");
        }
    };
    let timeout = (start.timeout_seconds > 0)
        .then(|| Instant::now() + Duration::from_secs(start.timeout_seconds as u64));
    // Ok: the exit code was sent. Err: the host cancelled or went away; returning drops the
    // process group, which kills it.
    let _ = run(process, reader, &mut stream, timeout).await;
}

fn response(response: Response) -> ExecResponse {
    ExecResponse {
        response: Some(response),
    }
}

async fn run(
    process: spawn::Process,
    reader: MessageReader,
    stream: &mut h2::SendStream<Bytes>,
    timeout: Option<Instant>,
) -> Result<(), GrpcError> {
    let spawn::Process {
        mut child,
        mut group,
        io,
    } = process;
    // Dropped with this function: aborts the helpers (and closes the process's stdin).
    let mut tasks = JoinSet::new();
    let (out_tx, mut out_rx) = mpsc::channel::<Output>(4);
    let (in_tx, in_rx) = mpsc::channel::<Bytes>(2);
    let pty = match io {
        Io::Pipes {
            stdin,
            stdout,
            stderr,
        } => {
            tasks.spawn(pump_pipe(stdout, out_tx.clone(), Output::Stdout));
            tasks.spawn(pump_pipe(stderr, out_tx, Output::Stderr));
            tasks.spawn(feed_stdin(Stdin::Pipe(stdin), in_rx));
            None
        }
        Io::Tty(pty) => {
            tasks.spawn(pump_pty(pty.clone(), out_tx));
            tasks.spawn(feed_stdin(Stdin::Tty(pty.clone()), in_rx));
            Some(pty)
        }
    };
    let (control_tx, mut control_rx) = mpsc::channel::<Control>(1);
    tasks.spawn(read_requests(reader, in_tx, control_tx));

    let far = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
    let mut deadline = pin!(tokio::time::sleep_until(timeout.unwrap_or(far)));
    let mut timed_out = false;
    let mut status: Option<ExitStatus> = None;
    let mut drain_until = far;
    let mut outputs_open = true;
    let mut control_open = true;

    enum Event {
        Deadline,
        Exited(io::Result<ExitStatus>),
        Output(Option<Output>),
        Quiet,
        Control(Option<Control>),
        Reset,
    }
    while status.is_none() || outputs_open {
        let event = tokio::select! {
            _ = &mut deadline, if !timed_out && timeout.is_some() && status.is_none() => Event::Deadline,
            exited = child.wait(), if status.is_none() => Event::Exited(exited),
            output = out_rx.recv(), if outputs_open => Event::Output(output),
            _ = tokio::time::sleep_until(drain_until), if status.is_some() => Event::Quiet,
            control = control_rx.recv(), if control_open => Event::Control(control),
            _ = grpc::reset(stream) => Event::Reset,
        };
        match event {
            Event::Deadline => {
                group.kill();
                timed_out = true;
            }
            Event::Exited(exited) => {
                status = Some(exited.map_err(|err| GrpcError::Protocol(format!("wait: {err}")))?);
                group.disarm();
                drain_until = Instant::now() + DRAIN_QUIET;
            }
            Event::Output(Some(output)) => {
                let message = response(match output {
                    Output::Stdout(bytes) => Response::Stdout(bytes.to_vec()),
                    Output::Stderr(bytes) => Response::Stderr(bytes.to_vec()),
                });
                // A host that does not read holds us here; the timeout still applies.
                let mut send = pin!(grpc::send_message(stream, &message));
                loop {
                    tokio::select! {
                        sent = &mut send => { sent?; break; }
                        _ = &mut deadline, if !timed_out && timeout.is_some() && status.is_none() => {
                            group.kill();
                            timed_out = true;
                        }
                    }
                }
                if status.is_some() {
                    drain_until = Instant::now() + DRAIN_QUIET;
                }
            }
            Event::Output(None) | Event::Quiet => outputs_open = false,
            Event::Control(Some(Control::Resize(size))) => {
                if let Some(pty) = &pty {
                    let _ = pty.resize(size);
                }
            }
            Event::Control(Some(Control::Signal(signal))) => {
                if status.is_none() {
                    group.signal(signal);
                }
            }
            Event::Control(Some(Control::Failed(err))) => return Err(err),
            Event::Control(None) => control_open = false,
            Event::Reset => return Err(GrpcError::Closed),
        }
    }
    let status = status.expect("the loop ends after the exit");
    let code = if timed_out {
        TIMEOUT_EXIT_CODE
    } else {
        exit_code(status)
    };
    grpc::send_message(stream, &response(Response::ExitCode(code))).await?;
    finish(stream, Code::Ok, "");
    Ok(())
}

/// The shell's convention: the exit status, or 128 + the signal that killed the process.
fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(255)
}

enum Control {
    Resize((u16, u16)),
    Signal(i32),
    /// The request stream failed (reset by the host, malformed): the call is over.
    Failed(GrpcError),
}

/// The host's side of the call after `start`: stdin goes to the feeder (waiting while the
/// process does not read, which holds the host back through its window), the rest to the
/// control loop. Half-closing the stream, or `close_stdin`, closes the process's stdin.
async fn read_requests(
    mut reader: MessageReader,
    stdin: mpsc::Sender<Bytes>,
    control: mpsc::Sender<Control>,
) {
    let mut stdin = Some(stdin);
    loop {
        let request = match reader.next::<ExecRequest>().await {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(err) => {
                let _ = control.send(Control::Failed(err)).await;
                return;
            }
        };
        let sent = match request.request {
            Some(Request::Stdin(bytes)) => {
                if let Some(tx) = &stdin
                    && tx.send(Bytes::from(bytes)).await.is_err()
                {
                    stdin = None; // the process closed its stdin: drop what comes
                }
                Ok(())
            }
            Some(Request::CloseStdin(_)) => {
                stdin = None;
                Ok(())
            }
            Some(Request::Resize(size)) => {
                let size = (
                    size.rows.min(u16::MAX as u32) as u16,
                    size.cols.min(u16::MAX as u32) as u16,
                );
                control.send(Control::Resize(size)).await
            }
            Some(Request::Signal(signal)) => control.send(Control::Signal(signal)).await,
            Some(Request::Start(_)) => {
                let err = GrpcError::Protocol("a second `start` in one Exec call".into());
                control.send(Control::Failed(err)).await
            }
            None => Ok(()),
        };
        if sent.is_err() {
            return;
        }
    }
}

async fn feed_stdin(sink: Stdin, mut rx: mpsc::Receiver<Bytes>) {
    match sink {
        Stdin::Pipe(mut pipe) => {
            while let Some(bytes) = rx.recv().await {
                if pipe.write_all(&bytes).await.is_err() {
                    return; // the process closed its stdin (EPIPE)
                }
            }
            // Dropping the pipe is the EOF the process reads.
        }
        Stdin::Tty(pty) => {
            while let Some(bytes) = rx.recv().await {
                if pty.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            // A terminal has no half-close: EOF is its end-of-file character.
            let _ = pty.write_all(&[pty.eof_char()]).await;
        }
    }
}

async fn pump_pipe<R: AsyncRead + Unpin>(
    mut pipe: R,
    tx: mpsc::Sender<Output>,
    wrap: fn(Bytes) -> Output,
) {
    let mut buf = vec![0u8; CHUNK_SIZE];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx
                    .send(wrap(Bytes::copy_from_slice(&buf[..n])))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

async fn pump_pty(pty: Arc<Pty>, tx: mpsc::Sender<Output>) {
    let mut buf = vec![0u8; CHUNK_SIZE];
    loop {
        match pty.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx
                    .send(Output::Stdout(Bytes::copy_from_slice(&buf[..n])))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(exit_code(ExitStatus::from_raw(7 << 8)), 7);
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGKILL)), 128 + 9);
    }
}
