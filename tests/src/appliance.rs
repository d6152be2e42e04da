//! Starts real `appliance` processes on loopback for integration tests.
//!
//! The binary is taken from `$APPLIANCE_BIN`, or from the workspace's `target/release` or
//! `target/debug` (the test command builds it first). A missing binary fails the test loudly.
//! Each process is stopped by PID when its handle is dropped.

use std::io::BufRead as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The target IQN every test appliance serves.
pub const IQN: &str = "iqn.2026-11.io.rainio:test";

/// A running appliance process.
#[derive(Debug)]
pub struct Appliance {
    child: Child,
    /// Portal address (the first portal).
    pub addr: SocketAddr,
    /// Every portal, in order (portal i is TPGT i + 1).
    pub addrs: Vec<SocketAddr>,
    /// Its data dir (deleted on drop).
    pub dir: tempfile::TempDir,
}

/// Path of the appliance binary.
///
/// # Panics
/// If it has not been built.
pub fn binary() -> PathBuf {
    if let Ok(p) = std::env::var("APPLIANCE_BIN") {
        return PathBuf::from(p);
    }
    // The binary of the same profile as these tests, so a stale build of the other profile is
    // never picked up. `cargo test --workspace` builds it.
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target")
        },
        PathBuf::from,
    );
    let p = target.join(profile).join("appliance");
    assert!(
        p.exists(),
        "appliance binary not found at {}: run the tests with `cargo test --workspace` (scripts/test.sh does) or set APPLIANCE_BIN",
        p.display()
    );
    p
}

/// A free loopback port for a listener a test starts later: bound once to check it is free,
/// then released. Taken below the kernel's ephemeral range (`ip_local_port_range` starts at
/// 32768 by default) so that no outgoing connection of the many a cluster test makes can be
/// given it as its source port in the meantime (which made a controller started later fail
/// to listen), and never handed out twice by one test process.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    static SEQ: AtomicU64 = AtomicU64::new(0);
    const LOW: u64 = 20_000;
    const SPAN: u64 = 12_000;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id()) << 20;
    for _ in 0..10_000 {
        // splitmix64 of (seed, sequence): spread over the range, different per process.
        let mut z = seed.wrapping_add(
            SEQ.fetch_add(1, Ordering::Relaxed)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        let port = (LOW + (z ^ (z >> 31)) % SPAN) as u16;
        let mut given = GIVEN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if given.contains(&port) || TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        given.push(port);
        return port;
    }
    panic!("no free loopback port between {LOW} and {}", LOW + SPAN);
}

impl Appliance {
    /// Starts an appliance with one 128 MiB volume (LUN 0) and `extra` TOML appended to the
    /// `[target]` table (e.g. a `[target.chap]` table).
    ///
    /// # Panics
    /// If it does not start listening within 20 s.
    pub fn start(target_extra: &str) -> Self {
        Self::start_with(target_extra, "128MiB", 512)
    }

    /// As [`Self::start`] with a volume size and block size.
    ///
    /// # Panics
    /// If it does not start listening within 20 s.
    pub fn start_with(target_extra: &str, size: &str, block_size: u32) -> Self {
        Self::start_full(1, target_extra, size, block_size)
    }

    /// An appliance serving its target through `portals` portals (one path each).
    ///
    /// # Panics
    /// If it does not start listening within 20 s.
    pub fn start_portals(portals: usize, target_extra: &str) -> Self {
        Self::start_full(portals, target_extra, "128MiB", 512)
    }

