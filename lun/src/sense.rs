//! SCSI status and sense: one closed enum of reasons and one table of codes (SPC-4 Annex D).
//!
//! Invariants:
//! - [`SenseReason::code`] is the only place (key, ASC, ASCQ) numbers appear.
//! - Fixed (0x70) or descriptor (0x72) format is chosen only when encoding, from D_SENSE.
//! - Reservation conflict, busy and task set full are statuses, not sense.

/// Sense keys (SPC-4 §4.5.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum SenseKey {
    /// No sense.
    NoSense = 0x0,
    /// Not ready.
    NotReady = 0x2,
    /// Medium error.
    MediumError = 0x3,
    /// Hardware error.
    HardwareError = 0x4,
    /// Illegal request.
    IllegalRequest = 0x5,
    /// Unit attention.
    UnitAttention = 0x6,
    /// Aborted command.
    AbortedCommand = 0xb,
    /// Miscompare.
    Miscompare = 0xe,
}

/// Why a command ended in CHECK CONDITION (or, for [`SenseReason::NoSense`], what REQUEST
/// SENSE reports).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SenseReason {
    /// Nothing to report.
    NoSense,
    /// The operation code is not supported.
    InvalidOpcode,
    /// A CDB field is invalid: `byte` and optional `bit` point at it.
    InvalidFieldInCdb {
        /// Byte offset in the CDB.
        byte: u16,
        /// Bit within the byte, if known.
        bit: Option<u8>,
    },
    /// A parameter list field is invalid.
    InvalidFieldInParameterList {
        /// Byte offset in the parameter list.
        byte: u16,
        /// Bit within the byte, if known.
        bit: Option<u8>,
    },
    /// The parameter list is shorter than its contents claim.
    ParameterListLengthError,
    /// LBA (+ length) beyond the capacity.
    LbaOutOfRange,
    /// The LUN is not served by this target.
    LunNotSupported,
    /// Read failed on the medium.
    UnrecoveredReadError {
        /// First LBA that failed.
        lba: u64,
    },
    /// Write failed on the medium.
    WriteError {
        /// First LBA that failed.
        lba: u64,
    },
    /// Internal target failure (a bug or an unexpected backend error).
    InternalTargetFailure,
    /// Power on, reset or bus device reset occurred.
    UaPowerOnReset,
    /// The command was aborted because data transfer did not complete.
    DataPhaseError,
    /// Too much or too little data for the command.
    InvalidTransferLength,
    /// Verification found different data; `offset` is the first differing byte.
    Miscompare {
        /// Byte offset of the first miscompare within the transferred data.
        offset: u64,
    },
    /// RELEASE of a persistent reservation with the wrong type.
    InvalidReleaseOfPersistentReservation,
    /// Unit attention: reservations preempted (CLEAR by another nexus).
    UaReservationsPreempted,
    /// Unit attention: reservations released.
    UaReservationsReleased,
    /// Unit attention: registrations preempted.
    UaRegistrationsPreempted,
    /// Unit attention: another nexus changed mode parameters.
    UaModeParametersChanged,
    /// Unit attention: commands cleared by another initiator (CLEAR TASK SET).
    UaCommandsClearedByAnotherInitiator,
    /// Unit attention: a logical unit or target reset happened.
    UaBusDeviceReset,
    /// Unit attention: the access state of a target port group changed (re-read REPORT
    /// TARGET PORT GROUPS).
    UaAsymmetricAccessStateChanged,
    /// The transport delivered less data than the CDB asks for (iSCSI EDTL < SPDTL).
    InvalidFieldInInformationUnit,
    /// Not ready: asymmetric access state transition (the cluster is changing membership or
    /// too few shard holders answer); hosts retry.
    NotReadyTransitioning,
    /// Not ready: target port in unavailable state (this controller is fenced); multipath
    /// hosts move to another path.
    NotReadyUnavailable,
    /// Not ready: the logical unit is becoming ready (its volume is not yet agreed by the
    /// cluster's metadata log); hosts retry.
    NotReadyBecomingReady,
}

impl SenseReason {
    /// (key, ASC, ASCQ) per SPC-4 Annex D: the only place these numbers appear.
    pub const fn code(self) -> (SenseKey, u8, u8) {
        match self {
            Self::NoSense => (SenseKey::NoSense, 0x00, 0x00),
            Self::InvalidOpcode => (SenseKey::IllegalRequest, 0x20, 0x00),
            Self::InvalidFieldInCdb { .. } => (SenseKey::IllegalRequest, 0x24, 0x00),
            Self::InvalidFieldInParameterList { .. } => (SenseKey::IllegalRequest, 0x26, 0x00),
            Self::ParameterListLengthError => (SenseKey::IllegalRequest, 0x1a, 0x00),
            Self::LbaOutOfRange => (SenseKey::IllegalRequest, 0x21, 0x00),
            Self::LunNotSupported => (SenseKey::IllegalRequest, 0x25, 0x00),
            Self::UnrecoveredReadError { .. } => (SenseKey::MediumError, 0x11, 0x00),
            Self::WriteError { .. } => (SenseKey::MediumError, 0x0c, 0x00),
            Self::InternalTargetFailure => (SenseKey::HardwareError, 0x44, 0x00),
            Self::UaPowerOnReset => (SenseKey::UnitAttention, 0x29, 0x00),
            Self::DataPhaseError => (SenseKey::AbortedCommand, 0x4b, 0x00),
            Self::InvalidTransferLength => (SenseKey::IllegalRequest, 0x24, 0x00),
            Self::InvalidFieldInInformationUnit => (SenseKey::IllegalRequest, 0x0e, 0x03),
            Self::Miscompare { .. } => (SenseKey::Miscompare, 0x1d, 0x00),
            Self::InvalidReleaseOfPersistentReservation => (SenseKey::IllegalRequest, 0x26, 0x04),
            Self::UaReservationsPreempted => (SenseKey::UnitAttention, 0x2a, 0x03),
            Self::UaReservationsReleased => (SenseKey::UnitAttention, 0x2a, 0x04),
            Self::UaRegistrationsPreempted => (SenseKey::UnitAttention, 0x2a, 0x05),
            Self::UaBusDeviceReset => (SenseKey::UnitAttention, 0x29, 0x03),
            Self::UaAsymmetricAccessStateChanged => (SenseKey::UnitAttention, 0x2a, 0x06),
            Self::UaCommandsClearedByAnotherInitiator => (SenseKey::UnitAttention, 0x2f, 0x00),
            Self::UaModeParametersChanged => (SenseKey::UnitAttention, 0x2a, 0x01),
            Self::NotReadyTransitioning => (SenseKey::NotReady, 0x04, 0x0a),
            Self::NotReadyUnavailable => (SenseKey::NotReady, 0x04, 0x0c),
            Self::NotReadyBecomingReady => (SenseKey::NotReady, 0x04, 0x01),
        }
    }

