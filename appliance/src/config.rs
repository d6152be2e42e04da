//! The controller's TOML configuration: a raw serde form that rejects unknown keys, turned into
//! a checked [`Config`] once, with errors that name the offending key and how to fix it.
//!
//! Invariants:
//! - Every value of a [`Config`] has been range-checked; call sites never re-validate.
//! - Defaults live here and only here.

use iscsi_target::{ChapConfig, ChapSecret};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// A configuration error naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// Path.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// TOML syntax error or unknown key.
    #[error("config {path}: {message}")]
    Parse {
        /// Path.
        path: PathBuf,
        /// toml's message (names the key and line).
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("config key `{key}`: {message}")]
    Invalid {
        /// The key, dotted.
        key: String,
        /// What is wrong and how to fix it.
        message: String,
    },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    data_dir: Option<PathBuf>,
    log_level: Option<String>,
    #[serde(default)]
    iscsi: RawIscsi,
    target: RawTarget,
    #[serde(default)]
    discovery: RawDiscovery,
    #[serde(default)]
    disk: RawDisk,
    #[serde(default, rename = "volume")]
    volumes: Vec<RawVolume>,
    cluster: Option<RawCluster>,
    api: Option<RawApi>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    listen: String,
    admin_password_hash: Option<String>,
    tls: Option<bool>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
}

/// The operator API and web console (`[api]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiConfig {
    /// Where the API and console listen (plain HTTP; put it on a management network or
    /// loopback).
    pub listen: SocketAddr,
    /// The admin password as an argon2 PHC string (`appliance hash-password` makes one);
    /// `None`: every login is refused until one is set.
    pub admin_password_hash: Option<String>,
    /// HTTPS instead of HTTP.
    pub tls: bool,
    /// PEM certificate chain (with `tls_key`); `None`: a self-signed one made in the data
    /// directory on first start.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key.
    pub tls_key: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    id: u32,
    peers: BTreeMap<String, String>,
    portals: Option<BTreeMap<String, String>>,
    k: Option<usize>,
    m: Option<usize>,
    write_quorum: Option<usize>,
    chunk: Option<String>,
    bootstrap: Option<bool>,
    tls: Option<bool>,
    pki: Option<PathBuf>,
    scrub_every_hours: Option<u64>,
    scrub_pause_ms: Option<u64>,
    out_after_secs: Option<u64>,
    rebuild_share_pct: Option<u8>,
    extent: Option<String>,
    migrate_after_errors: Option<u64>,
}

/// Membership in a cluster of controllers (`[cluster]`); volumes are then erasure-coded over
/// every controller listed in `peers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// This controller's id.
    pub id: u32,
    /// Peer-transport address of every controller (this one included; it listens on its own).
    pub peers: BTreeMap<u32, SocketAddr>,
    /// iSCSI portal of every controller, for SendTargets (defaults to this one's portals).
    pub portals: BTreeMap<u32, SocketAddr>,
    /// Data columns.
    pub k: usize,
    /// Parity columns.
    pub m: usize,
    /// Write quorum (default `max(k, k + m - 1)`).
    pub write_quorum: Option<usize>,
    /// Chunk size.
    pub chunk_bytes: u32,
    /// Whether this controller forms the metadata log (exactly one controller of a new cluster).
    pub bootstrap: bool,
    /// The directory of the cluster CA and this controller's certificate for mutual TLS on
    /// peer links (`cluster.pki`, default `<data_dir>/pki`); `None` when `cluster.tls = false`
    /// (plaintext: only on a network no one else can reach).
    pub pki: Option<PathBuf>,
    /// Hours between scheduled scrubs (`cluster.scrub_every_hours`, default 168; 0: only when
    /// asked through the API or CLI).
    pub scrub_every_hours: u64,
    /// Pause after each scrubbed row, ms (`cluster.scrub_pause_ms`, default 1), so host I/O
    /// keeps most of the devices.
    pub scrub_pause_ms: u64,
    /// Seconds a controller may stay down before it is marked out and its shards are rebuilt
    /// on the others (`cluster.out_after_secs`, default 600; 0: only when an operator marks
    /// it out).
    pub out_after_secs: u64,
    /// Percent of the time rebuild copies may take (`cluster.rebuild_share_pct`, 1-100,
    /// default 50); host I/O keeps the rest.
    pub rebuild_share_pct: u8,
    /// Logical bytes per extent, the unit of placement and of rebuild moves (`cluster.extent`,
    /// default 64 MiB): smaller extents spread a rebuild over more controllers.
    pub extent_bytes: u64,
    /// Errors of this controller's shard device (read, write and flush errors, chunk checksum
    /// failures, requests slower than 500 ms) after which its shards are drained to the others
    /// before the device fails (`cluster.migrate_after_errors`, default 32, above the torn
    /// writes a crash can leave; 0: never).
    pub migrate_after_errors: u64,
}

