//! Fuzzes the UNMAP parameter-list parser: any bytes and any PARAMETER LIST LENGTH yield
//! descriptors inside the capacity and limits, or a sense reason; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((len, list)) = data.split_first_chunk::<2>() else {
        return;
    };
    let param_len = u32::from(u16::from_be_bytes(*len));
    if let Ok(descs) = lun::params::unmap(param_len, list, 1 << 20, 64, 1 << 16) {
        let total: u64 = descs.iter().map(|d| u64::from(d.blocks)).sum();
        assert!(total <= 1 << 16);
        assert!(descs.iter().all(|d| d.lba + u64::from(d.blocks) <= 1 << 20));
    }
});
