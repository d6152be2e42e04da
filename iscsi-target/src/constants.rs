//! Limits of the fabric, in one place, with their compile-time relations.
//!
//! Every buffer sized from network input is bounded by one of these before allocation.

/// Basic header segment length (RFC 7143 §11.2).
pub const BHS_LEN: usize = 48;

/// Largest AHS (TotalAHSLength is in 4-byte words, one byte wide).
pub const AHS_LEN_MAX: usize = 255 * 4;

/// Data segment we accept during login and in discovery sessions before negotiation
/// (the RFC 7143 default of MaxRecvDataSegmentLength).
pub const LOGIN_RECV_DSL: u32 = 8192;

/// MaxRecvDataSegmentLength this target declares (and so the largest data segment it accepts
/// after login).
pub const RECV_DSL_MAX: u32 = 256 * 1024;

/// Largest MaxBurstLength we agree to.
pub const MAX_BURST_MAX: u32 = 1024 * 1024;

/// Largest FirstBurstLength we agree to.
pub const FIRST_BURST_MAX: u32 = 256 * 1024;

/// Largest MaxOutstandingR2T we agree to.
pub const OUTSTANDING_R2T_MAX: u16 = 16;

/// Commands a session may have outstanding (CmdSN window).
pub const CMD_WINDOW_MAX: u32 = 128;

/// Largest expected data transfer length accepted for a write (the buffer is allocated up
/// front, so this bounds memory per command).
pub const WRITE_EDTL_MAX: u32 = 16 * 1024 * 1024;

/// Write data a connection may hold in buffers at once (received or expected). Beyond it, R2Ts
/// for the rest of a write wait until earlier writes finish; only first bursts (bounded by
/// FirstBurstLength x the CmdSN window) are taken regardless.
pub const WRITE_BUFFER_BUDGET_BYTES: usize = 64 * 1024 * 1024;

/// Concurrent normal sessions one target accepts on a portal.
pub const SESSIONS_PER_TARGET_MAX: usize = 256;

/// Connections open at once per portal, logged in or not (a login flood is cut here).
pub const CONNECTIONS_MAX: usize = 1024;

/// Concurrent normal sessions one initiator name may hold on a portal.
pub const SESSIONS_PER_INITIATOR_MAX: usize = 64;

/// Initiator mutual-CHAP challenges remembered to refuse replays.
pub const CHAP_CHALLENGES_REMEMBERED: usize = 4096;

/// Largest total of login or text key data accumulated across continued PDUs.
pub const TEXT_ACCUMULATED_MAX: usize = 64 * 1024;

/// Keys one login or text request may carry.
pub const TEXT_KEYS_MAX: usize = 256;

/// Key name and value length limits (RFC 7143 §6.1: 63 for names; 8192 for values).
pub const KEY_NAME_LEN_MAX: usize = 63;
/// See [`KEY_NAME_LEN_MAX`].
pub const KEY_VALUE_LEN_MAX: usize = 8192;

/// Seconds to complete a login before the connection is dropped.
pub const LOGIN_TIMEOUT_MS: u64 = 15_000;

/// Idle time after which the target pings the initiator with a NOP-In.
pub const NOP_INTERVAL_MS: u64 = 5_000;

/// Time the initiator has to answer a NOP-In ping before the connection is declared dead.
pub const NOP_TIMEOUT_MS: u64 = 15_000;

/// Grace period between the Async logout request on shutdown and closing the connection.
pub const SHUTDOWN_GRACE_MS: u64 = 2_000;

const _: () = assert!(FIRST_BURST_MAX <= MAX_BURST_MAX);
const _: () = assert!(RECV_DSL_MAX <= MAX_BURST_MAX);
const _: () = assert!(LOGIN_RECV_DSL <= RECV_DSL_MAX);
const _: () = assert!(OUTSTANDING_R2T_MAX as u32 <= CMD_WINDOW_MAX);
const _: () = assert!(RECV_DSL_MAX < (1 << 24));
const _: () = assert!(WRITE_EDTL_MAX as usize <= WRITE_BUFFER_BUDGET_BYTES);
