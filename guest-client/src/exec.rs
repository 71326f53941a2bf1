//! Exec from the host: a process's stdin, output and control as two halves that can be
//! driven from separate tasks.

use std::collections::HashMap;

use bytes::Bytes;
use guest_agent_proto::grpc::{self, CHUNK_SIZE, MessageReader};
use guest_agent_proto::pb::exec_request::Request;
use guest_agent_proto::pb::exec_response::Response;
use guest_agent_proto::pb::{CloseStdin, ExecRequest, ExecResponse, ExecStart, WindowSize};
use h2::SendStream;

use crate::{Client, ClientError};

#[derive(Debug, Clone, Default)]
pub struct ExecSpec {
    /// Empty: /bin/sh.
    pub command: Vec<String>,
    pub tty: bool,
    /// Over the guest application's environment.
    pub env: HashMap<String, String>,
    pub cwd: String,
    /// 0: none; on expiry the process group is killed and the exit code is 124.
    pub timeout_seconds: i32,
    /// Name, uid, name:group or uid:gid; empty: the agent's user.
    pub user: String,
    /// (rows, cols) of a tty exec.
    pub window_size: Option<(u16, u16)>,
}

impl ExecSpec {
    pub fn command<S: Into<String>>(command: impl IntoIterator<Item = S>) -> ExecSpec {
        ExecSpec {
            command: command.into_iter().map(Into::into).collect(),
            ..ExecSpec::default()
        }
    }
}

/// The writing half: stdin, resize, signals, close.
pub struct ExecInput {
    send: SendStream<Bytes>,
    closed: bool,
}

/// The reading half.
pub struct ExecOutput {
    reader: MessageReader,
    exited: bool,
}

pub struct Exec {
    pub input: ExecInput,
    pub output: ExecOutput,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(i32),
}

/// What [`Client::exec_output`] collects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: i32,
}

impl Client {
    pub async fn exec(&self, spec: ExecSpec) -> Result<Exec, ClientError> {
        let (mut send, response) = self.start_call(grpc::method::EXEC).await?;
        let start = ExecStart {
            command: spec.command,
            tty: spec.tty,
            env: spec.env,
            cwd: spec.cwd,
            timeout_seconds: spec.timeout_seconds,
            user: spec.user,
            window_size: spec.window_size.map(|(rows, cols)| WindowSize {
                rows: rows.into(),
                cols: cols.into(),
            }),
        };
        grpc::send_message(&mut send, &request(Request::Start(start))).await?;
        let reader = self.response(response).await?;
        Ok(Exec {
            input: ExecInput {
                send,
                closed: false,
            },
            output: ExecOutput {
                reader,
                exited: false,
            },
        })
    }

    /// Runs to the end with `stdin` as input, keeping at most `Limits::max_captured_output`
    /// bytes of output (more is an error: the process is then killed by the cancel).
    pub async fn exec_output(&self, spec: ExecSpec, stdin: &[u8]) -> Result<Output, ClientError> {
        let Exec {
            mut input,
            mut output,
        } = self.exec(spec).await?;
        let feed = async {
            input.write(stdin).await?;
            input.close().await
        };
        let limit = self.limits.max_captured_output;
        let collect = async {
            let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
            loop {
                match output.next().await? {
                    Some(ExecEvent::Stdout(bytes)) => stdout.extend_from_slice(&bytes),
                    Some(ExecEvent::Stderr(bytes)) => stderr.extend_from_slice(&bytes),
                    Some(ExecEvent::Exit(exit_code)) => {
                        return Ok(Output {
                            stdout,
                            stderr,
                            exit_code,
                        });
                    }
                    None => {
                        return Err(ClientError::Truncated(
                            "the exec ended without an exit code",
                        ));
                    }
                }
                if stdout.len() + stderr.len() > limit {
                    return Err(ClientError::TooLarge {
                        what: "exec output",
                        limit: limit as u64,
                    });
                }
            }
        };
        let (fed, collected) = tokio::join!(feed, collect);
        let collected = collected?;
        // A process that exits without reading all its stdin is not an error.
        if let Err(err) = fed
            && !matches!(err, ClientError::Grpc(_))
        {
            return Err(err);
        }
        Ok(collected)
    }
}

fn request(request: Request) -> ExecRequest {
    ExecRequest {
        request: Some(request),
    }
}

impl ExecInput {
    /// Sends stdin, as fast as the process reads it.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), ClientError> {
        for chunk in data.chunks(CHUNK_SIZE) {
            self.send(Request::Stdin(chunk.to_vec())).await?;
        }
        Ok(())
    }

    /// EOF on the process's stdin (Ctrl-D on a tty); resizes and signals still work.
    pub async fn close_stdin(&mut self) -> Result<(), ClientError> {
        self.send(Request::CloseStdin(CloseStdin {})).await
    }

    pub async fn resize(&mut self, rows: u16, cols: u16) -> Result<(), ClientError> {
        let size = WindowSize {
            rows: rows.into(),
            cols: cols.into(),
        };
        self.send(Request::Resize(size)).await
    }

    /// A signal (Linux number) to the exec's process group.
    pub async fn signal(&mut self, signal: i32) -> Result<(), ClientError> {
        self.send(Request::Signal(signal)).await
    }

    /// Ends the request stream: stdin reaches EOF and nothing more can be sent.
    pub async fn close(&mut self) -> Result<(), ClientError> {
        if !self.closed {
            self.closed = true;
            self.send.send_data(Bytes::new(), true)?;
        }
        Ok(())
    }

    async fn send(&mut self, req: Request) -> Result<(), ClientError> {
        grpc::send_message(&mut self.send, &request(req)).await?;
        Ok(())
    }
}

impl ExecOutput {
    /// The next output chunk or the exit code; `None` after the exit.
    pub async fn next(&mut self) -> Result<Option<ExecEvent>, ClientError> {
        if self.exited {
            return Ok(None);
        }
        let Some(ExecResponse { response }) = self.reader.next::<ExecResponse>().await? else {
            return Ok(None);
        };
        Ok(Some(match response {
            Some(Response::Stdout(bytes)) => ExecEvent::Stdout(bytes),
            Some(Response::Stderr(bytes)) => ExecEvent::Stderr(bytes),
            Some(Response::ExitCode(code)) => {
                self.exited = true;
                ExecEvent::Exit(code)
            }
            None => ExecEvent::Stdout(Vec::new()),
        }))
    }
}
