//! Deterministic simulation of the SCSI context a cluster's controllers share: reservations,
//! SPC-2 reservations, resets, mode values and the unit attentions they cause.
//!
//! What is simulated: N controllers, each with its own `lun::LogicalUnit` object for one
//! volume and its own target port, built `with_shared_state` like the appliance's; the
//! metadata log (an ideal ordered log: a submitted change is appended at once and completes
//! only when every serving controller has installed it, or, past a deadline, after the
//! laggards are fenced, as `appliance::node` does); each controller's installer, which runs
//! at its own random pace (`LogicalUnit::install_shared` with the state after the installed
//! prefix and the events of the entries it covers); hosts (three initiators, one nexus per
//! controller each) sending random TEST UNIT READY, reads, writes, PR OUT service actions,
//! RESERVE/RELEASE(6), MODE SELECT and LU resets through random controllers; controller
//! crashes (the LU object and its nexuses are lost; it comes back with the state at the log's
//! head, no pending events).
//!
//! The checker, after every step: every serving controller's LU holds exactly the state the
//! log defines at the prefix it installed; every completed change is installed on every
//! serving controller (so a reservation command that completed is enforced on every path
//! from then on); every command's status is what the log's state at its controller's
//! installed prefix decides (RESERVATION CONFLICT or not; the outcome the log computed for a
//! change); and every unit attention is delivered exactly once per nexus, in order (a model
//! queue per nexus, fed at install time with SAM's rules: a nexus known to that LU gets it,
//! a pending duplicate is not queued twice). A failure prints the seed and the replay command.
//!
//! Determinism: media commands complete synchronously (a local volume on a temporary file);
//! shared changes are futures polled by the simulation with a no-op waker; no clocks, no
//! hash-order iteration.

use crate::sim::Rng;
use lun::shared::{ChangeFuture, ChangeOutcome, LuEvents, ScsiChange, SharedLuState, SharedScsi};
use lun::{
    encode_lun, CommandOutcome, CommandStatus, DeviceServer, ItNexus, LogicalUnit, LuIdentity,
    ScsiCommand, SenseReason, TargetPort, TaskAttr,
};
use raid_engine::{LocalVolume, Volume};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

const KEY: u64 = 1;
const HOSTS: u16 = 3;
/// Steps a change may wait for a controller's install before that controller is fenced.
const DEADLINE: u64 = 40;

/// A run's settings.
#[derive(Debug, Clone, Copy)]
pub struct ScsiSimConfig {
    /// Seed of everything.
    pub seed: u64,
    /// Controllers.
    pub controllers: u16,
    /// Steps.
    pub steps: u64,
}

/// What a run exercised.
#[derive(Debug, Default, Clone, Copy)]
pub struct ScsiSimReport {
    /// Changes appended to the log.
    pub changes: u64,
    /// Changes that completed.
    pub completed: u64,
    /// Commands answered RESERVATION CONFLICT.
    pub conflicts: u64,
    /// Unit attentions delivered (and checked).
    pub unit_attentions: u64,
    /// Controllers fenced for not installing in time.
    pub fenced: u64,
    /// Controller crashes.
    pub crashes: u64,
}

/// The ideal log: entries, the state after each prefix, events and outcomes.
#[derive(Debug)]
struct LogInner {
    states: Vec<SharedLuState>,
    events: Vec<LuEvents>,
    outcomes: Vec<ChangeOutcome>,
    appended_at: Vec<u64>,
    completed: BTreeSet<usize>,
    step: u64,
}

#[derive(Debug)]
struct SimLog(Mutex<LogInner>);

