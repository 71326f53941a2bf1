//! How the `cargo xtask` binary reports a failed command.

use std::process::Command;

/// A command that fails at once: an initrd version the lock does not have.
fn failing_command(backtrace_env: &[(&str, &str)]) -> String {
    let data_dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args([
            "artifacts",
            "--only",
            "initrds",
            "--initrd",
            "v0.0.0-missing",
            "--offline",
        ])
        .arg("--data-dir")
        .arg(data_dir.path())
        .env_remove("XTASK_BACKTRACE")
        .envs(backtrace_env.iter().copied())
        .output()
        .expect("running the xtask binary");
    assert!(!output.status.success());
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn errors_print_their_message_chain_not_a_backtrace_even_with_rust_backtrace_set() {
    let stderr = failing_command(&[("RUST_BACKTRACE", "1")]);
    assert!(stderr.contains("v0.0.0-missing"), "{stderr}");
    assert!(!stderr.contains("Stack backtrace"), "{stderr}");
}

#[test]
fn xtask_backtrace_brings_the_backtrace_back() {
    let stderr = failing_command(&[("RUST_BACKTRACE", "1"), ("XTASK_BACKTRACE", "1")]);
    assert!(stderr.contains("Stack backtrace"), "{stderr}");
}