fn parse_id_map(
    key: &str,
    raw: BTreeMap<String, String>,
) -> Result<BTreeMap<u32, SocketAddr>, ConfigError> {
    let mut out = BTreeMap::new();
    for (id, addr) in raw {
        let n: u32 = id.parse().map_err(|_| {
            invalid(
                format!("{key}.{id}"),
                "keys are controller ids (numbers such as \"1\")",
            )
        })?;
        let a: SocketAddr = addr
            .parse()
            .map_err(|_| invalid(format!("{key}.{id}"), format!("`{addr}` is not ip:port")))?;
        out.insert(n, a);
    }
    Ok(out)
}

fn check_cluster(raw: RawCluster) -> Result<ClusterConfig, ConfigError> {
    let peers = parse_id_map("cluster.peers", raw.peers)?;
    if !peers.contains_key(&raw.id) {
        return Err(invalid(
            "cluster.peers",
            format!(
                "must list this controller (cluster.id = {}) with its own peer address",
                raw.id
            ),
        ));
    }
    let portals = parse_id_map("cluster.portals", raw.portals.unwrap_or_default())?;
    let k = raw.k.unwrap_or(2);
    let m = raw.m.unwrap_or(1);
    let chunk_bytes = match raw.chunk {
        None => 64 << 10,
        Some(c) => parse_size(&c)
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| {
                invalid(
                    "cluster.chunk",
                    format!("`{c}` is not a size such as \"64KiB\""),
                )
            })?,
    };
    raid_engine::layout::Geometry::new(
        k,
        m,
        chunk_bytes,
        1,
        raid_engine::codec::CodecKind::default(),
        raw.write_quorum,
    )
    .map_err(|e| invalid("cluster", e.to_string()))?;
    if peers.len() < k + m {
        return Err(invalid(
            "cluster.peers",
            format!("{} controllers cannot hold k + m = {} shards on distinct controllers; list more peers or lower k/m", peers.len(), k + m),
        ));
    }
    Ok(ClusterConfig {
        id: raw.id,
        peers,
        portals,
        k,
        m,
        write_quorum: raw.write_quorum,
        chunk_bytes,
        bootstrap: raw.bootstrap.unwrap_or(false),
        scrub_every_hours: raw.scrub_every_hours.unwrap_or(168),
        extent_bytes: match raw.extent {
            None => raid_engine::layout::EXTENT_BYTES_DEFAULT,
            Some(e) => match parse_size(&e) {
                Some(v) if v >= u64::from(chunk_bytes) * k as u64 => v,
                _ => {
                    return Err(invalid(
                        "cluster.extent",
                        format!("`{e}` is not a size of at least one row (k x chunk), such as \"64MiB\""),
                    ))
                }
            },
        },
        out_after_secs: match raw.out_after_secs {
            Some(s) if s > 0 && s < 10 => {
                return Err(invalid(
                    "cluster.out_after_secs",
                    "below 10 s a controller that restarts would be rebuilt instead of resynced; use 600 (or 0 to mark out by hand)",
                ))
            }
            s => s.unwrap_or(600),
        },
        migrate_after_errors: raw.migrate_after_errors.unwrap_or(32),
        rebuild_share_pct: match raw.rebuild_share_pct {
            Some(p) if p == 0 || p > 100 => {
                return Err(invalid(
                    "cluster.rebuild_share_pct",
                    "must be 1 to 100 (percent of the time rebuild copies may take; 50 leaves half to hosts)",
                ))
            }
            p => p.unwrap_or(50),
        },
        scrub_pause_ms: match raw.scrub_pause_ms {
            Some(ms) if ms > 10_000 => {
                return Err(invalid(
                    "cluster.scrub_pause_ms",
                    "at most 10000 (10 s per row would take weeks); 1 keeps host I/O first",
                ))
            }
            ms => ms.unwrap_or(1),
        },
        pki: match (raw.tls.unwrap_or(true), raw.pki) {
            (true, p) => Some(p.unwrap_or_else(|| PathBuf::from("pki"))),
            (false, None) => None,
            (false, Some(_)) => {
                return Err(invalid(
                    "cluster.pki",
                    "is set but cluster.tls = false; remove one of them",
                ))
            }
        },
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIscsi {
    listen: Option<OneOrMany>,
    tpgt: Option<u16>,
    max_sessions_per_target: Option<usize>,
    max_sessions_per_initiator: Option<usize>,
}

/// `listen = "ip:port"` or `listen = ["ip:port", ...]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    iqn: String,
    alias: Option<String>,
    chap: Option<RawChap>,
    allowed_initiators: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDiscovery {
    chap: Option<RawChap>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChap {
    user: String,
    secret: String,
    mutual_user: Option<String>,
    mutual_secret: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDisk {
    engine: Option<String>,
    direct: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVolume {
    name: String,
    lun: u16,
    size: String,
    block_size: Option<u32>,
}

/// A checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where backing files live.
    pub data_dir: PathBuf,
    /// tracing filter directive.
    pub log_level: String,
    /// Portal addresses; portal `i` is target portal group `tpgt + i` with relative port
    /// `tpgt + i`.
    pub listen: Vec<SocketAddr>,
    /// Portal group tag of the first portal.
    pub tpgt: u16,
    /// Concurrent normal sessions per target on each portal.
    pub sessions_per_target: usize,
    /// Concurrent normal sessions per initiator name on each portal.
    pub sessions_per_initiator: usize,
    /// Target IQN.
    pub iqn: String,
    /// Target alias.
    pub alias: Option<String>,
    /// CHAP for normal sessions.
    pub chap: Option<ChapConfig>,
    /// Initiator name patterns allowed to discover and log in (`None`: everyone).
    pub allowed_initiators: Option<Vec<String>>,
    /// CHAP for discovery sessions.
    pub discovery_chap: Option<ChapConfig>,
    /// Disk engine.
    pub engine: disk_io::EngineChoice,
    /// O_DIRECT.
    pub direct: bool,
    /// Volumes, one LUN each.
    pub volumes: Vec<VolumeConfig>,
    /// Cluster membership; `None` runs a single controller with local volumes.
    pub cluster: Option<ClusterConfig>,
    /// Operator API and console; `None`: not served.
    pub api: Option<ApiConfig>,
}

/// One volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeConfig {
    /// Name (also the backing file name).
    pub name: String,
    /// LUN.
    pub lun: u16,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Logical block size.
    pub block_size: u32,
}

/// The default portal.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:3260";
/// The default target name.
pub const DEFAULT_IQN: &str = "iqn.2026-11.io.rainio:appliance";

/// A volume name: letters, digits, '-' and '_' (it names files), 1 to 64 of them.
///
/// # Errors
/// What is wrong, for the operator.
pub fn check_volume_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
    {
        return Err("use 1 to 64 letters, digits, '-' and '_'".into());
    }
    Ok(())
}

/// A logical block size the device server supports.
///
/// # Errors
/// What is wrong, for the operator.
pub fn check_block_size(b: u32) -> Result<(), String> {
    if lun::constants::BLOCK_SIZES.contains(&b) {
        Ok(())
    } else {
        Err("must be 512 or 4096".into())
    }
}

/// A volume size such as `1GiB`: at least 1 MiB, a multiple of 4 KiB.
///
/// # Errors
/// What is wrong, for the operator.
pub fn check_volume_size(s: &str) -> Result<u64, String> {
    let n = parse_size(s)
        .ok_or_else(|| format!("`{s}` is not a size such as \"1GiB\" or \"512MiB\""))?;
    if n < 1 << 20 || n % 4096 != 0 {
        return Err("must be at least 1MiB and a multiple of 4KiB".into());
    }
    Ok(n)
}

fn check_api(raw: RawApi) -> Result<ApiConfig, ConfigError> {
    let listen: SocketAddr = raw.listen.parse().map_err(|_| {
        invalid(
            "api.listen",
            format!("`{}` is not ip:port, e.g. \"127.0.0.1:8080\"", raw.listen),
        )
    })?;
    if let Some(h) = &raw.admin_password_hash {
        if !h.starts_with("$argon2") {
            return Err(invalid(
                "api.admin_password_hash",
                "must be an argon2 hash such as `appliance hash-password` prints (never the password itself)",
            ));
        }
    }
    if raw.tls_cert.is_some() != raw.tls_key.is_some() {
        return Err(invalid(
            "api.tls_cert",
            "set both tls_cert and tls_key, or neither (a self-signed certificate is then made)",
        ));
    }
    if raw.tls_cert.is_some() && raw.tls != Some(true) {
        return Err(invalid(
            "api.tls",
            "set tls = true to use tls_cert and tls_key",
        ));
    }
    Ok(ApiConfig {
        listen,
        admin_password_hash: raw.admin_password_hash,
        tls: raw.tls.unwrap_or(false),
        tls_cert: raw.tls_cert,
        tls_key: raw.tls_key,
    })
}

/// Parses a size such as `1GiB`, `512MiB`, `4096` (bytes).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mul: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "TiB" | "T" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mul)
}

fn valid_name(n: &str) -> bool {
    // RFC 3720 §3.2.6: iqn./eui./naa. names, lower case, at most 223 bytes.
    (n.starts_with("iqn.") || n.starts_with("eui.") || n.starts_with("naa."))
        && n.len() <= 223
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".-:".contains(&b))
}

