//! The command line as an operator meets it: `up` on a fresh data dir, `check-config` errors.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_appliance");

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
    let mut child = Command::new(BIN)
        .args([
            "up",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            &listen,
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = Vec::new();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
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
    let text = lines.concat();
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
