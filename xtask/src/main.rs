//! `cargo xtask`: parses the command line and hands each command to the `xtask` library (or,
//! for benchmarks, to `cargo bench`). See ARCHITECTURE.md for the map.

mod cli;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    cli::Cli::parse().run()
}