fn check_patterns(raw: Option<Vec<String>>) -> Result<Option<Vec<String>>, ConfigError> {
    let Some(list) = raw else { return Ok(None) };
    for (i, p) in list.iter().enumerate() {
        let body = p.strip_suffix('*').unwrap_or(p);
        if body.is_empty() || body.contains('*') || body.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err(invalid(
                format!("target.allowed_initiators[{i}]"),
                format!("`{p}` is not an initiator name or a prefix ending in `*`, e.g. \"iqn.1994-05.com.redhat:*\""),
            ));
        }
    }
    Ok(Some(list))
}

fn chap(key: &str, raw: Option<RawChap>) -> Result<Option<ChapConfig>, ConfigError> {
    let Some(c) = raw else { return Ok(None) };
    let check = |k: &str, s: &str| {
        // RFC 7143 §12.1.3: secrets of at least 96 bits; longer is better.
        if s.len() < 12 || s.len() > 255 {
            Err(invalid(format!("{key}.{k}"), "CHAP secrets must be 12 to 255 bytes (RFC 7143 requires at least 96 bits); pick a longer secret"))
        } else {
            Ok(())
        }
    };
    check("secret", &c.secret)?;
    if c.user.is_empty() {
        return Err(invalid(format!("{key}.user"), "must not be empty"));
    }
    let mutual = match (c.mutual_user, c.mutual_secret) {
        (None, None) => None,
        (Some(u), Some(s)) => {
            check("mutual_secret", &s)?;
            if s == c.secret {
                return Err(invalid(
                    format!("{key}.mutual_secret"),
                    "must differ from `secret` (RFC 7143 §12.1.3)",
                ));
            }
            Some(ChapSecret {
                user: u,
                secret: s.into_bytes(),
            })
        }
        _ => {
            return Err(invalid(
                format!("{key}.mutual_user"),
                "set both mutual_user and mutual_secret, or neither",
            ))
        }
    };
    Ok(Some(ChapConfig {
        initiator: ChapSecret {
            user: c.user,
            secret: c.secret.into_bytes(),
        },
        mutual,
    }))
}

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;
    fn try_from(raw: RawConfig) -> Result<Self, ConfigError> {
        let listen_list = match raw.iscsi.listen {
            None => vec![DEFAULT_LISTEN.to_owned()],
            Some(OneOrMany::One(s)) => vec![s],
            Some(OneOrMany::Many(v)) => v,
        };
        if listen_list.is_empty() || listen_list.len() > 16 {
            return Err(invalid("iscsi.listen", "give 1 to 16 portal addresses"));
        }
        let mut listen: Vec<SocketAddr> = Vec::new();
        for (i, s) in listen_list.iter().enumerate() {
            let a: SocketAddr = s.parse().map_err(|_| {
                invalid(
                    format!("iscsi.listen[{i}]"),
                    format!("`{s}` is not ip:port, e.g. \"127.0.0.1:3260\""),
                )
            })?;
            if listen.contains(&a) {
                return Err(invalid(
                    format!("iscsi.listen[{i}]"),
                    format!("`{s}` is listed twice"),
                ));
            }
            listen.push(a);
        }
        let tpgt = raw.iscsi.tpgt.unwrap_or(1);
        let sessions_per_target = raw
            .iscsi
            .max_sessions_per_target
            .unwrap_or(iscsi_target::constants::SESSIONS_PER_TARGET_MAX);
        let sessions_per_initiator = raw
            .iscsi
            .max_sessions_per_initiator
            .unwrap_or(iscsi_target::constants::SESSIONS_PER_INITIATOR_MAX);
        if !(1..=65_535).contains(&sessions_per_target) {
            return Err(invalid(
                "iscsi.max_sessions_per_target",
                "must be 1 to 65535",
            ));
        }
        if !(1..=sessions_per_target).contains(&sessions_per_initiator) {
            return Err(invalid(
                "iscsi.max_sessions_per_initiator",
                "must be at least 1 and at most iscsi.max_sessions_per_target",
            ));
        }
        if tpgt == 0 {
            return Err(invalid("iscsi.tpgt", "must be 1 or more"));
        }
        if !valid_name(&raw.target.iqn) {
            return Err(invalid("target.iqn", "must be an iSCSI name such as \"iqn.2026-11.com.example:storage\" (lower case, starting iqn./eui./naa.)"));
        }
        let engine = match raw.disk.engine.as_deref().unwrap_or("auto") {
            "auto" => disk_io::EngineChoice::Auto,
            "uring" | "io_uring" => disk_io::EngineChoice::Uring,
            "threads" => disk_io::EngineChoice::Threads,
            other => {
                return Err(invalid(
                    "disk.engine",
                    format!("`{other}` is not one of \"auto\", \"uring\", \"threads\""),
                ))
            }
        };
        if raw.volumes.is_empty() {
            return Err(invalid(
                "volume",
                "at least one [[volume]] is needed, e.g. name = \"vol0\", lun = 0, size = \"1GiB\"",
            ));
        }
        let mut volumes: Vec<VolumeConfig> = Vec::new();
        for (i, v) in raw.volumes.into_iter().enumerate() {
            let key = |k: &str| format!("volume[{i}].{k}");
            check_volume_name(&v.name).map_err(|m| invalid(key("name"), m))?;
            if volumes.iter().any(|o| o.name == v.name) {
                return Err(invalid(key("name"), format!("`{}` is used twice", v.name)));
            }
            if usize::from(v.lun) >= lun::constants::LUNS_MAX
                || volumes.iter().any(|o| o.lun == v.lun)
            {
                return Err(invalid(key("lun"), "must be unique and below 256"));
            }
            let block_size = v.block_size.unwrap_or(512);
            check_block_size(block_size).map_err(|m| invalid(key("block_size"), m))?;
            let size_bytes = check_volume_size(&v.size).map_err(|m| invalid(key("size"), m))?;
            volumes.push(VolumeConfig {
                name: v.name,
                lun: v.lun,
                size_bytes,
                block_size,
            });
        }
        Ok(Config {
            data_dir: raw
                .data_dir
                .unwrap_or_else(|| PathBuf::from("appliance-data")),
            log_level: raw.log_level.unwrap_or_else(|| "info".into()),
            listen,
            tpgt,
            sessions_per_target,
            sessions_per_initiator,
            iqn: raw.target.iqn,
            alias: raw.target.alias,
            chap: chap("target.chap", raw.target.chap)?,
            allowed_initiators: check_patterns(raw.target.allowed_initiators)?,
            discovery_chap: chap("discovery.chap", raw.discovery.chap)?,
            engine,
            direct: raw.disk.direct.unwrap_or(true),
            volumes,
            cluster: raw.cluster.map(check_cluster).transpose()?,
            api: raw.api.map(check_api).transpose()?,
        })
    }
}

