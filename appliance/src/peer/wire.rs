//! The peer protocol's bytes: frames and the messages inside them (sans-IO).
//!
//! Every frame is a 40-byte header followed by a payload:
//!
//! | bytes | field |
//! | --- | --- |
//! | 0-3 | magic `RNPF` |
//! | 4 | protocol version (4) |
//! | 5 | kind (request kinds below; a reply sets bit 7) |
//! | 6-7 | flags: bit 0 [`FLAG_LINK_SUM`], the others 0 |
//! | 8-11 | sender controller id |
//! | 12-19 | sender's epoch |
//! | 20-27 | request id (a reply echoes it) |
//! | 28-31 | payload length |
//! | 32-35 | CRC32C of the payload; with [`FLAG_LINK_SUM`], the length of its bulk (0: none) |
//! | 36-39 | CRC32C of bytes 0-35 |
//!
//! Integers are big-endian. Invariants:
//! - [`decode_head`] (and [`decode_frame`] through it) decides from the 40-byte header alone whether a frame is acceptable (magic,
//!   version, header CRC, payload length at most [`MAX_PAYLOAD`]), so a hostile peer cannot make
//!   it buffer more than one bounded frame; it never panics on any input (fuzzed).
//! - A payload whose CRC does not match is refused before it is parsed. A payload is left
//!   without its own CRC ([`Sum::Link`]) only on a TLS link, whose AEAD tag already
//!   authenticates every byte; [`decode_head`] refuses such a frame on a link that does not
//!   authenticate, so no frame is ever taken unchecked.
//! - Every message parser checks every length against what remains and against its own limit.
//! - A frame's *bulk* is the bytes of its message's last field (a chunk's data, a forwarded
//!   write, a read's answer). The sender moves it behind the header instead of copying it
//!   ([`Outgoing`]); on a TLS link the header names its length, so the reader takes it into a
//!   buffer of its own ([`Frame::bulk`]) and the message decoder hands that buffer on as the
//!   field's value, uncopied. A bulk the body does not end with, to the byte, is malformed
//!   ([`Reader::end`]). Controllers from before the length was named wrote 0 there and ignore
//!   it, so both read each other's frames.

use raid_engine::cluster::{ReadAnswer, ReadLease, ReadPart};
use raid_engine::shard::{Chunk, ChunkAddr, Patch, PatchOp, RangeRead, Want};

/// Frame header size.
pub const HEADER_LEN: usize = 40;
/// Largest payload accepted: a 1 MiB chunk or forwarded write plus room for headers.
pub const MAX_PAYLOAD: usize = (4 << 20) + 4096;
const MAGIC: [u8; 4] = *b"RNPF";
/// 2: ranged chunk reads, patches and located reads (kinds 7, 8 and 9). 3: payloads on TLS
/// links carry no CRC of their own ([`FLAG_LINK_SUM`]). 4: read leases (a located answer may
/// carry one; kind 10 revokes them).
const VERSION: u8 = 4;
/// Header flag: the payload has no CRC of its own; the link (TLS) authenticates it.
pub const FLAG_LINK_SUM: u16 = 1;

/// What vouches for a frame's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sum {
    /// Its CRC32C in the header (plain links).
    Crc32c,
    /// The link: TLS's AEAD tag authenticates every record, so a CRC of the same bytes
    /// would be a second pass over them that catches nothing more (measured at 4% of a
    /// cluster's 64 KiB read CPU).
    Link,
}
/// Who sends a frame, in which epoch, for which request, and what vouches for its payload:
/// everything in a header but the kind and the length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope {
    /// The sender's controller id.
    pub sender: u32,
    /// The sender's epoch.
    pub epoch: u64,
    /// The request id (a reply echoes its request's).
    pub request_id: u64,
    /// What vouches for the payload.
    pub sum: Sum,
}

/// Reply bit of [`Frame::kind`].
pub const REPLY: u8 = 0x80;
const MAX_COLS: usize = raid_engine::codec::SHARDS_MAX;
const MAX_TEXT: usize = 1024;
/// Most parts in a located read (a 4 MiB read in 4 KiB chunks is 1024).
const MAX_PARTS: usize = 4096;
/// Most rows one read lease may name.
const MAX_LEASE_ROWS: usize = 4096;

/// Request kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Read every copy of a chunk.
    ReadChunk = 1,
    /// Write a chunk.
    WriteChunk = 2,
    /// A host write for the extent's primary.
    ForwardWrite = 3,
    /// A host read for the extent's primary.
    ForwardRead = 4,
    /// Liveness; answered with an empty reply.
    Heartbeat = 5,
    /// Metadata log traffic: a Raft RPC or a command for the leader (see [`MetaOp`]).
    Meta = 6,
    /// Read part of the copies of a chunk.
    ReadRange = 7,
    /// Make a new copy of a chunk from one the holder has.
    PatchChunk = 8,
    /// A host read for the primary, which may answer with where the bytes are.
    ForwardLocate = 9,
    /// The primary asks a lessee to drop its read leases on an extent.
    RevokeLeases = 10,
}

/// What a [`Kind::Meta`] request carries (its body is JSON, produced and checked by openraft's
/// serde types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MetaOp {
    /// Raft AppendEntries.
    Append = 1,
    /// Raft RequestVote.
    Vote = 2,
    /// Raft InstallSnapshot.
    Snapshot = 3,
    /// A command for the log, sent to the leader by a follower.
    Write = 4,
    /// The controller's view of the cluster, for `appliance status` (JSON reply).
    Status = 5,
    /// The highest log index whose reservation state the controller has installed in its
    /// logical units (JSON number reply).
    Installed = 6,
}

impl MetaOp {
    /// From the wire.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Append,
            2 => Self::Vote,
            3 => Self::Snapshot,
            4 => Self::Write,
            5 => Self::Status,
            6 => Self::Installed,
            _ => return None,
        })
    }
}

impl Kind {
    /// From the wire (without the reply bit).
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::ReadChunk,
            2 => Self::WriteChunk,
            3 => Self::ForwardWrite,
            4 => Self::ForwardRead,
            5 => Self::Heartbeat,
            6 => Self::Meta,
            7 => Self::ReadRange,
            8 => Self::PatchChunk,
            9 => Self::ForwardLocate,
            10 => Self::RevokeLeases,
            _ => return None,
        })
    }
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Kind byte (reply bit included).
    pub kind: u8,
    /// Sender's controller id.
    pub sender: u32,
    /// Sender's epoch.
    pub epoch: u64,
    /// Request id.
    pub request_id: u64,
    /// Payload (without its bulk, when the reader took one).
    pub payload: Vec<u8>,
    /// The payload's last bytes, in a buffer of their own: the value of the message's last
    /// field, which the header named (empty when it named none).
    pub bulk: Vec<u8>,
}

