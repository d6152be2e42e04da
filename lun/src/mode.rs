//! MODE SENSE data (SPC-4 §6.11, §7.5; SBC-3 §6.4): caching, control and informational
//! exceptions pages, with block descriptors.
//!
//! Invariants:
//! - The changeable mask has a bit set exactly where MODE SELECT can change a value (WCE in the
//!   caching page, D_SENSE in the control page), so hosts never try to flip a fixed bit.
//! - MODE SELECT applies a page only if every bit outside the changeable mask equals the
//!   current value; otherwise nothing changes and the sense points at the byte.
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
    let wce = match pc {
        PageControl::Changeable => true,
        PageControl::Default => true,
        PageControl::Current | PageControl::Saved => lu.write_cache_enabled(),
    };
    if wce {
        p[2] = 0x04; // WCE
    }
    p
}

fn control(lu: &LogicalUnit, pc: PageControl) -> [u8; 12] {
    let mut p = [0u8; 12];
    p[0] = 0x0a;
    p[1] = 0x0a;
    if pc == PageControl::Changeable {
        p[2] = 0x04; // D_SENSE is changeable
        return p;
    }
    if pc != PageControl::Default && lu.descriptor_sense() {
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

/// The values MODE SELECT may change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModeChanges {
    /// New WCE, if the caching page was sent.
    pub wce: Option<bool>,
    /// New D_SENSE, if the control page was sent.
    pub d_sense: Option<bool>,
}

/// Parses and checks a MODE SELECT(6)/(10) parameter list against the current pages.
///
/// # Errors
/// PARAMETER LIST LENGTH ERROR for a short list; INVALID FIELD IN PARAMETER LIST (with the
/// byte) for an unknown page, a wrong page length, a changed non-changeable bit or a block
/// descriptor with another block length.
pub fn parse_select(
    lu: &LogicalUnit,
    ten: bool,
    param_len: u32,
    data: &[u8],
) -> Result<ModeChanges, SenseReason> {
    let data = &data[..data.len().min(param_len as usize)];
    let hdr = if ten { 8 } else { 4 };
    if data.is_empty() {
        return Ok(ModeChanges::default());
    }
    if data.len() < hdr {
        return Err(SenseReason::ParameterListLengthError);
    }
    let bd_len = if ten {
        usize::from(u16::from_be_bytes([data[6], data[7]]))
    } else {
        usize::from(data[3])
    };
    if hdr + bd_len > data.len() {
        return Err(SenseReason::ParameterListLengthError);
    }
    let desc_len = if ten && data[4] & 1 != 0 { 16 } else { 8 };
    if bd_len % desc_len != 0 {
        return Err(SenseReason::InvalidFieldInParameterList {
            byte: if ten { 6 } else { 3 },
            bit: None,
        });
    }
    for d in data[hdr..hdr + bd_len].chunks(desc_len) {
        let block_len = u32::from_be_bytes([0, d[desc_len - 3], d[desc_len - 2], d[desc_len - 1]]);
        if block_len != lu.block_size() {
            return Err(SenseReason::InvalidFieldInParameterList {
                byte: (hdr + desc_len - 3) as u16,
                bit: None,
            });
        }
    }
    let mut changes = ModeChanges::default();
    let mut pos = hdr + bd_len;
    while pos < data.len() {
        if data.len() - pos < 2 {
            return Err(SenseReason::ParameterListLengthError);
        }
        let code = data[pos] & 0x3f;
        if data[pos] & 0x40 != 0 {
            // SPF: no subpages are offered.
            return Err(SenseReason::InvalidFieldInParameterList {
                byte: pos as u16,
                bit: Some(6),
            });
        }
        let current: Vec<u8> = match code {
            0x08 => caching(lu, PageControl::Current).to_vec(),
            0x0a => control(lu, PageControl::Current).to_vec(),
            0x1c => informational_exceptions(PageControl::Current).to_vec(),
            _ => {
                return Err(SenseReason::InvalidFieldInParameterList {
                    byte: pos as u16,
                    bit: None,
                })
            }
        };
        let mask: Vec<u8> = match code {
            0x08 => caching(lu, PageControl::Changeable).to_vec(),
            0x0a => control(lu, PageControl::Changeable).to_vec(),
            _ => informational_exceptions(PageControl::Changeable).to_vec(),
        };
        let len = usize::from(data[pos + 1]) + 2;
        if len != current.len() {
            return Err(SenseReason::InvalidFieldInParameterList {
                byte: (pos + 1) as u16,
                bit: None,
            });
        }
        if pos + len > data.len() {
            return Err(SenseReason::ParameterListLengthError);
        }
        let page = &data[pos..pos + len];
        // Byte 0 carries PS (ignored on select); from byte 2 on, fixed bits must not change.
        for i in 2..len {
            if (page[i] ^ current[i]) & !mask[i] != 0 {
                return Err(SenseReason::InvalidFieldInParameterList {
                    byte: (pos + i) as u16,
                    bit: None,
                });
            }
        }
        match code {
            0x08 => changes.wce = Some(page[2] & 0x04 != 0),
            0x0a => changes.d_sense = Some(page[2] & 0x04 != 0),
            _ => {}
        }
        pos += len;
    }
    Ok(changes)
}
