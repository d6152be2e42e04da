//! CHAP with MD5 (CHAP_A=5), one-way and mutual (RFC 7143 §12.1.3, RFC 1994).
//!
//! Invariants:
//! - Challenges are 16 bytes from the OS RNG; identifiers are random; neither is reused within a
//!   connection.
//! - Responses are compared in constant time.
//! - An initiator challenge equal to ours (a reflection attack) is refused.
//! - Binary values decode from `0x` hex or `0b` base64 (RFC 7143 §6.1); anything else is invalid.

use md5::{Digest, Md5};
use subtle::ConstantTimeEq;

/// One CHAP identity: the name and secret a peer must prove.
#[derive(Clone, PartialEq, Eq)]
pub struct ChapSecret {
    /// CHAP_N.
    pub user: String,
    /// Shared secret.
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for ChapSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChapSecret")
            .field("user", &self.user)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// CHAP settings of a target (or of discovery).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChapConfig {
    /// What initiators must prove.
    pub initiator: ChapSecret,
    /// What the target proves when the initiator asks (mutual CHAP).
    pub mutual: Option<ChapSecret>,
}

/// CHAP challenge length we send.
pub const CHALLENGE_LEN: usize = 16;
/// Longest challenge or response value we accept from an initiator.
pub const VALUE_LEN_MAX: usize = 1024;

/// MD5(id || secret || challenge).
pub fn response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

/// Constant-time check of a received response.
pub fn verify(id: u8, secret: &[u8], challenge: &[u8], received: &[u8]) -> bool {
    let want = response(id, secret, challenge);
    received.len() == want.len() && bool::from(want.ct_eq(received))
}

/// Fresh random bytes.
///
/// # Panics
/// If the OS RNG fails (no safe way to authenticate without it).
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("the OS random number generator is available");
    b
}

/// Encodes bytes as `0x` hex.
pub fn encode_hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(2 + 2 * b.len());
    s.push_str("0x");
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

/// Decodes a binary value (`0x` hex or `0b` base64), bounded by [`VALUE_LEN_MAX`].
pub fn decode_binary(s: &str) -> Option<Vec<u8>> {
    let (prefix, body) = (s.get(..2)?, s.get(2..)?);
    let out = match prefix {
        "0x" | "0X" => {
            if body.is_empty() || body.len() > 2 * VALUE_LEN_MAX {
                return None;
            }
            // An odd number of digits has an implied leading zero.
            let padded = if body.len() % 2 == 1 {
                format!("0{body}")
            } else {
                body.to_owned()
            };
            (0..padded.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&padded[i..i + 2], 16).ok())
                .collect::<Option<Vec<u8>>>()?
        }
        "0b" | "0B" => decode_base64(body)?,
        _ => return None,
    };
    (!out.is_empty() && out.len() <= VALUE_LEN_MAX).then_some(out)
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    if s.len() > 4 * VALUE_LEN_MAX / 3 + 4 || !s.len().is_multiple_of(4) {
        return None;
    }
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::new();
    let bytes = s.as_bytes();
    for (ci, chunk) in bytes.chunks(4).enumerate() {
        let last = ci == bytes.len() / 4 - 1;
        let pads = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pads > 2 || (pads > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &chunk[..4 - pads] {
            n = n << 6 | val(c)?;
        }
        n <<= 6 * pads as u32;
        let b = n.to_be_bytes();
        out.extend_from_slice(&b[1..4 - pads]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_response_matches_rfc1994_construction() {
        // Computed independently: MD5(0x01 || "secret" || 0x00..0x0f).
        let challenge: Vec<u8> = (0u8..16).collect();
        let r = response(1, b"secret", &challenge);
        let mut h = Md5::new();
        h.update([1u8]);
        h.update(b"secret");
        h.update(&challenge);
        assert_eq!(r.to_vec(), h.finalize().to_vec());
        assert!(verify(1, b"secret", &challenge, &r));
        assert!(!verify(2, b"secret", &challenge, &r));
        assert!(!verify(1, b"secret", &challenge, &r[..15]));
    }

    #[test]
    fn binary_values() {
        assert_eq!(decode_binary("0x0a0B"), Some(vec![0x0a, 0x0b]));
        assert_eq!(decode_binary("0xabc"), Some(vec![0x0a, 0xbc]));
        assert_eq!(decode_binary("0bAQID"), Some(vec![1, 2, 3]));
        assert_eq!(decode_binary("0bAQI="), Some(vec![1, 2]));
        assert_eq!(decode_binary("0bAQ=="), Some(vec![1]));
        assert_eq!(decode_binary("0x"), None);
        assert_eq!(decode_binary("0xzz"), None);
        assert_eq!(decode_binary("1234"), None);
        assert_eq!(decode_binary("0bA=AA"), None);
        assert_eq!(encode_hex(&[0, 255]), "0x00ff");
    }
}
