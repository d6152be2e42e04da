//! The device server: a table of logical units behind one target port, executing decoded
//! commands against their volumes.
//!
//! Invariants:
//! - Every LBA range is checked with overflow-safe arithmetic before any I/O: `lba + blocks`
//!   beyond the capacity (or past 2^64) is LBA OUT OF RANGE.
//! - A WRITE never writes more than the initiator sent: if it sent less than the CDB asks for,
//!   only the whole blocks received are written (FCP-4 §9.4.2 a), and the wanted length is
//!   reported so the fabric sets the overflow residual.
//! - Data-In is at most the allocation length of the CDB; the fabric truncates it further to
//!   the initiator's expected length.
//! - INQUIRY and REPORT LUNS answer for LUNs that do not exist; every other command to such a
//!   LUN gets LOGICAL UNIT NOT SUPPORTED.
//!
//! Not here (next slices): persistent reservations, unit attentions, task set management,
//! MODE SELECT, thin provisioning.

use crate::alua::{self, AccessStates};
use crate::cdb::{self, Cdb};
use crate::command::{CommandOutcome, DataIn, ItNexus, ScsiCommand};
use crate::constants::{PHYSICAL_BLOCK_BYTES, TRANSFER_BYTES_MAX};
use crate::pr::{self, Access, PrError, PrState};
use crate::sense::{CommandStatus, SenseReason};
use crate::shared::{ChangeOutcome, LuEvents, ScsiChange, SharedLuState, SharedScsi};
use crate::task_set::{TaskSet, Ticket};
use crate::{backend, inquiry, mode, opcodes};
use raid_engine::Volume;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::sync::Mutex;

/// Identity of a logical unit, the same on every path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LuIdentity {
    /// T10 vendor identification (8 ASCII characters max).
    pub vendor: String,
    /// Product identification (16 max).
    pub product: String,
    /// Product revision (4 max).
    pub revision: String,
    /// Unit serial number (VPD 0x80), printable ASCII.
    pub serial: String,
    /// NAA IEEE Registered Extended designator (NAA 6, 16 bytes).
    pub naa: [u8; 16],
}

impl LuIdentity {
    /// An identity derived from a 64-bit volume id. The NAA designator uses a locally
    /// administered company id until the product registers an OUI.
    pub fn for_volume(volume_id: u64) -> Self {
        let mut naa = [0u8; 16];
        // NAA 6 | company id 0x0A5241 (locally administered bit set) | vendor specific.
        let company: u32 = 0x0a_52_41;
        let head: u64 = (6u64 << 60) | (u64::from(company) << 36) | (volume_id >> 28);
        naa[..8].copy_from_slice(&head.to_be_bytes());
        naa[8..].copy_from_slice(&(volume_id << 36 | 0x1).to_be_bytes());
        Self {
            vendor: "RAINIO".into(),
            product: "RAIN VOLUME".into(),
            revision: "0001".into(),
            serial: format!("{volume_id:016x}"),
            naa,
        }
    }
}

/// This controller's target port: its relative port id and target port group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetPort {
    /// Relative target port identifier (non-zero).
    pub relative_port: u16,
    /// Target port group id (non-zero).
    pub port_group: u16,
}

/// One logical unit backed by a volume.
#[derive(Debug)]
pub struct LogicalUnit {
    identity: LuIdentity,
    block_size: u32,
    blocks: u64,
    volume: Arc<Volume>,
    write_cache: AtomicBool,
    d_sense: AtomicBool,
    thin: bool,
    /// Persistent reservations.
    pr: Mutex<PrState>,
    /// SPC-2 RESERVE(6)/(10) holder.
    spc2: Mutex<Option<ItNexus>>,
    /// Pending unit attentions per nexus (SPC-4 §5.14), oldest first.
    ua: Mutex<BTreeMap<ItNexus, VecDeque<SenseReason>>>,
    /// Nexuses that have sent commands (for reset unit attentions).
    nexuses: Mutex<BTreeSet<ItNexus>>,
    /// Admitted commands and their start order.
    tasks: Arc<TaskSet>,
    /// Every nexus that addressed this LU since start (POWER ON unit attention once each).
    ever_seen: Mutex<BTreeSet<ItNexus>>,
    /// Where persistent reservations are kept when APTPL is set.
    pr_store: Option<std::path::PathBuf>,
    /// Bumped by LOGICAL UNIT RESET, target resets and CLEAR TASK SET; tasks admitted
    /// before the bump are aborted.
    epoch: std::sync::atomic::AtomicU64,
    /// The generation of the shared access states this LU last announced to its nexuses.
    alua_announced: std::sync::atomic::AtomicU64,
    /// Per nexus: bumped when its tasks are aborted (PREEMPT AND ABORT); tasks admitted
    /// before the bump end TASK ABORTED.
    nexus_aborts: Mutex<BTreeMap<ItNexus, u64>>,
    /// I/O counters of this LU on this controller.
    pub stats: crate::stats::IoStats,
    /// In a cluster: this LU's key in the metadata log and where its reservation changes go.
    shared: Option<(u64, Arc<dyn SharedScsi>)>,
    /// Whether the shared state has been installed once (until then only INQUIRY and the
    /// reports run: reservations are not known yet).
    shared_ready: AtomicBool,
}

impl LogicalUnit {
    /// A logical unit over `volume` with `block_size` byte blocks.
    ///
    /// # Panics
    /// If the block size is not one of [`crate::constants::BLOCK_SIZES`] (checked by config).
    pub fn new(identity: LuIdentity, block_size: u32, volume: Arc<Volume>) -> Self {
        assert!(
            crate::constants::BLOCK_SIZES.contains(&block_size),
            "block size {block_size}"
        );
        let blocks = volume.size_bytes() / u64::from(block_size);
        Self {
            identity,
            block_size,
            blocks,
            write_cache: AtomicBool::new(true),
            d_sense: AtomicBool::new(false),
            thin: volume.supports_unmap(),
            volume,
            pr: Mutex::new(PrState::default()),
            spc2: Mutex::new(None),
            ua: Mutex::new(BTreeMap::new()),
            nexuses: Mutex::new(BTreeSet::new()),
            tasks: Arc::new(TaskSet::default()),
            ever_seen: Mutex::new(BTreeSet::new()),
            pr_store: None,
            epoch: std::sync::atomic::AtomicU64::new(0),
            alua_announced: std::sync::atomic::AtomicU64::new(0),
            nexus_aborts: Mutex::new(BTreeMap::new()),
            stats: crate::stats::IoStats::default(),
            shared: None,
            shared_ready: AtomicBool::new(false),
        }
    }

    /// Sends reservation changes (PR OUT, RESERVE, RELEASE) to `log` under `key` instead of
    /// applying them here; the state comes back through [`Self::install_shared`].
    pub fn with_shared_state(mut self, key: u64, log: Arc<dyn SharedScsi>) -> Self {
        self.shared = Some((key, log));
        self
    }

