//! Fuzzes the key=value parser and operational negotiation with arbitrary key text.
#![no_main]

use iscsi_target::proto::{params, text};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(pairs) = text::parse(data) {
        let encoded = text::encode(&pairs);
        assert_eq!(text::parse(&encoded).unwrap(), pairs);
        let mut p = params::SessionParams::default();
        let _ = params::negotiate(
            &mut p,
            &pairs,
            data.first().is_some_and(|b| b & 1 == 1),
            true,
        );
        assert!(p.first_burst <= p.max_burst);
    }
});
