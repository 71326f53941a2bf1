//! The contract between a host and guest-init (filled in by the redesign, issue 9).