impl SharedScsi for SimLog {
    fn submit(&self, _lu: u64, change: ScsiChange) -> ChangeFuture<'_> {
        let idx = {
            let mut l = self.0.lock().expect("log");
            let mut next = l.states.last().expect("initial state").clone();
            let (outcome, events) = next.apply(&change);
            l.states.push(next);
            l.events.push(events);
            l.outcomes.push(outcome);
            let step = l.step;
            l.appended_at.push(step);
            l.outcomes.len() - 1
        };
        Box::pin(std::future::poll_fn(move |_| {
            let l = self.0.lock().expect("log");
            if l.completed.contains(&idx) {
                Poll::Ready(Ok(l.outcomes[idx]))
            } else {
                Poll::Pending
            }
        }))
    }
}

/// One controller.
struct Ctl {
    ds: Arc<DeviceServer>,
    lu: Arc<LogicalUnit>,
    /// Log entries installed (a prefix length).
    installed: usize,
    /// Up and not fenced: hosts may use it, changes wait for it.
    serving: bool,
    up: bool,
    /// Model: nexuses this LU object knows, those it has ever seen, and their UA queues.
    known: BTreeSet<u16>,
    seen: BTreeSet<u16>,
    uas: BTreeMap<u16, VecDeque<SenseReason>>,
}

/// A command in flight (a shared change waiting for the log).
struct Inflight {
    ctl: u16,
    host: u16,
    what: &'static str,
    head_before: usize,
    /// What the controller's own state decided at the start, if the command never reaches
    /// the log (RESERVATION CONFLICT, or any CHECK CONDITION for a bad parameter list).
    local: CommandStatus,
    /// A reset, or a PREEMPT AND ABORT of its nexus, was installed on its controller while it
    /// was in flight: TASK ABORTED is a correct answer (its change may still have happened).
    abortable: bool,
    fut: Pin<Box<dyn Future<Output = Option<CommandOutcome>>>>,
}

/// The simulation.
pub struct ScsiSim {
    cfg: ScsiSimConfig,
    rng: Rng,
    log: Arc<SimLog>,
    vol: Arc<Volume>,
    ctls: Vec<Ctl>,
    inflight: Vec<Inflight>,
    report: ScsiSimReport,
    _dir: tempfile::TempDir,
    control_page: Vec<u8>,
}

impl std::fmt::Debug for ScsiSim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScsiSim")
            .field("cfg", &self.cfg)
            .field("report", &self.report)
            .finish()
    }
}

fn nexus(host: u16, port: u16) -> ItNexus {
    ItNexus {
        initiator_name: format!("iqn.2026-11.io.rainio:sim-host-{host}"),
        isid: 1,
        relative_port: port,
    }
}

fn command(n: &ItNexus, cdb: &[u8], data_out: Vec<u8>) -> ScsiCommand {
    ScsiCommand {
        nexus: n.clone(),
        lun: encode_lun(0),
        cdb: cdb.to_vec(),
        attr: TaskAttr::Simple,
        data_in_len: if data_out.is_empty() { 255 } else { 0 },
        data_out,
    }
}