/// Why bytes from a peer were refused. The connection is closed on any of them: a peer that
/// sends a bad frame is out of sync or hostile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Not our protocol.
    #[error("bad magic {0:02x?}: the peer is not an appliance controller (check peer addresses in the config)")]
    Magic([u8; 4]),
    /// Another protocol version.
    #[error(
        "peer speaks protocol version {0}, this controller {VERSION}: upgrade the older controller"
    )]
    Version(u8),
    /// Header CRC mismatch.
    #[error("frame header checksum mismatch (corruption on the link)")]
    HeaderCrc,
    /// Payload CRC mismatch.
    #[error("frame payload checksum mismatch (corruption on the link)")]
    PayloadCrc,
    /// Payload over the limit.
    #[error("frame payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge(u32),
    /// A message body that does not parse.
    #[error("malformed {0} message")]
    Malformed(&'static str),
    /// A frame without a payload CRC on a link that does not authenticate its bytes.
    #[error("frame without a payload checksum on a link without TLS: peer TLS must be on at both ends or at neither (cluster.tls)")]
    Unchecked,
    /// Header flags this version does not know.
    #[error("unknown frame flags {0:#06x}: upgrade this controller")]
    Flags(u16),
}

/// Appends the encoding of a frame to `out`.
///
/// # Panics
/// If the payload exceeds [`MAX_PAYLOAD`] (a bug in the caller).
pub fn encode_frame(f: &Frame, out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + HEADER_LEN, 0);
    out.extend_from_slice(&f.payload);
    out.extend_from_slice(&f.bulk);
    seal_frame(
        &mut out[start..],
        f.kind,
        f.sender,
        f.epoch,
        f.request_id,
        Sum::Crc32c,
    );
}

/// An empty frame: room for the header, which [`seal_frame`] fills once the payload has been
/// appended (so a body is encoded once, in place, not copied behind a header).
#[must_use]
pub fn frame_start() -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN + 64);
    v.resize(HEADER_LEN, 0);
    v
}

/// Fills the header of the frame in `frame` (header room, then the payload); `sum` says what
/// vouches for the payload ([`Sum::Link`] only on a TLS link).
///
/// # Panics
/// If `frame` is shorter than a header or its payload exceeds [`MAX_PAYLOAD`] (a bug in the
/// caller).
pub fn seal_frame(frame: &mut [u8], kind: u8, sender: u32, epoch: u64, request_id: u64, sum: Sum) {
    let env = Envelope {
        sender,
        epoch,
        request_id,
        sum,
    };
    seal_parts(frame, &[], kind, env);
}

/// [`seal_frame`] for a frame whose payload is `frame`'s bytes after the header followed by
/// `bulk`.
fn seal_parts(frame: &mut [u8], bulk: &[u8], kind: u8, env: Envelope) {
    let Envelope {
        sender,
        epoch,
        request_id,
        sum,
    } = env;
    let (h, payload) = frame.split_at_mut(HEADER_LEN);
    let len = payload.len() + bulk.len();
    assert!(len <= MAX_PAYLOAD, "payload over the limit");
    h[0..4].copy_from_slice(&MAGIC);
    h[4] = VERSION;
    h[5] = kind;
    let (flags, crc) = match sum {
        Sum::Crc32c => (0, crc32c::crc32c_append(crc32c::crc32c(payload), bulk)),
        Sum::Link => (FLAG_LINK_SUM, bulk.len() as u32),
    };
    h[6..8].copy_from_slice(&flags.to_be_bytes());
    h[8..12].copy_from_slice(&sender.to_be_bytes());
    h[12..20].copy_from_slice(&epoch.to_be_bytes());
    h[20..28].copy_from_slice(&request_id.to_be_bytes());
    h[28..32].copy_from_slice(&(len as u32).to_be_bytes());
    h[32..36].copy_from_slice(&crc.to_be_bytes());
    let hcrc = crc32c::crc32c(&h[..36]);
    h[36..40].copy_from_slice(&hcrc.to_be_bytes());
}

/// A sealed frame to send: `head` then `bulk` on the wire. `bulk` holds the bytes of the
/// message's last field when there are at least [`BULK_MIN`] of them (a chunk's data, a
/// forwarded write's data, a read's answer), moved out of the message instead of copied behind
/// the header; otherwise it is empty and `head` is the whole frame.
#[derive(Debug)]
pub struct Outgoing {
    /// Header and body up to (and including the length of) the bulk field.
    pub head: Vec<u8>,
    /// The bulk field's bytes.
    pub bulk: Vec<u8>,
}

/// A last field shorter than this is copied into the frame's head: under TLS each of head and
/// bulk becomes its own record(s), which costs more than copying a few KiB.
pub const BULK_MIN: usize = 16 << 10;

impl Outgoing {
    /// The frame's length on the wire.
    #[must_use]
    pub fn len(&self) -> usize {
        self.head.len() + self.bulk.len()
    }

    /// Whether the frame is empty (never, once sealed).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Seals `head` (header room, then a body whose last field, the bulk field, was encoded
    /// empty: its 4-byte length of 0 ends `head`) with `bulk` as that field's bytes.
    fn seal(mut head: Vec<u8>, bulk: Vec<u8>, kind: u8, env: Envelope) -> Self {
        if !bulk.is_empty() {
            let at = head.len() - 4;
            debug_assert_eq!(head[at..], [0; 4], "the bulk field ends the body");
            head[at..].copy_from_slice(&(bulk.len() as u32).to_be_bytes());
        }
        seal_parts(&mut head, &bulk, kind, env);
        Self { head, bulk }
    }
}

/// Takes `field` out when it is long enough to go as a frame's bulk.
fn take_bulk(field: &mut Vec<u8>, min: usize) -> Vec<u8> {
    if field.len() >= min {
        std::mem::take(field)
    } else {
        Vec::new()
    }
}

/// A frame header that passed every check [`decode_head`] makes; the payload's checksum is
/// checked by [`FrameHead::with_payload`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead {
    kind: u8,
    sender: u32,
    epoch: u64,
    request_id: u64,
    len: usize,
    /// `None`: the link vouches for the payload ([`FLAG_LINK_SUM`]).
    payload_crc: Option<u32>,
    /// How many of the payload's last bytes are its bulk (0 unless the link vouches).
    bulk: usize,
}

impl FrameHead {
    /// Payload length, at most [`MAX_PAYLOAD`].
    #[must_use]
    pub fn payload_len(&self) -> usize {
        self.len
    }

    /// How many of the payload's last bytes the sender named as its bulk, to be read into a
    /// buffer of their own (at most [`FrameHead::payload_len`]).
    #[must_use]
    pub fn bulk_len(&self) -> usize {
        self.bulk
    }

