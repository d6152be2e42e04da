//! Erasure coding behind one small trait, so a volume's codec is a recorded choice.
//!
//! Two implementations:
//! - [`CodecKind::ReedSolomonSimd`]: `reed-solomon-simd` (Leopard-style FFT over GF(2^16)), very
//!   fast to encode, but every decode pays a fixed transform cost.
//! - [`CodecKind::GfMatrix`]: `reed-solomon-erasure`, a systematic Vandermonde-derived matrix code
//!   over GF(2^8) that caches inverted decode matrices per erasure pattern, so repeated degraded
//!   reads with the same missing holder are cheap.
//!
//! The two produce different parity for the same data: the codec is part of a volume's on-disk
//! format and is recorded with the volume ([`CodecKind::code`]); it never changes for a volume.
//!
//! Invariants:
//! - `1 <= k`, `1 <= m`, `k + m <=` [`SHARDS_MAX`]; every shard of a call has the same non-zero,
//!   even length (a `reed-solomon-simd` requirement, kept for both so they are interchangeable).
//! - `reconstruct` with at least `k` shards present restores every missing shard, data and
//!   parity, bit for bit (property test: any `k` of `k + m`).
//! - Both codes are linear and byte-local at [`DELTA_ALIGN`] granularity: changing bytes
//!   `[off, off + n)` of one data shard by `delta` (XOR) changes bytes `[off, off + n)` of each
//!   parity shard by [`ErasureCodec::parity_delta`] of `delta`, when `off` and `n` are multiples
//!   of [`DELTA_ALIGN`] (property test). Small writes update parity with that instead of
//!   re-encoding the whole row.

use std::fmt;

/// Most shards (`k + m`) in a stripe row.
pub const SHARDS_MAX: usize = 16;

/// Which code a volume's shards use (stored with the volume).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CodecKind {
    /// `reed-solomon-simd`.
    ReedSolomonSimd,
    /// `reed-solomon-erasure` (GF(2^8), cached decode matrices).
    GfMatrix,
}

impl Default for CodecKind {
    /// The GF(2^8) matrix codec: in `cargo bench -p raid-engine --bench codec` on this project's
    /// machines it encodes faster than `reed-solomon-simd` at every measured geometry and
    /// reconstructs 50-200x faster (see docs/benchmarks.md), which is what degraded reads and
    /// rebuilds of small chunks need.
    fn default() -> Self {
        Self::GfMatrix
    }
}

impl CodecKind {
    /// The code stored on disk.
    pub fn code(self) -> u8 {
        match self {
            Self::ReedSolomonSimd => 1,
            Self::GfMatrix => 2,
        }
    }
    /// From the stored code.
    pub fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(Self::ReedSolomonSimd),
            2 => Some(Self::GfMatrix),
            _ => None,
        }
    }
    /// Name for configs and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::ReedSolomonSimd => "reed-solomon-simd",
            Self::GfMatrix => "gf8-matrix",
        }
    }
}

/// Why a coding call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// `k`/`m` outside the supported geometry.
    #[error("unsupported geometry k={k} m={m} (need k >= 1, m >= 1, k + m <= {SHARDS_MAX})")]
    Geometry {
        /// Data shards.
        k: usize,
        /// Parity shards.
        m: usize,
    },
    /// Shards of different, zero or odd lengths, or the wrong number of them.
    #[error("shards must be {expected} of one even, non-zero length")]
    Shape {
        /// Shards expected.
        expected: usize,
    },
    /// Fewer than `k` shards present.
    #[error("{present} shards present, {needed} needed to reconstruct")]
    TooFewShards {
        /// Present.
        present: usize,
        /// Needed (k).
        needed: usize,
    },
    /// The library refused (should not happen after the checks above).
    #[error("codec: {0}")]
    Library(String),
}

/// Alignment (offset and length, bytes) at which [`ErasureCodec::parity_delta`] applies:
/// `reed-solomon-simd` works on 64-byte blocks.
pub const DELTA_ALIGN: usize = 64;

