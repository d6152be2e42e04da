//! MODE SENSE data (SPC-4 §6.11, §7.5; SBC-3 §6.4): caching, control and informational
//! exceptions pages, with block descriptors.
//!
//! Invariants:
//! - The changeable mask has a bit set only where MODE SELECT can change it (none yet: MODE
//!   SELECT arrives with the full command set), so hosts never try to flip a fixed bit.
//! - WP is never set: the LU is writable.

use crate::cdb::PageControl;
use crate::device::LogicalUnit;
use crate::sense::SenseReason;

/// Builds the pages for `page`/`subpage` under page control `pc`.
///
/// # Errors
/// `InvalidFieldInCdb` for an unsupported page or subpage.
pub fn pages(
    lu: &LogicalUnit,
    pc: PageControl,
    page: u8,
    subpage: u8,
) -> Result<Vec<u8>, SenseReason> {
    let all = page == 0x3f;
    if subpage != 0 && !(subpage == 0xff && all) {
        return Err(SenseReason::InvalidFieldInCdb { byte: 3, bit: None });
    }
    let mut out = Vec::new();
    if all || page == 0x08 {
        out.extend_from_slice(&caching(lu, pc));
    }
    if all || page == 0x0a {
        out.extend_from_slice(&control(lu, pc));
    }
    if all || page == 0x1c {
        out.extend_from_slice(&informational_exceptions(pc));
    }
    if out.is_empty() {
        return Err(SenseReason::InvalidFieldInCdb {
            byte: 2,
            bit: Some(5),
        });
    }
    Ok(out)
}

fn caching(lu: &LogicalUnit, pc: PageControl) -> [u8; 20] {
    let mut p = [0u8; 20];
    p[0] = 0x08;
    p[1] = 0x12;
    if pc != PageControl::Changeable && lu.write_cache_enabled() {
        p[2] = 0x04; // WCE
    }
    p
}

fn control(lu: &LogicalUnit, pc: PageControl) -> [u8; 12] {
    let mut p = [0u8; 12];
    p[0] = 0x0a;
    p[1] = 0x0a;
    if pc == PageControl::Changeable {
        return p;
    }
    if lu.descriptor_sense() {
        p[2] = 0x04; // D_SENSE
    }
    p[3] = 0x10; // QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
    p[8..10].copy_from_slice(&0xffffu16.to_be_bytes()); // BUSY TIMEOUT PERIOD: unlimited
    p
}

fn informational_exceptions(pc: PageControl) -> [u8; 12] {
    let mut p = [0u8; 12];
    p[0] = 0x1c;
    p[1] = 0x0a;
    if pc != PageControl::Changeable {
        p[2] = 0x08; // DEXCPT: no informational exception reporting
    }
    p
}

/// Assembles the MODE SENSE(6) or (10) response: header, optional block descriptor, pages.
pub fn response(lu: &LogicalUnit, ten: bool, dbd: bool, llbaa: bool, pages: &[u8]) -> Vec<u8> {
    let mut desc = Vec::new();
    if !dbd {
        let blocks = lu.blocks();
        if ten && llbaa {
            desc.extend_from_slice(&blocks.to_be_bytes());
            desc.extend_from_slice(&[0; 4]);
            desc.extend_from_slice(&lu.block_size().to_be_bytes());
        } else {
            desc.extend_from_slice(&u32::try_from(blocks).unwrap_or(u32::MAX).to_be_bytes());
            desc.push(0);
            desc.extend_from_slice(&lu.block_size().to_be_bytes()[1..]);
        }
    }
    let dsp = 0x10; // DPOFUA: DPO and FUA supported; WP clear
    let mut out = Vec::new();
    if ten {
        let len = (6 + desc.len() + pages.len()) as u16;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&[0, dsp, u8::from(llbaa && !dbd), 0]);
        out.extend_from_slice(&(desc.len() as u16).to_be_bytes());
    } else {
        let len = (3 + desc.len() + pages.len()).min(255) as u8;
        out.extend_from_slice(&[len, 0, dsp, desc.len() as u8]);
    }
    out.extend_from_slice(&desc);
    out.extend_from_slice(pages);
    out
}
