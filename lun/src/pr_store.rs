//! Persistent reservation state on disk, for APTPL (SPC-4 §5.12.4).
//!
//! Format (text, one record per line; names hex-encoded so any byte is safe):
//! `rainio-pr 1`, `generation N`, `aptpl 0|1`, `reg KEY ALL_TG_PT REL_PORT ISID NAME`…,
//! optional `res TYPE REL_PORT ISID NAME`, then `crc32c X` over every byte before that line.
//!
//! Invariants:
//! - A save is atomic: written to a temporary file, fsynced, renamed over the old one, and the
//!   directory fsynced, so a crash leaves the old or the new state, never a torn one.
//! - A load checks the version and the checksum; a mismatch is an error (the caller stops
//!   rather than silently forgetting reservations).

use crate::command::ItNexus;
use crate::pr::{PrState, PrType, Registration, Reservation};
use std::io::Write;
use std::path::Path;

/// Why a store could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// I/O failure.
    #[error("reservation store {path}: {source}")]
    Io {
        /// Path.
        path: String,
        /// OS error.
        source: std::io::Error,
    },
    /// Not a store this version understands, or damaged.
    #[error("reservation store {path} is damaged or from another version ({why}); move it aside to start without persisted reservations")]
    Corrupt {
        /// Path.
        path: String,
        /// What was wrong.
        why: String,
    },
}

const HEADER: &str = "rainio-pr 1";

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Serialises `state`.
pub fn encode(state: &PrState) -> String {
    let mut s = format!(
        "{HEADER}\ngeneration {}\naptpl {}\n",
        state.generation,
        u8::from(state.aptpl)
    );
    for (n, r) in &state.registrations {
        s.push_str(&format!(
            "reg {:016x} {} {} {:012x} {}\n",
            r.key,
            u8::from(r.all_tg_pt),
            n.relative_port,
            n.isid,
            hex(n.initiator_name.as_bytes())
        ));
    }
    if let Some(r) = &state.reservation {
        let h = &r.holder;
        s.push_str(&format!(
            "res {} {} {:012x} {}\n",
            r.ty.code(),
            h.relative_port,
            h.isid,
            hex(h.initiator_name.as_bytes())
        ));
    }
    let crc = crc32c::crc32c(s.as_bytes());
    s.push_str(&format!("crc32c {crc:08x}\n"));
    s
}

fn nexus(port: &str, isid: &str, name: &str) -> Option<ItNexus> {
    Some(ItNexus {
        initiator_name: String::from_utf8(unhex(name)?).ok()?,
        isid: u64::from_str_radix(isid, 16).ok()?,
        relative_port: port.parse().ok()?,
    })
}

/// Parses a serialised state.
///
/// # Errors
/// A description of the first problem found.
pub fn decode(text: &str) -> Result<PrState, String> {
    let body_end = text.rfind("crc32c ").ok_or("no checksum line")?;
    let (body, crc_line) = text.split_at(body_end);
    let want = u32::from_str_radix(crc_line.trim().trim_start_matches("crc32c "), 16)
        .map_err(|_| "bad checksum line")?;
    if crc32c::crc32c(body.as_bytes()) != want {
        return Err("checksum mismatch".into());
    }
    let mut lines = body.lines();
    if lines.next() != Some(HEADER) {
        return Err("unknown header or version".into());
    }
    let mut state = PrState::default();
    for line in lines {
        let f: Vec<&str> = line.split(' ').collect();
        match f.as_slice() {
            ["generation", g] => state.generation = g.parse().map_err(|_| "bad generation")?,
            ["aptpl", a] => state.aptpl = *a == "1",
            ["reg", key, all, port, isid, name] => {
                let n = nexus(port, isid, name).ok_or("bad registration")?;
                let key = u64::from_str_radix(key, 16).map_err(|_| "bad key")?;
                state.registrations.insert(
                    n,
                    Registration {
                        key,
                        all_tg_pt: *all == "1",
                    },
                );
            }
            ["res", ty, port, isid, name] => {
                let ty = ty
                    .parse()
                    .ok()
                    .and_then(PrType::from_code)
                    .ok_or("bad type")?;
                let holder = nexus(port, isid, name).ok_or("bad holder")?;
                state.reservation = Some(Reservation { holder, ty });
            }
            _ => return Err(format!("unknown line `{line}`")),
        }
    }
    if let Some(r) = &state.reservation {
        if !state.registrations.contains_key(&r.holder) {
            return Err("reservation holder is not registered".into());
        }
    }
    Ok(state)
}

/// Writes `state` to `path` atomically.
///
/// # Errors
/// I/O failures.
pub fn save(path: &Path, state: &PrState) -> Result<(), StoreError> {
    let io = |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(encode(state).as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok(())
}

/// Removes the store (APTPL turned off).
///
/// # Errors
/// I/O failures other than the file not existing.
pub fn remove(path: &Path) -> Result<(), StoreError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StoreError::Io {
            path: path.display().to_string(),
            source,
        }),
    }
}

/// Reads the store, if there is one.
///
/// # Errors
/// I/O failures and damaged stores.
pub fn load(path: &Path) -> Result<Option<PrState>, StoreError> {
    match std::fs::read_to_string(path) {
        Ok(text) => decode(&text).map(Some).map_err(|why| StoreError::Corrupt {
            path: path.display().to_string(),
            why,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StoreError::Io {
            path: path.display().to_string(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pr::PrOut;

    fn n(i: u64) -> ItNexus {
        ItNexus {
            initiator_name: format!("iqn.x:host {i}"),
            isid: i,
            relative_port: 3,
        }
    }

    #[test]
    fn round_trip_and_corruption() {
        let mut s = PrState::default();
        s.apply(
            &n(1),
            PrOut::Register {
                key: 0,
                sa_key: 0xabc,
                ignore: false,
                all_tg_pt: true,
                aptpl: true,
            },
        )
        .unwrap();
        s.apply(
            &n(2),
            PrOut::Register {
                key: 0,
                sa_key: 0xdef,
                ignore: false,
                all_tg_pt: false,
                aptpl: true,
            },
        )
        .unwrap();
        s.apply(
            &n(2),
            PrOut::Reserve {
                key: 0xdef,
                ty: PrType::WriteExclusiveRegistrantsOnly,
            },
        )
        .unwrap();
        let text = encode(&s);
        assert_eq!(decode(&text).unwrap(), s);
        let bad = text.replacen("abc", "abd", 1);
        assert_eq!(decode(&bad), Err("checksum mismatch".into()));
        assert!(decode("rainio-pr 2\ncrc32c 00000000\n").is_err());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.pr");
        assert_eq!(load(&p).unwrap(), None);
        save(&p, &s).unwrap();
        assert_eq!(load(&p).unwrap(), Some(s));
        remove(&p).unwrap();
        assert_eq!(load(&p).unwrap(), None);
    }
}