    fn start_full(portals: usize, target_extra: &str, size: &str, block_size: u32) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let addrs: Vec<SocketAddr> = (0..portals)
            .map(|_| format!("127.0.0.1:{}", free_port()).parse().expect("addr"))
            .collect();
        let addr = addrs[0];
        let listen: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
        let listen = listen.join(", ");
        let cfg = format!(
            "data_dir = \".\"\nlog_level = \"info\"\n[iscsi]\nlisten = [{listen}]\n[target]\niqn = \"{IQN}\"\n{target_extra}\n[[volume]]\nname = \"vol0\"\nlun = 0\nsize = \"{size}\"\nblock_size = {block_size}\n"
        );
        std::fs::write(dir.path().join("appliance.toml"), cfg).expect("write config");
        std::fs::File::create(dir.path().join("appliance.log")).expect("log file");
        let child = spawn(dir.path());
        let mut me = Self {
            child,
            addr,
            addrs,
            dir,
        };
        me.wait_listening();
        me
    }

    /// Waits until the portal accepts connections.
    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(self.addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "appliance did not listen on {}; log:\n{}",
                self.addr,
                self.log()
            );
            assert!(self.is_running(), "appliance exited; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// iSCSI URL of LUN `lun` through portal `portal`.
    pub fn url_on(&self, portal: usize, lun: u16) -> String {
        format!("iscsi://{}/{IQN}/{lun}", self.addrs[portal])
    }

    /// iSCSI URL of LUN `lun`, optionally with CHAP credentials.
    pub fn url(&self, lun: u16, chap: Option<(&str, &str)>) -> String {
        let cred = chap.map(|(u, p)| format!("{u}%{p}@")).unwrap_or_default();
        format!("iscsi://{cred}{}/{IQN}/{lun}", self.addr)
    }

    /// The process log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("appliance.log")).unwrap_or_default()
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for a clean exit; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().expect("wait")
    }

    /// Stops the process (SIGTERM) and starts it again on the same config and data dir.
    ///
    /// # Panics
    /// If it does not come back within 20 s.
    pub fn restart(&mut self) {
        let status = self.terminate();
        assert!(status.success(), "clean stop before restart: {status:?}");
        self.child = spawn(self.dir.path());
        self.wait_listening();
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts `appliance run` on `dir`'s `appliance.toml`, appending to its `appliance.log`.
///
/// # Panics
/// If the process cannot be started.
pub fn spawn(dir: &std::path::Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(dir.join("appliance.log"))
        .expect("log");
    Command::new(binary())
        .arg("run")
        .arg("--config")
        .arg(dir.join("appliance.toml"))
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn appliance")
}

/// Runs a command, returning (success, stdout + stderr).
///
/// # Panics
/// If the program is not installed (the test command installs it).
pub fn run_tool(prog: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(prog).args(args).output().unwrap_or_else(|e| {
        panic!("{prog} is not installed ({e}): run scripts/test.sh, which installs libiscsi-bin")
    });
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), s)
}

/// Starts `appliance up` (three controllers) with its own ports: portals from `base`, peers from `base + 1000`, console
/// from `api`. Returns the process, its banner, the first portal port and the first console port.
///
/// # Panics
/// When it cannot start (other than for a busy port, which it retries elsewhere).
pub fn up(dir: &std::path::Path) -> (Up, String, u16, u16) {
    for attempt in 0..20u32 {
        let spread = (std::process::id() * 7 + attempt * 131) % 4000;
        let base = u16::try_from(20000 + spread * 2).expect("below 65536");
        let api = base + 10000;
        let mut child = Command::new(binary())
            .args(["up", "--data-dir"])
            .arg(dir)
            .args(["--listen", &format!("127.0.0.1:{base}")])
            .args(["--api", &format!("127.0.0.1:{api}")])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .expect("start appliance up");
        let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut banner = String::new();
        let mut line = String::new();
        loop {
            line.clear();
            if out.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            banner.push_str(&line);
            if line.starts_with("Press Ctrl-C") {
                // Keep draining stdout so the process never blocks on a full pipe.
                std::thread::spawn(move || {
                    let mut sink = String::new();
                    while out.read_line(&mut sink).unwrap_or(0) > 0 {
                        sink.clear();
                    }
                });
                return (Up(child), banner, base, api);
            }
        }
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err);
        let _ = child.wait();
        assert!(
            err.contains("cannot") && err.contains("127.0.0.1"),
            "appliance up failed for another reason than a busy port:\n{banner}{err}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
    panic!("no free ports for appliance up after 20 attempts");
}

/// The pid `appliance up` printed for `controller`.
///
/// # Panics
/// When the banner has none.
pub fn pid_of(banner: &str, controller: u32) -> u32 {
    banner
        .lines()
        .find(|l| l.contains(&format!("(controller {controller},")))
        .and_then(|l| l.rsplit("pid ").next())
        .and_then(|p| p.trim_end_matches(')').trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid for controller {controller} in the banner:\n{banner}"))
}

/// Sends `sig` (e.g. `-TERM`) to `pid`, a process this test started.
///
/// # Panics
/// When kill(1) fails.
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid}");
}

/// A running `appliance up`; dropping it (also when a test panics) asks it to stop its
/// controllers (SIGTERM) and waits.
#[derive(Debug)]
pub struct Up(Child);

impl Up {
    /// Its pid.
    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .args(["-TERM", &self.0.id().to_string()])
                .status();
            let _ = self.0.wait();
        }
    }
}
