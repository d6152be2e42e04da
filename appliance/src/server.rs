//! Wires one controller together: opens backing devices, builds the device server, starts the
//! portal and the operator API, and shuts down cleanly (initiators asked to log out, writes
//! flushed).
//!
//! It also holds what the operator API sees of the controller ([`Shared`]): the LUN table
//! every port serves, the portals' session registries, the node's status, the served volumes
//! and the events log; and it creates volumes at run time.
//!
//! Invariants:
//! - A volume's identity (NAA designator, serial) is a pure function of the target IQN and
//!   the volume name, so it is the same on every start and every controller.
//! - Every volume is flushed (fdatasync) before the process exits normally.
//! - A volume created at run time is durable before it is served: in a cluster its record is
//!   in the metadata log (every controller serves it from there, also after a restart); on a
//!   single controller it is in `volumes.json`, replaced by rename.
//! - Every port of a controller serves one LUN table, so a new volume appears on all of its
//!   paths at once.

use crate::config::{ClusterConfig, Config, VolumeConfig};
use crate::events::EventLog;
use crate::node::{ControllerNode, MembershipTimers, NodeConfig, NodeHandle};
use crate::peer::PeerLimits;
use iscsi_target::driver::Registry;
use iscsi_target::{FabricConfig, Portal, TargetInfo, Timers};
use lun::device::LunTable;
use lun::{DeviceServer, LogicalUnit, LuIdentity, TargetPort};
use raid_engine::cluster::VolumeMeta;
use raid_engine::disk_store::{store_bytes, DiskShardStore, VolumeSlots};
use raid_engine::layout::{Geometry, Layout};
use raid_engine::shard::StoreSet;
use raid_engine::{ClusterVolume, LocalVolume, Volume};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
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

/// One served volume, as the operator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    /// Name.
    pub name: String,
    /// LUN (the same through every portal).
    pub lun: u16,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Logical block size.
    pub block_size: u32,
    /// Data columns per stripe row (1 on a single controller).
    pub k: usize,
    /// Parity columns per stripe row (0 on a single controller).
    pub m: usize,
    /// Created through the API (not in the config file).
    pub runtime: bool,
}

/// A request for a new volume (validated by the API, checked again here).
#[derive(Debug, Clone)]
pub struct NewVolume {
    /// Name.
    pub name: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Logical block size.
    pub block_size: u32,
    /// LUN; `None`: the lowest free one.
    pub lun: Option<u16>,
    /// Data columns (cluster only; default the cluster's).
    pub k: Option<usize>,
    /// Parity columns (cluster only; default the cluster's).
    pub m: Option<usize>,
}

/// Why a volume could not be created or deleted.
#[derive(Debug, thiserror::Error)]
pub enum VolumeOpError {
    /// No such volume.
    #[error("no volume named {0}")]
    NotFound(String),
    /// The request conflicts with a volume that exists (name or LUN).
    #[error("{message}")]
    Conflict {
        /// The request field.
        field: &'static str,
        /// What conflicts.
        message: String,
    },
    /// A value the cluster cannot serve.
    #[error("{message}")]
    Invalid {
        /// The request field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The controller could not do it now (metadata log unreachable, disk error).
    #[error("{0}")]
    Unavailable(String),
}

/// A backing device this controller opened, and what it holds.
struct DeviceEntry {
    role: String,
    /// The volume it belongs to alone (removed with it), if any.
    volume: Option<String>,
    dev: Arc<disk_io::Device>,
    store: Option<Arc<DiskShardStore>>,
}

/// One backing device as the operator sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceView {
    /// File or block device.
    pub path: String,
    /// What it holds.
    pub role: String,
    /// Size.
    pub size_bytes: u64,
    /// I/O engine (`Uring` or `Threads`).
    pub engine: String,
    /// Completed requests.
    pub ios: u64,
    /// Reads the kernel refused.
    pub read_errors: u64,
    /// Writes the kernel refused.
    pub write_errors: u64,
    /// Flushes the kernel refused.
    pub flush_errors: u64,
    /// Requests slower than 500 ms.
    pub slow_ios: u64,
    /// Shard slots that failed their checksum when read.
    pub checksum_failures: u64,
}

struct Served {
    info: VolumeInfo,
    /// Cluster volume id (the low 32 bits of the logical unit's key).
    id: u32,
    volume: Arc<Volume>,
    lu: Arc<LogicalUnit>,
    /// Files that hold its data, deleted with it (run-time volumes only).
    files: Vec<std::path::PathBuf>,
}

