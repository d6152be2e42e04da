//! Fuzzes the connection state machine: a fuzzed byte stream is fed in fuzzed chunk sizes to
//! a connection (before and after login); commands are answered with fuzzed outcomes.
//! Invariants: no panic, and the receive backlog never exceeds one maximal PDU.
#![no_main]

use iscsi_target::proto::pdu::*;
use iscsi_target::proto::text;
use iscsi_target::{Connection, Event, FabricConfig, Portal, TargetInfo, Timers};
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

fn cfg() -> Arc<FabricConfig> {
    static CFG: OnceLock<Arc<FabricConfig>> = OnceLock::new();
    Arc::clone(CFG.get_or_init(|| {
        let device = Arc::new(lun::DeviceServer::new(
            lun::TargetPort {
                relative_port: 1,
                port_group: 1,
            },
            BTreeMap::new(),
        ));
        Arc::new(FabricConfig {
            targets: vec![TargetInfo {
                name: "iqn.2026-11.io.rainio:t".into(),
                alias: None,
                chap: None,
                allowed_initiators: None,
                portals: vec![Portal {
                    address: "127.0.0.1:3260".into(),
                    tpgt: 1,
                }],
                device,
            }],
            discovery_chap: None,
            tpgt: 1,
            relative_port: 1,
            timers: Timers::default(),
            limits: Default::default(),
            chap_challenges: Default::default(),
        })
    }))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let now = Instant::now();
    let mut c = Connection::new(cfg(), 1, now);
    if mode & 1 == 1 {
        // Log in first so the stream exercises the full feature phase.
        let mut keys = Vec::new();
        text::push(&mut keys, "InitiatorName", "iqn.x:fuzz");
        text::push(&mut keys, "TargetName", "iqn.2026-11.io.rainio:t");
        text::push(
            &mut keys,
            "InitialR2T",
            if mode & 2 == 0 { "No" } else { "Yes" },
        );
        let req = Bhs::LoginRequest(LoginRequest {
            transit: true,
            cont: false,
            csg: 1,
            nsg: 3,
            version_max: 0,
            version_min: 0,
            isid: 1,
            tsih: 0,
            itt: 0,
            cid: 0,
            cmd_sn: 0,
            exp_stat_sn: 0,
        });
        let mut w = Vec::new();
        encode_pdu(&mut w, &req, &[], &keys, Digests::default());
        c.handle_bytes(now, &w).unwrap();
    }
    let mut pending = Vec::new();
    let mut sink = Vec::new();
    let chunk = usize::from(mode >> 2).max(1) * 7;
    for (i, piece) in rest.chunks(chunk).enumerate() {
        pending.extend_from_slice(piece);
        match c.handle_bytes(now + Duration::from_millis(i as u64), &pending) {
            Ok(n) => {
                pending.drain(..n);
            }
            Err(_) => return,
        }
        while let Some(ev) = c.poll_event() {
            if let Event::Execute { itt, cmd } = ev {
                let n = cmd.data_in_len.min(70_000) as usize;
                c.handle_outcome(
                    itt,
                    lun::CommandOutcome::good(lun::DataIn::Bytes(vec![0xab; n / 2])),
                );
            }
        }
        c.poll_transmit(&mut sink);
        sink.clear();
        assert!(pending.len() <= 48 + 1020 + 8 + 262_144 + chunk);
    }
    c.handle_timeout(now + Duration::from_secs(3600));
});
