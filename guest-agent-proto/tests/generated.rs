//! The committed `src/guest.rs` is exactly what prost generates from `proto/guest.proto`,
//! compiled in pure Rust (protox): the workspace's build needs neither protoc nor the network.
//! After editing the .proto: `UPDATE_GENERATED=1 cargo test -p guest-agent-proto --test generated`.

use std::path::Path;

#[test]
fn committed_code_matches_the_proto() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fds = protox::compile(["guest.proto"], [crate_dir.join("proto")])
        .expect("proto/guest.proto compiles");
    let out = tempfile_dir();
    prost_build::Config::new()
        .out_dir(&out)
        .compile_fds(fds)
        .expect("prost-build generates code from the descriptor set");
    let generated = std::fs::read_to_string(out.join("guest.rs")).expect("guest.rs generated");
    let committed_path = crate_dir.join("src/guest.rs");
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    if std::env::var_os("UPDATE_GENERATED").is_some() {
        std::fs::write(&committed_path, &generated).expect("write src/guest.rs");
        return;
    }
    assert!(
        committed == generated,
        "{} is stale: run `UPDATE_GENERATED=1 cargo test -p guest-agent-proto --test generated` \
         and commit the result",
        committed_path.display()
    );
    std::fs::remove_dir_all(out).ok();
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("guest-agent-proto-gen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}