    /// The frame, once `payload` (exactly [`FrameHead::payload_len`] bytes) matches the
    /// header's checksum (when the header has one; see [`decode_head`]).
    ///
    /// # Errors
    /// [`WireError::PayloadCrc`], or [`WireError::Malformed`] for a payload of another length.
    pub fn with_payload(self, mut payload: Vec<u8>) -> Result<Frame, WireError> {
        if payload.len() != self.len {
            return Err(WireError::Malformed("frame payload length"));
        }
        let bulk = payload.split_off(self.len - self.bulk);
        self.with_parts(payload, bulk)
    }

    /// [`FrameHead::with_payload`] for a payload read as its body (the first
    /// `payload_len - bulk_len` bytes) and its bulk (the rest), each in its own buffer.
    ///
    /// # Errors
    /// As [`FrameHead::with_payload`], and for parts of other lengths.
    pub fn with_parts(self, payload: Vec<u8>, bulk: Vec<u8>) -> Result<Frame, WireError> {
        if bulk.len() != self.bulk || payload.len() + bulk.len() != self.len {
            return Err(WireError::Malformed("frame payload length"));
        }
        if self
            .payload_crc
            .is_some_and(|crc| crc32c::crc32c(&payload) != crc)
        {
            return Err(WireError::PayloadCrc);
        }
        Ok(Frame {
            kind: self.kind,
            sender: self.sender,
            epoch: self.epoch,
            request_id: self.request_id,
            payload,
            bulk,
        })
    }
}

/// Checks a frame's 40-byte header alone (magic, version, header checksum, flags, payload
/// length bound), so a reader knows how many payload bytes to take before it takes any.
/// `link_authenticates` says whether the link checks every byte itself (TLS); a frame without
/// its own payload CRC is refused on any other link.
///
/// # Errors
/// [`WireError`] for a header that is not acceptable.
pub fn decode_head(h: &[u8; HEADER_LEN], link_authenticates: bool) -> Result<FrameHead, WireError> {
    let magic: [u8; 4] = h[0..4].try_into().expect("4 bytes");
    if magic != MAGIC {
        return Err(WireError::Magic(magic));
    }
    if h[4] != VERSION {
        return Err(WireError::Version(h[4]));
    }
    if crc32c::crc32c(&h[..36]) != be32(&h[36..40]) {
        return Err(WireError::HeaderCrc);
    }
    let flags = u16::from_be_bytes([h[6], h[7]]);
    if flags & !FLAG_LINK_SUM != 0 {
        return Err(WireError::Flags(flags));
    }
    let by_link = flags & FLAG_LINK_SUM != 0;
    if by_link && !link_authenticates {
        return Err(WireError::Unchecked);
    }
    let len = be32(&h[28..32]);
    if len as usize > MAX_PAYLOAD {
        return Err(WireError::TooLarge(len));
    }
    let bulk = if by_link { be32(&h[32..36]) } else { 0 };
    if bulk > len {
        return Err(WireError::Malformed("frame bulk length"));
    }
    Ok(FrameHead {
        kind: h[5],
        sender: be32(&h[8..12]),
        epoch: be64(&h[12..20]),
        request_id: be64(&h[20..28]),
        len: len as usize,
        payload_crc: (!by_link).then(|| be32(&h[32..36])),
        bulk: bulk as usize,
    })
}

/// Decodes one frame from the front of `buf`: `Ok(Some((frame, consumed)))`, `Ok(None)` when
/// more bytes are needed, or the reason the stream is unusable. The bytes are taken as from a
/// link that does not authenticate (every payload must carry its CRC).
///
/// # Errors
/// [`WireError`] for anything but a well-formed frame.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Frame, usize)>, WireError> {
    decode_frame_on(buf, false)
}

/// [`decode_frame`] as a link that does (`link_authenticates`, TLS) or does not authenticate
/// its bytes takes them: on a TLS link a payload may go without its CRC, and the bulk its
/// header names comes apart from the body ([`Frame::bulk`]), as the transport reads it.
///
/// # Errors
/// [`WireError`] for anything but a well-formed frame.
pub fn decode_frame_on(
    buf: &[u8],
    link_authenticates: bool,
) -> Result<Option<(Frame, usize)>, WireError> {
    let Some(h) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let head = decode_head(h, link_authenticates)?;
    let total = HEADER_LEN + head.len;
    if buf.len() < total {
        return Ok(None);
    }
    let frame = head.with_payload(buf[HEADER_LEN..total].to_vec())?;
    Ok(Some((frame, total)))
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

/// A bounds-checked reader over a message body, and its frame's bulk (see the module doc).
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
    /// The frame's bulk until the body's last field takes it.
    bulk: Option<Vec<u8>>,
}