/// An erasure code for one geometry.
pub trait ErasureCodec: Send + Sync + fmt::Debug {
    /// Which code this is.
    fn kind(&self) -> CodecKind;
    /// Data shards per row (`k`).
    fn data_shards(&self) -> usize;
    /// Parity shards per row (`m`).
    fn parity_shards(&self) -> usize;
    /// Computes the `m` parity shards of a row from its `k` data shards.
    ///
    /// # Errors
    /// [`CodecError::Shape`] for wrong counts or lengths.
    fn encode(&self, data: &[&[u8]], parity: &mut [Vec<u8>]) -> Result<(), CodecError>;
    /// Fills every `None` of `shards` (`k + m` entries; data first, then parity).
    ///
    /// # Errors
    /// [`CodecError::TooFewShards`] with fewer than `k` present; [`CodecError::Shape`].
    fn reconstruct(&self, shards: &mut [Option<Vec<u8>>]) -> Result<(), CodecError>;
    /// The change of each parity shard when data shard `col` changes by `delta` (XOR) over a
    /// [`DELTA_ALIGN`]-aligned byte range: the parity of a row that is `delta` in `col` and
    /// zero elsewhere (the codes are linear). Returns `m` buffers of `delta.len()` bytes.
    ///
    /// # Errors
    /// [`CodecError::Shape`] for `col >= k` or a length that is not a non-zero multiple of
    /// [`DELTA_ALIGN`].
    fn parity_delta(&self, col: usize, delta: &[u8]) -> Result<Vec<Vec<u8>>, CodecError> {
        let (k, m) = (self.data_shards(), self.parity_shards());
        check_delta(k, col, delta)?;
        let zero = vec![0u8; delta.len()];
        let refs: Vec<&[u8]> = (0..k)
            .map(|c| if c == col { delta } else { zero.as_slice() })
            .collect();
        let mut parity = vec![vec![0u8; delta.len()]; m];
        self.encode(&refs, &mut parity)?;
        Ok(parity)
    }
}

/// Refuses a parity delta of a column outside `0..k`, or empty or unaligned.
fn check_delta(k: usize, col: usize, delta: &[u8]) -> Result<(), CodecError> {
    if col >= k || delta.is_empty() || !delta.len().is_multiple_of(DELTA_ALIGN) {
        return Err(CodecError::Shape { expected: k });
    }
    Ok(())
}

/// A codec of `kind` for `k` data and `m` parity shards.
///
/// # Errors
/// [`CodecError::Geometry`].
pub fn new_codec(kind: CodecKind, k: usize, m: usize) -> Result<Box<dyn ErasureCodec>, CodecError> {
    if k == 0 || m == 0 || k + m > SHARDS_MAX {
        return Err(CodecError::Geometry { k, m });
    }
    Ok(match kind {
        CodecKind::ReedSolomonSimd => Box::new(RsSimd { k, m }),
        CodecKind::GfMatrix => Box::new(GfMatrix {
            k,
            m,
            rs: reed_solomon_erasure::galois_8::ReedSolomon::new(k, m)
                .map_err(|e| CodecError::Library(format!("{e:?}")))?,
        }),
    })
}

fn check_encode(
    k: usize,
    m: usize,
    data: &[&[u8]],
    parity: &[Vec<u8>],
) -> Result<usize, CodecError> {
    let len = data.first().map_or(0, |d| d.len());
    let ok = data.len() == k
        && parity.len() == m
        && len > 0
        && len.is_multiple_of(2)
        && data.iter().all(|d| d.len() == len)
        && parity.iter().all(|p| p.len() == len);
    if ok {
        Ok(len)
    } else {
        Err(CodecError::Shape { expected: k + m })
    }
}

fn check_reconstruct(k: usize, m: usize, shards: &[Option<Vec<u8>>]) -> Result<usize, CodecError> {
    if shards.len() != k + m {
        return Err(CodecError::Shape { expected: k + m });
    }
    let present: Vec<usize> = shards.iter().flatten().map(Vec::len).collect();
    if present.len() < k {
        return Err(CodecError::TooFewShards {
            present: present.len(),
            needed: k,
        });
    }
    let len = present[0];
    if len == 0 || !len.is_multiple_of(2) || present.iter().any(|&l| l != len) {
        return Err(CodecError::Shape { expected: k + m });
    }
    Ok(len)
}

/// `reed-solomon-simd`.
#[derive(Debug)]
struct RsSimd {
    k: usize,
    m: usize,
}

