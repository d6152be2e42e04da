//! The operator's command line and metrics against a real three-controller cluster from
//! `appliance up`: `appliance volume|controller|session|job` through the API of different
//! controllers (tables and `--json`, errors naming the field), and `/metrics` checked by
//! Prometheus's own `promtool check metrics`, with counters that move when I/O runs.
//!
//! The test command (scripts/test.sh) unpacks promtool from Debian's `prometheus` package into
//! `target/promtool` (without installing the service).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use tests::appliance::{binary, up};
use tests::initiator::{write16, Initiator, LoginOptions};

const IQN: &str = "iqn.2026-11.io.rainio:appliance";

fn cli(api: u16, password_file: &Path, args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .args(["--api", &format!("http://127.0.0.1:{api}")])
        .arg("--password-file")
        .arg(password_file)
        .env_remove("APPLIANCE_PASSWORD")
        .output()
        .expect("run the appliance CLI")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn promtool() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/promtool/usr/bin/promtool");
    assert!(
        p.exists(),
        "promtool not found at {}: run scripts/test.sh (it unpacks Debian's prometheus package there)",
        p.display()
    );
    p
}

fn metrics(api: u16) -> String {
    ureq::get(&format!("http://127.0.0.1:{api}/metrics"))
        .call()
        .expect("GET /metrics")
        .body_mut()
        .read_to_string()
        .expect("metrics body")
}

fn check_with_promtool(m: &str) {
    use std::io::Write as _;
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(m.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}\n---\n{m}",
        text(&out)
    );
}

fn sample(m: &str, key: &str) -> f64 {
    m.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no sample {key} in:\n{m}"))
}

/// Polls `check` every `pause` until it passes; fails with its last message after `secs`.
fn eventually(secs: u64, pause: Duration, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while let Err(why) = check() {
        assert!(Instant::now() < deadline, "{why}");
        std::thread::sleep(pause);
    }
}