    /// Installs the cluster's reservation state and raises `unit_attentions` for the nexuses
    /// this controller knows (each controller raises those of its own, once).
    pub fn install_shared(&self, state: &SharedLuState, events: &[LuEvents]) {
        *self.pr.lock().expect("pr lock") = state.pr.clone();
        *self.spc2.lock().expect("spc2 lock") = state.spc2.clone();
        self.write_cache
            .store(!state.write_cache_off, Ordering::Relaxed);
        self.d_sense.store(state.d_sense, Ordering::Relaxed);
        for e in events {
            if let Some(by) = &e.mode_changed_by {
                self.ua_others(by, SenseReason::UaModeParametersChanged);
            }
            if let Some(by) = &e.reset {
                self.reset_tasks(by);
            }
            for n in &e.abort {
                self.abort_nexus(n);
            }
            let known = self.nexuses.lock().expect("nexus lock").clone();
            for (n, r) in &e.unit_attentions {
                if known.contains(n) {
                    self.queue_ua(n, *r);
                }
            }
        }
        self.shared_ready.store(true, Ordering::Release);
    }

    /// The state a cluster shares for this LU, as this LU holds it now (reservations, SPC-2
    /// holder, mode values): for status and for checking that controllers agree.
    pub fn shared_snapshot(&self) -> SharedLuState {
        SharedLuState {
            pr: self.pr.lock().expect("pr lock").clone(),
            spc2: self.spc2.lock().expect("spc2 lock").clone(),
            write_cache_off: !self.write_cache.load(Ordering::Relaxed),
            d_sense: self.d_sense.load(Ordering::Relaxed),
        }
    }

    /// Orders `change` through the cluster and maps its outcome.
    async fn submit_shared(&self, change: ScsiChange) -> Option<Result<DataIn, Failure>> {
        let (key, log) = self.shared.as_ref()?;
        Some(match log.submit(*key, change).await {
            Ok(ChangeOutcome::Done) => Ok(DataIn::None),
            Ok(ChangeOutcome::Conflict) => Err(Failure::Conflict),
            Ok(ChangeOutcome::Sense(r)) | Err(r) => Err(Failure::Sense(r)),
        })
    }
    /// Identity.
    pub fn identity(&self) -> &LuIdentity {
        &self.identity
    }
    /// Logical block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }
    /// Capacity in blocks.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }
    /// Whether the write cache is reported enabled (writes without FUA may be volatile until
    /// SYNCHRONIZE CACHE).
    pub fn write_cache_enabled(&self) -> bool {
        self.write_cache.load(Ordering::Relaxed)
    }
    /// Whether the LU is thin provisioned (UNMAP and WRITE SAME with UNMAP deallocate; reads
    /// of deallocated blocks return zeros).
    pub fn thin_provisioned(&self) -> bool {
        self.thin
    }
    /// Whether sense is returned in descriptor format.
    pub fn descriptor_sense(&self) -> bool {
        self.d_sense.load(Ordering::Relaxed)
    }

    /// Keeps persistent reservations at `path` (APTPL), loading what is there.
    ///
    /// # Errors
    /// A damaged or unreadable store: the operator must decide, so the start stops.
    pub fn with_pr_store(
        mut self,
        path: std::path::PathBuf,
    ) -> Result<Self, crate::pr_store::StoreError> {
        if let Some(state) = crate::pr_store::load(&path)? {
            tracing::info!(path = %path.display(), registrations = state.registrations.len(), "persistent reservations restored (APTPL)");
            self.pr = Mutex::new(state);
        }
        self.pr_store = Some(path);
        Ok(self)
    }

    /// A copy of the persistent reservation state (for status pages and tests).
    pub fn pr_state(&self) -> PrState {
        self.pr.lock().expect("pr lock").clone()
    }

    /// Records that `nexus` addresses this LU; cheap when it is already known (the common
    /// case: no allocation). SAM-5 §6.2: after power on every I_T nexus starts with a POWER
    /// ON, RESET, OR BUS DEVICE RESET OCCURRED unit attention; a nexus met for the first time
    /// since start gets it now.
    fn note_nexus(&self, nexus: &ItNexus) {
        {
            let mut known = self.nexuses.lock().expect("nexus lock");
            if known.contains(nexus) {
                return;
            }
            known.insert(nexus.clone());
        }
        if self
            .ever_seen
            .lock()
            .expect("seen lock")
            .insert(nexus.clone())
        {
            self.queue_ua(nexus, SenseReason::UaPowerOnReset);
        }
    }

    /// Raises ASYMMETRIC ACCESS STATE CHANGED for every known nexus if `generation` (of the
    /// shared access states) is one this LU has not announced yet.
    fn announce_access_states(&self, generation: u64) {
        // A plain load first: every command passes here, and a swap would write the shared
        // cache line each time.
        if self.alua_announced.load(Ordering::Acquire) == generation
            || self.alua_announced.swap(generation, Ordering::AcqRel) == generation
        {
            return;
        }
        let all: Vec<ItNexus> = self
            .nexuses
            .lock()
            .expect("nexus lock")
            .iter()
            .cloned()
            .collect();
        for n in all {
            self.queue_ua(&n, SenseReason::UaAsymmetricAccessStateChanged);
        }
    }

    fn queue_ua(&self, nexus: &ItNexus, reason: SenseReason) {
        let mut ua = self.ua.lock().expect("ua lock");
        let q = ua.entry(nexus.clone()).or_default();
        if q.len() < UA_PENDING_MAX && !q.contains(&reason) {
            q.push_back(reason);
        }
    }

    fn take_ua(&self, nexus: &ItNexus) -> Option<SenseReason> {
        self.ua
            .lock()
            .expect("ua lock")
            .get_mut(nexus)
            .and_then(VecDeque::pop_front)
    }

    /// The I_T nexus is gone (session closed): its SPC-2 reservation and pending unit
    /// attentions go with it; persistent registrations stay. In a cluster the release goes
    /// through the log (when this nexus holds the reservation).
    pub async fn nexus_lost(&self, nexus: &ItNexus) {
        self.ua.lock().expect("ua lock").remove(nexus);
        self.nexuses.lock().expect("nexus lock").remove(nexus);
        let holds = self.spc2.lock().expect("spc2 lock").as_ref() == Some(nexus);
        if !holds {
            return;
        }
        let change = ScsiChange::Release {
            nexus: nexus.clone(),
        };
        match self.submit_shared(change).await {
            None => *self.spc2.lock().expect("spc2 lock") = None,
            Some(Ok(_)) => {}
            Some(Err(_)) => tracing::warn!(
                initiator = %nexus.initiator_name,
                "the session ended but its reservation could not be released through the cluster; it is released by the next RELEASE or reset"
            ),
        }
    }

