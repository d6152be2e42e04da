//! Fuzzes the CDB decoder and sense encoding.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(reason) = lun::cdb::decode(data) {
        let fixed = reason.encode(false);
        assert_eq!(fixed.len(), 18);
        let desc = reason.encode(true);
        assert_eq!(desc[7] as usize, desc.len() - 8);
    }
});
