//! The tokio driver: accepts TCP connections on a portal and runs one task per connection,
//! feeding the sans-IO [`Connection`] and executing its commands on the device server.
//!
//! The loop per connection follows quinn's connection driver: read, `handle_*`, drain every
//! `poll_*`, write, sleep until `poll_timeout()`. Shutdown follows mini-redis: a watch channel
//! tells every connection to ask its initiator to log out; the listener stops accepting.
//!
//! Invariants:
//! - The receive buffer never holds more than one PDU (bounded by the negotiated limit) plus
//!   one read's worth of bytes.
//! - Commands run concurrently as futures owned by the connection task (not a task each): a
//!   completion wakes the connection once, however many commands it finished, and every
//!   finished command's response goes out in the same socket write. The futures keep being
//!   driven while the connection waits on anything else (a socket write, a reset, the end of
//!   a nexus), so a command never holds its locks because its connection is busy; when the
//!   connection ends, the commands still running are finished by a task of their own (never
//!   cancelled midway) and their outcomes dropped.
//! - A newer login with the same initiator name, ISID and target closes the older session
//!   (session reinstatement).
//! - At most [`CONNECTIONS_MAX`] connections are open per portal; more are closed at accept
//!   with a log line, so a login flood cannot exhaust memory or descriptors.
//! - A send that stays blocked for the NOP timeout (an initiator that stopped reading) drops
//!   the connection, so a never-read socket cannot hold its buffers forever.
//! - Responses are coalesced: every outcome that is ready when one arrives is encoded before
//!   the next socket write, so the number of sends grows with bursts, not with commands.

use crate::config::FabricConfig;
use crate::constants::CONNECTIONS_MAX;
use crate::proto::connection::{Connection, Event, Transmit};
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use lun::CommandOutcome;
use socket2::{SockRef, TcpKeepalive};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tracing::Instrument;

/// A command being executed: its initiator task tag and the future of its outcome.
type Running = FuturesUnordered<Pin<Box<dyn Future<Output = (u32, CommandOutcome)> + Send>>>;

/// Awaits `fut` while driving the connection's running commands; outcomes that finish
/// meanwhile are kept in `ready`, in completion order, for the connection to handle next.
async fn driving<F: Future>(
    fut: F,
    running: &mut Running,
    ready: &mut Vec<(u32, CommandOutcome)>,
) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    loop {
        tokio::select! {
            biased;
            out = &mut fut => return out,
            Some(done) = running.next(), if !running.is_empty() => ready.push(done),
        }
    }
}

/// Read chunk reserved before each socket read.
const READ_CHUNK: usize = 256 * 1024;

type SessionKey = (String, u64, String);
/// A session's connection id, its kill switch (reinstatement) and what operators see of it.
type SessionEntry = (u64, Arc<Notify>, Arc<SessionInfo>);

/// State shared by every connection of a portal: TSIH allocation and the session table.
#[derive(Debug, Default)]
pub struct Registry {
    next_tsih: AtomicU16,
    next_conn: AtomicU64,
    open: AtomicUsize,
    sessions: Mutex<HashMap<SessionKey, SessionEntry>>,
}

/// Counts a connection as open until dropped.
struct OpenGuard(Arc<Registry>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What an operator sees of one logged-in session.
#[derive(Debug)]
pub struct SessionInfo {
    /// InitiatorName.
    pub initiator_name: String,
    /// ISID (6 bytes, as a number).
    pub isid: u64,
    /// TargetName.
    pub target: String,
    /// TSIH.
    pub tsih: u16,
    /// The initiator's address.
    pub peer: SocketAddr,
    /// The portal it logged in through.
    pub portal: SocketAddr,
    /// Target portal group tag.
    pub tpgt: u16,
    /// When the login completed (seconds since the Unix epoch).
    pub since_unix: u64,
    /// Negotiated operational parameters (key, value) as RFC 7143 names them.
    pub params: Vec<(String, String)>,
    /// Commands admitted and not yet answered.
    pub in_flight: AtomicU64,
    /// Commands answered since login.
    pub commands: AtomicU64,
}

impl Registry {
    fn alloc_tsih(&self) -> u16 {
        loop {
            let t = self.next_tsih.fetch_add(1, Ordering::Relaxed);
            if t != 0 {
                return t;
            }
        }
    }

    /// Number of logged-in normal sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.lock().expect("registry lock").len()
    }

    /// Every logged-in normal session.
    pub fn sessions(&self) -> Vec<Arc<SessionInfo>> {
        let mut v: Vec<_> = self
            .sessions
            .lock()
            .expect("registry lock")
            .values()
            .map(|(_, _, i)| Arc::clone(i))
            .collect();
        v.sort_by(|a, b| (&a.initiator_name, a.isid).cmp(&(&b.initiator_name, b.isid)));
        v
    }
}

