//! `artifacts.lock` as `system` (and its build script, and xtask) read it: any text gives a lock
//! or an error naming where, never a panic, and a lock that parses is written back to the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use system::Lock;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let lock = match Lock::parse(text) {
        Ok(lock) => lock,
        Err(e) => {
            // Errors render (with their JSON path) without panicking.
            let _ = e.to_string();
            return;
        }
    };
    let written = lock.to_json();
    let again = Lock::parse(&written)
        .unwrap_or_else(|e| panic!("a lock that parsed is written as one that does not: {e}"));
    assert_eq!(again, lock, "the written lock reads back as another");
    assert_eq!(again.to_json(), written, "writing is not stable");
});
