//! `cargo xtask bench <case>`: benchmarks that report against a baseline measured in the same
//! run. Never part of the tests (tests do not assert on time). Each case is a bench target of
//! its own (`xtask/benches/<case>.rs`), run by `cargo bench` in the dev profile, whose
//! dependencies are optimized: the harness they use (`testkit`) stays out of this binary.

use anyhow::Context;
use xshell::{Shell, cmd};

/// Run a benchmark and print its figures (ratios against a baseline from the same run).
#[derive(clap::Args)]
pub struct Bench {
    #[command(subcommand)]
    case: Case,
}

#[derive(clap::Subcommand, Clone, Copy)]
enum Case {
    /// Resolve + verify a 64 MiB blob: full hash (vs `sha256sum`) and with the cache warm.
    Verify,
    /// Apply an Alpine-sized gzip layer (~500 entries, ~8 MB tar) to an in-memory tree vs
    /// gunzip alone and `tar -xzf` to disk; peak memory of the apply.
    Layers,
    /// Download 256 MiB over loopback into the store (streamed sha256, fsync, rename) vs
    /// `curl -o /dev/null` from the same in-process server.
    Download,
    /// Assemble a 10 MB tree with our newc + gzip writer vs `find | sort | cpio | gzip -9`
    /// (time and size), and a no-op `artifacts --only initrds` run of the built binary.
    Initrd,
    /// Boot guest-init 10 times under QEMU: PID 1 start → entrypoint exec (median), plus the
    /// sizes of guest-init and the minimal initrd.
    Boot,
    /// Boot guest-init 10 times with networking on and 10 times off under QEMU: PID 1 start →
    /// entrypoint exec (medians) and the network phase alone.
    Network,
}

impl Bench {
    pub fn run(self) -> anyhow::Result<()> {
        let case = match self.case {
            Case::Verify => "verify",
            Case::Layers => "layers",
            Case::Download => "download",
            Case::Initrd => "initrd",
            Case::Boot => "boot",
            Case::Network => "network",
        };
        let sh = Shell::new()?;
        sh.change_dir(xtask::workspace_root());
        cmd!(sh, "cargo bench --profile dev -p xtask --bench {case}")
            .run()
            .with_context(|| format!("benchmark {case} failed (see above)"))
    }
}
