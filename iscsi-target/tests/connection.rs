//! The sans-IO connection core driven PDU by PDU, with a manual clock: login negotiation,
//! CmdSN windows across the 2^32 wrap, R2T and Data-In sequencing, task management ordering,
//! keepalive, and malformed input.

use iscsi_target::proto::pdu::*;
use iscsi_target::proto::text;
use iscsi_target::{
    ChapConfig, ChapSecret, Connection, Event, FabricConfig, Portal, TargetInfo, Timers,
};
use lun::{CommandOutcome, CommandStatus, DataIn as LunData, DeviceServer, TargetPort};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

const TARGET: &str = "iqn.2026-11.io.rainio:t";

fn cfg(chap: Option<ChapConfig>) -> Arc<FabricConfig> {
    let device = Arc::new(DeviceServer::new(
        TargetPort {
            relative_port: 1,
            port_group: 1,
        },
        BTreeMap::new(),
    ));
    Arc::new(FabricConfig {
        targets: vec![TargetInfo {
            name: TARGET.into(),
            alias: None,
            chap,
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
        timers: Timers {
            login_timeout_ms: 1000,
            nop_interval_ms: 5000,
            nop_timeout_ms: 3000,
        },
        limits: Default::default(),
        chap_challenges: Default::default(),
    })
}

struct H {
    c: Connection,
    now: Instant,
    digests: Digests,
    cmd_sn: u32,
}

impl H {
    fn new(chap: Option<ChapConfig>) -> Self {
        let now = Instant::now();
        Self {
            c: Connection::new(cfg(chap), 7, now),
            now,
            digests: Digests::default(),
            cmd_sn: 10,
        }
    }

    fn feed_raw(&mut self, bytes: &[u8]) -> Result<usize, iscsi_target::ConnectionError> {
        self.c.handle_bytes(self.now, bytes)
    }

    fn feed(&mut self, bhs: &Bhs, data: &[u8]) -> Result<usize, iscsi_target::ConnectionError> {
        let mut w = Vec::new();
        encode_pdu(&mut w, bhs, &[], data, self.digests);
        let n = self.feed_raw(&w)?;
        assert_eq!(n, w.len(), "a whole PDU is consumed");
        Ok(n)
    }

    fn out(&mut self) -> Vec<(Bhs, Vec<u8>)> {
        let mut buf = Vec::new();
        self.c.poll_transmit(&mut buf);
        self.parse(&buf)
    }

    /// The PDUs in `buf` (digests checked as negotiated).
    fn parse(&self, buf: &[u8]) -> Vec<(Bhs, Vec<u8>)> {
        let mut pdus = Vec::new();
        let mut pos = 0;
        // Login responses never carry digests; after login, the negotiated ones apply.
        while pos < buf.len() {
            let d = if buf[pos] & 0x3f == opcode::LOGIN_RESPONSE {
                Digests::default()
            } else {
                self.digests
            };
            let info = frame_len(
                &buf[pos..],
                FrameLimits {
                    digests: d,
                    max_data_segment: 1 << 24,
                },
            )
            .unwrap()
            .unwrap();
            let p = parse_pdu(&buf[pos..pos + info.total], info, d).unwrap();
            pdus.push((p.bhs, p.data.to_vec()));
            pos += info.total;
        }
        pdus
    }

    fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.c.poll_event()).collect()
    }

    fn login_pdu(&self, csg: u8, nsg: u8, transit: bool) -> Bhs {
        Bhs::LoginRequest(LoginRequest {
            transit,
            cont: false,
            csg,
            nsg,
            version_max: 0,
            version_min: 0,
            isid: 0x8000_0000_0001,
            tsih: 0,
            itt: 1,
            cid: 0,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: 0,
        })
    }

    fn login(&mut self, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut keys = vec![
            ("InitiatorName", "iqn.x:i"),
            ("TargetName", TARGET),
            ("SessionType", "Normal"),
        ];
        keys.extend_from_slice(extra);
        let data = kv(&keys);
        self.feed(&self.login_pdu(1, 3, true), &data).unwrap();
        let out = self.out();
        let (Bhs::LoginResponse(r), data) = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!((r.status_class, r.status_detail), (0, 0));
        assert!(r.transit && r.nsg == 3);
        assert_eq!(r.tsih, 7);
        assert!(self.c.is_full_feature());
        let keys = text::parse(data).unwrap();
        let get = |k: &str| keys.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        self.digests = Digests {
            header: get("HeaderDigest") == Some("CRC32C"),
            data: get("DataDigest") == Some("CRC32C"),
        };
        keys
    }

    fn scsi(&mut self, itt: u32, cdb0: u8, edtl: u32, write: bool, final_: bool, data: &[u8]) {
        let mut cdb = [0u8; 16];
        cdb[0] = cdb0;
        let bhs = Bhs::ScsiCommand(ScsiCommandPdu {
            immediate: false,
            final_,
            read: !write,
            write,
            attr: 1,
            lun: 0,
            itt,
            edtl,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: 0,
            cdb,
        });
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        self.feed(&bhs, data).unwrap();
    }

    fn executed(&mut self) -> Vec<(u32, lun::ScsiCommand)> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Execute { itt, cmd } => Some((itt, cmd)),
                _ => None,
            })
            .collect()
    }
}

