//! One iSCSI connection (= one session: MaxConnections is 1) as a sans-IO state machine.
//!
//! The driver feeds received bytes to [`Connection::handle_bytes`], command outcomes to
//! [`Connection::handle_outcome`] and the clock to [`Connection::handle_timeout`]; it drains
//! [`Connection::poll_transmit`] (bytes to send), [`Connection::poll_event`] (commands to run,
//! logins to register, close requests) and sleeps until [`Connection::poll_timeout`].
//!
//! Invariants:
//! - Nothing is buffered for a PDU before its header lengths were checked against the limit
//!   we declared; a write's buffer is allocated once, sized by its expected transfer length,
//!   which is bounded by [`WRITE_EDTL_MAX`].
//! - Non-immediate commands execute in CmdSN order; commands outside the window
//!   `[ExpCmdSN, MaxCmdSN]` are ignored (RFC 7143 §4.2.2.1); at most [`CMD_WINDOW_MAX`]
//!   tasks are outstanding, and MaxCmdSN never moves backwards.
//! - Every response that carries status consumes exactly one StatSN.
//! - A task is answered at most once; an aborted task is never answered, and a task
//!   management response is sent only after the tasks it aborted have stopped.
//! - Malformed input yields a Reject, a login failure status or a close, never a panic.
//!
//! Not here: sockets and tasks (the driver), SCSI semantics (`lun`).

use super::chap::{self, ChapConfig};
use super::params::{self, SessionParams};
use super::pdu::{self, *};
use super::serial::Sn;
use super::text;
use crate::config::FabricConfig;
use crate::constants::*;
use lun::{CommandOutcome, ItNexus, ScsiCommand, TaskAttr};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the driver must do.
#[derive(Debug)]
pub enum Event {
    /// Run this command and call [`Connection::handle_outcome`] with its ITT.
    Execute {
        /// Initiator task tag.
        itt: u32,
        /// The command.
        cmd: ScsiCommand,
    },
    /// A normal session finished login: close any older session with the same
    /// initiator, ISID and target (session reinstatement, RFC 7143 §6.3.5).
    LoggedIn {
        /// Initiator name.
        initiator_name: String,
        /// ISID.
        isid: u64,
        /// Target name.
        target: String,
        /// Our TSIH.
        tsih: u16,
    },
    /// CLEAR TASK SET from this session: the device server ends every task of the LU, on all
    /// nexuses.
    ClearTaskSet {
        /// The nexus that asked.
        nexus: ItNexus,
        /// The LUN field.
        lun: u64,
    },
    /// LOGICAL UNIT RESET (`lun` set) or a target reset (`lun` None) from this session: the
    /// device server releases SPC-2 reservations and raises unit attentions for other nexuses.
    Reset {
        /// The nexus that asked.
        nexus: ItNexus,
        /// The LUN field, for a logical unit reset.
        lun: Option<u64>,
    },
    /// Send what is queued, then close the connection.
    Close {
        /// Why, for the log.
        reason: String,
    },
}

/// Fatal errors: the driver closes the connection (after sending what is queued).
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The stream cannot be framed any more.
    #[error("{0}")]
    Pdu(#[from] PduError),
    /// The peer broke the protocol in a way that ends the connection at ERL 0.
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
}

/// Reject reasons (RFC 7143 §11.17.1).
mod reject {
    pub const DATA_DIGEST: u8 = 0x02;
    pub const PROTOCOL_ERROR: u8 = 0x04;
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x05;
    pub const INVALID_PDU_FIELD: u8 = 0x09;
}

/// Login status (class, detail) (RFC 7143 §11.13.5).
mod status {
    pub const INITIATOR_ERROR: (u8, u8) = (0x02, 0x00);
    pub const AUTH_FAILURE: (u8, u8) = (0x02, 0x01);
    pub const NOT_FOUND: (u8, u8) = (0x02, 0x03);
    pub const AUTHORIZATION_FAILURE: (u8, u8) = (0x02, 0x02);
    pub const OUT_OF_RESOURCES: (u8, u8) = (0x03, 0x02);
    pub const UNSUPPORTED_VERSION: (u8, u8) = (0x02, 0x05);
    pub const MISSING_PARAMETER: (u8, u8) = (0x02, 0x07);
    pub const SESSION_DOES_NOT_EXIST: (u8, u8) = (0x02, 0x0a);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Login,
    FullFeature,
    Closing,
}

#[derive(Debug, PartialEq, Eq)]
enum Auth {
    /// No authentication configured.
    Open,
    /// CHAP required; waiting for AuthMethod.
    ChapStart,
    /// AuthMethod=CHAP agreed; waiting for CHAP_A.
    ChapMethod,
    /// Challenge sent.
    ChapChallenged {
        id: u8,
        challenge: [u8; chap::CHALLENGE_LEN],
    },
    /// Authenticated.
    Done,
}

#[derive(Debug)]
struct Login {
    started: bool,
    isid: u64,
    cid: u16,
    pending: Vec<u8>,
    auth: Auth,
    chap: Option<ChapConfig>,
    discovery: bool,
    declared: bool,
}

#[derive(Debug)]
struct R2tState {
    ttt: u32,
    offset: u32,
    len: u32,
    received: u32,
    data_sn: u32,
}

#[derive(Debug)]
enum TaskState {
    /// Receiving Data-Out.
    Receiving,
    /// Handed to the device server.
    Executing,
}

impl Task {
    /// Data-Out expected: the W bit and a non-zero expected length.
    fn expects_data_out(&self) -> bool {
        self.write_flag && self.edtl > 0
    }
}

#[derive(Debug)]
struct Task {
    lun: u64,
    cdb: Vec<u8>,
    attr: TaskAttr,
    edtl: u32,
    /// The W bit: residuals are computed against what the CDB wanted to write.
    write_flag: bool,
    buf: Vec<u8>,
    /// Bytes of `buf` counted against the connection's write budget (kept until the task
    /// leaves, since the device server holds the buffer while it executes).
    accounted: usize,
    /// Contiguous bytes received from offset 0.
    received: u32,
    unsolicited_open: bool,
    unsolicited_data_sn: u32,
    r2ts: Vec<R2tState>,
    next_r2t_offset: u32,
    r2t_sn: u32,
    state: TaskState,
    aborted: bool,
    /// A response decided before execution (e.g. a transfer too large to buffer); sent when
    /// the unsolicited data has been swallowed.
    early: Option<CommandOutcome>,
}

#[derive(Debug)]
struct PendingTmf {
    itt: u32,
    waiting: HashSet<u32>,
    response: u8,
    close_after: bool,
}

/// A non-immediate PDU that arrived ahead of ExpCmdSN.
#[derive(Debug)]
struct Queued {
    bhs: Bhs,
    ahs: Vec<u8>,
    data: Vec<u8>,
}

#[derive(Debug)]
struct TextContinuation {
    itt: u32,
    ttt: u32,
    rest: Vec<u8>,
}

/// The connection.
#[derive(Debug)]
pub struct Connection {
    cfg: Arc<FabricConfig>,
    tsih: u16,
    phase: Phase,
    login: Login,
    params: SessionParams,
    digests: Digests,
    target: Option<usize>,
    initiator_name: String,
    exp_cmd_sn: Sn,
    max_cmd_sn: Sn,
    stat_sn: u32,
    tasks: HashMap<u32, Task>,
    queued: BTreeMap<u32, Queued>,
    tmfs: Vec<PendingTmf>,
    next_ttt: u32,
    text_cont: Option<TextContinuation>,
    text_accum: Vec<u8>,
    /// ITTs of writes failed during their data phase: their remaining Data-Out is dropped
    /// silently (bounded; oldest forgotten first).
    discard_itts: VecDeque<u32>,
    /// This session's place within the portal's session limits (normal sessions).
    slot: Option<crate::config::SessionSlot>,
    /// Write buffer bytes held by tasks of this connection.
    write_bytes: usize,
    /// Writes waiting for budget before their R2Ts go out, oldest first.
    r2t_waiting: VecDeque<u32>,
    nop: Option<(u32, Instant)>,
    last_rx: Instant,
    login_deadline: Instant,
    shutdown_deadline: Option<Instant>,
    /// Pieces queued for the peer before `out` (see [`Transmit`]).
    tx: Vec<Piece>,
    out: Vec<u8>,
    /// Sent byte buffers kept for their capacity ([`Connection::recycle`]), so building
    /// responses does not grow a fresh vector every time.
    spare: Vec<Vec<u8>>,
    events: VecDeque<Event>,
}