    /// LOGICAL UNIT RESET (or a target reset): SPC-2 reservations are released and every nexus
    /// gets a BUS DEVICE RESET unit attention; tasks are aborted. Persistent reservations
    /// survive. In a cluster this happens on every controller (through the log) before it
    /// returns.
    pub async fn reset(&self, by: &ItNexus) {
        let change = ScsiChange::Reset { by: by.clone() };
        match self.submit_shared(change).await {
            None => self.reset_local(by),
            Some(Ok(_)) => {}
            Some(Err(_)) => {
                tracing::warn!("the reset could not be ordered through the cluster; applied on this controller only");
                self.reset_local(by);
            }
        }
    }

    /// Raises `reason` for every nexus this LU knows except `but`.
    fn ua_others(&self, but: &ItNexus, reason: SenseReason) {
        let others: Vec<ItNexus> = self
            .nexuses
            .lock()
            .expect("nexus lock")
            .iter()
            .filter(|n| *n != but)
            .cloned()
            .collect();
        for n in others {
            self.queue_ua(&n, reason);
        }
    }

    /// The abort generation of `nexus` (see `nexus_aborts`).
    fn abort_generation(&self, nexus: &ItNexus) -> u64 {
        self.nexus_aborts
            .lock()
            .expect("abort lock")
            .get(nexus)
            .copied()
            .unwrap_or(0)
    }

    /// Aborts every task of `nexus` admitted so far (PREEMPT AND ABORT of its registration).
    fn abort_nexus(&self, nexus: &ItNexus) {
        *self
            .nexus_aborts
            .lock()
            .expect("abort lock")
            .entry(nexus.clone())
            .or_default() += 1;
    }

    /// The reset on this controller.
    fn reset_local(&self, by: &ItNexus) {
        *self.spc2.lock().expect("spc2 lock") = None;
        self.reset_tasks(by);
    }

    /// A reset's effect on this controller's tasks and nexuses (the SPC-2 release is state:
    /// in a cluster it comes with the installed state, which later entries may already have
    /// changed again).
    fn reset_tasks(&self, by: &ItNexus) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        // SAM-5 §6.3.3: the unit attention goes to every I_T nexus, the requester's included
        // (libiscsi's MultipathIO.Reset checks each path).
        let mut all: BTreeSet<ItNexus> = self.nexuses.lock().expect("nexus lock").clone();
        all.insert(by.clone());
        for n in all {
            self.queue_ua(&n, SenseReason::UaBusDeviceReset);
        }
    }

    fn check_range(&self, lba: u64, blocks: u32) -> Result<(), SenseReason> {
        match lba.checked_add(u64::from(blocks)) {
            Some(end) if end <= self.blocks => Ok(()),
            _ => Err(SenseReason::LbaOutOfRange),
        }
    }

    /// Writes the whole blocks the initiator sent (at most `blocks`); returns the bytes written.
    async fn write_blocks(
        &self,
        cmd: &ScsiCommand,
        lba: u64,
        blocks: u32,
        fua: bool,
        wanted: &mut Option<u64>,
    ) -> Result<usize, SenseReason> {
        let bs = u64::from(self.block_size);
        *wanted = Some(u64::from(blocks) * bs);
        self.check_range(lba, blocks)?;
        let bytes = self.check_transfer(blocks, len_field_byte(cmd.cdb[0]))?;
        // FCP-4 / SAM-5 overflow rule: the transport delivered fewer bytes than the CDB asks
        // for; process the command on the whole blocks that did arrive.
        let bytes = if cmd.data_out.len() < bytes {
            cmd.data_out.len() / bs as usize * bs as usize
        } else {
            bytes
        };
        if bytes > 0 {
            let fua = fua || !self.write_cache_enabled();
            self.volume
                .write(lba * bs, &cmd.data_out[..bytes], fua)
                .await
                .map_err(|e| backend::write_error(&e, lba))?;
        }
        Ok(bytes)
    }

    fn check_transfer(&self, blocks: u32, len_byte: u16) -> Result<usize, SenseReason> {
        let bytes = u64::from(blocks) * u64::from(self.block_size);
        if bytes > u64::from(TRANSFER_BYTES_MAX) {
            return Err(SenseReason::InvalidFieldInCdb {
                byte: len_byte,
                bit: None,
            });
        }
        Ok(bytes as usize)
    }
}

/// Decodes the SAM-5 LUN field (peripheral or flat addressing, first level only).
pub fn decode_lun(raw: u64) -> Option<u16> {
    let b = raw.to_be_bytes();
    if b[2..].iter().any(|&x| x != 0) {
        return None;
    }
    match b[0] >> 6 {
        0b00 if b[0] == 0 => Some(u16::from(b[1])),
        0b01 => Some(u16::from(b[0] & 0x3f) << 8 | u16::from(b[1])),
        _ => None,
    }
}

/// The REPORT LUNS well-known logical unit (SPC-4 §8.2): extended addressing, W-LUN 01h.
pub const REPORT_LUNS_WLUN: u64 = 0xc101_0000_0000_0000;

/// Encodes a LUN number as the SAM-5 LUN field (peripheral below 256, flat above).
pub fn encode_lun(lun: u16) -> u64 {
    let b0 = if lun < 256 {
        0
    } else {
        0x40 | (lun >> 8) as u8
    };
    u64::from_be_bytes([b0, lun as u8, 0, 0, 0, 0, 0, 0])
}

/// The LUNs a controller exports, shared by its ports. Readers take a snapshot (an `Arc`
/// clone under a read lock held for a moment); a volume created or deleted at run time swaps
/// in a new map, so a command never sees a half-updated table.
#[derive(Debug, Default)]
pub struct LunTable(std::sync::RwLock<Arc<BTreeMap<u16, Arc<LogicalUnit>>>>);

impl LunTable {
    /// A table holding `luns`.
    pub fn new(luns: BTreeMap<u16, Arc<LogicalUnit>>) -> Self {
        Self(std::sync::RwLock::new(Arc::new(luns)))
    }

    /// The LUNs now.
    pub fn load(&self) -> Arc<BTreeMap<u16, Arc<LogicalUnit>>> {
        Arc::clone(&self.0.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The LU at `lun`.
    pub fn get(&self, lun: u16) -> Option<Arc<LogicalUnit>> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&lun)
            .cloned()
    }

    /// Adds `lu` at `lun`. Refused (returns `false`) when the LUN is taken or the table holds
    /// [`crate::constants::LUNS_MAX`] LUNs already.
    pub fn insert(&self, lun: u16, lu: Arc<LogicalUnit>) -> bool {
        let mut g = self.0.write().unwrap_or_else(|p| p.into_inner());
        if g.contains_key(&lun) || g.len() >= crate::constants::LUNS_MAX {
            return false;
        }
        let mut next = (**g).clone();
        next.insert(lun, lu);
        *g = Arc::new(next);
        true
    }

    /// Removes the LU at `lun`, returning it.
    pub fn remove(&self, lun: u16) -> Option<Arc<LogicalUnit>> {
        let mut g = self.0.write().unwrap_or_else(|p| p.into_inner());
        let mut next = (**g).clone();
        let old = next.remove(&lun);
        *g = Arc::new(next);
        old
    }
}

