//! The iSCSI PDU codec (RFC 7143 §11): a typed basic header segment for every opcode, in both
//! directions, plus framing of whole PDUs (AHS, padded data segment, digests).
//!
//! Parsing is two-phase, as §11 lays it out: [`frame_len`] reads only the 48-byte BHS and
//! checks its lengths against the negotiated limits before a single byte of the body is
//! buffered or allocated; [`parse_pdu`] then decodes a complete frame, verifying digests.
//! "Not enough bytes yet" is `Ok(None)`, not an error.
//!
//! Invariants:
//! - `encode(parse(x)) == x` for every typed header (checked by a property test); reserved
//!   bytes are written as zero.
//! - No length from the wire is used to allocate or index before it is checked.

use super::digest;
use crate::constants::{AHS_LEN_MAX, BHS_LEN};
use nom::bytes::complete::take;
use nom::number::complete::{be_u24, be_u32, be_u8};
use nom::Parser;

/// Opcodes (RFC 7143 §11.1.1).
pub mod opcode {
    #![allow(missing_docs)]
    pub const NOP_OUT: u8 = 0x00;
    pub const SCSI_COMMAND: u8 = 0x01;
    pub const TASK_MGMT_REQUEST: u8 = 0x02;
    pub const LOGIN_REQUEST: u8 = 0x03;
    pub const TEXT_REQUEST: u8 = 0x04;
    pub const DATA_OUT: u8 = 0x05;
    pub const LOGOUT_REQUEST: u8 = 0x06;
    pub const SNACK_REQUEST: u8 = 0x10;
    pub const NOP_IN: u8 = 0x20;
    pub const SCSI_RESPONSE: u8 = 0x21;
    pub const TASK_MGMT_RESPONSE: u8 = 0x22;
    pub const LOGIN_RESPONSE: u8 = 0x23;
    pub const TEXT_RESPONSE: u8 = 0x24;
    pub const DATA_IN: u8 = 0x25;
    pub const LOGOUT_RESPONSE: u8 = 0x26;
    pub const R2T: u8 = 0x31;
    pub const ASYNC_MESSAGE: u8 = 0x32;
    pub const REJECT: u8 = 0x3f;
}

/// The reserved ITT/TTT value.
pub const RESERVED_TAG: u32 = 0xffff_ffff;

/// Errors decoding a PDU. Each maps to a wire reaction in the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    /// The opcode is not defined by RFC 7143.
    #[error("unknown opcode {0:#04x}")]
    UnknownOpcode(u8),
    /// The data segment is longer than the limit we declared.
    #[error("data segment of {len} bytes exceeds the negotiated limit {max}")]
    DataSegmentTooLarge {
        /// Length announced.
        len: u32,
        /// Our limit.
        max: u32,
    },
    /// The header digest did not match (the lengths cannot be trusted: drop the connection).
    #[error("header digest mismatch")]
    HeaderDigest,
    /// The data digest did not match.
    #[error("data digest mismatch")]
    DataDigest,
    /// A field holds a value the protocol forbids.
    #[error("invalid field: {0}")]
    InvalidField(&'static str),
}

/// Digests in force on a connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Digests {
    /// HeaderDigest=CRC32C.
    pub header: bool,
    /// DataDigest=CRC32C.
    pub data: bool,
}

/// Receive limits checked before a PDU body is buffered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameLimits {
    /// Digests in force.
    pub digests: Digests,
    /// Largest data segment accepted (our MaxRecvDataSegmentLength).
    pub max_data_segment: u32,
}

/// Lengths announced by a BHS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameInfo {
    /// AHS bytes.
    pub ahs_len: usize,
    /// Data segment bytes (without padding).
    pub data_len: usize,
    /// Total frame bytes including padding and digests.
    pub total: usize,
}

/// Rounds up to a multiple of 4 (data segment padding).
pub fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

/// Reads the lengths of the next PDU from `buf`, checking them against `limits`.
///
/// # Errors
/// [`PduError::DataSegmentTooLarge`] before the body is read.
pub fn frame_len(buf: &[u8], limits: FrameLimits) -> Result<Option<FrameInfo>, PduError> {
    if buf.len() < BHS_LEN {
        return Ok(None);
    }
    let ahs_len = usize::from(buf[4]) * 4;
    let data_len = (u32::from(buf[5]) << 16) | (u32::from(buf[6]) << 8) | u32::from(buf[7]);
    if data_len > limits.max_data_segment {
        return Err(PduError::DataSegmentTooLarge {
            len: data_len,
            max: limits.max_data_segment,
        });
    }
    debug_assert!(ahs_len <= AHS_LEN_MAX);
    let data_len = data_len as usize;
    let mut total = BHS_LEN + ahs_len + pad4(data_len);
    if limits.digests.header {
        total += 4;
    }
    if limits.digests.data && data_len > 0 {
        total += 4;
    }
    Ok(Some(FrameInfo {
        ahs_len,
        data_len,
        total,
    }))
}

/// A decoded PDU borrowing its AHS and data from the receive buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct PduRef<'a> {
    /// The typed header.
    pub bhs: Bhs,
    /// Additional header segments (raw).
    pub ahs: &'a [u8],
    /// Data segment without padding.
    pub data: &'a [u8],
}