/// A portal server.
#[derive(Debug, Clone)]
pub struct Server {
    cfg: Arc<FabricConfig>,
    registry: Arc<Registry>,
}

/// Binds a listening socket with SO_REUSEADDR (so a restarted controller can rebind at once).
///
/// # Errors
/// The OS error, e.g. address in use.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    TcpListener::from_std(sock.into())
}

impl Server {
    /// A server for one portal.
    pub fn new(cfg: Arc<FabricConfig>) -> Self {
        Self {
            cfg,
            registry: Arc::new(Registry::default()),
        }
    }

    /// The registry (sessions).
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Accepts connections until `shutdown` turns true, then waits for connections to finish.
    pub async fn serve(&self, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                res = listener.accept() => match res {
                    Ok((sock, peer)) => {
                        if self.registry.open.fetch_add(1, Ordering::Relaxed) >= CONNECTIONS_MAX {
                            self.registry.open.fetch_sub(1, Ordering::Relaxed);
                            tracing::warn!(%peer, limit = CONNECTIONS_MAX, "refusing a connection: the portal's connection limit is reached (a login flood?)");
                            drop(sock);
                            continue;
                        }
                        let guard = OpenGuard(Arc::clone(&self.registry));
                        let this = self.clone();
                        let rx = shutdown.clone();
                        let id = self.registry.next_conn.fetch_add(1, Ordering::Relaxed);
                        conns.spawn(async move {
                            this.run_connection(sock, peer, id, rx).instrument(tracing::info_span!("conn", id, %peer)).await;
                            drop(guard);
                        });
                    }
                    Err(e) => {
                        tracing::warn!(cause = %e, "accept failed (out of file descriptors?)");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = shutdown.changed() => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        while conns.join_next().await.is_some() {}
    }

    async fn run_connection(
        &self,
        mut sock: TcpStream,
        peer: SocketAddr,
        conn_id: u64,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let _ = sock.set_nodelay(true);
        let ka = TcpKeepalive::new()
            .with_time(Duration::from_secs(30))
            .with_interval(Duration::from_secs(10));
        let _ = SockRef::from(&sock).set_tcp_keepalive(&ka);
        tracing::debug!("accepted");
        let mut conn = Connection::new(
            Arc::clone(&self.cfg),
            self.registry.alloc_tsih(),
            Instant::now(),
        );
        let mut running: Running = FuturesUnordered::new();
        let mut ready: Vec<(u32, CommandOutcome)> = Vec::new();
        let kill = Arc::new(Notify::new());
        let mut session_key: Option<SessionKey> = None;
        let mut info: Option<Arc<SessionInfo>> = None;
        let portal = sock.local_addr().unwrap_or(peer);
        let mut inbuf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
        let mut outbuf = Transmit::default();
        let mut closing: Option<String> = None;
        let mut shutting_down = *shutdown.borrow();
        if shutting_down {
            conn.handle_shutdown(Instant::now());
        }
        loop {
            for (itt, outcome) in ready.drain(..) {
                conn.handle_outcome(itt, outcome);
            }
            // Drain events.
            while let Some(ev) = conn.poll_event() {
                match ev {
                    Event::Execute { itt, cmd } => {
                        let Some(dev) = conn.device() else { continue };
                        // Admission happens here, in CmdSN order; execution is concurrent.
                        let admitted = dev.admit(cmd);
                        let counted = info.clone();
                        if let Some(i) = &counted {
                            i.in_flight.fetch_add(1, Ordering::Relaxed);
                        }
                        running.push(Box::pin(async move {
                            let outcome = dev.run(admitted).await;
                            if let Some(i) = counted {
                                i.in_flight.fetch_sub(1, Ordering::Relaxed);
                                i.commands.fetch_add(1, Ordering::Relaxed);
                            }
                            (itt, outcome)
                        }));
                    }
                    Event::LoggedIn {
                        initiator_name,
                        isid,
                        target,
                        tsih,
                    } => {
                        let i = Arc::new(SessionInfo {
                            initiator_name: initiator_name.clone(),
                            isid,
                            target: target.clone(),
                            tsih,
                            peer,
                            portal,
                            tpgt: self.cfg.tpgt,
                            since_unix: std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .map_or(0, |d| d.as_secs()),
                            params: conn.params().key_values(),
                            in_flight: AtomicU64::new(0),
                            commands: AtomicU64::new(0),
                        });
                        info = Some(Arc::clone(&i));
                        let key = (initiator_name, isid, target);
                        let old = self
                            .registry
                            .sessions
                            .lock()
                            .expect("registry lock")
                            .insert(key.clone(), (conn_id, Arc::clone(&kill), i));
                        if let Some((_, old_kill, _)) = old {
                            tracing::info!(
                                tsih,
                                "session reinstatement: closing the older session with this ISID"
                            );
                            old_kill.notify_one();
                        }
                        session_key = Some(key);
                    }
                    Event::ClearTaskSet { nexus, lun } => {
                        if let Some(dev) = conn.device() {
                            dev.clear_task_set(&nexus, lun);
                        }
                    }
                    Event::Reset { nexus, lun } => {
                        if let Some(dev) = conn.device() {
                            // Awaited before the TMF response goes out (it is transmitted
                            // below), so the reset has taken effect everywhere first.
                            driving(dev.reset(&nexus, lun), &mut running, &mut ready).await;
                        }
                    }
                    Event::Close { reason } => {
                        // The nexus ends before the last response (a Logout Response) goes
                        // out: its SPC-2 reservation is released (cluster-wide) by the time
                        // the initiator hears the logout completed.
                        if let (Some(dev), Some(nexus)) = (conn.device(), conn.nexus()) {
                            driving(dev.nexus_lost(&nexus), &mut running, &mut ready).await;
                        }
                        closing = Some(reason);
                    }
                }
            }
            if conn.poll_transmit_vectored(&mut outbuf) {
                let stall = Duration::from_millis(self.cfg.timers.nop_timeout_ms);
                let write = tokio::time::timeout(stall, write_all_vectored(&mut sock, &outbuf));
                match driving(write, &mut running, &mut ready).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::debug!(cause = %e, "write failed");
                        break;
                    }
                    Err(_) => {
                        tracing::warn!(%peer, blocked_ms = self.cfg.timers.nop_timeout_ms, "dropping connection: the initiator stopped reading");
                        break;
                    }
                }
                conn.recycle(&mut outbuf);
            }
            if let Some(reason) = &closing {
                tracing::info!(%peer, reason = %reason, "connection closed");
                break;
            }
            let timeout = conn.poll_timeout();
            let sleep = async {
                match timeout {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            inbuf.reserve(READ_CHUNK);
            tokio::select! {
                res = sock.read_buf(&mut inbuf) => match res {
                    Ok(0) => {
                        tracing::debug!("peer closed the connection");
                        break;
                    }
                    Ok(_) => match conn.handle_bytes(Instant::now(), &inbuf) {
                        Ok(used) => {
                            inbuf.drain(..used);
                        }
                        Err(e) => {
                            tracing::warn!(%peer, cause = %e, "dropping connection after a protocol error");
                            closing = Some(e.to_string());
                        }
                    },
                    Err(e) => {
                        tracing::debug!(cause = %e, "read failed");
                        break;
                    }
                },
                Some((itt, outcome)) = running.next(), if !running.is_empty() => {
                    conn.handle_outcome(itt, outcome);
                    // Every outcome already finished goes out in the same write: at queue
                    // depth N that is one send for many responses, not one each.
                    while let Some(Some((itt, outcome))) = running.next().now_or_never() {
                        conn.handle_outcome(itt, outcome);
                    }
                }
                _ = sleep => conn.handle_timeout(Instant::now()),
                _ = kill.notified() => closing = Some("reinstated by a newer login".into()),
                _ = shutdown.changed(), if !shutting_down => {
                    shutting_down = true;
                    conn.handle_shutdown(Instant::now());
                }
            }
        }
        if let (Some(dev), Some(nexus)) = (conn.device(), conn.nexus()) {
            driving(dev.nexus_lost(&nexus), &mut running, &mut ready).await;
        }
        if !running.is_empty() {
            // Commands are finished, not cancelled midway (a write stops between holders
            // only when a controller does); nobody is left to hear their outcomes.
            tokio::spawn(async move { while running.next().await.is_some() {} });
        }
        if let Some(key) = session_key {
            let mut s = self.registry.sessions.lock().expect("registry lock");
            if s.get(&key).is_some_and(|(id, _, _)| *id == conn_id) {
                s.remove(&key);
            }
        }
        let _ = sock.shutdown().await;
    }
}

/// Writes every byte of `t` with vectored writes (large Data-In segments straight from the
/// buffers they were read into), however many calls the socket takes.
async fn write_all_vectored(sock: &mut TcpStream, t: &Transmit) -> std::io::Result<()> {
    if let Some(bytes) = t.single() {
        return sock.write_all(bytes).await;
    }
    let mut slices = t.io_slices();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = sock.write_vectored(rest).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        std::io::IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}
