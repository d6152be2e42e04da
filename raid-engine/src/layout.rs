//! Where a volume's bytes live: extents, stripe rows, columns and placement sets.
//!
//! A volume is cut into extents of `rows_per_extent` stripe rows; a row holds `k * chunk`
//! bytes of logical data in `k` data columns, plus `m` parity columns. Column `i` of every row
//! of an extent lives at position `i` of the extent's placement set (`k + m` distinct
//! controllers). Placement sets are rotated from extent to extent, so primaries (position 0
//! when it is up) and parity positions spread over every controller.
//!
//! Invariants:
//! - Logical byte `b` of a volume maps to exactly one (extent, row, column, offset) and back;
//!   [`Layout::spans`] covers a byte range exactly, in order, with no overlap (property test).
//! - A placement set has `k + m` distinct controllers; placement needs at least `k + m`
//!   controllers.
//! - Extents are addressed by [`ExtentRef`], the unit a later copy-on-write extent map will
//!   share between volumes (snapshots, clones): nothing here assumes an extent belongs to one
//!   volume.

use crate::codec::{CodecKind, SHARDS_MAX};

/// A controller's cluster-wide id.
pub type ControllerId = u32;

/// Why a geometry is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// Bad `k`/`m`.
    #[error("k={k} m={m} is not a supported geometry: need k >= 1, m >= 1, k + m <= {SHARDS_MAX}")]
    Geometry {
        /// Data columns.
        k: usize,
        /// Parity columns.
        m: usize,
    },
    /// Chunk size not a power of two between 4 KiB and 1 MiB.
    #[error("chunk size {0} must be a power of two from 4096 to 1048576 bytes")]
    Chunk(u32),
    /// Too few controllers to place `k + m` distinct shards.
    #[error("{have} controllers cannot hold k + m = {need} shards on distinct controllers; add controllers or lower k/m")]
    TooFewControllers {
        /// Controllers available.
        have: usize,
        /// Needed.
        need: usize,
    },
    /// Write quorum outside `k..=k+m`.
    #[error("write_quorum {q} must be between k={k} and k+m={n}")]
    Quorum {
        /// Requested quorum.
        q: usize,
        /// Data columns.
        k: usize,
        /// Width.
        n: usize,
    },
}

/// A volume's coding geometry (fixed for its life: part of the on-disk format).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Data columns per row.
    pub k: usize,
    /// Parity columns per row.
    pub m: usize,
    /// Bytes per chunk (one column of one row).
    pub chunk_bytes: u32,
    /// Rows per extent.
    pub rows_per_extent: u32,
    /// Erasure code.
    pub codec: CodecKind,
    /// Shards that must hold a write before it is acknowledged.
    pub write_quorum: usize,
}

/// The logical size of an extent (`../shared/DESIGN.md` default: 64 MiB).
pub const EXTENT_BYTES_DEFAULT: u64 = 64 << 20;

/// Rows per extent for `k` data chunks of `chunk_bytes` each, so an extent holds about
/// [`EXTENT_BYTES_DEFAULT`] of logical data (at least one row).
pub fn default_rows_per_extent(k: usize, chunk_bytes: u32) -> u32 {
    rows_per_extent(k, chunk_bytes, EXTENT_BYTES_DEFAULT)
}

/// Rows per extent for `k` data chunks of `chunk_bytes` each, so an extent holds about
/// `extent_bytes` of logical data (at least one row).
pub fn rows_per_extent(k: usize, chunk_bytes: u32, extent_bytes: u64) -> u32 {
    let row_bytes = (k as u64 * u64::from(chunk_bytes)).max(1);
    u32::try_from((extent_bytes / row_bytes).max(1)).unwrap_or(u32::MAX)
}

impl Geometry {
    /// A checked geometry; `write_quorum` defaults to `max(k, k + m - 1)`.
    ///
    /// # Errors
    /// [`LayoutError`] naming the bad value.
    pub fn new(
        k: usize,
        m: usize,
        chunk_bytes: u32,
        rows_per_extent: u32,
        codec: CodecKind,
        write_quorum: Option<usize>,
    ) -> Result<Self, LayoutError> {
        if k == 0 || m == 0 || k + m > SHARDS_MAX {
            return Err(LayoutError::Geometry { k, m });
        }
        if !chunk_bytes.is_power_of_two() || !(4096..=1 << 20).contains(&chunk_bytes) {
            return Err(LayoutError::Chunk(chunk_bytes));
        }
        let q = write_quorum.unwrap_or(k.max(k + m - 1));
        if q < k || q > k + m {
            return Err(LayoutError::Quorum { q, k, n: k + m });
        }
        Ok(Self {
            k,
            m,
            chunk_bytes,
            rows_per_extent: rows_per_extent.max(1),
            codec,
            write_quorum: q,
        })
    }
    /// Shards per row (`k + m`).
    pub fn width(&self) -> usize {
        self.k + self.m
    }
    /// Logical bytes per row.
    pub fn row_bytes(&self) -> u64 {
        self.k as u64 * u64::from(self.chunk_bytes)
    }
    /// Logical bytes per extent.
    pub fn extent_bytes(&self) -> u64 {
        self.row_bytes() * u64::from(self.rows_per_extent)
    }
}