/// A Data-In data segment at least this long is sent from the read's own buffers (a vectored
/// write) instead of being copied behind its header; shorter ones cost less to copy than an
/// extra I/O vector.
const VECTORED_MIN: usize = 16 << 10;

/// Most sent buffers a connection keeps for reuse, and the largest it keeps.
const SPARES: usize = 4;
const SPARE_MAX: usize = 1 << 20;

/// One piece of what is queued for the peer.
#[derive(Debug)]
enum Piece {
    /// Bytes built here (PDU headers, small data segments, padding, digests).
    Bytes(Vec<u8>),
    /// Bytes `[at, at + len)` of a command's Data-In, where the read left them.
    Data {
        data: Arc<lun::DataIn>,
        at: usize,
        len: usize,
    },
}

/// Everything queued for the peer, in order, for one vectored write: bytes built by the
/// connection and large Data-In segments by reference to the buffers they were read into
/// ([`Connection::poll_transmit_vectored`]). Holding it keeps those buffers alive until
/// [`Connection::recycle`] takes it back after the write.
#[derive(Debug, Default)]
pub struct Transmit {
    pieces: Vec<Piece>,
}

impl Transmit {
    /// The bytes when they are one buffer built here (no Data-In by reference): the common
    /// case, written without building I/O vectors.
    #[must_use]
    pub fn single(&self) -> Option<&[u8]> {
        match self.pieces.as_slice() {
            [Piece::Bytes(b)] => Some(b),
            _ => None,
        }
    }
    /// The bytes, in order, as the slices they are held in (for `write_vectored`).
    #[must_use]
    pub fn io_slices(&self) -> Vec<std::io::IoSlice<'_>> {
        let mut out = Vec::with_capacity(self.pieces.len());
        for p in &self.pieces {
            match p {
                Piece::Bytes(b) => out.push(std::io::IoSlice::new(b)),
                Piece::Data { data, at, len } => {
                    data.slices(*at, *len, |s| out.push(std::io::IoSlice::new(s)));
                }
            }
        }
        out
    }
}

impl Connection {
    /// A new connection accepted at `now`, which will use `tsih` if it logs in.
    ///
    /// # Panics
    /// If `tsih` is zero (reserved by RFC 7143).
    pub fn new(cfg: Arc<FabricConfig>, tsih: u16, now: Instant) -> Self {
        assert_ne!(tsih, 0, "TSIH 0 is reserved");
        let login_deadline = now + Duration::from_millis(cfg.timers.login_timeout_ms);
        Self {
            cfg,
            tsih,
            phase: Phase::Login,
            login: Login {
                started: false,
                isid: 0,
                cid: 0,
                pending: Vec::new(),
                auth: Auth::Open,
                chap: None,
                discovery: false,
                declared: false,
            },
            params: SessionParams::default(),
            digests: Digests::default(),
            target: None,
            initiator_name: String::new(),
            exp_cmd_sn: Sn(0),
            max_cmd_sn: Sn(0),
            stat_sn: 0x1000,
            tasks: HashMap::new(),
            queued: BTreeMap::new(),
            tmfs: Vec::new(),
            next_ttt: 1,
            text_cont: None,
            text_accum: Vec::new(),
            discard_itts: VecDeque::new(),
            slot: None,
            write_bytes: 0,
            r2t_waiting: VecDeque::new(),
            nop: None,
            last_rx: now,
            login_deadline,
            shutdown_deadline: None,
            tx: Vec::new(),
            out: Vec::new(),
            spare: Vec::new(),
            events: VecDeque::new(),
        }
    }

    /// The negotiated parameters.
    pub fn params(&self) -> &SessionParams {
        &self.params
    }

    /// Whether login completed.
    pub fn is_full_feature(&self) -> bool {
        self.phase == Phase::FullFeature
    }

    /// The device server of the target this session logged in to.
    pub fn device(&self) -> Option<Arc<lun::DeviceServer>> {
        self.target.map(|i| Arc::clone(&self.cfg.targets[i].device))
    }

    /// The I_T nexus of a logged-in normal session (the device server tracks reservations and
    /// unit attentions by it; the driver reports it lost when the connection ends).
    pub fn nexus(&self) -> Option<ItNexus> {
        (self.target.is_some() && self.phase != Phase::Login).then(|| ItNexus {
            initiator_name: self.initiator_name.clone(),
            isid: self.login.isid,
            relative_port: self.cfg.relative_port,
        })
    }

    /// Outstanding tasks (receiving data or executing).
    pub fn tasks_in_flight(&self) -> usize {
        self.tasks.len()
    }

    fn limits(&self) -> FrameLimits {
        let max = if self.phase == Phase::Login {
            LOGIN_RECV_DSL
        } else {
            self.params.target_mrdsl
        };
        FrameLimits {
            digests: self.digests,
            max_data_segment: max,
        }
    }

