//! `cargo xtask bench <case>`: benchmarks that report against a baseline measured in the same
//! run. Never part of the tests (tests do not assert on time).

use xshell::Shell;

/// Run a benchmark and print its figures (ratios against a baseline from the same run).
#[derive(clap::Args)]
pub struct Bench {
    #[command(subcommand)]
    case: Case,
}

#[derive(clap::Subcommand)]
enum Case {
    /// Resolve + verify a 64 MiB blob: full hash (vs `sha256sum`) and with the cache warm.
    Verify,
    /// Assemble a 10 MB tree with our newc + gzip writer vs `find | sort | cpio | gzip -9`
    /// (time and size), and a no-op `artifacts --only initrds` run of the built binary.
    Initrd,
}

impl Bench {
    pub fn run(self, sh: &Shell) -> anyhow::Result<()> {
        match self.case {
            Case::Verify => crate::bench_verify::run(sh),
            Case::Initrd => crate::bench_initrd::run(sh),
        }
    }
}