    fn information(self) -> Option<u64> {
        match self {
            Self::UnrecoveredReadError { lba } | Self::WriteError { lba } => Some(lba),
            Self::Miscompare { offset } => Some(offset),
            _ => None,
        }
    }

    /// Sense-key specific bytes (SKSV set) for field pointers.
    fn sense_key_specific(self) -> Option<[u8; 3]> {
        let (cd, byte, bit) = match self {
            Self::InvalidFieldInCdb { byte, bit } => (true, byte, bit),
            Self::InvalidFieldInParameterList { byte, bit } => (false, byte, bit),
            _ => return None,
        };
        let mut b0 = 0x80 | if cd { 0x40 } else { 0 };
        if let Some(bit) = bit {
            b0 |= 0x08 | (bit & 0x07);
        }
        let [hi, lo] = byte.to_be_bytes();
        Some([b0, hi, lo])
    }

    /// Encodes sense data, fixed format (0x70) or descriptor format (0x72).
    pub fn encode(self, descriptor: bool) -> Vec<u8> {
        let (key, asc, ascq) = self.code();
        if descriptor {
            let mut v = vec![0x72, key as u8, asc, ascq, 0, 0, 0, 0];
            if let Some(info) = self.information() {
                v.extend_from_slice(&[0x00, 0x0a, 0x80, 0x00]);
                v.extend_from_slice(&info.to_be_bytes());
            }
            if let Some(sks) = self.sense_key_specific() {
                v.extend_from_slice(&[0x02, 0x06, 0x00, 0x00]);
                v.extend_from_slice(&sks);
                v.push(0);
            }
            v[7] = (v.len() - 8) as u8;
            v
        } else {
            let mut v = vec![0u8; 18];
            v[0] = 0x70;
            v[2] = key as u8;
            if let Some(info) = self.information() {
                v[0] |= 0x80;
                // The fixed format INFORMATION field holds 32 bits; larger LBAs saturate.
                v[3..7].copy_from_slice(&u32::try_from(info).unwrap_or(u32::MAX).to_be_bytes());
            }
            v[7] = 10;
            v[12] = asc;
            v[13] = ascq;
            if let Some(sks) = self.sense_key_specific() {
                v[15..18].copy_from_slice(&sks);
            }
            v
        }
    }
}

/// How a command ended (SAM-5 status), with the sense reason for CHECK CONDITION.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandStatus {
    /// GOOD.
    Good,
    /// CHECK CONDITION with sense.
    CheckCondition(SenseReason),
    /// RESERVATION CONFLICT.
    ReservationConflict,
    /// BUSY.
    Busy,
    /// TASK SET FULL.
    TaskSetFull,
    /// TASK ABORTED: ended by another I_T nexus's task management (LOGICAL UNIT RESET, CLEAR
    /// TASK SET). With TAS=0 (our control page) the fabric sends no response at all.
    TaskAborted,
}

impl CommandStatus {
    /// The SAM status byte.
    pub const fn status_byte(self) -> u8 {
        match self {
            Self::Good => 0x00,
            Self::CheckCondition(_) => 0x02,
            Self::Busy => 0x08,
            Self::ReservationConflict => 0x18,
            Self::TaskSetFull => 0x28,
            Self::TaskAborted => 0x40,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_format_field_pointer() {
        let s = SenseReason::InvalidFieldInCdb {
            byte: 2,
            bit: Some(1),
        }
        .encode(false);
        assert_eq!(s.len(), 18);
        assert_eq!((s[0], s[2], s[12], s[13]), (0x70, 0x05, 0x24, 0x00));
        assert_eq!(&s[15..18], &[0x80 | 0x40 | 0x08 | 1, 0, 2]);
    }

    #[test]
    fn descriptor_format_information() {
        let s = SenseReason::UnrecoveredReadError { lba: 1 << 40 }.encode(true);
        assert_eq!((s[0], s[1], s[2], s[3]), (0x72, 0x03, 0x11, 0x00));
        assert_eq!(s[7] as usize, s.len() - 8);
        assert_eq!(&s[8..12], &[0, 0x0a, 0x80, 0]);
        assert_eq!(u64::from_be_bytes(s[12..20].try_into().unwrap()), 1 << 40);
    }

    #[test]
    fn status_bytes() {
        assert_eq!(CommandStatus::ReservationConflict.status_byte(), 0x18);
        assert_eq!(
            CommandStatus::CheckCondition(SenseReason::LbaOutOfRange).status_byte(),
            2
        );
    }
}