/// Decodes a complete frame (`buf.len() >= info.total`), verifying digests.
///
/// # Errors
/// Digest mismatches and invalid headers.
pub fn parse_pdu<'a>(
    buf: &'a [u8],
    info: FrameInfo,
    digests: Digests,
) -> Result<PduRef<'a>, PduError> {
    let hdr_end = BHS_LEN + info.ahs_len;
    let mut pos = hdr_end;
    if digests.header {
        let want = digest::to_wire(digest::crc32c(&buf[..hdr_end]));
        if buf[pos..pos + 4] != want {
            return Err(PduError::HeaderDigest);
        }
        pos += 4;
    }
    let data = &buf[pos..pos + info.data_len];
    let padded = pad4(info.data_len);
    if digests.data && info.data_len > 0 {
        let want = digest::to_wire(digest::crc32c(&buf[pos..pos + padded]));
        if buf[pos + padded..pos + padded + 4] != want {
            return Err(PduError::DataDigest);
        }
    }
    let bhs = Bhs::parse(buf[..BHS_LEN].try_into().expect("48 bytes"))?;
    Ok(PduRef {
        bhs,
        ahs: &buf[BHS_LEN..hdr_end],
        data,
    })
}

/// Appends a whole PDU (header, AHS, padded data, digests) to `out`.
pub fn encode_pdu(out: &mut Vec<u8>, bhs: &Bhs, ahs: &[u8], data: &[u8], digests: Digests) {
    assert!(ahs.len().is_multiple_of(4) && ahs.len() <= AHS_LEN_MAX);
    assert!(data.len() < 1 << 24);
    let start = out.len();
    let mut hdr = [0u8; BHS_LEN];
    bhs.encode(&mut hdr, (ahs.len() / 4) as u8, data.len() as u32);
    out.extend_from_slice(&hdr);
    out.extend_from_slice(ahs);
    if digests.header {
        let crc = digest::crc32c(&out[start..]);
        out.extend_from_slice(&digest::to_wire(crc));
    }
    encode_data(out, data, digests.data);
}

/// Appends a padded data segment and its digest.
pub fn encode_data(out: &mut Vec<u8>, data: &[u8], data_digest: bool) {
    let pad = pad4(data.len()) - data.len();
    out.extend_from_slice(data);
    out.extend_from_slice(&[0u8; 3][..pad]);
    if data_digest && !data.is_empty() {
        let crc = digest::crc32c_parts(&[data, &[0u8; 3][..pad]]);
        out.extend_from_slice(&digest::to_wire(crc));
    }
}

// ---------------------------------------------------------------------------------------------
// Typed headers.

/// NOP-Out (§11.18).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NopOut {
    pub immediate: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// SCSI Command (§11.3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScsiCommandPdu {
    pub immediate: bool,
    pub final_: bool,
    pub read: bool,
    pub write: bool,
    pub attr: u8,
    pub lun: u64,
    pub itt: u32,
    pub edtl: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub cdb: [u8; 16],
}

/// Task Management Function Request (§11.5).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskMgmtRequest {
    pub immediate: bool,
    pub function: u8,
    pub lun: u64,
    pub itt: u32,
    pub rtt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub ref_cmd_sn: u32,
    pub exp_data_sn: u32,
}

/// Login Request (§11.12).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginRequest {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_min: u8,
    pub isid: u64,
    pub tsih: u16,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// Text Request (§11.10).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextRequest {
    pub immediate: bool,
    pub final_: bool,
    pub cont: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// SCSI Data-Out (§11.7).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataOut {
    pub final_: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub exp_stat_sn: u32,
    pub data_sn: u32,
    pub buffer_offset: u32,
}

/// Logout Request (§11.14).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogoutRequest {
    pub immediate: bool,
    pub reason: u8,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// SNACK Request (§11.16).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnackRequest {
    pub kind: u8,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub exp_stat_sn: u32,
    pub beg_run: u32,
    pub run_length: u32,
}

/// NOP-In (§11.19).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NopIn {
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// SCSI Response (§11.4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScsiResponse {
    pub bidi_overflow: bool,
    pub bidi_underflow: bool,
    pub overflow: bool,
    pub underflow: bool,
    pub response: u8,
    pub status: u8,
    pub itt: u32,
    pub snack_tag: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub exp_data_sn: u32,
    pub bidi_residual: u32,
    pub residual: u32,
}

/// Task Management Function Response (§11.6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskMgmtResponse {
    pub response: u8,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// Login Response (§11.13).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginResponse {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_active: u8,
    pub isid: u64,
    pub tsih: u16,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub status_class: u8,
    pub status_detail: u8,
}

/// Text Response (§11.11).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextResponse {
    pub final_: bool,
    pub cont: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// SCSI Data-In (§11.7).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataIn {
    pub final_: bool,
    pub ack: bool,
    pub overflow: bool,
    pub underflow: bool,
    pub has_status: bool,
    pub status: u8,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data_sn: u32,
    pub buffer_offset: u32,
    pub residual: u32,
}

/// Logout Response (§11.15).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogoutResponse {
    pub response: u8,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub time2wait: u16,
    pub time2retain: u16,
}

