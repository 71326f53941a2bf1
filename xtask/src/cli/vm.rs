//! `cargo xtask vm run|exec|cp`: boot the store's artifacts under QEMU (`xtask::vm`), and a
//! developer's hands on a running VM's guest agent, through Cloud Hypervisor's hybrid vsock
//! socket (`--vsock socket=PATH`). All the protocol work is `guest-client`'s; this file only
//! moves bytes between it and the terminal.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use guest_client::{Client, ExecEvent, ExecSpec};
use system::Arch;
use system::lock::Version;
use tokio::io::AsyncWriteExt;
use xtask::vm::{RunOptions, run};

use super::from_workspace;

mod tty;

#[derive(clap::Args)]
pub struct Vm {
    #[command(subcommand)]
    command: VmCommand,
}

#[derive(clap::Subcommand)]
enum VmCommand {
    /// Boot a kernel + initrd version from the store (resolved and verified through `system`)
    /// with a rootfs and a command; print the console and exit with the app's exit code.
    Run(Run),
    /// Run a command in the guest: `cargo xtask vm exec --socket vsock.sock -- ls -l /`.
    /// Stdin, stdout and stderr are streamed; the exit code is the command's.
    Exec(Exec),
    /// Copy between host and guest; the guest side is written `guest:PATH`:
    /// `cargo xtask vm cp --socket vsock.sock ./dir guest:/srv/dir`, or
    /// `cargo xtask vm cp --socket vsock.sock guest:/var/log ./out` (lands in ./out/log).
    Cp(Cp),
}

#[derive(clap::Args)]
struct Run {
    /// The rootfs: a directory (made into an ext4 image) or an ext4 or erofs image.
    #[arg(long, value_name = "PATH")]
    rootfs: PathBuf,
    /// Kernel version. Default: the lock's default.
    #[arg(long)]
    kernel: Option<Version>,
    /// Initrd version. Default: the lock's default.
    #[arg(long)]
    initrd: Option<Version>,
    /// The guest's architecture. Default: the host's.
    #[arg(long)]
    arch: Option<Arch>,
    /// The host data dir holding the store (`<data_dir>/system`).
    #[arg(long, env = "SYSTEM_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// The lock to resolve with. Default: the store's copy (`<data_dir>/system/artifacts.lock`),
    /// else the lock `system` was built with.
    #[arg(long)]
    lock: Option<PathBuf>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    memory: u32,
    /// `kvm` or `tcg`. Default: KVM when it can run this guest, TCG otherwise.
    #[arg(long, env = "XTASK_VM_ACCEL")]
    accel: Option<String>,
    /// Seconds before QEMU is stopped.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    timeout: u64,
    /// Give the guest a vsock device whose host side is this hybrid vsock socket, as Cloud
    /// Hypervisor's `--vsock socket=PATH` does (served by rust-vmm's vhost-device-vsock), so
    /// `cargo xtask vm exec --socket PATH` reaches the guest agent.
    #[arg(long, value_name = "PATH")]
    vsock_socket: Option<PathBuf>,
    /// The entrypoint and its arguments.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

#[derive(clap::Args)]
struct Exec {
    /// The VM's hybrid vsock Unix socket.
    #[arg(long)]
    socket: PathBuf,
    /// Run on a terminal: raw mode here; the guest follows the local window size and its
    /// resizes.
    #[arg(long, short)]
    tty: bool,
    /// User in the guest: name, uid, name:group or uid:gid.
    #[arg(long, short, default_value = "")]
    user: String,
    /// Working directory in the guest.
    #[arg(long, short = 'w', default_value = "")]
    cwd: String,
    /// KEY=VALUE over the application's environment (repeatable).
    #[arg(long, short, value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Seconds before the command's process group is killed (exit code 124); 0: none.
    #[arg(long, default_value_t = 0)]
    timeout: i32,
    /// The command; none runs /bin/sh.
    #[arg(last = true)]
    command: Vec<String>,
}

#[derive(clap::Args)]
struct Cp {
    #[arg(long)]
    socket: PathBuf,
    /// Apply the guest's owners when copying out (needs root here).
    #[arg(long)]
    preserve_owner: bool,
    src: String,
    dst: String,
}

impl Vm {
    pub fn run(self) -> anyhow::Result<()> {
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")
        };
        match self.command {
            VmCommand::Run(args) => args.run(),
            VmCommand::Exec(exec) => {
                let runtime = runtime()?;
                let code = runtime.block_on(exec.run());
                // Stdin is read on a blocking thread, which a terminal keeps waiting for the
                // next key: dropping the runtime would wait for it after the command's exit.
                runtime.shutdown_background();
                std::process::exit(code?);
            }
            VmCommand::Cp(cp) => runtime()?.block_on(cp.run()),
        }
    }
}

