//! Peer-transport bytes: a stream of frames and the request/reply bodies inside them. Nothing
//! may panic, a frame is never accepted past the payload limit, whatever decodes re-encodes to
//! the same bytes, whole or as head and bulk, and a body read with its bulk apart decodes to
//! the same message as the body whole, or not at all.
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
                assert!(f.payload.len() + f.bulk.len() <= wire::MAX_PAYLOAD);
                assert_eq!(f.bulk.len(), head.bulk_len());
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
                let (_, out) = req.clone().into_frame(env);
                assert_eq!([out.head, out.bulk].concat(), &rest[..n]);
                // Over a TLS link the bulk is read apart: the same request.
                let (_, out) = req.clone().into_frame(Envelope { sum: Sum::Link, ..env });
                let back = over_link(&[out.head, out.bulk].concat());
                assert_eq!(Request::decode_parts(back.kind, &back.payload, back.bulk), Ok(req));
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
                let out = reply.clone().into_frame(f.kind, env);
                assert_eq!([out.head, out.bulk].concat(), whole);
                let out = reply.clone().into_frame(f.kind, Envelope { sum: Sum::Link, ..env });
                let back = over_link(&[out.head, out.bulk].concat());
                assert_eq!(wire::decode_reply(kind, back), Ok(Ok(reply)));
            }
        }
        rest = &rest[n..];
        let _ = Frame::clone(&f);
    }
    // Bodies on their own (checksums would otherwise keep the fuzzer out), under every kind,
    // as requests and as replies, and wrapped in a valid frame.
    // The first byte picks where the bulk starts.
    let split = data.first().map_or(0, |&b| usize::from(b) % data.len().max(1));
    let (front, back) = data.split_at(split);
    for k in 0..=10u8 {
        let whole = Request::decode(k, data);
        if let Ok(parts) = Request::decode_parts(k, front, back.to_vec()) {
            assert_eq!(whole, Ok(parts));
        }
        if let Some(kind) = Kind::from_u8(k) {
            let whole = wire::get_status(data).map(|s| s.map(|r| Reply::decode(kind, r)));
            let f = Frame {
                kind: k | wire::REPLY,
                sender: 1,
                epoch: 2,
                request_id: 3,
                payload: front.to_vec(),
                bulk: back.to_vec(),
            };
            match wire::decode_reply(kind, f) {
                Ok(Ok(reply)) => assert_eq!(whole, Ok(Ok(Ok(reply)))),
                Ok(Err(e)) => assert_eq!(whole, Ok(Err(e))),
                Err(_) => {}
            }
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
            bulk: Vec::new(),
        };
        wire::encode_frame(&f, &mut framed);
        let (back, n) = wire::decode_frame(&framed)
            .expect("valid frame")
            .expect("complete frame");
        assert_eq!((back, n), (f, framed.len()));
    }
});

/// A sealed frame read as a TLS link's reader takes it (body and bulk apart).
fn over_link(bytes: &[u8]) -> Frame {
    wire::decode_frame_on(bytes, true)
        .expect("a sealed frame")
        .expect("a whole frame")
        .0
}
