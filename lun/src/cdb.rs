//! CDB decoding: bytes in, a typed command or the sense reason pointing at the bad field.
//!
//! Decoding happens once, here (as LIO's `sbc_parse_cdb`); execution in [`crate::device`]
//! works on the typed [`Cdb`] only.
//!
//! Invariants:
//! - Every field is range-checked here; reserved bits and unsupported options yield
//!   `InvalidFieldInCdb` with the byte (and bit) of the offending field.
//! - A CDB shorter than its operation code's length is `InvalidFieldInCdb { byte: 0 }`.
//! - No arithmetic here can overflow: LBA + length checks happen in `device` with checked math.

use crate::sense::SenseReason;

/// Operation codes used by this decoder (SPC-4 / SBC-3).
pub mod op {
    #![allow(missing_docs)]
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const FORMAT_UNIT: u8 = 0x04;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const LOG_SENSE: u8 = 0x4d;
    pub const RESERVE_6: u8 = 0x16;
    pub const RELEASE_6: u8 = 0x17;
    pub const RESERVE_10: u8 = 0x56;
    pub const RELEASE_10: u8 = 0x57;
    pub const PERSISTENT_RESERVE_IN: u8 = 0x5e;
    pub const PERSISTENT_RESERVE_OUT: u8 = 0x5f;
    pub const VERIFY_10: u8 = 0x2f;
    pub const VERIFY_12: u8 = 0xaf;
    pub const VERIFY_16: u8 = 0x8f;
    pub const PRE_FETCH_10: u8 = 0x34;
    pub const PRE_FETCH_16: u8 = 0x90;
    pub const READ_DEFECT_DATA_10: u8 = 0x37;
    pub const READ_DEFECT_DATA_12: u8 = 0xb7;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const UNMAP: u8 = 0x42;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const ORWRITE_16: u8 = 0x8b;
    pub const SAI_GET_LBA_STATUS: u8 = 0x12;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const WRITE_AND_VERIFY_10: u8 = 0x2e;
    pub const WRITE_AND_VERIFY_12: u8 = 0xae;
    pub const WRITE_AND_VERIFY_16: u8 = 0x8e;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const READ_16: u8 = 0x88;
    pub const WRITE_16: u8 = 0x8a;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const MAINTENANCE_IN: u8 = 0xa3;
    pub const READ_12: u8 = 0xa8;
    pub const WRITE_12: u8 = 0xaa;
    pub const SAI_READ_CAPACITY_16: u8 = 0x10;
    pub const MI_REPORT_TARGET_PORT_GROUPS: u8 = 0x0a;
    pub const MI_REPORT_SUPPORTED_OPCODES: u8 = 0x0c;
    pub const MI_REPORT_SUPPORTED_TMFS: u8 = 0x0d;
}

/// MODE SENSE page control (SPC-4 §6.11).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageControl {
    /// Current values.
    Current,
    /// Changeable mask.
    Changeable,
    /// Default values.
    Default,
    /// Saved values.
    Saved,
}