/// Ready To Transfer (§11.8).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct R2t {
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub r2t_sn: u32,
    pub buffer_offset: u32,
    pub desired_length: u32,
}

/// Asynchronous Message (§11.9).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AsyncMessage {
    pub lun: u64,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub event: u8,
    pub vcode: u8,
    pub param1: u16,
    pub param2: u16,
    pub param3: u16,
}

/// Reject (§11.17).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reject {
    pub reason: u8,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data_sn: u32,
}

/// A typed basic header segment.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Bhs {
    NopOut(NopOut),
    ScsiCommand(ScsiCommandPdu),
    TaskMgmtRequest(TaskMgmtRequest),
    LoginRequest(LoginRequest),
    TextRequest(TextRequest),
    DataOut(DataOut),
    LogoutRequest(LogoutRequest),
    SnackRequest(SnackRequest),
    NopIn(NopIn),
    ScsiResponse(ScsiResponse),
    TaskMgmtResponse(TaskMgmtResponse),
    LoginResponse(LoginResponse),
    TextResponse(TextResponse),
    DataIn(DataIn),
    LogoutResponse(LogoutResponse),
    R2t(R2t),
    AsyncMessage(AsyncMessage),
    Reject(Reject),
}

/// The fields common to every BHS, as laid out in §11.2.1.
struct Raw {
    op: u8,
    immediate: bool,
    f1: u8,
    b2: u8,
    b3: u8,
    b8: u64,
    itt: u32,
    w: [u32; 7],
}

type NomErr<'a> = nom::error::Error<&'a [u8]>;

fn raw(b: &[u8; BHS_LEN]) -> Raw {
    let parsed: nom::IResult<&[u8], _, NomErr<'_>> = (
        be_u8,
        be_u8,
        be_u8,
        be_u8,
        be_u8,
        be_u24,
        take(8usize),
        be_u32,
    )
        .parse(&b[..]);
    let (rest, (op, f1, b2, b3, _ahs, _dlen, b8, itt)) =
        parsed.expect("48 bytes always hold the fixed fields");
    let words: nom::IResult<&[u8], _, NomErr<'_>> =
        (be_u32, be_u32, be_u32, be_u32, be_u32, be_u32, be_u32).parse(rest);
    let (_, (w0, w1, w2, w3, w4, w5, w6)) = words.expect("28 bytes remain");
    Raw {
        op: op & 0x3f,
        immediate: op & 0x40 != 0,
        f1,
        b2,
        b3,
        b8: u64::from_be_bytes(b8.try_into().expect("8 bytes")),
        itt,
        w: [w0, w1, w2, w3, w4, w5, w6],
    }
}

fn bit(v: u8, mask: u8) -> bool {
    v & mask != 0
}
fn hi16(w: u32) -> u16 {
    (w >> 16) as u16
}
fn lo16(w: u32) -> u16 {
    w as u16
}

