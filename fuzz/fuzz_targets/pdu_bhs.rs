//! Fuzzes PDU framing and decoding: any bytes either frame and parse (and then re-encode to
//! the same header) or are refused with an error; never a panic.
#![no_main]

use iscsi_target::proto::pdu::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, bytes)) = data.split_first() else {
        return;
    };
    let digests = Digests {
        header: flags & 1 != 0,
        data: flags & 2 != 0,
    };
    let limits = FrameLimits {
        digests,
        max_data_segment: 8192,
    };
    if let Ok(Some(info)) = frame_len(bytes, limits) {
        assert!(info.data_len <= 8192);
        if bytes.len() >= info.total {
            if let Ok(p) = parse_pdu(&bytes[..info.total], info, digests) {
                let mut out = Vec::new();
                encode_pdu(&mut out, &p.bhs, p.ahs, p.data, digests);
                let again =
                    parse_pdu(&out, frame_len(&out, limits).unwrap().unwrap(), digests).unwrap();
                assert_eq!(again.bhs, p.bhs);
            }
        }
    }
});