/// What the operator API sees of a running controller.
pub struct Shared {
    /// The controller's config.
    pub cfg: Config,
    /// The LUNs every portal of this controller serves.
    pub luns: Arc<LunTable>,
    /// Session registries, one per portal.
    pub registries: Vec<Arc<Registry>>,
    /// Portal addresses.
    pub listen: Vec<SocketAddr>,
    /// The API's own address, once bound.
    pub api_addr: Mutex<Option<SocketAddr>>,
    /// The events log.
    pub events: EventLog,
    node: RwLock<Option<NodeHandle>>,
    volumes: Mutex<BTreeMap<String, Served>>,
    devices: Mutex<Vec<DeviceEntry>>,
    stores: Option<Arc<StoreSet>>,
    creating: tokio::sync::Mutex<()>,
    started: std::time::Instant,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("iqn", &self.cfg.iqn)
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

/// One logged-in session, as the operator sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionView {
    /// The controller it is logged in to.
    pub controller: u32,
    /// InitiatorName.
    pub initiator: String,
    /// ISID, 12 hex digits.
    pub isid: String,
    /// TSIH.
    pub tsih: u16,
    /// Initiator address.
    pub peer: String,
    /// Portal.
    pub portal: String,
    /// Target portal group.
    pub tpgt: u16,
    /// Login time, seconds since the Unix epoch.
    pub since_unix: u64,
    /// Negotiated parameters.
    pub params: BTreeMap<String, String>,
    /// Commands in flight now.
    pub in_flight: u64,
    /// Commands answered since login.
    pub commands: u64,
}

/// One volume's I/O counters on one controller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeIo {
    /// Volume name.
    pub name: String,
    /// Counters.
    pub io: lun::stats::IoSnapshot,
}

/// A controller's live figures (in its status answers, so any controller can show every
/// controller's).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LiveFigures {
    /// Portals.
    pub portals: Vec<String>,
    /// Operator API address.
    pub api: Option<String>,
    /// Seconds since the controller started.
    pub uptime_secs: u64,
    /// I/O per volume.
    pub volumes: Vec<VolumeIo>,
    /// Logged-in sessions.
    pub sessions: Vec<SessionView>,
    /// Bytes of backing storage this controller holds.
    pub capacity_bytes: u64,
    /// Its backing devices with their error counters.
    #[serde(default)]
    pub devices: Vec<DeviceView>,
}