impl Bhs {
    /// Decodes a 48-byte BHS.
    ///
    /// # Errors
    /// [`PduError::UnknownOpcode`] for opcodes RFC 7143 does not define.
    pub fn parse(b: &[u8; BHS_LEN]) -> Result<Self, PduError> {
        use opcode::*;
        let r = raw(b);
        let w = r.w;
        Ok(match r.op {
            NOP_OUT => Bhs::NopOut(NopOut {
                immediate: r.immediate,
                lun: r.b8,
                itt: r.itt,
                ttt: w[0],
                cmd_sn: w[1],
                exp_stat_sn: w[2],
            }),
            SCSI_COMMAND => {
                let mut cdb = [0u8; 16];
                cdb.copy_from_slice(&b[32..48]);
                Bhs::ScsiCommand(ScsiCommandPdu {
                    immediate: r.immediate,
                    final_: bit(r.f1, 0x80),
                    read: bit(r.f1, 0x40),
                    write: bit(r.f1, 0x20),
                    attr: r.f1 & 0x07,
                    lun: r.b8,
                    itt: r.itt,
                    edtl: w[0],
                    cmd_sn: w[1],
                    exp_stat_sn: w[2],
                    cdb,
                })
            }
            TASK_MGMT_REQUEST => Bhs::TaskMgmtRequest(TaskMgmtRequest {
                immediate: r.immediate,
                function: r.f1 & 0x7f,
                lun: r.b8,
                itt: r.itt,
                rtt: w[0],
                cmd_sn: w[1],
                exp_stat_sn: w[2],
                ref_cmd_sn: w[3],
                exp_data_sn: w[4],
            }),
            LOGIN_REQUEST => Bhs::LoginRequest(LoginRequest {
                transit: bit(r.f1, 0x80),
                cont: bit(r.f1, 0x40),
                csg: (r.f1 >> 2) & 3,
                nsg: r.f1 & 3,
                version_max: r.b2,
                version_min: r.b3,
                isid: r.b8 >> 16,
                tsih: r.b8 as u16,
                itt: r.itt,
                cid: hi16(w[0]),
                cmd_sn: w[1],
                exp_stat_sn: w[2],
            }),
            TEXT_REQUEST => Bhs::TextRequest(TextRequest {
                immediate: r.immediate,
                final_: bit(r.f1, 0x80),
                cont: bit(r.f1, 0x40),
                lun: r.b8,
                itt: r.itt,
                ttt: w[0],
                cmd_sn: w[1],
                exp_stat_sn: w[2],
            }),
            DATA_OUT => Bhs::DataOut(DataOut {
                final_: bit(r.f1, 0x80),
                lun: r.b8,
                itt: r.itt,
                ttt: w[0],
                exp_stat_sn: w[2],
                data_sn: w[4],
                buffer_offset: w[5],
            }),
            LOGOUT_REQUEST => Bhs::LogoutRequest(LogoutRequest {
                immediate: r.immediate,
                reason: r.f1 & 0x7f,
                itt: r.itt,
                cid: hi16(w[0]),
                cmd_sn: w[1],
                exp_stat_sn: w[2],
            }),
            SNACK_REQUEST => Bhs::SnackRequest(SnackRequest {
                kind: r.f1 & 0x0f,
                lun: r.b8,
                itt: r.itt,
                ttt: w[0],
                exp_stat_sn: w[2],
                beg_run: w[5],
                run_length: w[6],
            }),
            NOP_IN => Bhs::NopIn(NopIn {
                lun: r.b8,
                itt: r.itt,
                ttt: w[0],
                stat_sn: w[1],
                exp_cmd_sn: w[2],
                max_cmd_sn: w[3],
            }),
            SCSI_RESPONSE => Bhs::ScsiResponse(ScsiResponse {
                bidi_overflow: bit(r.f1, 0x10),
                bidi_underflow: bit(r.f1, 0x08),
                overflow: bit(r.f1, 0x04),
                underflow: bit(r.f1, 0x02),
                response: r.b2,
                status: r.b3,
                itt: r.itt,
                snack_tag: w[0],
                stat_sn: w[1],
                exp_cmd_sn: w[2],
                max_cmd_sn: w[3],
                exp_data_sn: w[4],
                bidi_residual: w[5],
                residual: w[6],
            }),
            TASK_MGMT_RESPONSE => Bhs::TaskMgmtResponse(TaskMgmtResponse {
                response: r.b2,
                itt: r.itt,
                stat_sn: w[1],
                exp_cmd_sn: w[2],
                max_cmd_sn: w[3],
            }),
            LOGIN_RESPONSE => Bhs::LoginResponse(LoginResponse {
                transit: bit(r.f1, 0x80),
                cont: bit(r.f1, 0x40),
                csg: (r.f1 >> 2) & 3,
                nsg: r.f1 & 3,
                version_max: r.b2,
                version_active: r.b3,
                isid: r.b8 >> 16,
                tsih: r.b8 as u16,
                itt: r.itt,
                stat_sn: w[1],
                exp_cmd_sn: w[2],
                max_cmd_sn: w[3],
                status_class: (w[4] >> 24) as u8,
                status_detail: (w[4] >> 16) as u8,
            }),
            TEXT_RESPONSE => Bhs::TextResponse(TextResponse {
                final_: bit(r.f1, 0x80),
                cont: bit(r.f1, 0x40),
                lun: r.b8,
                itt: r.itt,
                ttt: w[0],
                stat_sn: w[1],
                exp_cmd_sn: w[2],
                max_cmd_sn: w[3],
            }),
            DATA_IN => Bhs::DataIn(DataIn {
                final_: bit(r.f1, 0x80),
                ack: bit(r.f1, 0x40),
                overflow: bit(r.f1, 0x04),
                underflow: bit(r.f1, 0x02),
                has_status: bit(r.f1, 0x01),
                status: r.b3,
                lun: r.b8,
                itt: r.itt,
                ttt: w[0],
                stat_sn: w[1],
                exp_cmd_sn: w[2],
                max_cmd_sn: w[3],
                data_sn: w[4],
                buffer_offset: w[5],
                residual: w[6],
            }),
            LOGOUT_RESPONSE => Bhs::LogoutResponse(LogoutResponse {
                response: r.b2,
                itt: r.itt,
                stat_sn: w[1],
                exp_cmd_sn: w[2],
                max_cmd_sn: w[3],
                time2wait: hi16(w[5]),
                time2retain: lo16(w[5]),
            }),
            R2T => Bhs::R2t(R2t {
                lun: r.b8,
                itt: r.itt,
                ttt: w[0],
                stat_sn: w[1],
                exp_cmd_sn: w[2],
                max_cmd_sn: w[3],
                r2t_sn: w[4],
                buffer_offset: w[5],
                desired_length: w[6],
            }),
            ASYNC_MESSAGE => Bhs::AsyncMessage(AsyncMessage {
                lun: r.b8,
                stat_sn: w[1],
                exp_cmd_sn: w[2],
                max_cmd_sn: w[3],
                event: (w[4] >> 24) as u8,
                vcode: (w[4] >> 16) as u8,
                param1: lo16(w[4]),
                param2: hi16(w[5]),
                param3: lo16(w[5]),
            }),
            REJECT => Bhs::Reject(Reject {
                reason: r.b2,
                stat_sn: w[1],
                exp_cmd_sn: w[2],
                max_cmd_sn: w[3],
                data_sn: w[4],
            }),
            other => return Err(PduError::UnknownOpcode(other)),
        })
    }