impl ErasureCodec for RsSimd {
    fn kind(&self) -> CodecKind {
        CodecKind::ReedSolomonSimd
    }
    fn data_shards(&self) -> usize {
        self.k
    }
    fn parity_shards(&self) -> usize {
        self.m
    }
    fn encode(&self, data: &[&[u8]], parity: &mut [Vec<u8>]) -> Result<(), CodecError> {
        let len = check_encode(self.k, self.m, data, parity)?;
        let lib = |e: reed_solomon_simd::Error| CodecError::Library(e.to_string());
        let mut enc =
            reed_solomon_simd::ReedSolomonEncoder::new(self.k, self.m, len).map_err(lib)?;
        for d in data {
            enc.add_original_shard(d).map_err(lib)?;
        }
        let out = enc.encode().map_err(lib)?;
        for (p, r) in parity.iter_mut().zip(out.recovery_iter()) {
            p.copy_from_slice(r);
        }
        Ok(())
    }
    fn reconstruct(&self, shards: &mut [Option<Vec<u8>>]) -> Result<(), CodecError> {
        let len = check_reconstruct(self.k, self.m, shards)?;
        let lib = |e: reed_solomon_simd::Error| CodecError::Library(e.to_string());
        if shards[..self.k].iter().any(Option::is_none) {
            let mut dec =
                reed_solomon_simd::ReedSolomonDecoder::new(self.k, self.m, len).map_err(lib)?;
            for (i, s) in shards[..self.k].iter().enumerate() {
                if let Some(s) = s {
                    dec.add_original_shard(i, s).map_err(lib)?;
                }
            }
            for (j, s) in shards[self.k..].iter().enumerate() {
                if let Some(s) = s {
                    dec.add_recovery_shard(j, s).map_err(lib)?;
                }
            }
            let out = dec.decode().map_err(lib)?;
            let restored: Vec<(usize, Vec<u8>)> = out
                .restored_original_iter()
                .map(|(i, d)| (i, d.to_vec()))
                .collect();
            for (i, d) in restored {
                shards[i] = Some(d);
            }
        }
        // The decoder restores data only: missing parity is re-encoded from the full data.
        if shards[self.k..].iter().any(Option::is_none) {
            let data: Vec<&[u8]> = shards[..self.k]
                .iter()
                .map(|s| s.as_deref().expect("data restored"))
                .collect();
            let mut parity = vec![vec![0u8; len]; self.m];
            self.encode(&data, &mut parity)?;
            for (slot, p) in shards[self.k..].iter_mut().zip(parity) {
                if slot.is_none() {
                    *slot = Some(p);
                }
            }
        }
        Ok(())
    }
}

/// `reed-solomon-erasure` over GF(2^8).
struct GfMatrix {
    k: usize,
    m: usize,
    rs: reed_solomon_erasure::galois_8::ReedSolomon,
}

impl fmt::Debug for GfMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GfMatrix")
            .field("k", &self.k)
            .field("m", &self.m)
            .finish()
    }
}

