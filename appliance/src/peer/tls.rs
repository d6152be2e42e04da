//! Mutual TLS for the peer links: a cluster CA, one certificate per controller, and the checks
//! that bind a connection to the controller it claims to be.
//!
//! The files live in one directory (`cluster.pki`, `appliance up` uses `appliance-data/pki`):
//! `ca.pem` (the cluster CA, trusted by every controller), `ca-key.pem` (needed only to issue
//! certificates; keep it off the controllers of a real cluster), `controller-<id>.pem` and
//! `controller-<id>-key.pem`, and `operator.pem` / `operator-key.pem` for `appliance status`.
//! [`issue`] makes what is missing.
//!
//! Invariants:
//! - Only TLS 1.3, and both sides present a certificate chaining to the cluster CA; a
//!   connection without one never reaches the frame parser.
//! - A controller's certificate names it (`controller-<id>.peer.rainio`); the client checks the
//!   server's name against the controller it dialled, and the server checks every frame's
//!   sender id against the client's certificate ([`Identity::admits`]), so a controller cannot
//!   speak for another one.
//! - The operator certificate (`operator.peer.rainio`) may only ask for status and heartbeats;
//!   it cannot read or write shards or metadata.
//! - Private keys are written with mode 0600 and never logged.

use super::wire::{MetaOp, Request};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The DNS-name suffix of peer certificates.
const DOMAIN: &str = "peer.rainio";
/// A name every controller certificate carries, for clients that do not know which controller
/// they dial (`appliance status`).
pub const ANY_CONTROLLER: &str = "peer.rainio";
/// How long a handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The certificate name of controller `id` (0 is the operator).
pub fn name_of(id: u32) -> String {
    if id == 0 {
        format!("operator.{DOMAIN}")
    } else {
        format!("controller-{id}.{DOMAIN}")
    }
}

fn file_stem(id: u32) -> String {
    if id == 0 {
        "operator".into()
    } else {
        format!("controller-{id}")
    }
}

/// Where controller `id`'s certificate and key are in `dir`.
pub fn files_of(dir: &Path, id: u32) -> (PathBuf, PathBuf) {
    let stem = file_stem(id);
    (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}-key.pem")),
    )
}

/// The TLS side of one controller (or of the operator's `status` client).
#[derive(Debug, Clone)]
pub struct PeerTls {
    /// Presents our certificate and trusts only the cluster CA.
    pub client: Arc<rustls::ClientConfig>,
    /// Demands a client certificate chaining to the cluster CA.
    pub server: Arc<rustls::ServerConfig>,
}

fn read_certs(p: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(p)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read {}: {e}", p.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", p.display()));
    }
    Ok(certs)
}

