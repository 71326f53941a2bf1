//! Base image sources (`alpine:3.22`, `host:5000/repo@sha256:…`, `oci:/path:ref`): any text
//! gives a source or an error, never a panic, and a source prints as text that parses back to it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xtask::oci::reference::{ImageRef, Source};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(source) = Source::parse(text) else {
        return;
    };
    let printed = source.to_string();
    let again = Source::parse(&printed)
        .unwrap_or_else(|e| panic!("{text:?} prints as {printed:?}, which does not parse: {e:#}"));
    assert_eq!(
        again, source,
        "{text:?} prints as {printed:?}, which parses as another"
    );
    if let Source::Registry(image) = &source {
        // The name recorded in the cache's index.json is a reference too.
        let name = image.ref_name();
        let named = ImageRef::parse(&name)
            .unwrap_or_else(|e| panic!("ref name {name:?} of {text:?} does not parse: {e:#}"));
        assert_eq!(
            (&named.registry, &named.repository),
            (&image.registry, &image.repository)
        );
        let _ = image.api_host();
        let _ = image.manifest_reference();
    }
});