    /// Consumes complete PDUs from `input`; returns the bytes consumed. Leftover bytes (a
    /// partial PDU) must be offered again with more data appended.
    ///
    /// # Errors
    /// A [`ConnectionError`] means: send what [`Self::poll_transmit`] holds, then close.
    pub fn handle_bytes(&mut self, now: Instant, input: &[u8]) -> Result<usize, ConnectionError> {
        let mut pos = 0;
        while self.phase != Phase::Closing {
            let limits = self.limits();
            let info = match frame_len(&input[pos..], limits) {
                Ok(Some(i)) => i,
                Ok(None) => break,
                Err(e) => {
                    if let Some(hdr) = input.get(pos..pos + BHS_LEN) {
                        self.reject(reject::PROTOCOL_ERROR, hdr);
                    }
                    return Err(e.into());
                }
            };
            if input.len() - pos < info.total {
                break;
            }
            let frame = &input[pos..pos + info.total];
            pos += info.total;
            self.last_rx = now;
            let hdr: [u8; BHS_LEN] = frame[..BHS_LEN].try_into().expect("frame holds a BHS");
            match parse_pdu(frame, info, self.digests) {
                Ok(p) => self.handle_pdu(now, p, &hdr)?,
                Err(PduError::UnknownOpcode(op)) => {
                    tracing::debug!(opcode = op, "unknown opcode");
                    self.reject(reject::COMMAND_NOT_SUPPORTED, &hdr);
                }
                Err(PduError::DataDigest) => {
                    // ERL 0: the data is lost and the command cannot be recovered.
                    self.reject(reject::DATA_DIGEST, &hdr);
                    return Err(PduError::DataDigest.into());
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(pos)
    }

    /// Moves every byte queued for the peer into `buf` (copying any Data-In held by
    /// reference). Returns whether anything was moved.
    pub fn poll_transmit(&mut self, buf: &mut Vec<u8>) -> bool {
        if self.out.is_empty() && self.tx.is_empty() {
            return false;
        }
        for p in self.tx.drain(..) {
            match p {
                Piece::Bytes(b) => buf.extend_from_slice(&b),
                Piece::Data { data, at, len } => data.extend_into(at, len, buf),
            }
        }
        if buf.is_empty() {
            std::mem::swap(buf, &mut self.out);
        } else {
            buf.append(&mut self.out);
        }
        true
    }

    /// Moves everything queued for the peer into `t`, large Data-In segments by reference
    /// (no copy; see [`Transmit`]). Returns whether anything was moved.
    pub fn poll_transmit_vectored(&mut self, t: &mut Transmit) -> bool {
        if self.out.is_empty() && self.tx.is_empty() {
            return false;
        }
        t.pieces.append(&mut self.tx);
        if !self.out.is_empty() {
            let out = self.take_out();
            t.pieces.push(Piece::Bytes(out));
        }
        true
    }

    /// Takes back what `t` held once it was sent: its byte buffers are kept (emptied, up to
    /// [`SPARES`] of them, none over [`SPARE_MAX`]) for the responses built next.
    pub fn recycle(&mut self, t: &mut Transmit) {
        for p in t.pieces.drain(..) {
            if let Piece::Bytes(mut b) = p {
                if self.spare.len() < SPARES && b.capacity() <= SPARE_MAX {
                    b.clear();
                    self.spare.push(b);
                }
            }
        }
    }

    /// The bytes built so far, replaced by a kept buffer when there is one.
    fn take_out(&mut self) -> Vec<u8> {
        let fresh = self.spare.pop().unwrap_or_default();
        std::mem::replace(&mut self.out, fresh)
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Self::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let t = &self.cfg.timers;
        match self.phase {
            Phase::Closing => None,
            Phase::Login => Some(self.login_deadline),
            Phase::FullFeature => {
                let nop = match self.nop {
                    Some((_, deadline)) => deadline,
                    None => self.last_rx + Duration::from_millis(t.nop_interval_ms),
                };
                Some(self.shutdown_deadline.map_or(nop, |s| s.min(nop)))
            }
        }
    }

    /// Advances timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.phase {
            Phase::Closing => {}
            Phase::Login => {
                if now >= self.login_deadline {
                    self.close("login did not complete in time");
                }
            }
            Phase::FullFeature => {
                if self.shutdown_deadline.is_some_and(|d| now >= d) {
                    self.close("shutting down");
                    return;
                }
                match self.nop {
                    Some((_, deadline)) if now >= deadline => {
                        self.close("initiator stopped answering NOP-In pings (dead connection)");
                    }
                    Some(_) => {}
                    None => {
                        let idle = Duration::from_millis(self.cfg.timers.nop_interval_ms);
                        if now >= self.last_rx + idle {
                            let ttt = self.alloc_ttt();
                            let nop = Bhs::NopIn(NopIn {
                                lun: 0,
                                itt: RESERVED_TAG,
                                ttt,
                                stat_sn: self.stat_sn,
                                exp_cmd_sn: self.exp_cmd_sn.0,
                                max_cmd_sn: self.window_max().0,
                            });
                            self.send(&nop, &[]);
                            let deadline =
                                now + Duration::from_millis(self.cfg.timers.nop_timeout_ms);
                            self.nop = Some((ttt, deadline));
                        }
                    }
                }
            }
        }
    }

    /// Asks the initiator to log out (Async Message, event 1) and closes after a grace period.
    pub fn handle_shutdown(&mut self, now: Instant) {
        if self.phase != Phase::FullFeature || self.login.discovery {
            self.close("shutting down");
            return;
        }
        let grace = Duration::from_millis(SHUTDOWN_GRACE_MS);
        let msg = Bhs::AsyncMessage(AsyncMessage {
            lun: 0,
            stat_sn: self.stat_sn,
            exp_cmd_sn: self.exp_cmd_sn.0,
            max_cmd_sn: self.window_max().0,
            event: 1,
            vcode: 0,
            param1: 0,
            param2: 0,
            param3: grace.as_secs().max(1) as u16,
        });
        self.send(&msg, &[]);
        self.shutdown_deadline = Some(now + grace);
    }

    fn close(&mut self, reason: &str) {
        if self.phase != Phase::Closing {
            self.phase = Phase::Closing;
            self.events.push_back(Event::Close {
                reason: reason.to_owned(),
            });
        }
    }

    fn alloc_ttt(&mut self) -> u32 {
        let t = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1);
        if self.next_ttt == RESERVED_TAG {
            self.next_ttt = 1;
        }
        t
    }

    fn send(&mut self, bhs: &Bhs, data: &[u8]) {
        encode_pdu(&mut self.out, bhs, &[], data, self.digests);
    }

    fn take_stat_sn(&mut self) -> u32 {
        let s = self.stat_sn;
        self.stat_sn = self.stat_sn.wrapping_add(1);
        s
    }

    /// MaxCmdSN: the window shrinks by the tasks outstanding and never moves backwards.
    fn window_max(&mut self) -> Sn {
        let open = CMD_WINDOW_MAX.saturating_sub(self.tasks.len() as u32);
        let candidate = self.exp_cmd_sn.plus(open).plus(u32::MAX); // exp + open - 1
        if self.max_cmd_sn.lt(candidate) {
            self.max_cmd_sn = candidate;
        }
        self.max_cmd_sn
    }

    fn reject(&mut self, reason: u8, hdr: &[u8]) {
        tracing::debug!(reason, opcode = hdr[0] & 0x3f, "reject");
        let bhs = Bhs::Reject(Reject {
            reason,
            stat_sn: self.take_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn.0,
            max_cmd_sn: self.window_max().0,
            data_sn: 0,
        });
        let hdr = hdr[..BHS_LEN.min(hdr.len())].to_vec();
        self.send(&bhs, &hdr);
    }