impl Run {
    fn run(self) -> anyhow::Result<()> {
        let args = self;
        let outcome = run(&RunOptions {
            data_dir: from_workspace(&args.data_dir),
            lock: args.lock.as_deref().map(from_workspace),
            kernel: args.kernel,
            initrd: args.initrd,
            arch: args.arch.unwrap_or_else(Arch::host),
            rootfs: from_workspace(&args.rootfs),
            command: args.command,
            memory_mib: args.memory,
            accel: args.accel,
            timeout: Duration::from_secs(args.timeout),
            echo: true,
            vsock_socket: args.vsock_socket.as_deref().map(from_workspace),
        })?;
        eprintln!(
            "vm: {} (kernel {}, initrd {})",
            outcome.exit,
            outcome.kernel.display(),
            outcome.initrd.display()
        );
        std::process::exit(i32::from(outcome.exit.code))
    }
}

async fn connect(socket: &Path) -> anyhow::Result<Client> {
    Ok(Client::connect(socket, guest_client::AGENT_PORT).await?)
}

impl Exec {
    async fn run(self) -> anyhow::Result<i32> {
        let mut env = HashMap::new();
        for pair in &self.env {
            let Some((key, value)) = pair.split_once('=') else {
                bail!("--env {pair:?} is not KEY=VALUE");
            };
            env.insert(key.to_owned(), value.to_owned());
        }
        // Listening before the size is read: a resize in between is not lost.
        let sigwinch = if self.tty {
            Some(tty::Sigwinch::listen()?)
        } else {
            None
        };
        let window_size = self.tty.then(tty::local_window_size).flatten();
        let spec = ExecSpec {
            command: self.command,
            tty: self.tty,
            env,
            cwd: self.cwd,
            timeout_seconds: self.timeout,
            user: self.user,
            window_size,
        };
        let client = connect(&self.socket).await?;
        let _raw = if self.tty {
            tty::RawMode::enter_if_terminal()?
        } else {
            None
        };
        let guest_client::Exec {
            mut input,
            mut output,
        } = client.exec(spec).await?;
        let feed = async move {
            let stdin = tokio::io::stdin();
            let follower = tty::SizeFollower::new(window_size);
            match sigwinch {
                Some(changes) => {
                    tty::feed(&mut input, stdin, changes, tty::local_window_size, follower).await
                }
                None => tty::feed(&mut input, stdin, tty::NoWindow, || None, follower).await,
            }
        };
        let drain = async move {
            let (mut stdout, mut stderr) = (tokio::io::stdout(), tokio::io::stderr());
            loop {
                match output.next().await? {
                    Some(ExecEvent::Stdout(bytes)) => {
                        stdout.write_all(&bytes).await?;
                        stdout.flush().await?;
                    }
                    Some(ExecEvent::Stderr(bytes)) => {
                        stderr.write_all(&bytes).await?;
                        stderr.flush().await?;
                    }
                    Some(ExecEvent::Exit(code)) => return anyhow::Ok(code),
                    None => bail!("the agent ended the exec without an exit code"),
                }
            }
        };
        tokio::pin!(feed, drain);
        let mut feeding = true;
        loop {
            tokio::select! {
                fed = &mut feed, if feeding => {
                    feeding = false;
                    // The command may exit without reading all of stdin: not an error.
                    let _ = fed;
                }
                code = &mut drain => return code,
            }
        }
    }
}

impl Cp {
    async fn run(self) -> anyhow::Result<()> {
        let client = connect(&self.socket).await?;
        match (
            self.src.strip_prefix("guest:"),
            self.dst.strip_prefix("guest:"),
        ) {
            (None, Some(guest_dst)) => {
                let bytes = client
                    .copy_to_guest(Path::new(&self.src), guest_dst)
                    .await?;
                eprintln!("copied {} to guest:{guest_dst} ({bytes} bytes)", self.src);
            }
            (Some(guest_src), None) => {
                let report = client
                    .copy_from_guest(guest_src, Path::new(&self.dst), false, self.preserve_owner)
                    .await?;
                eprintln!(
                    "copied guest:{guest_src} into {} ({} entries, {} bytes)",
                    self.dst, report.entries, report.bytes
                );
            }
            _ => bail!(
                "exactly one of SRC and DST must be a guest path, written guest:PATH \
                 (got {:?} and {:?})",
                self.src,
                self.dst
            ),
        }
        Ok(())
    }
}
