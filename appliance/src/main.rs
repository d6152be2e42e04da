//! `appliance`: the controller daemon and its command line.
//!
//! - `appliance up`: a local appliance on loopback with a default volume, for trying it out.
//! - `appliance run --config FILE`: one controller from a config file.
//! - `appliance check-config FILE`: validate a config and exit.
//!
//! Invariants: the process exits non-zero with a message naming the cause and the fix when it
//! cannot start; SIGINT/SIGTERM stop it cleanly (initiators asked to log out, data flushed).

#![forbid(unsafe_code)]

mod cli;

use appliance::config::{self, Config};
use appliance::server;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tokio::sync::watch;

/// mimalloc: per-thread free lists instead of glibc's consolidating heap, whose internals
/// (`unlink_chunk`, `_int_malloc`, `malloc_consolidate`) showed up at 5-12% of the cluster's
/// write-path profile (docs/benchmarks.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "appliance",
    version,
    about = "Distributed iSCSI target appliance controller"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start a local cluster on loopback (one process per controller) with a default 1 GiB
    /// volume served through every controller's portal.
    Up {
        /// Data directory (created with default configs on first start; controller i uses
        /// `c<i>/` inside it).
        #[arg(long, default_value = "appliance-data")]
        data_dir: PathBuf,
        /// Portal of the first controller; controller i listens on the next ports.
        #[arg(long, default_value = config::DEFAULT_LISTEN)]
        listen: String,
        /// Controllers (1 runs a single controller with a local volume).
        #[arg(long, default_value_t = 3)]
        controllers: u32,
        /// Data columns per stripe row.
        #[arg(long, default_value_t = 2)]
        k: usize,
        /// Parity columns per stripe row.
        #[arg(long, default_value_t = 1)]
        m: usize,
        /// Chunk size (one column of a stripe row), written into new configs only: it is an
        /// on-disk format, so an existing data directory keeps the chunk it was made with.
        #[arg(long, default_value = "64KiB")]
        chunk: String,
        /// Web console and API of the first controller; controller i uses the next ports.
        #[arg(long, default_value = "127.0.0.1:8080")]
        api: String,
    },
    /// Read a password on stdin and print its argon2 hash for `api.admin_password_hash`.
    HashPassword,
    /// Volumes, through the API of any controller.
    Volume {
        #[command(subcommand)]
        cmd: cli::VolumeCmd,
        #[command(flatten)]
        api: cli::ApiArgs,
    },
    /// Controllers, through the API of any controller.
    Controller {
        #[command(subcommand)]
        cmd: cli::ControllerCmd,
        #[command(flatten)]
        api: cli::ApiArgs,
    },
    /// iSCSI sessions, through the API of any controller.
    Session {
        #[command(subcommand)]
        cmd: cli::SessionCmd,
        #[command(flatten)]
        api: cli::ApiArgs,
    },
    /// Long-running jobs (resync), through the API of any controller.
    Job {
        #[command(subcommand)]
        cmd: cli::JobCmd,
        #[command(flatten)]
        api: cli::ApiArgs,
    },
    /// Run one controller from a config file.
    Run {
        /// Path to the TOML config.
        #[arg(long)]
        config: PathBuf,
    },
    /// Show a running cluster as one controller sees it: controllers, states, epoch, leader,
    /// chunks still to resync.
    Status {
        /// A controller's peer address (`up` uses portal port + 1000, e.g. 127.0.0.1:4260).
        #[arg(long, default_value = "127.0.0.1:4260")]
        peer: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The cluster's certificate directory (its CA and `operator.pem`), as `appliance up`
        /// makes it; `none` for a cluster with `cluster.tls = false`.
        #[arg(long, default_value = "appliance-data/pki")]
        pki: PathBuf,
    },
    /// Make the cluster CA (when missing) and certificates for controllers (and the
    /// operator's, for `appliance status`) for mutual TLS on peer links.
    Pki {
        /// Directory of the CA and certificates (`cluster.pki` of each controller).
        #[arg(long)]
        dir: PathBuf,
        /// Controller ids to issue certificates for (repeat, or comma-separated).
        #[arg(long = "controller", value_delimiter = ',', required = true)]
        controllers: Vec<u32>,
    },
    /// Check a config file and exit.
    CheckConfig {
        /// Path to the TOML config.
        config: PathBuf,
    },
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // Colours only on a terminal: log files stay plain text (greppable).
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    // No transparent huge pages for this process (and the controllers `up` starts, which
    // inherit it): mimalloc returns idle memory to the OS and takes it back later, and with
    // THP each take-back faulted in and zeroed a whole 2 MiB page (4.7% of the cluster's 4K
    // write profile; 5-11% more IOPS without, larger I/O unchanged; docs/benchmarks.md).
    // Best effort: a kernel without the flag just keeps THP.
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    let cli = Cli::parse();
    // A data-path process on an AMD CPU with FSRM restarts itself once with glibc's `rep
    // movsb` threshold raised (appliance::copy_tuning): 64 KiB copies at short distances ran
    // at a tenth of their speed. The controllers `up` starts inherit the setting. Logging is
    // not up yet: a failed restart is said on stderr (a controller's log under `up`).
    if matches!(cli.cmd, Cmd::Run { .. } | Cmd::Up { .. }) {
        if let Some(e) = appliance::copy_tuning::restart_if_needed() {
            eprintln!("warning: {e}");
        }
    }
    let (cfg, banner) = match cli.cmd {
        Cmd::Status { peer, json, pki } => return status(&peer, json, &pki),
        Cmd::Pki { dir, controllers } => return pki(&dir, &controllers),
        Cmd::HashPassword => return hash_password(),
        Cmd::Volume { cmd, api } => return cli::volume(&api, cmd),
        Cmd::Controller { cmd, api } => return cli::controller(&api, cmd),
        Cmd::Session { cmd, api } => return cli::session(&api, cmd),
        Cmd::Job { cmd, api } => return cli::job(&api, cmd),
        Cmd::CheckConfig { config } => {
            return match Config::load(&config) {
                Ok(_) => {
                    println!("{}: ok", config.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Cmd::Run { config } => match Config::load(&config) {
            Ok(c) => (c, false),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        },
        Cmd::Up {
            data_dir,
            listen,
            controllers,
            k,
            m,
            chunk,
            api,
        } if controllers > 1 => {
            return up_cluster(&data_dir, &listen, controllers, (k, m, &chunk), &api);
        }
        Cmd::Up {
            data_dir,
            listen,
            api,
            ..
        } => {
            let path = data_dir.join("appliance.toml");
            if !path.exists() {
                let text = match first_password(&data_dir) {
                    Ok(hash) => format!(
                        "{}\n[api]\nlisten = \"{api}\"\nadmin_password_hash = \"{hash}\"\n",
                        config::default_config_text(&listen)
                    ),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                if let Err(e) =
                    std::fs::create_dir_all(&data_dir).and_then(|_| std::fs::write(&path, text))
                {
                    eprintln!(
                        "error: cannot create {}: {e} (check permissions or pass --data-dir)",
                        path.display()
                    );
                    return ExitCode::FAILURE;
                }
            }
            match Config::load(&path) {
                Ok(c) => (c, true),
                Err(e) => {
                    eprintln!(
                        "error: {e}\n(fix {} or delete it to start from the defaults)",
                        path.display()
                    );
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    init_logging(&cfg.log_level);
    if std::env::var_os(appliance::copy_tuning::MARK).is_some() {
        tracing::info!(
            tunable = appliance::copy_tuning::TUNABLE,
            "restarted with glibc's rep movsb threshold raised (AMD CPU with FSRM: copies at short distances are slow with it)"
        );
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        // Handlers first: a signal that arrives once the portal is announced must stop the
        // appliance cleanly (initiators told, data flushed), not kill it.
        let signals = match Signals::install() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: cannot install signal handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
        let controller = match server::Controller::start(&cfg).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        if banner {
            println!("appliance is up");
            println!("  target IQN : {}", cfg.iqn);
            for (i, p) in controller.listen.iter().enumerate() {
                println!("  portal     : {p} (TPGT {})", cfg.tpgt + i as u16);
            }
            for v in &cfg.volumes {
                println!(
                    "  LUN {:<7}: {} ({} bytes, {}-byte blocks)",
                    v.lun, v.name, v.size_bytes, v.block_size
                );
            }
            println!("  data dir   : {}", cfg.data_dir.display());
            println!(
                "  console    : {}",
                console_line(cfg.api.as_ref(), &cfg.data_dir)
            );
            println!(
                "  try        : iscsi-ls -s iscsi://{}",
                controller.listen[0]
            );
            println!("Press Ctrl-C to stop.");
        }
        tracing::info!(portals = ?controller.listen, iqn = %cfg.iqn, "serving");
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            signals.wait().await;
            tracing::info!("signal received: asking initiators to log out, then stopping");
            let _ = tx.send(true);
        });
        controller.run(rx).await;
        ExitCode::SUCCESS
    })
}

/// SIGINT and SIGTERM, registered with the OS as soon as this is created.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}

/// `appliance up --controllers N`: writes one config per controller (first start only), runs
/// each as its own process, prints the portals, and stops them all on Ctrl-C or SIGTERM.
fn up_cluster(
    data_dir: &std::path::Path,
    listen: &str,
    n: u32,
    (k, m, chunk): (usize, usize, &str),
    api: &str,
) -> ExitCode {
    use std::net::SocketAddr;
    let first: SocketAddr = match listen.parse() {
        Ok(a) => a,
        Err(_) => {
            eprintln!("error: --listen `{listen}` is not ip:port, e.g. 127.0.0.1:3260");
            return ExitCode::FAILURE;
        }
    };
    let api_first: SocketAddr = match api.parse() {
        Ok(a) => a,
        Err(_) => {
            eprintln!("error: --api `{api}` is not ip:port, e.g. 127.0.0.1:8080");
            return ExitCode::FAILURE;
        }
    };
    let api_at = |i: u32| SocketAddr::new(api_first.ip(), api_first.port() + (i as u16 - 1));
    // The controllers' own config check decides (one rule): a bad --chunk fails here, before
    // any config is written, not in every controller at start.
    let geometry = config::parse_size(chunk)
        .and_then(|c| u32::try_from(c).ok())
        .ok_or_else(|| format!("`{chunk}` is not a size such as 16KiB"))
        .and_then(|c| {
            raid_engine::layout::Geometry::new(k, m, c, 1, Default::default(), None)
                .map_err(|e| e.to_string())
        });
    if let Err(e) = geometry {
        eprintln!("error: --chunk/--k/--m: {e}");
        return ExitCode::FAILURE;
    }
    if (n as usize) < k + m {
        eprintln!("error: {n} controllers cannot hold k + m = {} shards on distinct controllers; use --controllers {} or lower --k/--m", k + m, k + m);
        return ExitCode::FAILURE;
    }
    let at = |i: u32, base: u16| SocketAddr::new(first.ip(), base + (i as u16 - 1));
    let Some(peer_base) = first.port().checked_add(1000) else {
        eprintln!("error: --listen port too high to derive peer ports (portal + 1000)");
        return ExitCode::FAILURE;
    };
    let ids: Vec<u32> = (1..=n).collect();
    // Every port must be free before anything starts, so a clash is reported plainly.
    for &i in &ids {
        for (what, addr) in [
            ("listen", at(i, first.port())),
            ("listen for peers", at(i, peer_base)),
            ("serve the console on", api_at(i)),
        ] {
            if let Err(e) = std::net::TcpListener::bind(addr) {
                eprintln!("error: cannot {what} on {addr}: {e} (another target such as tgtd or a second appliance may hold the port; stop it or pick other ports with --listen)");
                return ExitCode::FAILURE;
            }
        }
    }
    // Mutual TLS on the peer links: the CA and every controller's certificate, made once.
    let pki_dir = data_dir.join("pki");
    let mut pki_ids = ids.clone();
    pki_ids.push(0);
    if let Err(e) = appliance::peer::tls::issue(&pki_dir, &pki_ids) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let pki_abs = std::fs::canonicalize(&pki_dir).unwrap_or_else(|_| pki_dir.clone());
    let map = |base: u16| {
        ids.iter()
            .map(|&i| format!("\"{i}\" = \"{}\"", at(i, base)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut configs = Vec::new();
    let mut hash = None;
    for &i in &ids {
        let dir = data_dir.join(format!("c{i}"));
        let path = dir.join("appliance.toml");
        if !path.exists() {
            if hash.is_none() {
                match first_password(data_dir) {
                    Ok(h) => hash = Some(h),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            let mut text = config::default_config_text(&at(i, first.port()).to_string());
            text = text.replace("tpgt = 1\n", &format!("tpgt = {i}\n"));
            text.push_str(&format!(
                "\n[cluster]\nid = {i}\npeers = {{ {} }}\nportals = {{ {} }}\nk = {k}\nm = {m}\nchunk = \"{chunk}\"\nbootstrap = {}\npki = {}\n",
                map(peer_base),
                map(first.port()),
                i == 1,
                toml::Value::String(pki_abs.display().to_string())
            ));
            text.push_str(&format!(
                "\n[api]\nlisten = \"{}\"\nadmin_password_hash = \"{}\"\n",
                api_at(i),
                hash.as_deref().unwrap_or_default()
            ));
            if let Err(e) = std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&path, text))
            {
                eprintln!(
                    "error: cannot create {}: {e} (check permissions or pass --data-dir)",
                    path.display()
                );
                return ExitCode::FAILURE;
            }
        }
        match Config::load(&path) {
            Ok(c) => configs.push((path, c)),
            Err(e) => {
                eprintln!(
                    "error: {e}\n(fix {} or delete {} to start from the defaults)",
                    path.display(),
                    data_dir.display()
                );
                return ExitCode::FAILURE;
            }
        }
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: cannot find this program's path to start controllers: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The controllers share this machine's cores: each gets its share of runtime worker
    // threads (at least one) instead of one per core each, which on a 2-core machine with
    // three controllers cost more in cross-thread wake-ups than it gained (64 KiB reads
    // 9.7-11.9k -> 14.4k IOPS, docs/benchmarks.md). TOKIO_WORKER_THREADS set by the
    // operator wins.
    let threads = std::env::var_os("TOKIO_WORKER_THREADS").map_or_else(
        || {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / configs.len()).max(1).to_string()
        },
        |v| v.to_string_lossy().into_owned(),
    );
    let mut children = Vec::new();
    for (path, cfg) in &configs {
        let log = cfg.data_dir.join("appliance.log");
        let out = std::fs::File::create(&log).and_then(|f| Ok((f.try_clone()?, f)));
        let Ok((o, e)) = out else {
            eprintln!("error: cannot write {}", log.display());
            stop_all(&mut children);
            return ExitCode::FAILURE;
        };
        match std::process::Command::new(&exe)
            .args(["run", "--config"])
            .arg(path)
            .env("TOKIO_WORKER_THREADS", &threads)
            .stdout(o)
            .stderr(e)
            .spawn()
        {
            Ok(c) => children.push(c),
            Err(err) => {
                eprintln!("error: cannot start a controller: {err}");
                stop_all(&mut children);
                return ExitCode::FAILURE;
            }
        }
    }
    // Every portal accepts connections first (a controller that cannot bind or start is
    // reported here), then the cluster forms and serves the volume (below).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    for (_, cfg) in &configs {
        while std::net::TcpStream::connect(cfg.listen[0]).is_err() {
            if std::time::Instant::now() > deadline
                || children
                    .iter_mut()
                    .any(|c| matches!(c.try_wait(), Ok(Some(_))))
            {
                eprintln!(
                    "error: a controller did not start; see {}/c*/appliance.log",
                    data_dir.display()
                );
                stop_all(&mut children);
                return ExitCode::FAILURE;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    // Up means served: every controller sees every controller up, is not fenced, and holds
    // every configured volume. Before then a host that logs in gets NOT READY.
    if let Err(e) = wait_served(&configs, deadline, &mut children) {
        eprintln!("error: {e}; see {}/c*/appliance.log", data_dir.display());
        stop_all(&mut children);
        return ExitCode::FAILURE;
    }
    let cfg0 = &configs[0].1;
    println!("appliance cluster is up: {n} controllers, k={k} m={m}");
    println!("  target IQN : {}", cfg0.iqn);
    for (i, (_, c)) in configs.iter().enumerate() {
        println!(
            "  portal     : {} (controller {}, TPGT {}, pid {})",
            c.listen[0],
            i + 1,
            i + 1,
            children[i].id()
        );
    }
    for v in &cfg0.volumes {
        println!(
            "  LUN {:<7}: {} ({} bytes, {}-byte blocks), through every portal",
            v.lun, v.name, v.size_bytes, v.block_size
        );
    }
    println!(
        "  data dir   : {} (logs in c*/appliance.log)",
        data_dir.display()
    );
    println!(
        "  console    : {}",
        console_line(cfg0.api.as_ref(), data_dir)
    );
    println!("  try        : iscsi-ls -s iscsi://{}", cfg0.listen[0]);
    println!(
        "  peer links : mutual TLS, cluster CA and certificates in {}",
        pki_dir.display()
    );
    println!(
        "  status     : appliance status --peer {} --pki {}",
        at(1, peer_base),
        pki_dir.display()
    );
    println!("Press Ctrl-C to stop.");
    let rt = match small_runtime() {
        Some(rt) => rt,
        None => {
            stop_all(&mut children);
            return ExitCode::FAILURE;
        }
    };
    let crashed = rt.block_on(async {
        match Signals::install() {
            Ok(s) => {
                // Stop on a signal. A controller that exits on its own is reported and the
                // others keep serving (that is what the cluster is for); when none is left,
                // stop.
                let watch = async {
                    let mut gone = vec![false; children.len()];
                    loop {
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                        for (i, c) in children.iter_mut().enumerate() {
                            if let (false, Ok(Some(st))) = (gone[i], c.try_wait()) {
                                gone[i] = true;
                                eprintln!(
                                    "controller {} (pid {}) exited ({st}); the others keep serving. Its log: {}; restart it with: appliance run --config {}",
                                    i + 1,
                                    c.id(),
                                    configs[i].0.with_file_name("appliance.log").display(),
                                    configs[i].0.display()
                                );
                            }
                        }
                        if gone.iter().all(|&g| g) {
                            break;
                        }
                    }
                };
                tokio::select! {
                    _ = s.wait() => false,
                    _ = watch => {
                        eprintln!("error: every controller has exited (see {}/c*/appliance.log)", data_dir.display());
                        true
                    }
                }
            }
            Err(e) => {
                eprintln!("error: cannot install signal handlers: {e}");
                true
            }
        }
    });
    stop_all(&mut children);
    if crashed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Asks every child to stop (SIGTERM through kill(1); this crate has no unsafe code), then
/// waits; one that has not stopped after 10 s is killed.
fn stop_all(children: &mut [std::process::Child]) {
    for c in children.iter() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for c in children.iter_mut() {
        loop {
            match c.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if std::time::Instant::now() > deadline => {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(std::time::Duration::from_millis(50)),
            }
        }
    }
}

/// `appliance pki`: the cluster CA and certificates.
fn pki(dir: &std::path::Path, ids: &[u32]) -> ExitCode {
    let mut ids = ids.to_vec();
    ids.push(0);
    match appliance::peer::tls::issue(dir, &ids) {
        Ok(made) => {
            for p in made {
                println!("wrote {}", p.display());
            }
            println!(
                "certificates for controllers {:?} and the operator are in {}; point each controller's cluster.pki at a copy holding ca.pem and its own controller-<id>.pem/-key.pem",
                &ids[..ids.len() - 1],
                dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A peer client speaking as the operator (id 0) to `addr`: with the operator certificate of
/// the cluster CA in `pki` (checking, when `peer` is given, that the server is that
/// controller), or plaintext without one (`cluster.tls = false`).
fn operator_client(
    addr: std::net::SocketAddr,
    pki: Option<&std::path::Path>,
    peer: Option<u32>,
) -> Result<appliance::peer::PeerClient, String> {
    let client = appliance::peer::PeerClient::new(0, addr, appliance::peer::PeerLimits::default());
    Ok(match pki {
        Some(dir) => client.with_tls(
            &appliance::peer::tls::PeerTls::load(dir, 0).map_err(|e| e.to_string())?,
            peer,
        ),
        None => client,
    })
}

/// Waits until every controller of `up` serves its volumes (see [`served`]), polling each one's
/// status over the peer protocol as the operator (`appliance status` does the same); gives up
/// at `deadline` or when a controller exits, naming what it last saw.
fn wait_served(
    configs: &[(std::path::PathBuf, Config)],
    deadline: std::time::Instant,
    children: &mut [std::process::Child],
) -> Result<(), String> {
    use appliance::peer::wire::{MetaOp, Reply, Request};
    let rt = small_runtime().ok_or("no runtime")?;
    let mut clients = Vec::new();
    for (_, cfg) in configs {
        let Some(cl) = &cfg.cluster else { continue };
        let client = operator_client(cl.peers[&cl.id], cl.pki.as_deref(), Some(cl.id))?;
        clients.push((cl.id, client, cfg.volumes.len()));
    }
    let mut said = false;
    let mut last: String;
    for (id, client, volumes) in &clients {
        loop {
            let reply = rt.block_on(async {
                tokio::time::timeout(
                    std::time::Duration::from_secs(2),
                    client.call(0, Request::Meta(MetaOp::Status, Vec::new())),
                )
                .await
            });
            let report = match reply {
                Ok(Ok(Reply::Data(d))) => serde_json::from_slice(&d).ok(),
                _ => None,
            };
            match report {
                Some(r) if served(&r, clients.len(), *volumes) => break,
                Some(r) => {
                    last = format!(
                        "controller {id} saw epoch {}, {} volume(s), fenced {}, controllers {:?}, its ports report {:?}",
                        r.epoch,
                        r.volumes.len(),
                        r.fenced,
                        r.controllers,
                        r.access_states
                    );
                }
                None => last = format!("controller {id} did not answer its status"),
            }
            if !said {
                println!("waiting for the controllers to form the cluster and serve the volume...");
                said = true;
            }
            if std::time::Instant::now() > deadline
                || children
                    .iter_mut()
                    .any(|c| matches!(c.try_wait(), Ok(Some(_))))
            {
                return Err(format!("the cluster did not start serving ({last})"));
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    Ok(())
}

/// Whether a controller's status shows it serving: `controllers` controllers, all up, this one
/// not fenced, at least `volumes` volumes in its engine, and its ports reporting every
/// controller's port group active/optimized (until then a host's commands through them get
/// NOT READY, "asymmetric access state transition").
fn served(r: &appliance::node::StatusReport, controllers: usize, volumes: usize) -> bool {
    !r.fenced
        && r.controllers.len() == controllers
        && r.controllers.iter().all(|(_, s)| s == "up")
        && r.volumes.len() >= volumes
        && r.access_states.len() == controllers
        && r.access_states
            .iter()
            .all(|(_, s)| s == lun::alua::AccessState::ActiveOptimized.name())
}

/// `appliance status`: asks one controller over the peer protocol and prints its view.
fn status(peer: &str, json: bool, pki: &std::path::Path) -> ExitCode {
    use appliance::peer::wire::{MetaOp, Reply, Request};
    let Ok(addr) = peer.parse::<std::net::SocketAddr>() else {
        eprintln!("error: --peer `{peer}` is not ip:port, e.g. 127.0.0.1:4260");
        return ExitCode::FAILURE;
    };
    let Some(rt) = small_runtime() else {
        return ExitCode::FAILURE;
    };
    let pki = (pki != std::path::Path::new("none")).then_some(pki);
    let client = match operator_client(addr, pki, None) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}\n(pass --pki with the cluster's certificate directory, or --pki none for a cluster with cluster.tls = false)");
            return ExitCode::FAILURE;
        }
    };
    let reply = rt.block_on(client.call(0, Request::Meta(MetaOp::Status, Vec::new())));
    let body = match reply {
        Ok(Reply::Data(d)) => d,
        Ok(_) => {
            eprintln!("error: {addr} sent an unexpected reply (is it an appliance controller?)");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("error: {e} (is a controller running with this peer address? `appliance up` prints it)");
            return ExitCode::FAILURE;
        }
    };
    if json {
        return print_out(&format!("{}\n", String::from_utf8_lossy(&body)));
    }
    use std::fmt::Write as _;
    let mut out = String::new();
    let r: appliance::node::StatusReport = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot read the status from {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let _ = writeln!(
        out,
        "cluster epoch {}, metadata leader {}, as seen by controller {}{}",
        r.epoch,
        r.leader.map_or("none".into(), |l| l.to_string()),
        r.id,
        if r.fenced {
            " (which refuses I/O now)"
        } else {
            ""
        }
    );
    let _ = writeln!(out, "  controller  state");
    for (id, state) in &r.controllers {
        let _ = writeln!(out, "  {id:<10}  {state}");
    }
    let _ = writeln!(out, "  volume      size        health");
    for v in &r.volumes {
        let mut line = format!(
            "  {:#010x}  {:<10}  {}",
            v.id,
            human_bytes(v.size_bytes),
            v.health
        );
        if v.rows_behind > 0 {
            let per: Vec<String> = v
                .chunks_behind
                .iter()
                .map(|(c, n)| format!("{n} on controller {c}"))
                .collect();
            line += &format!(
                ", {} row(s) behind (chunks: {})",
                v.rows_behind,
                per.join(", ")
            );
        }
        let _ = writeln!(out, "{line}");
        if let Some(p) = &v.resync {
            let _ = writeln!(out, "              resync {}", progress_line(p, "chunks"));
        }
    }
    if let Some(p) = &r.scrub.running {
        let p = appliance::node::ResyncProgress {
            total: p.total as usize,
            done: p.done as usize,
            chunks_per_sec: p.rows_per_sec,
            eta_secs: p.eta_secs,
        };
        let _ = writeln!(out, "  scrub       {}", progress_line(&p, "rows"));
    }
    if let Some(m) = &r.moves {
        let p = appliance::node::ResyncProgress {
            total: m.rows_total as usize,
            done: m.rows_done as usize,
            chunks_per_sec: m.rows_per_sec,
            eta_secs: m.eta_secs,
        };
        let _ = writeln!(
            out,
            "  {:<11} {} ({} position(s) moving, {:.1} MiB copied)",
            m.kind,
            progress_line(&p, "rows"),
            m.positions,
            m.bytes_done as f64 / 1048576.0
        );
    }
    if let Some(why) = &r.migration {
        let _ = writeln!(out, "  migrating   this controller's shards away: {why}");
    }
    if let Some(l) = &r.scrub.last {
        let _ = writeln!(
            out,
            "  last scrub  {} rows in {:.0}s: {} bad cop{} found, {} chunk(s) rewritten, {} parity mismatch(es), {} unreadable row(s)",
            l.rows,
            l.secs,
            l.bad_chunks,
            if l.bad_chunks == 1 { "y" } else { "ies" },
            l.repaired,
            l.parity_rewritten,
            l.unreadable_rows
        );
    }
    for p in &r.problems {
        let _ = writeln!(out, "  problem: {p}");
    }
    print_out(&out)
}

/// The first start's admin password: random, written to `<data_dir>/admin-password` (mode
/// 0600, for the operator to read once and change), returned as its argon2 hash.
fn first_password(data_dir: &std::path::Path) -> Result<String, String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = data_dir.join("admin-password");
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut raw = [0u8; 20];
    getrandom::fill(&mut raw)
        .map_err(|e| format!("no OS randomness for the admin password: {e}"))?;
    let password: String = raw
        .iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect();
    std::fs::create_dir_all(data_dir)
        .and_then(|()| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)?;
            writeln!(f, "{password}")
        })
        .map_err(|e| {
            format!(
                "cannot write {}: {e} (check permissions or pass --data-dir)",
                path.display()
            )
        })?;
    appliance::api::auth::hash_password(&password)
}

/// The banner's console line.
fn console_line(api: Option<&config::ApiConfig>, data_dir: &std::path::Path) -> String {
    match api {
        Some(a) => format!(
            "http://{} (user admin, password in {})",
            a.listen,
            data_dir.join("admin-password").display()
        ),
        None => "not configured (add an [api] section with listen and admin_password_hash to the config)".into(),
    }
}

/// `appliance hash-password`: one line from stdin to an argon2 hash on stdout.
fn hash_password() -> ExitCode {
    let mut line = String::new();
    if let Err(e) = std::io::stdin().read_line(&mut line) {
        eprintln!("error: cannot read the password from stdin: {e}");
        return ExitCode::FAILURE;
    }
    match appliance::api::auth::hash_password(line.trim_end_matches(['\r', '\n'])) {
        Ok(h) => print_out(&format!("{h}\n")),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Writes `s` to stdout; a reader that went away (`| head`) is not an error worth a panic.
fn print_out(s: &str) -> ExitCode {
    use std::io::Write as _;
    let mut o = std::io::stdout().lock();
    match o.write_all(s.as_bytes()).and_then(|()| o.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: cannot write to stdout: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A job from the API as the progress the status command draws.
fn node_progress(j: &serde_json::Value) -> appliance::node::ResyncProgress {
    let n = |k: &str| j[k].as_u64().unwrap_or(0) as usize;
    appliance::node::ResyncProgress {
        total: n("total"),
        done: n("done"),
        chunks_per_sec: j["rate"].as_f64().unwrap_or(0.0),
        eta_secs: j["eta_secs"].as_f64(),
    }
}

/// `[#####...............]  25%  16/64 chunks  12.3 chunks/s  ETA 4s`
fn progress_line(p: &appliance::node::ResyncProgress, unit: &str) -> String {
    const WIDTH: usize = 20;
    let frac = if p.total == 0 {
        1.0
    } else {
        p.done as f64 / p.total as f64
    };
    let filled = ((frac * WIDTH as f64).round() as usize).min(WIDTH);
    let eta = p
        .eta_secs
        .map_or_else(|| "ETA unknown".to_string(), |s| format!("ETA {s:.0}s"));
    format!(
        "[{}{}] {:>3.0}%  {}/{} {unit}  {:.1} {unit}/s  {eta}",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled),
        frac * 100.0,
        p.done,
        p.total,
        p.chunks_per_sec
    )
}

/// Sizes in binary units, as operators write them in the config ("64 MiB").
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 || v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A single-threaded runtime for the CLI's own waits and calls; `None` (with the cause
/// printed) when the OS refuses one.
fn small_runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            None
        }
    }
}
