//! Persistent reservations (SPC-4 §5.12) as a deterministic state machine.
//!
//! `PrState::apply` takes a decoded PERSISTENT RESERVE OUT from an I_T nexus and returns either
//! the effects (unit attentions for other nexuses) or the status the command ends with. The
//! same sequence of `apply` calls gives the same state on every controller: this is what the
//! cluster replicates through its metadata log.
//!
//! Invariants:
//! - `generation` increases on every REGISTER, REGISTER AND IGNORE EXISTING KEY, CLEAR,
//!   PREEMPT and PREEMPT AND ABORT that succeeds, and on nothing else.
//! - A reservation's holder is registered; for all-registrants types every registrant holds it
//!   and it ends when the last registration goes.
//! - Registration keys are never 0.
//!
//! - With APTPL set, the state is written to the LU's store (see `store`) before the command
//!   completes, and loaded at start; a store that fails its version or checksum check stops the
//!   start instead of silently dropping reservations.
//!
//! Not here: SPEC_I_PT and REGISTER AND MOVE (reported unsupported).

use crate::command::ItNexus;
use crate::sense::SenseReason;
use std::collections::BTreeMap;

/// Reservation types (SPC-4 table 170).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PrType {
    /// Write Exclusive.
    WriteExclusive,
    /// Exclusive Access.
    ExclusiveAccess,
    /// Write Exclusive – Registrants Only.
    WriteExclusiveRegistrantsOnly,
    /// Exclusive Access – Registrants Only.
    ExclusiveAccessRegistrantsOnly,
    /// Write Exclusive – All Registrants.
    WriteExclusiveAllRegistrants,
    /// Exclusive Access – All Registrants.
    ExclusiveAccessAllRegistrants,
}

impl PrType {
    /// From the TYPE field.
    pub fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => Self::WriteExclusive,
            3 => Self::ExclusiveAccess,
            5 => Self::WriteExclusiveRegistrantsOnly,
            6 => Self::ExclusiveAccessRegistrantsOnly,
            7 => Self::WriteExclusiveAllRegistrants,
            8 => Self::ExclusiveAccessAllRegistrants,
            _ => return None,
        })
    }
    /// The TYPE field.
    pub fn code(self) -> u8 {
        match self {
            Self::WriteExclusive => 1,
            Self::ExclusiveAccess => 3,
            Self::WriteExclusiveRegistrantsOnly => 5,
            Self::ExclusiveAccessRegistrantsOnly => 6,
            Self::WriteExclusiveAllRegistrants => 7,
            Self::ExclusiveAccessAllRegistrants => 8,
        }
    }
    fn all_registrants(self) -> bool {
        matches!(
            self,
            Self::WriteExclusiveAllRegistrants | Self::ExclusiveAccessAllRegistrants
        )
    }
    fn registrants_only(self) -> bool {
        matches!(
            self,
            Self::WriteExclusiveRegistrantsOnly | Self::ExclusiveAccessRegistrantsOnly
        )
    }
    fn exclusive_access(self) -> bool {
        matches!(
            self,
            Self::ExclusiveAccess
                | Self::ExclusiveAccessRegistrantsOnly
                | Self::ExclusiveAccessAllRegistrants
        )
    }
}

/// How a command touches the medium, for the conflict table (SPC-4 §5.12.1, table 67).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Allowed under every reservation (INQUIRY, REPORT LUNS, PR IN/OUT, ...).
    Always,
    /// Reads the medium (READ, VERIFY, ...).
    Read,
    /// Writes the medium or changes state (WRITE, UNMAP, SYNCHRONIZE CACHE, ...).
    Write,
}

/// A decoded PERSISTENT RESERVE OUT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PrOut {
    /// REGISTER (`ignore`: REGISTER AND IGNORE EXISTING KEY).
    Register {
        /// RESERVATION KEY.
        key: u64,
        /// SERVICE ACTION RESERVATION KEY.
        sa_key: u64,
        /// Ignore the existing key.
        ignore: bool,
        /// ALL_TG_PT.
        all_tg_pt: bool,
        /// APTPL: persist through power loss from now on.
        aptpl: bool,
    },
    /// RESERVE.
    Reserve {
        /// RESERVATION KEY.
        key: u64,
        /// Type.
        ty: PrType,
    },
    /// RELEASE.
    Release {
        /// RESERVATION KEY.
        key: u64,
        /// Type.
        ty: PrType,
    },
    /// CLEAR.
    Clear {
        /// RESERVATION KEY.
        key: u64,
    },
    /// PREEMPT / PREEMPT AND ABORT.
    Preempt {
        /// RESERVATION KEY.
        key: u64,
        /// SERVICE ACTION RESERVATION KEY.
        sa_key: u64,
        /// Type.
        ty: PrType,
        /// PREEMPT AND ABORT.
        abort: bool,
    },
}

