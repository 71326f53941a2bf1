//! A stand-in for Cloud Hypervisor's hybrid vsock socket: a Unix listener that answers
//! `CONNECT 2222\n` with `OK 2222\n` and hands the stream to a server (the real agent, or a
//! hostile fake).

#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

pub fn hybrid_socket<F, Fut>(dir: &Path, serve: F) -> PathBuf
where
    F: Fn(UnixStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let path = dir.join("vsock.sock");
    let listener = UnixListener::bind(&path).expect("bind the test's hybrid vsock socket");
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let mut line = Vec::new();
            let mut byte = [0u8];
            while byte[0] != b'\n' {
                if stream.read_exact(&mut byte).await.is_err() {
                    break;
                }
                line.push(byte[0]);
            }
            assert_eq!(
                line, b"CONNECT 2222\n",
                "the client's hybrid vsock handshake"
            );
            stream.write_all(b"OK 2222\n").await.unwrap();
            tokio::spawn(serve(stream));
        }
    });
    path
}

/// The real agent behind a hybrid socket in `dir`.
pub fn agent_socket(dir: &Path) -> PathBuf {
    hybrid_socket(dir, |stream| async move {
        let _ = guest_agent::serve_connection(stream).await;
    })
}

pub async fn connect(socket: &Path) -> guest_client::Client {
    guest_client::Client::connect(socket, guest_client::AGENT_PORT)
        .await
        .expect("connect to the agent")
}

pub fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}
