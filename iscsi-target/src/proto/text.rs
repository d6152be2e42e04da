//! Text key=value pairs of Login and Text PDUs (RFC 7143 §6.1).
//!
//! Invariants:
//! - At most [`TEXT_KEYS_MAX`] pairs; names at most [`KEY_NAME_LEN_MAX`] bytes from the
//!   allowed set (letters, digits, `.`, `-`, `+`, `@`, `_`); values at most
//!   [`KEY_VALUE_LEN_MAX`] bytes of UTF-8. Anything else is a [`TextError`], never a panic.
//! - Pairs keep their order; duplicates are reported to the caller, not merged.

use crate::constants::{KEY_NAME_LEN_MAX, KEY_VALUE_LEN_MAX, TEXT_KEYS_MAX};
use nom::bytes::complete::{tag, take_while, take_while1};
use nom::Parser;

/// Why a key=value list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    /// Not `name=value` (missing `=`, bad name characters).
    #[error("malformed key=value pair")]
    Syntax,
    /// More pairs than we accept.
    #[error("more than {TEXT_KEYS_MAX} keys")]
    TooManyKeys,
    /// A key name over 63 bytes.
    #[error("key name longer than {KEY_NAME_LEN_MAX} bytes")]
    NameTooLong,
    /// A value over 8192 bytes.
    #[error("value longer than {KEY_VALUE_LEN_MAX} bytes")]
    ValueTooLong,
    /// A value that is not UTF-8.
    #[error("value is not UTF-8")]
    NotUtf8,
}

fn is_key_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'+' | b'@' | b'_')
}

type NomErr<'a> = nom::error::Error<&'a [u8]>;

/// Parses one `name=value` (without its terminating NUL).
fn pair(input: &[u8]) -> nom::IResult<&[u8], (&[u8], &[u8]), NomErr<'_>> {
    let (rest, (name, _, value)) = (
        take_while1(is_key_char),
        tag(&b"="[..]),
        take_while(|c| c != 0),
    )
        .parse(input)?;
    Ok((rest, (name, value)))
}

/// Parses a NUL-separated list of pairs. Empty entries (consecutive NULs) are skipped.
///
/// # Errors
/// See [`TextError`].
pub fn parse(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    let mut out = Vec::new();
    for entry in data.split(|&b| b == 0) {
        if entry.is_empty() {
            continue;
        }
        if out.len() == TEXT_KEYS_MAX {
            return Err(TextError::TooManyKeys);
        }
        let (rest, (name, value)) = pair(entry).map_err(|_| TextError::Syntax)?;
        if !rest.is_empty() {
            return Err(TextError::Syntax);
        }
        if name.len() > KEY_NAME_LEN_MAX {
            return Err(TextError::NameTooLong);
        }
        if value.len() > KEY_VALUE_LEN_MAX {
            return Err(TextError::ValueTooLong);
        }
        let name = std::str::from_utf8(name)
            .expect("key chars are ASCII")
            .to_owned();
        let value = std::str::from_utf8(value)
            .map_err(|_| TextError::NotUtf8)?
            .to_owned();
        out.push((name, value));
    }
    Ok(out)
}

/// Appends `name=value\0`.
pub fn push(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    out.push(b'=');
    out.extend_from_slice(value.as_bytes());
    out.push(0);
}

/// Encodes a list of pairs.
pub fn encode(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        push(&mut out, k, v);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_pairs_and_tolerates_missing_final_nul() {
        let v = parse(b"InitiatorName=iqn.x:y\0SessionType=Normal").unwrap();
        assert_eq!(
            v,
            vec![
                ("InitiatorName".into(), "iqn.x:y".into()),
                ("SessionType".into(), "Normal".into())
            ]
        );
        assert_eq!(parse(b"A=\0").unwrap(), vec![("A".into(), String::new())]);
        assert_eq!(parse(b"A=1=2\0").unwrap(), vec![("A".into(), "1=2".into())]);
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(parse(b"NoEquals\0"), Err(TextError::Syntax));
        assert_eq!(parse(b"=value\0"), Err(TextError::Syntax));
        assert_eq!(parse(b"Bad Key=1\0"), Err(TextError::Syntax));
        let long = format!("{}=1", "K".repeat(64));
        assert_eq!(parse(long.as_bytes()), Err(TextError::NameTooLong));
        let many: Vec<u8> = (0..300)
            .flat_map(|i| format!("X-k{i}=v\0").into_bytes())
            .collect();
        assert_eq!(parse(&many), Err(TextError::TooManyKeys));
        assert_eq!(parse(b"A=\xff\0"), Err(TextError::NotUtf8));
    }

    proptest! {
        #[test]
        fn round_trip(pairs in proptest::collection::vec(("[A-Za-z][A-Za-z0-9.+@_-]{0,20}", "[ -~]{0,40}"), 0..20)) {
            let pairs: Vec<(String, String)> = pairs;
            prop_assert_eq!(parse(&encode(&pairs)).unwrap(), pairs);
        }

        #[test]
        fn total(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&bytes);
        }
    }
}
