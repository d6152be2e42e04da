//! Operational parameter negotiation (RFC 7143 §6.2, §13): each key with its result function.
//!
//! Invariants:
//! - The target only lowers numeric values it is offered (min functions), answers boolean keys
//!   with the AND/OR result, and picks from offered lists; out-of-range values are answered
//!   `Reject`, unknown keys `NotUnderstood`, session-only keys in discovery `Irrelevant`.
//! - Only keys the initiator offered are answered, plus our own declarative
//!   MaxRecvDataSegmentLength once (allowed by RFC 7143 and expected by Linux and Windows).
//! - Responses are computed after every key of a request is applied, so FirstBurstLength never
//!   exceeds MaxBurstLength whatever the key order.

use crate::constants::{FIRST_BURST_MAX, MAX_BURST_MAX, OUTSTANDING_R2T_MAX, RECV_DSL_MAX};

/// Negotiated session and connection parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionParams {
    /// HeaderDigest=CRC32C.
    pub header_digest: bool,
    /// DataDigest=CRC32C.
    pub data_digest: bool,
    /// MaxConnections.
    pub max_connections: u16,
    /// InitialR2T.
    pub initial_r2t: bool,
    /// ImmediateData.
    pub immediate_data: bool,
    /// MaxBurstLength.
    pub max_burst: u32,
    /// FirstBurstLength.
    pub first_burst: u32,
    /// DefaultTime2Wait.
    pub time2wait: u16,
    /// DefaultTime2Retain.
    pub time2retain: u16,
    /// MaxOutstandingR2T.
    pub max_outstanding_r2t: u16,
    /// DataPDUInOrder.
    pub data_pdu_in_order: bool,
    /// DataSequenceInOrder.
    pub data_sequence_in_order: bool,
    /// ErrorRecoveryLevel.
    pub erl: u8,
    /// The initiator's MaxRecvDataSegmentLength: the largest data segment we may send.
    pub initiator_mrdsl: u32,
    /// Our MaxRecvDataSegmentLength: the largest data segment we accept.
    pub target_mrdsl: u32,
}

impl SessionParams {
    /// The operational parameters as RFC 7143 key names and values, for operators.
    pub fn key_values(&self) -> Vec<(String, String)> {
        let yn = |b: bool| if b { "Yes" } else { "No" }.to_string();
        let digest = |b: bool| if b { "CRC32C" } else { "None" }.to_string();
        vec![
            ("HeaderDigest".into(), digest(self.header_digest)),
            ("DataDigest".into(), digest(self.data_digest)),
            ("MaxConnections".into(), self.max_connections.to_string()),
            ("InitialR2T".into(), yn(self.initial_r2t)),
            ("ImmediateData".into(), yn(self.immediate_data)),
            ("MaxBurstLength".into(), self.max_burst.to_string()),
            ("FirstBurstLength".into(), self.first_burst.to_string()),
            ("DefaultTime2Wait".into(), self.time2wait.to_string()),
            ("DefaultTime2Retain".into(), self.time2retain.to_string()),
            (
                "MaxOutstandingR2T".into(),
                self.max_outstanding_r2t.to_string(),
            ),
            ("DataPDUInOrder".into(), yn(self.data_pdu_in_order)),
            (
                "DataSequenceInOrder".into(),
                yn(self.data_sequence_in_order),
            ),
            ("ErrorRecoveryLevel".into(), self.erl.to_string()),
            (
                "MaxRecvDataSegmentLength (initiator)".into(),
                self.initiator_mrdsl.to_string(),
            ),
            (
                "MaxRecvDataSegmentLength (target)".into(),
                self.target_mrdsl.to_string(),
            ),
        ]
    }
}