/// A decoded CDB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cdb {
    /// TEST UNIT READY.
    TestUnitReady,
    /// REQUEST SENSE.
    RequestSense {
        /// Descriptor format requested.
        desc: bool,
        /// Allocation length.
        alloc: u32,
    },
    /// INQUIRY.
    Inquiry {
        /// VPD page requested.
        evpd: bool,
        /// Page code.
        page: u8,
        /// Allocation length.
        alloc: u32,
    },
    /// REPORT LUNS.
    ReportLuns {
        /// SELECT REPORT.
        select: u8,
        /// Allocation length.
        alloc: u32,
    },
    /// READ CAPACITY (10).
    ReadCapacity10,
    /// READ CAPACITY (16).
    ReadCapacity16 {
        /// Allocation length.
        alloc: u32,
    },
    /// READ (6/10/12/16).
    Read {
        /// First block.
        lba: u64,
        /// Number of blocks.
        blocks: u32,
        /// Force unit access.
        fua: bool,
    },
    /// WRITE (6/10/12/16).
    Write {
        /// First block.
        lba: u64,
        /// Number of blocks.
        blocks: u32,
        /// Force unit access.
        fua: bool,
    },
    /// WRITE AND VERIFY (10/12/16): write durably, then read back and, with BYTCHK, compare.
    WriteAndVerify {
        /// First block.
        lba: u64,
        /// Number of blocks.
        blocks: u32,
        /// Compare the written data with the medium.
        bytchk: bool,
    },
    /// SYNCHRONIZE CACHE (10/16).
    SynchronizeCache {
        /// First block.
        lba: u64,
        /// Number of blocks (0: to the end).
        blocks: u32,
    },
    /// MODE SENSE (6/10).
    ModeSense {
        /// The 10-byte form.
        ten: bool,
        /// Disable block descriptors.
        dbd: bool,
        /// Long LBA block descriptors accepted.
        llbaa: bool,
        /// Page control.
        pc: PageControl,
        /// Page code.
        page: u8,
        /// Subpage code.
        subpage: u8,
        /// Allocation length.
        alloc: u32,
    },
    /// VERIFY (10/12/16).
    Verify {
        /// First block.
        lba: u64,
        /// Number of blocks.
        blocks: u32,
        /// Compare Data-Out with the medium (otherwise only check the medium is readable).
        bytchk: bool,
    },
    /// PRE-FETCH (10/16).
    PreFetch {
        /// First block.
        lba: u64,
        /// Number of blocks.
        blocks: u32,
    },
    /// READ DEFECT DATA (10/12): the medium has no defect list.
    ReadDefectData {
        /// The 12-byte form.
        twelve: bool,
        /// REQ_PLIST, REQ_GLIST and the defect list format, echoed in the header.
        flags: u8,
        /// Allocation length.
        alloc: u32,
    },
    /// WRITE SAME (10/16).
    WriteSame {
        /// First block.
        lba: u64,
        /// Number of blocks.
        blocks: u32,
        /// Deallocate when the data block is zeros.
        unmap: bool,
        /// No Data-Out: the block is zeros.
        ndob: bool,
    },
    /// UNMAP (parameter list follows).
    Unmap {
        /// PARAMETER LIST LENGTH.
        param_len: u32,
    },
    /// GET LBA STATUS.
    GetLbaStatus {
        /// Starting LBA.
        lba: u64,
        /// Allocation length.
        alloc: u32,
    },
    /// COMPARE AND WRITE.
    CompareAndWrite {
        /// First block.
        lba: u64,
        /// Number of blocks (compared, then written).
        blocks: u32,
        /// Force unit access.
        fua: bool,
    },
    /// LOG SENSE.
    LogSense {
        /// Page code.
        page: u8,
        /// Subpage code.
        subpage: u8,
        /// Allocation length.
        alloc: u32,
    },
    /// MODE SELECT (6/10).
    ModeSelect {
        /// The 10-byte form.
        ten: bool,
        /// PARAMETER LIST LENGTH.
        param_len: u32,
    },
    /// PERSISTENT RESERVE IN.
    PersistentReserveIn {
        /// Service action.
        service_action: u8,
        /// Allocation length.
        alloc: u32,
    },
    /// PERSISTENT RESERVE OUT.
    PersistentReserveOut {
        /// Service action.
        service_action: u8,
        /// TYPE.
        type_code: u8,
        /// PARAMETER LIST LENGTH.
        param_len: u32,
    },
    /// RESERVE(6)/(10) (SPC-2).
    Reserve,
    /// RELEASE(6)/(10) (SPC-2).
    Release,
    /// ORWRITE (16): OR the Data-Out into the blocks.
    OrWrite {
        /// First block.
        lba: u64,
        /// Number of blocks.
        blocks: u32,
        /// Force unit access.
        fua: bool,
    },
    /// FORMAT UNIT (accepted without a parameter list; nothing to format).
    FormatUnit,
    /// START STOP UNIT (accepted; the medium is always ready).
    StartStopUnit,
    /// REPORT SUPPORTED OPERATION CODES.
    ReportSupportedOpcodes {
        /// Return command timeouts descriptors.
        rctd: bool,
        /// REPORTING OPTIONS.
        options: u8,
        /// Requested operation code.
        opcode: u8,
        /// Requested service action.
        service_action: u16,
        /// Allocation length.
        alloc: u32,
    },
    /// REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS.
    ReportSupportedTmfs {
        /// Extended parameter data (REPD).
        extended: bool,
        /// Allocation length.
        alloc: u32,
    },
    /// REPORT TARGET PORT GROUPS.
    ReportTargetPortGroups {
        /// Extended header format.
        extended: bool,
        /// Allocation length.
        alloc: u32,
    },
}