/// How a PR OUT ended, when not GOOD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrError {
    /// RESERVATION CONFLICT status.
    Conflict,
    /// CHECK CONDITION.
    Sense(SenseReason),
}

/// What a successful PR OUT causes elsewhere.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrEffects {
    /// Unit attentions to queue, per nexus.
    pub unit_attentions: Vec<(ItNexus, SenseReason)>,
    /// Nexuses whose tasks must be aborted (PREEMPT AND ABORT).
    pub abort: Vec<ItNexus>,
}

/// One registration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    /// Its key.
    pub key: u64,
    /// Registered with ALL_TG_PT.
    pub all_tg_pt: bool,
}

/// The reservation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// Holder (for all-registrants types, the nexus that reserved; every registrant holds it).
    pub holder: ItNexus,
    /// Type.
    pub ty: PrType,
}

/// Persistent reservation state of one logical unit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrState {
    /// PRgeneration.
    pub generation: u32,
    /// Registrations by I_T nexus.
    pub registrations: BTreeMap<ItNexus, Registration>,
    /// The reservation, if any.
    pub reservation: Option<Reservation>,
    /// Activate Persist Through Power Loss: the state survives restarts.
    pub aptpl: bool,
}

impl PrState {
    fn is_holder(&self, n: &ItNexus) -> bool {
        match &self.reservation {
            None => false,
            Some(r) if r.ty.all_registrants() => self.registrations.contains_key(n),
            Some(r) => &r.holder == n,
        }
    }

    /// Whether a command of class `access` from `nexus` conflicts with the reservation.
    pub fn conflicts(&self, nexus: &ItNexus, access: Access) -> bool {
        let Some(r) = &self.reservation else {
            return false;
        };
        if access == Access::Always || self.is_holder(nexus) {
            return false;
        }
        let registered = self.registrations.contains_key(nexus);
        if (r.ty.registrants_only() || r.ty.all_registrants()) && registered {
            return false;
        }
        match access {
            Access::Write => true,
            Access::Read => r.ty.exclusive_access(),
            Access::Always => false,
        }
    }

    /// An all-registrants reservation names one registrant as its nominal holder; when that
    /// one goes, another takes its place (or the reservation ends with the last registrant).
    fn fix_all_registrants_holder(&mut self) {
        let Some(r) = &self.reservation else { return };
        if r.ty.all_registrants() && !self.registrations.contains_key(&r.holder) {
            match self.registrations.keys().next().cloned() {
                Some(next) => self.reservation.as_mut().expect("checked").holder = next,
                None => self.reservation = None,
            }
        }
    }

    fn remove_registration(&mut self, n: &ItNexus, effects: &mut PrEffects) {
        self.registrations.remove(n);
        let Some(r) = &self.reservation else { return };
        let release = if r.ty.all_registrants() {
            self.registrations.is_empty()
        } else {
            &r.holder == n
        };
        if release {
            let ty = r.ty;
            self.reservation = None;
            // SPC-4 §5.12.11.2.2: registrants-only reservations released this way tell the
            // other registrants.
            if ty.registrants_only() {
                for other in self.registrations.keys() {
                    effects
                        .unit_attentions
                        .push((other.clone(), SenseReason::UaReservationsReleased));
                }
            }
        }
        self.fix_all_registrants_holder();
    }