/// The device server of one target port.
#[derive(Debug)]
pub struct DeviceServer {
    luns: Arc<LunTable>,
    port: TargetPort,
    /// Every target port (group) that serves these LUs, this one included, for REPORT TARGET
    /// PORT GROUPS.
    port_groups: Vec<TargetPort>,
    /// Access states of the groups (shared by every port of this controller).
    alua: Arc<AccessStates>,
}

impl DeviceServer {
    /// A device server for `port` exporting `luns`.
    ///
    /// # Panics
    /// If more than [`crate::constants::LUNS_MAX`] LUNs are given.
    pub fn new(port: TargetPort, luns: BTreeMap<u16, Arc<LogicalUnit>>) -> Self {
        assert!(luns.len() <= crate::constants::LUNS_MAX);
        Self {
            luns: Arc::new(LunTable::new(luns)),
            port,
            port_groups: vec![port],
            alua: Arc::default(),
        }
    }

    /// Shares `alua` (set from the cluster's membership) as the access states of the groups.
    pub fn with_access_states(mut self, alua: Arc<AccessStates>) -> Self {
        self.alua = alua;
        self
    }

    /// Declares every target port that serves the same LUs (each its own target port group),
    /// so REPORT TARGET PORT GROUPS lists them all and agrees with each port's VPD 0x83.
    ///
    /// # Panics
    /// If this server's own port is not in the list.
    pub fn with_port_groups(mut self, all: Vec<TargetPort>) -> Self {
        assert!(all.contains(&self.port), "the list includes this port");
        self.port_groups = all;
        self
    }

    /// Whether target port group `group` can serve (is not unavailable): discovery lists only
    /// the portals of such groups.
    pub fn group_serving(&self, group: u16) -> bool {
        self.alua.state(group) != alua::AccessState::Unavailable
    }

    /// Shares `table` as this server's LUNs (every port of a controller serves one table, so
    /// a volume created or deleted at run time appears or goes on all of them at once).
    pub fn with_lun_table(mut self, table: Arc<LunTable>) -> Self {
        self.luns = table;
        self
    }

    /// The LUNs now.
    pub fn luns(&self) -> Arc<BTreeMap<u16, Arc<LogicalUnit>>> {
        self.luns.load()
    }

    /// The LUN table (shared with the other ports of this controller).
    pub fn lun_table(&self) -> &Arc<LunTable> {
        &self.luns
    }

    /// Admits a command into its logical unit's task set. Call in the order commands arrive
    /// (CmdSN order), before running them concurrently: ORDERED and HEAD OF QUEUE semantics
    /// follow admission order.
    pub fn admit(&self, cmd: ScsiCommand) -> Admitted {
        let lu = decode_lun(cmd.lun).and_then(|l| self.luns.get(l));
        let (ticket, full, epoch, nexus_epoch) = match &lu {
            Some(lu) => {
                let epoch = lu.epoch.load(Ordering::Acquire);
                let ne = lu.abort_generation(&cmd.nexus);
                match lu.tasks.admit(cmd.attr, &cmd.nexus) {
                    Some(t) => (Some(t), false, epoch, ne),
                    None => (None, true, epoch, ne),
                }
            }
            None => (None, false, 0, 0),
        };
        Admitted {
            cmd,
            ticket,
            full,
            lu,
            epoch,
            nexus_epoch,
        }
    }

    /// Runs an admitted command once its task attribute allows, to completion.
    pub async fn run(&self, a: Admitted) -> CommandOutcome {
        if a.full {
            return CommandOutcome::status(CommandStatus::TaskSetFull);
        }
        if let Some(t) = &a.ticket {
            t.wait_turn().await;
        }
        let cleared = |lu: Option<&Arc<LogicalUnit>>, epoch: u64, ne: u64, n: &ItNexus| {
            lu.is_some_and(|lu| {
                lu.epoch.load(Ordering::Acquire) != epoch || lu.abort_generation(n) != ne
            })
        };
        // A reset, CLEAR TASK SET or PREEMPT AND ABORT while this task waited: it never runs.
        if cleared(a.lu.as_ref(), a.epoch, a.nexus_epoch, &a.cmd.nexus) {
            return CommandOutcome::status(CommandStatus::TaskAborted);
        }
        let Admitted {
            cmd,
            ticket,
            lu,
            epoch,
            nexus_epoch,
            ..
        } = a;
        let nexus = cmd.nexus.clone();
        let kind = crate::stats::kind_of(&cmd.cdb);
        let bytes = match kind {
            crate::stats::IoKind::Read => u64::from(cmd.data_in_len),
            _ => cmd.data_out.len() as u64,
        };
        let counting = lu.as_ref().map(|lu| lu.stats.start());
        // The LU admitted is the one that runs: one table lookup per command.
        let outcome = self.execute_now(cmd, lu.clone()).await;
        if let Some(t) = counting {
            t.finish(kind, bytes, outcome.status == CommandStatus::Good);
        }
        drop(ticket);
        if cleared(lu.as_ref(), epoch, nexus_epoch, &nexus) {
            return CommandOutcome::status(CommandStatus::TaskAborted);
        }
        outcome
    }

    /// CLEAR TASK SET from `by`: every task in the LU's task set is terminated (TAS=0: without
    /// a response), and the other nexuses that had tasks there get COMMANDS CLEARED BY ANOTHER
    /// INITIATOR.
    pub fn clear_task_set(&self, by: &ItNexus, lun: u64) {
        let Some(lu) = decode_lun(lun).and_then(|l| self.luns.get(l)) else {
            return;
        };
        let had_tasks = lu.tasks.nexuses();
        lu.epoch.fetch_add(1, Ordering::AcqRel);
        for n in had_tasks.iter().filter(|n| *n != by) {
            lu.queue_ua(n, SenseReason::UaCommandsClearedByAnotherInitiator);
        }
    }

    /// Admits and runs one command (for callers that issue one command at a time).
    pub async fn execute(&self, cmd: ScsiCommand) -> CommandOutcome {
        let a = self.admit(cmd);
        self.run(a).await
    }

