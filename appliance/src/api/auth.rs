//! Who may use the API and console: one admin account whose password is kept only as an
//! argon2 hash; a login opens a session named by a random token, carried either as an
//! HttpOnly, SameSite=Strict cookie (the console) or as a bearer token (scripts, the CLI).
//!
//! Invariants:
//! - Passwords are checked only by argon2's verifier; tokens are 256 random bits from the OS
//!   and CSRF tokens are compared in constant time.
//! - A state-changing request authenticated by the cookie must carry the session's CSRF
//!   token in `X-CSRF-Token` (a cross-site form cannot read it); bearer requests need none
//!   (a browser never adds that header by itself).
//! - Neither the password, its hash nor a token is ever logged or returned except the token
//!   to the client that just logged in.
//! - Sessions expire ([`SESSION_TTL`]); failed logins are limited ([`FAILED_LOGINS_PER_MINUTE`])
//!   so the password cannot be guessed at argon2's speed from many clients at once.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a session lasts without a new login.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Failed logins accepted per minute (all clients together) before logins answer 429.
pub const FAILED_LOGINS_PER_MINUTE: u32 = 20;
/// Sessions kept at most (the oldest go first).
pub const SESSIONS_MAX: usize = 1024;
/// The session cookie's name.
pub const COOKIE: &str = "rainio_session";

/// One logged-in session.
#[derive(Debug, Clone)]
pub struct Session {
    /// Sent back in `X-CSRF-Token` with cookie-authenticated changes.
    pub csrf: String,
    expires: Instant,
}

/// Why a login failed.
#[derive(Debug, PartialEq, Eq)]
pub enum LoginError {
    /// Wrong user or password.
    Wrong,
    /// Too many failures lately.
    Throttled,
    /// No password has been set.
    NoPassword,
}

/// The admin account and its sessions.
#[derive(Debug)]
pub struct Auth {
    hash: Option<String>,
    sessions: Mutex<HashMap<String, Session>>,
    failures: Mutex<(Instant, u32)>,
}

/// 32 random bytes as hex.
fn random_token() -> String {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).expect("the OS random source");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An argon2id hash of `password` (PHC string) for `api.admin_password_hash`.
///
/// # Errors
/// When the password is empty or hashing fails.
pub fn hash_password(password: &str) -> Result<String, String> {
    if password.len() < 8 {
        return Err("the admin password needs at least 8 characters".into());
    }
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| e.to_string())?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

impl Auth {
    /// Auth for the admin password with argon2 hash `hash` (`None`: logins are refused).
    pub fn new(hash: Option<String>) -> Self {
        Self {
            hash,
            sessions: Mutex::new(HashMap::new()),
            failures: Mutex::new((Instant::now(), 0)),
        }
    }

    /// Checks the password and opens a session: `(token, csrf)`.
    ///
    /// # Errors
    /// [`LoginError`].
    pub fn login(&self, user: &str, password: &str) -> Result<(String, String), LoginError> {
        let Some(hash) = &self.hash else {
            return Err(LoginError::NoPassword);
        };
        {
            let mut f = self.failures.lock().expect("failures");
            if f.0.elapsed() > Duration::from_secs(60) {
                *f = (Instant::now(), 0);
            }
            if f.1 >= FAILED_LOGINS_PER_MINUTE {
                return Err(LoginError::Throttled);
            }
        }
        let ok = user == "admin"
            && PasswordHash::new(hash).is_ok_and(|h| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &h)
                    .is_ok()
            });
        if !ok {
            self.failures.lock().expect("failures").1 += 1;
            return Err(LoginError::Wrong);
        }
        let (token, csrf) = (random_token(), random_token());
        let mut s = self.sessions.lock().expect("sessions");
        let now = Instant::now();
        s.retain(|_, v| v.expires > now);
        if s.len() >= SESSIONS_MAX {
            if let Some(oldest) = s
                .iter()
                .min_by_key(|(_, v)| v.expires)
                .map(|(k, _)| k.clone())
            {
                s.remove(&oldest);
            }
        }
        s.insert(
            token.clone(),
            Session {
                csrf: csrf.clone(),
                expires: now + SESSION_TTL,
            },
        );
        Ok((token, csrf))
    }

    /// The live session named by `token`.
    pub fn session(&self, token: &str) -> Option<Session> {
        let s = self.sessions.lock().expect("sessions");
        s.get(token).filter(|v| v.expires > Instant::now()).cloned()
    }

    /// Ends the session named by `token`.
    pub fn logout(&self, token: &str) {
        self.sessions.lock().expect("sessions").remove(token);
    }
}

/// Whether `a` and `b` are equal, in time independent of where they differ.
pub fn same(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_checks_the_hash_and_sessions_end_at_logout() {
        let a = Auth::new(Some(hash_password("correct horse").unwrap()));
        assert_eq!(a.login("admin", "wrong one"), Err(LoginError::Wrong));
        assert_eq!(a.login("root", "correct horse"), Err(LoginError::Wrong));
        let (t, csrf) = a.login("admin", "correct horse").unwrap();
        assert_eq!(t.len(), 64);
        assert!(same(&a.session(&t).unwrap().csrf, &csrf));
        assert!(a.session("nope").is_none());
        a.logout(&t);
        assert!(a.session(&t).is_none());
        assert!(hash_password("short").is_err());
    }

    #[test]
    fn failures_are_throttled_and_no_password_refuses() {
        let a = Auth::new(Some(hash_password("correct horse").unwrap()));
        for _ in 0..FAILED_LOGINS_PER_MINUTE {
            assert_eq!(a.login("admin", "x"), Err(LoginError::Wrong));
        }
        assert_eq!(
            a.login("admin", "correct horse"),
            Err(LoginError::Throttled)
        );
        assert_eq!(
            Auth::new(None).login("admin", "anything"),
            Err(LoginError::NoPassword)
        );
    }
}
