//! A small iSCSI initiator for tests and benchmarks, built on the fabric's own PDU codec.
//!
//! It is deliberately simple: one connection, one command at a time (queue depth 1),
//! ImmediateData + R2T for writes, CHAP (one-way and mutual). It can also send raw bytes, so
//! tests can play a misbehaving host over a real socket.
//!
//! Not a product component: the product is the target; real hosts use open-iscsi, MPIO, ESXi.

use iscsi_target::proto::chap;
use iscsi_target::proto::pdu::{self, *};
use iscsi_target::proto::text;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Why a login or command failed.
#[derive(Debug, thiserror::Error)]
pub enum InitiatorError {
    /// The target refused the login with this status.
    #[error("login refused: status class {0:#04x} detail {1:#04x}")]
    LoginStatus(u8, u8),
    /// Socket error or closed connection.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The target said something unexpected.
    #[error("protocol: {0}")]
    Protocol(String),
    /// Mutual CHAP: the target's response was wrong.
    #[error("target failed mutual CHAP")]
    TargetAuth,
    /// No answer in time.
    #[error("timed out")]
    Timeout,
}

/// Login settings.
#[derive(Clone, Debug)]
pub struct LoginOptions {
    /// Initiator name.
    pub initiator_name: String,
    /// Target name (normal sessions).
    pub target_name: Option<String>,
    /// CHAP name and secret.
    pub chap: Option<(String, Vec<u8>)>,
    /// Mutual CHAP: expected target name and secret.
    pub mutual: Option<(String, Vec<u8>)>,
    /// ISID (48 bits).
    pub isid: u64,
    /// Ask for CRC32C digests.
    pub digests: bool,
    /// Answer CHAP as if the target had sent this (identifier, challenge): a replay of a
    /// response captured from an earlier login.
    pub replay_chap: Option<(u8, Vec<u8>)>,
    /// Use this mutual-CHAP challenge instead of a fresh random one.
    pub fixed_mutual_challenge: Option<[u8; 16]>,
}

impl LoginOptions {
    /// A normal session to `target`.
    pub fn normal(target: &str) -> Self {
        Self {
            initiator_name: "iqn.2026-11.io.rainio:test-initiator".into(),
            target_name: Some(target.into()),
            chap: None,
            mutual: None,
            isid: 0x8012_3456_7800,
            digests: false,
            replay_chap: None,
            fixed_mutual_challenge: None,
        }
    }
    /// A discovery session.
    pub fn discovery() -> Self {
        Self {
            target_name: None,
            ..Self::normal("")
        }
    }
}

/// Result of a SCSI command.
#[derive(Debug, Default)]
pub struct ScsiResult {
    /// SAM status.
    pub status: u8,
    /// Sense bytes (without the 2-byte length).
    pub sense: Vec<u8>,
    /// Data-In.
    pub data: Vec<u8>,
    /// Overflow flag and residual.
    pub overflow: bool,
    /// Underflow flag.
    pub underflow: bool,
    /// Residual count.
    pub residual: u32,
}

/// One connection.
#[derive(Debug)]
pub struct Initiator {
    sock: TcpStream,
    rbuf: Vec<u8>,
    itt: u32,
    cmd_sn: u32,
    exp_stat_sn: u32,
    digests: Digests,
    /// The target's MaxRecvDataSegmentLength.
    pub target_mrdsl: u32,
    /// FirstBurstLength.
    pub first_burst: u32,
    /// Whether the last response carried the TargetPortalGroupTag key (first login response).
    pub tpgt_in_first_response: bool,
    /// Keys the target sent during login.
    pub login_keys: Vec<(String, String)>,
    /// The (identifier, challenge) the target sent in the last CHAP exchange.
    pub last_chap: Option<(u8, Vec<u8>)>,
    /// Data-In gathered so far per ITT of commands sent without waiting.
    partial: std::collections::HashMap<u32, Vec<u8>>,
}

const MY_MRDSL: u32 = 262_144;