fn need(cdb: &[u8], len: usize) -> Result<(), SenseReason> {
    if cdb.len() < len {
        Err(SenseReason::InvalidFieldInCdb { byte: 0, bit: None })
    } else {
        Ok(())
    }
}

fn be16(b: &[u8]) -> u32 {
    u32::from(u16::from_be_bytes([b[0], b[1]]))
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

/// Length of a CDB from its operation code group (SPC-4 §4.2.5.1); `None` for the
/// variable-length and vendor-specific groups.
pub fn cdb_length(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

/// Decodes a CDB.
///
/// # Errors
/// The sense reason for an unsupported opcode or an invalid field.
pub fn decode(cdb: &[u8]) -> Result<Cdb, SenseReason> {
    let Some(&opcode) = cdb.first() else {
        return Err(SenseReason::InvalidOpcode);
    };
    if let Some(len) = cdb_length(opcode) {
        need(cdb, len)?;
    }
    let invalid = |byte: u16, bit: Option<u8>| Err(SenseReason::InvalidFieldInCdb { byte, bit });
    match opcode {
        op::TEST_UNIT_READY => Ok(Cdb::TestUnitReady),
        op::REQUEST_SENSE => Ok(Cdb::RequestSense {
            desc: cdb[1] & 1 != 0,
            alloc: u32::from(cdb[4]),
        }),
        op::INQUIRY => {
            let evpd = cdb[1] & 1 != 0;
            if cdb[1] & 0xfe != 0 {
                return invalid(1, None);
            }
            if !evpd && cdb[2] != 0 {
                return invalid(2, None);
            }
            Ok(Cdb::Inquiry {
                evpd,
                page: cdb[2],
                alloc: be16(&cdb[3..]),
            })
        }
        op::REPORT_LUNS => {
            let alloc = be32(&cdb[6..]);
            if alloc < 16 {
                return invalid(6, None);
            }
            Ok(Cdb::ReportLuns {
                select: cdb[2],
                alloc,
            })
        }
        op::READ_CAPACITY_10 => {
            // PMI (byte 8 bit 0) is obsolete in SBC-3; LBA must be zero without it.
            if cdb[8] & 1 == 0 && be32(&cdb[2..]) != 0 {
                return invalid(2, None);
            }
            Ok(Cdb::ReadCapacity10)
        }
        op::SERVICE_ACTION_IN_16 => match cdb[1] & 0x1f {
            op::SAI_READ_CAPACITY_16 => Ok(Cdb::ReadCapacity16 {
                alloc: be32(&cdb[10..]),
            }),
            op::SAI_GET_LBA_STATUS => Ok(Cdb::GetLbaStatus {
                lba: be64(&cdb[2..]),
                alloc: be32(&cdb[10..]),
            }),
            _ => invalid(1, Some(4)),
        },
        op::MAINTENANCE_IN => match cdb[1] & 0x1f {
            op::MI_REPORT_TARGET_PORT_GROUPS => {
                let format = cdb[1] >> 5;
                if format > 1 {
                    return invalid(1, Some(7));
                }
                Ok(Cdb::ReportTargetPortGroups {
                    extended: format == 1,
                    alloc: be32(&cdb[6..]),
                })
            }
            op::MI_REPORT_SUPPORTED_OPCODES => Ok(Cdb::ReportSupportedOpcodes {
                rctd: cdb[2] & 0x80 != 0,
                options: cdb[2] & 0x07,
                opcode: cdb[3],
                service_action: be16(&cdb[4..]) as u16,
                alloc: be32(&cdb[6..]),
            }),
            op::MI_REPORT_SUPPORTED_TMFS => {
                let alloc = be32(&cdb[6..]);
                if alloc < 4 {
                    return invalid(6, None);
                }
                Ok(Cdb::ReportSupportedTmfs {
                    extended: cdb[2] & 0x80 != 0,
                    alloc,
                })
            }
            _ => invalid(1, Some(4)),
        },
        op::READ_6 | op::WRITE_6 => {
            let lba = u64::from(be32(&[0, cdb[1] & 0x1f, cdb[2], cdb[3]]));
            // SBC-3 §5.14: a TRANSFER LENGTH of zero in READ(6)/WRITE(6) means 256 blocks.
            let blocks = if cdb[4] == 0 { 256 } else { u32::from(cdb[4]) };
            Ok(rw(opcode == op::WRITE_6, lba, blocks, false))
        }
        op::READ_10 | op::WRITE_10 => {
            check_rw_flags(cdb[1])?;
            Ok(rw(
                opcode == op::WRITE_10,
                u64::from(be32(&cdb[2..])),
                be16(&cdb[7..]),
                cdb[1] & 0x08 != 0,
            ))
        }
        op::READ_12 | op::WRITE_12 => {
            check_rw_flags(cdb[1])?;
            Ok(rw(
                opcode == op::WRITE_12,
                u64::from(be32(&cdb[2..])),
                be32(&cdb[6..]),
                cdb[1] & 0x08 != 0,
            ))
        }
        op::READ_16 | op::WRITE_16 => {
            check_rw_flags(cdb[1])?;
            Ok(rw(
                opcode == op::WRITE_16,
                be64(&cdb[2..]),
                be32(&cdb[10..]),
                cdb[1] & 0x08 != 0,
            ))
        }
        op::WRITE_AND_VERIFY_10 | op::WRITE_AND_VERIFY_12 | op::WRITE_AND_VERIFY_16 => {
            let (lba, blocks, bytchk) = verify_fields(cdb)?;
            Ok(Cdb::WriteAndVerify {
                lba,
                blocks,
                bytchk,
            })
        }
        op::SYNCHRONIZE_CACHE_10 => Ok(Cdb::SynchronizeCache {
            lba: u64::from(be32(&cdb[2..])),
            blocks: be16(&cdb[7..]),
        }),
        op::SYNCHRONIZE_CACHE_16 => Ok(Cdb::SynchronizeCache {
            lba: be64(&cdb[2..]),
            blocks: be32(&cdb[10..]),
        }),
        op::MODE_SENSE_6 | op::MODE_SENSE_10 => {
            let ten = opcode == op::MODE_SENSE_10;
            let pc = match cdb[2] >> 6 {
                0 => PageControl::Current,
                1 => PageControl::Changeable,
                2 => PageControl::Default,
                _ => PageControl::Saved,
            };
            let alloc = if ten {
                be16(&cdb[7..])
            } else {
                u32::from(cdb[4])
            };
            Ok(Cdb::ModeSense {
                ten,
                dbd: cdb[1] & 0x08 != 0,
                llbaa: ten && cdb[1] & 0x10 != 0,
                pc,
                page: cdb[2] & 0x3f,
                subpage: cdb[3],
                alloc,
            })
        }
        op::START_STOP_UNIT => Ok(Cdb::StartStopUnit),
        op::ORWRITE_16 => {
            check_rw_flags(cdb[1])?;
            Ok(Cdb::OrWrite {
                lba: be64(&cdb[2..]),
                blocks: be32(&cdb[10..]),
                fua: cdb[1] & 0x08 != 0,
            })
        }
        op::LOG_SENSE => {
            if cdb[1] & 0x01 != 0 {
                return invalid(1, Some(0)); // SP: saving parameters is not offered
            }
            Ok(Cdb::LogSense {
                page: cdb[2] & 0x3f,
                subpage: cdb[3],
                alloc: be16(&cdb[7..]),
            })
        }
        op::MODE_SELECT_6 | op::MODE_SELECT_10 => {
            if cdb[1] & 0x01 != 0 {
                return invalid(1, Some(0)); // SP: saving pages is not offered
            }
            if cdb[1] & 0x10 == 0 {
                return invalid(1, Some(4)); // PF: only the standard page format
            }
            let ten = opcode == op::MODE_SELECT_10;
            Ok(Cdb::ModeSelect {
                ten,
                param_len: if ten {
                    be16(&cdb[7..])
                } else {
                    u32::from(cdb[4])
                },
            })
        }
        op::PERSISTENT_RESERVE_IN => {
            let service_action = cdb[1] & 0x1f;
            if service_action > 3 {
                return invalid(1, Some(4));
            }
            Ok(Cdb::PersistentReserveIn {
                service_action,
                alloc: be16(&cdb[7..]),
            })
        }
        op::PERSISTENT_RESERVE_OUT => {
            let service_action = cdb[1] & 0x1f;
            if service_action > 7 {
                return invalid(1, Some(4));
            }
            if cdb[2] >> 4 != 0 {
                return invalid(2, Some(7)); // SCOPE: only LU_SCOPE
            }
            Ok(Cdb::PersistentReserveOut {
                service_action,
                type_code: cdb[2] & 0x0f,
                param_len: be32(&cdb[5..]),
            })
        }
        op::RESERVE_6 | op::RESERVE_10 | op::RELEASE_6 | op::RELEASE_10 => {
            // Third-party and extent reservations are obsolete and not offered.
            if cdb[1] & 0x13 != 0 {
                return invalid(1, None);
            }
            Ok(if opcode == op::RESERVE_6 || opcode == op::RESERVE_10 {
                Cdb::Reserve
            } else {
                Cdb::Release
            })
        }
        op::FORMAT_UNIT => {
            if cdb[1] & 0x10 != 0 {
                // FMTDATA: a parameter list we do not take.
                return invalid(1, Some(4));
            }
            Ok(Cdb::FormatUnit)
        }
        op::VERIFY_10 | op::VERIFY_12 | op::VERIFY_16 => {
            let (lba, blocks, bytchk) = verify_fields(cdb)?;
            Ok(Cdb::Verify {
                lba,
                blocks,
                bytchk,
            })
        }
        op::PRE_FETCH_10 => Ok(Cdb::PreFetch {
            lba: u64::from(be32(&cdb[2..])),
            blocks: be16(&cdb[7..]),
        }),
        op::PRE_FETCH_16 => Ok(Cdb::PreFetch {
            lba: be64(&cdb[2..]),
            blocks: be32(&cdb[10..]),
        }),
        op::READ_DEFECT_DATA_10 => Ok(Cdb::ReadDefectData {
            twelve: false,
            flags: cdb[2] & 0x1f,
            alloc: be16(&cdb[7..]),
        }),
        op::READ_DEFECT_DATA_12 => Ok(Cdb::ReadDefectData {
            twelve: true,
            flags: cdb[1] & 0x1f,
            alloc: be32(&cdb[6..]),
        }),
        op::WRITE_SAME_10 | op::WRITE_SAME_16 => {
            if cdb[1] & 0xe0 != 0 {
                return invalid(1, Some(7));
            }
            if cdb[1] & 0x10 != 0 {
                // ANCHOR: anchored LBAs are not offered (ANC_SUP=0 in VPD 0xB2).
                return invalid(1, Some(4));
            }
            let ten = opcode == op::WRITE_SAME_10;
            let ndob = !ten && cdb[1] & 0x01 != 0;
            let (lba, blocks) = if ten {
                (u64::from(be32(&cdb[2..])), be16(&cdb[7..]))
            } else {
                (be64(&cdb[2..]), be32(&cdb[10..]))
            };
            Ok(Cdb::WriteSame {
                lba,
                blocks,
                unmap: cdb[1] & 0x08 != 0,
                ndob,
            })
        }
        op::UNMAP => {
            if cdb[1] & 0x01 != 0 {
                return invalid(1, Some(0)); // ANCHOR
            }
            Ok(Cdb::Unmap {
                param_len: be16(&cdb[7..]),
            })
        }
        op::COMPARE_AND_WRITE => {
            check_rw_flags(cdb[1])?;
            Ok(Cdb::CompareAndWrite {
                lba: be64(&cdb[2..]),
                blocks: u32::from(cdb[13]),
                fua: cdb[1] & 0x08 != 0,
            })
        }
        _ => Err(SenseReason::InvalidOpcode),
    }
}

/// LBA, length and BYTCHK of VERIFY and WRITE AND VERIFY (10/12/16 by the CDB's length group).
/// SBC-3 BYTCHK is bit 1; SBC-4 widened it to bits 2-1 (10b reserved, 11b "one block
/// repeated", not offered).
fn verify_fields(cdb: &[u8]) -> Result<(u64, u32, bool), SenseReason> {
    check_rw_flags(cdb[1])?;
    let bytchk = match (cdb[1] >> 1) & 3 {
        0 => false,
        1 => true,
        _ => {
            return Err(SenseReason::InvalidFieldInCdb {
                byte: 1,
                bit: Some(2),
            })
        }
    };
    let (lba, blocks) = match cdb_length(cdb[0]) {
        Some(10) => (u64::from(be32(&cdb[2..])), be16(&cdb[7..])),
        Some(12) => (u64::from(be32(&cdb[2..])), be32(&cdb[6..])),
        _ => (be64(&cdb[2..]), be32(&cdb[10..])),
    };
    Ok((lba, blocks, bytchk))
}

/// RDPROTECT/WRPROTECT (bits 7-5) must be zero: the LU has no protection information.
fn check_rw_flags(b1: u8) -> Result<(), SenseReason> {
    if b1 & 0xe0 != 0 {
        return Err(SenseReason::InvalidFieldInCdb {
            byte: 1,
            bit: Some(7),
        });
    }
    Ok(())
}

fn rw(write: bool, lba: u64, blocks: u32, fua: bool) -> Cdb {
    if write {
        Cdb::Write { lba, blocks, fua }
    } else {
        Cdb::Read { lba, blocks, fua }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn read16_fields() {
        let mut c = [0u8; 16];
        c[0] = op::READ_16;
        c[1] = 0x08;
        c[2..10].copy_from_slice(&u64::MAX.to_be_bytes());
        c[10..14].copy_from_slice(&7u32.to_be_bytes());
        assert_eq!(
            decode(&c),
            Ok(Cdb::Read {
                lba: u64::MAX,
                blocks: 7,
                fua: true
            })
        );
    }

    #[test]
    fn rw6_zero_means_256() {
        let c = [op::READ_6, 0x1f, 0xff, 0xff, 0, 0];
        assert_eq!(
            decode(&c),
            Ok(Cdb::Read {
                lba: 0x1f_ffff,
                blocks: 256,
                fua: false
            })
        );
    }

    #[test]
    fn protect_bits_point_at_byte_1() {
        let mut c = [0u8; 10];
        c[0] = op::WRITE_10;
        c[1] = 0x20;
        assert_eq!(
            decode(&c),
            Err(SenseReason::InvalidFieldInCdb {
                byte: 1,
                bit: Some(7)
            })
        );
    }

    #[test]
    fn inquiry_page_without_evpd_is_invalid() {
        assert_eq!(
            decode(&[op::INQUIRY, 0, 0x80, 0, 255, 0]),
            Err(SenseReason::InvalidFieldInCdb { byte: 2, bit: None })
        );
    }

    #[test]
    fn report_luns_small_allocation_is_invalid() {
        let mut c = [0u8; 12];
        c[0] = op::REPORT_LUNS;
        c[9] = 15;
        assert_eq!(
            decode(&c),
            Err(SenseReason::InvalidFieldInCdb { byte: 6, bit: None })
        );
    }

    #[test]
    fn unknown_opcode() {
        assert_eq!(decode(&[0xff; 16]), Err(SenseReason::InvalidOpcode));
        assert_eq!(decode(&[]), Err(SenseReason::InvalidOpcode));
    }

    #[test]
    fn short_cdb_is_refused() {
        assert_eq!(
            decode(&[op::READ_16, 0, 0]),
            Err(SenseReason::InvalidFieldInCdb { byte: 0, bit: None })
        );
    }

    proptest! {
        /// The decoder never panics on any input.
        #[test]
        fn decode_total(bytes in proptest::collection::vec(any::<u8>(), 0..32)) {
            let _ = decode(&bytes);
        }
    }
}
