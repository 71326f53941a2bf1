use std::path::PathBuf;
use std::time::Duration;

use system::Arch;
use system::lock::Version;
use xtask::vm::{RunOptions, run};

use super::from_workspace;

/// Boot artifacts from the store under QEMU.
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
    /// The entrypoint and its arguments.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

impl Vm {
    pub fn run(self) -> anyhow::Result<()> {
        let VmCommand::Run(args) = self.command;
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
