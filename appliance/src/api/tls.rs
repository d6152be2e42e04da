//! HTTPS for the console and API (`api.tls = true`): rustls with the operator's certificate
//! and key (`api.tls_cert`, `api.tls_key`, PEM), or a self-signed certificate the controller
//! makes on its first start with TLS and keeps in its data directory.
//!
//! Invariants:
//! - A generated private key is written with mode 0600 and never logged.
//! - TLS handshakes run in their own tasks with a deadline, so a client that stalls in the
//!   handshake holds no one else up; at most [`HANDSHAKES_MAX`] run at once.
//! - The accept loop ends when the server drops its listener (shutdown).

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;

/// Handshakes in progress at most.
pub const HANDSHAKES_MAX: usize = 64;
/// How long a handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the certificate and key are, made if they are the generated ones and missing.
///
/// # Errors
/// A message naming the file and the fix.
pub fn server_config(
    cert: Option<&Path>,
    key: Option<&Path>,
    data_dir: &Path,
    names: &[String],
) -> Result<Arc<rustls::ServerConfig>, String> {
    let (cert, key) = match (cert, key) {
        (Some(c), Some(k)) => (c.to_owned(), k.to_owned()),
        _ => generated(data_dir, names)?,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read the API certificate {}: {e} (a PEM file is expected; fix api.tls_cert)", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "{} holds no certificate (a PEM file is expected; fix api.tls_cert)",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&key).map_err(|e| {
        format!(
            "cannot read the API private key {}: {e} (a PEM file is expected; fix api.tls_key)",
            key.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| {
            format!("the API certificate and key do not fit together: {e} (check api.tls_cert and api.tls_key)")
        })?;
    Ok(Arc::new(cfg))
}

/// The self-signed certificate in `data_dir` (made on first use for `names`).
fn generated(data_dir: &Path, names: &[String]) -> Result<(PathBuf, PathBuf), String> {
    let (cert, key) = (data_dir.join("api-cert.pem"), data_dir.join("api-key.pem"));
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    let made = rcgen::generate_simple_self_signed(names.to_vec())
        .map_err(|e| format!("cannot make a certificate for the API: {e}"))?;
    let write = |p: &Path, text: &str, mode: u32| {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(p)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(|e| {
                format!(
                    "cannot write {}: {e} (check the data directory's permissions)",
                    p.display()
                )
            })
    };
    write(&key, &made.key_pair.serialize_pem(), 0o600)?;
    write(&cert, &made.cert.pem(), 0o644)?;
    tracing::info!(cert = %cert.display(), "made a self-signed certificate for the console and API");
    Ok((cert, key))
}

/// Accepted TLS connections, for `axum::serve`.
#[derive(Debug)]
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

/// Accepts on `listener` and completes handshakes in the background.
pub fn listen(
    listener: TcpListener,
    cfg: Arc<rustls::ServerConfig>,
) -> std::io::Result<TlsListener> {
    let local = listener.local_addr()?;
    let (tx, rx) = mpsc::channel(HANDSHAKES_MAX);
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    let slots = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_MAX));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = tx.closed() => break,
            };
            let (sock, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(cause = %e, "API accept failed (out of file descriptors?)");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                tracing::warn!(%peer, "too many TLS handshakes in progress; dropping a connection");
                continue;
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send((tls, peer)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, cause = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
                drop(permit);
            });
        }
    });
    Ok(TlsListener { rx, local })
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept loop only ends once this listener is gone.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