impl ErasureCodec for GfMatrix {
    fn kind(&self) -> CodecKind {
        CodecKind::GfMatrix
    }
    fn data_shards(&self) -> usize {
        self.k
    }
    fn parity_shards(&self) -> usize {
        self.m
    }
    fn encode(&self, data: &[&[u8]], parity: &mut [Vec<u8>]) -> Result<(), CodecError> {
        check_encode(self.k, self.m, data, parity)?;
        self.rs
            .encode_sep(data, parity)
            .map_err(|e| CodecError::Library(format!("{e:?}")))
    }
    /// Parity is linear in each column: a parity column's change is its coefficient for
    /// `col` times the delta, one multiplication over the delta's bytes (the default encodes
    /// a whole row of zeros around it). The library overwrites the parity for column 0 and
    /// adds into it for the others, so it starts zeroed.
    fn parity_delta(&self, col: usize, delta: &[u8]) -> Result<Vec<Vec<u8>>, CodecError> {
        check_delta(self.k, col, delta)?;
        let mut parity = vec![vec![0u8; delta.len()]; self.m];
        self.rs
            .encode_single_sep(col, delta, &mut parity)
            .map_err(|e| CodecError::Library(format!("{e:?}")))?;
        Ok(parity)
    }
    fn reconstruct(&self, shards: &mut [Option<Vec<u8>>]) -> Result<(), CodecError> {
        check_reconstruct(self.k, self.m, shards)?;
        self.rs
            .reconstruct(shards)
            .map_err(|e| CodecError::Library(format!("{e:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn row(k: usize, len: usize, seed: u8) -> Vec<Vec<u8>> {
        (0..k)
            .map(|i| {
                (0..len)
                    .map(|j| (j as u8).wrapping_mul(31).wrapping_add(seed ^ i as u8))
                    .collect()
            })
            .collect()
    }

    #[test]
    fn geometry_and_shape_are_checked() {
        assert!(new_codec(CodecKind::GfMatrix, 0, 1).is_err());
        assert!(new_codec(CodecKind::ReedSolomonSimd, 12, 5).is_err());
        let c = new_codec(CodecKind::GfMatrix, 2, 1).unwrap();
        let d = row(2, 64, 1);
        let refs: Vec<&[u8]> = d.iter().map(Vec::as_slice).collect();
        assert!(matches!(
            c.encode(&refs, &mut [vec![0; 63]]),
            Err(CodecError::Shape { .. })
        ));
        let mut shards = vec![Some(d[0].clone()), None, None];
        assert_eq!(
            c.reconstruct(&mut shards),
            Err(CodecError::TooFewShards {
                present: 1,
                needed: 2
            })
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Any k of the k + m shards restore every shard, for both codecs and many geometries.
        #[test]
        fn any_k_of_n_restore_the_row(
            kind in prop_oneof![Just(CodecKind::ReedSolomonSimd), Just(CodecKind::GfMatrix)],
            (k, m) in (1usize..=10, 1usize..=6).prop_filter("k+m<=16", |(k, m)| k + m <= SHARDS_MAX),
            half_len in 1usize..600,
            seed in any::<u8>(),
            lost_mask in any::<u16>(),
        ) {
            let len = 2 * half_len;
            let codec = new_codec(kind, k, m).unwrap();
            let data = row(k, len, seed);
            let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
            let mut parity = vec![vec![0u8; len]; m];
            codec.encode(&refs, &mut parity).unwrap();
            let full: Vec<Vec<u8>> = data.iter().chain(parity.iter()).cloned().collect();
            // Lose up to m shards chosen by the mask.
            let mut shards: Vec<Option<Vec<u8>>> = full.iter().cloned().map(Some).collect();
            let mut lost = 0;
            for (i, s) in shards.iter_mut().enumerate() {
                if lost < m && lost_mask & (1 << i) != 0 {
                    *s = None;
                    lost += 1;
                }
            }
            codec.reconstruct(&mut shards).unwrap();
            let restored: Vec<Vec<u8>> = shards.into_iter().map(Option::unwrap).collect();
            prop_assert_eq!(restored, full);
        }

        /// Rewriting an aligned range of one data shard and XOR-ing the parity delta of the
        /// change into the old parity gives exactly the parity of the new row.
        #[test]
        fn parity_delta_of_a_range_equals_re_encoding(
            kind in prop_oneof![Just(CodecKind::ReedSolomonSimd), Just(CodecKind::GfMatrix)],
            (k, m) in (1usize..=6, 1usize..=4),
            blocks in 1usize..24,
            (first, count) in (0usize..24, 1usize..24),
            col_pick in any::<usize>(),
            seed in any::<u8>(),
        ) {
            let len = blocks * DELTA_ALIGN;
            let first = first % blocks;
            let count = count.min(blocks - first);
            let (off, n) = (first * DELTA_ALIGN, count * DELTA_ALIGN);
            let col = col_pick % k;
            let codec = new_codec(kind, k, m).unwrap();
            let old = row(k, len, seed);
            let refs: Vec<&[u8]> = old.iter().map(Vec::as_slice).collect();
            let mut parity = vec![vec![0u8; len]; m];
            codec.encode(&refs, &mut parity).unwrap();
            let mut new = old.clone();
            for (i, b) in new[col][off..off + n].iter_mut().enumerate() {
                *b = b.wrapping_mul(7).wrapping_add(i as u8) ^ seed;
            }
            let delta: Vec<u8> = old[col][off..off + n]
                .iter()
                .zip(&new[col][off..off + n])
                .map(|(a, b)| a ^ b)
                .collect();
            let pd = codec.parity_delta(col, &delta).unwrap();
            for (p, d) in parity.iter_mut().zip(&pd) {
                for (x, y) in p[off..off + n].iter_mut().zip(d) {
                    *x ^= y;
                }
            }
            let refs: Vec<&[u8]> = new.iter().map(Vec::as_slice).collect();
            let mut want = vec![vec![0u8; len]; m];
            codec.encode(&refs, &mut want).unwrap();
            prop_assert_eq!(parity, want);
        }
    }

    #[test]
    fn parity_delta_refuses_unaligned_ranges_and_bad_columns() {
        let c = new_codec(CodecKind::GfMatrix, 2, 1).unwrap();
        assert!(c.parity_delta(0, &[1; 60]).is_err());
        assert!(c.parity_delta(2, &[1; 64]).is_err());
        assert!(c.parity_delta(0, &[]).is_err());
        assert_eq!(c.parity_delta(1, &[0; 128]).unwrap(), vec![vec![0; 128]]);
    }
}
