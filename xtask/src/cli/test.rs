/// Prepare the machine (rustup targets, apt packages, the arm64 kernel and busybox for the
/// aarch64 VM tests), then run fmt, clippy, every test, and the check that the committed lock's
/// default initrd rebuilds byte-identically.
#[derive(clap::Args)]
pub struct Test {
    /// Prepare the machine, then stop without running anything.
    #[arg(long)]
    prepare_only: bool,
    /// Skip `cargo fmt --check` and clippy (they still run in CI).
    #[arg(long)]
    no_lint: bool,
    /// Passed to `cargo test` (e.g. a test name filter).
    #[arg(last = true)]
    cargo_test_args: Vec<String>,
}

impl Test {
    pub fn run(self) -> anyhow::Result<()> {
        xtask::test_suite::run(&xtask::test_suite::Options {
            prepare_only: self.prepare_only,
            no_lint: self.no_lint,
            cargo_test_args: self.cargo_test_args,
        })
    }
}