    /// Applies a PR OUT from `nexus`.
    ///
    /// # Errors
    /// RESERVATION CONFLICT or the CHECK CONDITION reason.
    pub fn apply(&mut self, nexus: &ItNexus, op: PrOut) -> Result<PrEffects, PrError> {
        let mut effects = PrEffects::default();
        let current = self.registrations.get(nexus).map(|r| r.key);
        match op {
            PrOut::Register {
                key,
                sa_key,
                ignore,
                all_tg_pt,
                aptpl,
            } => {
                match current {
                    None => {
                        if !ignore && key != 0 {
                            return Err(PrError::Conflict);
                        }
                        if sa_key == 0 {
                            return Ok(effects);
                        }
                        self.registrations.insert(
                            nexus.clone(),
                            Registration {
                                key: sa_key,
                                all_tg_pt,
                            },
                        );
                    }
                    Some(k) => {
                        if !ignore && key != k {
                            return Err(PrError::Conflict);
                        }
                        if sa_key == 0 {
                            self.remove_registration(nexus, &mut effects);
                        } else {
                            let r = self.registrations.get_mut(nexus).expect("registered");
                            r.key = sa_key;
                        }
                    }
                }
                self.generation = self.generation.wrapping_add(1);
                self.aptpl = aptpl;
            }
            PrOut::Reserve { key, ty } => {
                if current != Some(key) {
                    return Err(PrError::Conflict);
                }
                match &self.reservation {
                    None => {
                        self.reservation = Some(Reservation {
                            holder: nexus.clone(),
                            ty,
                        })
                    }
                    Some(r) if self.is_holder(nexus) && r.ty == ty => {}
                    Some(_) => return Err(PrError::Conflict),
                }
            }
            PrOut::Release { key, ty } => {
                if current != Some(key) {
                    return Err(PrError::Conflict);
                }
                let Some(r) = &self.reservation else {
                    return Ok(effects);
                };
                if !self.is_holder(nexus) {
                    return Ok(effects);
                }
                if r.ty != ty {
                    return Err(PrError::Sense(
                        SenseReason::InvalidReleaseOfPersistentReservation,
                    ));
                }
                let rty = r.ty;
                self.reservation = None;
                if rty != PrType::WriteExclusive && rty != PrType::ExclusiveAccess {
                    for other in self.registrations.keys().filter(|o| *o != nexus) {
                        effects
                            .unit_attentions
                            .push((other.clone(), SenseReason::UaReservationsReleased));
                    }
                }
            }
            PrOut::Clear { key } => {
                if current != Some(key) {
                    return Err(PrError::Conflict);
                }
                for other in self.registrations.keys().filter(|o| *o != nexus) {
                    effects
                        .unit_attentions
                        .push((other.clone(), SenseReason::UaReservationsPreempted));
                }
                self.registrations.clear();
                self.reservation = None;
                self.generation = self.generation.wrapping_add(1);
            }
            PrOut::Preempt {
                key,
                sa_key,
                ty,
                abort,
            } => {
                if current != Some(key) {
                    return Err(PrError::Conflict);
                }
                let all_reg = self
                    .reservation
                    .as_ref()
                    .is_some_and(|r| r.ty.all_registrants());
                let victims: Vec<ItNexus> = if all_reg && sa_key == 0 {
                    // Preempting an all-registrants reservation with key 0: everyone else goes.
                    self.registrations
                        .keys()
                        .filter(|o| *o != nexus)
                        .cloned()
                        .collect()
                } else {
                    if sa_key == 0 {
                        return Err(PrError::Sense(SenseReason::InvalidFieldInParameterList {
                            byte: 8,
                            bit: None,
                        }));
                    }
                    self.registrations
                        .iter()
                        .filter(|(n, r)| r.key == sa_key && *n != nexus)
                        .map(|(n, _)| n.clone())
                        .collect()
                };
                let holder_preempted = match &self.reservation {
                    None => false,
                    Some(r) if r.ty.all_registrants() => sa_key == 0,
                    Some(r) => self
                        .registrations
                        .get(&r.holder)
                        .is_some_and(|h| h.key == sa_key),
                };
                if victims.is_empty() && !holder_preempted {
                    // SPC-4 §5.12.11.4.3: no registration with that key: RESERVATION CONFLICT.
                    if !self.registrations.values().any(|r| r.key == sa_key) {
                        return Err(PrError::Conflict);
                    }
                }
                for v in &victims {
                    self.registrations.remove(v);
                    effects
                        .unit_attentions
                        .push((v.clone(), SenseReason::UaRegistrationsPreempted));
                }
                if holder_preempted {
                    self.reservation = Some(Reservation {
                        holder: nexus.clone(),
                        ty,
                    });
                }
                self.fix_all_registrants_holder();
                if abort {
                    effects.abort = victims;
                }
                self.generation = self.generation.wrapping_add(1);
            }
        }
        Ok(effects)
    }