    /// The opcode.
    pub fn opcode(&self) -> u8 {
        use opcode::*;
        match self {
            Bhs::NopOut(_) => NOP_OUT,
            Bhs::ScsiCommand(_) => SCSI_COMMAND,
            Bhs::TaskMgmtRequest(_) => TASK_MGMT_REQUEST,
            Bhs::LoginRequest(_) => LOGIN_REQUEST,
            Bhs::TextRequest(_) => TEXT_REQUEST,
            Bhs::DataOut(_) => DATA_OUT,
            Bhs::LogoutRequest(_) => LOGOUT_REQUEST,
            Bhs::SnackRequest(_) => SNACK_REQUEST,
            Bhs::NopIn(_) => NOP_IN,
            Bhs::ScsiResponse(_) => SCSI_RESPONSE,
            Bhs::TaskMgmtResponse(_) => TASK_MGMT_RESPONSE,
            Bhs::LoginResponse(_) => LOGIN_RESPONSE,
            Bhs::TextResponse(_) => TEXT_RESPONSE,
            Bhs::DataIn(_) => DATA_IN,
            Bhs::LogoutResponse(_) => LOGOUT_RESPONSE,
            Bhs::R2t(_) => R2T,
            Bhs::AsyncMessage(_) => ASYNC_MESSAGE,
            Bhs::Reject(_) => REJECT,
        }
    }