impl Shared {
    /// The node, in a cluster (none once the controller is stopping).
    pub fn node(&self) -> Option<NodeHandle> {
        self.node.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// This controller's id (1 on a single controller).
    pub fn id(&self) -> u32 {
        self.cfg.cluster.as_ref().map_or(1, |c| c.id)
    }

    /// The served volumes, by name.
    pub fn volumes(&self) -> Vec<VolumeInfo> {
        self.volumes
            .lock()
            .expect("volumes")
            .values()
            .map(|s| s.info.clone())
            .collect()
    }

    /// This controller's live figures.
    pub fn live(&self) -> LiveFigures {
        let vols = self.volumes.lock().expect("volumes");
        let volumes = vols
            .values()
            .map(|s| VolumeIo {
                name: s.info.name.clone(),
                io: s.lu.stats.snapshot(),
            })
            .collect();
        drop(vols);
        let devices: Vec<DeviceView> = self
            .devices
            .lock()
            .expect("devices")
            .iter()
            .map(|d| {
                let h = d.dev.health();
                DeviceView {
                    path: d.dev.path().display().to_string(),
                    role: d.role.clone(),
                    size_bytes: d.dev.size_bytes(),
                    engine: format!("{:?}", d.dev.engine_kind()),
                    ios: h.ios,
                    read_errors: h.read_errors,
                    write_errors: h.write_errors,
                    flush_errors: h.flush_errors,
                    slow_ios: h.slow_ios,
                    checksum_failures: d.store.as_ref().map_or(0, |s| s.checksum_failures()),
                }
            })
            .collect();
        let capacity_bytes = devices.iter().map(|d| d.size_bytes).sum();
        let id = self.id();
        let sessions = self
            .registries
            .iter()
            .flat_map(|r| r.sessions())
            .map(|i| SessionView {
                controller: id,
                initiator: i.initiator_name.clone(),
                isid: format!("{:012x}", i.isid),
                tsih: i.tsih,
                peer: i.peer.to_string(),
                portal: i.portal.to_string(),
                tpgt: i.tpgt,
                since_unix: i.since_unix,
                params: i.params.iter().cloned().collect(),
                in_flight: i.in_flight.load(std::sync::atomic::Ordering::Relaxed),
                commands: i.commands.load(std::sync::atomic::Ordering::Relaxed),
            })
            .collect();
        LiveFigures {
            portals: self.listen.iter().map(ToString::to_string).collect(),
            api: self
                .api_addr
                .lock()
                .expect("api addr")
                .map(|a| a.to_string()),
            uptime_secs: self.started.elapsed().as_secs(),
            volumes,
            sessions,
            capacity_bytes,
            devices,
        }
    }

    fn lun_taken(&self, lun: u16) -> bool {
        self.luns.get(lun).is_some()
            || self
                .node()
                .is_some_and(|n| n.volume_records().values().any(|r| r.lun == Some(lun)))
    }

    /// Creates and serves a volume (in a cluster: on every controller).
    ///
    /// # Errors
    /// [`VolumeOpError`] naming the field or the cause.
    pub async fn create_volume(&self, req: NewVolume) -> Result<VolumeInfo, VolumeOpError> {
        let _one_at_a_time = self.creating.lock().await;
        crate::config::check_volume_name(&req.name).map_err(|message| VolumeOpError::Invalid {
            field: "name",
            message,
        })?;
        crate::config::check_block_size(req.block_size).map_err(|message| {
            VolumeOpError::Invalid {
                field: "block_size",
                message,
            }
        })?;
        if req.size_bytes < 1 << 20 || !req.size_bytes.is_multiple_of(4096) {
            return Err(VolumeOpError::Invalid {
                field: "size",
                message: "must be at least 1MiB and a multiple of 4KiB".into(),
            });
        }
        let key = volume_id(&self.cfg.iqn, &req.name);
        let exists = self
            .volumes
            .lock()
            .expect("volumes")
            .contains_key(&req.name)
            || self.node().is_some_and(|n| {
                n.volume_records()
                    .values()
                    .any(|r| r.name == req.name || u64::from(r.id) == key & 0xffff_ffff)
            });
        if exists {
            return Err(VolumeOpError::Conflict {
                field: "name",
                message: format!(
                    "a volume named {} exists already; pick another name",
                    req.name
                ),
            });
        }
        let lun = match req.lun {
            Some(l) if usize::from(l) >= lun::constants::LUNS_MAX => {
                return Err(VolumeOpError::Invalid {
                    field: "lun",
                    message: format!("must be below {}", lun::constants::LUNS_MAX),
                })
            }
            Some(l) if self.lun_taken(l) => {
                return Err(VolumeOpError::Conflict {
                    field: "lun",
                    message: format!(
                        "LUN {l} is in use; leave it empty to take the lowest free one"
                    ),
                })
            }
            Some(l) => l,
            None => (0..lun::constants::LUNS_MAX as u16)
                .find(|l| !self.lun_taken(*l))
                .ok_or(VolumeOpError::Conflict {
                    field: "lun",
                    message: "every LUN is in use; delete a volume first".into(),
                })?,
        };
        let info = match (&self.cfg.cluster, self.node()) {
            (Some(cl), Some(node)) => {
                let (k, m) = (req.k.unwrap_or(cl.k), req.m.unwrap_or(cl.m));
                let controllers = cl.peers.len();
                if k == 0 || k + m > controllers {
                    return Err(VolumeOpError::Invalid {
                        field: if k == 0 { "k" } else { "m" },
                        message: format!("k + m must be between 1 and the number of controllers ({controllers}), each shard on its own controller"),
                    });
                }
                let quorum = if (k, m) == (cl.k, cl.m) {
                    cl.write_quorum
                } else {
                    None
                };
                let geometry = Geometry::new(
                    k,
                    m,
                    cl.chunk_bytes,
                    raid_engine::layout::rows_per_extent(k, cl.chunk_bytes, cl.extent_bytes),
                    raid_engine::codec::CodecKind::default(),
                    quorum,
                )
                .map_err(|e| VolumeOpError::Invalid {
                    field: "k",
                    message: e.to_string(),
                })?;
                let layout = Layout {
                    size_bytes: req.size_bytes,
                    geometry,
                };
                let ids: Vec<u32> = cl.peers.keys().copied().collect();
                let meta = VolumeMeta::rotated(key as u32, layout, &ids).map_err(|e| {
                    VolumeOpError::Invalid {
                        field: "size",
                        message: e.to_string(),
                    }
                })?;
                let mut rec = crate::meta::VolumeRecord::new(&req.name, &meta);
                rec.lun = Some(lun);
                rec.block_size = Some(req.block_size);
                let mut nonce = [0u8; 8];
                getrandom::fill(&mut nonce)
                    .map_err(|e| VolumeOpError::Unavailable(e.to_string()))?;
                rec.incarnation = u64::from_le_bytes(nonce);
                let won = node
                    .create_volume(rec.clone())
                    .await
                    .map_err(VolumeOpError::Unavailable)?;
                if won != rec {
                    return Err(VolumeOpError::Conflict {
                        field: "name",
                        message: format!(
                            "volume id {} is taken by volume {}; pick another name",
                            rec.id, won.name
                        ),
                    });
                }
                // Served here once the record is applied and the shard store opened.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
                loop {
                    if let Some(s) = self.volumes.lock().expect("volumes").get(&req.name) {
                        break s.info.clone();
                    }
                    if std::time::Instant::now() > deadline {
                        return Err(VolumeOpError::Unavailable(format!(
                            "volume {} is recorded in the cluster but this controller has not opened it within 30 s; see its log",
                            req.name
                        )));
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            }
            _ => {
                let info = VolumeInfo {
                    name: req.name.clone(),
                    lun,
                    size_bytes: req.size_bytes,
                    block_size: req.block_size,
                    k: 1,
                    m: 0,
                    runtime: true,
                };
                self.serve_local(info.clone())?;
                if let Err(e) = self.save_local_runtime() {
                    let _ = self.unserve(&info.name);
                    return Err(VolumeOpError::Unavailable(e));
                }
                info
            }
        };
        self.events.push(
            "volume.created",
            format!(
                "volume {} created: {} bytes, LUN {}, k={} m={}",
                info.name, info.size_bytes, info.lun, info.k, info.m
            ),
        );
        Ok(info)
    }

    fn unserve(&self, name: &str) -> Option<Served> {
        self.devices
            .lock()
            .expect("devices")
            .retain(|d| d.volume.as_deref() != Some(name));
        let s = self.volumes.lock().expect("volumes").remove(name)?;
        self.luns.remove(s.info.lun);
        Some(s)
    }

    fn insert_served(
        &self,
        info: VolumeInfo,
        volume: Arc<Volume>,
        lu: Arc<LogicalUnit>,
        files: Vec<std::path::PathBuf>,
    ) -> Result<(), VolumeOpError> {
        if !self.luns.insert(info.lun, Arc::clone(&lu)) {
            return Err(VolumeOpError::Conflict {
                field: "lun",
                message: format!("LUN {} is in use", info.lun),
            });
        }
        self.volumes.lock().expect("volumes").insert(
            info.name.clone(),
            Served {
                id: volume_id(&self.cfg.iqn, &info.name) as u32,
                info,
                volume,
                lu,
                files,
            },
        );
        Ok(())
    }

    /// A single controller's volume: its own backing file, reservations in a file.
    fn serve_local(&self, info: VolumeInfo) -> Result<(), VolumeOpError> {
        let vc = VolumeConfig {
            name: info.name.clone(),
            lun: info.lun,
            size_bytes: info.size_bytes,
            block_size: info.block_size,
        };
        let (vol, dev) = local_volume(&self.cfg, &vc).map_err(VolumeOpError::Unavailable)?;
        let vol = Arc::new(vol);
        self.devices.lock().expect("devices").push(dev);
        let key = volume_id(&self.cfg.iqn, &info.name);
        let lu = LogicalUnit::new(
            LuIdentity::for_volume(key),
            info.block_size,
            Arc::clone(&vol),
        )
        .with_pr_store(self.cfg.data_dir.join(format!("{}.pr", info.name)))
        .map_err(|e| VolumeOpError::Unavailable(e.to_string()))?;
        let files = vec![
            self.cfg.data_dir.join(format!("{}.img", info.name)),
            self.cfg.data_dir.join(format!("{}.pr", info.name)),
        ];
        self.insert_served(info, vol, Arc::new(lu), files)
    }

    fn save_local_runtime(&self) -> Result<(), String> {
        let list: Vec<VolumeInfo> = self.volumes().into_iter().filter(|v| v.runtime).collect();
        let path = self.cfg.data_dir.join("volumes.json");
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(&list).map_err(|e| e.to_string())?;
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| {
                format!(
                    "cannot write {}: {e} (check the data directory's permissions and free space)",
                    path.display()
                )
            })
    }

    /// Deletes a volume created at run time (in a cluster: on every controller) and its data.
    ///
    /// # Errors
    /// [`VolumeOpError`]: unknown, defined in the config, or the log unreachable.
    pub async fn delete_volume(&self, name: &str) -> Result<(), VolumeOpError> {
        let _one_at_a_time = self.creating.lock().await;
        let (id, runtime) = match self.volumes.lock().expect("volumes").get(name) {
            None => return Err(VolumeOpError::NotFound(name.to_string())),
            Some(s) => (s.id, s.info.runtime),
        };
        if !runtime {
            return Err(VolumeOpError::Conflict {
                field: "name",
                message: format!("volume {name} is defined in the config file; remove its [[volume]] entry from every controller's config and restart them"),
            });
        }
        match self.node() {
            Some(node) => {
                node.delete_volume(id)
                    .await
                    .map_err(VolumeOpError::Unavailable)?;
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
                while self.volumes.lock().expect("volumes").contains_key(name) {
                    if std::time::Instant::now() > deadline {
                        return Err(VolumeOpError::Unavailable(format!(
                            "volume {name} is deleted from the cluster but this controller still serves it after 30 s; see its log"
                        )));
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            }
            None => {
                let s = self
                    .unserve(name)
                    .ok_or_else(|| VolumeOpError::NotFound(name.to_string()))?;
                self.save_local_runtime()
                    .map_err(VolumeOpError::Unavailable)?;
                remove_files(&s.files);
                self.events
                    .push("volume.deleted", format!("volume {name} deleted"));
            }
        }
        Ok(())
    }

    /// Stops serving a run-time volume whose record left the log, and deletes its shards.
    fn drop_record(&self, id: u32) {
        let name = self
            .volumes
            .lock()
            .expect("volumes")
            .values()
            .find(|s| s.id == id && s.info.runtime)
            .map(|s| s.info.name.clone());
        let Some(name) = name else { return };
        let Some(s) = self.unserve(&name) else { return };
        if let Some(node) = self.node() {
            node.engine().remove_volume(id);
        }
        if let Some(stores) = &self.stores {
            stores.remove(id);
        }
        remove_files(&s.files);
        self.events.push(
            "volume.deleted",
            format!("volume {name} deleted; its shards on this controller are removed"),
        );
    }

    /// Serves a volume the metadata log records but the config does not (created at run
    /// time): its own shard store file, the engine, a logical unit sharing SCSI state
    /// through the log.
    async fn serve_record(&self, rec: crate::meta::VolumeRecord) -> Result<(), String> {
        let (Some(node), Some(stores), Some(lun), Some(block_size)) =
            (self.node(), &self.stores, rec.lun, rec.block_size)
        else {
            return Err("not a run-time volume record".into());
        };
        let meta = rec.meta()?;
        let slots = VolumeSlots {
            volume: meta.id,
            extents: meta.placement.len() as u64,
            rows_per_extent: meta.layout.geometry.rows_per_extent,
        };
        let chunk = meta.layout.geometry.chunk_bytes as usize;
        let file = self.cfg.data_dir.join(format!(
            "shards-{:08x}-{:016x}.img",
            meta.id, rec.incarnation
        ));
        let mut dc = disk_io::DeviceConfig::file(file.clone(), store_bytes(chunk, &[slots]));
        dc.engine = self.cfg.engine;
        dc.direct = self.cfg.direct;
        dc.reserve = true;
        let dev = Arc::new(disk_io::Device::open(&dc).map_err(|e| e.to_string())?);
        let store = Arc::new(
            DiskShardStore::open(dev, chunk, &[slots], false)
                .await
                .map_err(|e| e.to_string())?,
        );
        self.devices.lock().expect("devices").push(DeviceEntry {
            role: format!("shards of volume {}", rec.name),
            volume: Some(rec.name.clone()),
            dev: Arc::clone(store.device()),
            store: Some(Arc::clone(&store)),
        });
        stores.add(meta.id, store);
        let engine = node.engine();
        engine.add_volume(meta.clone()).map_err(|e| e.to_string())?;
        let vol = Arc::new(Volume::Cluster(ClusterVolume::new(
            engine,
            meta.id,
            meta.layout.size_bytes,
        )));
        let key = volume_id(&self.cfg.iqn, &rec.name);
        let env = node.env();
        let lu = Arc::new(
            LogicalUnit::new(LuIdentity::for_volume(key), block_size, Arc::clone(&vol))
                .with_shared_state(key, env.clone()),
        );
        env.register_lu(key, &lu);
        let info = VolumeInfo {
            name: rec.name.clone(),
            lun,
            size_bytes: rec.size_bytes,
            block_size,
            k: rec.k,
            m: rec.m,
            runtime: true,
        };
        self.insert_served(info, vol, lu, vec![file])
            .map_err(|e| e.to_string())?;
        tracing::info!(volume = %rec.name, lun, "serving a volume created at run time");
        Ok(())
    }
}

/// A running controller.
#[derive(Debug)]
pub struct Controller {
    shared: Arc<Shared>,
    node: Option<ControllerNode>,
    /// The addresses the portals actually listen on, in config order.
    pub listen: Vec<SocketAddr>,
    portals: Vec<(iscsi_target::driver::Server, tokio::net::TcpListener)>,
    api: Option<(tokio::net::TcpListener, Option<Arc<rustls::ServerConfig>>)>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Controller {
    /// Opens devices and binds the portal (and the API, when configured).
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
        let (node, stores, backends, devices) = match &cfg.cluster {
            Some(cl) => {
                let (n, stores, vols, dev) = start_cluster(cfg, cl).await?;
                (Some(n), Some(stores), vols, vec![dev])
            }
            None => {
                let (vols, devs): (Vec<Volume>, Vec<DeviceEntry>) = cfg
                    .volumes
                    .iter()
                    .map(|v| local_volume(cfg, v))
                    .collect::<Result<Vec<_>, _>>()?
                    .into_iter()
                    .unzip();
                (None, None, vols, devs)
            }
        };
        let (k, m) = cfg.cluster.as_ref().map_or((1, 0), |c| (c.k, c.m));
        let mut served = BTreeMap::new();
        let mut luns = BTreeMap::new();
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
            luns.insert(v.lun, Arc::clone(&lu));
            served.insert(
                v.name.clone(),
                Served {
                    info: VolumeInfo {
                        name: v.name.clone(),
                        lun: v.lun,
                        size_bytes: v.size_bytes,
                        block_size: v.block_size,
                        k,
                        m,
                        runtime: false,
                    },
                    id: volume_id(&cfg.iqn, &v.name) as u32,
                    volume: vol,
                    lu,
                    files: Vec::new(),
                },
            );
        }
        let table = Arc::new(LunTable::new(luns));
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
        let mut node = node;
        if let Some(n) = node.as_mut() {
            n.publish_access_states(alua.clone());
        }
        let mut portals = Vec::new();
        let chap_challenges = Arc::new(iscsi_target::ChapChallengeHistory::default());
        for (listener, port) in listeners.into_iter().zip(&ports) {
            let device = Arc::new(
                DeviceServer::new(*port, BTreeMap::new())
                    .with_lun_table(Arc::clone(&table))
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
        let api = match &cfg.api {
            Some(a) => {
                let l = tokio::net::TcpListener::bind(a.listen).await.map_err(|e| {
                    format!("cannot listen for the API and console on {}: {e} (another program may use the port; change api.listen)", a.listen)
                })?;
                let tls = if a.tls {
                    let names = vec!["localhost".to_string(), a.listen.ip().to_string()];
                    Some(crate::api::tls::server_config(
                        a.tls_cert.as_deref(),
                        a.tls_key.as_deref(),
                        &cfg.data_dir,
                        &names,
                    )?)
                } else {
                    None
                };
                Some((l, tls))
            }
            None => None,
        };
        let shared = Arc::new(Shared {
            cfg: cfg.clone(),
            luns: table,
            registries: portals
                .iter()
                .map(|(s, _)| Arc::clone(s.registry()))
                .collect(),
            listen: listen.clone(),
            api_addr: Mutex::new(api.as_ref().and_then(|(l, _)| l.local_addr().ok())),
            events: EventLog::open(&cfg.data_dir.join("events.jsonl")),
            node: RwLock::new(node.as_ref().map(ControllerNode::handle)),
            volumes: Mutex::new(served),
            devices: Mutex::new(devices),
            stores,
            creating: tokio::sync::Mutex::new(()),
            started: std::time::Instant::now(),
        });
        let mut tasks = Vec::new();
        match &node {
            Some(n) => {
                let weak = Arc::downgrade(&shared);
                n.set_live(Box::new(move || {
                    weak.upgrade()
                        .and_then(|s| serde_json::to_value(s.live()).ok())
                        .unwrap_or(serde_json::Value::Null)
                }));
                if let Some(mut rx) = n.runtime_volumes() {
                    let weak = Arc::downgrade(&shared);
                    tasks.push(tokio::spawn(async move {
                        while let Some(change) = rx.recv().await {
                            let Some(s) = weak.upgrade() else { break };
                            match change {
                                crate::node::RuntimeVolume::Serve(rec) => {
                                    let name = rec.name.clone();
                                    if let Err(e) = s.serve_record(rec).await {
                                        tracing::error!(volume = %name, "cannot serve a volume created at run time: {e}");
                                        s.events.push("volume.problem", format!("volume {name} is not served by this controller: {e}"));
                                    }
                                }
                                crate::node::RuntimeVolume::Drop(id) => s.drop_record(id),
                            }
                        }
                    }));
                }
                tasks.push(tokio::spawn(crate::events::watch_cluster(Arc::downgrade(
                    &shared,
                ))));
                let threshold = cfg.cluster.as_ref().map_or(0, |c| c.migrate_after_errors);
                if threshold > 0 {
                    tasks.push(tokio::spawn(preemptive_migration(
                        Arc::downgrade(&shared),
                        threshold,
                    )));
                }
            }
            None => {
                // Volumes created through the API on an earlier run.
                let path = cfg.data_dir.join("volumes.json");
                if path.exists() {
                    let list: Vec<VolumeInfo> = std::fs::read(&path)
                        .map_err(|e| e.to_string())
                        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
                        .map_err(|e| format!("cannot read {}: {e} (restore it from a backup, or remove it to forget the volumes created through the API)", path.display()))?;
                    for v in list {
                        let name = v.name.clone();
                        shared
                            .serve_local(v)
                            .map_err(|e| format!("volume {name} from {}: {e}", path.display()))?;
                    }
                }
            }
        }
        shared.events.push(
            "controller.started",
            format!(
                "controller {} started, portals {}",
                shared.id(),
                listen
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
        Ok(Self {
            shared,
            node,
            listen,
            portals,
            api,
            tasks,
        })
    }

    /// What the operator API sees of this controller.
    pub fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    /// Serves until `shutdown` turns true, then flushes every volume.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let mut serving = tokio::task::JoinSet::new();
        for (server, listener) in self.portals {
            let rx = shutdown.clone();
            serving.spawn(async move { server.serve(listener, rx).await });
        }
        if let Some((listener, tls)) = self.api {
            let app = crate::api::router(crate::api::ApiState::new(Arc::clone(&self.shared)));
            let mut rx = shutdown.clone();
            serving.spawn(async move {
                let stop = async move {
                    let _ = rx.wait_for(|s| *s).await;
                };
                let served = match tls {
                    None => {
                        axum::serve(listener, app)
                            .with_graceful_shutdown(stop)
                            .await
                    }
                    Some(cfg) => match crate::api::tls::listen(listener, cfg) {
                        Ok(l) => axum::serve(l, app).with_graceful_shutdown(stop).await,
                        Err(e) => Err(e),
                    },
                };
                if let Err(e) = served {
                    tracing::error!(cause = %e, "the API server stopped");
                }
            });
        }
        while serving.join_next().await.is_some() {}
        for t in &self.tasks {
            t.abort();
        }
        let served: Vec<Arc<Volume>> = self
            .shared
            .volumes
            .lock()
            .expect("volumes")
            .values()
            .map(|s| Arc::clone(&s.volume))
            .collect();
        for v in &served {
            if let Err(e) = v.flush().await {
                tracing::error!(cause = %e, "flush at shutdown failed");
            }
        }
        *self.shared.node.write().unwrap_or_else(|p| p.into_inner()) = None;
        if let Some(n) = self.node {
            n.shutdown().await;
        }
        tracing::info!("stopped");
    }
}

/// Deletes a deleted volume's files; one that cannot be removed is logged (its space is
/// lost until removed by hand, nothing else depends on it).
fn remove_files(files: &[std::path::PathBuf]) {
    for f in files {
        match std::fs::remove_file(f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %f.display(), cause = %e, "cannot remove a deleted volume's file; remove it by hand")
            }
        }
    }
}

/// A single controller's volume: one backing file or device of its own.
fn local_volume(cfg: &Config, v: &VolumeConfig) -> Result<(Volume, DeviceEntry), String> {
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
    let dev = Arc::new(dev);
    let entry = DeviceEntry {
        role: format!("volume {}", v.name),
        volume: Some(v.name.clone()),
        dev: Arc::clone(&dev),
        store: None,
    };
    Ok((
        Volume::Local(LocalVolume::new(dev, 0, v.size_bytes).map_err(|e| e.to_string())?),
        entry,
    ))
}

/// Preemptive migration: once this controller's shard device has counted `threshold` errors
/// (read, write and flush errors the kernel returned, chunk checksum failures, requests over
/// 500 ms), its shards are drained to the others while it still serves, before the device
/// fails for good. Logged, an event, and shown in status; a drain the cluster refuses (too
/// few controllers) is reported once and tried again.
async fn preemptive_migration(shared: std::sync::Weak<Shared>, threshold: u64) {
    let mut reported = String::new();
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let Some(s) = shared.upgrade() else { break };
        let Some(node) = s.node() else { continue };
        let errors: Vec<(String, u64)> = s
            .devices
            .lock()
            .expect("devices")
            .iter()
            .filter(|d| d.store.is_some())
            .map(|d| {
                let h = d.dev.health();
                let checksum = d.store.as_ref().map_or(0, |st| st.checksum_failures());
                (
                    format!(
                        "{}: {} read, {} write, {} flush errors, {checksum} checksum failures, {} slow I/Os",
                        d.dev.path().display(),
                        h.read_errors,
                        h.write_errors,
                        h.flush_errors,
                        h.slow_ios
                    ),
                    h.read_errors + h.write_errors + h.flush_errors + checksum + h.slow_ios,
                )
            })
            .collect();
        let Some((what, _)) = errors.into_iter().find(|(_, n)| *n >= threshold) else {
            continue;
        };
        if node.status().migration.is_some() {
            break;
        }
        let why =
            format!("shard device failing ({what}; cluster.migrate_after_errors = {threshold})");
        match node.migrate_away(why.clone()).await {
            Ok(()) => {
                s.events.push(
                    "controller.migrating",
                    format!(
                        "controller {} migrates its shards to the others: {why}",
                        s.id()
                    ),
                );
                break;
            }
            Err((_, e)) if e != reported => {
                tracing::error!("preemptive migration needed ({why}) but not possible now: {e}");
                s.events
                    .push("controller.migration_refused", format!("{why}: {e}"));
                reported = e;
            }
            Err(_) => {}
        }
    }
}

/// The cluster geometry of a volume: `rows_per_extent` gives extents of `cluster.extent`
/// (default 64 MiB, the design's), and placement rotates over every controller.
fn volume_meta(cfg: &Config, cl: &ClusterConfig, v: &VolumeConfig) -> Result<VolumeMeta, String> {
    let rows = raid_engine::layout::rows_per_extent(cl.k, cl.chunk_bytes, cl.extent_bytes);
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
) -> Result<(ControllerNode, Arc<StoreSet>, Vec<Volume>, DeviceEntry), String> {
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
    // The store's space is reserved when it is created: a full file system refuses the
    // volume now instead of failing its writes later (and no chunk write allocates blocks).
    dc.reserve = true;
    let dev = Arc::new(disk_io::Device::open(&dc).map_err(|e| e.to_string())?);
    let store = DiskShardStore::open(dev, chunk, &slots, false)
        .await
        .map_err(|e| e.to_string())?;
    let peer_addr = cl.peers[&cl.id];
    let listener = tokio::net::TcpListener::bind(peer_addr).await.map_err(|e| {
        format!("cannot listen for peers on {peer_addr}: {e} (another controller may use the port; check cluster.peers)")
    })?;
    let tls = match &cl.pki {
        Some(dir) => Some(Arc::new(crate::peer::tls::PeerTls::load(dir, cl.id)?)),
        None => {
            tracing::warn!("peer links are plaintext and unauthenticated (cluster.tls = false): anyone who reaches the peer port can read and write shards");
            None
        }
    };
    let node_cfg = NodeConfig {
        id: cl.id,
        peers: cl.peers.clone(),
        limits: PeerLimits::default(),
        timers: MembershipTimers {
            out_after: (cl.out_after_secs > 0)
                .then(|| std::time::Duration::from_secs(cl.out_after_secs)),
            rebuild_share: f64::from(cl.rebuild_share_pct) / 100.0,
            ..MembershipTimers::default()
        },
        tls,
        scrub: crate::node::ScrubSchedule {
            every: (cl.scrub_every_hours > 0)
                .then(|| std::time::Duration::from_secs(cl.scrub_every_hours * 3600)),
            pause: std::time::Duration::from_millis(cl.scrub_pause_ms),
        },
        bootstrap: cl.bootstrap,
    };
    let store = Arc::new(store);
    let entry = DeviceEntry {
        role: "shard store".into(),
        volume: None,
        dev: Arc::clone(store.device()),
        store: Some(Arc::clone(&store)),
    };
    let stores = Arc::new(StoreSet::new(store));
    let node =
        ControllerNode::start(&node_cfg, &cfg.data_dir, listener, stores.clone(), named).await?;
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
    Ok((node, stores, vols, entry))
}