/// An extent: the placement unit. Shared-by-reference later (copy-on-write), so it is named
/// by its own id, not by (volume, index).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExtentRef(pub u64);

/// One row's part of a byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowSpan {
    /// Extent index within the volume.
    pub extent: u64,
    /// Row within the extent.
    pub row: u32,
    /// Offset within the row's logical data.
    pub offset_in_row: u32,
    /// Bytes.
    pub len: u32,
    /// Offset of this span within the whole request.
    pub request_offset: u64,
}

/// A volume's layout: size plus geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Logical size in bytes.
    pub size_bytes: u64,
    /// Geometry.
    pub geometry: Geometry,
}

impl Layout {
    /// Number of extents (the last may be partly beyond the volume's end).
    pub fn extent_count(&self) -> u64 {
        self.size_bytes.div_ceil(self.geometry.extent_bytes())
    }

    /// Splits `[offset, offset + len)` into per-row spans, in order.
    pub fn spans(&self, offset: u64, len: u64) -> Vec<RowSpan> {
        let row_bytes = self.geometry.row_bytes();
        let rows = u64::from(self.geometry.rows_per_extent);
        let mut out = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let global_row = pos / row_bytes;
            let in_row = pos % row_bytes;
            let n = (row_bytes - in_row).min(end - pos);
            out.push(RowSpan {
                extent: global_row / rows,
                row: (global_row % rows) as u32,
                offset_in_row: in_row as u32,
                len: n as u32,
                request_offset: pos - offset,
            });
            pos += n;
        }
        out
    }
}

/// The placement set of extent `index` over `controllers` (sorted, distinct): `width`
/// controllers starting at a rotation of `index`, so consecutive extents start on consecutive
/// controllers and parity lands on every controller in turn.
///
/// # Errors
/// [`LayoutError::TooFewControllers`].
pub fn rotated_placement(
    index: u64,
    controllers: &[ControllerId],
    width: usize,
) -> Result<Vec<ControllerId>, LayoutError> {
    let n = controllers.len();
    if n < width {
        return Err(LayoutError::TooFewControllers {
            have: n,
            need: width,
        });
    }
    let start = (index % n as u64) as usize;
    Ok((0..width).map(|i| controllers[(start + i) % n]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn geo(k: usize, m: usize) -> Geometry {
        Geometry::new(k, m, 4096, 4, CodecKind::GfMatrix, None).unwrap()
    }

    #[test]
    fn quorum_default_and_bounds() {
        assert_eq!(geo(2, 1).write_quorum, 2);
        assert_eq!(geo(3, 2).write_quorum, 4);
        assert_eq!(geo(4, 1).write_quorum, 4);
        assert!(matches!(
            Geometry::new(3, 2, 4096, 4, CodecKind::GfMatrix, Some(2)),
            Err(LayoutError::Quorum { .. })
        ));
        assert!(matches!(
            Geometry::new(3, 2, 5000, 4, CodecKind::GfMatrix, None),
            Err(LayoutError::Chunk(5000))
        ));
        assert!(Geometry::new(12, 5, 4096, 4, CodecKind::GfMatrix, None).is_err());
    }

    #[test]
    fn placement_rotates_primaries_and_parity_over_all_controllers() {
        let ctrls = [1, 2, 3, 4, 5];
        let mut primaries = std::collections::BTreeMap::new();
        let mut parity = std::collections::BTreeMap::new();
        for e in 0..10 {
            let set = rotated_placement(e, &ctrls, 5).unwrap();
            let mut sorted = set.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), 5);
            *primaries.entry(set[0]).or_insert(0) += 1;
            for c in &set[3..] {
                *parity.entry(*c).or_insert(0) += 1;
            }
        }
        assert!(primaries.values().all(|&n| n == 2), "{primaries:?}");
        assert!(parity.values().all(|&n| n == 4), "{parity:?}");
        assert_eq!(
            rotated_placement(0, &[1, 2], 3),
            Err(LayoutError::TooFewControllers { have: 2, need: 3 })
        );
    }

    proptest! {
        /// Spans cover the range exactly and in order, each inside one row.
        #[test]
        fn spans_cover_exactly(k in 1usize..5, off in 0u64..1_000_000, len in 0u64..200_000) {
            let l = Layout { size_bytes: 2_000_000, geometry: geo(k, 1) };
            let spans = l.spans(off, len);
            let mut at = 0u64;
            let row_bytes = l.geometry.row_bytes();
            for s in &spans {
                prop_assert_eq!(s.request_offset, at);
                prop_assert!(u64::from(s.offset_in_row) + u64::from(s.len) <= row_bytes);
                let global = (s.extent * 4 + u64::from(s.row)) * row_bytes + u64::from(s.offset_in_row);
                prop_assert_eq!(global, off + at);
                at += u64::from(s.len);
            }
            prop_assert_eq!(at, len);
        }
    }
}
