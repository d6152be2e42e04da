//! Command-level tests of the device server in libiscsi's vocabulary: each command with its
//! boundary sweep (last LBA, one past, zero and maximum lengths, 2^32 and 2^64 wrap).

use lun::cdb::op;
use lun::*;
use raid_engine::{LocalVolume, Volume};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

const BS: u32 = 512;
const BLOCKS: u64 = 2048; // 1 MiB

mod expect {
    use lun::{CommandStatus, SenseReason};
    pub const GOOD: CommandStatus = CommandStatus::Good;
    pub const LBA_OUT_OF_RANGE: CommandStatus =
        CommandStatus::CheckCondition(SenseReason::LbaOutOfRange);
    pub const INVALID_OPCODE: CommandStatus =
        CommandStatus::CheckCondition(SenseReason::InvalidOpcode);
    pub const LUN_NOT_SUPPORTED: CommandStatus =
        CommandStatus::CheckCondition(SenseReason::LunNotSupported);
    pub fn invalid_field_in_cdb(byte: u16, bit: Option<u8>) -> CommandStatus {
        CommandStatus::CheckCondition(SenseReason::InvalidFieldInCdb { byte, bit })
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    ds: DeviceServer,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = disk_io::DeviceConfig::file(dir.path().join("lu.img"), BLOCKS * u64::from(BS));
    cfg.pool_bytes = 32 << 20;
    let dev = Arc::new(disk_io::Device::open(&cfg).unwrap());
    let vol = Arc::new(Volume::Local(
        LocalVolume::new(dev, 0, BLOCKS * u64::from(BS)).unwrap(),
    ));
    let lu = Arc::new(LogicalUnit::new(LuIdentity::for_volume(0x1234), BS, vol));
    let ds = DeviceServer::new(
        TargetPort {
            relative_port: 1,
            port_group: 1,
        },
        BTreeMap::from([(0, lu)]),
    );
    // Like an initiator after login: TEST UNIT READY takes the POWER ON unit attention.
    for n in [nexus(), nexus_of(1), nexus_of(2), nexus_of(3)] {
        let tur = ScsiCommand {
            nexus: n,
            lun: encode_lun(0),
            cdb: vec![0; 6],
            attr: TaskAttr::Simple,
            data_out: vec![],
            data_in_len: 0,
        };
        let r = futures::executor::block_on(ds.execute(tur));
        assert_eq!(
            r.status,
            CommandStatus::CheckCondition(SenseReason::UaPowerOnReset)
        );
    }
    Fixture { _dir: dir, ds }
}

fn nexus() -> ItNexus {
    ItNexus {
        initiator_name: "iqn.test:a".into(),
        isid: 1,
        relative_port: 1,
    }
}

async fn run(f: &Fixture, lun: u16, cdb: &[u8], data_out: Vec<u8>) -> CommandOutcome {
    f.ds.execute(ScsiCommand {
        nexus: nexus(),
        lun: encode_lun(lun),
        cdb: cdb.to_vec(),
        attr: TaskAttr::Simple,
        data_out,
        data_in_len: 1 << 20,
    })
    .await
}

fn rw16(opcode: u8, lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = opcode;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn rw10(opcode: u8, lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = opcode;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn bytes(o: &CommandOutcome) -> Vec<u8> {
    let mut v = Vec::new();
    o.data_in.extend_into(0, o.data_in.len(), &mut v);
    v
}

#[tokio::test]
async fn write_then_read_back_at_the_boundaries() {
    let f = fixture();
    for lba in [0, BLOCKS / 2, BLOCKS - 1] {
        let data: Vec<u8> = (0..BS).map(|i| (i as u64 ^ lba) as u8).collect();
        let w = run(&f, 0, &rw16(op::WRITE_16, lba, 1), data.clone()).await;
        assert_eq!(w.status, expect::GOOD);
        let r = run(&f, 0, &rw16(op::READ_16, lba, 1), vec![]).await;
        assert_eq!(r.status, expect::GOOD);
        assert_eq!(bytes(&r), data, "lba {lba}");
    }
}

#[tokio::test]
async fn one_past_the_end_and_wraps_are_lba_out_of_range() {
    let f = fixture();
    for (lba, blocks) in [
        (BLOCKS, 1),
        (BLOCKS - 1, 2),
        (u64::MAX, 1),
        (u64::MAX - 1, 2),
        (1 << 32, 1),
    ] {
        let r = run(&f, 0, &rw16(op::READ_16, lba, blocks), vec![]).await;
        assert_eq!(
            r.status,
            expect::LBA_OUT_OF_RANGE,
            "read lba {lba} blocks {blocks}"
        );
        let w = run(
            &f,
            0,
            &rw16(op::WRITE_16, lba, blocks),
            vec![0; (blocks * BS) as usize],
        )
        .await;
        assert_eq!(
            w.status,
            expect::LBA_OUT_OF_RANGE,
            "write lba {lba} blocks {blocks}"
        );
    }
    let r = run(&f, 0, &rw10(op::READ_10, u32::MAX, 1), vec![]).await;
    assert_eq!(r.status, expect::LBA_OUT_OF_RANGE);
}

#[tokio::test]
async fn zero_length_transfers_are_good_and_move_no_data() {
    let f = fixture();
    let r = run(&f, 0, &rw10(op::READ_10, 0, 0), vec![]).await;
    assert_eq!(r.status, expect::GOOD);
    assert!(r.data_in.is_empty());
    let w = run(&f, 0, &rw10(op::WRITE_10, 0, 0), vec![]).await;
    assert_eq!(w.status, expect::GOOD);
    // Zero blocks at one past the end is still in range (SBC-3 §4.5).
    let r = run(&f, 0, &rw10(op::READ_10, BLOCKS as u32, 0), vec![]).await;
    assert_eq!(r.status, expect::GOOD);
}

#[tokio::test]
async fn over_long_transfer_past_the_end_is_lba_out_of_range() {
    let f = fixture();
    let max_blocks = lun::constants::TRANSFER_BYTES_MAX / BS;
    let r = run(&f, 0, &rw16(op::READ_16, 0, max_blocks + 1), vec![]).await;
    // The range check comes first: this volume is smaller than the limit.
    assert_eq!(r.status, expect::LBA_OUT_OF_RANGE);
}

#[tokio::test]
async fn short_data_out_writes_only_the_whole_blocks_received() {
    let f = fixture();
    run(&f, 0, &rw10(op::WRITE_10, 3, 2), vec![b'a'; 1024]).await;
    let w = run(&f, 0, &rw10(op::WRITE_10, 3, 2), vec![b'b'; 512 + 200]).await;
    assert_eq!(w.status, expect::GOOD);
    assert_eq!(w.data_out_wanted, Some(1024));
    let r = bytes(&run(&f, 0, &rw10(op::READ_10, 3, 2), vec![]).await);
    assert!(r[..512].iter().all(|&b| b == b'b'));
    assert!(
        r[512..].iter().all(|&b| b == b'a'),
        "the partial block is not written"
    );
    // Less than one block: nothing is written, still GOOD.
    let w = run(&f, 0, &rw10(op::WRITE_10, 4, 1), vec![b'c'; 200]).await;
    assert_eq!(w.status, expect::GOOD);
    let r = bytes(&run(&f, 0, &rw10(op::READ_10, 4, 1), vec![]).await);
    assert!(r.iter().all(|&b| b == b'a'));
}

#[tokio::test]
async fn inquiry_standard_and_vpd() {
    let f = fixture();
    let r = run(&f, 0, &[op::INQUIRY, 0, 0, 0, 255, 0], vec![]).await;
    let d = bytes(&r);
    assert_eq!(d.len(), 96);
    assert_eq!(d[0], 0);
    assert_eq!(d[5] & 0x30, 0x10, "implicit ALUA");
    assert_eq!(&d[8..14], b"RAINIO");
    // Truncated to the allocation length.
    let r = run(&f, 0, &[op::INQUIRY, 0, 0, 0, 36, 0], vec![]).await;
    assert_eq!(r.data_in.len(), 36);
    // VPD 0x00 lists exactly the pages that answer.
    let d = bytes(&run(&f, 0, &[op::INQUIRY, 1, 0, 0, 255, 0], vec![]).await);
    let pages = &d[4..4 + d[3] as usize];
    for &p in pages {
        let r = run(&f, 0, &[op::INQUIRY, 1, p, 0, 255, 0], vec![]).await;
        assert_eq!(r.status, expect::GOOD, "page {p:#x}");
        assert_eq!(bytes(&r)[1], p);
    }
    // VPD 0x83: one NAA (type 3), one relative port (type 4), one port group (type 5).
    let d = bytes(&run(&f, 0, &[op::INQUIRY, 1, 0x83, 0, 255, 0], vec![]).await);
    let mut types = Vec::new();
    let mut i = 4;
    while i < d.len() {
        types.push(d[i + 1] & 0x0f);
        i += 4 + d[i + 3] as usize;
    }
    assert_eq!(types.iter().filter(|&&t| t == 3).count(), 1);
    assert_eq!(types.iter().filter(|&&t| t == 4).count(), 1);
    assert_eq!(types.iter().filter(|&&t| t == 5).count(), 1);
    assert_eq!(d[8] >> 4, 6, "NAA 6");
    let r = run(&f, 0, &[op::INQUIRY, 1, 0x42, 0, 255, 0], vec![]).await;
    assert_eq!(r.status, expect::invalid_field_in_cdb(2, None));
}

#[tokio::test]
async fn missing_lun() {
    let f = fixture();
    let r = run(&f, 7, &[op::INQUIRY, 0, 0, 0, 255, 0], vec![]).await;
    assert_eq!(r.status, expect::GOOD);
    assert_eq!(bytes(&r)[0], 0x7f);
    let r = run(&f, 7, &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0], vec![]).await;
    assert_eq!(r.status, expect::LUN_NOT_SUPPORTED);
    let mut rl = [0u8; 12];
    rl[0] = op::REPORT_LUNS;
    rl[9] = 255;
    let d = bytes(&run(&f, 7, &rl, vec![]).await);
    assert_eq!(&d[..4], &8u32.to_be_bytes());
    assert_eq!(&d[8..16], &[0u8; 8]);
}

#[tokio::test]
async fn read_capacity_10_and_16() {
    let f = fixture();
    let d = bytes(
        &run(
            &f,
            0,
            &[op::READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            vec![],
        )
        .await,
    );
    assert_eq!(
        u32::from_be_bytes(d[..4].try_into().unwrap()) as u64,
        BLOCKS - 1
    );
    assert_eq!(u32::from_be_bytes(d[4..8].try_into().unwrap()), BS);
    let mut c = [0u8; 16];
    c[0] = op::SERVICE_ACTION_IN_16;
    c[1] = op::SAI_READ_CAPACITY_16;
    c[13] = 32;
    let d = bytes(&run(&f, 0, &c, vec![]).await);
    assert_eq!(u64::from_be_bytes(d[..8].try_into().unwrap()), BLOCKS - 1);
    assert_eq!(d[13], 3, "8 logical blocks per physical block");
}

#[tokio::test]
async fn mode_sense_all_pages_and_bad_page() {
    let f = fixture();
    let d = bytes(&run(&f, 0, &[op::MODE_SENSE_6, 0, 0x3f, 0, 255, 0], vec![]).await);
    assert_eq!(d[0] as usize, d.len() - 1);
    assert_eq!(d[2] & 0x80, 0, "WP clear");
    assert_eq!(d[3], 8, "one block descriptor");
    let pages: Vec<u8> = {
        let mut v = Vec::new();
        let mut i = 4 + 8;
        while i < d.len() {
            v.push(d[i] & 0x3f);
            i += 2 + d[i + 1] as usize;
        }
        v
    };
    assert_eq!(pages, vec![0x08, 0x0a, 0x1c]);
    let mut c = [0u8; 10];
    c[0] = op::MODE_SENSE_10;
    c[1] = 0x08;
    c[2] = 0x08;
    c[8] = 255;
    let d = bytes(&run(&f, 0, &c, vec![]).await);
    assert_eq!(u16::from_be_bytes([d[0], d[1]]) as usize, d.len() - 2);
    assert_eq!(d[8], 0x08);
    let r = run(&f, 0, &[op::MODE_SENSE_6, 0, 0x19, 0, 255, 0], vec![]).await;
    assert_eq!(r.status, expect::invalid_field_in_cdb(2, Some(5)));
}

#[tokio::test]
async fn unsupported_opcode() {
    let f = fixture();
    let r = run(
        &f,
        0,
        &[0xc7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        vec![],
    )
    .await;
    assert_eq!(r.status, expect::INVALID_OPCODE);
    assert_eq!((r.sense[2], r.sense[12]), (0x05, 0x20));
}

#[tokio::test]
async fn synchronize_cache_range() {
    let f = fixture();
    let mut c = [0u8; 10];
    c[0] = op::SYNCHRONIZE_CACHE_10;
    assert_eq!(run(&f, 0, &c, vec![]).await.status, expect::GOOD);
    c[2..6].copy_from_slice(&(BLOCKS as u32 + 1).to_be_bytes());
    assert_eq!(
        run(&f, 0, &c, vec![]).await.status,
        expect::LBA_OUT_OF_RANGE
    );
}

#[tokio::test]
async fn write_same_needs_exactly_one_block_and_unmaps_zeros() {
    let f = fixture();
    let mut c = [0u8; 10];
    c[0] = op::WRITE_SAME_10;
    c[1] = 0x08; // UNMAP
    c[8] = 1;
    for len in [256usize, 1024] {
        let r = run(&f, 0, &c, vec![0xa6; len]).await;
        assert!(
            matches!(r.status, CommandStatus::CheckCondition(_)),
            "data-out of {len} bytes: {:?}",
            r.status
        );
    }
    run(&f, 0, &rw10(op::WRITE_10, 0, 16), vec![0xff; 16 * 512]).await;
    c[8] = 16;
    assert_eq!(run(&f, 0, &c, vec![0; 512]).await.status, expect::GOOD);
    let d = bytes(&run(&f, 0, &rw10(op::READ_10, 0, 16), vec![]).await);
    assert!(d.iter().all(|&b| b == 0));
    // Zero blocks is refused (WSNZ).
    c[8] = 0;
    assert_eq!(
        run(&f, 0, &c, vec![0; 512]).await.status,
        expect::invalid_field_in_cdb(7, None)
    );
}

fn nexus_of(i: u64) -> ItNexus {
    ItNexus {
        initiator_name: format!("iqn.test:{i}"),
        isid: i,
        relative_port: 1,
    }
}

async fn run_as(f: &Fixture, n: u64, cdb: &[u8], data_out: Vec<u8>) -> CommandOutcome {
    f.ds.execute(ScsiCommand {
        nexus: nexus_of(n),
        lun: encode_lun(0),
        cdb: cdb.to_vec(),
        attr: TaskAttr::Simple,
        data_out,
        data_in_len: 1 << 20,
    })
    .await
}

#[tokio::test]
async fn spc2_reserve_conflicts_until_release_reset_or_nexus_loss() {
    let f = fixture();
    let reserve = [op::RESERVE_6, 0, 0, 0, 0, 0];
    let release = [op::RELEASE_6, 0, 0, 0, 0, 0];
    assert_eq!(run_as(&f, 1, &reserve, vec![]).await.status, expect::GOOD);
    assert_eq!(
        run_as(&f, 2, &reserve, vec![]).await.status,
        CommandStatus::ReservationConflict
    );
    assert_eq!(
        run_as(&f, 2, &rw10(op::READ_10, 0, 1), vec![]).await.status,
        CommandStatus::ReservationConflict
    );
    assert_eq!(
        run_as(&f, 2, &[op::INQUIRY, 0, 0, 0, 36, 0], vec![])
            .await
            .status,
        expect::GOOD
    );
    assert_eq!(
        run_as(&f, 2, &release, vec![]).await.status,
        expect::GOOD,
        "RELEASE by another nexus is a no-op"
    );
    assert_eq!(
        run_as(&f, 2, &reserve, vec![]).await.status,
        CommandStatus::ReservationConflict
    );
    f.ds.reset(&nexus_of(1), None).await;
    assert_eq!(
        run_as(&f, 2, &reserve, vec![]).await.status,
        GOOD_AFTER_UA,
        "the other nexus sees the reset first"
    );
    assert_eq!(
        run_as(&f, 2, &reserve, vec![]).await.status,
        expect::GOOD,
        "a reset releases it"
    );
    f.ds.nexus_lost(&nexus_of(2)).await;
    assert_eq!(
        run_as(&f, 1, &reserve, vec![]).await.status,
        GOOD_AFTER_UA,
        "the resetting nexus sees the reset too"
    );
    assert_eq!(
        run_as(&f, 1, &reserve, vec![]).await.status,
        expect::GOOD,
        "nexus loss released it"
    );
}

const GOOD_AFTER_UA: CommandStatus = CommandStatus::CheckCondition(SenseReason::UaBusDeviceReset);

#[tokio::test]
async fn mode_select_changes_wce_and_d_sense_and_tells_other_nexuses() {
    let f = fixture();
    // Nexus 2 has been seen, so it will get the unit attention.
    run_as(&f, 2, &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0], vec![]).await;
    let ms = bytes(&run_as(&f, 1, &[op::MODE_SENSE_6, 0x08, 0x08, 0, 255, 0], vec![]).await);
    assert_eq!(ms[4] & 0x3f, 0x08);
    assert_eq!(ms[6] & 0x04, 0x04, "WCE on by default");
    // Changeable mask: WCE only.
    let ch = bytes(&run_as(&f, 1, &[op::MODE_SENSE_6, 0x08, 0x48, 0, 255, 0], vec![]).await);
    assert_eq!(ch[6], 0x04);
    // MODE SELECT(6): caching page with WCE off, control page with D_SENSE on.
    let mut list = vec![0u8, 0, 0, 0];
    let mut caching = ms[4..24].to_vec();
    caching[0] &= 0x3f; // PS is reserved on select
    caching[2] &= !0x04;
    list.extend_from_slice(&caching);
    let ctl = bytes(&run_as(&f, 1, &[op::MODE_SENSE_6, 0x08, 0x0a, 0, 255, 0], vec![]).await);
    let mut control = ctl[4..16].to_vec();
    control[2] |= 0x04;
    list.extend_from_slice(&control);
    let sel = [op::MODE_SELECT_6, 0x10, 0, 0, list.len() as u8, 0];
    assert_eq!(run_as(&f, 1, &sel, list.clone()).await.status, expect::GOOD);
    let ms = bytes(&run_as(&f, 1, &[op::MODE_SENSE_6, 0x08, 0x08, 0, 255, 0], vec![]).await);
    assert_eq!(ms[6] & 0x04, 0, "WCE now off");
    // D_SENSE: errors now come in descriptor format.
    let r = run_as(&f, 1, &rw10(op::READ_10, u32::MAX, 1), vec![]).await;
    assert_eq!(r.sense[0], 0x72);
    // The other nexus hears about it once.
    let r = run_as(&f, 2, &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0], vec![]).await;
    assert_eq!(
        r.status,
        CommandStatus::CheckCondition(SenseReason::UaModeParametersChanged)
    );
    assert_eq!(
        run_as(&f, 2, &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0], vec![])
            .await
            .status,
        expect::GOOD
    );
    // Changing a bit that is not changeable: INVALID FIELD IN PARAMETER LIST at that byte.
    let mut bad = vec![0u8, 0, 0, 0];
    let mut c2 = caching.clone();
    c2[3] = 0x01;
    bad.extend_from_slice(&c2);
    let r = run_as(
        &f,
        1,
        &[op::MODE_SELECT_6, 0x10, 0, 0, bad.len() as u8, 0],
        bad,
    )
    .await;
    assert_eq!(
        r.status,
        CommandStatus::CheckCondition(SenseReason::InvalidFieldInParameterList {
            byte: 7,
            bit: None
        })
    );
    // Saving pages is not offered.
    let r = run_as(&f, 1, &[op::MODE_SELECT_6, 0x11, 0, 0, 0, 0], vec![]).await;
    assert_eq!(r.status, expect::invalid_field_in_cdb(1, Some(0)));
}

#[tokio::test]
async fn compare_and_write_miscompare_reports_the_offset() {
    let f = fixture();
    run(&f, 0, &rw10(op::WRITE_10, 10, 1), vec![b'A'; 512]).await;
    let mut caw = [0u8; 16];
    caw[0] = op::COMPARE_AND_WRITE;
    caw[2..10].copy_from_slice(&10u64.to_be_bytes());
    caw[13] = 1;
    let mut data = vec![b'A'; 512];
    data[100] = b'X';
    data.extend_from_slice(&[b'B'; 512]);
    let r = run(&f, 0, &caw, data.clone()).await;
    assert_eq!(
        r.status,
        CommandStatus::CheckCondition(SenseReason::Miscompare { offset: 100 })
    );
    assert_eq!(
        (r.sense[0], r.sense[2], r.sense[12]),
        (0xf0, 0x0e, 0x1d),
        "VALID + INFORMATION, MISCOMPARE"
    );
    assert_eq!(u32::from_be_bytes(r.sense[3..7].try_into().unwrap()), 100);
    data[100] = b'A';
    assert_eq!(run(&f, 0, &caw, data).await.status, expect::GOOD);
    assert!(bytes(&run(&f, 0, &rw10(op::READ_10, 10, 1), vec![]).await)
        .iter()
        .all(|&b| b == b'B'));
    // Wrong data size, and past the end.
    assert_eq!(
        run(&f, 0, &caw, vec![0; 512]).await.status,
        expect::invalid_field_in_cdb(13, None)
    );
    caw[2..10].copy_from_slice(&BLOCKS.to_be_bytes());
    assert_eq!(
        run(&f, 0, &caw, vec![0; 1024]).await.status,
        expect::LBA_OUT_OF_RANGE
    );
}

#[tokio::test]
async fn unmap_and_get_lba_status() {
    let f = fixture();
    run(&f, 0, &rw10(op::WRITE_10, 0, 64), vec![7; 64 * 512]).await;
    let mut list = vec![0u8; 8];
    list.extend_from_slice(&16u64.to_be_bytes());
    list.extend_from_slice(&16u32.to_be_bytes());
    list.extend_from_slice(&[0; 4]);
    list[1] = 22;
    list[3] = 16;
    let mut cdb = [0u8; 10];
    cdb[0] = op::UNMAP;
    cdb[8] = 24;
    assert_eq!(run(&f, 0, &cdb, list).await.status, expect::GOOD);
    let d = bytes(&run(&f, 0, &rw10(op::READ_10, 0, 64), vec![]).await);
    assert!(d[..16 * 512].iter().all(|&b| b == 7));
    assert!(
        d[16 * 512..32 * 512].iter().all(|&b| b == 0),
        "unmapped blocks read as zeros"
    );
    let mut gls = [0u8; 16];
    gls[0] = op::SERVICE_ACTION_IN_16;
    gls[1] = op::SAI_GET_LBA_STATUS;
    gls[2..10].copy_from_slice(&16u64.to_be_bytes());
    gls[13] = 64;
    let d = bytes(&run(&f, 0, &gls, vec![]).await);
    assert_eq!(
        u64::from_be_bytes(d[8..16].try_into().unwrap()),
        16,
        "first descriptor starts at the requested LBA"
    );
    assert_eq!(u32::from_be_bytes(d[16..20].try_into().unwrap()), 16);
    assert_eq!(d[20] & 0x0f, 1, "deallocated");
    assert_eq!(u64::from_be_bytes(d[24..32].try_into().unwrap()), 32);
    assert_eq!(d[36] & 0x0f, 0, "mapped");
    gls[2..10].copy_from_slice(&BLOCKS.to_be_bytes());
    assert_eq!(
        run(&f, 0, &gls, vec![]).await.status,
        expect::LBA_OUT_OF_RANGE
    );
}

#[tokio::test]
async fn persistent_reservation_conflicts_from_the_other_nexus() {
    let f = fixture();
    let prout = |sa: u8, ty: u8| [op::PERSISTENT_RESERVE_OUT, sa, ty, 0, 0, 0, 0, 0, 24, 0];
    let params = |key: u64, sa_key: u64| {
        let mut p = vec![0u8; 24];
        p[..8].copy_from_slice(&key.to_be_bytes());
        p[8..16].copy_from_slice(&sa_key.to_be_bytes());
        p
    };
    assert_eq!(
        run_as(&f, 1, &prout(0, 0), params(0, 0xabc)).await.status,
        expect::GOOD
    );
    assert_eq!(
        run_as(&f, 1, &prout(1, 1), params(0xabc, 0)).await.status,
        expect::GOOD
    ); // RESERVE WR_EX
    assert_eq!(
        run_as(&f, 2, &rw10(op::WRITE_10, 0, 1), vec![0; 512])
            .await
            .status,
        CommandStatus::ReservationConflict
    );
    assert_eq!(
        run_as(&f, 2, &rw10(op::READ_10, 0, 1), vec![]).await.status,
        expect::GOOD
    );
    assert_eq!(
        run_as(&f, 1, &rw10(op::WRITE_10, 0, 1), vec![0; 512])
            .await
            .status,
        expect::GOOD
    );
    // READ RESERVATION from the other nexus sees the holder's key and type.
    let d = bytes(
        &run_as(
            &f,
            2,
            &[op::PERSISTENT_RESERVE_IN, 1, 0, 0, 0, 0, 0, 0, 255, 0],
            vec![],
        )
        .await,
    );
    assert_eq!(u32::from_be_bytes(d[4..8].try_into().unwrap()), 16);
    assert_eq!(u64::from_be_bytes(d[8..16].try_into().unwrap()), 0xabc);
    assert_eq!(d[21] & 0x0f, 1);
    // A short parameter list.
    assert_eq!(
        run_as(&f, 2, &prout(0, 0), vec![0; 10]).await.status,
        CommandStatus::CheckCondition(SenseReason::ParameterListLengthError)
    );
}

#[tokio::test]
async fn report_luns_selects_and_the_well_known_lun() {
    let f = fixture();
    let rl = |select: u8| {
        let mut c = [0u8; 12];
        c[0] = op::REPORT_LUNS;
        c[2] = select;
        c[9] = 255;
        c
    };
    let count = |d: &[u8]| u32::from_be_bytes(d[..4].try_into().unwrap()) / 8;
    assert_eq!(count(&bytes(&run(&f, 0, &rl(0), vec![]).await)), 1);
    let d = bytes(&run(&f, 0, &rl(1), vec![]).await);
    assert_eq!(count(&d), 1);
    assert_eq!(
        u64::from_be_bytes(d[8..16].try_into().unwrap()),
        lun::device::REPORT_LUNS_WLUN
    );
    assert_eq!(count(&bytes(&run(&f, 0, &rl(2), vec![]).await)), 2);
    assert_eq!(
        run(&f, 0, &rl(3), vec![]).await.status,
        expect::invalid_field_in_cdb(2, None)
    );
    // Addressed to the well-known LU.
    let wl = |cdb: &[u8]| {
        f.ds.execute(ScsiCommand {
            nexus: nexus(),
            lun: lun::device::REPORT_LUNS_WLUN,
            cdb: cdb.to_vec(),
            attr: TaskAttr::Simple,
            data_out: vec![],
            data_in_len: 255,
        })
    };
    assert_eq!(bytes(&wl(&[op::INQUIRY, 0, 0, 0, 36, 0]).await)[0], 0x1e);
    assert_eq!(count(&bytes(&wl(&rl(0)).await)), 1);
    assert_eq!(
        wl(&rw10(op::READ_10, 0, 1)).await.status,
        expect::INVALID_OPCODE
    );
}

#[tokio::test]
async fn log_sense_supported_pages_only() {
    let f = fixture();
    let d = bytes(
        &run(
            &f,
            0,
            &[op::LOG_SENSE, 0, 0x40, 0, 0, 0, 0, 0, 255, 0],
            vec![],
        )
        .await,
    );
    assert_eq!(&d[..6], &[0, 0, 0, 2, 0x00, 0x2f]);
    let d = bytes(
        &run(
            &f,
            0,
            &[op::LOG_SENSE, 0, 0x6f, 0, 0, 0, 0, 0, 255, 0],
            vec![],
        )
        .await,
    );
    assert_eq!(d[0], 0x2f);
    let r = run(
        &f,
        0,
        &[op::LOG_SENSE, 0, 0x4d, 0, 0, 0, 0, 0, 255, 0],
        vec![],
    )
    .await;
    assert_eq!(r.status, expect::invalid_field_in_cdb(2, Some(5)));
}

#[tokio::test]
async fn ordered_task_waits_for_older_tasks_and_head_of_queue_does_not() {
    let f = fixture();
    let cmd = |attr: TaskAttr, cdb: &[u8], data: Vec<u8>| ScsiCommand {
        nexus: nexus(),
        lun: encode_lun(0),
        cdb: cdb.to_vec(),
        attr,
        data_out: data,
        data_in_len: 512,
    };
    let simple = f.ds.admit(cmd(
        TaskAttr::Simple,
        &rw10(op::WRITE_10, 0, 1),
        vec![1; 512],
    ));
    let ordered =
        f.ds.admit(cmd(TaskAttr::Ordered, &rw10(op::READ_10, 0, 1), vec![]));
    let hoq = f.ds.admit(cmd(
        TaskAttr::HeadOfQueue,
        &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0],
        vec![],
    ));
    let mut ordered_run = std::pin::pin!(f.ds.run(ordered));
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    assert!(
        ordered_run.as_mut().poll(&mut cx).is_pending(),
        "ORDERED waits for the older SIMPLE write"
    );
    assert_eq!(
        f.ds.run(hoq).await.status,
        expect::GOOD,
        "HEAD OF QUEUE runs at once"
    );
    assert_eq!(f.ds.run(simple).await.status, expect::GOOD);
    let r = ordered_run.await;
    assert_eq!(
        bytes(&r),
        vec![1; 512],
        "the ORDERED read sees the older write"
    );
}

