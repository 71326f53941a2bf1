//! The snapshot rule: a snapshot restores only on exactly the kernel, initrd and hypervisor it
//! was taken on. Anything else is an upgrade, and upgrades are shutdown → boot.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::version::{InitrdVersion, KernelVersion};

/// What an instance ran on when it was put on standby. Record it with the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemVersions {
    pub kernel: KernelVersion,
    pub initrd: InitrdVersion,
    /// The hypervisor's version string, e.g. `v49.0`.
    pub hypervisor: String,
}

impl SystemVersions {
    /// Checks that a snapshot recorded as `self` may be restored on `current`. Fails listing
    /// every field that differs.
    pub fn check_restore(&self, current: &SystemVersions) -> Result<(), SnapshotMismatch> {
        let mut differences = Vec::new();
        let mut compare = |field: &'static str, recorded: &str, now: &str| {
            if recorded != now {
                differences.push(FieldDifference {
                    field,
                    recorded: recorded.to_owned(),
                    current: now.to_owned(),
                });
            }
        };
        compare("kernel", self.kernel.as_str(), current.kernel.as_str());
        compare("initrd", self.initrd.as_str(), current.initrd.as_str());
        compare("hypervisor", &self.hypervisor, &current.hypervisor);
        if differences.is_empty() {
            Ok(())
        } else {
            Err(SnapshotMismatch { differences })
        }
    }
}

/// One field whose recorded and current values differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDifference {
    pub field: &'static str,
    pub recorded: String,
    pub current: String,
}

/// A snapshot that must not be restored here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SnapshotMismatch {
    pub differences: Vec<FieldDifference>,
}

impl fmt::Display for SnapshotMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fields: Vec<String> = self
            .differences
            .iter()
            .map(|d| format!("{} was {}, is now {}", d.field, d.recorded, d.current))
            .collect();
        write!(
            f,
            "snapshot cannot be restored: {}; snapshots need the exact same kernel, initrd and \
             hypervisor: restore on the recorded versions, or shut down and boot fresh to upgrade",
            fields.join("; ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn versions(kernel: &str, initrd: &str, hypervisor: &str) -> SystemVersions {
        SystemVersions {
            kernel: KernelVersion::new(kernel),
            initrd: InitrdVersion::new(initrd),
            hypervisor: hypervisor.into(),
        }
    }

    #[test]
    fn identical_versions_restore() {
        let v = versions("k1", "i1", "v49.0");
        assert_eq!(v.check_restore(&v.clone()), Ok(()));
    }

    #[test]
    fn each_single_difference_is_named() {
        let recorded = versions("k1", "i1", "v49.0");
        for (current, field, was, now) in [
            (versions("k2", "i1", "v49.0"), "kernel", "k1", "k2"),
            (versions("k1", "i2", "v49.0"), "initrd", "i1", "i2"),
            (
                versions("k1", "i1", "v50.0"),
                "hypervisor",
                "v49.0",
                "v50.0",
            ),
        ] {
            let err = recorded.check_restore(&current).unwrap_err();
            assert_eq!(err.differences.len(), 1, "{err}");
            assert_eq!(err.differences[0].field, field);
            assert!(
                err.to_string()
                    .contains(&format!("{field} was {was}, is now {now}")),
                "{err}"
            );
        }
    }

    #[test]
    fn all_differences_are_listed() {
        let err = versions("k1", "i1", "a")
            .check_restore(&versions("k2", "i2", "b"))
            .unwrap_err();
        let fields: Vec<_> = err.differences.iter().map(|d| d.field).collect();
        assert_eq!(fields, ["kernel", "initrd", "hypervisor"]);
    }

    #[test]
    fn versions_round_trip_as_json() {
        let v = versions("ch-release-v6.16.9-20260508", "v1.0.0", "v49.0");
        let json = serde_json::to_string(&v).unwrap();
        assert_eq!(
            json,
            r#"{"kernel":"ch-release-v6.16.9-20260508","initrd":"v1.0.0","hypervisor":"v49.0"}"#
        );
        assert_eq!(serde_json::from_str::<SystemVersions>(&json).unwrap(), v);
    }
}
