//! Memory copies on AMD processors with "fast short `rep movsb`" (FSRM: Zen 3 and later).
//!
//! Why this exists: glibc (2.36, Debian 12's) copies blocks from about 2 KiB up to its
//! non-temporal threshold with `rep movsb` when the CPU announces ERMS/FSRM. On these AMD
//! parts that instruction runs an order of magnitude slower when the destination lies a few
//! bytes past the source modulo 4096: measured here (EPYC, family 25 model 17) 2.5-3.1 GB/s
//! instead of 17-37 GB/s for 4-64 KiB copies with the destination 5 bytes ahead, and 15 instead
//! of 21 GB/s at 48 bytes. The data path makes such copies on every read it serves: rustls
//! copies each 16 KiB of plaintext into a record buffer behind a 5-byte record header (and the
//! iSCSI Data-In copies the data behind a 48-byte header). In the cluster's 64 KiB read profile
//! `memmove` was 25% of the controllers' samples, 13% in rustls's record copy alone.
//! glibc's own fix for this (skipping `rep movsb` at short distances) is enabled only for
//! Intel processors in that release, and its `hwcaps` switch for it changed nothing here; the
//! tunable that moves `rep movsb`'s threshold above every size does (vector copies at every
//! distance), and it is read only when a process starts.
//!
//! So a data-path process (`appliance run`, `appliance up`) on such a CPU restarts itself once,
//! as its first act, with that tunable added to `GLIBC_TUNABLES` (the same process id: `exec`).
//!
//! Invariants:
//! - At most one restart: the restarted process carries [`MARK`] and never restarts again,
//!   whatever glibc made of the variable (a set-user-id process has it removed).
//! - An operator's own `x86_rep_movsb_threshold` in `GLIBC_TUNABLES` is kept as is; their other
//!   tunables are kept too. `APPLIANCE_KEEP_COPIES=1` turns the restart off.
//! - Only on Linux with glibc on x86-64, and only for an AMD CPU that lists `fsrm`; anywhere
//!   else nothing happens. If the restart fails the process goes on as it was.

/// Set in the restarted process's environment.
pub const MARK: &str = "APPLIANCE_COPIES_TUNED";

/// The tunable added: no `rep movsb` below 4 GiB, i.e. glibc's vector loop (and its
/// non-temporal stores for very large copies) at every size that occurs.
pub const TUNABLE: &str = "glibc.cpu.x86_rep_movsb_threshold=4294967295";

/// Whether `cpuinfo` (the text of `/proc/cpuinfo`) describes an AMD CPU with FSRM.
pub fn affected(cpuinfo: &str) -> bool {
    let field = |name: &str| {
        cpuinfo
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim() == name)
            .map(|(_, v)| v.trim())
    };
    field("vendor_id") == Some("AuthenticAMD")
        && field("flags").is_some_and(|f| f.split_whitespace().any(|x| x == "fsrm"))
}

/// The `GLIBC_TUNABLES` value to restart with, given the current one, or `None` when the
/// operator already chose the threshold.
pub fn tunables(current: Option<&str>) -> Option<String> {
    match current {
        Some(c) if c.contains("x86_rep_movsb_threshold") => None,
        Some(c) if !c.is_empty() => Some(format!("{c}:{TUNABLE}")),
        _ => Some(TUNABLE.to_string()),
    }
}

/// Restarts this process with the tunable when it runs on an affected CPU (module doc);
/// returns only when no restart was needed or it failed (then with what to tell the
/// operator).
pub fn restart_if_needed() -> Option<String> {
    if !cfg!(all(
        target_os = "linux",
        target_env = "gnu",
        target_arch = "x86_64"
    )) || std::env::var_os(MARK).is_some()
        || std::env::var_os("APPLIANCE_KEEP_COPIES").is_some_and(|v| v == "1")
    {
        return None;
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    if !affected(&cpuinfo) {
        return None;
    }
    let current = std::env::var("GLIBC_TUNABLES").ok();
    let value = tunables(current.as_deref())?;
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return Some(format!("cannot find this program's path: {e}")),
    };
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("GLIBC_TUNABLES", value)
        .env(MARK, "1")
        .exec();
    Some(format!(
        "could not restart with {TUNABLE} ({err}); copies at short distances stay slow on this CPU \
         (set GLIBC_TUNABLES={TUNABLE} in the service's environment)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZEN4: &str = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n\
                        flags\t\t: fpu sse4_2 erms fsrm avx2\n";

    #[test]
    fn only_amd_with_fsrm_is_affected() {
        assert!(affected(ZEN4));
        assert!(!affected(&ZEN4.replace(" fsrm", "")));
        assert!(!affected(&ZEN4.replace("AuthenticAMD", "GenuineIntel")));
        // A flag that merely contains the name does not count.
        assert!(!affected(&ZEN4.replace(" fsrm", " fsrmx")));
        assert!(!affected(""));
    }

    #[test]
    fn the_operators_tunables_are_kept_and_their_threshold_wins() {
        assert_eq!(tunables(None).as_deref(), Some(TUNABLE));
        assert_eq!(tunables(Some("")).as_deref(), Some(TUNABLE));
        assert_eq!(
            tunables(Some("glibc.malloc.arena_max=2")),
            Some(format!("glibc.malloc.arena_max=2:{TUNABLE}"))
        );
        assert_eq!(
            tunables(Some("glibc.cpu.x86_rep_movsb_threshold=8192")),
            None
        );
    }
}
