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
//! - SPEC_I_PT and REGISTER AND MOVE take iSCSI port TransportIDs (name,i,0xISID); the
//!   device-format TransportID (name only) names no single I_T nexus and is refused.

use crate::command::ItNexus;
use crate::sense::SenseReason;
use std::collections::BTreeMap;

/// Reservation types (SPC-4 table 170).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
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
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    /// REGISTER with SPEC_I_PT: register the issuing nexus and the listed initiator ports.
    RegisterSpecified {
        /// RESERVATION KEY (must be 0: the issuer is not registered yet).
        key: u64,
        /// SERVICE ACTION RESERVATION KEY for all of them.
        sa_key: u64,
        /// ALL_TG_PT.
        all_tg_pt: bool,
        /// APTPL.
        aptpl: bool,
        /// (initiator name, ISID) of each listed port; the target port is the issuer's.
        targets: Vec<(String, u64)>,
    },
    /// REGISTER AND MOVE: register another I_T nexus and move the reservation to it.
    RegisterAndMove {
        /// RESERVATION KEY.
        key: u64,
        /// SERVICE ACTION RESERVATION KEY for the destination.
        sa_key: u64,
        /// Unregister the issuer afterwards.
        unreg: bool,
        /// APTPL.
        aptpl: bool,
        /// Destination relative target port.
        relative_port: u16,
        /// Destination initiator name.
        dest_name: String,
        /// Destination ISID.
        dest_isid: u64,
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PrError {
    /// RESERVATION CONFLICT status.
    Conflict,
    /// CHECK CONDITION.
    Sense(SenseReason),
}

/// What a successful PR OUT causes elsewhere.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PrEffects {
    /// Unit attentions to queue, per nexus.
    pub unit_attentions: Vec<(ItNexus, SenseReason)>,
    /// Nexuses whose tasks must be aborted (PREEMPT AND ABORT).
    pub abort: Vec<ItNexus>,
}

/// One registration.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Registration {
    /// Its key.
    pub key: u64,
    /// Registered with ALL_TG_PT.
    pub all_tg_pt: bool,
}

/// The reservation.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reservation {
    /// Holder (for all-registrants types, the nexus that reserved; every registrant holds it).
    pub holder: ItNexus,
    /// Type.
    pub ty: PrType,
}

