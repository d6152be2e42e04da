//! Peer-transport bytes: a stream of frames and the request/reply bodies inside them. Nothing
//! may panic, a frame is never accepted past the payload limit, and whatever decodes
//! re-encodes to the same bytes, whole or as head and bulk.
#![no_main]

use appliance::peer::wire::{self, Envelope, Frame, Kind, Reply, Request, Sum};
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
        // How the frame re-sealed as head and bulk must address itself.
        let env = Envelope {
            sender: f.sender,
            epoch: f.epoch,
            request_id: f.request_id,
            sum: Sum::Crc32c,
        };
        if f.kind & wire::REPLY == 0 {
            if let Ok(req) = Request::decode(f.kind, &f.payload) {
                let (kind, body) = req.encode();
                assert_eq!(kind as u8, f.kind);
                assert_eq!(Request::decode(f.kind, &body).as_ref(), Ok(&req));
                // Sent as head and bulk: the frame's own bytes again.
                let (_, out) = req.into_frame(env);
                assert_eq!([out.head, out.bulk].concat(), &rest[..n]);
            }
        } else if let (Some(kind), Ok(Ok(r))) = (
            Kind::from_u8(f.kind & !wire::REPLY),
            wire::get_status(&f.payload),
        ) {
            if let Ok(reply) = Reply::decode(kind, r) {
                // Sent as head and bulk: the same bytes as encoded in place.
                let mut whole = wire::frame_start();
                reply.encode_into(&mut whole);
                wire::seal_frame(
                    &mut whole,
                    f.kind,
                    f.sender,
                    f.epoch,
                    f.request_id,
                    Sum::Crc32c,
                );
                let out = reply.into_frame(f.kind, env);
                assert_eq!([out.head, out.bulk].concat(), whole);
            }
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