impl<'a> Reader<'a> {
    /// Reads `buf`, naming `what` in errors.
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self {
            buf,
            what,
            bulk: None,
        }
    }
    /// The body's last field is `bulk`, held apart from the body (an empty one is none).
    #[must_use]
    pub fn with_bulk(mut self, bulk: Vec<u8>) -> Self {
        self.bulk = (!bulk.is_empty()).then_some(bulk);
        self
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Malformed(self.what));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    /// One byte.
    pub fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    /// Big-endian u32.
    pub fn u32(&mut self) -> Result<u32, WireError> {
        Ok(be32(self.take(4)?))
    }
    /// Big-endian u64.
    pub fn u64(&mut self) -> Result<u64, WireError> {
        Ok(be64(self.take(8)?))
    }
    /// A u32-length-prefixed byte string of at most `max` bytes.
    pub fn bytes(&mut self, max: usize) -> Result<&'a [u8], WireError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(WireError::Malformed(self.what));
        }
        self.take(n)
    }
    /// [`Reader::bytes`] as an owned vector: the frame's bulk itself when this field is the
    /// body's last and the bulk is exactly its length, else a copy of the bytes in the body.
    pub fn bytes_vec(&mut self, max: usize) -> Result<Vec<u8>, WireError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(WireError::Malformed(self.what));
        }
        if self.buf.is_empty() {
            if let Some(b) = self.bulk.take_if(|b| b.len() == n) {
                return Ok(b);
            }
        }
        Ok(self.take(n)?.to_vec())
    }
    /// Fails unless everything was consumed, the bulk included.
    pub fn end(&self) -> Result<(), WireError> {
        if self.buf.is_empty() && self.bulk.is_none() {
            Ok(())
        } else {
            Err(WireError::Malformed(self.what))
        }
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

/// Encodes a chunk address.
pub fn put_addr(out: &mut Vec<u8>, a: &ChunkAddr) {
    out.extend_from_slice(&a.volume.to_be_bytes());
    out.extend_from_slice(&a.extent.to_be_bytes());
    out.extend_from_slice(&a.row.to_be_bytes());
    out.push(a.pos);
}

/// Decodes a chunk address.
///
/// # Errors
/// [`WireError::Malformed`].
pub fn get_addr(r: &mut Reader<'_>) -> Result<ChunkAddr, WireError> {
    Ok(ChunkAddr {
        volume: r.u32()?,
        extent: r.u64()?,
        row: r.u32()?,
        pos: r.u8()?,
    })
}

/// Encodes a chunk.
pub fn put_chunk(out: &mut Vec<u8>, c: &Chunk) {
    out.extend_from_slice(&c.version.to_be_bytes());
    out.extend_from_slice(&c.acked.to_be_bytes());
    out.push(c.cols.len() as u8);
    for v in &c.cols {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.push(c.acked_cols.len() as u8);
    for v in &c.acked_cols {
        out.extend_from_slice(&v.to_be_bytes());
    }
    put_bytes(out, &c.data);
}

/// Decodes a chunk.
///
/// # Errors
/// [`WireError::Malformed`].
pub fn get_chunk(r: &mut Reader<'_>) -> Result<Chunk, WireError> {
    let version = r.u64()?;
    let acked = r.u64()?;
    let n = r.u8()? as usize;
    if n > MAX_COLS {
        return Err(WireError::Malformed("chunk"));
    }
    let cols = (0..n).map(|_| r.u64()).collect::<Result<_, _>>()?;
    let na = r.u8()? as usize;
    if na > MAX_COLS {
        return Err(WireError::Malformed("chunk"));
    }
    let acked_cols = (0..na).map(|_| r.u64()).collect::<Result<_, _>>()?;
    let data = r.bytes_vec(MAX_PAYLOAD)?;
    Ok(Chunk {
        version,
        cols,
        acked,
        acked_cols,
        data,
    })
}

fn put_want(out: &mut Vec<u8>, w: &Want) {
    match w {
        Want::Any => out.push(0),
        Want::Zero => out.push(1),
        Want::Version(v) => {
            out.push(2);
            out.extend_from_slice(&v.to_be_bytes());
        }
        Want::Cols(cols) => {
            out.push(3);
            out.push(cols.len() as u8);
            for v in cols {
                out.extend_from_slice(&v.to_be_bytes());
            }
        }
    }
}

fn get_want(r: &mut Reader<'_>) -> Result<Want, WireError> {
    Ok(match r.u8()? {
        0 => Want::Any,
        1 => Want::Zero,
        2 => Want::Version(r.u64()?),
        3 => {
            let n = r.u8()? as usize;
            if n > MAX_COLS {
                return Err(WireError::Malformed("wanted copy"));
            }
            Want::Cols((0..n).map(|_| r.u64()).collect::<Result<_, _>>()?)
        }
        _ => return Err(WireError::Malformed("wanted copy")),
    })
}

/// A read lease: rows of an extent with the copy of each data column (a version, or zeros).
fn put_lease(out: &mut Vec<u8>, l: &ReadLease) {
    out.extend_from_slice(&l.extent.to_be_bytes());
    out.extend_from_slice(&l.ttl_ms.to_be_bytes());
    out.extend_from_slice(&(l.rows.len() as u32).to_be_bytes());
    for (row, wants) in &l.rows {
        out.extend_from_slice(&row.to_be_bytes());
        out.push(wants.len() as u8);
        for w in wants {
            put_want(out, w);
        }
    }
}

/// Parses what [`put_lease`] wrote.
fn get_lease(r: &mut Reader<'_>) -> Result<ReadLease, WireError> {
    let bad = WireError::Malformed("read lease");
    let extent = r.u64()?;
    let ttl_ms = r.u32()?;
    let n = r.u32()? as usize;
    if n > MAX_LEASE_ROWS {
        return Err(bad);
    }
    let mut rows = Vec::with_capacity(n);
    for _ in 0..n {
        let row = r.u32()?;
        let cols = r.u8()? as usize;
        if cols == 0 || cols > MAX_COLS {
            return Err(bad);
        }
        let wants = (0..cols)
            .map(|_| match get_want(r)? {
                w @ (Want::Zero | Want::Version(_)) => Ok(w),
                _ => Err(WireError::Malformed("read lease")),
            })
            .collect::<Result<Vec<_>, _>>()?;
        rows.push((row, wants));
    }
    Ok(ReadLease {
        extent,
        ttl_ms,
        rows,
    })
}

/// Error answers a peer can give, carried in a reply with status 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemoteError {
    /// The request's epoch is older than one the peer has seen.
    #[error("stale epoch {theirs}: peer has seen epoch {ours}")]
    StaleEpoch {
        /// Peer's epoch.
        ours: u64,
        /// Request's epoch.
        theirs: u64,
    },
    /// The peer is not the extent's primary in its view.
    #[error("peer is not the primary of extent {0}")]
    NotPrimary(u64),
    /// The peer's view has another epoch.
    #[error("epoch mismatch: request {theirs}, peer {ours}")]
    Epoch {
        /// Peer's epoch.
        ours: u64,
        /// Request's.
        theirs: u64,
    },
    /// The peer may not serve I/O now.
    #[error("peer is fenced")]
    Fenced,
    /// Anything else, with the peer's message.
    #[error("{0}")]
    Other(String),
}

/// Encodes an error reply body (status byte included).
pub fn put_error(out: &mut Vec<u8>, e: &RemoteError) {
    out.push(1);
    match e {
        RemoteError::StaleEpoch { ours, theirs } => {
            out.push(1);
            out.extend_from_slice(&ours.to_be_bytes());
            out.extend_from_slice(&theirs.to_be_bytes());
        }
        RemoteError::NotPrimary(x) => {
            out.push(2);
            out.extend_from_slice(&x.to_be_bytes());
        }
        RemoteError::Epoch { ours, theirs } => {
            out.push(3);
            out.extend_from_slice(&ours.to_be_bytes());
            out.extend_from_slice(&theirs.to_be_bytes());
        }
        RemoteError::Fenced => out.push(4),
        RemoteError::Other(s) => {
            out.push(5);
            let b = s.as_bytes();
            put_bytes(out, &b[..b.len().min(MAX_TEXT)]);
        }
    }
}

/// Splits a reply body into its success body or the peer's error.
///
/// # Errors
/// [`WireError::Malformed`] when the body does not parse.
pub fn get_status<'a>(body: &'a [u8]) -> Result<Result<Reader<'a>, RemoteError>, WireError> {
    let mut r = Reader::new(body, "reply");
    match r.u8()? {
        0 => Ok(Ok(r)),
        1 => {
            let e = match r.u8()? {
                1 => RemoteError::StaleEpoch {
                    ours: r.u64()?,
                    theirs: r.u64()?,
                },
                2 => RemoteError::NotPrimary(r.u64()?),
                3 => RemoteError::Epoch {
                    ours: r.u64()?,
                    theirs: r.u64()?,
                },
                4 => RemoteError::Fenced,
                5 => RemoteError::Other(String::from_utf8_lossy(r.bytes(MAX_TEXT)?).into_owned()),
                _ => return Err(WireError::Malformed("error reply")),
            };
            r.end()?;
            Ok(Err(e))
        }
        _ => Err(WireError::Malformed("reply")),
    }
}