fn pr_out_list(key: u64, sa_key: u64) -> Vec<u8> {
    let mut p = vec![0u8; 24];
    p[..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    p
}

fn host_key(h: u16) -> u64 {
    0x100 + u64::from(h)
}

impl ScsiSim {
    /// A run with `cfg`.
    ///
    /// # Panics
    /// If the temporary volume cannot be created.
    pub fn new(cfg: ScsiSimConfig) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut dc = disk_io::DeviceConfig::file(dir.path().join("lu.img"), 1 << 20);
        dc.pool_bytes = 4 << 20;
        let dev = Arc::new(disk_io::Device::open(&dc).expect("device"));
        let vol = Arc::new(Volume::Local(
            LocalVolume::new(dev, 0, 1 << 20).expect("volume"),
        ));
        let log = Arc::new(SimLog(Mutex::new(LogInner {
            states: vec![SharedLuState::default()],
            events: Vec::new(),
            outcomes: Vec::new(),
            appended_at: Vec::new(),
            completed: BTreeSet::new(),
            step: 0,
        })));
        let mut me = Self {
            cfg,
            rng: Rng::new(cfg.seed),
            log,
            vol,
            ctls: Vec::new(),
            inflight: Vec::new(),
            report: ScsiSimReport::default(),
            _dir: dir,
            control_page: Vec::new(),
        };
        for c in 0..cfg.controllers {
            let ctl = me.fresh(c);
            me.ctls.push(ctl);
        }
        // The control mode page as MODE SELECT must send it (fixed bits unchanged).
        let probe = LogicalUnit::new(LuIdentity::for_volume(1), 512, me.vol.clone());
        let ds = DeviceServer::new(
            TargetPort {
                relative_port: 99,
                port_group: 99,
            },
            BTreeMap::from([(0, Arc::new(probe))]),
        );
        let n = nexus(99, 99);
        let _ = futures::executor::block_on(ds.execute(command(&n, &[0; 6], vec![])));
        let r = futures::executor::block_on(ds.execute(command(
            &n,
            &[0x1a, 0x08, 0x0a, 0, 255, 0],
            vec![],
        )));
        let lun::DataIn::Bytes(b) = r.data_in else {
            panic!("MODE SENSE of the control page")
        };
        me.control_page = b[4..16].to_vec();
        me
    }

    /// A controller with a new LU object, installed at the log's head (a restart).
    fn fresh(&mut self, c: u16) -> Ctl {
        let lu = Arc::new(
            LogicalUnit::new(LuIdentity::for_volume(1), 512, self.vol.clone())
                .with_shared_state(KEY, self.log.clone()),
        );
        let (head, state) = {
            let l = self.log.0.lock().expect("log");
            (l.states.len() - 1, l.states.last().expect("state").clone())
        };
        lu.install_shared(&state, &[]);
        let ds = Arc::new(DeviceServer::new(
            TargetPort {
                relative_port: c + 1,
                port_group: c + 1,
            },
            BTreeMap::from([(0, lu.clone())]),
        ));
        Ctl {
            ds,
            lu,
            installed: head,
            serving: true,
            up: true,
            known: BTreeSet::new(),
            seen: BTreeSet::new(),
            uas: BTreeMap::new(),
        }
    }

    fn fail(&self, what: &str) -> ! {
        panic!(
            "scsi simulation seed {} failed: {what}\nreplay: SCSI_SIM_SEED={} SCSI_SIM_CONTROLLERS={} SCSI_SIM_STEPS={} cargo test --release -p tests --test simulation -- scsi_context_replay --nocapture",
            self.cfg.seed, self.cfg.seed, self.cfg.controllers, self.cfg.steps
        )
    }

    /// The model's expectation for the next command of `host` through `c`: the unit attention
    /// it must report, if any (SAM-5: POWER ON for a nexus new to this LU object, then the
    /// oldest pending one).
    fn expect_ua(&mut self, c: u16, host: u16) -> Option<SenseReason> {
        let ctl = &mut self.ctls[usize::from(c)];
        ctl.known.insert(host);
        if ctl.seen.insert(host) {
            queue(
                ctl.uas.entry(host).or_default(),
                SenseReason::UaPowerOnReset,
            );
        }
        ctl.uas.get_mut(&host).and_then(VecDeque::pop_front)
    }

    /// Runs the whole simulation.
    pub fn run(mut self) -> ScsiSimReport {
        for step in 0..self.cfg.steps {
            self.log.0.lock().expect("log").step = step;
            match self.rng.below(100) {
                0..=39 => self.host_command(),
                40..=74 => self.install_some(),
                75..=76 => self.crash(),
                77..=79 => self.restart(),
                _ => {}
            }
            self.poll_inflight();
            self.complete(step);
            self.poll_inflight();
            self.check(step);
        }
        // Quiesce: everyone installs, everything completes, every queued unit attention is
        // delivered exactly as the model says, then nothing more.
        for c in 0..self.cfg.controllers {
            if !self.ctls[usize::from(c)].up {
                self.restart_one(c);
            }
        }
        for _ in 0..1000 {
            for c in 0..self.cfg.controllers {
                self.install(c, usize::MAX);
            }
            self.complete(self.cfg.steps);
            self.poll_inflight();
            if self.inflight.is_empty() {
                break;
            }
        }
        if !self.inflight.is_empty() {
            self.fail("commands still in flight after quiescing");
        }
        self.check(self.cfg.steps);
        for c in 0..self.cfg.controllers {
            for h in 0..HOSTS {
                if !self.ctls[usize::from(c)].known.contains(&h) {
                    continue;
                }
                loop {
                    let pending = self.ctls[usize::from(c)]
                        .uas
                        .get(&h)
                        .is_some_and(|q| !q.is_empty());
                    self.media(c, h, &[0; 6], "drain TEST UNIT READY");
                    if !pending {
                        break;
                    }
                }
            }
        }
        self.report
    }

    fn host_command(&mut self) {
        let c = self.rng.below(u64::from(self.cfg.controllers)) as u16;
        let h = self.rng.below(u64::from(HOSTS)) as u16;
        if !self.ctls[usize::from(c)].serving
            || self.inflight.iter().any(|i| i.host == h && i.ctl == c)
        {
            return;
        }
        let other = self.rng.below(u64::from(HOSTS)) as u16;
        let ty = [1u8, 3, 5, 6, 7, 8][self.rng.below(6) as usize];
        match self.rng.below(12) {
            0 | 1 => self.media(c, h, &[0; 6], "TEST UNIT READY"),
            2 | 3 => self.media(c, h, &[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0], "WRITE(10)"),
            4 => self.media(c, h, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], "READ(10)"),
            5 => self.shared(
                c,
                h,
                &[0x5f, 6, 0, 0, 0, 0, 0, 0, 24, 0],
                pr_out_list(0, host_key(h)),
                "REGISTER AND IGNORE",
            ),
            6 => self.shared(
                c,
                h,
                &[0x5f, 1, ty, 0, 0, 0, 0, 0, 24, 0],
                pr_out_list(host_key(h), 0),
                "PR RESERVE",
            ),
            7 => self.shared(
                c,
                h,
                &[0x5f, 2, ty, 0, 0, 0, 0, 0, 24, 0],
                pr_out_list(host_key(h), 0),
                "PR RELEASE",
            ),
            8 => {
                let sa = if self.rng.pct(50) { 4 } else { 5 };
                self.shared(
                    c,
                    h,
                    &[0x5f, sa, ty, 0, 0, 0, 0, 0, 24, 0],
                    pr_out_list(host_key(h), host_key(other)),
                    "PREEMPT (AND ABORT)",
                );
            }
            9 => {
                if self.rng.pct(30) {
                    self.shared(
                        c,
                        h,
                        &[0x5f, 3, 0, 0, 0, 0, 0, 0, 24, 0],
                        pr_out_list(host_key(h), 0),
                        "PR CLEAR",
                    );
                } else if self.rng.pct(50) {
                    self.shared(c, h, &[0x16, 0, 0, 0, 0, 0], Vec::new(), "RESERVE(6)");
                } else {
                    self.shared(c, h, &[0x17, 0, 0, 0, 0, 0], Vec::new(), "RELEASE(6)");
                }
            }
            10 => {
                let mut list = vec![0u8, 0, 0, 0];
                let mut page = self.control_page.clone();
                page[2] = if self.rng.pct(50) { 0x04 } else { 0 };
                list.extend_from_slice(&page);
                let cdb = [0x15, 0x10, 0, 0, list.len() as u8, 0];
                self.shared(c, h, &cdb, list, "MODE SELECT");
            }
            _ => self.reset(c, h),
        }
    }

    /// A command that never waits for the log: run now, check against the model.
    fn media(&mut self, c: u16, h: u16, cdb: &[u8], what: &'static str) {
        let ua = self.expect_ua(c, h);
        let ctl = &self.ctls[usize::from(c)];
        let n = nexus(h, c + 1);
        let r = futures::executor::block_on(ctl.ds.execute(command(
            &n,
            cdb,
            if cdb[0] == 0x2a { vec![0; 512] } else { vec![] },
        )));
        if let Some(ua) = ua {
            self.report.unit_attentions += 1;
            if r.status != CommandStatus::CheckCondition(ua) {
                self.fail(&format!("{what} from host {h} through controller {c}: expected unit attention {ua:?}, got {:?}", r.status));
            }
            return;
        }
        let want = self.decide(c, h, cdb[0]);
        if r.status != want {
            self.fail(&format!("{what} from host {h} through controller {c}: got {:?}, the log's state at its installed prefix {} says {want:?}", r.status, ctl.installed));
        }
        if want == CommandStatus::ReservationConflict {
            self.report.conflicts += 1;
        }
    }

    /// What the log's state at `c`'s installed prefix decides for a command with operation
    /// code `op` before it runs (the SPC-2 and persistent reservation checks of the gate).
    fn decide(&self, c: u16, h: u16, op: u8) -> CommandStatus {
        let ctl = &self.ctls[usize::from(c)];
        let state = self.log.0.lock().expect("log").states[ctl.installed].clone();
        let n = nexus(h, c + 1);
        use lun::pr::Access;
        let access = match op {
            0x00 | 0x5f | 0x17 => Access::Always,
            0x28 => Access::Read,
            _ => Access::Write,
        };
        // SPC-2: only TEST UNIT READY-like commands and RELEASE pass another's reservation.
        let spc2 =
            state.spc2.as_ref().is_some_and(|holder| *holder != n) && !matches!(op, 0x00 | 0x17);
        if spc2 || state.pr.conflicts(&n, access) {
            CommandStatus::ReservationConflict
        } else {
            CommandStatus::Good
        }
    }

    /// A command that may change shared state: started now, finished when the log says.
    fn shared(&mut self, c: u16, h: u16, cdb: &[u8], data: Vec<u8>, what: &'static str) {
        let ua = self.expect_ua(c, h);
        let local = self.decide(c, h, cdb[0]);
        let ds = self.ctls[usize::from(c)].ds.clone();
        let cmd = command(&nexus(h, c + 1), cdb, data);
        let fut: Pin<Box<dyn Future<Output = Option<CommandOutcome>>>> =
            Box::pin(async move { Some(ds.execute(cmd).await) });
        if let Some(ua) = ua {
            let mut fut = fut;
            self.report.unit_attentions += 1;
            match poll_once(&mut fut) {
                Some(Some(r)) if r.status == CommandStatus::CheckCondition(ua) => {}
                other => self.fail(&format!("{what} from host {h} through controller {c}: expected unit attention {ua:?} at once, got {:?}", other.map(|o| o.map(|r| r.status)))),
            }
            return;
        }
        self.start(c, h, what, local, fut);
    }

    fn reset(&mut self, c: u16, h: u16) {
        let ds = self.ctls[usize::from(c)].ds.clone();
        let n = nexus(h, c + 1);
        let fut = Box::pin(async move {
            ds.reset(&n, Some(encode_lun(0))).await;
            None
        });
        self.start(c, h, "LOGICAL UNIT RESET", CommandStatus::Good, fut);
    }

    /// Polls a new command once (a change is appended to the log on its first poll, so its
    /// entry is the one at the head before it) and keeps it if it waits.
    fn start(
        &mut self,
        c: u16,
        h: u16,
        what: &'static str,
        local: CommandStatus,
        mut fut: Pin<Box<dyn Future<Output = Option<CommandOutcome>>>>,
    ) {
        let head_before = self.log.0.lock().expect("log").outcomes.len();
        let f = match poll_once(&mut fut) {
            Some(result) => {
                let f = Inflight {
                    ctl: c,
                    host: h,
                    what,
                    head_before,
                    local,
                    abortable: false,
                    fut: Box::pin(async { None }),
                };
                self.finished(f, result);
                return;
            }
            None => Inflight {
                ctl: c,
                host: h,
                what,
                head_before,
                local,
                abortable: false,
                fut,
            },
        };
        self.inflight.push(f);
    }

    fn poll_inflight(&mut self) {
        let mut i = 0;
        while i < self.inflight.len() {
            match poll_once(&mut self.inflight[i].fut) {
                None => i += 1,
                Some(result) => {
                    let f = self.inflight.remove(i);
                    self.finished(f, result);
                }
            }
        }
    }

    /// Checks a finished shared command: the log's outcome for its entry, or, if it never
    /// reached the log, a conflict the controller's installed state decides.
    fn finished(&mut self, f: Inflight, result: Option<CommandOutcome>) {
        let (head, outcome) = {
            let l = self.log.0.lock().expect("log");
            (l.outcomes.len(), l.outcomes.get(f.head_before).copied())
        };
        let Some(r) = result else { return };
        if f.abortable && r.status == CommandStatus::TaskAborted {
            return;
        }
        let want = if head > f.head_before {
            match outcome.expect("appended") {
                ChangeOutcome::Done => CommandStatus::Good,
                ChangeOutcome::Conflict => CommandStatus::ReservationConflict,
                ChangeOutcome::Sense(s) => CommandStatus::CheckCondition(s),
            }
        } else if f.local == CommandStatus::ReservationConflict {
            f.local
        } else if matches!(r.status, CommandStatus::CheckCondition(_)) {
            // Refused before reaching the log: a bad parameter list (e.g. RESERVE with a
            // key this host has not registered is a log outcome; a malformed one is not).
            r.status
        } else {
            CommandStatus::ReservationConflict
        };
        if r.status != want {
            self.fail(&format!(
                "{} from host {} through controller {}: got {:?}, want {want:?}",
                f.what, f.host, f.ctl, r.status
            ));
        }
        if r.status == CommandStatus::ReservationConflict {
            self.report.conflicts += 1;
        }
    }

    /// Installs up to `max` more entries on controller `c`, feeding the model's queues.
    fn install(&mut self, c: u16, max: usize) {
        let (state, events, to) = {
            let l = self.log.0.lock().expect("log");
            let ctl = &self.ctls[usize::from(c)];
            if !ctl.up {
                return;
            }
            let head = l.states.len() - 1;
            let to = head.min(ctl.installed.saturating_add(max));
            if to == ctl.installed {
                return;
            }
            (
                l.states[to].clone(),
                l.events[ctl.installed..to].to_vec(),
                to,
            )
        };
        let port = c + 1;
        for f in self.inflight.iter_mut().filter(|f| f.ctl == c) {
            let n = nexus(f.host, port);
            if events
                .iter()
                .any(|e| e.reset.is_some() || e.abort.contains(&n))
            {
                f.abortable = true;
            }
        }
        let ctl = &mut self.ctls[usize::from(c)];
        ctl.lu.install_shared(&state, &events);
        ctl.installed = to;
        // The model, in the order install_shared raises them.
        let known: Vec<u16> = ctl.known.iter().copied().collect();
        for e in &events {
            if let Some(by) = &e.mode_changed_by {
                for &h in &known {
                    if nexus(h, port) != *by {
                        queue(
                            ctl.uas.entry(h).or_default(),
                            SenseReason::UaModeParametersChanged,
                        );
                    }
                }
            }
            if let Some(by) = &e.reset {
                // Every nexus the LU knows, and the issuer's even if it has sent no command.
                let mut all: BTreeSet<u16> = known.iter().copied().collect();
                if by.relative_port == port {
                    if let Some(h) = (0..HOSTS).find(|&h| nexus(h, port) == *by) {
                        all.insert(h);
                    }
                }
                for h in all {
                    queue(ctl.uas.entry(h).or_default(), SenseReason::UaBusDeviceReset);
                }
            }
            for (n, r) in &e.unit_attentions {
                for &h in &known {
                    if nexus(h, port) == *n {
                        queue(ctl.uas.entry(h).or_default(), *r);
                    }
                }
            }
        }
        if !ctl.serving && ctl.installed == self.log.0.lock().expect("log").states.len() - 1 {
            // A fenced controller that has caught up serves again (down → resyncing → up).
            ctl.serving = true;
        }
    }

    fn install_some(&mut self) {
        let c = self.rng.below(u64::from(self.cfg.controllers)) as u16;
        let n = 1 + self.rng.below(3) as usize;
        self.install(c, n);
    }

    /// Completes entries every serving controller has installed; past the deadline, fences
    /// the laggards and completes.
    fn complete(&mut self, step: u64) {
        let pending: Vec<(usize, u64)> = {
            let l = self.log.0.lock().expect("log");
            (0..l.outcomes.len())
                .filter(|i| !l.completed.contains(i))
                .map(|i| (i, l.appended_at[i]))
                .collect()
        };
        for (i, at) in pending {
            let behind: Vec<u16> = (0..self.cfg.controllers)
                .filter(|&c| {
                    let ctl = &self.ctls[usize::from(c)];
                    ctl.serving && ctl.installed <= i
                })
                .collect();
            if behind.is_empty() || step.saturating_sub(at) > DEADLINE {
                for c in behind {
                    self.ctls[usize::from(c)].serving = false;
                    self.report.fenced += 1;
                }
                self.log.0.lock().expect("log").completed.insert(i);
                self.report.completed += 1;
            }
        }
        self.report.changes = self.log.0.lock().expect("log").outcomes.len() as u64;
    }

    fn crash(&mut self) {
        let c = self.rng.below(u64::from(self.cfg.controllers)) as u16;
        let live = self.ctls.iter().filter(|c| c.up).count();
        if !self.ctls[usize::from(c)].up || live <= 1 {
            return;
        }
        self.inflight.retain(|i| i.ctl != c);
        let ctl = &mut self.ctls[usize::from(c)];
        ctl.up = false;
        ctl.serving = false;
        self.report.crashes += 1;
    }

    fn restart(&mut self) {
        let c = self.rng.below(u64::from(self.cfg.controllers)) as u16;
        if !self.ctls[usize::from(c)].up {
            self.restart_one(c);
        }
    }

    fn restart_one(&mut self, c: u16) {
        let ctl = self.fresh(c);
        self.ctls[usize::from(c)] = ctl;
    }

    /// After every step: every serving controller holds exactly the state of its installed
    /// prefix, and every completed change is installed on every serving controller.
    fn check(&self, step: u64) {
        let l = self.log.0.lock().expect("log");
        for (c, ctl) in self.ctls.iter().enumerate() {
            if !ctl.serving {
                continue;
            }
            if ctl.lu.shared_snapshot() != l.states[ctl.installed] {
                self.fail(&format!(
                    "step {step}: controller {c} holds a state other than the log's at its installed prefix"
                ));
            }
            if let Some(i) = l.completed.iter().rev().find(|&&i| i >= ctl.installed) {
                self.fail(&format!(
                    "step {step}: change {i} completed but serving controller {c} has installed only {}",
                    ctl.installed
                ));
            }
        }
    }
}

/// SAM's unit attention queue rule, as `LogicalUnit` keeps it: no duplicate pending, at most
/// 16.
fn queue(q: &mut VecDeque<SenseReason>, r: SenseReason) {
    if q.len() < 16 && !q.contains(&r) {
        q.push_back(r);
    }
}

fn poll_once<T>(f: &mut Pin<Box<dyn Future<Output = T>>>) -> Option<T> {
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    match f.as_mut().poll(&mut cx) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}
