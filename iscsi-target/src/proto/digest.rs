//! CRC32C header and data digests (RFC 7143 §13.1, Appendix B.4).
//!
//! The crc32c crate uses the SSE4.2 / ARMv8 CRC instructions when present. The digest is sent
//! least significant byte first, as RFC 7143's examples show.

/// CRC32C of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// CRC32C of several slices, as if concatenated.
pub fn crc32c_parts(parts: &[&[u8]]) -> u32 {
    parts.iter().fold(0, |crc, p| crc32c::crc32c_append(crc, p))
}

/// The 4 wire bytes of a digest.
pub fn to_wire(crc: u32) -> [u8; 4] {
    crc.to_le_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7143 Appendix B.4 test vectors.
    #[test]
    fn rfc_vectors() {
        assert_eq!(to_wire(crc32c(&[0u8; 32])), [0xaa, 0x36, 0x91, 0x8a]);
        assert_eq!(to_wire(crc32c(&[0xffu8; 32])), [0x43, 0xab, 0xa8, 0x62]);
        let inc: Vec<u8> = (0u8..32).collect();
        assert_eq!(to_wire(crc32c(&inc)), [0x4e, 0x79, 0xdd, 0x46]);
        let dec: Vec<u8> = (0u8..32).rev().collect();
        assert_eq!(to_wire(crc32c(&dec)), [0x5c, 0xdb, 0x3f, 0x11]);
        assert_eq!(crc32c_parts(&[&inc[..5], &inc[5..]]), crc32c(&inc));
    }
}