/// A decoded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Read every copy of a chunk.
    ReadChunk(ChunkAddr),
    /// Write a chunk.
    WriteChunk(ChunkAddr, Chunk),
    /// Read part of the copies of a chunk.
    ReadRange(ChunkAddr, RangeRead),
    /// Make a new copy of a chunk from one the holder has.
    PatchChunk(ChunkAddr, Patch),
    /// A host write for the primary.
    ForwardWrite {
        /// Volume.
        volume: u32,
        /// Byte offset.
        offset: u64,
        /// Data.
        data: Vec<u8>,
    },
    /// A host read for the primary.
    ForwardRead {
        /// Volume.
        volume: u32,
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// A host read for the primary, which may answer with where the bytes are.
    ForwardLocate {
        /// Volume.
        volume: u32,
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// Drop the read leases on an extent.
    RevokeLeases {
        /// Volume.
        volume: u32,
        /// Extent.
        extent: u64,
    },
    /// Liveness.
    Heartbeat,
    /// Metadata log traffic.
    Meta(MetaOp, Vec<u8>),
}

impl Request {
    /// Kind and body.
    pub fn encode(&self) -> (Kind, Vec<u8>) {
        let mut out = Vec::new();
        let kind = self.encode_into(&mut out);
        (kind, out)
    }

    /// The request as a sealed frame, its bulk data moved, not copied ([`Outgoing`]); and its
    /// kind.
    #[must_use]
    pub fn into_frame(self, env: Envelope) -> (Kind, Outgoing) {
        self.into_frame_with(BULK_MIN, env)
    }

    fn into_frame_with(mut self, bulk_min: usize, env: Envelope) -> (Kind, Outgoing) {
        // The fields taken are the last ones the encoding writes (see `encode_into`).
        let bulk = match &mut self {
            Self::WriteChunk(_, c) => take_bulk(&mut c.data, bulk_min),
            Self::PatchChunk(_, p) => take_bulk(&mut p.head.data, bulk_min),
            Self::ForwardWrite { data, .. } => take_bulk(data, bulk_min),
            _ => Vec::new(),
        };
        let mut head = frame_start();
        let kind = self.encode_into(&mut head);
        (kind, Outgoing::seal(head, bulk, kind as u8, env))
    }

    /// Appends the body to `out` (after a frame's header room, see [`frame_start`]); the kind.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Kind {
        match self {
            Self::ReadChunk(a) => {
                put_addr(out, a);
                Kind::ReadChunk
            }
            Self::WriteChunk(a, c) => {
                put_addr(out, a);
                put_chunk(out, c);
                Kind::WriteChunk
            }
            Self::ReadRange(a, rr) => {
                put_addr(out, a);
                put_want(out, &rr.want);
                out.extend_from_slice(&rr.off.to_be_bytes());
                out.extend_from_slice(&rr.len.to_be_bytes());
                Kind::ReadRange
            }
            Self::PatchChunk(a, p) => {
                put_addr(out, a);
                put_want(out, &p.base);
                out.extend_from_slice(&p.chunk_len.to_be_bytes());
                out.extend_from_slice(&p.off.to_be_bytes());
                out.push(match p.op {
                    PatchOp::Replace => 0,
                    PatchOp::Xor => 1,
                });
                put_chunk(out, &p.head);
                Kind::PatchChunk
            }
            Self::ForwardWrite {
                volume,
                offset,
                data,
            } => {
                out.extend_from_slice(&volume.to_be_bytes());
                out.extend_from_slice(&offset.to_be_bytes());
                put_bytes(out, data);
                Kind::ForwardWrite
            }
            Self::ForwardRead {
                volume,
                offset,
                len,
            }
            | Self::ForwardLocate {
                volume,
                offset,
                len,
            } => {
                out.extend_from_slice(&volume.to_be_bytes());
                out.extend_from_slice(&offset.to_be_bytes());
                out.extend_from_slice(&len.to_be_bytes());
                if matches!(self, Self::ForwardRead { .. }) {
                    Kind::ForwardRead
                } else {
                    Kind::ForwardLocate
                }
            }
            Self::RevokeLeases { volume, extent } => {
                out.extend_from_slice(&volume.to_be_bytes());
                out.extend_from_slice(&extent.to_be_bytes());
                Kind::RevokeLeases
            }
            Self::Heartbeat => Kind::Heartbeat,
            Self::Meta(op, body) => {
                out.push(*op as u8);
                put_bytes(out, body);
                Kind::Meta
            }
        }
    }

    /// Parses a request frame's kind and payload.
    ///
    /// # Errors
    /// [`WireError::Malformed`] for unknown kinds and bodies that do not parse exactly.
    pub fn decode(kind: u8, body: &[u8]) -> Result<Self, WireError> {
        Self::decode_parts(kind, body, Vec::new())
    }

    /// [`Request::decode`] of a frame whose bulk was read apart from its body
    /// ([`Frame::bulk`]); the bulk becomes the last field's value without a copy.
    ///
    /// # Errors
    /// As [`Request::decode`], and for a bulk the body does not end with.
    pub fn decode_parts(kind: u8, body: &[u8], bulk: Vec<u8>) -> Result<Self, WireError> {
        let kind = Kind::from_u8(kind).ok_or(WireError::Malformed("request kind"))?;
        let mut r = Reader::new(body, "request").with_bulk(bulk);
        let req = match kind {
            Kind::ReadChunk => Self::ReadChunk(get_addr(&mut r)?),
            Kind::WriteChunk => {
                let a = get_addr(&mut r)?;
                Self::WriteChunk(a, get_chunk(&mut r)?)
            }
            Kind::ReadRange => Self::ReadRange(
                get_addr(&mut r)?,
                RangeRead {
                    want: get_want(&mut r)?,
                    off: r.u32()?,
                    len: r.u32()?,
                },
            ),
            Kind::PatchChunk => {
                let a = get_addr(&mut r)?;
                let base = get_want(&mut r)?;
                let chunk_len = r.u32()?;
                let off = r.u32()?;
                let op = match r.u8()? {
                    0 => PatchOp::Replace,
                    1 => PatchOp::Xor,
                    _ => return Err(WireError::Malformed("patch op")),
                };
                let head = get_chunk(&mut r)?;
                Self::PatchChunk(
                    a,
                    Patch {
                        base,
                        chunk_len,
                        off,
                        op,
                        head,
                    },
                )
            }
            Kind::ForwardWrite => Self::ForwardWrite {
                volume: r.u32()?,
                offset: r.u64()?,
                data: r.bytes_vec(MAX_PAYLOAD)?,
            },
            Kind::ForwardRead | Kind::ForwardLocate => {
                let (volume, offset, len) = (r.u32()?, r.u64()?, r.u32()?);
                if kind == Kind::ForwardRead {
                    Self::ForwardRead {
                        volume,
                        offset,
                        len,
                    }
                } else {
                    Self::ForwardLocate {
                        volume,
                        offset,
                        len,
                    }
                }
            }
            Kind::RevokeLeases => Self::RevokeLeases {
                volume: r.u32()?,
                extent: r.u64()?,
            },
            Kind::Heartbeat => Self::Heartbeat,
            Kind::Meta => {
                let op = MetaOp::from_u8(r.u8()?).ok_or(WireError::Malformed("meta op"))?;
                Self::Meta(op, r.bytes_vec(MAX_PAYLOAD)?)
            }
        };
        r.end()?;
        Ok(req)
    }
}

