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
use tests::appliance::{pid_of, signal, up};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A controller this test started; stopped by its pid when dropped.
struct Stopped(Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        signal(self.0.id(), "-TERM");
        let _ = self.0.wait();
    }
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
    let (upp, banner, base, api) = up(&dir);
    let password = std::fs::read_to_string(dir.join("admin-password")).expect("admin-password");
    assert!(
        banner.contains(&format!("console    : http://127.0.0.1:{api}")),
        "{banner}"
    );
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
    let mut restarted: Option<Stopped> = None;
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
                println!(
                    "write-load: {}",
                    String::from_utf8_lossy(&out.stdout).trim()
                );
                restarted = Some(Stopped(tests::appliance::spawn(&dir.join("c3"))));
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
    // Stop what this test started: the restarted controller 3, then `up` (which stops the
    // controllers it started). Both also stop when a panic drops them.
    drop(restarted);
    drop(upp);
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
