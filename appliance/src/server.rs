//! Wires one controller together: opens backing devices, builds the device server, starts the
//! portal, and shuts down cleanly (initiators asked to log out, writes flushed).
//!
//! Invariants:
//! - A volume's identity (NAA designator, serial) is a pure function of the target IQN and
//!   the volume name, so it is the same on every start and every controller.
//! - Every volume is flushed (fdatasync) before the process exits normally.

use crate::config::Config;
use iscsi_target::{FabricConfig, Portal, TargetInfo, Timers};
use lun::{DeviceServer, LogicalUnit, LuIdentity, TargetPort};
use raid_engine::LocalVolume;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::watch;

/// FNV-1a 64: a stable id from the target and volume names.
pub fn volume_id(iqn: &str, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in iqn.bytes().chain([b'/']).chain(name.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A running controller.
#[derive(Debug)]
pub struct Controller {
    volumes: Vec<Arc<LocalVolume>>,
    /// The address the portal actually listens on.
    pub listen: std::net::SocketAddr,
    server: iscsi_target::driver::Server,
    listener: Option<tokio::net::TcpListener>,
}

impl Controller {
    /// Opens devices and binds the portal.
    ///
    /// # Errors
    /// A message naming the likely cause and the fix.
    pub fn start(cfg: &Config) -> Result<Self, String> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
            format!(
                "cannot create data dir {}: {e} (check permissions or pick another data_dir)",
                cfg.data_dir.display()
            )
        })?;
        let mut luns = BTreeMap::new();
        let mut volumes = Vec::new();
        for v in &cfg.volumes {
            let mut dc = disk_io::DeviceConfig::file(
                cfg.data_dir.join(format!("{}.img", v.name)),
                v.size_bytes,
            );
            dc.engine = cfg.engine;
            dc.direct = cfg.direct;
            let dev = disk_io::Device::open(&dc).map_err(|e| e.to_string())?;
            if dev.size_bytes() < v.size_bytes {
                return Err(format!(
                    "backing device for volume {} holds {} bytes but the volume needs {} (use a larger device or a smaller size)",
                    v.name,
                    dev.size_bytes(),
                    v.size_bytes
                ));
            }
            let vol = Arc::new(
                LocalVolume::new(Arc::new(dev), 0, v.size_bytes).map_err(|e| e.to_string())?,
            );
            let lu = LogicalUnit::new(
                LuIdentity::for_volume(volume_id(&cfg.iqn, &v.name)),
                v.block_size,
                Arc::clone(&vol),
            )
            .with_pr_store(cfg.data_dir.join(format!("{}.pr", v.name)))
            .map_err(|e| e.to_string())?;
            luns.insert(v.lun, Arc::new(lu));
            volumes.push(vol);
        }
        let port = TargetPort {
            relative_port: cfg.tpgt,
            port_group: cfg.tpgt,
        };
        let device = Arc::new(DeviceServer::new(port, luns));
        let listener = iscsi_target::driver::bind(cfg.listen).map_err(|e| {
            format!("cannot listen on {}: {e} (another target such as tgtd or a second appliance may hold the port; stop it or set iscsi.listen)", cfg.listen)
        })?;
        let listen = listener.local_addr().map_err(|e| e.to_string())?;
        let fabric = FabricConfig {
            targets: vec![TargetInfo {
                name: cfg.iqn.clone(),
                alias: cfg.alias.clone(),
                chap: cfg.chap.clone(),
                allowed_initiators: cfg
                    .allowed_initiators
                    .clone()
                    .map(iscsi_target::InitiatorPatterns),
                portals: vec![Portal {
                    address: listen.to_string(),
                    tpgt: cfg.tpgt,
                }],
                device,
            }],
            discovery_chap: cfg.discovery_chap.clone(),
            tpgt: cfg.tpgt,
            relative_port: cfg.tpgt,
            timers: Timers::default(),
            limits: Default::default(),
        };
        Ok(Self {
            volumes,
            listen,
            server: iscsi_target::driver::Server::new(Arc::new(fabric)),
            listener: Some(listener),
        })
    }

    /// Serves until `shutdown` turns true, then flushes every volume.
    pub async fn run(mut self, shutdown: watch::Receiver<bool>) {
        let listener = self.listener.take().expect("run once");
        self.server.serve(listener, shutdown).await;
        for v in &self.volumes {
            if let Err(e) = v.flush().await {
                tracing::error!(cause = %e, "flush at shutdown failed");
            }
        }
        tracing::info!("stopped");
    }
}