impl Config {
    /// Parses TOML text.
    ///
    /// # Errors
    /// Syntax errors, unknown keys and invalid values, each naming the key.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        raw.try_into()
    }

    /// Reads and parses a file. A relative `data_dir` is taken relative to the file.
    ///
    /// # Errors
    /// As [`Self::parse`], plus read errors.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut cfg = Self::parse(&text, path)?;
        if cfg.data_dir.is_relative() {
            if let Some(dir) = path.parent() {
                cfg.data_dir = dir.join(&cfg.data_dir);
            }
        }
        // Relative certificate paths are in the data directory.
        let cluster_pki = cfg.cluster.as_mut().and_then(|c| c.pki.as_mut());
        if let Some(p) = cluster_pki {
            if p.is_relative() {
                *p = cfg.data_dir.join(&*p);
            }
        }
        if let Some(api) = cfg.api.as_mut() {
            for p in [&mut api.tls_cert, &mut api.tls_key].into_iter().flatten() {
                if p.is_relative() {
                    *p = cfg.data_dir.join(&*p);
                }
            }
        }
        Ok(cfg)
    }
}

/// The config `appliance up` writes on first start.
pub fn default_config_text(listen: &str) -> String {
    format!(
        r#"# Written by `appliance up`. Edit and restart to change; unknown keys are rejected.
data_dir = "."
log_level = "info"

[iscsi]
listen = "{listen}"
tpgt = 1

[target]
iqn = "{DEFAULT_IQN}"
alias = "rainio"

[disk]
engine = "auto"   # "auto" (io_uring, else threads), "uring", "threads"
direct = true     # O_DIRECT where the file system supports it

[[volume]]
name = "vol0"
lun = 0
size = "1GiB"
block_size = 512
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_section_is_checked() {
        let base = "[target]\niqn = \"iqn.2026-11.x:y\"\n[[volume]]\nname = \"v\"\nlun = 0\nsize = \"64MiB\"\n[api]\nlisten = \"127.0.0.1:8080\"\n";
        let p = Path::new("c.toml");
        let c = Config::parse(&format!("{base}tls = true\n"), p).unwrap();
        assert!(c.api.unwrap().tls);
        for (extra, key) in [
            ("tls = true\ntls_cert = \"c.pem\"\n", "api.tls_cert"),
            ("tls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n", "api.tls"),
            (
                "admin_password_hash = \"hunter2\"\n",
                "api.admin_password_hash",
            ),
        ] {
            let e = Config::parse(&format!("{base}{extra}"), p)
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{extra}: {e}");
        }
        let e = Config::parse(&base.replace("127.0.0.1:8080", "localhost"), p).unwrap_err();
        assert!(e.to_string().contains("api.listen"), "{e}");
    }

    #[test]
    fn cluster_section_is_checked() {
        let base = "[target]\niqn = \"iqn.2026-11.x:y\"\n[[volume]]\nname = \"v\"\nlun = 0\nsize = \"64MiB\"\n";
        let peers = "peers = { \"1\" = \"127.0.0.1:4001\", \"2\" = \"127.0.0.1:4002\", \"3\" = \"127.0.0.1:4003\" }\n";
        let ok = format!("{base}[cluster]\nid = 2\n{peers}k = 2\nm = 1\nchunk = \"16KiB\"\n");
        let c = Config::parse(&ok, Path::new("c.toml")).unwrap();
        let cl = c.cluster.unwrap();
        assert_eq!(
            (cl.id, cl.k, cl.m, cl.chunk_bytes, cl.peers.len()),
            (2, 2, 1, 16384, 3)
        );
        let err = |extra: &str| {
            Config::parse(&format!("{base}[cluster]\n{extra}"), Path::new("c.toml"))
                .unwrap_err()
                .to_string()
        };
        assert!(err(&format!("id = 9\n{peers}")).contains("cluster.peers"));
        assert!(err(&format!("id = 1\n{peers}k = 3\nm = 1\n")).contains("cannot hold"));
        assert!(err(&format!("id = 1\n{peers}chunk = \"5000\"\n")).contains("chunk"));
        assert!(err("id = 1\npeers = { \"x\" = \"127.0.0.1:1\" }\n").contains("cluster.peers.x"));
    }

    #[test]
    fn example_config_parses() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"))
                .unwrap();
        let c = Config::parse(&text, Path::new("config.example.toml")).unwrap();
        assert_eq!(c.volumes.len(), 1);
        assert!(c.chap.is_some());
    }

    #[test]
    fn default_config_parses() {
        let c = Config::parse(&default_config_text(DEFAULT_LISTEN), Path::new("x")).unwrap();
        assert_eq!(c.volumes[0].size_bytes, 1 << 30);
        assert_eq!(c.listen[0].to_string(), DEFAULT_LISTEN);
        let two = Config::parse("[iscsi]\nlisten = [\"127.0.0.1:1\", \"127.0.0.1:2\"]\n[target]\niqn = \"iqn.2026-11.x:y\"\n[[volume]]\nname=\"v\"\nlun=0\nsize=\"1GiB\"\n", Path::new("x")).unwrap();
        assert_eq!(two.listen.len(), 2);
    }

    fn err(text: &str) -> String {
        Config::parse(text, Path::new("x")).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_key() {
        let base = "[target]\niqn = \"iqn.2026-11.x:y\"\n";
        assert!(err(&format!("{base}bogus = 1\n")).contains("bogus"));
        assert!(err(&format!(
            "{base}[[volume]]\nname=\"v\"\nlun=0\nsize=\"1 parsec\"\n"
        ))
        .contains("volume[0].size"));
        assert!(err(&format!(
            "{base}[[volume]]\nname=\"v\"\nlun=0\nsize=\"1GiB\"\nblock_size=1000\n"
        ))
        .contains("volume[0].block_size"));
        assert!(err(
            "[target]\niqn = \"Bad Name\"\n[[volume]]\nname=\"v\"\nlun=0\nsize=\"1GiB\"\n"
        )
        .contains("target.iqn"));
        assert!(err(&format!(
            "{base}[target.chap]\nuser=\"u\"\nsecret=\"short\"\n[[volume]]\nname=\"v\"\nlun=0\nsize=\"1GiB\"\n"
        ))
        .contains("target.chap.secret"));
        assert!(err(&format!("[iscsi]\nlisten=\"nowhere\"\n{base}")).contains("iscsi.listen"));
        assert!(err(base).contains("volume"));
        let vol = "[[volume]]\nname=\"v\"\nlun=0\nsize=\"1GiB\"\n";
        assert!(err(&format!(
            "[iscsi]\nmax_sessions_per_target = 4\nmax_sessions_per_initiator = 8\n{base}{vol}"
        ))
        .contains("iscsi.max_sessions_per_initiator"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("3MiB"), Some(3 << 20));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("99999999999TiB"), None);
    }
}
