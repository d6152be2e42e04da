//! Three controllers' logical units for one volume, each its own object on its own target
//! port, joined by an in-memory stand-in for the metadata log (every change applied in one
//! order and installed in every LU before the submitter answers, as the appliance's log
//! does): a reservation taken through one is enforced through the others, PREEMPT AND ABORT
//! through one aborts the preempted nexus's tasks queued on another, and a LU reset through
//! one aborts tasks and raises BUS DEVICE RESET on all, and MODE SELECT through one changes
//! the mode values everywhere.

use lun::shared::{ChangeFuture, ScsiChange, SharedLuState, SharedScsi};
use lun::*;
use raid_engine::{LocalVolume, Volume};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};

#[derive(Debug, Default)]
struct MemLog {
    state: Mutex<SharedLuState>,
    lus: Mutex<Vec<Weak<LogicalUnit>>>,
}

impl SharedScsi for MemLog {
    fn submit(&self, _lu: u64, change: ScsiChange) -> ChangeFuture<'_> {
        Box::pin(async move {
            let (outcome, events, state) = {
                let mut s = self.state.lock().unwrap();
                let (o, e) = s.apply(&change);
                (o, e, s.clone())
            };
            for lu in self.lus.lock().unwrap().iter().filter_map(Weak::upgrade) {
                lu.install_shared(&state, std::slice::from_ref(&events));
            }
            Ok(outcome)
        })
    }
}

fn nexus(name: &str, port: u16) -> ItNexus {
    ItNexus {
        initiator_name: format!("iqn.test:{name}"),
        isid: 1,
        relative_port: port,
    }
}

fn cmd(n: &ItNexus, cdb: &[u8], data_out: Vec<u8>) -> ScsiCommand {
    ScsiCommand {
        nexus: n.clone(),
        lun: encode_lun(0),
        cdb: cdb.to_vec(),
        attr: TaskAttr::Simple,
        data_in_len: if data_out.is_empty() { 512 } else { 0 },
        data_out,
    }
}

fn run(ds: &DeviceServer, n: &ItNexus, cdb: &[u8], data_out: Vec<u8>) -> CommandStatus {
    futures::executor::block_on(ds.execute(cmd(n, cdb, data_out))).status
}

