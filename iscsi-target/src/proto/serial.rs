//! Serial number arithmetic for CmdSN, StatSN and friends (RFC 1982, SERIAL_BITS = 32), as
//! RFC 7143 §4.2.2.1 requires: comparisons stay correct across the 2^32 wrap.

use std::cmp::Ordering;

/// A 32-bit sequence number compared with serial arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Sn(pub u32);

impl Sn {
    /// `self + n` modulo 2^32.
    pub fn plus(self, n: u32) -> Self {
        Self(self.0.wrapping_add(n))
    }

    /// Serial comparison; `None` when the two are exactly 2^31 apart (undefined by RFC 1982).
    pub fn cmp_serial(self, other: Self) -> Option<Ordering> {
        let d = other.0.wrapping_sub(self.0);
        match d {
            0 => Some(Ordering::Equal),
            0x8000_0000 => None,
            d if d < 0x8000_0000 => Some(Ordering::Less),
            _ => Some(Ordering::Greater),
        }
    }

    /// `self < other` in serial arithmetic.
    pub fn lt(self, other: Self) -> bool {
        self.cmp_serial(other) == Some(Ordering::Less)
    }

    /// `self <= other` in serial arithmetic.
    pub fn le(self, other: Self) -> bool {
        matches!(
            self.cmp_serial(other),
            Some(Ordering::Less | Ordering::Equal)
        )
    }

    /// Whether `self` lies in the window `[lo, hi]` (serial).
    pub fn in_window(self, lo: Self, hi: Self) -> bool {
        lo.le(self) && self.le(hi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn wraps() {
        assert!(Sn(u32::MAX).lt(Sn(0)));
        assert!(Sn(u32::MAX - 5).lt(Sn(10)));
        assert!(!Sn(10).lt(Sn(u32::MAX - 5)));
        assert!(Sn(0).in_window(Sn(u32::MAX - 1), Sn(126)));
        assert!(!Sn(127).in_window(Sn(u32::MAX - 1), Sn(126)));
        assert_eq!(Sn(0).cmp_serial(Sn(0x8000_0000)), None);
    }

    proptest! {
        /// For any base and offsets within half the space, serial order equals offset order.
        #[test]
        fn order_matches_offsets(base in any::<u32>(), a in 0u32..0x7fff_ffff, b in 0u32..0x7fff_ffff) {
            let (x, y) = (Sn(base).plus(a), Sn(base).plus(b));
            prop_assert_eq!(x.cmp_serial(y), Some(a.cmp(&b)));
        }

        /// A window of 128 starting anywhere contains exactly its 128 members.
        #[test]
        fn window_membership(lo in any::<u32>(), off in 0u32..1000) {
            let hi = Sn(lo).plus(127);
            prop_assert_eq!(Sn(lo).plus(off).in_window(Sn(lo), hi), off < 128);
        }
    }
}