#[tokio::test]
async fn reset_and_clear_task_set_abort_other_nexuses_tasks_with_a_unit_attention() {
    let f = fixture();
    let cmd = |n: u64| ScsiCommand {
        nexus: nexus_of(n),
        lun: encode_lun(0),
        cdb: rw10(op::READ_10, 0, 1).to_vec(),
        attr: TaskAttr::Simple,
        data_out: vec![],
        data_in_len: 512,
    };
    // Both nexuses are known to the LU.
    run_as(&f, 1, &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0], vec![]).await;
    run_as(&f, 2, &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0], vec![]).await;
    let pending = f.ds.admit(cmd(2));
    f.ds.reset(&nexus_of(1), Some(encode_lun(0))).await;
    assert_eq!(f.ds.run(pending).await.status, CommandStatus::TaskAborted);
    let ua = run_as(&f, 2, &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0], vec![]).await;
    assert_eq!(
        ua.status,
        CommandStatus::CheckCondition(SenseReason::UaBusDeviceReset)
    );
    // The nexus that reset hears about it too (SAM-5: every I_T nexus).
    assert_eq!(
        run_as(&f, 1, &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0], vec![])
            .await
            .status,
        CommandStatus::CheckCondition(SenseReason::UaBusDeviceReset)
    );
    assert_eq!(
        run_as(&f, 1, &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0], vec![])
            .await
            .status,
        expect::GOOD
    );
    // CLEAR TASK SET: only nexuses that had tasks hear about it.
    let pending = f.ds.admit(cmd(2));
    f.ds.clear_task_set(&nexus_of(1), encode_lun(0));
    assert_eq!(f.ds.run(pending).await.status, CommandStatus::TaskAborted);
    let ua = run_as(&f, 2, &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0], vec![]).await;
    assert_eq!(
        ua.status,
        CommandStatus::CheckCondition(SenseReason::UaCommandsClearedByAnotherInitiator)
    );
    // Tasks admitted after the reset run normally.
    assert_eq!(f.ds.execute(cmd(2)).await.status, expect::GOOD);
}

#[tokio::test]
async fn a_new_nexus_sees_power_on_once_and_inquiry_does_not_clear_it() {
    let f = fixture();
    let n = 9;
    assert_eq!(
        run_as(&f, n, &[op::INQUIRY, 0, 0, 0, 36, 0], vec![])
            .await
            .status,
        expect::GOOD
    );
    let r = run_as(&f, n, &[op::REQUEST_SENSE, 0, 0, 0, 18, 0], vec![]).await;
    assert_eq!(r.status, expect::GOOD);
    assert_eq!(
        (bytes(&r)[2] & 0x0f, bytes(&r)[12]),
        (0x06, 0x29),
        "REQUEST SENSE reports the UA"
    );
    assert_eq!(
        run_as(&f, n, &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0], vec![])
            .await
            .status,
        expect::GOOD,
        "and clears it"
    );
}