/// A success reply body for each request kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Copies of a chunk (at most two).
    Copies(Vec<Chunk>),
    /// Done, nothing to return.
    Done,
    /// Data of a forwarded read; the bytes a patch replaced; a metadata reply.
    Data(Vec<u8>),
    /// A primary's answer to a located read.
    Answer(ReadAnswer),
}

impl Reply {
    /// The reply body (status byte included).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// The reply as a sealed frame of `kind` (the request's kind with [`REPLY`]), its bulk
    /// data moved, not copied ([`Outgoing`]).
    #[must_use]
    pub fn into_frame(self, kind: u8, env: Envelope) -> Outgoing {
        self.into_frame_with(BULK_MIN, kind, env)
    }

    fn into_frame_with(mut self, bulk_min: usize, kind: u8, env: Envelope) -> Outgoing {
        // The fields taken are the last ones the encoding writes (see `encode_into`).
        let bulk = match &mut self {
            Self::Copies(cs) => cs
                .last_mut()
                .map_or_else(Vec::new, |c| take_bulk(&mut c.data, bulk_min)),
            Self::Data(d) | Self::Answer(ReadAnswer::Data(d)) => take_bulk(d, bulk_min),
            Self::Done | Self::Answer(ReadAnswer::Located(..)) => Vec::new(),
        };
        let mut head = frame_start();
        self.encode_into(&mut head);
        Outgoing::seal(head, bulk, kind, env)
    }

    /// An error reply as a sealed frame of `kind`.
    #[must_use]
    pub fn error_frame(e: &RemoteError, kind: u8, env: Envelope) -> Outgoing {
        let mut head = frame_start();
        put_error(&mut head, e);
        Outgoing::seal(head, Vec::new(), kind, env)
    }

    /// Appends the body (status byte included) to `out` (after a frame's header room, see
    /// [`frame_start`]).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(0);
        match self {
            Self::Copies(cs) => {
                out.push(cs.len() as u8);
                for c in cs {
                    put_chunk(out, c);
                }
            }
            Self::Done => {}
            Self::Data(d) => put_bytes(out, d),
            Self::Answer(ReadAnswer::Data(d)) => {
                out.push(0);
                put_bytes(out, d);
            }
            Self::Answer(ReadAnswer::Located(parts, lease)) => {
                out.push(1);
                out.extend_from_slice(&(parts.len() as u32).to_be_bytes());
                for p in parts {
                    out.extend_from_slice(&p.holder.to_be_bytes());
                    put_addr(out, &p.addr);
                    put_want(out, &p.read.want);
                    out.extend_from_slice(&p.read.off.to_be_bytes());
                    out.extend_from_slice(&p.read.len.to_be_bytes());
                }
                match lease {
                    None => out.push(0),
                    Some(l) => {
                        out.push(1);
                        put_lease(out, l);
                    }
                }
            }
        }
    }

    /// Parses the success body of a reply to a request of `kind`.
    ///
    /// # Errors
    /// [`WireError::Malformed`].
    pub fn decode(kind: Kind, mut r: Reader<'_>) -> Result<Self, WireError> {
        let reply = match kind {
            Kind::ReadChunk | Kind::ReadRange => {
                let n = r.u8()?;
                if n > 2 {
                    return Err(WireError::Malformed("copies"));
                }
                Self::Copies(
                    (0..n)
                        .map(|_| get_chunk(&mut r))
                        .collect::<Result<_, _>>()?,
                )
            }
            Kind::WriteChunk | Kind::ForwardWrite | Kind::Heartbeat | Kind::RevokeLeases => {
                Self::Done
            }
            Kind::ForwardRead | Kind::Meta | Kind::PatchChunk => {
                Self::Data(r.bytes_vec(MAX_PAYLOAD)?)
            }
            Kind::ForwardLocate => Self::Answer(match r.u8()? {
                0 => ReadAnswer::Data(r.bytes_vec(MAX_PAYLOAD)?),
                1 => {
                    let n = r.u32()? as usize;
                    if n > MAX_PARTS {
                        return Err(WireError::Malformed("located read"));
                    }
                    let mut parts = Vec::with_capacity(n);
                    for _ in 0..n {
                        parts.push(ReadPart {
                            holder: r.u32()?,
                            addr: get_addr(&mut r)?,
                            read: RangeRead {
                                want: get_want(&mut r)?,
                                off: r.u32()?,
                                len: r.u32()?,
                            },
                        });
                    }
                    let lease = match r.u8()? {
                        0 => None,
                        1 => Some(get_lease(&mut r)?),
                        _ => return Err(WireError::Malformed("read lease")),
                    };
                    ReadAnswer::Located(parts, lease)
                }
                _ => return Err(WireError::Malformed("located read")),
            }),
        };
        r.end()?;
        Ok(reply)
    }
}

