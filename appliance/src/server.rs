//! Wires one controller together: opens backing devices, builds the device server, starts the
//! portal, and shuts down cleanly (initiators asked to log out, writes flushed).
//!
//! Invariants:
//! - A volume's identity (NAA designator, serial) is a pure function of the target IQN and
//!   the volume name, so it is the same on every start and every controller.
//! - Every volume is flushed (fdatasync) before the process exits normally.

use crate::config::{ClusterConfig, Config, VolumeConfig};
use appliance::node::{ControllerNode, MembershipTimers, NodeConfig};
use appliance::peer::PeerLimits;
use iscsi_target::{FabricConfig, Portal, TargetInfo, Timers};
use lun::{DeviceServer, LogicalUnit, LuIdentity, TargetPort};
use raid_engine::cluster::VolumeMeta;
use raid_engine::disk_store::{store_bytes, DiskShardStore, VolumeSlots};
use raid_engine::layout::{Geometry, Layout};
use raid_engine::{ClusterVolume, LocalVolume, Volume};
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
    volumes: Vec<Arc<Volume>>,
    node: Option<ControllerNode>,
    /// The addresses the portals actually listen on, in config order.
    pub listen: Vec<std::net::SocketAddr>,
    portals: Vec<(iscsi_target::driver::Server, tokio::net::TcpListener)>,
}

impl Controller {
    /// Opens devices and binds the portal.
    ///
    /// # Errors
    /// A message naming the likely cause and the fix.
    pub async fn start(cfg: &Config) -> Result<Self, String> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
            format!(
                "cannot create data dir {}: {e} (check permissions or pick another data_dir)",
                cfg.data_dir.display()
            )
        })?;
        // Cluster volumes from the engine, or one local device per volume.
        let (mut node, backends) = match &cfg.cluster {
            Some(cl) => {
                let (n, vols) = start_cluster(cfg, cl).await?;
                (Some(n), vols)
            }
            None => (
                None,
                cfg.volumes
                    .iter()
                    .map(|v| local_volume(cfg, v))
                    .collect::<Result<_, _>>()?,
            ),
        };
        let mut luns = BTreeMap::new();
        let mut volumes = Vec::new();
        for (v, vol) in cfg.volumes.iter().zip(backends) {
            let vol = Arc::new(vol);
            let key = volume_id(&cfg.iqn, &v.name);
            let lu = LogicalUnit::new(LuIdentity::for_volume(key), v.block_size, Arc::clone(&vol));
            // In a cluster, reservations live in the metadata log (and so survive a restart
            // of every controller); a single controller keeps APTPL state in a file.
            let lu = match &node {
                Some(n) => Arc::new(lu.with_shared_state(key, n.env.clone())),
                None => Arc::new(
                    lu.with_pr_store(cfg.data_dir.join(format!("{}.pr", v.name)))
                        .map_err(|e| e.to_string())?,
                ),
            };
            if let Some(n) = &node {
                n.env.register_lu(key, &lu);
            }
            luns.insert(v.lun, lu);
            volumes.push(vol);
        }
        // Bind every portal first: SendTargets on each lists them all.
        let mut listeners = Vec::new();
        for addr in &cfg.listen {
            let l = iscsi_target::driver::bind(*addr).map_err(|e| {
                format!("cannot listen on {addr}: {e} (another target such as tgtd or a second appliance may hold the port; stop it or set iscsi.listen)")
            })?;
            listeners.push(l);
        }
        let listen: Vec<std::net::SocketAddr> = listeners
            .iter()
            .map(|l| l.local_addr().map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        // Portal i is its own target port group and relative port (tpgt + i): one path each,
        // the same LUs (and so the same reservations and identity) behind all of them. In a
        // cluster, controller `id` is target port group `id`.
        let first = cfg
            .cluster
            .as_ref()
            .map_or(cfg.tpgt, |c| u16::try_from(c.id).unwrap_or(u16::MAX));
        let ports: Vec<TargetPort> = (0..listen.len())
            .map(|i| {
                let id = first + i as u16;
                TargetPort {
                    relative_port: id,
                    port_group: id,
                }
            })
            .collect();
        let mut all_portals: Vec<Portal> = listen
            .iter()
            .zip(&ports)
            .map(|(a, p)| Portal {
                address: a.to_string(),
                tpgt: p.port_group,
            })
            .collect();
        let mut groups = ports.clone();
        if let Some(cl) = &cfg.cluster {
            for (&id, addr) in cl.portals.iter().filter(|(id, _)| **id != cl.id) {
                let g = u16::try_from(id).unwrap_or(u16::MAX);
                all_portals.push(Portal {
                    address: addr.to_string(),
                    tpgt: g,
                });
                groups.push(TargetPort {
                    relative_port: g,
                    port_group: g,
                });
            }
        }
        // One set of access states for every port of this controller, kept in step with the
        // cluster's membership (all active/optimized for a single controller).
        let alua = Arc::new(lun::alua::AccessStates::default());
        if let Some(n) = node.as_mut() {
            n.publish_access_states(alua.clone());
        }
        let mut portals = Vec::new();
        let chap_challenges = Arc::new(iscsi_target::ChapChallengeHistory::default());
        for (listener, port) in listeners.into_iter().zip(&ports) {
            let device = Arc::new(
                DeviceServer::new(*port, luns.clone())
                    .with_port_groups(groups.clone())
                    .with_access_states(alua.clone()),
            );
            let fabric = FabricConfig {
                targets: vec![TargetInfo {
                    name: cfg.iqn.clone(),
                    alias: cfg.alias.clone(),
                    chap: cfg.chap.clone(),
                    allowed_initiators: cfg
                        .allowed_initiators
                        .clone()
                        .map(iscsi_target::InitiatorPatterns),
                    portals: all_portals.clone(),
                    device,
                }],
                discovery_chap: cfg.discovery_chap.clone(),
                tpgt: port.port_group,
                relative_port: port.relative_port,
                timers: Timers::default(),
                limits: iscsi_target::SessionLimits::new(
                    cfg.sessions_per_target,
                    cfg.sessions_per_initiator,
                ),
                chap_challenges: Arc::clone(&chap_challenges),
            };
            portals.push((
                iscsi_target::driver::Server::new(Arc::new(fabric)),
                listener,
            ));
        }
        Ok(Self {
            volumes,
            node,
            listen,
            portals,
        })
    }

    /// Serves until `shutdown` turns true, then flushes every volume.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let mut serving = tokio::task::JoinSet::new();
        for (server, listener) in self.portals {
            let rx = shutdown.clone();
            serving.spawn(async move { server.serve(listener, rx).await });
        }
        while serving.join_next().await.is_some() {}
        for v in &self.volumes {
            if let Err(e) = v.flush().await {
                tracing::error!(cause = %e, "flush at shutdown failed");
            }
        }
        if let Some(n) = self.node {
            n.shutdown().await;
        }
        tracing::info!("stopped");
    }
}

