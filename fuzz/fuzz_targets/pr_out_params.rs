//! Fuzzes PERSISTENT RESERVE OUT: the parameter-list decoder, then the state machine with
//! the decoded operation from one of three nexuses. Invariants: no panic; keys are never 0;
//! a reservation's holder is registered.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lun::pr::{decode_out, PrState};
use lun::ItNexus;

fuzz_target!(|data: &[u8]| {
    let mut state = PrState::default();
    for chunk in data.chunks(28) {
        if chunk.len() < 4 {
            break;
        }
        let nexus = ItNexus {
            initiator_name: "iqn.fuzz:x".into(),
            isid: u64::from(chunk[0] % 3),
            relative_port: 1,
        };
        let param_len = u32::from(chunk[3]);
        if let Ok(op) = decode_out(chunk[1] & 0x1f, chunk[2] & 0x0f, param_len, &chunk[4..]) {
            let _ = state.apply(&nexus, op);
        }
        assert!(state.registrations.values().all(|r| r.key != 0));
        if let Some(r) = &state.reservation {
            assert!(state.registrations.contains_key(&r.holder));
        }
        let _ = state.read_full_status();
    }
});