    fn handle_pdu(
        &mut self,
        now: Instant,
        p: PduRef<'_>,
        hdr: &[u8; BHS_LEN],
    ) -> Result<(), ConnectionError> {
        match self.phase {
            Phase::Login => match p.bhs {
                Bhs::LoginRequest(req) => {
                    self.handle_login(req, p.data);
                    Ok(())
                }
                _ => {
                    // RFC 7143 §6.3: only Login Requests before login completes.
                    self.fail_login(0, status::INITIATOR_ERROR, "non-login PDU during login");
                    Ok(())
                }
            },
            Phase::FullFeature => self.handle_ffp(now, p, hdr),
            Phase::Closing => Ok(()),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Login (RFC 7143 §6).

    fn login_response(
        &mut self,
        req: &LoginRequest,
        transit: bool,
        nsg: u8,
        status: (u8, u8),
        data: &[u8],
    ) {
        let exp = Sn(req.cmd_sn);
        self.exp_cmd_sn = exp;
        let bhs = Bhs::LoginResponse(LoginResponse {
            transit,
            cont: false,
            csg: req.csg,
            nsg: if transit { nsg } else { 0 },
            version_max: 0,
            version_active: 0,
            isid: req.isid,
            tsih: if transit && nsg == 3 {
                self.tsih
            } else {
                req.tsih
            },
            itt: req.itt,
            stat_sn: self.take_stat_sn(),
            exp_cmd_sn: exp.0,
            max_cmd_sn: exp.plus(CMD_WINDOW_MAX - 1).0,
            status_class: status.0,
            status_detail: status.1,
        });
        // Login PDUs never carry digests (they start after the final response).
        encode_pdu(&mut self.out, &bhs, &[], data, Digests::default());
    }

    fn fail_login(&mut self, itt: u32, st: (u8, u8), why: &str) {
        tracing::info!(initiator = %self.initiator_name, status_class = st.0, status_detail = st.1, why, "login refused");
        let req = LoginRequest {
            transit: false,
            cont: false,
            csg: 0,
            nsg: 0,
            version_max: 0,
            version_min: 0,
            isid: self.login.isid,
            tsih: 0,
            itt,
            cid: self.login.cid,
            cmd_sn: self.exp_cmd_sn.0,
            exp_stat_sn: 0,
        };
        self.login_response(&req, false, 0, st, &[]);
        self.close(&format!("login refused: {why}"));
    }

    fn handle_login(&mut self, req: LoginRequest, data: &[u8]) {
        if req.version_min > 0 {
            return self.fail_login(
                req.itt,
                status::UNSUPPORTED_VERSION,
                "unsupported iSCSI version",
            );
        }
        if self.login.started && (req.isid != self.login.isid || req.cid != self.login.cid) {
            return self.fail_login(
                req.itt,
                status::INITIATOR_ERROR,
                "ISID or CID changed during login",
            );
        }
        if self.login.pending.len() + data.len() > TEXT_ACCUMULATED_MAX {
            return self.fail_login(req.itt, status::INITIATOR_ERROR, "login text too long");
        }
        self.login.pending.extend_from_slice(data);
        if req.cont {
            // RFC 7143 §11.12.2: answer each continued PDU with an empty response.
            return self.login_response(&req, false, 0, (0, 0), &[]);
        }
        let keys = match text::parse(&std::mem::take(&mut self.login.pending)) {
            Ok(k) => k,
            Err(e) => {
                tracing::debug!(cause = %e, "bad login text");
                return self.fail_login(req.itt, status::INITIATOR_ERROR, "malformed login keys");
            }
        };
        let get = |k: &str| keys.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let mut resp: Vec<(String, String)> = Vec::new();
        if !self.login.started {
            self.login.started = true;
            self.login.isid = req.isid;
            self.login.cid = req.cid;
            let Some(name) = get("InitiatorName").filter(|n| !n.is_empty()) else {
                return self.fail_login(
                    req.itt,
                    status::MISSING_PARAMETER,
                    "InitiatorName missing",
                );
            };
            self.initiator_name = name.to_owned();
            let discovery = match get("SessionType").unwrap_or("Normal") {
                "Normal" => false,
                "Discovery" => true,
                _ => {
                    return self.fail_login(req.itt, status::INITIATOR_ERROR, "invalid SessionType")
                }
            };
            self.login.discovery = discovery;
            if req.tsih != 0 {
                return self.fail_login(
                    req.itt,
                    status::SESSION_DOES_NOT_EXIST,
                    "adding connections to a session is not supported (MaxConnections=1)",
                );
            }
            if discovery {
                self.login.chap = self.cfg.discovery_chap.clone();
            } else {
                let Some(tname) = get("TargetName") else {
                    return self.fail_login(
                        req.itt,
                        status::MISSING_PARAMETER,
                        "TargetName missing",
                    );
                };
                let Some(idx) = self.cfg.targets.iter().position(|t| t.name == tname) else {
                    return self.fail_login(req.itt, status::NOT_FOUND, "no such target");
                };
                if !self.cfg.targets[idx].allows(&self.initiator_name) {
                    return self.fail_login(
                        req.itt,
                        status::AUTHORIZATION_FAILURE,
                        "initiator not on the target's allow-list",
                    );
                }
                self.target = Some(idx);
                self.login.chap = self.cfg.targets[idx].chap.clone();
                // INTEROP: the TPGT in the first response of a normal session.
                resp.push(("TargetPortalGroupTag".into(), self.cfg.tpgt.to_string()));
                if let Some(alias) = &self.cfg.targets[idx].alias {
                    resp.push(("TargetAlias".into(), alias.clone()));
                }
            }
            if self.login.chap.is_some() {
                self.login.auth = Auth::ChapStart;
            }
        }
        let is_security = |k: &str| k == "AuthMethod" || k.starts_with("CHAP_");
        let (sec, op): (Vec<_>, Vec<_>) = keys.iter().cloned().partition(|(k, _)| is_security(k));
        match req.csg {
            0 => {
                if let Err(why) = self.security_keys(&sec, &mut resp) {
                    return self.fail_login(req.itt, status::AUTH_FAILURE, why);
                }
            }
            1 => {
                if !sec.is_empty() {
                    return self.fail_login(
                        req.itt,
                        status::INITIATOR_ERROR,
                        "security keys in the operational stage",
                    );
                }
                if !matches!(self.login.auth, Auth::Open | Auth::Done) {
                    return self.fail_login(
                        req.itt,
                        status::AUTH_FAILURE,
                        "authentication required",
                    );
                }
            }
            _ => return self.fail_login(req.itt, status::INITIATOR_ERROR, "invalid current stage"),
        }
        let authenticated = matches!(self.login.auth, Auth::Open | Auth::Done);
        let transit = req.transit && authenticated;
        if req.transit
            && !authenticated
            && !matches!(
                self.login.auth,
                Auth::ChapMethod | Auth::ChapChallenged { .. }
            )
        {
            return self.fail_login(
                req.itt,
                status::AUTH_FAILURE,
                "authentication not completed",
            );
        }
        if transit && (req.nsg <= req.csg || req.nsg == 2) {
            return self.fail_login(req.itt, status::INITIATOR_ERROR, "invalid next stage");
        }
        let entering_op = req.csg == 1 || (transit && req.nsg >= 1);
        let declare = entering_op && !self.login.declared;
        self.login.declared |= declare;
        let discovery = self.login.discovery;
        resp.extend(params::negotiate(&mut self.params, &op, discovery, declare));
        let data = text::encode(&resp);
        if data.len() > LOGIN_RECV_DSL as usize {
            return self.fail_login(
                req.itt,
                status::INITIATOR_ERROR,
                "login response would exceed 8192 bytes",
            );
        }
        if transit && req.nsg == 3 {
            if let Some(idx) = self.target {
                match self.cfg.limits.try_acquire(idx, &self.initiator_name) {
                    Some(slot) => self.slot = Some(slot),
                    None => {
                        return self.fail_login(
                            req.itt,
                            status::OUT_OF_RESOURCES,
                            "session limit reached for this target or initiator",
                        )
                    }
                }
            }
        }
        self.login_response(&req, transit, req.nsg, (0, 0), &data);
        if transit && req.nsg == 3 {
            self.enter_full_feature(req.cmd_sn);
        }
    }

    fn security_keys(
        &mut self,
        keys: &[(String, String)],
        resp: &mut Vec<(String, String)>,
    ) -> Result<(), &'static str> {
        let get = |k: &str| keys.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        if let Some(methods) = get("AuthMethod") {
            let offered: Vec<&str> = methods.split(',').collect();
            match self.login.auth {
                Auth::Open => {
                    if !offered.contains(&"None") {
                        return Err(
                            "initiator requires authentication the target does not have configured",
                        );
                    }
                    resp.push(("AuthMethod".into(), "None".into()));
                }
                Auth::ChapStart => {
                    if !offered.contains(&"CHAP") {
                        return Err("target requires CHAP; initiator did not offer it");
                    }
                    resp.push(("AuthMethod".into(), "CHAP".into()));
                    self.login.auth = Auth::ChapMethod;
                }
                _ => return Err("AuthMethod negotiated twice"),
            }
        }
        if let Some(algs) = get("CHAP_A") {
            if self.login.auth != Auth::ChapMethod {
                return Err("CHAP_A out of sequence");
            }
            if !algs.split(',').any(|a| a == "5") {
                return Err("no supported CHAP algorithm (only MD5, CHAP_A=5)");
            }
            let id = chap::random_bytes::<1>()[0];
            let challenge = chap::random_bytes::<{ chap::CHALLENGE_LEN }>();
            resp.push(("CHAP_A".into(), "5".into()));
            resp.push(("CHAP_I".into(), id.to_string()));
            resp.push(("CHAP_C".into(), chap::encode_hex(&challenge)));
            self.login.auth = Auth::ChapChallenged { id, challenge };
        }
        if let Some(r) = get("CHAP_R") {
            let Auth::ChapChallenged { id, challenge } = self.login.auth else {
                return Err("CHAP_R out of sequence");
            };
            let cfg = self.login.chap.clone().expect("CHAP state implies config");
            let name = get("CHAP_N").ok_or("CHAP_N missing")?;
            let r = chap::decode_binary(r).ok_or("CHAP_R malformed")?;
            // Compare both so the timing does not reveal which one was wrong.
            let name_ok = name == cfg.initiator.user;
            let resp_ok = chap::verify(id, &cfg.initiator.secret, &challenge, &r);
            if !(name_ok && resp_ok) {
                return Err("wrong CHAP name or secret");
            }
            match (get("CHAP_I"), get("CHAP_C")) {
                (Some(i), Some(c)) => {
                    let mutual = cfg
                        .mutual
                        .as_ref()
                        .ok_or("mutual CHAP requested but not configured")?;
                    let i: u8 = params::parse_number(i)
                        .and_then(|v| u8::try_from(v).ok())
                        .ok_or("CHAP_I malformed")?;
                    let c = chap::decode_binary(c).ok_or("CHAP_C malformed")?;
                    if c == challenge {
                        return Err("initiator reflected the target's challenge");
                    }
                    if !self.cfg.chap_challenges.note(&c) {
                        return Err("initiator reused a mutual CHAP challenge (replay)");
                    }
                    resp.push(("CHAP_N".into(), mutual.user.clone()));
                    resp.push((
                        "CHAP_R".into(),
                        chap::encode_hex(&chap::response(i, &mutual.secret, &c)),
                    ));
                }
                (None, None) => {}
                _ => return Err("CHAP_I and CHAP_C must come together"),
            }
            self.login.auth = Auth::Done;
        }
        Ok(())
    }

    fn enter_full_feature(&mut self, cmd_sn: u32) {
        self.phase = Phase::FullFeature;
        self.digests = Digests {
            header: self.params.header_digest,
            data: self.params.data_digest,
        };
        self.exp_cmd_sn = Sn(cmd_sn);
        self.max_cmd_sn = Sn(cmd_sn).plus(CMD_WINDOW_MAX - 1);
        tracing::info!(
            initiator = %self.initiator_name,
            isid = format_args!("{:012x}", self.login.isid),
            tsih = self.tsih,
            discovery = self.login.discovery,
            "login complete"
        );
        if let Some(i) = self.target {
            self.events.push_back(Event::LoggedIn {
                initiator_name: self.initiator_name.clone(),
                isid: self.login.isid,
                target: self.cfg.targets[i].name.clone(),
                tsih: self.tsih,
            });
        }
    }

    // -----------------------------------------------------------------------------------------
    // Full feature phase.

    fn handle_ffp(
        &mut self,
        now: Instant,
        p: PduRef<'_>,
        hdr: &[u8; BHS_LEN],
    ) -> Result<(), ConnectionError> {
        let (cmd_sn, immediate) = match &p.bhs {
            Bhs::ScsiCommand(c) => (c.cmd_sn, c.immediate),
            Bhs::NopOut(n) => (n.cmd_sn, n.immediate || n.itt == RESERVED_TAG),
            Bhs::TaskMgmtRequest(t) => (t.cmd_sn, t.immediate),
            Bhs::TextRequest(t) => (t.cmd_sn, t.immediate),
            Bhs::LogoutRequest(l) => (l.cmd_sn, l.immediate),
            Bhs::DataOut(d) => return self.handle_data_out(d.clone(), p.data, hdr),
            Bhs::SnackRequest(_) => {
                // ERL 0 has no SNACK (RFC 7143 §11.16).
                self.reject(reject::PROTOCOL_ERROR, hdr);
                return Ok(());
            }
            Bhs::LoginRequest(_) => {
                self.reject(reject::PROTOCOL_ERROR, hdr);
                return Ok(());
            }
            _ => {
                // A target-to-initiator opcode sent by the initiator.
                self.reject(reject::PROTOCOL_ERROR, hdr);
                return Ok(());
            }
        };
        if immediate {
            return self.execute_ordered(now, p.bhs, p.ahs, p.data, hdr);
        }
        let sn = Sn(cmd_sn);
        let max = self.window_max();
        if sn == self.exp_cmd_sn {
            self.exp_cmd_sn = self.exp_cmd_sn.plus(1);
            self.execute_ordered(now, p.bhs, p.ahs, p.data, hdr)?;
            self.drain_queued(now)?;
        } else if sn.in_window(self.exp_cmd_sn, max) {
            if self.queued.len() < CMD_WINDOW_MAX as usize && !self.queued.contains_key(&cmd_sn) {
                self.queued.insert(
                    cmd_sn,
                    Queued {
                        bhs: p.bhs,
                        ahs: p.ahs.to_vec(),
                        data: p.data.to_vec(),
                    },
                );
            }
        } else {
            tracing::debug!(
                cmd_sn,
                exp = self.exp_cmd_sn.0,
                max = max.0,
                "command outside the CmdSN window ignored"
            );
        }
        Ok(())
    }

    fn drain_queued(&mut self, now: Instant) -> Result<(), ConnectionError> {
        while let Some(q) = self.queued.remove(&self.exp_cmd_sn.0) {
            self.exp_cmd_sn = self.exp_cmd_sn.plus(1);
            let mut hdr = [0u8; BHS_LEN];
            q.bhs
                .encode(&mut hdr, (q.ahs.len() / 4) as u8, q.data.len() as u32);
            self.execute_ordered(now, q.bhs, &q.ahs, &q.data, &hdr)?;
        }
        Ok(())
    }

    fn execute_ordered(
        &mut self,
        now: Instant,
        bhs: Bhs,
        ahs: &[u8],
        data: &[u8],
        hdr: &[u8; BHS_LEN],
    ) -> Result<(), ConnectionError> {
        match bhs {
            Bhs::ScsiCommand(c) => self.start_command(c, ahs, data, hdr),
            Bhs::NopOut(n) => {
                self.handle_nop_out(now, n, data, hdr);
                Ok(())
            }
            Bhs::TaskMgmtRequest(t) => {
                self.handle_tmf(t);
                Ok(())
            }
            Bhs::TextRequest(t) => {
                self.handle_text(t, data, hdr);
                Ok(())
            }
            Bhs::LogoutRequest(l) => {
                self.handle_logout(l);
                Ok(())
            }
            _ => unreachable!("only ordered PDUs reach here"),
        }
    }

    fn handle_nop_out(&mut self, _now: Instant, n: NopOut, data: &[u8], hdr: &[u8; BHS_LEN]) {
        if n.itt == RESERVED_TAG {
            if n.ttt == RESERVED_TAG {
                return; // a one-way NOP-Out: nothing to answer
            }
            match self.nop {
                Some((ttt, _)) if ttt == n.ttt => self.nop = None,
                _ => self.reject(reject::INVALID_PDU_FIELD, hdr),
            }
            return;
        }
        if n.ttt != RESERVED_TAG {
            return self.reject(reject::INVALID_PDU_FIELD, hdr);
        }
        let echo_len = data.len().min(self.params.initiator_mrdsl as usize);
        let bhs = Bhs::NopIn(NopIn {
            lun: n.lun,
            itt: n.itt,
            ttt: RESERVED_TAG,
            stat_sn: self.take_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn.0,
            max_cmd_sn: self.window_max().0,
        });
        self.send(&bhs, &data[..echo_len]);
    }

    fn start_command(
        &mut self,
        c: ScsiCommandPdu,
        ahs: &[u8],
        data: &[u8],
        hdr: &[u8; BHS_LEN],
    ) -> Result<(), ConnectionError> {
        if self.login.discovery {
            self.reject(reject::COMMAND_NOT_SUPPORTED, hdr);
            return Ok(());
        }
        if self.tasks.contains_key(&c.itt) {
            self.reject(reject::INVALID_PDU_FIELD, hdr);
            return Ok(());
        }
        self.discard_itts.retain(|&i| i != c.itt);
        let mut cdb = c.cdb.to_vec();
        let mut bidi = false;
        let mut rest = ahs;
        while !rest.is_empty() {
            if rest.len() < 4 {
                self.reject(reject::INVALID_PDU_FIELD, hdr);
                return Ok(());
            }
            let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
            let kind = rest[2];
            let total = pdu::pad4(3 + len);
            if len == 0 || total > rest.len() {
                self.reject(reject::INVALID_PDU_FIELD, hdr);
                return Ok(());
            }
            match kind {
                // Extended CDB: one reserved byte then the CDB bytes beyond 16.
                1 => cdb.extend_from_slice(&rest[4..3 + len]),
                2 => bidi = true,
                _ => {
                    self.reject(reject::INVALID_PDU_FIELD, hdr);
                    return Ok(());
                }
            }
            rest = &rest[total..];
        }
        let attr = match c.attr {
            0 => TaskAttr::Untagged,
            1 => TaskAttr::Simple,
            2 => TaskAttr::Ordered,
            3 => TaskAttr::HeadOfQueue,
            _ => TaskAttr::Aca,
        };
        let write = c.write && c.edtl > 0;
        if !data.is_empty()
            && (!c.write
                || !self.params.immediate_data
                || data.len() > c.edtl as usize
                || data.len() > self.params.first_burst as usize)
        {
            self.reject(reject::PROTOCOL_ERROR, hdr);
            return Err(ConnectionError::Protocol(
                "immediate data not allowed or longer than expected",
            ));
        }
        let mut task = Task {
            lun: c.lun,
            cdb,
            attr,
            edtl: c.edtl,
            write_flag: c.write,
            buf: Vec::new(),
            accounted: 0,
            received: 0,
            unsolicited_open: write && !c.final_ && !self.params.initial_r2t,
            unsolicited_data_sn: 0,
            r2ts: Vec::new(),
            next_r2t_offset: 0,
            r2t_sn: 0,
            state: TaskState::Receiving,
            aborted: false,
            early: None,
        };
        // Bidirectional commands are not offered, and a write longer than the buffer limit
        // cannot be taken in.
        let early_reason = if bidi || (c.read && c.write) || (write && c.edtl > WRITE_EDTL_MAX) {
            Some(lun::SenseReason::InvalidFieldInCdb { byte: 0, bit: None })
        } else {
            None
        };
        if let Some(reason) = early_reason {
            task.early = Some(CommandOutcome::check(reason, false));
            task.received = data.len() as u32;
            let itt = c.itt;
            let waiting = task.unsolicited_open;
            self.tasks.insert(itt, task);
            if !waiting {
                self.finish_early(itt);
            }
            return Ok(());
        }
        if write {
            // The first burst (immediate + unsolicited data) always gets a buffer; the rest only
            // within the connection's budget (issue_r2ts grows the buffer when it fits).
            let full = c.edtl as usize;
            let first = full.min((self.params.first_burst as usize).max(data.len()));
            let size = if self.write_bytes + full <= WRITE_BUFFER_BUDGET_BYTES {
                full
            } else {
                first
            };
            task.buf = vec![0u8; size];
            task.accounted = size;
            self.write_bytes += size;
            task.buf[..data.len()].copy_from_slice(data);
            task.received = data.len() as u32;
        }
        let itt = c.itt;
        self.tasks.insert(itt, task);
        if !write || self.tasks[&itt].received == c.edtl {
            self.execute(itt);
        } else if !self.tasks[&itt].unsolicited_open {
            let t = self.tasks.get_mut(&itt).expect("just inserted");
            t.next_r2t_offset = t.received;
            self.issue_r2ts(itt);
        }
        Ok(())
    }

    /// A task left the table: return its buffer bytes and let waiting writes proceed.
    fn release(&mut self, itt: u32, task: &Task) {
        self.write_bytes -= task.accounted;
        self.r2t_waiting.retain(|&i| i != itt);
        while let Some(&next) = self.r2t_waiting.front() {
            let need = self
                .tasks
                .get(&next)
                .map_or(0, |t| t.edtl as usize - t.buf.len());
            if self.write_bytes + need > WRITE_BUFFER_BUDGET_BYTES {
                break;
            }
            self.r2t_waiting.pop_front();
            if self.tasks.contains_key(&next) {
                self.issue_r2ts(next);
            }
        }
    }

    fn finish_early(&mut self, itt: u32) {
        if let Some(mut task) = self.tasks.remove(&itt) {
            self.release(itt, &task);
            let outcome = task.early.take().expect("early outcome");
            self.respond(itt, &task, outcome);
        }
    }

    fn issue_r2ts(&mut self, itt: u32) {
        let task = self.tasks.get_mut(&itt).expect("task exists");
        if task.buf.len() < task.edtl as usize {
            let more = task.edtl as usize - task.buf.len();
            if self.write_bytes + more > WRITE_BUFFER_BUDGET_BYTES {
                if !self.r2t_waiting.contains(&itt) {
                    tracing::debug!(itt, "write buffer budget reached: R2Ts wait");
                    self.r2t_waiting.push_back(itt);
                }
                return;
            }
            task.buf.resize(task.edtl as usize, 0);
            task.accounted += more;
            self.write_bytes += more;
        }
        let max_out = usize::from(self.params.max_outstanding_r2t.max(1));
        let max_burst = self.params.max_burst;
        loop {
            let task = self.tasks.get_mut(&itt).expect("task exists");
            if task.r2ts.len() >= max_out || task.next_r2t_offset >= task.edtl {
                break;
            }
            let offset = task.next_r2t_offset;
            let len = (task.edtl - offset).min(max_burst);
            task.next_r2t_offset += len;
            let r2t_sn = task.r2t_sn;
            task.r2t_sn += 1;
            let lun = task.lun;
            let ttt = self.alloc_ttt();
            self.tasks
                .get_mut(&itt)
                .expect("task exists")
                .r2ts
                .push(R2tState {
                    ttt,
                    offset,
                    len,
                    received: 0,
                    data_sn: 0,
                });
            let bhs = Bhs::R2t(R2t {
                lun,
                itt,
                ttt,
                stat_sn: self.stat_sn,
                exp_cmd_sn: self.exp_cmd_sn.0,
                max_cmd_sn: self.window_max().0,
                r2t_sn,
                buffer_offset: offset,
                desired_length: len,
            });
            self.send(&bhs, &[]);
        }
    }

    fn handle_data_out(
        &mut self,
        d: DataOut,
        data: &[u8],
        hdr: &[u8; BHS_LEN],
    ) -> Result<(), ConnectionError> {
        let Some(task) = self
            .tasks
            .get_mut(&d.itt)
            .filter(|t| matches!(t.state, TaskState::Receiving))
        else {
            if self.discard_itts.contains(&d.itt) {
                return Ok(());
            }
            // Data for a task we do not know (never issued, or already answered).
            self.reject(reject::INVALID_PDU_FIELD, hdr);
            return Ok(());
        };
        tracing::trace!(
            itt = d.itt,
            ttt = d.ttt,
            data_sn = d.data_sn,
            offset = d.buffer_offset,
            len = data.len(),
            final_ = d.final_,
            "data-out"
        );
        let len = data.len() as u32;
        let end = d
            .buffer_offset
            .checked_add(len)
            .ok_or(ConnectionError::Protocol("buffer offset wraps"))?;
        if d.ttt == RESERVED_TAG {
            let limit = task.edtl.min(self.params.first_burst);
            if !task.unsolicited_open
                || d.buffer_offset != task.received
                || end > limit
                || d.data_sn != task.unsolicited_data_sn
            {
                tracing::info!(
                    itt = d.itt,
                    data_sn = d.data_sn,
                    offset = d.buffer_offset,
                    "unsolicited Data-Out out of sequence: command failed"
                );
                self.fail_data_phase(d.itt);
                return Ok(());
            }
            task.unsolicited_data_sn += 1;
            if task.early.is_none() {
                task.buf[d.buffer_offset as usize..end as usize].copy_from_slice(data);
            }
            task.received = end;
            if d.final_ {
                task.unsolicited_open = false;
                task.next_r2t_offset = task.received;
            }
        } else {
            let Some(i) = task.r2ts.iter().position(|r| r.ttt == d.ttt) else {
                self.reject(reject::INVALID_PDU_FIELD, hdr);
                return Ok(());
            };
            let r = &mut task.r2ts[i];
            if d.buffer_offset != r.offset + r.received
                || end > r.offset + r.len
                || d.data_sn != r.data_sn
            {
                tracing::info!(
                    itt = d.itt,
                    data_sn = d.data_sn,
                    offset = d.buffer_offset,
                    "Data-Out does not match its R2T: command failed"
                );
                self.fail_data_phase(d.itt);
                return Ok(());
            }
            r.received += len;
            r.data_sn += 1;
            let done = r.received == r.len;
            task.buf[d.buffer_offset as usize..end as usize].copy_from_slice(data);
            task.received = task.received.max(end);
            if done {
                task.r2ts.remove(i);
            }
        }
        let complete = task.received == task.edtl && task.r2ts.is_empty() && !task.unsolicited_open;
        let needs_r2t = !task.unsolicited_open && task.next_r2t_offset < task.edtl;
        let early = task.early.is_some();
        if early {
            if !task.unsolicited_open {
                self.finish_early(d.itt);
            }
        } else if complete {
            self.execute(d.itt);
        } else if needs_r2t {
            self.issue_r2ts(d.itt);
        }
        Ok(())
    }

    /// ERL 0 cannot ask for the data again: end the command with CHECK CONDITION (ABORTED
    /// COMMAND, DATA PHASE ERROR) and drop the rest of its Data-Out, keeping the session.
    fn fail_data_phase(&mut self, itt: u32) {
        let Some(task) = self.tasks.remove(&itt) else {
            return;
        };
        self.release(itt, &task);
        let outcome = CommandOutcome::check(lun::SenseReason::DataPhaseError, false);
        self.respond(itt, &task, outcome);
        if self.discard_itts.len() == CMD_WINDOW_MAX as usize {
            self.discard_itts.pop_front();
        }
        self.discard_itts.push_back(itt);
        self.task_gone(itt);
    }

    fn execute(&mut self, itt: u32) {
        let nexus = ItNexus {
            initiator_name: self.initiator_name.clone(),
            isid: self.login.isid,
            relative_port: self.cfg.relative_port,
        };
        let task = self.tasks.get_mut(&itt).expect("task exists");
        task.state = TaskState::Executing;
        let cmd = ScsiCommand {
            nexus,
            lun: task.lun,
            cdb: std::mem::take(&mut task.cdb),
            attr: task.attr,
            data_out: std::mem::take(&mut task.buf),
            data_in_len: if task.expects_data_out() {
                0
            } else {
                task.edtl
            },
        };
        self.events.push_back(Event::Execute { itt, cmd });
    }

    /// Delivers the outcome of a command the driver ran.
    pub fn handle_outcome(&mut self, itt: u32, outcome: CommandOutcome) {
        let Some(task) = self.tasks.remove(&itt) else {
            return;
        };
        self.release(itt, &task);
        // TASK ABORTED means another nexus's task management ended it; with TAS=0 the
        // initiator gets no response (it learns from the unit attention).
        let aborted_elsewhere = outcome.status == lun::CommandStatus::TaskAborted;
        if !task.aborted && !aborted_elsewhere && self.phase == Phase::FullFeature {
            self.respond(itt, &task, outcome);
        }
        self.task_gone(itt);
    }

    /// Queues bytes `[at, at + len)` of `data` by reference, after everything queued so far.
    fn queue_data(&mut self, data: Arc<lun::DataIn>, at: usize, len: usize) {
        if !self.out.is_empty() {
            let out = self.take_out();
            self.tx.push(Piece::Bytes(out));
        }
        self.tx.push(Piece::Data { data, at, len });
    }

    fn respond(&mut self, itt: u32, task: &Task, mut outcome: CommandOutcome) {
        let edtl = u64::from(task.edtl);
        let good = outcome.status == lun::CommandStatus::Good;
        let status_byte = outcome.status.status_byte();
        let (mut overflow, mut underflow, mut residual) = (false, false, 0u32);
        let mut set_residual = |have: u64| {
            if have > edtl {
                overflow = true;
                residual = u32::try_from(have - edtl).unwrap_or(u32::MAX);
            } else if have < edtl {
                underflow = true;
                residual = (edtl - have) as u32;
            }
        };
        let mut data_sn = 0u32;
        if task.write_flag {
            if let Some(w) = outcome.data_out_wanted {
                set_residual(w);
            }
        } else {
            set_residual(outcome.data_in.len() as u64);
            let send_len = (outcome.data_in.len() as u64).min(edtl) as usize;
            if send_len > 0 {
                // Shared with the transmit queue only when some segment goes by reference.
                let shared = (send_len >= VECTORED_MIN)
                    .then(|| Arc::new(std::mem::take(&mut outcome.data_in)));
                let data: &lun::DataIn = shared.as_deref().unwrap_or(&outcome.data_in);
                let seg = self.params.initiator_mrdsl.max(512) as usize;
                let burst = self.params.max_burst.max(512) as usize;
                let mut off = 0usize;
                while off < send_len {
                    let n = seg.min(send_len - off).min(burst - off % burst);
                    let last = off + n == send_len;
                    let end_of_burst = (off + n).is_multiple_of(burst);
                    let with_status = last && good;
                    let bhs = Bhs::DataIn(pdu::DataIn {
                        final_: last || end_of_burst,
                        ack: false,
                        overflow: with_status && overflow,
                        underflow: with_status && underflow,
                        has_status: with_status,
                        status: if with_status { status_byte } else { 0 },
                        lun: if with_status { 0 } else { task.lun },
                        itt,
                        ttt: RESERVED_TAG,
                        stat_sn: if with_status { self.take_stat_sn() } else { 0 },
                        exp_cmd_sn: self.exp_cmd_sn.0,
                        max_cmd_sn: self.window_max().0,
                        data_sn,
                        buffer_offset: off as u32,
                        residual: if with_status { residual } else { 0 },
                    });
                    let mut h = [0u8; BHS_LEN];
                    bhs.encode(&mut h, 0, n as u32);
                    self.out.extend_from_slice(&h);
                    if self.digests.header {
                        let crc = super::digest::crc32c(&h);
                        self.out.extend_from_slice(&super::digest::to_wire(crc));
                    }
                    let pad = &[0u8; 3][..pdu::pad4(n) - n];
                    if let Some(by_ref) = shared.as_ref().filter(|_| n >= VECTORED_MIN) {
                        let crc = self.digests.data.then(|| {
                            let mut crc = 0;
                            data.slices(off, n, |s| crc = crc32c::crc32c_append(crc, s));
                            crc32c::crc32c_append(crc, pad)
                        });
                        self.queue_data(Arc::clone(by_ref), off, n);
                        self.out.extend_from_slice(pad);
                        if let Some(crc) = crc {
                            self.out.extend_from_slice(&super::digest::to_wire(crc));
                        }
                    } else {
                        let d0 = self.out.len();
                        data.extend_into(off, n, &mut self.out);
                        self.out.extend_from_slice(pad);
                        if self.digests.data {
                            let crc = super::digest::crc32c(&self.out[d0..]);
                            self.out.extend_from_slice(&super::digest::to_wire(crc));
                        }
                    }
                    data_sn += 1;
                    off += n;
                }
                if good {
                    return;
                }
            }
        }
        let exp_data_sn = if task.write_flag {
            task.r2t_sn
        } else {
            data_sn
        };
        let mut data = Vec::new();
        if !outcome.sense.is_empty() {
            data.extend_from_slice(&(outcome.sense.len() as u16).to_be_bytes());
            data.extend_from_slice(&outcome.sense);
        }
        let bhs = Bhs::ScsiResponse(ScsiResponse {
            bidi_overflow: false,
            bidi_underflow: false,
            overflow,
            underflow,
            response: 0,
            status: status_byte,
            itt,
            snack_tag: 0,
            stat_sn: self.take_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn.0,
            max_cmd_sn: self.window_max().0,
            exp_data_sn,
            bidi_residual: 0,
            residual: if overflow || underflow { residual } else { 0 },
        });
        self.send(&bhs, &data);
    }

    /// Bookkeeping after a task left the table: pending task management responses.
    fn task_gone(&mut self, itt: u32) {
        let mut ready = Vec::new();
        for (i, t) in self.tmfs.iter_mut().enumerate() {
            t.waiting.remove(&itt);
            if t.waiting.is_empty() {
                ready.push(i);
            }
        }
        for i in ready.into_iter().rev() {
            let t = self.tmfs.remove(i);
            self.send_tmf_response(t.itt, t.response);
            if t.close_after {
                self.close("target cold reset");
            }
        }
    }

    fn send_tmf_response(&mut self, itt: u32, response: u8) {
        let bhs = Bhs::TaskMgmtResponse(TaskMgmtResponse {
            response,
            itt,
            stat_sn: self.take_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn.0,
            max_cmd_sn: self.window_max().0,
        });
        self.send(&bhs, &[]);
    }

    fn handle_tmf(&mut self, t: TaskMgmtRequest) {
        const COMPLETE: u8 = 0;
        const NO_TASK: u8 = 1;
        const NO_LUN: u8 = 2;
        const NO_REASSIGN: u8 = 4;
        const NOT_SUPPORTED: u8 = 5;
        let lun_exists = self
            .device()
            .is_some_and(|d| lun::decode_lun(t.lun).is_some_and(|l| d.luns().contains_key(&l)));
        let victims: Vec<u32> = match t.function {
            1 => {
                if self.tasks.contains_key(&t.rtt) {
                    vec![t.rtt]
                } else {
                    // Not found: complete if the command was already received and answered.
                    let resp = if Sn(t.ref_cmd_sn).lt(self.exp_cmd_sn) {
                        COMPLETE
                    } else {
                        NO_TASK
                    };
                    self.queued
                        .retain(|_, q| !matches!(&q.bhs, Bhs::ScsiCommand(c) if c.itt == t.rtt));
                    return self.send_tmf_response(t.itt, resp);
                }
            }
            2 | 4 | 5 => {
                if !lun_exists {
                    return self.send_tmf_response(t.itt, NO_LUN);
                }
                self.tasks
                    .iter()
                    .filter(|(_, task)| task.lun == t.lun)
                    .map(|(&i, _)| i)
                    .collect()
            }
            6 | 7 => self.tasks.keys().copied().collect(),
            8 => return self.send_tmf_response(t.itt, NO_REASSIGN),
            _ => return self.send_tmf_response(t.itt, NOT_SUPPORTED),
        };
        tracing::info!(
            function = t.function,
            tasks = victims.len(),
            "task management"
        );
        if t.function == 4 {
            if let Some(nexus) = self.nexus() {
                self.events
                    .push_back(Event::ClearTaskSet { nexus, lun: t.lun });
            }
        }
        if matches!(t.function, 5..=7) {
            if let Some(nexus) = self.nexus() {
                let lun = (t.function == 5).then_some(t.lun);
                self.events.push_back(Event::Reset { nexus, lun });
            }
        }
        let mut waiting = HashSet::new();
        for itt in victims {
            let task = self.tasks.get_mut(&itt).expect("victim exists");
            match task.state {
                TaskState::Receiving => {
                    if let Some(gone) = self.tasks.remove(&itt) {
                        self.release(itt, &gone);
                    }
                }
                TaskState::Executing => {
                    task.aborted = true;
                    waiting.insert(itt);
                }
            }
        }
        let close_after = t.function == 7;
        if waiting.is_empty() {
            self.send_tmf_response(t.itt, COMPLETE);
            if close_after {
                self.close("target cold reset");
            }
        } else {
            self.tmfs.push(PendingTmf {
                itt: t.itt,
                waiting,
                response: COMPLETE,
                close_after,
            });
        }
    }

    fn handle_text(&mut self, t: TextRequest, data: &[u8], hdr: &[u8; BHS_LEN]) {
        if t.ttt != RESERVED_TAG {
            let Some(cont) = self
                .text_cont
                .take()
                .filter(|c| c.ttt == t.ttt && c.itt == t.itt)
            else {
                return self.reject(reject::INVALID_PDU_FIELD, hdr);
            };
            return self.send_text(t.itt, t.lun, cont.rest);
        }
        self.text_cont = None;
        if self.text_accum.len() + data.len() > TEXT_ACCUMULATED_MAX {
            self.text_accum.clear();
            return self.reject(reject::PROTOCOL_ERROR, hdr);
        }
        self.text_accum.extend_from_slice(data);
        if t.cont {
            let ttt = self.alloc_ttt();
            let bhs = Bhs::TextResponse(TextResponse {
                final_: false,
                cont: false,
                lun: t.lun,
                itt: t.itt,
                ttt,
                stat_sn: self.take_stat_sn(),
                exp_cmd_sn: self.exp_cmd_sn.0,
                max_cmd_sn: self.window_max().0,
            });
            return self.send(&bhs, &[]);
        }
        let keys = match text::parse(&std::mem::take(&mut self.text_accum)) {
            Ok(k) => k,
            Err(_) => return self.reject(reject::PROTOCOL_ERROR, hdr),
        };
        let mut resp = Vec::new();
        for (k, v) in &keys {
            if k == "SendTargets" {
                self.send_targets(v, &mut resp);
            } else {
                text::push(&mut resp, k, "NotUnderstood");
            }
        }
        self.send_text(t.itt, t.lun, resp);
    }

    fn send_targets(&self, value: &str, out: &mut Vec<u8>) {
        for (i, target) in self.cfg.targets.iter().enumerate() {
            let wanted = match value {
                "All" if self.login.discovery => true,
                "All" | "" => Some(i) == self.target,
                name => name == target.name,
            };
            // An initiator never learns of a target it may not use.
            if !wanted || !target.allows(&self.initiator_name) {
                continue;
            }
            text::push(out, "TargetName", &target.name);
            // A portal whose controller is unavailable (fenced, down) is left out, so hosts
            // discover only paths that can serve.
            for p in target
                .portals
                .iter()
                .filter(|p| target.device.group_serving(p.tpgt))
            {
                text::push(out, "TargetAddress", &format!("{},{}", p.address, p.tpgt));
            }
        }
    }

    /// Sends a text response, split by the initiator's MaxRecvDataSegmentLength with the C bit.
    fn send_text(&mut self, itt: u32, lun: u64, mut body: Vec<u8>) {
        let max = self.params.initiator_mrdsl as usize;
        let rest = if body.len() > max {
            body.split_off(max)
        } else {
            Vec::new()
        };
        let more = !rest.is_empty();
        let ttt = if more { self.alloc_ttt() } else { RESERVED_TAG };
        if more {
            self.text_cont = Some(TextContinuation { itt, ttt, rest });
        }
        let bhs = Bhs::TextResponse(TextResponse {
            final_: !more,
            cont: more,
            lun,
            itt,
            ttt,
            stat_sn: self.take_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn.0,
            max_cmd_sn: self.window_max().0,
        });
        self.send(&bhs, &body);
    }

    fn handle_logout(&mut self, l: LogoutRequest) {
        let response = match l.reason {
            0 => 0,
            1 if l.cid == self.login.cid => 0,
            1 => 1, // CID not found
            _ => 2, // connection recovery is not supported at ERL 0
        };
        let bhs = Bhs::LogoutResponse(LogoutResponse {
            response,
            itt: l.itt,
            stat_sn: self.take_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn.0,
            max_cmd_sn: self.window_max().0,
            time2wait: 0,
            time2retain: 0,
        });
        self.send(&bhs, &[]);
        if response == 0 {
            self.close("logout");
        }
    }
}
