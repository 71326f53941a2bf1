//! `cargo xtask`: the generator of the artifacts microVMs boot from, and the project's test
//! command. One module per stage of the data flow; see ARCHITECTURE.md for the map.

mod artifacts;
mod bench;
mod bench_boot;
mod bench_download;
mod bench_initrd;
mod bench_layers;
mod bench_verify;
mod fetch;
mod initrd;
mod kernels;
mod layers;
mod lock_cmd;
#[cfg_attr(not(test), allow(dead_code))] // The fault replies serve the tests.
mod loopback;
mod noise;
mod oci;
mod store;
mod test;
mod tree;
mod vm;
#[cfg(test)]
mod vm_tests;

use clap::{Parser, Subcommand};
use xshell::Shell;

#[derive(Parser)]
#[command(name = "cargo xtask", about, version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Artifacts(artifacts::Artifacts),
    Bench(bench::Bench),
    Lock(lock_cmd::LockCmd),
    Test(test::Test),
    TestInitrd(initrd::TestInitrd),
}

fn main() -> anyhow::Result<()> {
    let sh = Shell::new()?;
    sh.change_dir(workspace_root());
    match Cli::parse().command {
        Command::Artifacts(cmd) => cmd.run(&sh),
        Command::Bench(cmd) => cmd.run(&sh),
        Command::Lock(cmd) => cmd.run(&sh),
        Command::Test(cmd) => cmd.run(&sh),
        Command::TestInitrd(cmd) => cmd.run(),
    }
}

/// The checkout this xtask belongs to.
fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}