/// PR OUT `sa` with type `ty`, `key` and `sa_key`.
fn pr_out(ds: &DeviceServer, n: &ItNexus, sa: u8, ty: u8, key: u64, sa_key: u64) -> CommandStatus {
    let mut p = vec![0u8; 24];
    p[..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    run(ds, n, &[0x5f, sa, ty, 0, 0, 0, 0, 0, 24, 0], p)
}

const TUR: [u8; 6] = [0; 6];
const WRITE10: [u8; 10] = [0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0];
const READ10: [u8; 10] = [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0];

#[test]
fn reservations_aborts_and_resets_reach_every_controller() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = disk_io::DeviceConfig::file(dir.path().join("lu.img"), 1 << 20);
    cfg.pool_bytes = 8 << 20;
    let dev = Arc::new(disk_io::Device::open(&cfg).unwrap());
    let vol = Arc::new(Volume::Local(LocalVolume::new(dev, 0, 1 << 20).unwrap()));
    let log = Arc::new(MemLog::default());
    // Controllers A, B, C: ports 1, 2, 3, each its own LU object for the volume.
    let ds: Vec<DeviceServer> = (1..=3u16)
        .map(|p| {
            let lu = Arc::new(
                LogicalUnit::new(LuIdentity::for_volume(9), 512, vol.clone())
                    .with_shared_state(9, log.clone()),
            );
            log.lus.lock().unwrap().push(Arc::downgrade(&lu));
            lu.install_shared(&SharedLuState::default(), &[]);
            DeviceServer::new(
                TargetPort {
                    relative_port: p,
                    port_group: p,
                },
                BTreeMap::from([(0, lu)]),
            )
        })
        .collect();
    let (a, b, c) = (&ds[0], &ds[1], &ds[2]);
    let x_a = nexus("x", 1);
    let y_c = nexus("y", 3);
    let z_b = nexus("z", 2);
    for (d, n) in [(a, &x_a), (c, &y_c), (b, &z_b)] {
        assert_eq!(
            run(d, n, &TUR, vec![]),
            CommandStatus::CheckCondition(SenseReason::UaPowerOnReset)
        );
    }
    // X registers and reserves Write Exclusive through A; Y registers through C.
    assert_eq!(pr_out(a, &x_a, 0, 0, 0, 0x11), CommandStatus::Good);
    assert_eq!(pr_out(a, &x_a, 1, 1, 0x11, 0), CommandStatus::Good);
    assert_eq!(pr_out(c, &y_c, 0, 0, 0, 0x22), CommandStatus::Good);
    // Enforced through B at once: Z's write conflicts, its read passes.
    assert_eq!(
        run(b, &z_b, &WRITE10, vec![0; 512]),
        CommandStatus::ReservationConflict
    );
    assert_eq!(run(b, &z_b, &READ10, vec![]), CommandStatus::Good);
    // A task of X queued on A; Y preempts X's registration and aborts through C.
    let queued = a.admit(cmd(&x_a, &READ10, vec![]));
    assert_eq!(pr_out(c, &y_c, 5, 1, 0x22, 0x11), CommandStatus::Good);
    assert_eq!(
        futures::executor::block_on(a.run(queued)).status,
        CommandStatus::TaskAborted,
        "PREEMPT AND ABORT through C aborts X's task queued on A"
    );
    // X learns its registration was preempted (on A, where its nexus is); Y holds it now.
    assert_eq!(
        run(a, &x_a, &TUR, vec![]),
        CommandStatus::CheckCondition(SenseReason::UaRegistrationsPreempted)
    );
    assert_eq!(
        run(a, &x_a, &WRITE10, vec![0; 512]),
        CommandStatus::ReservationConflict
    );
    assert_eq!(run(c, &y_c, &WRITE10, vec![0; 512]), CommandStatus::Good);
    // A LU reset through B: tasks queued on A are aborted and every nexus, on every
    // controller, gets BUS DEVICE RESET once.
    let queued = a.admit(cmd(&x_a, &READ10, vec![]));
    futures::executor::block_on(b.reset(&z_b, Some(encode_lun(0))));
    assert_eq!(
        futures::executor::block_on(a.run(queued)).status,
        CommandStatus::TaskAborted
    );
    for (d, n) in [(a, &x_a), (b, &z_b), (c, &y_c)] {
        assert_eq!(
            run(d, n, &TUR, vec![]),
            CommandStatus::CheckCondition(SenseReason::UaBusDeviceReset)
        );
        assert_eq!(run(d, n, &TUR, vec![]), CommandStatus::Good);
    }
    // The persistent reservation survives the reset, everywhere.
    assert_eq!(
        run(b, &z_b, &WRITE10, vec![0; 512]),
        CommandStatus::ReservationConflict
    );
    // MODE SELECT through C (by Y, the reservation holder) turns the write cache off: MODE
    // SENSE through A shows it, and the nexuses on A and B (not the issuer) get MODE
    // PARAMETERS CHANGED once.
    let sense = |d: &DeviceServer, n: &ItNexus| {
        let r = futures::executor::block_on(d.execute(ScsiCommand {
            data_in_len: 255,
            ..cmd(n, &[0x1a, 0x08, 0x08, 0, 255, 0], vec![])
        }));
        assert_eq!(r.status, CommandStatus::Good);
        let DataIn::Bytes(b) = r.data_in else {
            panic!("no mode data")
        };
        b
    };
    let ms = sense(a, &x_a);
    assert_eq!(ms[6] & 0x04, 0x04, "WCE on by default");
    let mut list = vec![0u8, 0, 0, 0];
    let mut caching = ms[4..24].to_vec();
    caching[0] &= 0x3f;
    caching[2] &= !0x04;
    list.extend_from_slice(&caching);
    let sel = [0x15, 0x10, 0, 0, list.len() as u8, 0];
    assert_eq!(run(c, &y_c, &sel, list), CommandStatus::Good);
    for (d, n) in [(a, &x_a), (b, &z_b)] {
        assert_eq!(
            run(d, n, &TUR, vec![]),
            CommandStatus::CheckCondition(SenseReason::UaModeParametersChanged)
        );
    }
    assert_eq!(run(c, &y_c, &TUR, vec![]), CommandStatus::Good);
    assert_eq!(sense(a, &x_a)[6] & 0x04, 0, "WCE off through A too");
}
