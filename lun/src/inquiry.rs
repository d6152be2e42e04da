//! INQUIRY data: the standard page and the vital product data pages (SPC-4 §6.6, §7.8;
//! SBC-3 §6.6).
//!
//! Invariants:
//! - VPD 0x83 carries exactly one NAA designator (the LU), one relative target port designator
//!   and one target port group designator (what dm-multipath's ALUA handler requires).
//! - The pages listed in VPD 0x00 are exactly the pages [`vpd`] can build.

use crate::constants::{PHYSICAL_BLOCK_BYTES, TRANSFER_BYTES_MAX};
use crate::device::{LogicalUnit, TargetPort};

/// VPD pages this device server supports, in ascending order.
pub const SUPPORTED_VPD: [u8; 7] = [0x00, 0x80, 0x83, 0x86, 0xb0, 0xb1, 0xb2];

/// Standard INQUIRY data (96 bytes).
pub fn standard(lu: &LogicalUnit) -> Vec<u8> {
    let id = lu.identity();
    let mut d = vec![0u8; 96];
    d[0] = 0x00; // peripheral qualifier 0, direct access block device
    d[2] = 0x06; // SPC-4
    d[3] = 0x12; // HISUP, response data format 2
    d[4] = (d.len() - 5) as u8;
    d[5] = 0x10; // TPGS = 01b: implicit ALUA
    d[7] = 0x02; // CMDQUE
    pad_ascii(&mut d[8..16], &id.vendor);
    pad_ascii(&mut d[16..32], &id.product);
    pad_ascii(&mut d[32..36], &id.revision);
    // Version descriptors: SAM-5, SPC-4, SBC-3, iSCSI (SPC-4 table 144).
    for (i, v) in [0x00a0u16, 0x0460, 0x04c0, 0x0960].iter().enumerate() {
        d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
    }
    d
}

/// Standard INQUIRY data of the REPORT LUNS well-known logical unit (type 1Eh).
pub fn well_known() -> Vec<u8> {
    let mut d = vec![0u8; 36];
    d[0] = 0x1e;
    d[2] = 0x06;
    d[3] = 0x12;
    d[4] = 31;
    pad_ascii(&mut d[8..16], "RAINIO");
    pad_ascii(&mut d[16..32], "REPORT LUNS WLUN");
    pad_ascii(&mut d[32..36], "0001");
    d
}

/// INQUIRY data for a LUN that is not served: qualifier 011b, type 1Fh.
pub fn not_present() -> Vec<u8> {
    let mut d = vec![0u8; 36];
    d[0] = 0x7f;
    d[2] = 0x06;
    d[3] = 0x12;
    d[4] = 31;
    d
}

/// A VPD page, or `None` when the page is not supported.
pub fn vpd(lu: &LogicalUnit, port: TargetPort, page: u8) -> Option<Vec<u8>> {
    let body = match page {
        0x00 => SUPPORTED_VPD.to_vec(),
        0x80 => lu.identity().serial.as_bytes().to_vec(),
        0x83 => device_identification(lu, port),
        0x86 => {
            // Extended INQUIRY data: HEAD OF QUEUE, ORDERED and SIMPLE task attributes; a
            // volatile cache (WCE) that SYNCHRONIZE CACHE empties; unit attentions are per I_T
            // nexus (LUICLR).
            let mut b = vec![0u8; 60];
            b[1] = 0x04 | 0x02 | 0x01; // HEADSUP, ORDSUP, SIMPSUP
            b[2] = 0x01; // V_SUP
            b[3] = 0x01; // LUICLR
            b
        }
        0xb0 => block_limits(lu),
        0xb1 => {
            let mut b = vec![0u8; 60];
            b[1] = 0x01; // MEDIUM ROTATION RATE: non-rotating medium
            b
        }
        0xb2 => {
            let mut b = vec![0u8; 4];
            if lu.thin_provisioned() {
                // LBPU, LBPWS, LBPWS10, LBPRZ; provisioning type 2 (thin).
                b[1] = 0x80 | 0x40 | 0x20 | 0x04;
                b[2] = 0x02;
            }
            b
        }
        _ => return None,
    };
    let mut d = vec![0x00, page];
    d.extend_from_slice(&(body.len() as u16).to_be_bytes());
    d.extend_from_slice(&body);
    Some(d)
}

fn designator(out: &mut Vec<u8>, code_set: u8, piv_assoc_type: u8, id: &[u8]) {
    out.extend_from_slice(&[code_set, piv_assoc_type, 0, id.len() as u8]);
    out.extend_from_slice(id);
}

fn device_identification(lu: &LogicalUnit, port: TargetPort) -> Vec<u8> {
    let id = lu.identity();
    let mut b = Vec::new();
    // NAA (type 3), binary, associated with the LU.
    designator(&mut b, 0x01, 0x03, &id.naa);
    // T10 vendor identification (type 1), ASCII: vendor + serial.
    let mut t10 = vec![b' '; 8];
    pad_ascii(&mut t10, &id.vendor);
    t10.extend_from_slice(id.serial.as_bytes());
    designator(&mut b, 0x02, 0x01, &t10);
    // Relative target port (type 4) and target port group (type 5): PIV=1, protocol iSCSI (5),
    // association = target port (01b).
    let mut rel = [0u8; 4];
    rel[2..].copy_from_slice(&port.relative_port.to_be_bytes());
    designator(&mut b, 0x51, 0x94, &rel);
    let mut tpg = [0u8; 4];
    tpg[2..].copy_from_slice(&port.port_group.to_be_bytes());
    designator(&mut b, 0x51, 0x95, &tpg);
    b
}

fn block_limits(lu: &LogicalUnit) -> Vec<u8> {
    let mut b = vec![0u8; 60];
    let per_phys = (PHYSICAL_BLOCK_BYTES / lu.block_size()).max(1) as u16;
    b[2..4].copy_from_slice(&per_phys.to_be_bytes()); // OPTIMAL TRANSFER LENGTH GRANULARITY
    let bs = lu.block_size();
    b[0] = 0x01; // WSNZ: WRITE SAME with zero blocks is refused
    b[1] = crate::constants::COMPARE_AND_WRITE_BLOCKS_MAX; // MAXIMUM COMPARE AND WRITE LENGTH
    let max = TRANSFER_BYTES_MAX / bs;
    b[4..8].copy_from_slice(&max.to_be_bytes()); // MAXIMUM TRANSFER LENGTH
    b[8..12].copy_from_slice(&max.to_be_bytes()); // OPTIMAL TRANSFER LENGTH
    if lu.thin_provisioned() {
        let unmap_blocks = (crate::constants::UNMAP_BYTES_MAX / u64::from(bs)) as u32;
        b[16..20].copy_from_slice(&unmap_blocks.to_be_bytes()); // MAXIMUM UNMAP LBA COUNT
        b[20..24].copy_from_slice(&crate::constants::UNMAP_DESCRIPTORS_MAX.to_be_bytes());
        b[24..28].copy_from_slice(&u32::from(per_phys).to_be_bytes()); // OPTIMAL UNMAP GRANULARITY
        b[28] = 0x80; // UGAVALID, alignment 0
    }
    let ws_blocks = crate::constants::WRITE_SAME_BYTES_MAX / u64::from(bs);
    b[32..40].copy_from_slice(&ws_blocks.to_be_bytes()); // MAXIMUM WRITE SAME LENGTH
    b
}

fn pad_ascii(out: &mut [u8], s: &str) {
    out.fill(b' ');
    let n = s.len().min(out.len());
    out[..n].copy_from_slice(&s.as_bytes()[..n]);
}
