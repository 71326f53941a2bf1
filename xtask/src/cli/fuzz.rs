//! `cargo xtask fuzz TARGET --seconds N`: run a libFuzzer target (or `all`, one after another)
//! over its committed seeds and working corpus. Installs nightly and cargo-fuzz when missing.

use std::path::PathBuf;

use anyhow::bail;
use xtask::fuzz::{self, Paths};

/// Fuzz a parser: TARGET for N seconds over fuzz/seeds/TARGET (see README, "Fuzzing").
#[derive(clap::Args)]
pub struct Fuzz {
    /// The target (`cargo xtask fuzz --list` names them), or `all` for each in turn.
    #[arg(required_unless_present = "list")]
    target: Option<String>,
    /// How long each target runs, after its seeds.
    #[arg(long, value_name = "N", default_value_t = 60)]
    seconds: u64,
    /// Run the target once on this file (a crash input) instead of fuzzing.
    #[arg(long, value_name = "FILE", conflicts_with = "seconds")]
    input: Option<PathBuf>,
    /// Show libFuzzer's progress lines.
    #[arg(long, short)]
    verbose: bool,
    /// List the targets and what each checks.
    #[arg(long)]
    list: bool,
}

impl Fuzz {
    pub fn run(self) -> anyhow::Result<()> {
        if self.list {
            for target in fuzz::TARGETS {
                println!("{:<16} {}", target.name, target.checks);
            }
            return Ok(());
        }
        let Some(name) = self.target else {
            bail!("name a target (`cargo xtask fuzz --list`) or `all`");
        };
        let targets = fuzz::select(&name)?;
        let paths = Paths {
            workspace: xtask::workspace_root(),
        };
        fuzz::prepare(&paths)?;
        if let Some(input) = &self.input {
            let [target] = targets.as_slice() else {
                bail!("--input runs one target; name it instead of `all`");
            };
            return fuzz::run_input(&paths, target, &super::from_workspace(input));
        }
        fuzz::build(&paths)?;
        for target in &targets {
            fuzz::run(&paths, target, self.seconds, self.verbose)?;
        }
        Ok(())
    }
}
