//! `cargo xtask artifacts --from DIST`: install prebuilt artifacts instead of building them.
//!
//! The dist's blobs that the lock records are taken into the store ([`crate::dist::install`]:
//! verified before visible, unknown digests refused), then every selected artifact whose blob
//! the store holds is linked. Nothing is downloaded or built, and the lock is not changed.
//! A version named with `--kernel`/`--initrd` that the dist (and store) lack is an error.

use std::fmt::Write as _;

use anyhow::bail;
use system::{Kind, Lock};

use super::{Options, Report, Stage};
use crate::dist::{install, verify::recorded};
use crate::store::StoreWriter;

pub fn install_prebuilt(
    lock: &Lock,
    store: &StoreWriter,
    options: &Options,
    report: &mut Report,
) -> anyhow::Result<()> {
    let installed = install::install(&options.from, lock, &options.lock, store, &options.transfer)?;
    let known = recorded(lock);
    let name = |sha| {
        known
            .iter()
            .find(|(_, _, _, d, _)| *d == sha)
            .map(|(kind, version, arch, _, _)| format!("{kind} {version} {arch}"))
            .unwrap_or_default()
    };
    for (sha, size, tarball) in &installed.written {
        report.fetched.push(format!(
            "{} sha256:{sha} ({size} bytes, from {})",
            name(*sha),
            tarball.display()
        ));
    }

    let wants_stage = |stage| options.stages.is_empty() || options.stages.contains(&stage);
    let mut missing = Vec::new();
    let mut linked = 0;
    for (kind, version, arch, sha, size) in &known {
        let (stage, asked) = match kind {
            Kind::Kernel => (Stage::Kernels, &options.kernels),
            Kind::Initrd => (Stage::Initrds, &options.initrds),
        };
        if !wants_stage(stage)
            || !(asked.is_empty() || asked.contains(version))
            || !(options.arches.is_empty() || options.arches.contains(arch))
        {
            continue;
        }
        if store.has_verified_blob(sha, *size)? {
            let link = match kind {
                Kind::Kernel => store.layout().kernel_link(version.as_str(), *arch),
                Kind::Initrd => store.layout().initrd_link(version.as_str(), *arch),
            };
            store.link(&link, sha)?;
            linked += 1;
            if !installed.written.iter().any(|(d, _, _)| d == sha) {
                report
                    .reused
                    .push(format!("{kind} {version} {arch} sha256:{sha}"));
            }
        } else if asked.contains(version) {
            missing.push(format!("{kind} {version} ({arch}): sha256:{sha}"));
        }
    }
    if !missing.is_empty() {
        let mut msg = format!(
            "--from: {} selected artifact(s) are neither in the dist nor in the store:",
            missing.len()
        );
        for m in &missing {
            let _ = write!(msg, "\n  {m}");
        }
        msg.push_str(
            "\nnext step: use a dist that holds them (`cargo xtask dist --kernel V --initrd V`), \
             or build them without --from",
        );
        bail!(msg);
    }
    if linked == 0 {
        let sources: Vec<String> = options.from.iter().map(|p| p.to_string()).collect();
        bail!(
            "--from {}: nothing the selection asks for is in it (it holds {} blob(s) this lock \
             records); check --kernel/--initrd/--arch and the lock ({})",
            sources.join(", "),
            installed.written.len() + installed.present.len(),
            options.lock.display()
        );
    }
    Ok(())
}
