//! The command line: one file per command, each a clap type that turns its flags into the
//! library's plain options and calls it. Nothing here does the work itself.

mod artifacts;
mod bench;
mod dist;
mod fuzz;
mod lock;
mod test;
mod test_initrd;
mod vm;

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};
use xtask::fetch::{Mirror, Mirrors};

#[derive(Parser)]
#[command(name = "cargo xtask", about, version)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Artifacts(artifacts::Artifacts),
    Bench(bench::Bench),
    Dist(dist::Dist),
    Fuzz(fuzz::Fuzz),
    Lock(lock::LockCmd),
    Test(test::Test),
    TestInitrd(test_initrd::TestInitrd),
    Vm(vm::Vm),
}

impl Cli {
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Artifacts(cmd) => cmd.run(),
            Command::Bench(cmd) => cmd.run(),
            Command::Dist(cmd) => cmd.run(),
            Command::Fuzz(cmd) => cmd.run(),
            Command::Lock(cmd) => cmd.run(),
            Command::Test(cmd) => cmd.run(),
            Command::TestInitrd(cmd) => cmd.run(),
            Command::Vm(cmd) => cmd.run(),
        }
    }
}

/// How hard network transfers try: shared by every command that downloads or pulls.
#[derive(clap::Args, Debug, Clone)]
pub struct TransferArgs {
    /// Seconds to wait for a connection (DNS, TCP, TLS) before retrying.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// Seconds a transfer may go without receiving data before retrying.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub read_timeout: f64,
    /// The stall floor: a body slower than this many bytes per second over a whole
    /// --stall-window is stalled and retried (0: no floor).
    #[arg(long, value_name = "BYTES_PER_SEC", default_value_t = 1024)]
    pub min_rate: u64,
    /// Seconds over which --min-rate is measured.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub stall_window: f64,
    /// Attempts in a row without progress before a transfer gives up.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub attempts: u32,
    /// Fetch URLs starting with FROM from TO instead (FROM=TO, repeatable; the longest FROM
    /// wins). The lock keeps the original URLs and digests.
    #[arg(
        long,
        value_name = "FROM=TO",
        env = "XTASK_MIRROR",
        value_delimiter = ','
    )]
    pub mirror: Vec<Mirror>,
}

impl TransferArgs {
    pub fn options(&self) -> xtask::fetch::Options {
        xtask::fetch::Options {
            connect_timeout: Duration::from_secs_f64(self.connect_timeout),
            read_timeout: Duration::from_secs_f64(self.read_timeout),
            min_rate: self.min_rate,
            stall_window: Duration::from_secs_f64(self.stall_window),
            attempts: self.attempts,
            ..xtask::fetch::Options::default()
        }
    }

    pub fn mirrors(&self) -> Mirrors {
        Mirrors(self.mirror.clone())
    }
}

/// A path from the command line: relative ones are the workspace root's, wherever cargo ran.
pub fn from_workspace(path: &Path) -> PathBuf {
    xtask::workspace_root().join(path)
}
