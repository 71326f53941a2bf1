//! guest-agent: serves the host's gRPC calls on vsock port 2222 (never on a TCP port).
//!
//! `guest-agent --supervise` is what guest-init starts (by descriptor, from the initrd's sealed
//! copy, after the root switch): it runs `guest-agent` (the serving agent) as its child and
//! restarts it with back-off (`supervise`). Both log to stderr, the console guest-init gave
//! them, in guest-init's line format; `--log-zero-ms=<ms>` is guest-init's start on
//! `CLOCK_MONOTONIC`, the zero of the timestamps.

use std::time::Duration;

use guest_agent::console::log;
use guest_agent::supervise::{self, Backoff, LinuxHost, Policy};
use guest_agent_proto::AGENT_PORT;
use guest_protocol::log_line::AGENT_LOG_ZERO_FLAG;
use tokio_vsock::{VMADDR_CID_ANY, VsockAddr, VsockListener};

/// Exit status for a command line this binary does not understand (sysexits' EX_USAGE).
const EX_USAGE: i32 = 64;

/// Retrying a vsock listener that cannot be made (no vsock transport, no device yet).
const BIND_FIRST_RETRY: Duration = Duration::from_secs(1);
const BIND_MAX_RETRY: Duration = Duration::from_secs(60);

fn main() {
    // A memfd exec names the process after its descriptor ("7"), a re-exec of /proc/self/exe
    // "exe": give `ps` and /proc/<pid>/comm the real name.
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"guest-agent".as_ptr()) };
    let mut supervise_mode = false;
    let mut zero = None;
    for arg in std::env::args().skip(1) {
        if arg == "--supervise" {
            supervise_mode = true;
        } else if let Some(value) = arg
            .strip_prefix(AGENT_LOG_ZERO_FLAG)
            .and_then(|rest| rest.strip_prefix('='))
            && let Ok(ms) = value.parse::<u128>()
        {
            zero = Some(ms);
        } else {
            eprintln!(
                "guest-agent: unknown argument {arg:?}; usage: guest-agent [--supervise] \
                 [{AGENT_LOG_ZERO_FLAG}=<ms>]"
            );
            std::process::exit(EX_USAGE);
        }
    }
    if let Some(zero) = zero {
        guest_agent::console::set_zero(zero);
    }
    if supervise_mode {
        // The serving agent gets the same zero, so all lines share one clock.
        let args = zero
            .map(|ms| vec![format!("{AGENT_LOG_ZERO_FLAG}={ms}")])
            .unwrap_or_default();
        match LinuxHost::new(args) {
            Ok(mut host) => supervise::run(&mut host, &Policy::default()),
            Err(err) => {
                log(&format!("cannot block the supervisor's signals: {err}"));
                std::process::exit(1);
            }
        }
        return;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            log(&format!("cannot start the async runtime: {err}"));
            std::process::exit(1);
        }
    };
    if let Err(err) = runtime.block_on(serve()) {
        log(&format!("{err}"));
        std::process::exit(1);
    }
}

/// The listener, retried with back-off while vsock is unavailable: one line when it fails
/// (and again only if the error changes), one when it works.
async fn listen() -> VsockListener {
    let mut backoff = Backoff::new(BIND_FIRST_RETRY, BIND_MAX_RETRY);
    let mut reported: Option<String> = None;
    loop {
        match VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, AGENT_PORT)) {
            Ok(listener) => return listener,
            Err(err) => {
                let text = err.to_string();
                if reported.as_deref() != Some(text.as_str()) {
                    log(&format!(
                        "cannot listen on vsock port {AGENT_PORT}: {err}. Attach a vsock device \
                         and give the kernel vsock (the modules vsock, \
                         vmw_vsock_virtio_transport_common, vmw_vsock_virtio_transport in the \
                         initrd's load order, or built in); retrying quietly with back-off up \
                         to {} s",
                        BIND_MAX_RETRY.as_secs()
                    ));
                    reported = Some(text);
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

async fn serve() -> std::io::Result<()> {
    let listener = listen().await;
    log(&format!("listening on vsock port {AGENT_PORT}"));
    loop {
        let (stream, peer) = listener.accept().await?;
        tokio::spawn(async move {
            if let Err(err) = guest_agent::serve_connection(stream).await {
                log(&format!("connection from vsock cid {}: {err}", peer.cid()));
            }
        });
    }
}