    async fn execute_now(&self, cmd: ScsiCommand, lu: Option<Arc<LogicalUnit>>) -> CommandOutcome {
        let descriptor = lu.as_ref().is_some_and(|l| l.descriptor_sense());
        let decoded = cdb::decode(&cmd.cdb);
        let mut wanted = None;
        let result = match (decoded, lu) {
            (Err(reason), _) => Err(reason),
            (Ok(Cdb::ReportLuns { select, alloc }), _) => {
                self.report_luns(select, alloc).map(DataIn::Bytes)
            }
            // The REPORT LUNS well-known LU answers INQUIRY, REQUEST SENSE and TEST UNIT READY.
            (Ok(c), _) if cmd.lun == REPORT_LUNS_WLUN => match c {
                Cdb::Inquiry {
                    evpd: false, alloc, ..
                } => Ok(DataIn::Bytes(truncate(inquiry::well_known(), alloc))),
                Cdb::Inquiry { .. } => Err(SenseReason::InvalidFieldInCdb {
                    byte: 1,
                    bit: Some(0),
                }),
                Cdb::RequestSense { desc, alloc } => Ok(DataIn::Bytes(truncate(
                    SenseReason::NoSense.encode(desc),
                    alloc,
                ))),
                Cdb::TestUnitReady => Ok(DataIn::None),
                _ => Err(SenseReason::InvalidOpcode),
            },
            (
                Ok(Cdb::Inquiry {
                    evpd: false, alloc, ..
                }),
                None,
            ) => Ok(DataIn::Bytes(truncate(inquiry::not_present(), alloc))),
            (Ok(_), None) => Err(SenseReason::LunNotSupported),
            (Ok(c), Some(lu)) => match self.gate_and_execute(&lu, c, &cmd, &mut wanted).await {
                Ok(d) => Ok(d),
                Err(Failure::Sense(r)) => Err(r),
                Err(Failure::Conflict) => {
                    return CommandOutcome {
                        data_out_wanted: wanted,
                        ..CommandOutcome::status(CommandStatus::ReservationConflict)
                    }
                }
            },
        };
        match result {
            Ok(data_in) => CommandOutcome {
                data_out_wanted: wanted,
                ..CommandOutcome::good(data_in)
            },
            Err(reason) => CommandOutcome {
                data_out_wanted: wanted,
                ..CommandOutcome::check(reason, descriptor)
            },
        }
    }

    /// Unit attentions, reservation conflicts and the reservation commands, then the command.
    async fn gate_and_execute(
        &self,
        lu: &LogicalUnit,
        c: Cdb,
        cmd: &ScsiCommand,
        wanted: &mut Option<u64>,
    ) -> Result<DataIn, Failure> {
        let nexus = &cmd.nexus;
        // An access state changed since this LU last said so: every nexus it knows gets
        // ASYMMETRIC ACCESS STATE CHANGED, once (a nexus first met after the change does not).
        lu.announce_access_states(self.alua.generation());
        lu.note_nexus(nexus);
        // SPC-4 §5.14: INQUIRY and REPORT LUNS neither report nor clear a unit attention;
        // REQUEST SENSE reports it as its data and clears it.
        match c {
            Cdb::Inquiry { .. } => {}
            Cdb::RequestSense { desc, alloc } => {
                if let Some(ua) = lu.take_ua(nexus) {
                    return Ok(DataIn::Bytes(truncate(ua.encode(desc), alloc)));
                }
            }
            _ => {
                if let Some(ua) = lu.take_ua(nexus) {
                    return Err(Failure::Sense(ua));
                }
            }
        }
        alua::gate(self.alua.state(self.port.port_group), &c)?;
        if lu.shared.is_some() && !lu.shared_ready.load(Ordering::Acquire) && !alua::reporting(&c) {
            return Err(Failure::Sense(SenseReason::NotReadyBecomingReady));
        }
        let access = access_class(&c);
        // SPC-2 reservation: only the holder gets past, except for always-allowed commands
        // and RELEASE (which is a no-op for others).
        {
            let spc2 = lu.spc2.lock().expect("spc2 lock");
            if let Some(holder) = spc2.as_ref() {
                let allowed = access == Access::Always
                    && !matches!(
                        c,
                        Cdb::PersistentReserveOut { .. }
                            | Cdb::PersistentReserveIn { .. }
                            | Cdb::Reserve
                    );
                if holder != nexus && !allowed && !matches!(c, Cdb::Release) {
                    return Err(Failure::Conflict);
                }
            }
        }
        if lu.pr.lock().expect("pr lock").conflicts(nexus, access) {
            return Err(Failure::Conflict);
        }
        match c {
            Cdb::PersistentReserveIn {
                service_action,
                alloc,
            } => {
                let pr = lu.pr.lock().expect("pr lock");
                let d = match service_action {
                    0 => pr.read_keys(),
                    1 => pr.read_reservation(),
                    2 => PrState::report_capabilities(pr.aptpl),
                    _ => pr.read_full_status(),
                };
                Ok(DataIn::Bytes(truncate(d, alloc)))
            }
            Cdb::PersistentReserveOut {
                service_action,
                type_code,
                param_len,
            } => {
                *wanted = Some(u64::from(param_len));
                let op = pr::decode_out(service_action, type_code, param_len, &cmd.data_out)?;
                let change = ScsiChange::PrOut {
                    nexus: nexus.clone(),
                    op: op.clone(),
                };
                if let Some(r) = lu.submit_shared(change).await {
                    return r;
                }
                let effects = {
                    let mut pr = lu.pr.lock().expect("pr lock");
                    // Apply to a copy; commit only once it is durable where APTPL asks for it.
                    let mut next = pr.clone();
                    let effects = next.apply(nexus, op).map_err(|e| match e {
                        PrError::Conflict => Failure::Conflict,
                        PrError::Sense(r) => Failure::Sense(r),
                    })?;
                    if let Some(path) = &lu.pr_store {
                        let saved = if next.aptpl {
                            crate::pr_store::save(path, &next)
                        } else {
                            crate::pr_store::remove(path)
                        };
                        if let Err(e) = saved {
                            tracing::error!(cause = %e, "cannot persist reservations; the PR OUT is refused");
                            return Err(Failure::Sense(SenseReason::InternalTargetFailure));
                        }
                    }
                    *pr = next;
                    effects
                };
                for (n, reason) in effects.unit_attentions {
                    lu.queue_ua(&n, reason);
                }
                for n in &effects.abort {
                    lu.abort_nexus(n);
                }
                Ok(DataIn::None)
            }
            Cdb::Reserve => {
                let change = ScsiChange::Reserve {
                    nexus: nexus.clone(),
                };
                if let Some(r) = lu.submit_shared(change).await {
                    return r;
                }
                // SPC-4 §5.12.3: with persistent registrations present, RESERVE conflicts.
                if !lu.pr.lock().expect("pr lock").registrations.is_empty() {
                    return Err(Failure::Conflict);
                }
                let mut spc2 = lu.spc2.lock().expect("spc2 lock");
                match spc2.as_ref() {
                    Some(h) if h != nexus => Err(Failure::Conflict),
                    _ => {
                        *spc2 = Some(nexus.clone());
                        Ok(DataIn::None)
                    }
                }
            }
            Cdb::Release => {
                let change = ScsiChange::Release {
                    nexus: nexus.clone(),
                };
                if let Some(r) = lu.submit_shared(change).await {
                    return r;
                }
                let mut spc2 = lu.spc2.lock().expect("spc2 lock");
                if spc2.as_ref() == Some(nexus) {
                    *spc2 = None;
                }
                Ok(DataIn::None)
            }
            c => Ok(self.execute_lu(lu, c, cmd, wanted).await?),
        }
    }

    /// The I_T nexus is gone: tell every LU.
    pub async fn nexus_lost(&self, nexus: &ItNexus) {
        for lu in self.luns.load().values() {
            lu.nexus_lost(nexus).await;
        }
    }

