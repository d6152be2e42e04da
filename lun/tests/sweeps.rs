//! Boundary sweeps for every command that addresses LBAs, in libiscsi's vocabulary: the last
//! LBA, one past it, a range straddling the end, zero length at the end, a transfer longer than
//! the advertised maximum, and LBA + length wrapping 2^32 (10/12-byte CDBs) and 2^64 (16-byte).

use lun::cdb::op;
use lun::*;
use raid_engine::{LocalVolume, Volume};
use std::collections::BTreeMap;
use std::sync::Arc;

const BS: u64 = 512;
/// 32 MiB: larger than the maximum transfer, so "too long" is reachable inside the LU.
const BLOCKS: u64 = 65_536;

mod expect {
    use lun::{CommandStatus, SenseReason};
    pub const GOOD: CommandStatus = CommandStatus::Good;
    pub const LBA_OUT_OF_RANGE: CommandStatus =
        CommandStatus::CheckCondition(SenseReason::LbaOutOfRange);
}

struct Fixture {
    _dir: tempfile::TempDir,
    ds: DeviceServer,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = disk_io::DeviceConfig::file(dir.path().join("lu.img"), BLOCKS * BS);
    cfg.pool_bytes = 64 << 20;
    let dev = Arc::new(disk_io::Device::open(&cfg).unwrap());
    let vol = Arc::new(Volume::Local(
        LocalVolume::new(dev, 0, BLOCKS * BS).unwrap(),
    ));
    let lu = Arc::new(LogicalUnit::new(LuIdentity::for_volume(7), BS as u32, vol));
    let ds = DeviceServer::new(
        TargetPort {
            relative_port: 1,
            port_group: 1,
        },
        BTreeMap::from([(0, lu)]),
    );
    // Take the POWER ON unit attention first, as an initiator does after login.
    let tur = ScsiCommand {
        nexus: sweep_nexus(),
        lun: encode_lun(0),
        cdb: vec![0; 6],
        attr: TaskAttr::Simple,
        data_out: vec![],
        data_in_len: 0,
    };
    futures::executor::block_on(ds.execute(tur));
    Fixture { _dir: dir, ds }
}

fn sweep_nexus() -> ItNexus {
    ItNexus {
        initiator_name: "iqn.sweep:a".into(),
        isid: 1,
        relative_port: 1,
    }
}

#[derive(Clone, Copy)]
struct Form {
    name: &'static str,
    opcode: u8,
    /// CDB length: 10, 12 or 16.
    len: usize,
    /// Data-Out blocks per addressed block: 0 (none), 1 (writes), 2 (COMPARE AND WRITE).
    data_per_block: u64,
    /// Exactly one block of Data-Out whatever the length (WRITE SAME).
    one_block: bool,
    /// Largest NUMBER OF LOGICAL BLOCKS the CDB can carry.
    len_max: u64,
}

fn cdb(f: Form, lba: u64, blocks: u64) -> Vec<u8> {
    let mut c = vec![0u8; f.len];
    c[0] = f.opcode;
    match (f.opcode, f.len) {
        (op::COMPARE_AND_WRITE, _) => {
            c[2..10].copy_from_slice(&lba.to_be_bytes());
            c[13] = blocks as u8;
        }
        (_, 10) => {
            c[2..6].copy_from_slice(&(lba as u32).to_be_bytes());
            c[7..9].copy_from_slice(&(blocks as u16).to_be_bytes());
        }
        (_, 12) => {
            c[2..6].copy_from_slice(&(lba as u32).to_be_bytes());
            c[6..10].copy_from_slice(&(blocks as u32).to_be_bytes());
        }
        _ => {
            c[2..10].copy_from_slice(&lba.to_be_bytes());
            c[10..14].copy_from_slice(&(blocks as u32).to_be_bytes());
        }
    }
    c
}