impl PeerTls {
    /// Loads the CA and `id`'s certificate and key from `dir`.
    ///
    /// # Errors
    /// A message naming the file and the fix (`appliance pki`).
    pub fn load(dir: &Path, id: u32) -> Result<Self, String> {
        let fix = format!(
            "make them with `appliance pki --dir {} --controller {id}` (with the cluster's CA in that directory), or set cluster.tls = false on every controller",
            dir.display()
        );
        let ca = read_certs(&dir.join("ca.pem")).map_err(|e| format!("{e}; {fix}"))?;
        let (cert, key) = files_of(dir, id);
        let chain = read_certs(&cert).map_err(|e| format!("{e}; {fix}"))?;
        let key = PrivateKeyDer::from_pem_file(&key)
            .map_err(|e| format!("cannot read {}: {e}; {fix}", key.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in ca {
            roots
                .add(c)
                .map_err(|e| format!("{}/ca.pem is not a usable CA: {e}", dir.display()))?;
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(peer_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(|e| format!("peer TLS: {e}"))?;
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| {
                format!(
                    "{} and its key do not fit together: {e}; {fix}",
                    cert.display()
                )
            })?;
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| {
                format!(
                    "{} and its key do not fit together: {e}; {fix}",
                    cert.display()
                )
            })?;
        Ok(Self {
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }
}

/// ring's provider with AES-128-GCM first (ring lists AES-256-GCM first). Every byte a
/// controller reads from or writes to a peer is sealed once and opened once, and AES-128 takes
/// 10 rounds per block where AES-256 takes 14: sealing 16 KiB records measured 9.1-9.7 against
/// 8.5-8.6 GB/s on the benchmark machine (docs/benchmarks.md). AES-128-GCM is TLS 1.3's
/// mandatory suite; the other suites stay after it, in ring's order.
fn peer_provider() -> rustls::crypto::CryptoProvider {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    p
}

/// The name a client expects of the server it dials.
///
/// # Panics
/// Never: [`name_of`] and [`ANY_CONTROLLER`] are valid DNS names.
pub fn server_name(peer: Option<u32>) -> ServerName<'static> {
    let n = peer.map_or_else(|| ANY_CONTROLLER.to_string(), name_of);
    ServerName::try_from(n).expect("peer names are valid DNS names")
}

/// Who is on the other end of an accepted connection.
#[derive(Debug)]
pub enum Identity {
    /// A plaintext link (`cluster.tls = false`): frames are taken at their word.
    Unauthenticated,
    /// A TLS client; bound to a controller id by its first frame.
    Certificate {
        /// The client's end-entity certificate (verified against the CA by the handshake).
        cert: CertificateDer<'static>,
        /// The id its first frame claimed and the certificate proved.
        bound: Option<u32>,
    },
}

impl Identity {
    /// Whether a frame from `sender` carrying `req` may be handled on this connection.
    ///
    /// # Errors
    /// Why not, for the log line that closes the connection.
    pub fn admits(&mut self, sender: u32, req: &Request) -> Result<(), String> {
        let Self::Certificate { cert, bound } = self else {
            return Ok(());
        };
        match *bound {
            Some(b) if b == sender => {}
            Some(b) => {
                return Err(format!(
                    "a frame claims controller {sender} on a connection authenticated as {}",
                    name_of(b)
                ))
            }
            None => {
                let ee = webpki::EndEntityCert::try_from(&*cert)
                    .map_err(|e| format!("unusable client certificate: {e}"))?;
                ee.verify_is_valid_for_subject_name(&server_name(Some(sender)))
                    .map_err(|_| {
                        format!(
                            "the client certificate is not {}'s (frames claim sender {sender})",
                            name_of(sender)
                        )
                    })?;
                *bound = Some(sender);
            }
        }
        if sender == 0 && !matches!(req, Request::Heartbeat | Request::Meta(MetaOp::Status, _)) {
            return Err("the operator certificate may only ask for status".into());
        }
        Ok(())
    }
}

/// Writes `text` to `p` with `mode`, refusing to replace an existing file.
fn write_new(p: &Path, text: &str, mode: u32) -> Result<(), String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(p)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| {
            format!(
                "cannot write {}: {e} (check the directory's permissions)",
                p.display()
            )
        })
}

/// The CA's parameters; signing needs only its name and key, so they are rebuilt, not parsed.
fn ca_params() -> Result<rcgen::CertificateParams, rcgen::Error> {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "rainio cluster CA");
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    Ok(p)
}