    /// A LOGICAL UNIT RESET from `by` (`lun` set) or a target reset (`lun` None). Returns
    /// once it has taken effect (in a cluster: on every controller).
    pub async fn reset(&self, by: &ItNexus, lun: Option<u64>) {
        for (l, lu) in self.luns.load().iter() {
            if lun.is_none_or(|raw| decode_lun(raw) == Some(*l)) {
                lu.reset(by).await;
            }
        }
    }

    async fn execute_lu(
        &self,
        lu: &LogicalUnit,
        c: Cdb,
        cmd: &ScsiCommand,
        wanted: &mut Option<u64>,
    ) -> Result<DataIn, SenseReason> {
        let bs = u64::from(lu.block_size);
        match c {
            Cdb::TestUnitReady | Cdb::StartStopUnit => Ok(DataIn::None),
            Cdb::Inquiry {
                evpd: false, alloc, ..
            } => Ok(DataIn::Bytes(truncate(inquiry::standard(lu), alloc))),
            Cdb::Inquiry {
                evpd: true,
                page,
                alloc,
            } => inquiry::vpd(lu, self.port, page)
                .map(|d| DataIn::Bytes(truncate(d, alloc)))
                .ok_or(SenseReason::InvalidFieldInCdb { byte: 2, bit: None }),
            Cdb::RequestSense { desc, alloc } => Ok(DataIn::Bytes(truncate(
                SenseReason::NoSense.encode(desc),
                alloc,
            ))),
            Cdb::ReadCapacity10 => {
                let last = u32::try_from(lu.blocks - 1).unwrap_or(u32::MAX);
                let mut d = last.to_be_bytes().to_vec();
                d.extend_from_slice(&lu.block_size.to_be_bytes());
                Ok(DataIn::Bytes(d))
            }
            Cdb::ReadCapacity16 { alloc } => {
                let mut d = vec![0u8; 32];
                d[..8].copy_from_slice(&(lu.blocks - 1).to_be_bytes());
                d[8..12].copy_from_slice(&lu.block_size.to_be_bytes());
                let exp = (PHYSICAL_BLOCK_BYTES / lu.block_size)
                    .max(1)
                    .trailing_zeros() as u8;
                d[13] = exp; // LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT
                if lu.thin {
                    d[14] = 0x80 | 0x40; // LBPME, LBPRZ: deallocated blocks read as zeros
                }
                Ok(DataIn::Bytes(truncate(d, alloc)))
            }
            Cdb::Read { lba, blocks, .. } => {
                let len_byte = len_field_byte(cmd.cdb[0]);
                lu.check_range(lba, blocks)?;
                let bytes = lu.check_transfer(blocks, len_byte)?;
                if bytes == 0 {
                    return Ok(DataIn::None);
                }
                let data = lu
                    .volume
                    .read(lba * bs, bytes)
                    .await
                    .map_err(|e| backend::read_error(&e, lba))?;
                Ok(DataIn::Read(data))
            }
            Cdb::Write { lba, blocks, fua } => {
                lu.write_blocks(cmd, lba, blocks, fua, wanted).await?;
                Ok(DataIn::None)
            }
            Cdb::WriteAndVerify {
                lba,
                blocks,
                bytchk,
            } => {
                let written = lu.write_blocks(cmd, lba, blocks, true, wanted).await?;
                if written > 0 {
                    let back = lu
                        .volume
                        .read(lba * bs, written)
                        .await
                        .map_err(|e| backend::read_error(&e, lba))?;
                    if bytchk {
                        let back = back.to_vec();
                        if let Some(i) = back
                            .iter()
                            .zip(&cmd.data_out[..written])
                            .position(|(a, b)| a != b)
                        {
                            return Err(SenseReason::Miscompare { offset: i as u64 });
                        }
                    }
                }
                Ok(DataIn::None)
            }
            Cdb::Verify {
                lba,
                blocks,
                bytchk,
            } => {
                lu.check_range(lba, blocks)?;
                let bytes = lu.check_transfer(blocks, len_field_byte(cmd.cdb[0]))?;
                if bytchk {
                    *wanted = Some(bytes as u64);
                }
                if bytes == 0 {
                    return Ok(DataIn::None);
                }
                let medium = lu
                    .volume
                    .read(lba * bs, bytes)
                    .await
                    .map_err(|e| backend::read_error(&e, lba))?;
                if bytchk {
                    let n = cmd.data_out.len().min(bytes);
                    let medium = medium.to_vec();
                    if let Some(i) = medium[..n]
                        .iter()
                        .zip(&cmd.data_out[..n])
                        .position(|(a, b)| a != b)
                    {
                        return Err(SenseReason::Miscompare { offset: i as u64 });
                    }
                }
                Ok(DataIn::None)
            }
            Cdb::PreFetch { lba, blocks } => {
                // The volume has no cache to warm: checking the range is all there is to do.
                lu.check_range(lba, blocks)?;
                Ok(DataIn::None)
            }
            Cdb::ReadDefectData {
                twelve,
                flags,
                alloc,
            } => {
                let d = if twelve {
                    vec![0, flags, 0, 0, 0, 0, 0, 0]
                } else {
                    vec![0, flags, 0, 0]
                };
                Ok(DataIn::Bytes(truncate(d, alloc)))
            }
            Cdb::FormatUnit => Ok(DataIn::None),
            Cdb::LogSense {
                page,
                subpage,
                alloc,
            } => {
                if subpage != 0 {
                    return Err(SenseReason::InvalidFieldInCdb { byte: 3, bit: None });
                }
                let (code, params): (u8, Vec<u8>) = match page {
                    // Supported log pages.
                    0x00 => (0x00, vec![0x00, 0x2f]),
                    // Informational exceptions: no exception pending; temperature not reported.
                    0x2f => (0x2f, vec![0x00, 0x00, 0x03, 0x04, 0x00, 0x00, 0xff, 0x00]),
                    _ => {
                        return Err(SenseReason::InvalidFieldInCdb {
                            byte: 2,
                            bit: Some(5),
                        })
                    }
                };
                let mut d = vec![code, 0];
                d.extend_from_slice(&(params.len() as u16).to_be_bytes());
                d.extend_from_slice(&params);
                Ok(DataIn::Bytes(truncate(d, alloc)))
            }
            Cdb::ModeSelect { ten, param_len } => {
                *wanted = Some(u64::from(param_len));
                let changes = mode::parse_select(lu, ten, param_len, &cmd.data_out)?;
                if lu.shared.is_some() {
                    if changes.wce == Some(false) {
                        lu.volume
                            .flush()
                            .await
                            .map_err(|e| backend::write_error(&e, 0))?;
                    }
                    let change = ScsiChange::ModeSelect {
                        nexus: cmd.nexus.clone(),
                        wce: changes.wce,
                        d_sense: changes.d_sense,
                    };
                    return match lu.submit_shared(change).await {
                        Some(Ok(d)) => Ok(d),
                        Some(Err(Failure::Sense(r))) => Err(r),
                        _ => Err(SenseReason::InternalTargetFailure),
                    };
                }
                let mut changed = false;
                if let Some(w) = changes.wce {
                    changed |= lu.write_cache.swap(w, Ordering::Relaxed) != w;
                    if !w {
                        // Turning the write cache off: what was cached must reach the medium.
                        lu.volume
                            .flush()
                            .await
                            .map_err(|e| backend::write_error(&e, 0))?;
                    }
                }
                if let Some(d) = changes.d_sense {
                    changed |= lu.d_sense.swap(d, Ordering::Relaxed) != d;
                }
                if changed {
                    lu.ua_others(&cmd.nexus, SenseReason::UaModeParametersChanged);
                }
                Ok(DataIn::None)
            }
            Cdb::OrWrite { lba, blocks, fua } => {
                let bytes = u64::from(blocks) * bs;
                *wanted = Some(bytes);
                lu.check_range(lba, blocks)?;
                let bytes = lu.check_transfer(blocks, 10)?;
                let bytes = if cmd.data_out.len() < bytes {
                    cmd.data_out.len() / bs as usize * bs as usize
                } else {
                    bytes
                };
                if bytes > 0 {
                    let fua = fua || !lu.write_cache_enabled();
                    lu.volume
                        .or_write(lba * bs, &cmd.data_out[..bytes], fua)
                        .await
                        .map_err(|e| backend::write_error(&e, lba))?;
                }
                Ok(DataIn::None)
            }
            Cdb::WriteSame {
                lba,
                blocks,
                unmap,
                ndob,
            } => {
                let len_byte = if cmd.cdb[0] == cdb::op::WRITE_SAME_10 {
                    7
                } else {
                    10
                };
                if !ndob {
                    *wanted = Some(bs);
                }
                if blocks == 0 {
                    // WSNZ=1 in VPD 0xB0: a zero length is not "to the end of the medium".
                    return Err(SenseReason::InvalidFieldInCdb {
                        byte: len_byte,
                        bit: None,
                    });
                }
                lu.check_range(lba, blocks)?;
                let bytes = u64::from(blocks) * bs;
                if bytes > crate::constants::WRITE_SAME_BYTES_MAX {
                    return Err(SenseReason::InvalidFieldInCdb {
                        byte: len_byte,
                        bit: None,
                    });
                }
                if unmap && !lu.thin {
                    return Err(SenseReason::InvalidFieldInCdb {
                        byte: 1,
                        bit: Some(3),
                    });
                }
                let block: Vec<u8> = if ndob {
                    vec![0; bs as usize]
                } else if cmd.data_out.len() != bs as usize {
                    // WRITE SAME carries exactly one block.
                    return Err(SenseReason::InvalidFieldInCdb {
                        byte: len_byte,
                        bit: None,
                    });
                } else {
                    cmd.data_out[..bs as usize].to_vec()
                };
                if unmap && block.iter().all(|&b| b == 0) {
                    lu.volume
                        .unmap(lba * bs, bytes)
                        .await
                        .map_err(|e| backend::write_error(&e, lba))?;
                } else {
                    let chunk_blocks = (1u64 << 20) / bs;
                    let mut done = 0u64;
                    while done < u64::from(blocks) {
                        let n = chunk_blocks.min(u64::from(blocks) - done);
                        let buf: Vec<u8> = block
                            .iter()
                            .copied()
                            .cycle()
                            .take((n * bs) as usize)
                            .collect();
                        let at = lba + done;
                        lu.volume
                            .write(at * bs, &buf, !lu.write_cache_enabled())
                            .await
                            .map_err(|e| backend::write_error(&e, at))?;
                        done += n;
                    }
                }
                Ok(DataIn::None)
            }
            Cdb::Unmap { param_len } => {
                if !lu.thin {
                    return Err(SenseReason::InvalidOpcode);
                }
                let descs = crate::params::unmap(
                    param_len,
                    &cmd.data_out,
                    lu.blocks,
                    crate::constants::UNMAP_DESCRIPTORS_MAX,
                    crate::constants::UNMAP_BYTES_MAX / bs,
                )?;
                for d in descs {
                    lu.volume
                        .unmap(d.lba * bs, u64::from(d.blocks) * bs)
                        .await
                        .map_err(|e| backend::write_error(&e, d.lba))?;
                }
                Ok(DataIn::None)
            }
            Cdb::GetLbaStatus { lba, alloc } => {
                if lba >= lu.blocks {
                    return Err(SenseReason::LbaOutOfRange);
                }
                let max_desc = (alloc.saturating_sub(8) / 16).clamp(1, 64) as usize;
                let span = (lu.blocks - lba).min(u64::from(u32::MAX)) * bs;
                let runs = lu
                    .volume
                    .allocation(lba * bs, span)
                    .map_err(|e| backend::read_error(&e, lba))?;
                let mut body = Vec::new();
                for (start, len, allocated) in runs.into_iter().take(max_desc) {
                    body.extend_from_slice(&(start / bs).to_be_bytes());
                    body.extend_from_slice(&((len / bs) as u32).to_be_bytes());
                    body.push(if allocated || !lu.thin { 0 } else { 1 });
                    body.extend_from_slice(&[0; 3]);
                }
                let mut d = ((body.len() + 4) as u32).to_be_bytes().to_vec();
                d.extend_from_slice(&[0; 4]);
                d.extend_from_slice(&body);
                Ok(DataIn::Bytes(truncate(d, alloc)))
            }
            Cdb::CompareAndWrite { lba, blocks, fua } => {
                let bytes = u64::from(blocks) * bs;
                *wanted = Some(2 * bytes);
                if blocks > u32::from(crate::constants::COMPARE_AND_WRITE_BLOCKS_MAX) {
                    return Err(SenseReason::InvalidFieldInCdb {
                        byte: 13,
                        bit: None,
                    });
                }
                // The data must be exactly the blocks to compare and the blocks to write; this
                // also catches a count that wrapped the one-byte field.
                if cmd.data_out.len() as u64 != 2 * bytes {
                    return Err(SenseReason::InvalidFieldInCdb {
                        byte: 13,
                        bit: None,
                    });
                }
                lu.check_range(lba, blocks)?;
                if blocks == 0 {
                    return Ok(DataIn::None);
                }
                let (verify, data) = cmd.data_out.split_at(bytes as usize);
                let fua = fua || !lu.write_cache_enabled();
                match lu
                    .volume
                    .compare_and_write(lba * bs, verify, data, fua)
                    .await
                {
                    Ok(None) => Ok(DataIn::None),
                    Ok(Some(i)) => Err(SenseReason::Miscompare { offset: i as u64 }),
                    Err(e) => Err(backend::write_error(&e, lba)),
                }
            }
            Cdb::SynchronizeCache { lba, blocks } => {
                if lba > lu.blocks || (blocks != 0 && lu.check_range(lba, blocks).is_err()) {
                    return Err(SenseReason::LbaOutOfRange);
                }
                lu.volume
                    .flush()
                    .await
                    .map_err(|e| backend::write_error(&e, lba))?;
                Ok(DataIn::None)
            }
            Cdb::ModeSense {
                ten,
                dbd,
                llbaa,
                pc,
                page,
                subpage,
                alloc,
            } => {
                if pc == cdb::PageControl::Saved {
                    // SPC-4 §6.11: saving pages is not supported.
                    return Err(SenseReason::InvalidFieldInCdb {
                        byte: 2,
                        bit: Some(7),
                    });
                }
                let pages = mode::pages(lu, pc, page, subpage)?;
                Ok(DataIn::Bytes(truncate(
                    mode::response(lu, ten, dbd, llbaa, &pages),
                    alloc,
                )))
            }
            Cdb::ReportTargetPortGroups { extended, alloc } => Ok(DataIn::Bytes(truncate(
                self.report_target_port_groups(extended),
                alloc,
            ))),
            Cdb::ReportSupportedOpcodes {
                rctd,
                options,
                opcode,
                service_action,
                alloc,
            } => Ok(DataIn::Bytes(truncate(
                opcodes::report(rctd, options, opcode, service_action)?,
                alloc,
            ))),
            Cdb::ReportSupportedTmfs { extended, alloc } => Ok(DataIn::Bytes(truncate(
                opcodes::report_tmfs(extended),
                alloc,
            ))),
            Cdb::ReportLuns { .. } => unreachable!("handled before LU lookup"),
            Cdb::PersistentReserveIn { .. }
            | Cdb::PersistentReserveOut { .. }
            | Cdb::Reserve
            | Cdb::Release => {
                unreachable!("handled by gate_and_execute")
            }
        }
    }

