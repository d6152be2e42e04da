//! REPORT SUPPORTED OPERATION CODES (SPC-4 §6.35) and REPORT SUPPORTED TASK MANAGEMENT
//! FUNCTIONS (§6.38): the table of commands this device server implements.
//!
//! Invariants:
//! - The table lists exactly the opcodes `cdb::decode` accepts (a unit test checks each
//!   listed CDB decodes), with CDB usage bitmaps marking the bits the decoder evaluates.

use crate::cdb::op;
use crate::sense::SenseReason;

/// One supported command: opcode, optional service action, CDB usage data.
struct Entry {
    opcode: u8,
    service_action: Option<u16>,
    usage: &'static [u8],
}

const FF: u8 = 0xff;

/// Supported commands in opcode order.
const TABLE: &[Entry] = &[
    Entry {
        opcode: op::LOG_SENSE,
        service_action: None,
        usage: &[op::LOG_SENSE, 0, 0x3f, FF, 0, 0, 0, FF, FF, 0],
    },
    Entry {
        opcode: op::MODE_SELECT_6,
        service_action: None,
        usage: &[op::MODE_SELECT_6, 0x11, 0, 0, FF, 0],
    },
    Entry {
        opcode: op::MODE_SELECT_10,
        service_action: None,
        usage: &[op::MODE_SELECT_10, 0x11, 0, 0, 0, 0, 0, FF, FF, 0],
    },
    Entry {
        opcode: op::ORWRITE_16,
        service_action: None,
        usage: &[
            op::ORWRITE_16,
            0xf8,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            0,
            0,
        ],
    },
    Entry {
        opcode: op::PERSISTENT_RESERVE_IN,
        service_action: None,
        usage: &[op::PERSISTENT_RESERVE_IN, 0x1f, 0, 0, 0, 0, 0, FF, FF, 0],
    },
    Entry {
        opcode: op::PERSISTENT_RESERVE_OUT,
        service_action: None,
        usage: &[
            op::PERSISTENT_RESERVE_OUT,
            0x1f,
            0x0f,
            0,
            0,
            FF,
            FF,
            FF,
            FF,
            0,
        ],
    },
    Entry {
        opcode: op::RESERVE_6,
        service_action: None,
        usage: &[op::RESERVE_6, 0, 0, 0, 0, 0],
    },
    Entry {
        opcode: op::RELEASE_6,
        service_action: None,
        usage: &[op::RELEASE_6, 0, 0, 0, 0, 0],
    },
    Entry {
        opcode: op::RESERVE_10,
        service_action: None,
        usage: &[op::RESERVE_10, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    },
    Entry {
        opcode: op::RELEASE_10,
        service_action: None,
        usage: &[op::RELEASE_10, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    },
    Entry {
        opcode: op::FORMAT_UNIT,
        service_action: None,
        usage: &[op::FORMAT_UNIT, 0x10, 0, 0, 0, 0],
    },
    Entry {
        opcode: op::VERIFY_10,
        service_action: None,
        usage: &[op::VERIFY_10, 0xf2, FF, FF, FF, FF, 0, FF, FF, 0],
    },
    Entry {
        opcode: op::PRE_FETCH_10,
        service_action: None,
        usage: &[op::PRE_FETCH_10, 0x02, FF, FF, FF, FF, 0, FF, FF, 0],
    },
    Entry {
        opcode: op::READ_DEFECT_DATA_10,
        service_action: None,
        usage: &[op::READ_DEFECT_DATA_10, 0, 0x1f, 0, 0, 0, 0, FF, FF, 0],
    },
    Entry {
        opcode: op::WRITE_SAME_10,
        service_action: None,
        usage: &[op::WRITE_SAME_10, 0xf8, FF, FF, FF, FF, 0, FF, FF, 0],
    },
    Entry {
        opcode: op::UNMAP,
        service_action: None,
        usage: &[op::UNMAP, 0x01, 0, 0, 0, 0, 0, FF, FF, 0],
    },
    Entry {
        opcode: op::COMPARE_AND_WRITE,
        service_action: None,
        usage: &[
            op::COMPARE_AND_WRITE,
            0xf8,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            0,
            0,
            0,
            FF,
            0,
            0,
        ],
    },
    Entry {
        opcode: op::VERIFY_16,
        service_action: None,
        usage: &[
            op::VERIFY_16,
            0xf2,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            0,
            0,
        ],
    },
    Entry {
        opcode: op::PRE_FETCH_16,
        service_action: None,
        usage: &[
            op::PRE_FETCH_16,
            0x02,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            0,
            0,
        ],
    },
    Entry {
        opcode: op::WRITE_SAME_16,
        service_action: None,
        usage: &[
            op::WRITE_SAME_16,
            0xf9,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            0,
            0,
        ],
    },
    Entry {
        opcode: op::SERVICE_ACTION_IN_16,
        service_action: Some(op::SAI_GET_LBA_STATUS as u16),
        usage: &[
            op::SERVICE_ACTION_IN_16,
            op::SAI_GET_LBA_STATUS,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            0,
            0,
        ],
    },
    Entry {
        opcode: op::VERIFY_12,
        service_action: None,
        usage: &[op::VERIFY_12, 0xf2, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0],
    },
    Entry {
        opcode: op::READ_DEFECT_DATA_12,
        service_action: None,
        usage: &[
            op::READ_DEFECT_DATA_12,
            0x1f,
            0,
            0,
            0,
            0,
            FF,
            FF,
            FF,
            FF,
            0,
            0,
        ],
    },
    Entry {
        opcode: op::TEST_UNIT_READY,
        service_action: None,
        usage: &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0],
    },
    Entry {
        opcode: op::REQUEST_SENSE,
        service_action: None,
        usage: &[op::REQUEST_SENSE, 0x01, 0, 0, FF, 0],
    },
    Entry {
        opcode: op::READ_6,
        service_action: None,
        usage: &[op::READ_6, 0x1f, FF, FF, FF, 0],
    },
    Entry {
        opcode: op::WRITE_6,
        service_action: None,
        usage: &[op::WRITE_6, 0x1f, FF, FF, FF, 0],
    },
    Entry {
        opcode: op::INQUIRY,
        service_action: None,
        usage: &[op::INQUIRY, 0x01, FF, FF, FF, 0],
    },
    Entry {
        opcode: op::MODE_SENSE_6,
        service_action: None,
        usage: &[op::MODE_SENSE_6, 0x08, FF, FF, FF, 0],
    },
    Entry {
        opcode: op::START_STOP_UNIT,
        service_action: None,
        usage: &[op::START_STOP_UNIT, 0, 0, 0, 0, 0],
    },
    Entry {
        opcode: op::READ_CAPACITY_10,
        service_action: None,
        usage: &[op::READ_CAPACITY_10, 0, FF, FF, FF, FF, 0, 0, 0x01, 0],
    },
    Entry {
        opcode: op::READ_10,
        service_action: None,
        usage: &[op::READ_10, 0xf8, FF, FF, FF, FF, 0, FF, FF, 0],
    },
    Entry {
        opcode: op::WRITE_10,
        service_action: None,
        usage: &[op::WRITE_10, 0xf8, FF, FF, FF, FF, 0, FF, FF, 0],
    },
    Entry {
        opcode: op::WRITE_AND_VERIFY_10,
        service_action: None,
        usage: &[op::WRITE_AND_VERIFY_10, 0xf2, FF, FF, FF, FF, 0, FF, FF, 0],
    },
    Entry {
        opcode: op::SYNCHRONIZE_CACHE_10,
        service_action: None,
        usage: &[op::SYNCHRONIZE_CACHE_10, 0, FF, FF, FF, FF, 0, FF, FF, 0],
    },
    Entry {
        opcode: op::MODE_SENSE_10,
        service_action: None,
        usage: &[op::MODE_SENSE_10, 0x18, FF, FF, 0, 0, 0, FF, FF, 0],
    },
    Entry {
        opcode: op::READ_16,
        service_action: None,
        usage: &[
            op::READ_16,
            0xf8,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            0,
            0,
        ],
    },
    Entry {
        opcode: op::WRITE_16,
        service_action: None,
        usage: &[
            op::WRITE_16,
            0xf8,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            0,
            0,
        ],
    },
    Entry {
        opcode: op::WRITE_AND_VERIFY_16,
        service_action: None,
        usage: &[
            op::WRITE_AND_VERIFY_16,
            0xf2,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            0,
            0,
        ],
    },
    Entry {
        opcode: op::SYNCHRONIZE_CACHE_16,
        service_action: None,
        usage: &[
            op::SYNCHRONIZE_CACHE_16,
            0,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            0,
            0,
        ],
    },
    Entry {
        opcode: op::SERVICE_ACTION_IN_16,
        service_action: Some(op::SAI_READ_CAPACITY_16 as u16),
        usage: &[
            op::SERVICE_ACTION_IN_16,
            op::SAI_READ_CAPACITY_16,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            FF,
            FF,
            FF,
            FF,
            0,
            0,
        ],
    },
    Entry {
        opcode: op::REPORT_LUNS,
        service_action: None,
        usage: &[op::REPORT_LUNS, 0, FF, 0, 0, 0, FF, FF, FF, FF, 0, 0],
    },
    Entry {
        opcode: op::MAINTENANCE_IN,
        service_action: Some(op::MI_REPORT_TARGET_PORT_GROUPS as u16),
        usage: &[
            op::MAINTENANCE_IN,
            0xe0 | op::MI_REPORT_TARGET_PORT_GROUPS,
            0,
            0,
            0,
            0,
            FF,
            FF,
            FF,
            FF,
            0,
            0,
        ],
    },
    Entry {
        opcode: op::MAINTENANCE_IN,
        service_action: Some(op::MI_REPORT_SUPPORTED_OPCODES as u16),
        usage: &[
            op::MAINTENANCE_IN,
            op::MI_REPORT_SUPPORTED_OPCODES,
            0x87,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            0,
            0,
        ],
    },
    Entry {
        opcode: op::MAINTENANCE_IN,
        service_action: Some(op::MI_REPORT_SUPPORTED_TMFS as u16),
        usage: &[
            op::MAINTENANCE_IN,
            op::MI_REPORT_SUPPORTED_TMFS,
            0x80,
            0,
            0,
            0,
            FF,
            FF,
            FF,
            FF,
            0,
            0,
        ],
    },
    Entry {
        opcode: op::READ_12,
        service_action: None,
        usage: &[op::READ_12, 0xf8, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0],
    },
    Entry {
        opcode: op::WRITE_12,
        service_action: None,
        usage: &[op::WRITE_12, 0xf8, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0],
    },
    Entry {
        opcode: op::WRITE_AND_VERIFY_12,
        service_action: None,
        usage: &[
            op::WRITE_AND_VERIFY_12,
            0xf2,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            FF,
            0,
            0,
        ],
    },
];

/// Nominal and recommended command timeouts reported with RCTD, in seconds.
const TIMEOUT_NOMINAL_S: u32 = 1;
const TIMEOUT_RECOMMENDED_S: u32 = 30;

fn timeouts() -> [u8; 12] {
    let mut t = [0u8; 12];
    t[1] = 0x0a; // DESCRIPTOR LENGTH
    t[4..8].copy_from_slice(&TIMEOUT_NOMINAL_S.to_be_bytes());
    t[8..12].copy_from_slice(&TIMEOUT_RECOMMENDED_S.to_be_bytes());
    t
}

fn has_service_actions(opcode: u8) -> bool {
    TABLE
        .iter()
        .any(|e| e.opcode == opcode && e.service_action.is_some())
}

/// Builds the REPORT SUPPORTED OPERATION CODES parameter data.
///
/// # Errors
/// `InvalidFieldInCdb` for reserved reporting options or a mismatch between the options and
/// whether the requested opcode has service actions.
pub fn report(
    rctd: bool,
    options: u8,
    opcode: u8,
    service_action: u16,
) -> Result<Vec<u8>, SenseReason> {
    let invalid = Err(SenseReason::InvalidFieldInCdb {
        byte: 2,
        bit: Some(2),
    });
    match options {
        0 => {
            let mut body = Vec::new();
            for e in TABLE {
                body.push(e.opcode);
                body.push(0);
                body.extend_from_slice(&e.service_action.unwrap_or(0).to_be_bytes());
                body.push(0);
                body.push(if rctd { 0x02 } else { 0 } | u8::from(e.service_action.is_some()));
                body.extend_from_slice(&(e.usage.len() as u16).to_be_bytes());
                if rctd {
                    body.extend_from_slice(&timeouts());
                }
            }
            let mut d = (body.len() as u32).to_be_bytes().to_vec();
            d.extend_from_slice(&body);
            Ok(d)
        }
        1..=3 => {
            let sa_cmd = has_service_actions(opcode);
            if (options == 1 && sa_cmd)
                || (options == 2 && !sa_cmd && TABLE.iter().any(|e| e.opcode == opcode))
            {
                return invalid;
            }
            let entry = TABLE.iter().find(|e| {
                e.opcode == opcode
                    && (options == 1 || !sa_cmd || e.service_action == Some(service_action))
            });
            let mut d = vec![0u8; 4];
            match entry {
                Some(e) => {
                    d[1] = if rctd { 0x80 } else { 0 } | 0x03; // CTDP, SUPPORT = supported
                    d[2..4].copy_from_slice(&(e.usage.len() as u16).to_be_bytes());
                    d.extend_from_slice(e.usage);
                    if rctd {
                        d.extend_from_slice(&timeouts());
                    }
                }
                None => d[1] = 0x01, // SUPPORT = not supported
            }
            Ok(d)
        }
        _ => invalid,
    }
}

/// REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS: ABORT TASK, ABORT TASK SET, CLEAR TASK SET,
/// LOGICAL UNIT RESET and TARGET RESET.
pub fn report_tmfs(extended: bool) -> Vec<u8> {
    let mut d = vec![0x80 | 0x40 | 0x10 | 0x08 | 0x02, 0, 0, 0];
    if extended {
        d.resize(16, 0);
        d[3] = 0x0c; // ADDITIONAL DATA LENGTH
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every listed usage bitmap is a CDB the decoder accepts (all-ones where evaluated).
    #[test]
    fn table_matches_decoder() {
        for e in TABLE {
            let mut cdb = vec![0u8; e.usage.len()];
            cdb[0] = e.opcode;
            cdb[1] = e.service_action.unwrap_or(0) as u8;
            if e.opcode == op::MODE_SELECT_6 || e.opcode == op::MODE_SELECT_10 {
                cdb[1] = 0x10; // PF
            }
            if e.opcode == op::REPORT_LUNS || e.opcode == op::MAINTENANCE_IN {
                cdb[9] = 16;
            }
            assert!(
                crate::cdb::decode(&cdb).is_ok(),
                "opcode {:#x} listed but not decoded",
                e.opcode
            );
            assert_eq!(e.usage[0], e.opcode);
            assert_eq!(Some(e.usage.len()), crate::cdb::cdb_length(e.opcode));
        }
    }

    #[test]
    fn one_command_forms() {
        let d = report(false, 1, op::READ_10, 0).unwrap();
        assert_eq!(d[1] & 0x07, 0x03);
        assert_eq!(u16::from_be_bytes([d[2], d[3]]), 10);
        assert_eq!(d[5] & 0x18, 0x18, "DPO and FUA evaluated");
        assert_eq!(report(false, 1, 0xc0, 0).unwrap()[1] & 0x07, 0x01);
        assert!(report(false, 1, op::MAINTENANCE_IN, 0).is_err());
        assert!(report(false, 2, op::READ_10, 0).is_err());
        let d = report(
            true,
            2,
            op::SERVICE_ACTION_IN_16,
            op::SAI_READ_CAPACITY_16.into(),
        )
        .unwrap();
        assert_eq!(d.len(), 4 + 16 + 12);
        assert!(report(false, 7, 0, 0).is_err());
    }

    #[test]
    fn all_commands() {
        let d = report(true, 0, 0, 0).unwrap();
        assert_eq!(
            u32::from_be_bytes(d[..4].try_into().unwrap()) as usize,
            d.len() - 4
        );
        assert_eq!((d.len() - 4) / 20, TABLE.len());
    }
}
