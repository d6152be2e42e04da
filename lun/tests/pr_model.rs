//! Property test: random PERSISTENT RESERVE OUT sequences from several I_T nexuses, applied to
//! the device server's state machine and to a reference model written directly from the rules
//! of SPC-4 §5.12 (lists, no maps, no shared code). After every step the outcome and the full
//! status (PRgeneration, registrations and keys, reservation type and holders) must agree.

use lun::pr::{PrError, PrOut, PrState, PrType};
use lun::{ItNexus, SenseReason};
use proptest::prelude::*;

const TYPES: [PrType; 6] = [
    PrType::WriteExclusive,
    PrType::ExclusiveAccess,
    PrType::WriteExclusiveRegistrantsOnly,
    PrType::ExclusiveAccessRegistrantsOnly,
    PrType::WriteExclusiveAllRegistrants,
    PrType::ExclusiveAccessAllRegistrants,
];

fn nexus(i: u8) -> ItNexus {
    ItNexus {
        initiator_name: format!("iqn.model:{i}"),
        isid: u64::from(i),
        relative_port: 1,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Good,
    Conflict,
    Check(SenseReason),
}

/// The reference model.
#[derive(Default, Debug)]
struct Model {
    generation: u32,
    /// (nexus id, key), in registration order.
    regs: Vec<(u8, u64)>,
    /// (who reserved, type).
    res: Option<(u8, PrType)>,
}

fn all_registrants(t: PrType) -> bool {
    matches!(
        t,
        PrType::WriteExclusiveAllRegistrants | PrType::ExclusiveAccessAllRegistrants
    )
}

impl Model {
    fn key_of(&self, n: u8) -> Option<u64> {
        self.regs.iter().find(|(m, _)| *m == n).map(|(_, k)| *k)
    }
    fn holds(&self, n: u8) -> bool {
        match self.res {
            None => false,
            Some((_, t)) if all_registrants(t) => self.key_of(n).is_some(),
            Some((h, _)) => h == n,
        }
    }
    fn unregister(&mut self, n: u8) {
        self.regs.retain(|(m, _)| *m != n);
        if let Some((h, t)) = self.res {
            if (all_registrants(t) && self.regs.is_empty()) || (!all_registrants(t) && h == n) {
                self.res = None;
            }
        }
    }
    fn apply(&mut self, n: u8, op: &PrOut) -> Outcome {
        let mine = self.key_of(n);
        match op {
            PrOut::RegisterSpecified { .. } => unreachable!("not generated"),
            PrOut::RegisterAndMove {
                key,
                sa_key,
                unreg,
                dest_isid,
                ..
            } => {
                let (key, sa_key, unreg, dest) = (*key, *sa_key, *unreg, *dest_isid as u8);
                if mine != Some(key) {
                    return Outcome::Conflict;
                }
                let Some((_, t)) = self.res else {
                    return Outcome::Conflict;
                };
                if all_registrants(t) {
                    return Outcome::Check(SenseReason::InvalidFieldInCdb {
                        byte: 2,
                        bit: Some(3),
                    });
                }
                if !self.holds(n) {
                    return Outcome::Conflict;
                }
                if sa_key == 0 {
                    return Outcome::Check(SenseReason::InvalidFieldInParameterList {
                        byte: 8,
                        bit: None,
                    });
                }
                if dest == n {
                    return Outcome::Check(SenseReason::InvalidFieldInParameterList {
                        byte: 18,
                        bit: None,
                    });
                }
                match self.regs.iter_mut().find(|(m, _)| *m == dest) {
                    Some(r) => r.1 = sa_key,
                    None => self.regs.push((dest, sa_key)),
                }
                self.res = Some((dest, t));
                if unreg {
                    self.regs.retain(|(m, _)| *m != n);
                }
                self.generation += 1;
                Outcome::Good
            }
            PrOut::Register {
                key,
                sa_key,
                ignore,
                ..
            } => {
                let (key, sa_key, ignore) = (*key, *sa_key, *ignore);
                match mine {
                    None if !ignore && key != 0 => return Outcome::Conflict,
                    None if sa_key == 0 => return Outcome::Good,
                    None => self.regs.push((n, sa_key)),
                    Some(k) if !ignore && key != k => return Outcome::Conflict,
                    Some(_) if sa_key == 0 => self.unregister(n),
                    Some(_) => {
                        for r in &mut self.regs {
                            if r.0 == n {
                                r.1 = sa_key;
                            }
                        }
                    }
                }
                self.generation += 1;
                Outcome::Good
            }
            PrOut::Reserve { key, ty } => {
                let (key, ty) = (*key, *ty);
                if mine != Some(key) {
                    return Outcome::Conflict;
                }
                match self.res {
                    None => {
                        self.res = Some((n, ty));
                        Outcome::Good
                    }
                    Some((_, t)) if self.holds(n) && t == ty => Outcome::Good,
                    Some(_) => Outcome::Conflict,
                }
            }
            PrOut::Release { key, ty } => {
                let (key, ty) = (*key, *ty);
                if mine != Some(key) {
                    return Outcome::Conflict;
                }
                match self.res {
                    Some((_, t)) if self.holds(n) => {
                        if t != ty {
                            return Outcome::Check(
                                SenseReason::InvalidReleaseOfPersistentReservation,
                            );
                        }
                        self.res = None;
                        Outcome::Good
                    }
                    _ => Outcome::Good,
                }
            }
            PrOut::Clear { key } => {
                let key = *key;
                if mine != Some(key) {
                    return Outcome::Conflict;
                }
                self.regs.clear();
                self.res = None;
                self.generation += 1;
                Outcome::Good
            }
            PrOut::Preempt {
                key, sa_key, ty, ..
            } => {
                let (key, sa_key, ty) = (*key, *sa_key, *ty);
                if mine != Some(key) {
                    return Outcome::Conflict;
                }
                let ar = self.res.is_some_and(|(_, t)| all_registrants(t));
                if ar && sa_key == 0 {
                    self.regs.retain(|(m, _)| *m == n);
                    self.res = Some((n, ty));
                    self.generation += 1;
                    return Outcome::Good;
                }
                if sa_key == 0 {
                    return Outcome::Check(SenseReason::InvalidFieldInParameterList {
                        byte: 8,
                        bit: None,
                    });
                }
                if !self.regs.iter().any(|(_, k)| *k == sa_key) {
                    return Outcome::Conflict;
                }
                let holder_hit = match self.res {
                    Some((_, t)) if all_registrants(t) => false,
                    Some((h, _)) => self.key_of(h) == Some(sa_key),
                    None => false,
                };
                self.regs.retain(|(m, k)| *m == n || *k != sa_key);
                if holder_hit {
                    self.res = Some((n, ty));
                }
                self.generation += 1;
                Outcome::Good
            }
        }
    }
}

fn op_strategy() -> impl Strategy<Value = (u8, PrOut)> {
    let key = prop_oneof![Just(0u64), Just(1u64), Just(2u64), Just(3u64)];
    let ty = proptest::sample::select(TYPES.to_vec());
    let who = 0u8..3;
    (
        who,
        prop_oneof![
            (key.clone(), key.clone(), any::<bool>()).prop_map(|(key, sa_key, ignore)| {
                PrOut::Register {
                    key,
                    sa_key,
                    ignore,
                    all_tg_pt: false,
                    aptpl: false,
                }
            }),
            (key.clone(), ty.clone()).prop_map(|(key, ty)| PrOut::Reserve { key, ty }),
            (key.clone(), ty.clone()).prop_map(|(key, ty)| PrOut::Release { key, ty }),
            key.clone().prop_map(|key| PrOut::Clear { key }),
            (key.clone(), key.clone(), any::<bool>(), 0u8..3).prop_map(
                |(key, sa_key, unreg, d)| PrOut::RegisterAndMove {
                    key,
                    sa_key,
                    unreg,
                    aptpl: false,
                    relative_port: 1,
                    dest_name: format!("iqn.model:{d}"),
                    dest_isid: u64::from(d),
                }
            ),
            (key.clone(), key, ty, any::<bool>()).prop_map(|(key, sa_key, ty, abort)| {
                PrOut::Preempt {
                    key,
                    sa_key,
                    ty,
                    abort,
                }
            }),
        ],
    )
}

/// The comparable view: generation, sorted (nexus, key), reservation type, sorted holders.
type View = (u32, Vec<(u8, u64)>, Option<PrType>, Vec<u8>);

fn view_of_impl(s: &PrState) -> View {
    let mut regs: Vec<(u8, u64)> = s
        .registrations
        .iter()
        .map(|(n, r)| (n.isid as u8, r.key))
        .collect();
    regs.sort();
    let ty = s.reservation.as_ref().map(|r| r.ty);
    let mut holders: Vec<u8> = match &s.reservation {
        None => vec![],
        Some(r)
            if matches!(
                r.ty,
                PrType::WriteExclusiveAllRegistrants | PrType::ExclusiveAccessAllRegistrants
            ) =>
        {
            regs.iter().map(|(n, _)| *n).collect()
        }
        Some(r) => vec![r.holder.isid as u8],
    };
    holders.sort();
    (s.generation, regs, ty, holders)
}

fn view_of_model(m: &Model) -> View {
    let mut regs = m.regs.clone();
    regs.sort();
    let mut holders: Vec<u8> = (0..3).filter(|n| m.holds(*n)).collect();
    holders.sort();
    (m.generation, regs, m.res.map(|(_, t)| t), holders)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn pr_out_sequences_match_the_reference_model(ops in proptest::collection::vec(op_strategy(), 1..40)) {
        let mut imp = PrState::default();
        let mut model = Model::default();
        for (step, (who, op)) in ops.iter().enumerate() {
            let got = match imp.apply(&nexus(*who), op.clone()) {
                Ok(_) => Outcome::Good,
                Err(PrError::Conflict) => Outcome::Conflict,
                Err(PrError::Sense(r)) => Outcome::Check(r),
            };
            let want = model.apply(*who, op);
            prop_assert_eq!(got, want, "step {} nexus {} {:?}", step, who, op);
            prop_assert_eq!(view_of_impl(&imp), view_of_model(&model), "state after step {} ({:?})", step, op);
            // READ FULL STATUS lists exactly the registrations, each with its key.
            let full = imp.read_full_status();
            let len = u32::from_be_bytes(full[4..8].try_into().unwrap()) as usize;
            prop_assert_eq!(len, full.len() - 8);
        }
    }
}
