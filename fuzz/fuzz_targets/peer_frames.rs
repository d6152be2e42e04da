//! Peer-transport bytes: a stream of frames and the request/reply bodies inside them. Nothing
//! may panic, a frame is never accepted past the payload limit, and whatever decodes
//! re-encodes to the same bytes.
#![no_main]

use appliance::peer::wire::{self, Frame, Kind, Reply, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // As a TLS link's reader takes them: a frame without its own payload CRC is accepted
    // (the link vouched for it), still within the limit.
    if let Some(h) = data.first_chunk::<{ wire::HEADER_LEN }>() {
        if let Ok(head) = wire::decode_head(h, true) {
            let end = (wire::HEADER_LEN + head.payload_len()).min(data.len());
            if let Ok(f) = head.with_payload(data[wire::HEADER_LEN..end].to_vec()) {
                assert!(f.payload.len() <= wire::MAX_PAYLOAD);
            }
        }
    }
    let mut rest = data;
    while let Ok(Some((f, n))) = wire::decode_frame(rest) {
        assert!(f.payload.len() <= wire::MAX_PAYLOAD);
        let mut again = Vec::new();
        wire::encode_frame(&f, &mut again);
        assert_eq!(&again[..], &rest[..n]);
        if f.kind & wire::REPLY == 0 {
            if let Ok(req) = Request::decode(f.kind, &f.payload) {
                let (kind, body) = req.encode();
                assert_eq!(kind as u8, f.kind);
                assert_eq!(Request::decode(f.kind, &body).as_ref(), Ok(&req));
            }
        } else if let (Some(kind), Ok(Ok(r))) = (
            Kind::from_u8(f.kind & !wire::REPLY),
            wire::get_status(&f.payload),
        ) {
            let _ = Reply::decode(kind, r);
        }
        rest = &rest[n..];
        let _ = Frame::clone(&f);
    }
    // Bodies on their own (checksums would otherwise keep the fuzzer out), under every kind,
    // as requests and as replies, and wrapped in a valid frame.
    for k in 0..=9u8 {
        let _ = Request::decode(k, data);
        if let (Some(kind), Ok(Ok(r))) = (Kind::from_u8(k), wire::get_status(data)) {
            let _ = Reply::decode(kind, r);
        }
    }
    if data.len() <= wire::MAX_PAYLOAD && !data.is_empty() {
        let mut framed = Vec::new();
        let f = Frame {
            kind: data[0],
            sender: 1,
            epoch: 2,
            request_id: 3,
            payload: data[1..].to_vec(),
        };
        wire::encode_frame(&f, &mut framed);
        let (back, n) = wire::decode_frame(&framed)
            .expect("valid frame")
            .expect("complete frame");
        assert_eq!((back, n), (f, framed.len()));
    }
});