impl Initiator {
    /// Connects and logs in.
    ///
    /// # Errors
    /// See [`InitiatorError`].
    pub async fn login(addr: SocketAddr, opts: &LoginOptions) -> Result<Self, InitiatorError> {
        let mut me = Self::raw(addr).await?;
        me.do_login(opts).await?;
        if opts.target_name.is_some() {
            // As initiators do after login: TEST UNIT READY until the POWER ON (and any other)
            // unit attention has been taken.
            for _ in 0..4 {
                if me.command(0, &[0; 6], &[], 0).await?.status == 0 {
                    break;
                }
            }
        }
        Ok(me)
    }

    /// Connects without logging in (for raw tests, and the start of [`Self::login`]).
    pub async fn raw(addr: SocketAddr) -> Result<Self, InitiatorError> {
        let sock = TcpStream::connect(addr).await?;
        sock.set_nodelay(true)?;
        Ok(Self {
            sock,
            rbuf: Vec::new(),
            itt: 1,
            cmd_sn: 1,
            exp_stat_sn: 0,
            digests: Digests::default(),
            target_mrdsl: 8192,
            first_burst: 65536,
            tpgt_in_first_response: false,
            login_keys: Vec::new(),
            last_chap: None,
            partial: std::collections::HashMap::new(),
        })
    }