/// Makes, in `dir`, the cluster CA if it is missing, then a certificate for each of `ids`
/// (0 = the operator) that has none. Returns the files written.
///
/// # Errors
/// A message naming the file and the fix.
pub fn issue(dir: &Path, ids: &[u32]) -> Result<Vec<PathBuf>, String> {
    let e = |what: &str, err: rcgen::Error| format!("cannot make {what}: {err}");
    std::fs::create_dir_all(dir)
        .map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
    let (ca_pem, ca_key_pem) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    let mut written = Vec::new();
    let ca_key = if ca_key_pem.exists() {
        let text = std::fs::read_to_string(&ca_key_pem)
            .map_err(|err| format!("cannot read {}: {err}", ca_key_pem.display()))?;
        rcgen::KeyPair::from_pem(&text).map_err(|err| {
            format!(
                "{} is not a private key: {err} (restore the cluster's CA key)",
                ca_key_pem.display()
            )
        })?
    } else if ca_pem.exists() {
        let missing = ids.iter().any(|&id| !files_of(dir, id).0.exists());
        if missing {
            return Err(format!(
                "{} is there but its key ca-key.pem is not: new certificates need the CA key (copy it from where the cluster was formed)",
                ca_pem.display()
            ));
        }
        return Ok(written);
    } else {
        let key = rcgen::KeyPair::generate().map_err(|err| e("the CA key", err))?;
        let cert = ca_params()
            .and_then(|p| p.self_signed(&key))
            .map_err(|err| e("the CA", err))?;
        write_new(&ca_key_pem, &key.serialize_pem(), 0o600)?;
        write_new(&ca_pem, &cert.pem(), 0o644)?;
        written.extend([ca_key_pem.clone(), ca_pem.clone()]);
        key
    };
    let ca = ca_params()
        .and_then(|p| p.self_signed(&ca_key))
        .map_err(|err| e("the CA", err))?;
    for &id in ids {
        let (cert_p, key_p) = files_of(dir, id);
        if cert_p.exists() && key_p.exists() {
            continue;
        }
        let mut names = vec![name_of(id)];
        if id != 0 {
            names.push(ANY_CONTROLLER.to_string());
        }
        let mut p = rcgen::CertificateParams::new(names).map_err(|err| e("a certificate", err))?;
        p.distinguished_name
            .push(rcgen::DnType::CommonName, name_of(id));
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        let key = rcgen::KeyPair::generate().map_err(|err| e("a key", err))?;
        let cert = p
            .signed_by(&key, &ca, &ca_key)
            .map_err(|err| e(&name_of(id), err))?;
        let _ = std::fs::remove_file(&cert_p);
        let _ = std::fs::remove_file(&key_p);
        write_new(&key_p, &key.serialize_pem(), 0o600)?;
        write_new(&cert_p, &cert.pem(), 0o644)?;
        written.extend([key_p, cert_p]);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_bind_frames_to_their_controller() {
        let d = tempfile::tempdir().unwrap();
        let made = issue(d.path(), &[0, 1, 2]).unwrap();
        assert_eq!(made.len(), 8, "CA + 3 certificates, each with a key");
        // Idempotent: nothing is remade.
        assert!(issue(d.path(), &[1, 2]).unwrap().is_empty());
        for p in &made {
            let mode = std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata(p).unwrap().permissions(),
            );
            let secret = p.to_string_lossy().ends_with("-key.pem");
            assert_eq!(mode & 0o077 == 0, secret, "{}: {mode:o}", p.display());
        }
        PeerTls::load(d.path(), 2).unwrap();
        let cert = |id| read_certs(&files_of(d.path(), id).0).unwrap().remove(0);
        let mut two = Identity::Certificate {
            cert: cert(2),
            bound: None,
        };
        assert!(
            two.admits(1, &Request::Heartbeat).is_err(),
            "2's certificate cannot claim 1"
        );
        assert!(two.admits(2, &Request::Heartbeat).is_ok());
        assert!(two.admits(3, &Request::Heartbeat).is_err(), "bound to 2");
        let mut op = Identity::Certificate {
            cert: cert(0),
            bound: None,
        };
        assert!(op.admits(0, &Request::Meta(MetaOp::Status, vec![])).is_ok());
        assert!(op.admits(0, &Request::Meta(MetaOp::Write, vec![])).is_err());
        let mut op2 = Identity::Certificate {
            cert: cert(0),
            bound: None,
        };
        assert!(
            op2.admits(1, &Request::Heartbeat).is_err(),
            "the operator is no controller"
        );
        // A directory with the CA certificate but not its key cannot issue more.
        std::fs::remove_file(d.path().join("ca-key.pem")).unwrap();
        assert!(issue(d.path(), &[3]).unwrap_err().contains("ca-key.pem"));
        let err = PeerTls::load(d.path(), 3).unwrap_err();
        assert!(err.contains("appliance pki"), "{err}");
    }

    #[test]
    fn peers_agree_on_aes_128_gcm() {
        let d = tempfile::tempdir().unwrap();
        issue(d.path(), &[1, 2]).unwrap();
        let (one, two) = (
            PeerTls::load(d.path(), 1).unwrap(),
            PeerTls::load(d.path(), 2).unwrap(),
        );
        let mut client = rustls::Connection::from(
            rustls::ClientConnection::new(one.client.clone(), server_name(Some(2))).unwrap(),
        );
        let mut server =
            rustls::Connection::from(rustls::ServerConnection::new(two.server.clone()).unwrap());
        // The handshake in memory: each side's records handed to the other until both are done.
        let hand = |from: &mut rustls::Connection, to: &mut rustls::Connection| {
            let mut wire = Vec::new();
            while from.wants_write() {
                from.write_tls(&mut wire).unwrap();
            }
            if !wire.is_empty() {
                to.read_tls(&mut &wire[..]).unwrap();
                to.process_new_packets().unwrap();
            }
        };
        for _ in 0..10 {
            hand(&mut client, &mut server);
            hand(&mut server, &mut client);
            if !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
        }
        assert!(!client.is_handshaking() && !server.is_handshaking());
        for suite in [
            client.negotiated_cipher_suite(),
            server.negotiated_cipher_suite(),
        ] {
            assert_eq!(
                suite.map(|s| s.suite()),
                Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
            );
        }
    }
}
