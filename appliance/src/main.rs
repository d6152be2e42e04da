//! `appliance`: the controller daemon and its command line.
//!
//! - `appliance up`: a local appliance on loopback with a default volume, for trying it out.
//! - `appliance run --config FILE`: one controller from a config file.
//! - `appliance check-config FILE`: validate a config and exit.
//!
//! Invariants: the process exits non-zero with a message naming the cause and the fix when it
//! cannot start; SIGINT/SIGTERM stop it cleanly (initiators asked to log out, data flushed).

#![forbid(unsafe_code)]

mod config;
mod server;

use clap::{Parser, Subcommand};
use config::Config;
use std::path::PathBuf;
use std::process::ExitCode;
use tokio::sync::watch;

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
    /// Start a local appliance on loopback with a default 1 GiB volume.
    Up {
        /// Data directory (created with a default config on first start).
        #[arg(long, default_value = "appliance-data")]
        data_dir: PathBuf,
        /// Portal address.
        #[arg(long, default_value = config::DEFAULT_LISTEN)]
        listen: String,
    },
    /// Run one controller from a config file.
    Run {
        /// Path to the TOML config.
        #[arg(long)]
        config: PathBuf,
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
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (cfg, banner) = match cli.cmd {
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
        Cmd::Up { data_dir, listen } => {
            let path = data_dir.join("appliance.toml");
            if !path.exists() {
                if let Err(e) = std::fs::create_dir_all(&data_dir)
                    .and_then(|_| std::fs::write(&path, config::default_config_text(&listen)))
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
        let controller = match server::Controller::start(&cfg) {
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
                "  console    : not built yet (the web console arrives with the operator issue)"
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