    /// This end's address (the target logs the connection under it).
    ///
    /// # Errors
    /// Socket errors.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    async fn login_exchange(
        &mut self,
        opts: &LoginOptions,
        csg: u8,
        nsg: u8,
        transit: bool,
        keys: &[(String, String)],
    ) -> Result<(LoginResponse, Vec<(String, String)>), InitiatorError> {
        let req = Bhs::LoginRequest(LoginRequest {
            transit,
            cont: false,
            csg,
            nsg,
            version_max: 0,
            version_min: 0,
            isid: opts.isid,
            tsih: 0,
            itt: self.itt,
            cid: 0,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
        });
        self.send(&req, &text::encode(keys)).await?;
        let (bhs, data) = self.recv().await?;
        let Bhs::LoginResponse(r) = bhs else {
            return Err(InitiatorError::Protocol(format!(
                "expected a login response, got {bhs:?}"
            )));
        };
        self.exp_stat_sn = r.stat_sn.wrapping_add(1);
        if r.status_class != 0 {
            return Err(InitiatorError::LoginStatus(r.status_class, r.status_detail));
        }
        let keys = text::parse(&data).map_err(|e| InitiatorError::Protocol(e.to_string()))?;
        self.login_keys.extend(keys.iter().cloned());
        Ok((r, keys))
    }

    async fn do_login(&mut self, opts: &LoginOptions) -> Result<(), InitiatorError> {
        let kv = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        let mut first = vec![kv("InitiatorName", &opts.initiator_name)];
        match &opts.target_name {
            Some(t) => {
                first.push(kv("SessionType", "Normal"));
                first.push(kv("TargetName", t));
            }
            None => first.push(kv("SessionType", "Discovery")),
        }
        first.push(kv(
            "AuthMethod",
            if opts.chap.is_some() {
                "CHAP,None"
            } else {
                "None"
            },
        ));
        let get = |keys: &[(String, String)], k: &str| {
            keys.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        };
        if let Some((user, secret)) = &opts.chap {
            let (_, keys) = self.login_exchange(opts, 0, 1, false, &first).await?;
            self.tpgt_in_first_response = get(&keys, "TargetPortalGroupTag").is_some();
            if get(&keys, "AuthMethod").as_deref() != Some("CHAP") {
                return Err(InitiatorError::Protocol(
                    "target did not choose CHAP".into(),
                ));
            }
            let (_, keys) = self
                .login_exchange(opts, 0, 1, false, &[kv("CHAP_A", "5")])
                .await?;
            let id: u8 = get(&keys, "CHAP_I")
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| InitiatorError::Protocol("no CHAP_I".into()))?;
            let challenge = get(&keys, "CHAP_C")
                .and_then(|v| chap::decode_binary(&v))
                .ok_or_else(|| InitiatorError::Protocol("no CHAP_C".into()))?;
            self.last_chap = Some((id, challenge.clone()));
            let (rid, rchallenge) = opts.replay_chap.clone().unwrap_or((id, challenge));
            let mut resp = vec![
                kv("CHAP_N", user),
                kv(
                    "CHAP_R",
                    &chap::encode_hex(&chap::response(rid, secret, &rchallenge)),
                ),
            ];
            let my_challenge = opts
                .fixed_mutual_challenge
                .unwrap_or_else(chap::random_bytes::<16>);
            let my_id = 7u8;
            if opts.mutual.is_some() {
                resp.push(kv("CHAP_I", &my_id.to_string()));
                resp.push(kv("CHAP_C", &chap::encode_hex(&my_challenge)));
            }
            let (r, keys) = self.login_exchange(opts, 0, 1, true, &resp).await?;
            if let Some((tuser, tsecret)) = &opts.mutual {
                let ok = get(&keys, "CHAP_N").as_deref() == Some(tuser.as_str())
                    && get(&keys, "CHAP_R")
                        .and_then(|v| chap::decode_binary(&v))
                        .is_some_and(|r| chap::verify(my_id, tsecret, &my_challenge, &r));
                if !ok {
                    return Err(InitiatorError::TargetAuth);
                }
            }
            if !r.transit {
                return Err(InitiatorError::Protocol(
                    "target did not leave the security stage".into(),
                ));
            }
        } else {
            let (_, keys) = self.login_exchange(opts, 0, 1, true, &first).await?;
            self.tpgt_in_first_response = get(&keys, "TargetPortalGroupTag").is_some();
        }
        let digest = if opts.digests { "CRC32C" } else { "None" };
        let mut op = vec![
            kv("HeaderDigest", digest),
            kv("DataDigest", digest),
            kv("MaxRecvDataSegmentLength", &MY_MRDSL.to_string()),
        ];
        if opts.target_name.is_some() {
            op.extend([
                kv("InitialR2T", "Yes"),
                kv("ImmediateData", "Yes"),
                kv("MaxBurstLength", "1048576"),
                kv("FirstBurstLength", "262144"),
                kv("MaxOutstandingR2T", "1"),
                kv("ErrorRecoveryLevel", "0"),
                kv("MaxConnections", "1"),
            ]);
        }
        let (r, keys) = self.login_exchange(opts, 1, 3, true, &op).await?;
        if !r.transit || r.nsg != 3 {
            return Err(InitiatorError::Protocol(
                "target did not enter full feature phase".into(),
            ));
        }
        if let Some(v) = get(&keys, "MaxRecvDataSegmentLength").and_then(|v| v.parse().ok()) {
            self.target_mrdsl = v;
        }
        if let Some(v) = get(&keys, "FirstBurstLength").and_then(|v| v.parse().ok()) {
            self.first_burst = v;
        }
        self.digests = Digests {
            header: get(&keys, "HeaderDigest").as_deref() == Some("CRC32C"),
            data: get(&keys, "DataDigest").as_deref() == Some("CRC32C"),
        };
        Ok(())
    }

    /// Sends one PDU.
    pub async fn send(&mut self, bhs: &Bhs, data: &[u8]) -> Result<(), InitiatorError> {
        let mut out = Vec::new();
        encode_pdu(&mut out, bhs, &[], data, self.digests);
        self.sock.write_all(&out).await?;
        Ok(())
    }

    /// Sends raw bytes.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), InitiatorError> {
        self.sock.write_all(bytes).await?;
        Ok(())
    }

    /// Receives one PDU (10 s timeout).
    pub async fn recv(&mut self) -> Result<(Bhs, Vec<u8>), InitiatorError> {
        let limits = FrameLimits {
            digests: self.digests,
            max_data_segment: 16 << 20,
        };
        loop {
            if let Some(info) = frame_len(&self.rbuf, limits)
                .map_err(|e| InitiatorError::Protocol(e.to_string()))?
            {
                if self.rbuf.len() >= info.total {
                    let p = parse_pdu(&self.rbuf[..info.total], info, self.digests)
                        .map_err(|e| InitiatorError::Protocol(e.to_string()))?;
                    let out = (p.bhs, p.data.to_vec());
                    self.rbuf.drain(..info.total);
                    return Ok(out);
                }
            }
            self.rbuf.reserve(256 * 1024);
            let n =
                tokio::time::timeout(Duration::from_secs(10), self.sock.read_buf(&mut self.rbuf))
                    .await
                    .map_err(|_| InitiatorError::Timeout)??;
            if n == 0 {
                return Err(InitiatorError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    /// Waits for the target to close the connection (10 s timeout).
    pub async fn expect_closed(&mut self) -> Result<(), InitiatorError> {
        loop {
            let mut b = [0u8; 4096];
            match tokio::time::timeout(Duration::from_secs(10), self.sock.read(&mut b)).await {
                Err(_) => return Err(InitiatorError::Timeout),
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(()),
                Ok(Ok(_)) => continue,
            }
        }
    }

    fn next_itt(&mut self) -> u32 {
        self.itt = self.itt.wrapping_add(1);
        self.itt
    }

    /// Builds the next SCSI Command PDU (new ITT, this CmdSN, which then advances).
    fn command_pdu(
        &mut self,
        lun: u64,
        cdb: &[u8],
        attr: u8,
        write: bool,
        edtl: u32,
    ) -> (u32, Bhs) {
        let itt = self.next_itt();
        let mut c16 = [0u8; 16];
        c16[..cdb.len().min(16)].copy_from_slice(&cdb[..cdb.len().min(16)]);
        let bhs = Bhs::ScsiCommand(ScsiCommandPdu {
            immediate: false,
            final_: true,
            read: !write && edtl > 0,
            write,
            attr,
            lun,
            itt,
            edtl,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            cdb: c16,
        });
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        (itt, bhs)
    }

    /// Answers a target's NOP-In ping.
    async fn answer_nop(&mut self, ttt: u32) -> Result<(), InitiatorError> {
        let reply = Bhs::NopOut(NopOut {
            immediate: true,
            lun: 0,
            itt: RESERVED_TAG,
            ttt,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
        });
        self.send(&reply, &[]).await
    }

    /// Sends a SCSI command that carries no data-out (with task attribute `attr`: 1 SIMPLE,
    /// 2 ORDERED) without waiting; returns its ITT for [`Self::recv_status`].
    ///
    /// # Errors
    /// Socket errors.
    pub async fn send_command(
        &mut self,
        lun: u64,
        cdb: &[u8],
        attr: u8,
        edtl: u32,
    ) -> Result<u32, InitiatorError> {
        let (itt, bhs) = self.command_pdu(lun, cdb, attr, false, edtl);
        self.send(&bhs, &[]).await?;
        Ok(itt)
    }

    /// Sends a WRITE SAME-like command whose whole data-out (`data`, at most the first burst)
    /// goes as immediate data, without waiting; returns its ITT for [`Self::recv_status`].
    ///
    /// # Errors
    /// Socket errors.
    pub async fn send_write_same(
        &mut self,
        lun: u64,
        cdb: &[u8],
        data: &[u8],
    ) -> Result<u32, InitiatorError> {
        let (itt, bhs) = self.command_pdu(lun, cdb, 1, true, data.len() as u32);
        self.send(&bhs, data).await?;
        Ok(itt)
    }

    /// Waits for the status of the next command that completes (of those sent with
    /// [`Self::send_command`]): its ITT and SAM status. Data-In is skipped.
    ///
    /// # Errors
    /// Socket and protocol errors.
    pub async fn recv_status(&mut self) -> Result<(u32, u8), InitiatorError> {
        loop {
            let (bhs, _) = self.recv().await?;
            match bhs {
                Bhs::DataIn(d) if d.has_status => {
                    self.exp_stat_sn = d.stat_sn.wrapping_add(1);
                    return Ok((d.itt, d.status));
                }
                Bhs::DataIn(_) => {}
                Bhs::ScsiResponse(r) => {
                    self.exp_stat_sn = r.stat_sn.wrapping_add(1);
                    return Ok((r.itt, r.status));
                }
                Bhs::NopIn(n) if n.ttt != RESERVED_TAG => self.answer_nop(n.ttt).await?,
                other => {
                    return Err(InitiatorError::Protocol(format!(
                        "unexpected PDU {other:?}"
                    )))
                }
            }
        }
    }

    /// Waits for the next completion of a command sent without waiting
    /// ([`Self::send_command`], [`Self::send_write_same`]): its ITT and result, Data-In
    /// included. Several commands may be in flight at once.
    ///
    /// # Errors
    /// Socket and protocol errors.
    pub async fn recv_completion(&mut self) -> Result<(u32, ScsiResult), InitiatorError> {
        loop {
            let (bhs, data) = self.recv().await?;
            match bhs {
                Bhs::DataIn(d) => {
                    let buf = self.partial.entry(d.itt).or_default();
                    let off = d.buffer_offset as usize;
                    if buf.len() < off + data.len() {
                        buf.resize(off + data.len(), 0);
                    }
                    buf[off..off + data.len()].copy_from_slice(&data);
                    if d.has_status {
                        self.exp_stat_sn = d.stat_sn.wrapping_add(1);
                        let result = ScsiResult {
                            status: d.status,
                            data: self.partial.remove(&d.itt).unwrap_or_default(),
                            overflow: d.overflow,
                            underflow: d.underflow,
                            residual: d.residual,
                            ..ScsiResult::default()
                        };
                        return Ok((d.itt, result));
                    }
                }
                Bhs::ScsiResponse(r) => {
                    self.exp_stat_sn = r.stat_sn.wrapping_add(1);
                    let data_in = self.partial.remove(&r.itt).unwrap_or_default();
                    return Ok((r.itt, response_result(&r, &data, data_in)));
                }
                Bhs::NopIn(n) if n.ttt != RESERVED_TAG => self.answer_nop(n.ttt).await?,
                other => {
                    return Err(InitiatorError::Protocol(format!(
                        "unexpected PDU {other:?}"
                    )))
                }
            }
        }
    }

    /// Runs one SCSI command to completion.
    ///
    /// # Errors
    /// Socket and protocol errors.
    pub async fn command(
        &mut self,
        lun: u64,
        cdb: &[u8],
        data_out: &[u8],
        edtl: u32,
    ) -> Result<ScsiResult, InitiatorError> {
        let write = !data_out.is_empty();
        let imm = data_out
            .len()
            .min(self.first_burst as usize)
            .min(self.target_mrdsl as usize);
        let (itt, bhs) = self.command_pdu(lun, cdb, 1, write, edtl);
        self.send(&bhs, &data_out[..imm]).await?;
        let mut result = ScsiResult::default();
        loop {
            let (bhs, data) = self.recv().await?;
            match bhs {
                Bhs::DataIn(d) if d.itt == itt => {
                    let off = d.buffer_offset as usize;
                    if result.data.len() < off + data.len() {
                        result.data.resize(off + data.len(), 0);
                    }
                    result.data[off..off + data.len()].copy_from_slice(&data);
                    if d.has_status {
                        self.exp_stat_sn = d.stat_sn.wrapping_add(1);
                        result.status = d.status;
                        result.overflow = d.overflow;
                        result.underflow = d.underflow;
                        result.residual = d.residual;
                        return Ok(result);
                    }
                }
                Bhs::R2t(r) if r.itt == itt => {
                    let mut off = r.buffer_offset as usize;
                    let end = off + r.desired_length as usize;
                    let mut sn = 0;
                    while off < end {
                        let n = (end - off).min(self.target_mrdsl as usize);
                        let d = Bhs::DataOut(DataOut {
                            final_: off + n == end,
                            lun,
                            itt,
                            ttt: r.ttt,
                            exp_stat_sn: self.exp_stat_sn,
                            data_sn: sn,
                            buffer_offset: off as u32,
                        });
                        let chunk = data_out[off..off + n].to_vec();
                        self.send(&d, &chunk).await?;
                        sn += 1;
                        off += n;
                    }
                }
                Bhs::ScsiResponse(r) if r.itt == itt => {
                    self.exp_stat_sn = r.stat_sn.wrapping_add(1);
                    return Ok(response_result(&r, &data, result.data));
                }
                Bhs::NopIn(n) if n.ttt != RESERVED_TAG => self.answer_nop(n.ttt).await?,
                other => {
                    return Err(InitiatorError::Protocol(format!(
                        "unexpected PDU {other:?}"
                    )))
                }
            }
        }
    }

    /// SendTargets=All in a discovery session: (TargetName, TargetAddress) pairs.
    pub async fn send_targets(&mut self) -> Result<Vec<(String, String)>, InitiatorError> {
        let itt = self.next_itt();
        let bhs = Bhs::TextRequest(TextRequest {
            immediate: true,
            final_: true,
            cont: false,
            lun: 0,
            itt,
            ttt: RESERVED_TAG,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
        });
        let mut body = Vec::new();
        text::push(&mut body, "SendTargets", "All");
        self.send(&bhs, &body).await?;
        let mut all = Vec::new();
        loop {
            let (bhs, data) = self.recv().await?;
            let Bhs::TextResponse(r) = bhs else {
                return Err(InitiatorError::Protocol("expected a text response".into()));
            };
            self.exp_stat_sn = r.stat_sn.wrapping_add(1);
            all.extend_from_slice(&data);
            if r.final_ {
                break;
            }
            let more = Bhs::TextRequest(TextRequest {
                immediate: true,
                final_: true,
                cont: false,
                lun: 0,
                itt,
                ttt: r.ttt,
                cmd_sn: self.cmd_sn,
                exp_stat_sn: self.exp_stat_sn,
            });
            self.send(&more, &[]).await?;
        }
        text::parse(&all).map_err(|e| InitiatorError::Protocol(e.to_string()))
    }

    /// Logs out (close session).
    pub async fn logout(mut self) -> Result<(), InitiatorError> {
        let itt = self.next_itt();
        let bhs = Bhs::LogoutRequest(LogoutRequest {
            immediate: true,
            reason: 0,
            itt,
            cid: 0,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
        });
        self.send(&bhs, &[]).await?;
        match self.recv().await? {
            (Bhs::LogoutResponse(r), _) if r.response == 0 => Ok(()),
            other => Err(InitiatorError::Protocol(format!(
                "bad logout answer {other:?}"
            ))),
        }
    }

    /// Current CmdSN (for raw tests).
    pub fn cmd_sn(&self) -> u32 {
        self.cmd_sn
    }

    /// Digests in force.
    pub fn digests(&self) -> Digests {
        self.digests
    }
}

/// The result a SCSI Response PDU (with its data segment `seg`) gives a command that
/// received `data_in`.
fn response_result(r: &ScsiResponse, seg: &[u8], data_in: Vec<u8>) -> ScsiResult {
    let mut result = ScsiResult {
        status: r.status,
        data: data_in,
        overflow: r.overflow,
        underflow: r.underflow,
        residual: r.residual,
        ..ScsiResult::default()
    };
    if seg.len() >= 2 {
        let n = usize::from(u16::from_be_bytes([seg[0], seg[1]]));
        result.sense = seg[2..2 + n.min(seg.len() - 2)].to_vec();
    }
    result
}

/// A READ(16) CDB.
pub fn read16(lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x88;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// A WRITE(16) CDB.
pub fn write16(lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = read16(lba, blocks);
    c[0] = 0x8a;
    c
}

/// Re-export for tests.
pub use pdu::pad4;
