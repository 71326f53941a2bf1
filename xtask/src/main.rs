//! `cargo xtask`: parses the command line and hands each command to the `xtask` library (or,
//! for benchmarks, to `cargo bench`). See ARCHITECTURE.md for the map.

mod cli;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    quiet_error_backtraces();
    // SAFETY: still before any thread exists.
    unsafe { xtask::nested_cargo::forget_the_running_package() };
    cli::Cli::parse().run()
}

/// A failed command prints its message chain (what, where, how to fix), not a stack trace:
/// anyhow would capture one per error when `RUST_BACKTRACE` is set, costing ~130 ms and ~200 MiB
/// on the error path. `XTASK_BACKTRACE=1` brings them back for debugging xtask itself; panics
/// still honour `RUST_BACKTRACE`.
fn quiet_error_backtraces() {
    let wanted = std::env::var_os("XTASK_BACKTRACE").is_some_and(|v| v != "0");
    let value = if wanted { "1" } else { "0" };
    // SAFETY: the first statement of main, before any thread exists.
    unsafe { std::env::set_var("RUST_LIB_BACKTRACE", value) };
}