/// A single controller's volume: one backing file or device of its own.
fn local_volume(cfg: &Config, v: &VolumeConfig) -> Result<Volume, String> {
    let mut dc =
        disk_io::DeviceConfig::file(cfg.data_dir.join(format!("{}.img", v.name)), v.size_bytes);
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
    Ok(Volume::Local(
        LocalVolume::new(Arc::new(dev), 0, v.size_bytes).map_err(|e| e.to_string())?,
    ))
}

/// The cluster geometry of a volume: `rows_per_extent` gives 64 MiB extents (the design's
/// default), and placement rotates over every controller.
fn volume_meta(cfg: &Config, cl: &ClusterConfig, v: &VolumeConfig) -> Result<VolumeMeta, String> {
    let rows = raid_engine::layout::default_rows_per_extent(cl.k, cl.chunk_bytes);
    let geometry = Geometry::new(
        cl.k,
        cl.m,
        cl.chunk_bytes,
        rows,
        raid_engine::codec::CodecKind::default(),
        cl.write_quorum,
    )
    .map_err(|e| format!("cluster geometry: {e}"))?;
    let layout = Layout {
        size_bytes: v.size_bytes,
        geometry,
    };
    let ids: Vec<u32> = cl.peers.keys().copied().collect();
    VolumeMeta::rotated(cluster_volume_id(cfg, v), layout, &ids).map_err(|e| e.to_string())
}

fn cluster_volume_id(cfg: &Config, v: &VolumeConfig) -> u32 {
    volume_id(&cfg.iqn, &v.name) as u32
}

/// Starts this controller's share of the cluster: shard store, metadata replica, peers.
async fn start_cluster(
    cfg: &Config,
    cl: &ClusterConfig,
) -> Result<(ControllerNode, Vec<Volume>), String> {
    let named: Vec<(String, VolumeMeta)> = cfg
        .volumes
        .iter()
        .map(|v| Ok((v.name.clone(), volume_meta(cfg, cl, v)?)))
        .collect::<Result<_, String>>()?;
    let metas: Vec<VolumeMeta> = named.iter().map(|(_, m)| m.clone()).collect();
    let slots: Vec<VolumeSlots> = metas
        .iter()
        .map(|m| VolumeSlots {
            volume: m.id,
            extents: m.placement.len() as u64,
            rows_per_extent: m.layout.geometry.rows_per_extent,
        })
        .collect();
    let chunk = cl.chunk_bytes as usize;
    let mut dc =
        disk_io::DeviceConfig::file(cfg.data_dir.join("shards.img"), store_bytes(chunk, &slots));
    dc.engine = cfg.engine;
    dc.direct = cfg.direct;
    let dev = Arc::new(disk_io::Device::open(&dc).map_err(|e| e.to_string())?);
    let store = DiskShardStore::open(dev, chunk, &slots, false)
        .await
        .map_err(|e| e.to_string())?;
    let peer_addr = cl.peers[&cl.id];
    let listener = tokio::net::TcpListener::bind(peer_addr).await.map_err(|e| {
        format!("cannot listen for peers on {peer_addr}: {e} (another controller may use the port; check cluster.peers)")
    })?;
    let node_cfg = NodeConfig {
        id: cl.id,
        peers: cl.peers.clone(),
        limits: PeerLimits::default(),
        timers: MembershipTimers::default(),
        bootstrap: cl.bootstrap,
    };
    let node =
        ControllerNode::start(&node_cfg, &cfg.data_dir, listener, Arc::new(store), named).await?;
    if cl.bootstrap {
        let members: Vec<u32> = cl.peers.keys().copied().collect();
        match node.initialize(&members).await {
            Ok(()) => tracing::info!(?members, "metadata log formed"),
            Err(e) => tracing::info!(reason = %e, "metadata log already formed"),
        }
    }
    let vols = metas
        .iter()
        .map(|m| {
            Volume::Cluster(ClusterVolume::new(
                node.engine.clone(),
                m.id,
                m.layout.size_bytes,
            ))
        })
        .collect();
    Ok((node, vols))
}
