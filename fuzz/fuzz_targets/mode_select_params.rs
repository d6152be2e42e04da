//! Fuzzes MODE SELECT(6)/(10) parameter lists (and COMPARE AND WRITE's data split) through
//! the device server: any list yields GOOD or CHECK CONDITION with sense; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lun::{
    encode_lun, DeviceServer, ItNexus, LogicalUnit, LuIdentity, ScsiCommand, TargetPort, TaskAttr,
};
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

struct Env {
    rt: tokio::runtime::Runtime,
    ds: DeviceServer,
    _dir: tempfile::TempDir,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ds = rt.block_on(async {
            let mut cfg = disk_io::DeviceConfig::file(dir.path().join("f.img"), 1 << 20);
            cfg.pool_bytes = 16 << 20;
            cfg.engine = disk_io::EngineChoice::Threads;
            let dev = Arc::new(disk_io::Device::open(&cfg).unwrap());
            let vol = Arc::new(raid_engine::Volume::Local(
                raid_engine::LocalVolume::new(dev, 0, 1 << 20).unwrap(),
            ));
            let lu = Arc::new(LogicalUnit::new(LuIdentity::for_volume(9), 512, vol));
            DeviceServer::new(
                TargetPort {
                    relative_port: 1,
                    port_group: 1,
                },
                BTreeMap::from([(0, lu)]),
            )
        });
        Env { rt, ds, _dir: dir }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, list)) = data.split_first() else {
        return;
    };
    let cdb: Vec<u8> = match sel % 3 {
        0 => vec![0x15, 0x10, 0, 0, list.len().min(255) as u8, 0],
        1 => {
            let n = list.len().min(65535) as u16;
            vec![0x55, 0x10, 0, 0, 0, 0, 0, (n >> 8) as u8, n as u8, 0]
        }
        _ => {
            let mut c = vec![0u8; 16];
            c[0] = 0x89;
            c[13] = sel >> 2;
            c
        }
    };
    let e = env();
    let nexus = ItNexus {
        initiator_name: "iqn.fuzz:m".into(),
        isid: 1,
        relative_port: 1,
    };
    let cmd = ScsiCommand {
        nexus,
        lun: encode_lun(0),
        cdb,
        attr: TaskAttr::Simple,
        data_out: list.to_vec(),
        data_in_len: 0,
    };
    let out = e.rt.block_on(e.ds.execute(cmd));
    if out.status != lun::CommandStatus::Good {
        assert!(!out.sense.is_empty() || out.status == lun::CommandStatus::ReservationConflict);
    }
});
