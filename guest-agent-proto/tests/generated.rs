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

/// The original hosts' contract (names and numbers from the wire reference): our .proto
/// must carry each of these fields under exactly this name and number.
const ORIGINAL_FIELDS: &[(&str, &[(&str, i32)])] = &[
    ("ExecRequest", &[("start", 1), ("stdin", 2)]),
    (
        "ExecStart",
        &[
            ("command", 1),
            ("tty", 2),
            ("env", 3),
            ("cwd", 4),
            ("timeout_seconds", 5),
        ],
    ),
    (
        "ExecResponse",
        &[("stdout", 1), ("stderr", 2), ("exit_code", 3)],
    ),
    (
        "CopyToGuestRequest",
        &[("start", 1), ("data", 2), ("end", 3)],
    ),
    (
        "CopyToGuestStart",
        &[
            ("path", 1),
            ("mode", 2),
            ("is_dir", 3),
            ("size", 4),
            ("mtime", 5),
            ("uid", 6),
            ("gid", 7),
        ],
    ),
    (
        "CopyToGuestResponse",
        &[("success", 1), ("error", 2), ("bytes_written", 3)],
    ),
    ("CopyFromGuestRequest", &[("path", 1), ("follow_links", 2)]),
    (
        "CopyFromGuestResponse",
        &[("header", 1), ("data", 2), ("end", 3), ("error", 4)],
    ),
    (
        "CopyFromGuestHeader",
        &[
            ("path", 1),
            ("mode", 2),
            ("is_dir", 3),
            ("is_symlink", 4),
            ("link_target", 5),
            ("size", 6),
            ("mtime", 7),
            ("uid", 8),
            ("gid", 9),
        ],
    ),
    ("CopyFromGuestEnd", &[("final", 1)]),
    ("CopyFromGuestError", &[("message", 1), ("path", 2)]),
    ("StatPathRequest", &[("path", 1), ("follow_links", 2)]),
    (
        "StatPathResponse",
        &[
            ("exists", 1),
            ("is_dir", 2),
            ("is_file", 3),
            ("is_symlink", 4),
            ("link_target", 5),
            ("mode", 6),
            ("size", 7),
            ("error", 8),
        ],
    ),
];

#[test]
fn the_proto_keeps_the_original_contract() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fds = protox::compile(["guest.proto"], [crate_dir.join("proto")]).unwrap();
    let file = &fds.file[0];
    assert_eq!(file.package(), "guest");
    let service = &file.service[0];
    assert_eq!(service.name(), "GuestService");
    let methods: Vec<_> = service
        .method
        .iter()
        .map(|m| {
            (
                m.name(),
                m.input_type(),
                m.client_streaming(),
                m.output_type(),
                m.server_streaming(),
            )
        })
        .collect();
    assert_eq!(
        methods,
        [
            (
                "Exec",
                ".guest.ExecRequest",
                true,
                ".guest.ExecResponse",
                true
            ),
            (
                "CopyToGuest",
                ".guest.CopyToGuestRequest",
                true,
                ".guest.CopyToGuestResponse",
                false
            ),
            (
                "CopyFromGuest",
                ".guest.CopyFromGuestRequest",
                false,
                ".guest.CopyFromGuestResponse",
                true
            ),
            (
                "StatPath",
                ".guest.StatPathRequest",
                false,
                ".guest.StatPathResponse",
                false
            ),
        ]
    );
    for (message, fields) in ORIGINAL_FIELDS {
        let descriptor = file
            .message_type
            .iter()
            .find(|m| m.name() == *message)
            .unwrap_or_else(|| panic!("message {message} missing"));
        for (name, number) in *fields {
            let field = descriptor
                .field
                .iter()
                .find(|f| f.name() == *name)
                .unwrap_or_else(|| panic!("{message}.{name} missing"));
            assert_eq!(field.number(), *number, "{message}.{name}");
        }
    }
}

/// Bytes an original host sends, decoded by our messages.
#[test]
fn original_bytes_decode() {
    use guest_agent_proto::pb::{ExecRequest, exec_request::Request};
    use prost::Message;
    // ExecRequest{start: ExecStart{command: ["echo", "hi"], tty: true, timeout_seconds: 5}}
    let bytes = [
        0x0a, 0x0e, 0x0a, 0x04, b'e', b'c', b'h', b'o', 0x0a, 0x02, b'h', b'i', 0x10, 0x01, 0x28,
        0x05,
    ];
    let request = ExecRequest::decode(&bytes[..]).unwrap();
    let Some(Request::Start(start)) = &request.request else {
        panic!("not a start: {request:?}")
    };
    assert_eq!(start.command, ["echo", "hi"]);
    assert!(start.tty);
    assert_eq!(start.timeout_seconds, 5);
    assert_eq!(request.encode_to_vec(), bytes);
}