    /// PR IN READ KEYS.
    pub fn read_keys(&self) -> Vec<u8> {
        let mut d = self.generation.to_be_bytes().to_vec();
        d.extend_from_slice(&((8 * self.registrations.len()) as u32).to_be_bytes());
        for r in self.registrations.values() {
            d.extend_from_slice(&r.key.to_be_bytes());
        }
        d
    }

    /// PR IN READ RESERVATION.
    pub fn read_reservation(&self) -> Vec<u8> {
        let mut d = self.generation.to_be_bytes().to_vec();
        match &self.reservation {
            None => d.extend_from_slice(&0u32.to_be_bytes()),
            Some(r) => {
                d.extend_from_slice(&16u32.to_be_bytes());
                let key = if r.ty.all_registrants() {
                    0
                } else {
                    self.registrations.get(&r.holder).map_or(0, |h| h.key)
                };
                d.extend_from_slice(&key.to_be_bytes());
                d.extend_from_slice(&[0; 4]);
                d.push(0);
                d.push(r.ty.code()); // scope 0 (LU)
                d.extend_from_slice(&[0; 2]);
            }
        }
        d
    }

    /// PR IN REPORT CAPABILITIES.
    pub fn report_capabilities(aptpl: bool) -> Vec<u8> {
        let mut d = vec![0u8; 8];
        d[1] = 8;
        d[2] = 0x10 | 0x04 | 0x01; // CRH, ATP_C, PTPL_C
        d[3] = 0x80 | u8::from(aptpl); // TMV (the type mask is valid), PTPL_A
        d[4] = 0x80 | 0x40 | 0x20 | 0x08 | 0x02; // WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX
        d[5] = 0x01; // EX_AC_AR
        d
    }

    /// PR IN READ FULL STATUS.
    pub fn read_full_status(&self) -> Vec<u8> {
        let mut body = Vec::new();
        for (n, r) in &self.registrations {
            body.extend_from_slice(&r.key.to_be_bytes());
            body.extend_from_slice(&[0; 4]);
            let holder = self.is_holder(n);
            body.push(if r.all_tg_pt { 0x02 } else { 0 } | u8::from(holder));
            body.push(if holder {
                self.reservation.as_ref().map_or(0, |r| r.ty.code())
            } else {
                0
            });
            body.extend_from_slice(&[0; 4]);
            body.extend_from_slice(&n.relative_port.to_be_bytes());
            let tid = transport_id(n);
            body.extend_from_slice(&(tid.len() as u32).to_be_bytes());
            body.extend_from_slice(&tid);
        }
        let mut d = self.generation.to_be_bytes().to_vec();
        d.extend_from_slice(&(body.len() as u32).to_be_bytes());
        d.extend_from_slice(&body);
        d
    }
}

/// iSCSI TransportID with ISID (SPC-4 §7.6.4.6): `name,i,0x<isid>`, NUL-terminated, padded.
pub fn transport_id(n: &ItNexus) -> Vec<u8> {
    let mut name = format!("{},i,0x{:012x}", n.initiator_name, n.isid).into_bytes();
    name.push(0);
    while name.len() % 4 != 0 {
        name.push(0);
    }
    let mut d = vec![0x45, 0];
    d.extend_from_slice(&(name.len() as u16).to_be_bytes());
    d.extend_from_slice(&name);
    d
}

