//! ALUA across the ports of one controller: REPORT TARGET PORT GROUPS reports each group's
//! state from the shared access states, a change raises ASYMMETRIC ACCESS STATE CHANGED once
//! per known I_T nexus, and a port in the transitioning or unavailable state refuses media
//! commands with the state's sense while letting INQUIRY and the reports through.

use lun::alua::{AccessState, AccessStates};
use lun::*;
use raid_engine::{LocalVolume, Volume};
use std::collections::BTreeMap;
use std::sync::Arc;

const BS: u32 = 512;

fn port(n: u16) -> TargetPort {
    TargetPort {
        relative_port: n,
        port_group: n,
    }
}

fn nexus(name: &str, p: u16) -> ItNexus {
    ItNexus {
        initiator_name: format!("iqn.test:{name}"),
        isid: 1,
        relative_port: p,
    }
}

fn cmd(n: &ItNexus, cdb: &[u8], data_in_len: u32) -> ScsiCommand {
    ScsiCommand {
        nexus: n.clone(),
        lun: encode_lun(0),
        cdb: cdb.to_vec(),
        attr: TaskAttr::Simple,
        data_out: vec![],
        data_in_len,
    }
}

const TUR: [u8; 6] = [0; 6];
const RTPG: [u8; 12] = [0xa3, 0x0a, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
const READ10: [u8; 10] = [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0];

fn status(ds: &DeviceServer, n: &ItNexus, cdb: &[u8]) -> CommandStatus {
    futures::executor::block_on(ds.execute(cmd(n, cdb, 512))).status
}

/// (group, state code) pairs of a REPORT TARGET PORT GROUPS answer.
fn groups(ds: &DeviceServer, n: &ItNexus) -> Vec<(u16, u8)> {
    let r = futures::executor::block_on(ds.execute(cmd(n, &RTPG, 256)));
    assert_eq!(r.status, CommandStatus::Good);
    let DataIn::Bytes(d) = r.data_in else {
        panic!("no data")
    };
    let len = u32::from_be_bytes(d[..4].try_into().unwrap()) as usize;
    d[4..4 + len]
        .chunks(12)
        .map(|g| (u16::from_be_bytes([g[2], g[3]]), g[0] & 0x0f))
        .collect()
}

#[test]
fn access_states_are_reported_announced_once_and_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = disk_io::DeviceConfig::file(dir.path().join("lu.img"), 1 << 20);
    cfg.pool_bytes = 8 << 20;
    let dev = Arc::new(disk_io::Device::open(&cfg).unwrap());
    let vol = Arc::new(Volume::Local(LocalVolume::new(dev, 0, 1 << 20).unwrap()));
    let lu = Arc::new(LogicalUnit::new(LuIdentity::for_volume(7), BS, vol));
    let alua = Arc::new(AccessStates::default());
    let all = vec![port(1), port(2), port(3)];
    let ds: Vec<DeviceServer> = [1, 2]
        .into_iter()
        .map(|p| {
            DeviceServer::new(port(p), BTreeMap::from([(0, lu.clone())]))
                .with_port_groups(all.clone())
                .with_access_states(alua.clone())
        })
        .collect();
    let (a, b) = (nexus("a", 1), nexus("b", 2));
    for (d, n) in [(&ds[0], &a), (&ds[1], &b)] {
        assert_eq!(
            status(d, n, &TUR),
            CommandStatus::CheckCondition(SenseReason::UaPowerOnReset)
        );
        assert_eq!(status(d, n, &TUR), CommandStatus::Good);
    }
    assert_eq!(groups(&ds[0], &a), vec![(1, 0), (2, 0), (3, 0)]);

    // Group 3 (another controller) becomes unavailable, group 2 transitioning.
    assert!(alua.set_all(BTreeMap::from([
        (1, AccessState::ActiveOptimized),
        (2, AccessState::Transitioning),
        (3, AccessState::Unavailable),
    ])));
    let changed = CommandStatus::CheckCondition(SenseReason::UaAsymmetricAccessStateChanged);
    // Each nexus gets the unit attention once, whichever port it uses.
    assert_eq!(status(&ds[0], &a, &TUR), changed);
    assert_eq!(status(&ds[0], &a, &TUR), CommandStatus::Good);
    // INQUIRY neither reports nor clears it; REPORT TARGET PORT GROUPS passes a
    // transitioning port and shows every state.
    let inquiry = [0x12, 0, 0, 0, 96, 0];
    assert_eq!(status(&ds[1], &b, &inquiry), CommandStatus::Good);
    assert_eq!(status(&ds[1], &b, &TUR), changed);
    assert_eq!(groups(&ds[1], &b), vec![(1, 0), (2, 0xf), (3, 3)]);
    // Media access through the transitioning port: NOT READY, 04/0A; retried later.
    assert_eq!(
        status(&ds[1], &b, &READ10),
        CommandStatus::CheckCondition(SenseReason::NotReadyTransitioning)
    );
    assert_eq!(status(&ds[0], &a, &READ10), CommandStatus::Good);
    // Setting the same states again announces nothing.
    assert!(!alua.set_all(BTreeMap::from([
        (1, AccessState::ActiveOptimized),
        (2, AccessState::Transitioning),
        (3, AccessState::Unavailable),
    ])));
    assert_eq!(status(&ds[0], &a, &TUR), CommandStatus::Good);
    // This port's own group unavailable: NOT READY, 04/0C (multipath moves away).
    alua.set_all(BTreeMap::from([(1, AccessState::Unavailable)]));
    assert_eq!(status(&ds[0], &a, &TUR), changed);
    assert_eq!(
        status(&ds[0], &a, &TUR),
        CommandStatus::CheckCondition(SenseReason::NotReadyUnavailable)
    );
    assert_eq!(groups(&ds[0], &a), vec![(1, 3), (2, 0), (3, 0)]);
}