    fn report_luns(&self, select: u8, alloc: u32) -> Result<Vec<u8>, SenseReason> {
        // SPC-4 §6.33: 00h LUs, 01h well-known LUs, 02h both; SPC-5 adds 10h-12h for
        // administrative/subsidiary LUs, of which there are none here.
        let (luns, wlun): (Vec<u16>, bool) = match select {
            0x00 | 0x11 => (self.luns.load().keys().copied().collect(), false),
            0x01 => (Vec::new(), true),
            0x02 => (self.luns.load().keys().copied().collect(), true),
            0x10 | 0x12 => (Vec::new(), false),
            _ => return Err(SenseReason::InvalidFieldInCdb { byte: 2, bit: None }),
        };
        let mut fields: Vec<u64> = luns.into_iter().map(encode_lun).collect();
        if wlun {
            fields.push(REPORT_LUNS_WLUN);
        }
        let mut d = Vec::with_capacity(8 + 8 * fields.len());
        d.extend_from_slice(&((8 * fields.len()) as u32).to_be_bytes());
        d.extend_from_slice(&[0; 4]);
        for f in fields {
            d.extend_from_slice(&f.to_be_bytes());
        }
        Ok(truncate(d, alloc))
    }

    fn report_target_port_groups(&self, extended: bool) -> Vec<u8> {
        let mut body = Vec::new();
        for g in &self.port_groups {
            // Each group's state from the cluster; PREF marks the group the command came
            // through.
            let state = self.alua.state(g.port_group).code();
            body.push(if *g == self.port { 0x80 | state } else { state });
            body.push(0x80 | 0x08 | 0x01); // T_SUP, U_SUP, AO_SUP
            body.extend_from_slice(&g.port_group.to_be_bytes());
            body.extend_from_slice(&[0, 0, 0, 1]); // reserved, status code, vendor, port count
            body.extend_from_slice(&[0, 0]);
            body.extend_from_slice(&g.relative_port.to_be_bytes());
        }
        let mut d = Vec::new();
        // RETURN DATA LENGTH counts the descriptors (SPC-4 §6.36).
        d.extend_from_slice(&(body.len() as u32).to_be_bytes());
        if extended {
            d.extend_from_slice(&[0x10, 0, 0, 0]); // format type 1, implicit transition time 0
        }
        d.extend_from_slice(&body);
        d
    }
}

