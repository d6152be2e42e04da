//! The command line as an operator meets it: `up` on a fresh data dir, `check-config` errors.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_appliance");

/// A running `up`: stopped (SIGTERM, which stops its controllers too) when dropped, so a
/// failed assertion does not leave the cluster running.
struct Up(std::process::Child);

impl Up {
    fn start(cmd: &mut Command) -> Self {
        Self(cmd.spawn().unwrap())
    }
}

impl std::ops::Deref for Up {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Up {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.0.id().to_string()])
                .status();
            let _ = self.0.wait();
        }
    }
}

/// `up`'s output up to its "Press Ctrl-C" line (or EOF, or the timeout).
fn banner(child: &mut std::process::Child, within: Duration) -> String {
    let mut lines = Vec::new();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let deadline = Instant::now() + within;
    loop {
        let mut l = String::new();
        if out.read_line(&mut l).unwrap() == 0 || Instant::now() > deadline {
            break;
        }
        let done = l.contains("Press Ctrl-C");
        lines.push(l);
        if done {
            break;
        }
    }
    lines.concat()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn up_creates_a_config_prints_portal_and_iqn_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let listen = format!("127.0.0.1:{}", free_port());
    let mut child = Up::start(
        Command::new(BIN)
            .args([
                "up",
                "--controllers",
                "1",
                "--data-dir",
                data.to_str().unwrap(),
                "--listen",
                &listen,
                "--api",
                &format!("127.0.0.1:{}", free_port()),
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    let text = banner(&mut child, Duration::from_secs(20));
    assert!(
        text.contains("target IQN : iqn.2026-11.io.rainio:appliance"),
        "{text}"
    );
    assert!(text.contains(&format!("portal     : {listen}")), "{text}");
    assert!(text.contains("LUN 0"), "{text}");
    assert!(data.join("appliance.toml").exists());
    assert!(
        std::net::TcpStream::connect(&listen).is_ok(),
        "portal listens"
    );
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

/// A base port whose next two ports and the same three plus 1000 are free (as `up` needs).
fn free_port_block() -> u16 {
    for _ in 0..200 {
        let base = free_port();
        if base > 60_000 {
            continue;
        }
        let ports = [
            base,
            base + 1,
            base + 2,
            base + 1000,
            base + 1001,
            base + 1002,
            base + 2000,
            base + 2001,
            base + 2002,
        ];
        if ports
            .iter()
            .all(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        {
            return base;
        }
    }
    panic!("no block of free loopback ports");
}

#[test]
fn up_starts_a_three_controller_cluster_with_one_disk_through_every_portal() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let base = free_port_block();
    let listen = format!("127.0.0.1:{base}");
    let mut child = Up::start(
        Command::new(BIN)
            .args([
                "up",
                "--data-dir",
                data.to_str().unwrap(),
                "--listen",
                &listen,
                "--api",
                &format!("127.0.0.1:{}", base + 2000),
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    let text = banner(&mut child, Duration::from_secs(60));
    assert!(text.contains("3 controllers, k=2 m=1"), "{text}");
    for i in 0..3u16 {
        assert!(
            text.contains(&format!(
                "portal     : 127.0.0.1:{} (controller {}",
                base + i,
                i + 1
            )),
            "{text}"
        );
        assert!(data
            .join(format!("c{}", i + 1))
            .join("appliance.toml")
            .exists());
    }
    // `up` says the cluster is up only once it serves the volume: right away, SendTargets
    // through any portal lists every controller's portal, each its own TPGT, and the LUN
    // answers through each (libiscsi's iscsi-ls, installed by the test command).
    let out = Command::new("iscsi-ls")
        .args(["-s", &format!("iscsi://127.0.0.1:{}", base + 1)])
        .output()
        .expect("iscsi-ls (libiscsi-bin) is installed by scripts/test.sh");
    let ls = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        (0..3u16).all(|i| ls.contains(&format!("127.0.0.1:{},{}", base + i, i + 1)))
            && ls.matches("Lun:0").count() == 3,
        "the LUN was not served through every portal when `up` said it was up:\n{ls}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `appliance status` through any controller's peer address shows all three up.
    assert!(
        text.contains(&format!(
            "appliance status --peer 127.0.0.1:{}",
            base + 1000
        )),
        "{text}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new(BIN)
            .args(["status", "--peer", &format!("127.0.0.1:{}", base + 1002)])
            .arg("--pki")
            .arg(data.join("pki"))
            .output()
            .unwrap();
        let st = String::from_utf8_lossy(&out.stdout).to_string();
        let up = st.lines().filter(|l| l.trim_end().ends_with(" up")).count();
        if out.status.success() && up == 3 && st.contains("healthy") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "status never showed three controllers up:\n{st}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    // Every controller stopped with it.
    for i in 0..3u16 {
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", base + i)).is_ok() {
            assert!(
                Instant::now() < deadline,
                "controller {} still listening",
                i + 1
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn check_config_names_the_bad_key_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.toml");
    std::fs::write(
        &p,
        "[target]\niqn = \"iqn.2026-11.x:y\"\n[[volume]]\nname = \"v\"\nlun = 0\nsize = \"lots\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check-config", p.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("volume[0].size"), "{err}");
    std::fs::write(&p, "[target]\niqn = \"iqn.2026-11.x:y\"\ntypo = 1\n").unwrap();
    let out = Command::new(BIN)
        .args(["check-config", p.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("typo"));
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml");
    let out = Command::new(BIN)
        .args(["check-config", example])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_taken_port_is_reported_with_the_likely_cause() {
    let dir = tempfile::tempdir().unwrap();
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = holder.local_addr().unwrap().to_string();
    let out = Command::new(BIN)
        .args([
            "up",
            "--data-dir",
            dir.path().join("d").to_str().unwrap(),
            "--listen",
            &listen,
            "--api",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot listen") && err.contains("another target"),
        "{err}"
    );
}