const FORMS: &[Form] = &[
    Form {
        name: "READ(10)",
        opcode: op::READ_10,
        len: 10,
        data_per_block: 0,
        one_block: false,
        len_max: 0xffff,
    },
    Form {
        name: "READ(12)",
        opcode: op::READ_12,
        len: 12,
        data_per_block: 0,
        one_block: false,
        len_max: u32::MAX as u64,
    },
    Form {
        name: "READ(16)",
        opcode: op::READ_16,
        len: 16,
        data_per_block: 0,
        one_block: false,
        len_max: u32::MAX as u64,
    },
    Form {
        name: "WRITE(10)",
        opcode: op::WRITE_10,
        len: 10,
        data_per_block: 1,
        one_block: false,
        len_max: 0xffff,
    },
    Form {
        name: "WRITE(12)",
        opcode: op::WRITE_12,
        len: 12,
        data_per_block: 1,
        one_block: false,
        len_max: u32::MAX as u64,
    },
    Form {
        name: "WRITE(16)",
        opcode: op::WRITE_16,
        len: 16,
        data_per_block: 1,
        one_block: false,
        len_max: u32::MAX as u64,
    },
    Form {
        name: "VERIFY(10)",
        opcode: op::VERIFY_10,
        len: 10,
        data_per_block: 0,
        one_block: false,
        len_max: 0xffff,
    },
    Form {
        name: "VERIFY(12)",
        opcode: op::VERIFY_12,
        len: 12,
        data_per_block: 0,
        one_block: false,
        len_max: u32::MAX as u64,
    },
    Form {
        name: "VERIFY(16)",
        opcode: op::VERIFY_16,
        len: 16,
        data_per_block: 0,
        one_block: false,
        len_max: u32::MAX as u64,
    },
    Form {
        name: "WRITE AND VERIFY(10)",
        opcode: op::WRITE_AND_VERIFY_10,
        len: 10,
        data_per_block: 1,
        one_block: false,
        len_max: 0xffff,
    },
    Form {
        name: "WRITE AND VERIFY(12)",
        opcode: op::WRITE_AND_VERIFY_12,
        len: 12,
        data_per_block: 1,
        one_block: false,
        len_max: u32::MAX as u64,
    },
    Form {
        name: "WRITE AND VERIFY(16)",
        opcode: op::WRITE_AND_VERIFY_16,
        len: 16,
        data_per_block: 1,
        one_block: false,
        len_max: u32::MAX as u64,
    },
    Form {
        name: "ORWRITE(16)",
        opcode: op::ORWRITE_16,
        len: 16,
        data_per_block: 1,
        one_block: false,
        len_max: u32::MAX as u64,
    },
    Form {
        name: "PRE-FETCH(10)",
        opcode: op::PRE_FETCH_10,
        len: 10,
        data_per_block: 0,
        one_block: false,
        len_max: 0xffff,
    },
    Form {
        name: "PRE-FETCH(16)",
        opcode: op::PRE_FETCH_16,
        len: 16,
        data_per_block: 0,
        one_block: false,
        len_max: u32::MAX as u64,
    },
    Form {
        name: "WRITE SAME(10)",
        opcode: op::WRITE_SAME_10,
        len: 10,
        data_per_block: 0,
        one_block: true,
        len_max: 0xffff,
    },
    Form {
        name: "WRITE SAME(16)",
        opcode: op::WRITE_SAME_16,
        len: 16,
        data_per_block: 0,
        one_block: true,
        len_max: u32::MAX as u64,
    },
    Form {
        name: "COMPARE AND WRITE",
        opcode: op::COMPARE_AND_WRITE,
        len: 16,
        data_per_block: 2,
        one_block: false,
        len_max: 255,
    },
];

async fn run(f: &Fixture, form: Form, lba: u64, blocks: u64) -> CommandStatus {
    let data_blocks = if form.one_block {
        1
    } else {
        form.data_per_block * blocks
    };
    let data_out = vec![0u8; (data_blocks * BS).min(64 << 20) as usize];
    let cmd = ScsiCommand {
        nexus: ItNexus {
            initiator_name: "iqn.sweep:a".into(),
            isid: 1,
            relative_port: 1,
        },
        lun: encode_lun(0),
        cdb: cdb(form, lba, blocks),
        attr: TaskAttr::Simple,
        data_out,
        data_in_len: (blocks * BS).min(u64::from(u32::MAX)) as u32,
    };
    f.ds.execute(cmd).await.status
}

#[tokio::test]
async fn every_lba_command_at_the_boundaries() {
    let f = fixture();
    let last = BLOCKS - 1;
    let max_transfer = u64::from(lun::constants::TRANSFER_BYTES_MAX) / BS;
    for &form in FORMS {
        let n = form.name;
        assert_eq!(run(&f, form, last, 1).await, expect::GOOD, "{n}: last LBA");
        assert_eq!(
            run(&f, form, BLOCKS, 1).await,
            expect::LBA_OUT_OF_RANGE,
            "{n}: one past the end"
        );
        assert_eq!(
            run(&f, form, last, 2).await,
            expect::LBA_OUT_OF_RANGE,
            "{n}: straddling the end"
        );
        if form.len == 16 {
            // LBA + length wraps 2^64.
            assert_eq!(
                run(&f, form, u64::MAX, 2).await,
                expect::LBA_OUT_OF_RANGE,
                "{n}: 2^64 wrap"
            );
            assert_eq!(
                run(&f, form, u64::MAX - 1, 1).await,
                expect::LBA_OUT_OF_RANGE,
                "{n}: LBA near 2^64"
            );
        } else {
            // The largest 32-bit LBA, and a range crossing 2^32.
            assert_eq!(
                run(&f, form, u64::from(u32::MAX), 1).await,
                expect::LBA_OUT_OF_RANGE,
                "{n}: LBA 2^32-1"
            );
            assert_eq!(
                run(&f, form, u64::from(u32::MAX) - 1, 4).await,
                expect::LBA_OUT_OF_RANGE,
                "{n}: across 2^32"
            );
        }
        // Zero blocks: a no-op where the command allows it; WRITE SAME refuses it (WSNZ).
        let zero = run(&f, form, BLOCKS, 0).await;
        if form.one_block {
            assert!(
                matches!(
                    zero,
                    CommandStatus::CheckCondition(SenseReason::InvalidFieldInCdb { .. })
                ),
                "{n}: zero blocks: {zero:?}"
            );
        } else if form.opcode == op::COMPARE_AND_WRITE {
            assert_eq!(run(&f, form, 0, 0).await, expect::GOOD, "{n}: zero blocks");
        } else {
            assert_eq!(zero, expect::GOOD, "{n}: zero blocks at the end");
        }
        // Longer than the advertised maximum (inside the LU, so only the length is wrong).
        let limit = if form.opcode == op::COMPARE_AND_WRITE {
            255
        } else {
            max_transfer
        };
        if limit < form.len_max
            && form.opcode != op::PRE_FETCH_10
            && form.opcode != op::PRE_FETCH_16
        {
            let too_long = run(&f, form, 0, limit + 1).await;
            assert!(
                matches!(
                    too_long,
                    CommandStatus::CheckCondition(SenseReason::InvalidFieldInCdb { .. })
                ),
                "{n}: {} blocks: {too_long:?}",
                limit + 1
            );
        }
    }
}