/// Persistent reservation state of one logical unit.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PrState {
    /// PRgeneration.
    pub generation: u32,
    /// Registrations by I_T nexus.
    #[serde(with = "crate::serde_pairs")]
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
            PrOut::RegisterSpecified {
                key,
                sa_key,
                all_tg_pt,
                aptpl,
                targets,
            } => {
                if current.is_some() {
                    // SPC-4 §5.12.7: SPEC_I_PT from a registered nexus is refused.
                    return Err(PrError::Sense(SenseReason::InvalidFieldInParameterList {
                        byte: 20,
                        bit: Some(3),
                    }));
                }
                if key != 0 {
                    return Err(PrError::Conflict);
                }
                if sa_key == 0 {
                    return Err(PrError::Sense(SenseReason::InvalidFieldInParameterList {
                        byte: 8,
                        bit: None,
                    }));
                }
                let mut all = vec![nexus.clone()];
                for (name, isid) in targets {
                    let n = ItNexus {
                        initiator_name: name,
                        isid,
                        relative_port: nexus.relative_port,
                    };
                    if self.registrations.contains_key(&n) || all.contains(&n) {
                        // All or nothing: a listed port that is already registered fails it all.
                        return Err(PrError::Sense(SenseReason::InvalidFieldInParameterList {
                            byte: 24,
                            bit: None,
                        }));
                    }
                    all.push(n);
                }
                for n in all {
                    self.registrations.insert(
                        n,
                        Registration {
                            key: sa_key,
                            all_tg_pt,
                        },
                    );
                }
                self.generation = self.generation.wrapping_add(1);
                self.aptpl = aptpl;
            }
            PrOut::RegisterAndMove {
                key,
                sa_key,
                unreg,
                aptpl,
                relative_port,
                dest_name,
                dest_isid,
            } => {
                if current != Some(key) {
                    return Err(PrError::Conflict);
                }
                let Some(r) = &self.reservation else {
                    return Err(PrError::Conflict);
                };
                if r.ty.all_registrants() {
                    return Err(PrError::Sense(SenseReason::InvalidFieldInCdb {
                        byte: 2,
                        bit: Some(3),
                    }));
                }
                if !self.is_holder(nexus) {
                    return Err(PrError::Conflict);
                }
                if sa_key == 0 {
                    return Err(PrError::Sense(SenseReason::InvalidFieldInParameterList {
                        byte: 8,
                        bit: None,
                    }));
                }
                let dest = ItNexus {
                    initiator_name: dest_name,
                    isid: dest_isid,
                    relative_port,
                };
                if &dest == nexus || relative_port == 0 {
                    return Err(PrError::Sense(SenseReason::InvalidFieldInParameterList {
                        byte: 18,
                        bit: None,
                    }));
                }
                let ty = r.ty;
                self.registrations.insert(
                    dest.clone(),
                    Registration {
                        key: sa_key,
                        all_tg_pt: false,
                    },
                );
                self.reservation = Some(Reservation { holder: dest, ty });
                if unreg {
                    // The reservation has moved, so unregistering the source releases nothing.
                    self.registrations.remove(nexus);
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
        d[2] = 0x10 | 0x08 | 0x04 | 0x01; // CRH, SIP_C, ATP_C, PTPL_C
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

/// Parses one iSCSI TransportID (SPC-4 §7.6.4.6) at the start of `d`: the initiator name and,
/// for the port format (01b), the ISID. Returns them and the TransportID's length.
///
/// # Errors
/// `None` for another protocol, a bad length, or a name that is not UTF-8.
pub fn parse_transport_id(d: &[u8]) -> Option<(String, Option<u64>, usize)> {
    if d.len() < 4 || d[0] & 0x0f != 5 {
        return None;
    }
    let format = d[0] >> 6;
    let len = usize::from(u16::from_be_bytes([d[2], d[3]]));
    if len < 4 || len % 4 != 0 || d.len() < 4 + len {
        return None;
    }
    let body = &d[4..4 + len];
    let text = std::str::from_utf8(&body[..body.iter().position(|&b| b == 0)?]).ok()?;
    match format {
        0 => Some((text.to_owned(), None, 4 + len)),
        1 => {
            let (name, isid) = text
                .split_once(",i,0x")
                .or_else(|| text.split_once(",I,0X"))?;
            let isid = u64::from_str_radix(isid, 16)
                .ok()
                .filter(|v| *v < 1 << 48)?;
            Some((name.to_owned(), Some(isid), 4 + len))
        }
        _ => None,
    }
}

/// Decodes a PR OUT parameter list (SPC-4 §6.15.3, §6.15.4) for `service_action` and
/// `type_code`.
///
/// # Errors
/// The sense reason for a short list, an unsupported service action or type, or a malformed
/// TransportID.
pub fn decode_out(
    service_action: u8,
    type_code: u8,
    param_len: u32,
    data: &[u8],
) -> Result<PrOut, SenseReason> {
    let data = &data[..data.len().min(param_len as usize)];
    if param_len < 24 || data.len() < 24 {
        return Err(SenseReason::ParameterListLengthError);
    }
    let key = u64::from_be_bytes(data[0..8].try_into().expect("8 bytes"));
    let sa_key = u64::from_be_bytes(data[8..16].try_into().expect("8 bytes"));
    let bad = |byte: u16| SenseReason::InvalidFieldInParameterList { byte, bit: None };
    if service_action == 7 {
        // REGISTER AND MOVE: its own layout.
        let unreg = data[17] & 0x02 != 0;
        let aptpl = data[17] & 0x01 != 0;
        let relative_port = u16::from_be_bytes([data[18], data[19]]);
        let tid_len = u32::from_be_bytes(data[20..24].try_into().expect("4 bytes")) as usize;
        if param_len as usize != 24 + tid_len || data.len() < 24 + tid_len {
            return Err(SenseReason::ParameterListLengthError);
        }
        let (name, isid, _) = parse_transport_id(&data[24..24 + tid_len]).ok_or(bad(24))?;
        let isid = isid.ok_or(bad(24))?; // the destination must be one I_T nexus
        let ty = PrType::from_code(type_code); // TYPE is ignored by REGISTER AND MOVE
        let _ = ty;
        return Ok(PrOut::RegisterAndMove {
            key,
            sa_key,
            unreg,
            aptpl,
            relative_port,
            dest_name: name,
            dest_isid: isid,
        });
    }
    let flags = data[20];
    let all_tg_pt = flags & 0x04 != 0;
    let aptpl = flags & 0x01 != 0;
    if flags & 0x08 != 0 {
        // SPEC_I_PT: REGISTER only, with a TransportID list after the 28-byte header.
        if service_action != 0 {
            return Err(SenseReason::InvalidFieldInParameterList {
                byte: 20,
                bit: Some(3),
            });
        }
        if data.len() < 28 {
            return Err(SenseReason::ParameterListLengthError);
        }
        let tid_len = u32::from_be_bytes(data[24..28].try_into().expect("4 bytes")) as usize;
        if param_len as usize != 28 + tid_len || data.len() < 28 + tid_len {
            return Err(SenseReason::ParameterListLengthError);
        }
        let mut targets = Vec::new();
        let mut pos = 28;
        while pos < 28 + tid_len {
            let (name, isid, used) =
                parse_transport_id(&data[pos..28 + tid_len]).ok_or(bad(pos as u16))?;
            // Only port TransportIDs (with an ISID) name an I_T nexus here.
            targets.push((name, isid.ok_or(bad(pos as u16))?));
            pos += used;
        }
        return Ok(PrOut::RegisterSpecified {
            key,
            sa_key,
            all_tg_pt,
            aptpl,
            targets,
        });
    }
    if param_len != 24 {
        return Err(SenseReason::ParameterListLengthError);
    }
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
            aptpl,
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

    /// `who` unregisters by registering service action key 0.
    fn unreg(s: &mut PrState, who: u64, key: u64) {
        s.apply(
            &n(who),
            PrOut::Register {
                key,
                sa_key: 0,
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
        unreg(&mut s, 1, 0xa);
        assert!(s.reservation.is_some(), "another registrant still holds it");
        unreg(&mut s, 2, 0xb);
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
        unreg(&mut s, 1, 0xa);
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

    fn tid(name: &str, isid: Option<u64>) -> Vec<u8> {
        let mut body = match isid {
            Some(i) => format!("{name},i,0x{i:012x}").into_bytes(),
            None => name.as_bytes().to_vec(),
        };
        body.push(0);
        while body.len() % 4 != 0 {
            body.push(0);
        }
        let mut d = vec![if isid.is_some() { 0x45 } else { 0x05 }, 0];
        d.extend_from_slice(&(body.len() as u16).to_be_bytes());
        d.extend_from_slice(&body);
        d
    }

    #[test]
    fn transport_ids_and_spec_i_pt() {
        let t = tid("iqn.x:h1", Some(0x1234));
        assert_eq!(
            parse_transport_id(&t),
            Some(("iqn.x:h1".into(), Some(0x1234), t.len()))
        );
        assert_eq!(transport_id(&n(7))[0], 0x45);
        assert!(parse_transport_id(&t[..5]).is_none());
        let mut list = vec![0u8; 28];
        list[8..16].copy_from_slice(&0x77u64.to_be_bytes());
        list[20] = 0x08;
        let a = tid("iqn.x:2", Some(2));
        let b = tid("iqn.x:3", Some(3));
        list[24..28].copy_from_slice(&((a.len() + b.len()) as u32).to_be_bytes());
        list.extend_from_slice(&a);
        list.extend_from_slice(&b);
        let op = decode_out(0, 0, list.len() as u32, &list).unwrap();
        let mut s = PrState::default();
        s.apply(&n(1), op.clone()).unwrap();
        assert_eq!(s.registrations.len(), 3);
        assert_eq!(s.generation, 1);
        // Again from another unregistered nexus: the listed ports are registered already.
        assert!(matches!(
            s.apply(&n(9), op),
            Err(PrError::Sense(
                SenseReason::InvalidFieldInParameterList { .. }
            ))
        ));
        // A name-only TransportID names no I_T nexus.
        let mut list2 = list[..28].to_vec();
        let c = tid("iqn.x:4", None);
        list2[24..28].copy_from_slice(&(c.len() as u32).to_be_bytes());
        list2.extend_from_slice(&c);
        assert!(decode_out(0, 0, list2.len() as u32, &list2).is_err());
    }

    #[test]
    fn register_and_move_moves_the_reservation() {
        let mut s = PrState::default();
        reg(&mut s, 1, 0xa);
        s.apply(
            &n(1),
            PrOut::Reserve {
                key: 0xa,
                ty: PrType::ExclusiveAccess,
            },
        )
        .unwrap();
        let t = tid(&n(2).initiator_name, Some(n(2).isid));
        let mut list = vec![0u8; 24];
        list[..8].copy_from_slice(&0xau64.to_be_bytes());
        list[8..16].copy_from_slice(&0xbu64.to_be_bytes());
        list[17] = 0x02; // UNREG
        list[18..20].copy_from_slice(&1u16.to_be_bytes());
        list[20..24].copy_from_slice(&(t.len() as u32).to_be_bytes());
        list.extend_from_slice(&t);
        let op = decode_out(7, 0, list.len() as u32, &list).unwrap();
        s.apply(&n(1), op).unwrap();
        assert_eq!(s.reservation.as_ref().unwrap().holder, n(2));
        assert_eq!(s.registrations[&n(2)].key, 0xb);
        assert!(!s.registrations.contains_key(&n(1)), "UNREG");
    }

    #[test]
    fn decode_rejects_bad_lists() {
        assert_eq!(
            decode_out(0, 0, 23, &[0; 23]),
            Err(SenseReason::ParameterListLengthError)
        );
        let mut p = [0u8; 24];
        p[20] = 0x08; // SPEC_I_PT without its TransportID list header
        assert!(matches!(
            decode_out(0, 0, 24, &p),
            Err(SenseReason::ParameterListLengthError)
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