/// Decodes a reply frame to a request of `kind`: its success body (the frame's bulk handed on
/// as the last field's value) or the peer's error.
///
/// # Errors
/// [`WireError::Malformed`] when the body does not parse, or an error reply comes with a bulk.
pub fn decode_reply(kind: Kind, f: Frame) -> Result<Result<Reply, RemoteError>, WireError> {
    let Frame { payload, bulk, .. } = f;
    match get_status(&payload)? {
        Ok(r) => Reply::decode(kind, r.with_bulk(bulk)).map(Ok),
        Err(_) if !bulk.is_empty() => Err(WireError::Malformed("error reply")),
        Err(e) => Ok(Err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn chunk(v: u64, len: usize) -> Chunk {
        Chunk {
            version: v,
            cols: vec![v, v + 1, 0],
            acked: v / 2,
            acked_cols: vec![v / 2, 0, 1],
            data: (0..len).map(|i| (i as u8) ^ (v as u8)).collect(),
        }
    }

    /// A frame sent as head and bulk, read back as a TLS link's reader takes it: the body,
    /// then the bulk the header names, apart.
    fn read_link_frame(parts: &Outgoing) -> Frame {
        let wire = [parts.head.as_slice(), &parts.bulk].concat();
        let (f, used) = decode_frame_on(&wire, true).unwrap().unwrap();
        assert_eq!(used, wire.len());
        f
    }

    /// The bytes of a request's last field, where it has one.
    fn request_bulk(r: &Request) -> Option<&[u8]> {
        match r {
            Request::WriteChunk(_, c) => Some(&c.data),
            Request::PatchChunk(_, p) => Some(&p.head.data),
            Request::ForwardWrite { data, .. } | Request::Meta(_, data) => Some(data),
            _ => None,
        }
    }

    #[test]
    fn a_bulk_must_be_the_bodys_last_field_exactly() {
        let req = Request::ForwardWrite {
            volume: 1,
            offset: 4096,
            data: vec![5; 100],
        };
        let (kind, body) = req.encode();
        let at = body.len() - 100;
        // The right split reads the message; one byte more or less in the bulk does not.
        assert_eq!(
            Request::decode_parts(kind as u8, &body[..at], body[at..].to_vec()).unwrap(),
            req
        );
        for split in [at - 1, at + 1] {
            assert!(
                Request::decode_parts(kind as u8, &body[..split], body[split..].to_vec()).is_err()
            );
        }
        // A bulk behind a message with no bytes field is refused.
        let (kind, body) = Request::Heartbeat.encode();
        assert!(Request::decode_parts(kind as u8, &body, vec![1]).is_err());
        // An error reply with a bulk is refused; without one it is the peer's error.
        let mut err = Vec::new();
        put_error(&mut err, &RemoteError::Fenced);
        let f = |bulk: Vec<u8>| Frame {
            kind: 2 | REPLY,
            sender: 1,
            epoch: 1,
            request_id: 1,
            payload: err.clone(),
            bulk,
        };
        assert!(decode_reply(Kind::WriteChunk, f(vec![0])).is_err());
        assert_eq!(
            decode_reply(Kind::WriteChunk, f(Vec::new())).unwrap(),
            Err(RemoteError::Fenced)
        );
        // A header naming a bulk longer than its payload is refused from the header alone.
        let mut h = frame_start();
        h.extend_from_slice(b"abc");
        seal_frame(&mut h, 2, 7, 3, 9, Sum::Link);
        h[32..36].copy_from_slice(&4u32.to_be_bytes());
        let c = crc32c::crc32c(&h[..36]);
        h[36..40].copy_from_slice(&c.to_be_bytes());
        assert_eq!(
            decode_head(h.first_chunk().unwrap(), true),
            Err(WireError::Malformed("frame bulk length"))
        );
    }

    #[test]
    fn header_is_checked_before_the_payload_is_buffered() {
        let mut out = Vec::new();
        encode_frame(
            &Frame {
                kind: 1,
                sender: 7,
                epoch: 3,
                request_id: 9,
                payload: vec![1, 2, 3],
                bulk: Vec::new(),
            },
            &mut out,
        );
        assert!(decode_frame(&out[..39]).unwrap().is_none());
        assert!(decode_frame(&out[..41]).unwrap().is_none());
        let (f, n) = decode_frame(&out).unwrap().unwrap();
        assert_eq!((f.sender, f.epoch, f.request_id, n), (7, 3, 9, 43));
        // An oversized length is refused from the header alone.
        let mut big = out.clone();
        big[28..32].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_be_bytes());
        let c = crc32c::crc32c(&big[..36]);
        big[36..40].copy_from_slice(&c.to_be_bytes());
        assert_eq!(
            decode_frame(&big[..40]),
            Err(WireError::TooLarge(MAX_PAYLOAD as u32 + 1))
        );
        // Flipped bits are caught by the checksums.
        let mut bad = out.clone();
        bad[41] ^= 1;
        assert_eq!(decode_frame(&bad), Err(WireError::PayloadCrc));
        let mut bad = out.clone();
        bad[13] ^= 1;
        assert_eq!(decode_frame(&bad), Err(WireError::HeaderCrc));
        let mut bad = out;
        bad[0] = b'X';
        assert!(matches!(decode_frame(&bad), Err(WireError::Magic(_))));
    }

    #[test]
    fn payloads_go_without_a_crc_only_on_links_that_authenticate() {
        let mut f = frame_start();
        f.extend_from_slice(b"payload");
        seal_frame(&mut f, 2, 7, 3, 9, Sum::Link);
        let head: &[u8; HEADER_LEN] = f.first_chunk().unwrap();
        assert_eq!(u16::from_be_bytes([f[6], f[7]]), FLAG_LINK_SUM);
        // A plain link refuses it from the header alone, whatever the payload.
        assert_eq!(decode_head(head, false), Err(WireError::Unchecked));
        assert_eq!(decode_frame(&f), Err(WireError::Unchecked));
        // A TLS link takes it: the record's tag has checked these bytes already.
        let h = decode_head(head, true).unwrap();
        let got = h.with_payload(f[HEADER_LEN..].to_vec()).unwrap();
        assert_eq!(
            (got.kind, got.sender, got.payload.as_slice()),
            (2, 7, &b"payload"[..])
        );
        // A checksummed frame is still checked on a TLS link.
        let mut c = frame_start();
        c.extend_from_slice(b"payload");
        seal_frame(&mut c, 2, 7, 3, 9, Sum::Crc32c);
        let ch = decode_head(c.first_chunk().unwrap(), true).unwrap();
        let mut bad = c[HEADER_LEN..].to_vec();
        bad[0] ^= 1;
        assert_eq!(ch.with_payload(bad), Err(WireError::PayloadCrc));
        // Flags this version does not know are refused (the header CRC still matches).
        let mut u = c.clone();
        u[6..8].copy_from_slice(&2u16.to_be_bytes());
        let hc = crc32c::crc32c(&u[..36]);
        u[36..40].copy_from_slice(&hc.to_be_bytes());
        assert_eq!(decode_frame(&u), Err(WireError::Flags(2)));
    }

    #[test]
    fn errors_round_trip() {
        for e in [
            RemoteError::StaleEpoch { ours: 5, theirs: 4 },
            RemoteError::NotPrimary(12),
            RemoteError::Epoch { ours: 1, theirs: 2 },
            RemoteError::Fenced,
            RemoteError::Other("disk on fire".into()),
        ] {
            let mut out = Vec::new();
            put_error(&mut out, &e);
            assert_eq!(get_status(&out).unwrap().unwrap_err(), e);
        }
    }

    proptest! {
        /// Every request and reply survives encode/decode, inside a frame.
        #[test]
        fn requests_and_replies_round_trip(v in 1u64..u64::MAX / 2, len in 0usize..5000, off in any::<u64>(), vol in any::<u32>(), split_at in any::<usize>()) {
            let addr = ChunkAddr { volume: vol, extent: off, row: 3, pos: 2 };
            let reqs = [
                Request::ReadChunk(addr),
                Request::WriteChunk(addr, chunk(v, len)),
                Request::ReadRange(addr, RangeRead { want: Want::Version(v), off: len as u32, len: 4096 }),
                Request::ReadRange(addr, RangeRead { want: Want::Cols(vec![v, 0, v / 3]), off: 0, len: len as u32 }),
                Request::ReadRange(addr, RangeRead { want: Want::Any, off: 1, len: 2 }),
                Request::PatchChunk(addr, Patch { base: Want::Zero, chunk_len: 65536, off: 512, op: PatchOp::Replace, head: chunk(v, len) }),
                Request::PatchChunk(addr, Patch { base: Want::Cols(vec![v]), chunk_len: 4096, off: 0, op: PatchOp::Xor, head: chunk(v + 1, len) }),
                Request::ForwardWrite { volume: vol, offset: off, data: vec![7; len] },
                Request::ForwardRead { volume: vol, offset: off, len: len as u32 },
                Request::ForwardLocate { volume: vol, offset: off, len: len as u32 },
                Request::RevokeLeases { volume: vol, extent: off },
                Request::Heartbeat,
                Request::Meta(MetaOp::Vote, vec![b'{'; len]),
            ];
            for req in reqs {
                let (kind, body) = req.encode();
                let mut out = Vec::new();
                encode_frame(&Frame { kind: kind as u8, sender: 1, epoch: v, request_id: off, payload: body.clone(), bulk: Vec::new() }, &mut out);
                let (f, n) = decode_frame(&out).unwrap().unwrap();
                prop_assert_eq!(n, out.len());
                prop_assert_eq!(Request::decode(f.kind, &f.payload).unwrap(), req.clone());
                // Encoded in place behind the header's room: the same bytes.
                let mut inplace = frame_start();
                prop_assert_eq!(req.encode_into(&mut inplace), kind);
                seal_frame(&mut inplace, kind as u8, 1, v, off, Sum::Crc32c);
                prop_assert_eq!(&inplace, &out);
                // Sent as head and bulk (any non-empty last field taken): the same bytes.
                let env = Envelope { sender: 1, epoch: v, request_id: off, sum: Sum::Crc32c };
                let (k, parts) = req.clone().into_frame_with(0, env);
                prop_assert_eq!(k, kind);
                prop_assert_eq!([parts.head, parts.bulk].concat(), out);
                // On a TLS link the header names the bulk, and the reader's separate buffer
                // becomes the field's value as it is (the same allocation).
                let env = Envelope { sum: Sum::Link, ..env };
                let (_, parts) = req.clone().into_frame_with(0, env);
                let f = read_link_frame(&parts);
                prop_assert_eq!(f.bulk.len(), parts.bulk.len());
                let at = f.bulk.as_ptr();
                let got = Request::decode_parts(f.kind, &f.payload, f.bulk).unwrap();
                if !parts.bulk.is_empty() {
                    prop_assert_eq!(request_bulk(&got).map(<[u8]>::as_ptr), Some(at));
                }
                prop_assert_eq!(got, req.clone());
                // Any other split of the body is refused or reads the same message.
                let split = split_at % (body.len() + 1);
                let (front, back) = body.split_at(split);
                if let Ok(other) = Request::decode_parts(kind as u8, front, back.to_vec()) {
                    prop_assert_eq!(other, req.clone());
                }
            }
            for (kind, reply) in [
                (Kind::ReadChunk, Reply::Copies(vec![chunk(v, len), chunk(v + 1, len)])),
                (Kind::WriteChunk, Reply::Done),
                (Kind::ReadRange, Reply::Copies(vec![chunk(v, len)])),
                (Kind::PatchChunk, Reply::Data(vec![9; len])),
                (Kind::ForwardLocate, Reply::Answer(ReadAnswer::Data(vec![4; len]))),
                (Kind::ForwardLocate, Reply::Answer(ReadAnswer::Located(vec![
                    ReadPart { holder: 3, addr, read: RangeRead { want: Want::Version(v), off: 512, len: len as u32 } },
                    ReadPart { holder: 1, addr, read: RangeRead { want: Want::Zero, off: 0, len: 4096 } },
                ], None))),
                (Kind::ForwardLocate, Reply::Answer(ReadAnswer::Located(
                    vec![ReadPart { holder: 2, addr, read: RangeRead { want: Want::Version(v), off: 0, len: len as u32 } }],
                    Some(ReadLease {
                        extent: off,
                        ttl_ms: len as u32,
                        rows: (0..(len % 40) as u32).map(|r| (r, vec![Want::Version(v + u64::from(r)), Want::Zero])).collect(),
                    }),
                ))),
                (Kind::RevokeLeases, Reply::Done),
                (Kind::ForwardRead, Reply::Data(vec![3; len])),
            ] {
                let body = reply.encode();
                let r = get_status(&body).unwrap().unwrap();
                prop_assert_eq!(Reply::decode(kind, r).unwrap(), reply.clone());
                let mut framed = frame_start();
                reply.encode_into(&mut framed);
                seal_frame(&mut framed, kind as u8 | REPLY, 2, v, off, Sum::Crc32c);
                let (f, n) = decode_frame(&framed).unwrap().unwrap();
                prop_assert_eq!(n, framed.len());
                prop_assert_eq!((f.kind, f.sender, f.epoch, f.request_id), (kind as u8 | REPLY, 2, v, off));
                prop_assert_eq!(&f.payload, &body);
                let env = Envelope { sender: 2, epoch: v, request_id: off, sum: Sum::Crc32c };
                let parts = reply.clone().into_frame_with(0, kind as u8 | REPLY, env);
                prop_assert_eq!(parts.bulk.len(), match &reply {
                    Reply::Copies(cs) => cs.last().map_or(0, |c| c.data.len()),
                    Reply::Data(d) | Reply::Answer(ReadAnswer::Data(d)) => d.len(),
                    _ => 0,
                });
                prop_assert_eq!([parts.head, parts.bulk].concat(), framed);
                let env = Envelope { sum: Sum::Link, ..env };
                let parts = reply.clone().into_frame_with(0, kind as u8 | REPLY, env);
                let f = read_link_frame(&parts);
                prop_assert_eq!(f.bulk.len(), parts.bulk.len());
                prop_assert_eq!(decode_reply(kind, f).unwrap().unwrap(), reply.clone());
                let split = split_at % body.len().max(1);
                let f = Frame { kind: kind as u8 | REPLY, sender: 2, epoch: v, request_id: off, payload: body[..split].to_vec(), bulk: body[split..].to_vec() };
                if let Ok(other) = decode_reply(kind, f) {
                    prop_assert_eq!(other.unwrap(), reply.clone());
                }
            }
        }

        /// Arbitrary bytes never panic the decoders.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300), kind in any::<u8>()) {
            let _ = decode_frame(&bytes);
            let _ = Request::decode(kind, &bytes);
            if let Ok(Ok(r)) = get_status(&bytes) {
                for kind in (1..=u8::MAX).filter_map(Kind::from_u8) {
                    let _ = Reply::decode(kind, r.clone());
                }
            }
        }
    }
}
