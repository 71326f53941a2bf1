//! The kernel command line as guest-init reads it: any text gives options or an error, never a
//! panic, and options that parse survive the host's `kernel_params` unchanged.
#![no_main]

use guest_protocol::cmdline::{self, Writable};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok((options, _warnings)) = cmdline::parse(text) else {
        return;
    };
    // `kernel_params` writes device paths as they are: documented to hold no spaces or quotes.
    let writable = match &options.writable {
        Writable::Device(device) => device.to_string_lossy().into_owned(),
        Writable::Tmpfs => String::new(),
    };
    let plain = [
        options.rootfs.to_string_lossy().into_owned(),
        options.config.to_string_lossy().into_owned(),
        writable,
    ]
    .iter()
    .all(|value| !value.chars().any(|c| c.is_whitespace() || c == '"'));
    if !plain {
        return;
    }
    let params = options.kernel_params().join(" ");
    let (again, warnings) = cmdline::parse(&params)
        .unwrap_or_else(|e| panic!("the host's parameters {params:?} do not parse: {e}"));
    assert_eq!(again, options, "{params:?} reads back as other options");
    assert!(warnings.is_empty(), "{warnings:?}");
});