    /// Encodes into `out` with the given AHS word count and data segment length.
    pub fn encode(&self, out: &mut [u8; BHS_LEN], ahs_words: u8, data_len: u32) {
        out.fill(0);
        let mut w = [0u32; 7];
        let (mut immediate, mut f1, mut b2, mut b3, mut b8, mut itt) =
            (false, 0x80u8, 0u8, 0u8, 0u64, RESERVED_TAG);
        let flag = |c: bool, m: u8| if c { m } else { 0 };
        match self {
            Bhs::NopOut(p) => {
                immediate = p.immediate;
                (b8, itt) = (p.lun, p.itt);
                (w[0], w[1], w[2]) = (p.ttt, p.cmd_sn, p.exp_stat_sn);
            }
            Bhs::ScsiCommand(p) => {
                immediate = p.immediate;
                f1 = flag(p.final_, 0x80) | flag(p.read, 0x40) | flag(p.write, 0x20) | (p.attr & 7);
                (b8, itt) = (p.lun, p.itt);
                (w[0], w[1], w[2]) = (p.edtl, p.cmd_sn, p.exp_stat_sn);
                out[32..48].copy_from_slice(&p.cdb);
            }
            Bhs::TaskMgmtRequest(p) => {
                immediate = p.immediate;
                f1 = 0x80 | (p.function & 0x7f);
                (b8, itt) = (p.lun, p.itt);
                w[..5].copy_from_slice(&[
                    p.rtt,
                    p.cmd_sn,
                    p.exp_stat_sn,
                    p.ref_cmd_sn,
                    p.exp_data_sn,
                ]);
            }
            Bhs::LoginRequest(p) => {
                immediate = true;
                f1 = flag(p.transit, 0x80) | flag(p.cont, 0x40) | (p.csg & 3) << 2 | (p.nsg & 3);
                (b2, b3) = (p.version_max, p.version_min);
                b8 = (p.isid & 0xffff_ffff_ffff) << 16 | u64::from(p.tsih);
                itt = p.itt;
                (w[0], w[1], w[2]) = (u32::from(p.cid) << 16, p.cmd_sn, p.exp_stat_sn);
            }
            Bhs::TextRequest(p) => {
                immediate = p.immediate;
                f1 = flag(p.final_, 0x80) | flag(p.cont, 0x40);
                (b8, itt) = (p.lun, p.itt);
                (w[0], w[1], w[2]) = (p.ttt, p.cmd_sn, p.exp_stat_sn);
            }
            Bhs::DataOut(p) => {
                f1 = flag(p.final_, 0x80);
                (b8, itt) = (p.lun, p.itt);
                (w[0], w[2], w[4], w[5]) = (p.ttt, p.exp_stat_sn, p.data_sn, p.buffer_offset);
            }
            Bhs::LogoutRequest(p) => {
                immediate = p.immediate;
                f1 = 0x80 | (p.reason & 0x7f);
                itt = p.itt;
                (w[0], w[1], w[2]) = (u32::from(p.cid) << 16, p.cmd_sn, p.exp_stat_sn);
            }
            Bhs::SnackRequest(p) => {
                f1 = 0x80 | (p.kind & 0x0f);
                (b8, itt) = (p.lun, p.itt);
                (w[0], w[2], w[5], w[6]) = (p.ttt, p.exp_stat_sn, p.beg_run, p.run_length);
            }
            Bhs::NopIn(p) => {
                (b8, itt) = (p.lun, p.itt);
                w[..4].copy_from_slice(&[p.ttt, p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn]);
            }
            Bhs::ScsiResponse(p) => {
                f1 = 0x80
                    | flag(p.bidi_overflow, 0x10)
                    | flag(p.bidi_underflow, 0x08)
                    | flag(p.overflow, 0x04)
                    | flag(p.underflow, 0x02);
                (b2, b3, itt) = (p.response, p.status, p.itt);
                w = [
                    p.snack_tag,
                    p.stat_sn,
                    p.exp_cmd_sn,
                    p.max_cmd_sn,
                    p.exp_data_sn,
                    p.bidi_residual,
                    p.residual,
                ];
            }
            Bhs::TaskMgmtResponse(p) => {
                (b2, itt) = (p.response, p.itt);
                (w[1], w[2], w[3]) = (p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
            }
            Bhs::LoginResponse(p) => {
                f1 = flag(p.transit, 0x80) | flag(p.cont, 0x40) | (p.csg & 3) << 2 | (p.nsg & 3);
                (b2, b3) = (p.version_max, p.version_active);
                b8 = (p.isid & 0xffff_ffff_ffff) << 16 | u64::from(p.tsih);
                itt = p.itt;
                (w[1], w[2], w[3]) = (p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
                w[4] = u32::from(p.status_class) << 24 | u32::from(p.status_detail) << 16;
            }
            Bhs::TextResponse(p) => {
                f1 = flag(p.final_, 0x80) | flag(p.cont, 0x40);
                (b8, itt) = (p.lun, p.itt);
                w[..4].copy_from_slice(&[p.ttt, p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn]);
            }
            Bhs::DataIn(p) => {
                f1 = flag(p.final_, 0x80)
                    | flag(p.ack, 0x40)
                    | flag(p.overflow, 0x04)
                    | flag(p.underflow, 0x02)
                    | flag(p.has_status, 0x01);
                b3 = p.status;
                (b8, itt) = (p.lun, p.itt);
                w = [
                    p.ttt,
                    p.stat_sn,
                    p.exp_cmd_sn,
                    p.max_cmd_sn,
                    p.data_sn,
                    p.buffer_offset,
                    p.residual,
                ];
            }
            Bhs::LogoutResponse(p) => {
                (b2, itt) = (p.response, p.itt);
                (w[1], w[2], w[3]) = (p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
                w[5] = u32::from(p.time2wait) << 16 | u32::from(p.time2retain);
            }
            Bhs::R2t(p) => {
                (b8, itt) = (p.lun, p.itt);
                w = [
                    p.ttt,
                    p.stat_sn,
                    p.exp_cmd_sn,
                    p.max_cmd_sn,
                    p.r2t_sn,
                    p.buffer_offset,
                    p.desired_length,
                ];
            }
            Bhs::AsyncMessage(p) => {
                b8 = p.lun;
                (w[1], w[2], w[3]) = (p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
                w[4] = u32::from(p.event) << 24 | u32::from(p.vcode) << 16 | u32::from(p.param1);
                w[5] = u32::from(p.param2) << 16 | u32::from(p.param3);
            }
            Bhs::Reject(p) => {
                b2 = p.reason;
                (w[1], w[2], w[3], w[4]) = (p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn, p.data_sn);
            }
        }
        out[0] = self.opcode() | if immediate { 0x40 } else { 0 };
        out[1] = f1;
        out[2] = b2;
        out[3] = b3;
        out[4] = ahs_words;
        out[5..8].copy_from_slice(&data_len.to_be_bytes()[1..]);
        out[8..16].copy_from_slice(&b8.to_be_bytes());
        out[16..20].copy_from_slice(&itt.to_be_bytes());
        let words_end = if matches!(self, Bhs::ScsiCommand(_)) {
            3
        } else {
            7
        };
        for (i, v) in w.iter().enumerate().take(words_end) {
            out[20 + 4 * i..24 + 4 * i].copy_from_slice(&v.to_be_bytes());
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    prop_compose! {
        fn isid()(v in 0u64..(1 << 48)) -> u64 { v }
    }

    /// A strategy producing every typed header with arbitrary field values.
    pub(crate) fn any_bhs() -> impl Strategy<Value = Bhs> {
        let u = any::<u32>;
        prop_oneof![
            (any::<bool>(), any::<u64>(), u(), u(), u(), u()).prop_map(|(i, l, a, b, c, d)| {
                Bhs::NopOut(NopOut {
                    immediate: i,
                    lun: l,
                    itt: a,
                    ttt: b,
                    cmd_sn: c,
                    exp_stat_sn: d,
                })
            }),
            (
                any::<[bool; 4]>(),
                0u8..8,
                any::<u64>(),
                u(),
                u(),
                u(),
                u(),
                any::<[u8; 16]>()
            )
                .prop_map(|(f, attr, lun, itt, e, c, s, cdb)| Bhs::ScsiCommand(
                    ScsiCommandPdu {
                        immediate: f[0],
                        final_: f[1],
                        read: f[2],
                        write: f[3],
                        attr,
                        lun,
                        itt,
                        edtl: e,
                        cmd_sn: c,
                        exp_stat_sn: s,
                        cdb
                    }
                )),
            (any::<bool>(), 0u8..128, any::<u64>(), any::<[u32; 6]>()).prop_map(
                |(i, f, lun, w)| Bhs::TaskMgmtRequest(TaskMgmtRequest {
                    immediate: i,
                    function: f,
                    lun,
                    itt: w[0],
                    rtt: w[1],
                    cmd_sn: w[2],
                    exp_stat_sn: w[3],
                    ref_cmd_sn: w[4],
                    exp_data_sn: w[5]
                })
            ),
            (
                any::<[bool; 2]>(),
                0u8..4,
                0u8..4,
                any::<[u8; 2]>(),
                isid(),
                any::<u16>(),
                any::<u16>(),
                any::<[u32; 3]>()
            )
                .prop_map(|(f, csg, nsg, v, isid, tsih, cid, w)| Bhs::LoginRequest(
                    LoginRequest {
                        transit: f[0],
                        cont: f[1],
                        csg,
                        nsg,
                        version_max: v[0],
                        version_min: v[1],
                        isid,
                        tsih,
                        itt: w[0],
                        cid,
                        cmd_sn: w[1],
                        exp_stat_sn: w[2]
                    }
                )),
            (any::<[bool; 3]>(), any::<u64>(), any::<[u32; 4]>()).prop_map(|(f, lun, w)| {
                Bhs::TextRequest(TextRequest {
                    immediate: f[0],
                    final_: f[1],
                    cont: f[2],
                    lun,
                    itt: w[0],
                    ttt: w[1],
                    cmd_sn: w[2],
                    exp_stat_sn: w[3],
                })
            }),
            (any::<bool>(), any::<u64>(), any::<[u32; 5]>()).prop_map(|(f, lun, w)| Bhs::DataOut(
                DataOut {
                    final_: f,
                    lun,
                    itt: w[0],
                    ttt: w[1],
                    exp_stat_sn: w[2],
                    data_sn: w[3],
                    buffer_offset: w[4]
                }
            )),
            (any::<bool>(), 0u8..128, any::<u16>(), any::<[u32; 3]>()).prop_map(
                |(i, r, cid, w)| Bhs::LogoutRequest(LogoutRequest {
                    immediate: i,
                    reason: r,
                    itt: w[0],
                    cid,
                    cmd_sn: w[1],
                    exp_stat_sn: w[2]
                })
            ),
            (0u8..16, any::<u64>(), any::<[u32; 5]>()).prop_map(|(k, lun, w)| Bhs::SnackRequest(
                SnackRequest {
                    kind: k,
                    lun,
                    itt: w[0],
                    ttt: w[1],
                    exp_stat_sn: w[2],
                    beg_run: w[3],
                    run_length: w[4]
                }
            )),
            (any::<u64>(), any::<[u32; 5]>()).prop_map(|(lun, w)| Bhs::NopIn(NopIn {
                lun,
                itt: w[0],
                ttt: w[1],
                stat_sn: w[2],
                exp_cmd_sn: w[3],
                max_cmd_sn: w[4]
            })),
            (any::<[bool; 4]>(), any::<[u8; 2]>(), any::<[u32; 8]>()).prop_map(|(f, b, w)| {
                Bhs::ScsiResponse(ScsiResponse {
                    bidi_overflow: f[0],
                    bidi_underflow: f[1],
                    overflow: f[2],
                    underflow: f[3],
                    response: b[0],
                    status: b[1],
                    itt: w[0],
                    snack_tag: w[1],
                    stat_sn: w[2],
                    exp_cmd_sn: w[3],
                    max_cmd_sn: w[4],
                    exp_data_sn: w[5],
                    bidi_residual: w[6],
                    residual: w[7],
                })
            }),
            (any::<u8>(), any::<[u32; 4]>()).prop_map(|(r, w)| Bhs::TaskMgmtResponse(
                TaskMgmtResponse {
                    response: r,
                    itt: w[0],
                    stat_sn: w[1],
                    exp_cmd_sn: w[2],
                    max_cmd_sn: w[3]
                }
            )),
            (
                any::<[bool; 2]>(),
                0u8..4,
                0u8..4,
                any::<[u8; 4]>(),
                isid(),
                any::<u16>(),
                any::<[u32; 4]>()
            )
                .prop_map(|(f, csg, nsg, b, isid, tsih, w)| Bhs::LoginResponse(
                    LoginResponse {
                        transit: f[0],
                        cont: f[1],
                        csg,
                        nsg,
                        version_max: b[0],
                        version_active: b[1],
                        isid,
                        tsih,
                        itt: w[0],
                        stat_sn: w[1],
                        exp_cmd_sn: w[2],
                        max_cmd_sn: w[3],
                        status_class: b[2],
                        status_detail: b[3]
                    }
                )),
            (any::<[bool; 2]>(), any::<u64>(), any::<[u32; 5]>()).prop_map(|(f, lun, w)| {
                Bhs::TextResponse(TextResponse {
                    final_: f[0],
                    cont: f[1],
                    lun,
                    itt: w[0],
                    ttt: w[1],
                    stat_sn: w[2],
                    exp_cmd_sn: w[3],
                    max_cmd_sn: w[4],
                })
            }),
            (
                any::<[bool; 5]>(),
                any::<u8>(),
                any::<u64>(),
                any::<[u32; 9]>()
            )
                .prop_map(|(f, s, lun, w)| Bhs::DataIn(DataIn {
                    final_: f[0],
                    ack: f[1],
                    overflow: f[2],
                    underflow: f[3],
                    has_status: f[4],
                    status: s,
                    lun,
                    itt: w[0],
                    ttt: w[1],
                    stat_sn: w[2],
                    exp_cmd_sn: w[3],
                    max_cmd_sn: w[4],
                    data_sn: w[5],
                    buffer_offset: w[6],
                    residual: w[7]
                })),
            (any::<u8>(), any::<[u32; 4]>(), any::<[u16; 2]>()).prop_map(|(r, w, t)| {
                Bhs::LogoutResponse(LogoutResponse {
                    response: r,
                    itt: w[0],
                    stat_sn: w[1],
                    exp_cmd_sn: w[2],
                    max_cmd_sn: w[3],
                    time2wait: t[0],
                    time2retain: t[1],
                })
            }),
            (any::<u64>(), any::<[u32; 8]>()).prop_map(|(lun, w)| Bhs::R2t(R2t {
                lun,
                itt: w[0],
                ttt: w[1],
                stat_sn: w[2],
                exp_cmd_sn: w[3],
                max_cmd_sn: w[4],
                r2t_sn: w[5],
                buffer_offset: w[6],
                desired_length: w[7]
            })),
            (
                any::<u64>(),
                any::<[u32; 3]>(),
                any::<[u8; 2]>(),
                any::<[u16; 3]>()
            )
                .prop_map(|(lun, w, e, p)| Bhs::AsyncMessage(AsyncMessage {
                    lun,
                    stat_sn: w[0],
                    exp_cmd_sn: w[1],
                    max_cmd_sn: w[2],
                    event: e[0],
                    vcode: e[1],
                    param1: p[0],
                    param2: p[1],
                    param3: p[2]
                })),
            (any::<u8>(), any::<[u32; 4]>()).prop_map(|(r, w)| Bhs::Reject(Reject {
                reason: r,
                stat_sn: w[0],
                exp_cmd_sn: w[1],
                max_cmd_sn: w[2],
                data_sn: w[3]
            })),
        ]
    }

    proptest! {
        /// Every PDU type round-trips through encode and parse, with AHS, data and digests.
        #[test]
        fn pdu_round_trip(bhs in any_bhs(), ahs_words in 0u8..4, data in proptest::collection::vec(any::<u8>(), 0..300), hd: bool, dd: bool) {
            let ahs = vec![0xa5u8; usize::from(ahs_words) * 4];
            let digests = Digests { header: hd, data: dd };
            let mut wire = Vec::new();
            encode_pdu(&mut wire, &bhs, &ahs, &data, digests);
            let limits = FrameLimits { digests, max_data_segment: 4096 };
            let info = frame_len(&wire, limits).unwrap().unwrap();
            prop_assert_eq!(info.total, wire.len());
            // Every strict prefix is "not enough bytes yet" or frames the same length.
            prop_assert_eq!(frame_len(&wire[..47], limits).unwrap(), None);
            let pdu = parse_pdu(&wire, info, digests).unwrap();
            prop_assert_eq!(&pdu.bhs, &bhs);
            prop_assert_eq!(pdu.ahs, &ahs[..]);
            prop_assert_eq!(pdu.data, &data[..]);
        }

        /// Any 48 bytes either parse or fail with an error; never panic.
        #[test]
        fn bhs_parse_total(bytes in any::<[u8; 32]>(), more in any::<[u8; 16]>()) {
            let mut b = [0u8; 48];
            b[..32].copy_from_slice(&bytes);
            b[32..].copy_from_slice(&more);
            let _ = Bhs::parse(&b);
        }
    }

    #[test]
    fn oversized_data_segment_is_refused_from_the_header_alone() {
        let mut wire = Vec::new();
        let bhs = Bhs::NopOut(NopOut {
            immediate: true,
            lun: 0,
            itt: 1,
            ttt: RESERVED_TAG,
            cmd_sn: 0,
            exp_stat_sn: 0,
        });
        encode_pdu(&mut wire, &bhs, &[], &[0u8; 9000], Digests::default());
        let limits = FrameLimits {
            digests: Digests::default(),
            max_data_segment: 8192,
        };
        assert_eq!(
            frame_len(&wire[..48], limits),
            Err(PduError::DataSegmentTooLarge {
                len: 9000,
                max: 8192
            })
        );
    }

    #[test]
    fn digest_mismatch_is_detected() {
        let bhs = Bhs::NopOut(NopOut {
            immediate: true,
            lun: 0,
            itt: 1,
            ttt: RESERVED_TAG,
            cmd_sn: 0,
            exp_stat_sn: 0,
        });
        let d = Digests {
            header: true,
            data: true,
        };
        let mut wire = Vec::new();
        encode_pdu(&mut wire, &bhs, &[], b"ping", d);
        let info = frame_len(
            &wire,
            FrameLimits {
                digests: d,
                max_data_segment: 100,
            },
        )
        .unwrap()
        .unwrap();
        let mut bad = wire.clone();
        bad[20] ^= 1;
        assert_eq!(parse_pdu(&bad, info, d), Err(PduError::HeaderDigest));
        let mut bad = wire.clone();
        bad[53] ^= 1;
        assert_eq!(parse_pdu(&bad, info, d), Err(PduError::DataDigest));
    }

    #[test]
    fn unknown_opcode() {
        let mut b = [0u8; 48];
        b[0] = 0x1c;
        assert_eq!(Bhs::parse(&b), Err(PduError::UnknownOpcode(0x1c)));
    }
}
