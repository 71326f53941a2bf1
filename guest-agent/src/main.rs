//! guest-agent: serves the host's gRPC calls on vsock port 2222 (never on a TCP port).
//! Started by guest-init after the root switch; logs to stderr, which guest-init forwards.

use guest_agent_proto::AGENT_PORT;
use tokio_vsock::{VMADDR_CID_ANY, VsockAddr, VsockListener};

fn main() {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("guest-agent: cannot start the async runtime: {err}");
            std::process::exit(1);
        }
    };
    if let Err(err) = runtime.block_on(serve()) {
        eprintln!("guest-agent: {err}");
        std::process::exit(1);
    }
}

async fn serve() -> std::io::Result<()> {
    let listener =
        VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, AGENT_PORT)).map_err(|err| {
            std::io::Error::new(
                err.kind(),
                format!(
                    "cannot listen on vsock port {AGENT_PORT}: {err} (is the vsock transport \
                 (vmw_vsock_virtio_transport) loaded and a vsock device attached?)"
                ),
            )
        })?;
    eprintln!("guest-agent: listening on vsock port {AGENT_PORT}");
    loop {
        let (stream, peer) = listener.accept().await?;
        tokio::spawn(async move {
            if let Err(err) = guest_agent::serve_connection(stream).await {
                eprintln!(
                    "guest-agent: connection from vsock cid {}: {err}",
                    peer.cid()
                );
            }
        });
    }
}