impl Default for SessionParams {
    /// RFC 7143 defaults.
    fn default() -> Self {
        Self {
            header_digest: false,
            data_digest: false,
            max_connections: 1,
            initial_r2t: true,
            immediate_data: true,
            max_burst: 262_144,
            first_burst: 65_536,
            time2wait: 2,
            time2retain: 20,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            erl: 0,
            initiator_mrdsl: 8192,
            target_mrdsl: 8192,
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Digest,
    Numeric {
        min: u32,
        max: u32,
        session_only: bool,
    },
    Bool {
        session_only: bool,
    },
    Declarative,
    TargetOnly,
    Marker,
    MarkInt,
    TaskReporting,
    LoginOnly,
}

fn kind(key: &str) -> Option<Kind> {
    use Kind::*;
    const N24: u32 = (1 << 24) - 1;
    Some(match key {
        "HeaderDigest" | "DataDigest" => Digest,
        "MaxConnections" => Numeric {
            min: 1,
            max: 65535,
            session_only: true,
        },
        "InitialR2T" | "ImmediateData" | "DataPDUInOrder" | "DataSequenceInOrder" => {
            Bool { session_only: true }
        }
        "MaxRecvDataSegmentLength" => Numeric {
            min: 512,
            max: N24,
            session_only: false,
        },
        "MaxBurstLength" | "FirstBurstLength" => Numeric {
            min: 512,
            max: N24,
            session_only: true,
        },
        "DefaultTime2Wait" | "DefaultTime2Retain" => Numeric {
            min: 0,
            max: 3600,
            session_only: false,
        },
        "MaxOutstandingR2T" => Numeric {
            min: 1,
            max: 65535,
            session_only: true,
        },
        "ErrorRecoveryLevel" => Numeric {
            min: 0,
            max: 2,
            session_only: false,
        },
        "iSCSIProtocolLevel" => Numeric {
            min: 0,
            max: 31,
            session_only: false,
        },
        "InitiatorName" | "InitiatorAlias" | "SessionType" | "TargetName" => Declarative,
        "TargetAlias" | "TargetAddress" | "TargetPortalGroupTag" => TargetOnly,
        "OFMarker" | "IFMarker" => Marker,
        "OFMarkInt" | "IFMarkInt" => MarkInt,
        "TaskReporting" => TaskReporting,
        "SendTargets" => LoginOnly,
        _ => return None,
    })
}

/// Parses a numeric value: decimal, `0x` hex (RFC 7143 §6.1).
pub fn parse_number(v: &str) -> Option<u64> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        if h.is_empty() || h.len() > 16 {
            return None;
        }
        return u64::from_str_radix(h, 16).ok();
    }
    if v.is_empty() || v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn yes_no(b: bool) -> String {
    if b { "Yes" } else { "No" }.into()
}

/// Values an initiator may send as an answer to our declarations; they need no reply.
fn is_answer_value(v: &str) -> bool {
    matches!(v, "NotUnderstood" | "Irrelevant" | "Reject")
}

/// Applies `pairs` to `params` and returns the response pairs.
///
/// Keys handled elsewhere (security keys: AuthMethod, CHAP_*) must be filtered out by the
/// caller. `declare_mrdsl` adds our MaxRecvDataSegmentLength declaration.
pub fn negotiate(
    params: &mut SessionParams,
    pairs: &[(String, String)],
    discovery: bool,
    declare_mrdsl: bool,
) -> Vec<(String, String)> {
    // Phase 1: apply offers.
    let mut answers: Vec<(String, Option<String>)> = Vec::new();
    for (key, value) in pairs {
        if is_answer_value(value) {
            continue;
        }
        let answer = match kind(key) {
            None => Some("NotUnderstood".to_owned()),
            Some(Kind::Declarative) => None,
            Some(Kind::TargetOnly) | Some(Kind::LoginOnly) => Some("Irrelevant".to_owned()),
            Some(Kind::Marker) => Some("No".to_owned()),
            Some(Kind::MarkInt) => Some("Irrelevant".to_owned()),
            Some(Kind::TaskReporting) => Some("RFC3720".to_owned()),
            Some(Kind::Digest) => {
                let pick = value.split(',').find(|v| matches!(*v, "None" | "CRC32C"));
                match pick {
                    Some(p) => {
                        let on = p == "CRC32C";
                        if key == "HeaderDigest" {
                            params.header_digest = on;
                        } else {
                            params.data_digest = on;
                        }
                        Some(p.to_owned())
                    }
                    None => Some("Reject".to_owned()),
                }
            }
            Some(Kind::Bool { session_only }) => match parse_bool(value) {
                None => Some("Reject".to_owned()),
                Some(_) if discovery && session_only => Some("Irrelevant".to_owned()),
                Some(v) => {
                    match key.as_str() {
                        // OR with our No: the initiator's value.
                        "InitialR2T" => params.initial_r2t = v,
                        // AND with our Yes: the initiator's value.
                        "ImmediateData" => params.immediate_data = v,
                        // OR with our Yes: always Yes.
                        "DataPDUInOrder" => params.data_pdu_in_order = true,
                        _ => params.data_sequence_in_order = true,
                    }
                    Some(String::new())
                }
            },
            Some(Kind::Numeric {
                min,
                max,
                session_only,
            }) => match parse_number(value) {
                Some(n) if n >= u64::from(min) && n <= u64::from(max) => {
                    if discovery && session_only {
                        Some("Irrelevant".to_owned())
                    } else {
                        let n = n as u32;
                        match key.as_str() {
                            "MaxRecvDataSegmentLength" => {
                                params.initiator_mrdsl = n;
                                None
                            }
                            "MaxConnections" => {
                                params.max_connections = 1;
                                Some(String::new())
                            }
                            "MaxBurstLength" => {
                                params.max_burst = n.min(MAX_BURST_MAX);
                                Some(String::new())
                            }
                            "FirstBurstLength" => {
                                params.first_burst = n.min(FIRST_BURST_MAX);
                                Some(String::new())
                            }
                            "DefaultTime2Wait" => {
                                params.time2wait = n as u16;
                                Some(String::new())
                            }
                            "DefaultTime2Retain" => {
                                params.time2retain = 0;
                                Some(String::new())
                            }
                            "MaxOutstandingR2T" => {
                                params.max_outstanding_r2t = (n as u16).min(OUTSTANDING_R2T_MAX);
                                Some(String::new())
                            }
                            "ErrorRecoveryLevel" => {
                                params.erl = 0;
                                Some(String::new())
                            }
                            // iSCSIProtocolLevel: min(offer, 1): RFC 7143 is level 1.
                            _ => Some(n.min(1).to_string()),
                        }
                    }
                }
                _ => Some("Reject".to_owned()),
            },
        };
        answers.push((key.clone(), answer));
    }
    params.first_burst = params.first_burst.min(params.max_burst);
    // Phase 2: answer with final values.
    let mut out = Vec::new();
    for (key, answer) in answers {
        let Some(a) = answer else { continue };
        let v = if a.is_empty() {
            match key.as_str() {
                "InitialR2T" => yes_no(params.initial_r2t),
                "ImmediateData" => yes_no(params.immediate_data),
                "DataPDUInOrder" => yes_no(params.data_pdu_in_order),
                "DataSequenceInOrder" => yes_no(params.data_sequence_in_order),
                "MaxConnections" => params.max_connections.to_string(),
                "MaxBurstLength" => params.max_burst.to_string(),
                "FirstBurstLength" => params.first_burst.to_string(),
                "DefaultTime2Wait" => params.time2wait.to_string(),
                "DefaultTime2Retain" => params.time2retain.to_string(),
                "MaxOutstandingR2T" => params.max_outstanding_r2t.to_string(),
                "ErrorRecoveryLevel" => params.erl.to_string(),
                other => unreachable!("no final value for {other}"),
            }
        } else {
            a
        };
        out.push((key, v));
    }
    if declare_mrdsl {
        params.target_mrdsl = RECV_DSL_MAX;
        out.push(("MaxRecvDataSegmentLength".into(), RECV_DSL_MAX.to_string()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn answer<'a>(out: &'a [(String, String)], key: &str) -> Option<&'a str> {
        out.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Windows' normal-session offer (INTEROP): we only lower values and answer ERL 0.
    #[test]
    fn windows_offer() {
        let mut p = SessionParams::default();
        let out = negotiate(
            &mut p,
            &kv(&[
                ("HeaderDigest", "None,CRC32C"),
                ("DataDigest", "None"),
                ("InitialR2T", "No"),
                ("ImmediateData", "Yes"),
                ("ErrorRecoveryLevel", "2"),
                ("MaxConnections", "32"),
                ("MaxOutstandingR2T", "16"),
                ("MaxBurstLength", "16776192"),
                ("FirstBurstLength", "16776192"),
                ("MaxRecvDataSegmentLength", "65536"),
            ]),
            false,
            true,
        );
        assert_eq!(answer(&out, "HeaderDigest"), Some("None"));
        assert_eq!(answer(&out, "InitialR2T"), Some("No"));
        assert_eq!(answer(&out, "ImmediateData"), Some("Yes"));
        assert_eq!(answer(&out, "ErrorRecoveryLevel"), Some("0"));
        assert_eq!(answer(&out, "MaxConnections"), Some("1"));
        assert_eq!(answer(&out, "MaxBurstLength"), Some("1048576"));
        assert_eq!(answer(&out, "FirstBurstLength"), Some("262144"));
        assert_eq!(answer(&out, "MaxRecvDataSegmentLength"), Some("262144"));
        assert_eq!(p.initiator_mrdsl, 65536);
        assert!(!p.initial_r2t);
    }

    /// RFC 7143 §13: FirstBurstLength never exceeds MaxBurstLength, whatever the key order.
    #[test]
    fn first_burst_clamped_to_max_burst() {
        let mut p = SessionParams::default();
        let out = negotiate(
            &mut p,
            &kv(&[("FirstBurstLength", "262144"), ("MaxBurstLength", "4096")]),
            false,
            false,
        );
        assert_eq!(answer(&out, "FirstBurstLength"), Some("4096"));
        assert_eq!(answer(&out, "MaxBurstLength"), Some("4096"));
    }

    #[test]
    fn booleans_and_functions() {
        let mut p = SessionParams::default();
        let out = negotiate(
            &mut p,
            &kv(&[
                ("InitialR2T", "Yes"),
                ("ImmediateData", "No"),
                ("DataPDUInOrder", "No"),
                ("DefaultTime2Wait", "5"),
            ]),
            false,
            false,
        );
        assert_eq!(answer(&out, "InitialR2T"), Some("Yes"));
        assert_eq!(answer(&out, "ImmediateData"), Some("No"));
        assert_eq!(answer(&out, "DataPDUInOrder"), Some("Yes"));
        assert_eq!(answer(&out, "DefaultTime2Wait"), Some("5"));
    }

    #[test]
    fn bad_values_unknown_keys_and_discovery() {
        let mut p = SessionParams::default();
        let out = negotiate(
            &mut p,
            &kv(&[
                ("MaxBurstLength", "100"),
                ("InitialR2T", "Maybe"),
                ("HeaderDigest", "MD5"),
                ("X-com.example.Foo", "1"),
                ("Frobnicate", "1"),
                ("TargetPortalGroupTag", "1"),
                ("IFMarker", "Yes"),
            ]),
            false,
            false,
        );
        assert_eq!(answer(&out, "MaxBurstLength"), Some("Reject"));
        assert_eq!(answer(&out, "InitialR2T"), Some("Reject"));
        assert_eq!(answer(&out, "HeaderDigest"), Some("Reject"));
        assert_eq!(answer(&out, "X-com.example.Foo"), Some("NotUnderstood"));
        assert_eq!(answer(&out, "Frobnicate"), Some("NotUnderstood"));
        assert_eq!(answer(&out, "TargetPortalGroupTag"), Some("Irrelevant"));
        assert_eq!(answer(&out, "IFMarker"), Some("No"));
        let mut p = SessionParams::default();
        let out = negotiate(
            &mut p,
            &kv(&[("MaxBurstLength", "65536"), ("HeaderDigest", "CRC32C,None")]),
            true,
            false,
        );
        assert_eq!(answer(&out, "MaxBurstLength"), Some("Irrelevant"));
        assert_eq!(answer(&out, "HeaderDigest"), Some("CRC32C"));
        assert!(p.header_digest);
    }

    #[test]
    fn declaratives_get_no_answer() {
        let mut p = SessionParams::default();
        let out = negotiate(
            &mut p,
            &kv(&[
                ("InitiatorName", "iqn.x"),
                ("MaxRecvDataSegmentLength", "32768"),
            ]),
            false,
            false,
        );
        assert!(out.is_empty());
        assert_eq!(p.initiator_mrdsl, 32768);
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_number("0x10"), Some(16));
        assert_eq!(parse_number("010"), Some(10));
        assert_eq!(parse_number("-1"), None);
        assert_eq!(parse_number(""), None);
        assert_eq!(parse_number("99999999999999999999999"), None);
    }
}