/// A command admitted into a task set, ready to run.
#[derive(Debug)]
pub struct Admitted {
    cmd: ScsiCommand,
    ticket: Option<Ticket>,
    full: bool,
    lu: Option<Arc<LogicalUnit>>,
    /// The LU's reset epoch at admission: a later reset or CLEAR TASK SET aborts the task.
    epoch: u64,
    /// Its nexus's abort generation at admission: a later PREEMPT AND ABORT aborts it.
    nexus_epoch: u64,
}

/// Why a command did not end GOOD, before sense encoding.
enum Failure {
    Sense(SenseReason),
    Conflict,
}

impl From<SenseReason> for Failure {
    fn from(r: SenseReason) -> Self {
        Self::Sense(r)
    }
}

/// Unit attentions kept per nexus at most; the oldest are reported first.
const UA_PENDING_MAX: usize = 16;

/// The reservation conflict class of a command (SPC-4 table 67, SBC-3 table 13).
fn access_class(c: &Cdb) -> Access {
    match c {
        Cdb::TestUnitReady
        | Cdb::Inquiry { .. }
        | Cdb::RequestSense { .. }
        | Cdb::ReportLuns { .. }
        | Cdb::ReadCapacity10
        | Cdb::ReadCapacity16 { .. }
        | Cdb::ReportSupportedOpcodes { .. }
        | Cdb::ReportSupportedTmfs { .. }
        | Cdb::ReportTargetPortGroups { .. }
        | Cdb::PersistentReserveIn { .. }
        | Cdb::PersistentReserveOut { .. }
        | Cdb::Release => Access::Always,
        Cdb::Read { .. }
        | Cdb::Verify { .. }
        | Cdb::PreFetch { .. }
        | Cdb::GetLbaStatus { .. }
        | Cdb::ReadDefectData { .. }
        | Cdb::ModeSense { .. }
        | Cdb::LogSense { .. } => Access::Read,
        Cdb::Write { .. }
        | Cdb::WriteAndVerify { .. }
        | Cdb::WriteSame { .. }
        | Cdb::Unmap { .. }
        | Cdb::CompareAndWrite { .. }
        | Cdb::OrWrite { .. }
        | Cdb::SynchronizeCache { .. }
        | Cdb::FormatUnit
        | Cdb::ModeSelect { .. }
        | Cdb::StartStopUnit
        | Cdb::Reserve => Access::Write,
    }
}

/// Byte of the TRANSFER LENGTH field for READ/WRITE of each size (for field pointers).
fn len_field_byte(opcode: u8) -> u16 {
    match cdb::cdb_length(opcode) {
        Some(6) => 4,
        Some(10) => 7,
        Some(12) => 6,
        _ => 10,
    }
}

fn truncate(mut d: Vec<u8>, alloc: u32) -> Vec<u8> {
    d.truncate(alloc as usize);
    d
}