#[test]
fn cli_and_metrics_against_a_three_controller_cluster() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    let (upp, _banner, base, api) = up(&dir);
    let pw = dir.join("admin-password");

    // Controllers, through controller 2's API: all three, up once the cluster has formed.
    eventually(120, Duration::from_millis(500), || {
        let o = cli(api + 1, &pw, &["controller", "list"]);
        assert!(o.status.success(), "{}", text(&o));
        let t = text(&o);
        assert_eq!(
            t.lines().count(),
            5,
            "header, three controllers, footnote: {t}"
        );
        if t.lines().filter(|l| l.contains(" up ")).count() == 3 {
            Ok(())
        } else {
            Err(format!("not all up: {t}"))
        }
    });

    // A volume through controller 3's API; listed through controller 1's, as JSON.
    let o = cli(
        api + 2,
        &pw,
        &["volume", "create", "data2", "--size", "32MiB"],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("as LUN 1"), "{}", text(&o));
    let o = cli(api, &pw, &["volume", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|x| x["name"].as_str())
        .collect();
    assert_eq!(names, ["data2", "vol0"], "{v}");
    let o = cli(api, &pw, &["volume", "list"]);
    assert!(
        text(&o).contains("32 MiB") && text(&o).contains("k=2 m=1"),
        "{}",
        text(&o)
    );
    // Deleted through controller 2: every controller stops serving it and removes its shards;
    // created again under the same name, it starts empty in new files.
    let shard_files = || {
        (1..=3)
            .flat_map(|c| std::fs::read_dir(dir.join(format!("c{c}"))).unwrap())
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("shards-"))
            .count()
    };
    // The answering controller serves it on return; the others open their files a moment later.
    let three_files = || {
        eventually(30, Duration::from_millis(100), || match shard_files() {
            3 => Ok(()),
            n => Err(format!("shard files: {n}")),
        });
    };
    three_files();
    let o = cli(
        api + 1,
        &pw,
        &["volume", "delete", "data2", "--confirm", "nope"],
    );
    assert!(
        !o.status.success() && text(&o).contains("confirm"),
        "{}",
        text(&o)
    );
    let o = cli(
        api + 1,
        &pw,
        &["volume", "delete", "data2", "--confirm", "data2"],
    );
    assert!(o.status.success(), "{}", text(&o));
    eventually(30, Duration::from_millis(100), || match shard_files() {
        0 => Ok(()),
        _ => Err("shards of data2 left behind".into()),
    });
    // Every controller applies the deletion from the log; the one that removed the last
    // file may not be the last to drop the volume from its list.
    for a in [api, api + 2] {
        eventually(30, Duration::from_millis(100), || {
            let t = text(&cli(a, &pw, &["volume", "list", "--json"]));
            if t.contains("data2") {
                Err(t)
            } else {
                Ok(())
            }
        });
    }
    let o = cli(api, &pw, &["volume", "delete", "vol0", "--confirm", "vol0"]);
    assert!(text(&o).contains("config file"), "{}", text(&o));
    let o = cli(
        api + 2,
        &pw,
        &["volume", "create", "data2", "--size", "32MiB"],
    );
    assert!(
        o.status.success() && text(&o).contains("as LUN 1"),
        "{}",
        text(&o)
    );
    three_files();
    // Errors name the field (from the API) and exit non-zero.
    let o = cli(
        api,
        &pw,
        &["volume", "create", "bad name", "--size", "1GiB"],
    );
    assert!(!o.status.success());
    assert!(
        text(&o).contains("name: use 1 to 64 letters"),
        "{}",
        text(&o)
    );
    let o = cli(api, &pw, &["volume", "create", "big", "--size", "lots"]);
    assert!(text(&o).contains("size:"), "{}", text(&o));
    // A wrong password is refused, and so is an unreachable API, each saying why.
    let wrong = tmp.path().join("wrong");
    std::fs::write(&wrong, "not the password\n").unwrap();
    let o = cli(api, &wrong, &["volume", "list"]);
    assert!(
        !o.status.success() && text(&o).contains("login refused"),
        "{}",
        text(&o)
    );
    let o = cli(1, &pw, &["volume", "list"]);
    assert!(text(&o).contains("cannot reach the API"), "{}", text(&o));

    let rt = tokio::runtime::Runtime::new().unwrap();
    let before = metrics(api);
    check_with_promtool(&before);
    let key = "rainio_volume_write_ops_total{controller=\"1\",volume=\"vol0\"}";
    let writes_before = sample(&before, key);
    // An initiator logged in to controller 1, writing: its session is listed, and the
    // counters move.
    let ini = rt.block_on(async {
        let addr = format!("127.0.0.1:{base}").parse().unwrap();
        let mut i = Initiator::login(addr, &LoginOptions::normal(IQN))
            .await
            .expect("login");
        let data = vec![0x5a; 64 * 1024];
        let mut good = 0;
        for n in 0..40u64 {
            let r = i
                .command(0, &write16(n * 128, 128), &data, data.len() as u32)
                .await
                .expect("write");
            good += u32::from(r.status == 0);
        }
        assert!(good >= 38, "writes acknowledged: {good} of 40");
        i
    });
    let o = cli(api + 1, &pw, &["session", "list"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(IQN.split(':').next().unwrap()) || text(&o).contains("iqn."),
        "{}",
        text(&o)
    );
    assert_eq!(
        text(&o).lines().count(),
        2,
        "one header and one session: {}",
        text(&o)
    );
    let after = metrics(api);
    check_with_promtool(&after);
    let writes_after = sample(&after, key);
    assert!(
        writes_after >= writes_before + 40.0,
        "write counter {writes_before} -> {writes_after}"
    );
    assert!(
        sample(
            &after,
            "rainio_volume_write_bytes_total{controller=\"1\",volume=\"vol0\"}"
        ) >= 38.0 * 65536.0
    );
    assert_eq!(
        sample(
            &after,
            &format!("rainio_sessions{{controller=\"1\",portal=\"127.0.0.1:{base}\"}}")
        ),
        1.0
    );
    // The data path's counters, on every controller's /metrics (controller i + 1 answers on
    // api + i): of 40 chunk-sized writes one at a time, those into a row's column 0 are
    // patched at the row's primary, whichever controller that is. The gathered-writes counter
    // is there, at 0: a write issued after the last one was answered never queues behind it.
    let engine = |event: &str| -> f64 {
        (0..3u16)
            .map(|i| {
                let key = format!(
                    "rainio_engine_events_total{{controller=\"{}\",event=\"{event}\"}}",
                    i + 1
                );
                sample(&metrics(api + i), &key)
            })
            .sum()
    };
    let patched = engine("patched_writes");
    assert!(patched >= 10.0, "patched writes: {patched}");
    assert_eq!(engine("gathered_writes"), 0.0);
    rt.block_on(async move { ini.logout().await.ok() });
    let o = cli(api, &pw, &["job", "list"]);
    assert!(text(&o).contains("no jobs running"), "{}", text(&o));
    // Three controllers hold k + m = 3 shards of every row: one cannot leave before another
    // joins, and the refusal says so.
    let o = cli(api, &pw, &["controller", "drain", "2"]);
    assert!(
        !o.status.success() && text(&o).contains("add a controller first"),
        "{}",
        text(&o)
    );
    drop(upp);
}