/// Decodes a PR OUT parameter list (SPC-4 §6.15.3) for `service_action` and `type_code`.
///
/// # Errors
/// The sense reason for a short list, an unsupported service action or type, or options not
/// offered (SPEC_I_PT).
pub fn decode_out(
    service_action: u8,
    type_code: u8,
    param_len: u32,
    data: &[u8],
) -> Result<PrOut, SenseReason> {
    if service_action == 7 {
        // REGISTER AND MOVE: not offered.
        return Err(SenseReason::InvalidFieldInCdb {
            byte: 1,
            bit: Some(4),
        });
    }
    if param_len != 24 {
        return Err(SenseReason::ParameterListLengthError);
    }
    if data.len() < 24 {
        return Err(SenseReason::ParameterListLengthError);
    }
    let key = u64::from_be_bytes(data[0..8].try_into().expect("8 bytes"));
    let sa_key = u64::from_be_bytes(data[8..16].try_into().expect("8 bytes"));
    let flags = data[20];
    if flags & 0x08 != 0 {
        return Err(SenseReason::InvalidFieldInParameterList {
            byte: 20,
            bit: Some(3),
        }); // SPEC_I_PT
    }
    let all_tg_pt = flags & 0x04 != 0;
    let ty = || {
        PrType::from_code(type_code).ok_or(SenseReason::InvalidFieldInCdb {
            byte: 2,
            bit: Some(3),
        })
    };
    Ok(match service_action {
        0 | 6 => PrOut::Register {
            key,
            sa_key,
            ignore: service_action == 6,
            all_tg_pt,
            aptpl: flags & 0x01 != 0,
        },
        1 => PrOut::Reserve { key, ty: ty()? },
        2 => PrOut::Release { key, ty: ty()? },
        3 => PrOut::Clear { key },
        4 | 5 => PrOut::Preempt {
            key,
            sa_key,
            ty: ty()?,
            abort: service_action == 5,
        },
        _ => {
            return Err(SenseReason::InvalidFieldInCdb {
                byte: 1,
                bit: Some(4),
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(i: u64) -> ItNexus {
        ItNexus {
            initiator_name: format!("iqn.x:{i}"),
            isid: i,
            relative_port: 1,
        }
    }

    fn reg(s: &mut PrState, who: u64, key: u64) {
        s.apply(
            &n(who),
            PrOut::Register {
                key: 0,
                sa_key: key,
                ignore: false,
                all_tg_pt: false,
                aptpl: false,
            },
        )
        .unwrap();
    }

    #[test]
    fn register_reserve_conflict_release() {
        let mut s = PrState::default();
        reg(&mut s, 1, 0xa);
        reg(&mut s, 2, 0xb);
        assert_eq!(s.generation, 2);
        s.apply(
            &n(1),
            PrOut::Reserve {
                key: 0xa,
                ty: PrType::WriteExclusiveRegistrantsOnly,
            },
        )
        .unwrap();
        assert!(!s.conflicts(&n(2), Access::Write), "registrant may write");
        assert!(s.conflicts(&n(3), Access::Write));
        assert!(!s.conflicts(&n(3), Access::Read));
        assert_eq!(
            s.apply(
                &n(2),
                PrOut::Reserve {
                    key: 0xb,
                    ty: PrType::WriteExclusive
                }
            ),
            Err(PrError::Conflict)
        );
        assert_eq!(
            s.apply(
                &n(1),
                PrOut::Release {
                    key: 0xa,
                    ty: PrType::WriteExclusive
                }
            ),
            Err(PrError::Sense(
                SenseReason::InvalidReleaseOfPersistentReservation
            ))
        );
        let e = s
            .apply(
                &n(1),
                PrOut::Release {
                    key: 0xa,
                    ty: PrType::WriteExclusiveRegistrantsOnly,
                },
            )
            .unwrap();
        assert_eq!(
            e.unit_attentions,
            vec![(n(2), SenseReason::UaReservationsReleased)]
        );
        assert_eq!(
            s.generation, 2,
            "RESERVE and RELEASE do not change PRgeneration"
        );
    }

    #[test]
    fn preempt_takes_the_reservation_and_tells_the_victim() {
        let mut s = PrState::default();
        reg(&mut s, 1, 0xa);
        reg(&mut s, 2, 0xb);
        s.apply(
            &n(1),
            PrOut::Reserve {
                key: 0xa,
                ty: PrType::ExclusiveAccess,
            },
        )
        .unwrap();
        assert!(s.conflicts(&n(2), Access::Read));
        let e = s
            .apply(
                &n(2),
                PrOut::Preempt {
                    key: 0xb,
                    sa_key: 0xa,
                    ty: PrType::WriteExclusive,
                    abort: true,
                },
            )
            .unwrap();
        assert_eq!(
            e.unit_attentions,
            vec![(n(1), SenseReason::UaRegistrationsPreempted)]
        );
        assert_eq!(e.abort, vec![n(1)]);
        assert_eq!(s.reservation.as_ref().unwrap().holder, n(2));
        assert!(!s.registrations.contains_key(&n(1)));
    }

    #[test]
    fn unregistering_the_holder_releases_all_registrants_only_at_the_last() {
        let mut s = PrState::default();
        reg(&mut s, 1, 0xa);
        reg(&mut s, 2, 0xb);
        s.apply(
            &n(1),
            PrOut::Reserve {
                key: 0xa,
                ty: PrType::WriteExclusiveAllRegistrants,
            },
        )
        .unwrap();
        s.apply(
            &n(1),
            PrOut::Register {
                key: 0xa,
                sa_key: 0,
                ignore: false,
                all_tg_pt: false,
                aptpl: false,
            },
        )
        .unwrap();
        assert!(s.reservation.is_some(), "another registrant still holds it");
        s.apply(
            &n(2),
            PrOut::Register {
                key: 0xb,
                sa_key: 0,
                ignore: false,
                all_tg_pt: false,
                aptpl: false,
            },
        )
        .unwrap();
        assert!(s.reservation.is_none());
    }

    /// Regression (found by the pr_out_params fuzz target): the nominal holder of an
    /// all-registrants reservation unregisters while another registrant remains; the
    /// reservation must name a registered holder.
    #[test]
    fn all_registrants_holder_stays_registered() {
        let mut s = PrState::default();
        reg(&mut s, 1, 0xa);
        reg(&mut s, 2, 0xb);
        s.apply(
            &n(1),
            PrOut::Reserve {
                key: 0xa,
                ty: PrType::ExclusiveAccessAllRegistrants,
            },
        )
        .unwrap();
        s.apply(
            &n(1),
            PrOut::Register {
                key: 0xa,
                sa_key: 0,
                ignore: false,
                all_tg_pt: false,
                aptpl: false,
            },
        )
        .unwrap();
        let r = s.reservation.as_ref().expect("still reserved");
        assert_eq!(r.holder, n(2));
        // Preempting the other registrant's key (not 0) under an all-registrants reservation.
        reg(&mut s, 3, 0xc);
        s.apply(
            &n(3),
            PrOut::Preempt {
                key: 0xc,
                sa_key: 0xb,
                ty: PrType::WriteExclusive,
                abort: false,
            },
        )
        .unwrap();
        let r = s.reservation.as_ref().expect("still reserved");
        assert!(s.registrations.contains_key(&r.holder));
    }

    #[test]
    fn wrong_key_conflicts_and_ignore_existing_key_does_not() {
        let mut s = PrState::default();
        reg(&mut s, 1, 0xa);
        assert_eq!(
            s.apply(
                &n(1),
                PrOut::Register {
                    key: 0xff,
                    sa_key: 0xc,
                    ignore: false,
                    all_tg_pt: false,
                    aptpl: false
                }
            ),
            Err(PrError::Conflict)
        );
        s.apply(
            &n(1),
            PrOut::Register {
                key: 0xff,
                sa_key: 0xc,
                ignore: true,
                all_tg_pt: false,
                aptpl: false,
            },
        )
        .unwrap();
        assert_eq!(s.registrations[&n(1)].key, 0xc);
        assert_eq!(
            s.apply(
                &n(2),
                PrOut::Register {
                    key: 5,
                    sa_key: 6,
                    ignore: false,
                    all_tg_pt: false,
                    aptpl: false
                }
            ),
            Err(PrError::Conflict)
        );
    }

    #[test]
    fn decode_rejects_bad_lists() {
        assert_eq!(
            decode_out(0, 0, 23, &[0; 23]),
            Err(SenseReason::ParameterListLengthError)
        );
        let mut p = [0u8; 24];
        p[20] = 0x08; // SPEC_I_PT
        assert!(matches!(
            decode_out(0, 0, 24, &p),
            Err(SenseReason::InvalidFieldInParameterList { .. })
        ));
        p[20] = 0x01; // APTPL is accepted
        assert!(matches!(
            decode_out(0, 0, 24, &p),
            Ok(PrOut::Register { aptpl: true, .. })
        ));
        assert!(matches!(
            decode_out(1, 2, 24, &[0; 24]),
            Err(SenseReason::InvalidFieldInCdb { .. })
        ));
        assert!(decode_out(1, 1, 24, &[0; 24]).is_ok());
    }
}
