//! The web console in a real browser: `appliance up` starts three controllers on loopback,
//! `tests/console/console.mjs` drives Debian's chromium through Playwright (log in, the
//! dashboard, creating a volume through the form, a wrong password) and asks this test for
//! faults: SIGKILL controller 3 (the console must show it down and the volume degraded), then
//! writes while it is down and a restart (the console must show a resync job whose progress
//! moves, then the cluster healthy again). Screenshots of every page go to
//! `target/console-screenshots/`.
//!
//! The test command (scripts/test.sh) installs chromium and playwright-core; without them this
//! test fails and says how to install them.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tests::appliance::binary;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `appliance up` with its own ports: portals from `base`, peers from `base + 1000`, console
/// from `api`. Returns the process and its banner.
fn up(dir: &Path) -> (Child, String, u16, u16) {
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
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
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
                return (child, banner, base, api);
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

fn pid_of(banner: &str, controller: u32) -> u32 {
    banner
        .lines()
        .find(|l| l.contains(&format!("(controller {controller},")))
        .and_then(|l| l.rsplit("pid ").next())
        .and_then(|p| p.trim_end_matches(')').trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid for controller {controller} in the banner:\n{banner}"))
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid}");
}

#[test]
fn console_in_a_browser_shows_the_cluster_and_its_faults() {
    let node_modules = repo().join("tests/console/node_modules/playwright-core");
    assert!(
        node_modules.exists(),
        "playwright-core is not installed: run scripts/test.sh (it runs `npm ci` in tests/console)"
    );
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "chromium is not installed: run scripts/test.sh (it runs `apt-get install -y chromium`)"
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    let (mut upp, banner, base, api) = up(&dir);
    let password = std::fs::read_to_string(dir.join("admin-password")).expect("admin-password");
    assert!(banner.contains(&format!("console    : http://127.0.0.1:{api}")), "{banner}");
    let c3 = pid_of(&banner, 3);
    let shots = repo().join("target/console-screenshots");
    let mut node = Command::new("node")
        .arg(repo().join("tests/console/console.mjs"))
        .env("CONSOLE_URL", format!("http://127.0.0.1:{api}"))
        .env("ADMIN_PASSWORD", password.trim())
        .env("SHOTS", &shots)
        .current_dir(repo().join("tests/console"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node is installed (it comes with the machine; scripts/test.sh checks)");
    let mut to_node = node.stdin.take().expect("stdin");
    let from_node = BufReader::new(node.stdout.take().expect("stdout"));
    let mut restarted: Option<Child> = None;
    let mut transcript = String::new();
    let started = Instant::now();
    for line in from_node.lines() {
        let line = line.expect("node output");
        println!("console.mjs: {line}");
        transcript.push_str(&line);
        transcript.push('\n');
        match line.as_str() {
            "FAULT kill" => {
                signal(c3, "-KILL");
                writeln!(to_node, "OK").expect("to node");
            }
            "FAULT write-and-restart" => {
                // Writes while controller 3 is away, so it has chunks to catch up on.
                let out = Command::new(env!("CARGO_BIN_EXE_write-load"))
                    .args([
                        "write",
                        &format!("127.0.0.1:{base}"),
                        "iqn.2026-11.io.rainio:appliance",
                        "4",
                        "262144",
                        "12",
                        "1073741824",
                    ])
                    .output()
                    .expect("write-load");
                assert!(
                    out.status.success(),
                    "writes with controller 3 down failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                println!("write-load: {}", String::from_utf8_lossy(&out.stdout).trim());
                restarted = Some(tests::appliance::spawn(&dir.join("c3")));
                writeln!(to_node, "OK").expect("to node");
            }
            _ => {}
        }
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "the browser test is taking too long"
        );
    }
    let status = node.wait().expect("node");
    // Stop what this test started: the restarted controller 3 by its pid, then `up` (which
    // stops the controllers it started).
    if let Some(mut c) = restarted {
        signal(c.id(), "-TERM");
        let _ = c.wait();
    }
    signal(upp.id(), "-TERM");
    let _ = upp.wait();
    assert!(
        status.success() && transcript.contains("PASS"),
        "the browser test failed:\n{transcript}\nscreenshots in {}",
        shots.display()
    );
    let moved = transcript
        .lines()
        .find(|l| l.starts_with("JOB moved"))
        .expect("job progress line");
    println!("{moved}");
    for name in [
        "01-login-refused",
        "02-dashboard",
        "03-volumes",
        "04-controllers",
        "07-degraded",
        "08-job",
        "10-recovered",
    ] {
        let p = shots.join(format!("{name}.png"));
        let len = std::fs::metadata(&p).map_or(0, |m| m.len());
        assert!(len > 10_000, "screenshot {} missing or empty", p.display());
    }
}