fn kv(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut v = Vec::new();
    for (k, val) in pairs {
        text::push(&mut v, k, val);
    }
    v
}

fn good(data: Vec<u8>) -> CommandOutcome {
    CommandOutcome::good(LunData::Bytes(data))
}

#[test]
fn login_answers_offered_keys_and_declares_mrdsl_once() {
    let mut h = H::new(None);
    let keys = h.login(&[
        ("HeaderDigest", "CRC32C,None"),
        ("MaxBurstLength", "65536"),
        ("X-foo", "1"),
        ("MaxRecvDataSegmentLength", "8192"),
    ]);
    let get = |k: &str| {
        keys.iter()
            .filter(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>()
    };
    assert_eq!(get("HeaderDigest"), vec!["CRC32C"]);
    assert_eq!(get("MaxBurstLength"), vec!["65536"]);
    assert_eq!(get("X-foo"), vec!["NotUnderstood"]);
    assert_eq!(get("MaxRecvDataSegmentLength"), vec!["262144"]);
    assert_eq!(get("TargetPortalGroupTag"), vec!["1"]);
    assert!(
        get("InitialR2T").is_empty(),
        "keys not offered are not answered"
    );
    assert_eq!(h.c.params().initiator_mrdsl, 8192);
    assert_eq!(h.events().len(), 1, "LoggedIn");
}

#[test]
fn login_keys_may_span_pdus_with_the_continue_bit() {
    let mut h = H::new(None);
    let all = kv(&[("InitiatorName", "iqn.x:i"), ("TargetName", TARGET)]);
    let (a, b) = all.split_at(10);
    let Bhs::LoginRequest(mut first) = h.login_pdu(1, 3, true) else {
        unreachable!()
    };
    first.cont = true;
    first.transit = false;
    h.feed(&Bhs::LoginRequest(first), a).unwrap();
    let out = h.out();
    assert!(
        matches!(&out[0], (Bhs::LoginResponse(r), d) if r.status_class == 0 && !r.transit && d.is_empty())
    );
    h.feed(&h.login_pdu(1, 3, true), b).unwrap();
    let out = h.out();
    assert!(matches!(&out[0], (Bhs::LoginResponse(r), _) if r.status_class == 0 && r.transit));
}

#[test]
fn login_failures_carry_the_right_status() {
    for (keys, status) in [
        (vec![("TargetName", TARGET)], (2u8, 7u8)), // no InitiatorName
        (vec![("InitiatorName", "iqn.x:i")], (2, 7)), // no TargetName
        (
            vec![("InitiatorName", "iqn.x:i"), ("TargetName", "iqn.nope:x")],
            (2, 3),
        ), // not found
        (
            vec![
                ("InitiatorName", "iqn.x:i"),
                ("TargetName", TARGET),
                ("SessionType", "Weird"),
            ],
            (2, 0),
        ),
    ] {
        let mut h = H::new(None);
        h.feed(&h.login_pdu(1, 3, true), &kv(&keys)).unwrap();
        let out = h.out();
        let (Bhs::LoginResponse(r), _) = &out[0] else {
            panic!()
        };
        assert_eq!((r.status_class, r.status_detail), status, "{keys:?}");
        assert!(h.events().iter().any(|e| matches!(e, Event::Close { .. })));
    }
    // Malformed key text.
    let mut h = H::new(None);
    h.feed(&h.login_pdu(1, 3, true), b"no equals sign\0")
        .unwrap();
    assert!(
        matches!(&h.out()[0], (Bhs::LoginResponse(r), _) if (r.status_class, r.status_detail) == (2, 0))
    );
}

#[test]
fn chap_target_refuses_skipping_security_and_out_of_order_chap() {
    let chap = ChapConfig {
        initiator: ChapSecret {
            user: "u".into(),
            secret: b"0123456789abcdef".to_vec(),
        },
        mutual: None,
    };
    // Straight to the operational stage.
    let mut h = H::new(Some(chap.clone()));
    h.feed(
        &h.login_pdu(1, 3, true),
        &kv(&[("InitiatorName", "iqn.x:i"), ("TargetName", TARGET)]),
    )
    .unwrap();
    assert!(
        matches!(&h.out()[0], (Bhs::LoginResponse(r), _) if (r.status_class, r.status_detail) == (2, 1))
    );
    // CHAP_R before any challenge.
    let mut h = H::new(Some(chap.clone()));
    h.feed(
        &h.login_pdu(0, 1, false),
        &kv(&[
            ("InitiatorName", "iqn.x:i"),
            ("TargetName", TARGET),
            ("AuthMethod", "CHAP"),
        ]),
    )
    .unwrap();
    assert!(matches!(&h.out()[0], (Bhs::LoginResponse(r), _) if r.status_class == 0));
    h.feed(
        &h.login_pdu(0, 1, true),
        &kv(&[
            ("CHAP_N", "u"),
            ("CHAP_R", "0x00112233445566778899aabbccddeeff"),
        ]),
    )
    .unwrap();
    assert!(
        matches!(&h.out()[0], (Bhs::LoginResponse(r), _) if (r.status_class, r.status_detail) == (2, 1))
    );
    // A reflected challenge (mutual CHAP with our own challenge) is refused.
    let mutual = ChapConfig {
        mutual: Some(ChapSecret {
            user: "t".into(),
            secret: b"fedcba9876543210".to_vec(),
        }),
        ..chap
    };
    let mut h = H::new(Some(mutual));
    h.feed(
        &h.login_pdu(0, 1, false),
        &kv(&[
            ("InitiatorName", "iqn.x:i"),
            ("TargetName", TARGET),
            ("AuthMethod", "CHAP"),
        ]),
    )
    .unwrap();
    h.out();
    h.feed(&h.login_pdu(0, 1, false), &kv(&[("CHAP_A", "5")]))
        .unwrap();
    let out = h.out();
    let keys = text::parse(&out[0].1).unwrap();
    let get = |k: &str| {
        keys.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    let id: u8 = get("CHAP_I").parse().unwrap();
    let c = iscsi_target::proto::chap::decode_binary(&get("CHAP_C")).unwrap();
    let r = iscsi_target::proto::chap::response(id, b"0123456789abcdef", &c);
    let resp = kv(&[
        ("CHAP_N", "u"),
        ("CHAP_R", &iscsi_target::proto::chap::encode_hex(&r)),
        ("CHAP_I", &id.to_string()),
        ("CHAP_C", &get("CHAP_C")),
    ]);
    h.feed(&h.login_pdu(0, 1, true), &resp).unwrap();
    assert!(
        matches!(&h.out()[0], (Bhs::LoginResponse(r), _) if (r.status_class, r.status_detail) == (2, 1))
    );
}

#[test]
fn login_times_out() {
    let mut h = H::new(None);
    let deadline = h.c.poll_timeout().unwrap();
    h.c.handle_timeout(deadline);
    assert!(matches!(h.events().as_slice(), [Event::Close { .. }]));
}

/// CmdSN ordering across the 2^32 wrap: out-of-order commands wait for the gap, commands
/// outside the window are ignored, immediate ones do not consume a CmdSN.
#[test]
fn cmdsn_window_across_the_wrap() {
    let mut h = H::new(None);
    h.cmd_sn = u32::MAX - 1;
    h.login(&[]);
    h.events();
    let base = h.cmd_sn; // u32::MAX - 1
                         // Send base+1 (= u32::MAX) first: queued.
    h.cmd_sn = base.wrapping_add(1);
    h.scsi(2, 0x00, 0, false, true, &[]);
    assert!(h.executed().is_empty());
    // Then base + 2 (= 0 after the wrap): queued too.
    h.scsi(3, 0x00, 0, false, true, &[]);
    assert!(h.executed().is_empty());
    // Now base: all three run in order.
    h.cmd_sn = base;
    h.scsi(1, 0x00, 0, false, true, &[]);
    let itts: Vec<u32> = h.executed().iter().map(|(i, _)| *i).collect();
    assert_eq!(itts, vec![1, 2, 3]);
    for itt in [1, 2, 3] {
        h.c.handle_outcome(itt, good(vec![]));
    }
    let out = h.out();
    let mut last_max = 0u32;
    for (b, _) in &out {
        let Bhs::ScsiResponse(r) = b else { panic!() };
        assert_eq!(r.exp_cmd_sn, 1, "ExpCmdSN wrapped to 1");
        assert!(
            r.max_cmd_sn.wrapping_sub(last_max) < 1 << 31 || last_max == 0,
            "MaxCmdSN never decreases"
        );
        last_max = r.max_cmd_sn;
    }
    // Far outside the window: ignored.
    h.cmd_sn = 5000;
    h.scsi(9, 0x00, 0, false, true, &[]);
    assert!(h.executed().is_empty());
    assert!(h.out().is_empty());
    // A CmdSN already used (below ExpCmdSN): ignored too.
    h.cmd_sn = 0;
    h.scsi(10, 0x00, 0, false, true, &[]);
    assert!(h.executed().is_empty());
}

#[test]
fn write_uses_immediate_data_then_r2ts_within_max_burst() {
    let mut h = H::new(None);
    h.login(&[
        ("InitialR2T", "Yes"),
        ("MaxBurstLength", "16384"),
        ("FirstBurstLength", "8192"),
        ("MaxOutstandingR2T", "2"),
    ]);
    h.events();
    let edtl = 40_000u32;
    let data: Vec<u8> = (0..edtl).map(|i| (i % 253) as u8).collect();
    h.scsi(5, 0x2a, edtl, true, true, &data[..8192]);
    let r2ts: Vec<R2t> = h
        .out()
        .into_iter()
        .map(|(b, _)| match b {
            Bhs::R2t(r) => r,
            o => panic!("{o:?}"),
        })
        .collect();
    assert_eq!(r2ts.len(), 2, "MaxOutstandingR2T");
    assert_eq!(
        (
            r2ts[0].buffer_offset,
            r2ts[0].desired_length,
            r2ts[0].r2t_sn
        ),
        (8192, 16384, 0)
    );
    assert_eq!(
        (
            r2ts[1].buffer_offset,
            r2ts[1].desired_length,
            r2ts[1].r2t_sn
        ),
        (24576, 15424, 1)
    );
    for r in &r2ts {
        let off = r.buffer_offset as usize;
        let end = off + r.desired_length as usize;
        let d = Bhs::DataOut(DataOut {
            final_: true,
            lun: 0,
            itt: 5,
            ttt: r.ttt,
            exp_stat_sn: 0,
            data_sn: 0,
            buffer_offset: r.buffer_offset,
        });
        h.feed(&d, &data[off..end]).unwrap();
    }
    let ex = h.executed();
    assert_eq!(ex.len(), 1);
    assert!(ex[0].1.data_out == data, "all data assembled in order");
}

#[test]
fn data_in_is_split_by_the_initiators_limit_and_status_collapsed() {
    let mut h = H::new(None);
    h.login(&[("MaxRecvDataSegmentLength", "4096")]);
    h.events();
    h.scsi(8, 0x28, 10_000, false, true, &[]);
    assert_eq!(h.executed().len(), 1);
    h.c.handle_outcome(8, good(vec![7u8; 12_000]));
    let out = h.out();
    let ins: Vec<&DataIn> = out
        .iter()
        .map(|(b, _)| match b {
            Bhs::DataIn(d) => d,
            o => panic!("{o:?}"),
        })
        .collect();
    assert_eq!(ins.len(), 3);
    assert_eq!(
        out.iter().map(|(_, d)| d.len()).collect::<Vec<_>>(),
        vec![4096, 4096, 1808]
    );
    assert_eq!(
        ins.iter().map(|d| d.data_sn).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    let last = ins[2];
    assert!(last.has_status && last.final_ && last.overflow && last.residual == 2000);
    assert!(!ins[0].has_status);
}

#[test]
fn large_data_in_goes_from_the_reads_buffers_with_the_same_bytes() {
    // Two reads answered before the connection transmits: 150001 bytes (64 KiB, 64 KiB, then
    // 18929 with 3 bytes of padding) and 70000 (64 KiB, then a 4464-byte tail copied behind its
    // header). The vectored queue must give the very bytes the copying one does, with and
    // without digests, and every PDU must carry its read's bytes.
    for digests in [false, true] {
        let mut sent = Vec::new();
        for vectored in [false, true] {
            let mut h = H::new(None);
            let mut keys = vec![("MaxRecvDataSegmentLength", "65536")];
            if digests {
                keys.extend([("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C")]);
            }
            h.login(&keys);
            h.events();
            let reads = [(8u32, 150_001u32), (9, 70_000)];
            for (itt, len) in reads {
                h.scsi(itt, 0x28, len, false, true, &[]);
            }
            assert_eq!(h.executed().len(), 2);
            let pattern = |itt: u32, len: u32| -> Vec<u8> {
                (0..len).map(|i| (i % 251) as u8 ^ itt as u8).collect()
            };
            for (itt, len) in reads {
                h.c.handle_outcome(itt, good(pattern(itt, len)));
            }
            let raw: Vec<u8> = if vectored {
                let mut t = iscsi_target::Transmit::default();
                assert!(h.c.poll_transmit_vectored(&mut t));
                let slices = t.io_slices();
                // Headers, three segments by reference, padding and digests: many slices.
                assert!(slices.len() > 5, "{} slices", slices.len());
                slices.iter().flat_map(|s| s.iter().copied()).collect()
            } else {
                let mut b = Vec::new();
                assert!(h.c.poll_transmit(&mut b));
                b
            };
            let pdus = h.parse(&raw);
            for (itt, len) in reads {
                let got: Vec<u8> = pdus
                    .iter()
                    .filter(|(b, _)| matches!(b, Bhs::DataIn(d) if d.itt == itt))
                    .flat_map(|(_, d)| d.iter().copied())
                    .collect();
                assert_eq!(got, pattern(itt, len), "itt {itt}, digests {digests}");
            }
            sent.push(raw);
        }
        assert_eq!(sent[0], sent[1], "digests {digests}");
    }
}

#[test]
fn check_condition_carries_sense_and_underflow() {
    let mut h = H::new(None);
    h.login(&[]);
    h.events();
    h.scsi(8, 0x28, 512, false, true, &[]);
    h.executed();
    let reason = lun::SenseReason::LbaOutOfRange;
    h.c.handle_outcome(
        8,
        CommandOutcome {
            status: CommandStatus::CheckCondition(reason),
            sense: reason.encode(false),
            data_in: LunData::None,
            data_out_wanted: None,
        },
    );
    let out = h.out();
    let (Bhs::ScsiResponse(r), d) = &out[0] else {
        panic!()
    };
    assert_eq!(r.status, 2);
    assert_eq!(u16::from_be_bytes([d[0], d[1]]) as usize, d.len() - 2);
    assert_eq!(d[2 + 12], 0x21);
    assert!(r.underflow && r.residual == 512);
}

#[test]
fn abort_task_answers_only_after_the_task_stopped() {
    let mut h = H::new(None);
    h.login(&[]);
    h.events();
    h.scsi(8, 0x28, 512, false, true, &[]);
    h.executed();
    let tmf = Bhs::TaskMgmtRequest(TaskMgmtRequest {
        immediate: true,
        function: 1,
        lun: 0,
        itt: 99,
        rtt: 8,
        cmd_sn: h.cmd_sn,
        exp_stat_sn: 0,
        ref_cmd_sn: h.cmd_sn - 1,
        exp_data_sn: 0,
    });
    h.feed(&tmf, &[]).unwrap();
    assert!(
        h.out().is_empty(),
        "no TMF response while the task still runs"
    );
    h.c.handle_outcome(8, good(vec![1; 512]));
    let out = h.out();
    assert_eq!(out.len(), 1, "the aborted task is not answered");
    assert!(matches!(&out[0].0, Bhs::TaskMgmtResponse(r) if r.itt == 99 && r.response == 0));
    // Unknown task not yet received: "task does not exist".
    let tmf = Bhs::TaskMgmtRequest(TaskMgmtRequest {
        immediate: true,
        function: 1,
        lun: 0,
        itt: 100,
        rtt: 1234,
        cmd_sn: h.cmd_sn,
        exp_stat_sn: 0,
        ref_cmd_sn: h.cmd_sn + 3,
        exp_data_sn: 0,
    });
    h.feed(&tmf, &[]).unwrap();
    assert!(matches!(&h.out()[0].0, Bhs::TaskMgmtResponse(r) if r.response == 1));
    // Unsupported function.
    let tmf = Bhs::TaskMgmtRequest(TaskMgmtRequest {
        immediate: true,
        function: 3,
        lun: 0,
        itt: 101,
        rtt: 0,
        cmd_sn: h.cmd_sn,
        exp_stat_sn: 0,
        ref_cmd_sn: 0,
        exp_data_sn: 0,
    });
    h.feed(&tmf, &[]).unwrap();
    assert!(matches!(&h.out()[0].0, Bhs::TaskMgmtResponse(r) if r.response == 5));
}

#[test]
fn keepalive_pings_then_drops_a_silent_initiator() {
    let mut h = H::new(None);
    h.login(&[]);
    h.events();
    let t = h.c.poll_timeout().unwrap();
    assert_eq!(t - h.now, Duration::from_millis(5000));
    h.c.handle_timeout(t);
    let out = h.out();
    let (Bhs::NopIn(n), _) = &out[0] else {
        panic!("{out:?}")
    };
    assert_eq!(n.itt, RESERVED_TAG);
    // Answered: no close.
    let reply = Bhs::NopOut(NopOut {
        immediate: true,
        lun: 0,
        itt: RESERVED_TAG,
        ttt: n.ttt,
        cmd_sn: h.cmd_sn,
        exp_stat_sn: 0,
    });
    h.now = t;
    h.feed(&reply, &[]).unwrap();
    assert!(h.out().is_empty());
    // Next ping unanswered: close.
    let t2 = h.c.poll_timeout().unwrap();
    h.c.handle_timeout(t2);
    h.out();
    let t3 = h.c.poll_timeout().unwrap();
    assert_eq!(t3 - t2, Duration::from_millis(3000));
    h.c.handle_timeout(t3);
    assert!(matches!(h.events().as_slice(), [Event::Close { .. }]));
}

#[test]
fn malformed_pdus_get_reject_or_close_without_allocation() {
    let mut h = H::new(None);
    h.login(&[]);
    h.events();
    // Truncated BHS: nothing consumed, nothing sent.
    assert_eq!(h.feed_raw(&[0x01, 0x80, 0, 0]).unwrap(), 0);
    assert!(h.out().is_empty());
    // Unknown opcode: Reject 0x05 carrying the header.
    let mut raw = [0u8; 48];
    raw[0] = 0x3a;
    assert_eq!(h.feed_raw(&raw).unwrap(), 48);
    assert!(matches!(&h.out()[0], (Bhs::Reject(r), d) if r.reason == 5 && d.len() == 48));
    // SNACK at ERL 0: Reject.
    let snack = Bhs::SnackRequest(SnackRequest {
        kind: 0,
        lun: 0,
        itt: 1,
        ttt: RESERVED_TAG,
        exp_stat_sn: 0,
        beg_run: 0,
        run_length: 0,
    });
    h.feed(&snack, &[]).unwrap();
    assert!(matches!(&h.out()[0].0, Bhs::Reject(_)));
    // Data-Out for a task that was never issued: Reject.
    let d = Bhs::DataOut(DataOut {
        final_: true,
        lun: 0,
        itt: 4242,
        ttt: 77,
        exp_stat_sn: 0,
        data_sn: 0,
        buffer_offset: 0,
    });
    h.feed(&d, &[0; 512]).unwrap();
    assert!(matches!(&h.out()[0].0, Bhs::Reject(r) if r.reason == 9));
    // A NOP-Out answering a ping never sent: Reject.
    let n = Bhs::NopOut(NopOut {
        immediate: true,
        lun: 0,
        itt: RESERVED_TAG,
        ttt: 31337,
        cmd_sn: h.cmd_sn,
        exp_stat_sn: 0,
    });
    h.feed(&n, &[]).unwrap();
    assert!(matches!(&h.out()[0].0, Bhs::Reject(_)));
    // A header announcing a data segment over our limit: refused from the header alone.
    let mut hdr = [0u8; 48];
    Bhs::NopOut(NopOut {
        immediate: true,
        lun: 0,
        itt: 1,
        ttt: RESERVED_TAG,
        cmd_sn: 0,
        exp_stat_sn: 0,
    })
    .encode(&mut hdr, 0, 300_000);
    assert!(h.feed_raw(&hdr).is_err());
    assert!(matches!(&h.out()[0].0, Bhs::Reject(r) if r.reason == 4));
}

#[test]
fn bad_data_digest_is_rejected_and_closes() {
    let mut h = H::new(None);
    h.login(&[("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C")]);
    h.events();
    let nop = Bhs::NopOut(NopOut {
        immediate: true,
        lun: 0,
        itt: 3,
        ttt: RESERVED_TAG,
        cmd_sn: h.cmd_sn,
        exp_stat_sn: 0,
    });
    let mut w = Vec::new();
    encode_pdu(&mut w, &nop, &[], b"ping", h.digests);
    let n = w.len();
    w[n - 1] ^= 1;
    assert!(h.feed_raw(&w).is_err());
    assert!(matches!(&h.out()[0].0, Bhs::Reject(r) if r.reason == 2));
}

#[test]
fn long_sendtargets_answers_are_split_with_the_continue_bit() {
    let device = Arc::new(DeviceServer::new(
        TargetPort {
            relative_port: 1,
            port_group: 1,
        },
        BTreeMap::new(),
    ));
    let targets = (0..200)
        .map(|i| TargetInfo {
            name: format!("iqn.2026-11.io.rainio:target-with-a-long-name-{i:04}"),
            alias: None,
            chap: None,
            allowed_initiators: None,
            portals: vec![Portal {
                address: "127.0.0.1:3260".into(),
                tpgt: 1,
            }],
            device: Arc::clone(&device),
        })
        .collect();
    let cfg = Arc::new(FabricConfig {
        targets,
        discovery_chap: None,
        tpgt: 1,
        relative_port: 1,
        timers: Timers::default(),
        limits: Default::default(),
        chap_challenges: Default::default(),
    });
    let mut h = H {
        c: Connection::new(cfg, 3, Instant::now()),
        now: Instant::now(),
        digests: Digests::default(),
        cmd_sn: 1,
    };
    h.feed(
        &h.login_pdu(1, 3, true),
        &kv(&[
            ("InitiatorName", "iqn.x:i"),
            ("SessionType", "Discovery"),
            ("MaxRecvDataSegmentLength", "4096"),
        ]),
    )
    .unwrap();
    h.out();
    let req = |ttt| {
        Bhs::TextRequest(TextRequest {
            immediate: true,
            final_: true,
            cont: false,
            lun: 0,
            itt: 4,
            ttt,
            cmd_sn: 1,
            exp_stat_sn: 0,
        })
    };
    h.feed(&req(RESERVED_TAG), &kv(&[("SendTargets", "All")]))
        .unwrap();
    let mut all = Vec::new();
    let mut rounds = 0;
    loop {
        let out = h.out();
        let (Bhs::TextResponse(r), d) = &out[0] else {
            panic!()
        };
        assert!(d.len() <= 4096);
        all.extend_from_slice(d);
        rounds += 1;
        if r.final_ {
            break;
        }
        assert!(r.cont && r.ttt != RESERVED_TAG);
        h.feed(&req(r.ttt), &[]).unwrap();
    }
    assert!(rounds > 3);
    // More pairs than our own receive limit, so count them directly.
    let names = all
        .split(|&b| b == 0)
        .filter(|kv| kv.starts_with(b"TargetName="))
        .count();
    assert_eq!(names, 200);
    assert!(
        all.split(|&b| b == 0)
            .filter(|kv| !kv.is_empty())
            .all(|kv| kv.starts_with(b"TargetName=") || kv.starts_with(b"TargetAddress=")),
        "no pair was cut at a PDU boundary"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// Any byte stream after login yields PDUs, Rejects or an error: never a panic, and
    /// never more buffered than one PDU's worth.
    #[test]
    fn random_streams_never_panic(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..400), 0..8)) {
        let mut h = H::new(None);
        h.login(&[]);
        h.events();
        let mut pending: Vec<u8> = Vec::new();
        for c in chunks {
            pending.extend_from_slice(&c);
            match h.c.handle_bytes(h.now, &pending) {
                Ok(n) => { pending.drain(..n); }
                Err(_) => break,
            }
            while let Some(ev) = h.c.poll_event() {
                if let Event::Execute { itt, .. } = ev {
                    h.c.handle_outcome(itt, good(vec![0; 16]));
                }
            }
            let mut sink = Vec::new();
            h.c.poll_transmit(&mut sink);
            prop_assert!(pending.len() < 48 + 1020 + 8 + 262_144 + 400);
        }
    }

    /// Any bytes before login: a login failure or a close; never a panic.
    #[test]
    fn random_login_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let mut h = H::new(None);
        let _ = h.c.handle_bytes(h.now, &bytes);
        let mut sink = Vec::new();
        h.c.poll_transmit(&mut sink);
    }
}

/// Write buffers are bounded per connection: beyond the budget, R2Ts wait until earlier writes
/// leave, instead of allocating for every command in the window.
#[test]
fn write_buffer_budget_holds_back_r2ts() {
    let mut h = H::new(None);
    h.login(&[
        ("InitialR2T", "Yes"),
        ("MaxBurstLength", "1048576"),
        ("MaxOutstandingR2T", "1"),
    ]);
    h.events();
    let edtl = 16 << 20;
    for itt in 1..=5 {
        h.scsi(itt, 0x2a, edtl, true, true, &[]);
    }
    let r2t_itts: Vec<u32> = h
        .out()
        .into_iter()
        .filter_map(|(b, _)| match b {
            Bhs::R2t(r) => Some(r.itt),
            _ => None,
        })
        .collect();
    assert_eq!(
        r2t_itts,
        vec![1, 2, 3, 4],
        "64 MiB budget: the fifth 16 MiB write waits"
    );
    // Abort the first (still receiving): its budget goes to the fifth.
    let tmf = Bhs::TaskMgmtRequest(TaskMgmtRequest {
        immediate: true,
        function: 1,
        lun: 0,
        itt: 99,
        rtt: 1,
        cmd_sn: h.cmd_sn,
        exp_stat_sn: 0,
        ref_cmd_sn: h.cmd_sn - 5,
        exp_data_sn: 0,
    });
    h.feed(&tmf, &[]).unwrap();
    let out = h.out();
    assert!(
        out.iter()
            .any(|(b, _)| matches!(b, Bhs::R2t(r) if r.itt == 5)),
        "{out:?}"
    );
    assert!(out
        .iter()
        .any(|(b, _)| matches!(b, Bhs::TaskMgmtResponse(r) if r.itt == 99)));
}

/// Session limits are checked before login completes: over the limit, status 0x0302; a
/// closed session gives its slot back.
#[test]
fn session_limits_refuse_logins_beyond_the_bound() {
    let base = cfg(None);
    let shared = Arc::new(FabricConfig {
        targets: vec![TargetInfo {
            name: TARGET.into(),
            alias: None,
            chap: None,
            allowed_initiators: None,
            portals: vec![Portal {
                address: "127.0.0.1:3260".into(),
                tpgt: 1,
            }],
            device: Arc::clone(&base.targets[0].device),
        }],
        discovery_chap: None,
        tpgt: 1,
        relative_port: 1,
        timers: base.timers,
        limits: iscsi_target::SessionLimits::new(10, 2),
        chap_challenges: Default::default(),
    });
    let now = Instant::now();
    let login = |tsih: u16| {
        let mut h = H {
            c: Connection::new(Arc::clone(&shared), tsih, now),
            now,
            digests: Digests::default(),
            cmd_sn: 1,
        };
        h.feed(
            &h.login_pdu(1, 3, true),
            &kv(&[("InitiatorName", "iqn.x:i"), ("TargetName", TARGET)]),
        )
        .unwrap();
        let out = h.out();
        let (Bhs::LoginResponse(r), _) = &out[0] else {
            panic!("{out:?}")
        };
        ((r.status_class, r.status_detail), h)
    };
    let (s1, h1) = login(1);
    let (s2, _h2) = login(2);
    let (s3, _h3) = login(3);
    assert_eq!((s1, s2), ((0, 0), (0, 0)));
    assert_eq!(
        s3,
        (3, 2),
        "third session of one initiator: out of resources"
    );
    drop(h1);
    let (s4, _h4) = login(4);
    assert_eq!(s4, (0, 0), "the closed session's slot is free again");
}
