//! `config.json` as guest-init reads it: any text gives a config or an error, never a panic,
//! and a config that parses survives the host's writer unchanged.
#![no_main]

use std::path::Path;

use guest_protocol::config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok((config, _warnings)) = config::parse(text, Path::new(config::FILE_NAME)) else {
        return;
    };
    let written = config
        .to_json()
        .expect("a config guest-init accepted is one the host can write");
    let (again, warnings) = config::parse(&written, Path::new(config::FILE_NAME))
        .expect("what the host writes, guest-init reads");
    assert_eq!(again, config, "the written config reads back as another");
    assert!(
        warnings.is_empty(),
        "the writer wrote unknown keys: {warnings:?}"
    );
});
