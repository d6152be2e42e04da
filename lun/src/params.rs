//! Parameter-list parsers (data the initiator sends after a CDB). Each returns typed values or
//! the sense reason pointing at the offending parameter byte; none can panic on any input
//! (fuzzed).
//!
//! Invariants:
//! - Lengths inside the list are checked against the bytes actually received and against the
//!   limits advertised in VPD 0xB0 before they are used.

use crate::sense::SenseReason;

/// One UNMAP block descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnmapDescriptor {
    /// First LBA.
    pub lba: u64,
    /// Number of blocks.
    pub blocks: u32,
}

/// Parses an UNMAP parameter list (SBC-3 §5.28.2).
///
/// `param_len` is the CDB's PARAMETER LIST LENGTH; `data` what was received.
///
/// # Errors
/// PARAMETER LIST LENGTH ERROR for a list shorter than its header; INVALID FIELD IN
/// PARAMETER LIST for descriptor lengths that disagree with the data or exceed the limits;
/// LBA OUT OF RANGE for a descriptor past `capacity` blocks.
pub fn unmap(
    param_len: u32,
    data: &[u8],
    capacity: u64,
    max_descriptors: u32,
    max_blocks: u64,
) -> Result<Vec<UnmapDescriptor>, SenseReason> {
    if param_len == 0 {
        return Ok(Vec::new());
    }
    let data = &data[..data.len().min(param_len as usize)];
    if data.len() < 8 {
        return Err(SenseReason::ParameterListLengthError);
    }
    let unmap_len = usize::from(u16::from_be_bytes([data[0], data[1]]));
    let desc_len = usize::from(u16::from_be_bytes([data[2], data[3]]));
    if unmap_len + 2 > data.len() || unmap_len < 6 + desc_len {
        return Err(SenseReason::InvalidFieldInParameterList { byte: 0, bit: None });
    }
    if desc_len % 16 != 0 || 8 + desc_len > data.len() {
        return Err(SenseReason::InvalidFieldInParameterList { byte: 2, bit: None });
    }
    let count = desc_len / 16;
    if count > max_descriptors as usize {
        return Err(SenseReason::InvalidFieldInParameterList { byte: 2, bit: None });
    }
    let mut out = Vec::with_capacity(count);
    let mut total: u64 = 0;
    for i in 0..count {
        let d = &data[8 + 16 * i..8 + 16 * (i + 1)];
        let lba = u64::from_be_bytes(d[..8].try_into().expect("8 bytes"));
        let blocks = u32::from_be_bytes(d[8..12].try_into().expect("4 bytes"));
        if lba
            .checked_add(u64::from(blocks))
            .is_none_or(|end| end > capacity)
        {
            return Err(SenseReason::LbaOutOfRange);
        }
        total += u64::from(blocks);
        if total > max_blocks {
            return Err(SenseReason::InvalidFieldInParameterList {
                byte: (8 + 16 * i + 8) as u16,
                bit: None,
            });
        }
        if blocks > 0 {
            out.push(UnmapDescriptor { lba, blocks });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn list(descs: &[(u64, u32)]) -> Vec<u8> {
        let mut v = vec![0u8; 8];
        for (lba, n) in descs {
            v.extend_from_slice(&lba.to_be_bytes());
            v.extend_from_slice(&n.to_be_bytes());
            v.extend_from_slice(&[0; 4]);
        }
        let dl = (v.len() - 8) as u16;
        let ul = v.len() as u16 - 2;
        v[0..2].copy_from_slice(&ul.to_be_bytes());
        v[2..4].copy_from_slice(&dl.to_be_bytes());
        v
    }

    #[test]
    fn valid_and_boundaries() {
        let l = list(&[(0, 8), (100, 0), (992, 8)]);
        assert_eq!(
            unmap(l.len() as u32, &l, 1000, 16, 1 << 20).unwrap(),
            vec![
                UnmapDescriptor { lba: 0, blocks: 8 },
                UnmapDescriptor {
                    lba: 992,
                    blocks: 8
                }
            ]
        );
        let l = list(&[(993, 8)]);
        assert_eq!(
            unmap(l.len() as u32, &l, 1000, 16, 1 << 20),
            Err(SenseReason::LbaOutOfRange)
        );
        let l = list(&[(u64::MAX, 2)]);
        assert_eq!(
            unmap(l.len() as u32, &l, 1000, 16, 1 << 20),
            Err(SenseReason::LbaOutOfRange)
        );
        assert_eq!(unmap(0, &[], 1000, 16, 1), Ok(vec![]));
        assert_eq!(
            unmap(4, &[0; 4], 1000, 16, 1),
            Err(SenseReason::ParameterListLengthError)
        );
        let l = list(&[(0, 1), (1, 1)]);
        assert!(matches!(
            unmap(l.len() as u32, &l, 1000, 1, 1 << 20),
            Err(SenseReason::InvalidFieldInParameterList { .. })
        ));
        assert!(matches!(
            unmap(l.len() as u32, &l, 1000, 16, 1),
            Err(SenseReason::InvalidFieldInParameterList { .. })
        ));
    }

    proptest! {
        #[test]
        fn total(param_len in 0u32..2000, data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = unmap(param_len, &data, 1 << 30, 64, 1 << 24);
        }
    }
}
