//! `/metrics`: this controller's figures in the Prometheus text exposition format (0.0.4), for
//! a scraper that polls every controller.
//!
//! Each controller reports what it measures itself (its I/O per volume, its sessions, its
//! replica of the log, its round trips to peers) and the cluster state as its replica sees
//! it; sums over controllers are the scraper's job.
//!
//! Invariants: every family has one `# HELP` and one `# TYPE` line before its samples;
//! counters end in `_total`; label values are escaped; histogram buckets are cumulative and
//! end with `+Inf` equal to `_count`.

use super::ApiState;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use std::fmt::Write as _;

/// Escapes a label value (backslash, quote, newline).
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: f64) {
        let l: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", esc(v)))
            .collect();
        if l.is_empty() {
            let _ = writeln!(self.0, "{name} {v}");
        } else {
            let _ = writeln!(self.0, "{name}{{{}}} {v}", l.join(","));
        }
    }
}

/// Renders the metrics of `st`'s controller.
pub async fn render(st: &ApiState) -> String {
    let ctl = &st.ctl;
    let live = ctl.live();
    let id = ctl.id().to_string();
    let mut o = Out(String::new());
    type Pick = fn(&lun::stats::IoSnapshot) -> u64;
    let counters: [(&str, &str, Pick); 6] = [
        (
            "rainio_volume_read_ops_total",
            "Read commands completed",
            |s| s.read_ops,
        ),
        (
            "rainio_volume_write_ops_total",
            "Write commands completed",
            |s| s.write_ops,
        ),
        (
            "rainio_volume_other_ops_total",
            "Other SCSI commands completed",
            |s| s.other_ops,
        ),
        (
            "rainio_volume_read_bytes_total",
            "Bytes read by hosts",
            |s| s.read_bytes,
        ),
        (
            "rainio_volume_write_bytes_total",
            "Bytes written by hosts",
            |s| s.write_bytes,
        ),
        (
            "rainio_volume_errors_total",
            "Commands that did not end GOOD",
            |s| s.errors,
        ),
    ];
    for (name, help, f) in counters {
        o.family(name, "counter", help);
        for v in &live.volumes {
            o.sample(
                name,
                &[("controller", &id), ("volume", &v.name)],
                f(&v.io) as f64,
            );
        }
    }
    o.family("rainio_volume_queue_depth", "gauge", "Commands in flight");
    for v in &live.volumes {
        o.sample(
            "rainio_volume_queue_depth",
            &[("controller", &id), ("volume", &v.name)],
            v.io.in_flight as f64,
        );
    }
    let h = "rainio_volume_latency_seconds";
    o.family(h, "histogram", "Command latency from admission to answer");
    for v in &live.volumes {
        let mut cum = 0u64;
        for (i, n) in v.io.latency_buckets.iter().enumerate() {
            cum += n;
            let le = lun::stats::LATENCY_BUCKETS_US
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |us| format!("{}", *us as f64 / 1e6));
            o.sample(
                &format!("{h}_bucket"),
                &[("controller", &id), ("volume", &v.name), ("le", &le)],
                cum as f64,
            );
        }
        let labels = [("controller", id.as_str()), ("volume", v.name.as_str())];
        o.sample(
            &format!("{h}_sum"),
            &labels,
            v.io.latency_sum_us as f64 / 1e6,
        );
        o.sample(&format!("{h}_count"), &labels, cum as f64);
    }
    o.family(
        "rainio_sessions",
        "gauge",
        "Logged-in iSCSI sessions per portal",
    );
    for p in &live.portals {
        let n = live.sessions.iter().filter(|s| &s.portal == p).count();
        o.sample(
            "rainio_sessions",
            &[("controller", &id), ("portal", p)],
            n as f64,
        );
    }
    type DevPick = fn(&crate::server::DeviceView) -> u64;
    let device_counters: [(&str, &str, DevPick); 4] = [
        (
            "rainio_device_ios_total",
            "Requests completed by each backing device",
            |d| d.ios,
        ),
        (
            "rainio_device_slow_ios_total",
            "Requests slower than 500 ms",
            |d| d.slow_ios,
        ),
        (
            "rainio_device_checksum_failures_total",
            "Shard slots that failed their checksum when read",
            |d| d.checksum_failures,
        ),
        (
            "rainio_device_errors_total",
            "Requests the kernel refused",
            |d| d.read_errors + d.write_errors + d.flush_errors,
        ),
    ];
    for (name, help, f) in device_counters {
        o.family(name, "counter", help);
        for d in &live.devices {
            o.sample(
                name,
                &[("controller", &id), ("device", &d.path)],
                f(d) as f64,
            );
        }
    }
    o.family(
        "rainio_uptime_seconds",
        "gauge",
        "Seconds since this controller started",
    );
    o.sample(
        "rainio_uptime_seconds",
        &[("controller", &id)],
        live.uptime_secs as f64,
    );
    if let Some(node) = ctl.node() {
        let s = node.status();
        o.family(
            "rainio_controller_state",
            "gauge",
            "1 for the state each controller is in, as this controller's replica of the log says",
        );
        for (c, state) in &s.controllers {
            for name in ["up", "resyncing", "down"] {
                o.sample(
                    "rainio_controller_state",
                    &[("controller", &c.to_string()), ("state", name)],
                    f64::from(u8::from(state == name)),
                );
            }
        }
        o.family(
            "rainio_fenced",
            "gauge",
            "1 while this controller refuses host I/O",
        );
        o.sample(
            "rainio_fenced",
            &[("controller", &id)],
            f64::from(u8::from(s.fenced)),
        );
        // The data path's own counters: which write and read paths the primary and the
        // portal took (where a workload's CPU and network go).
        let e = node.engine().stats();
        o.family(
            "rainio_engine_events_total",
            "counter",
            "Data path events at this controller: row writes committed as patches (patched_writes), host writes committed with another write of their row (gathered_writes), rows read by decoding (degraded_reads), reads also decoded because their holder was slow (hedged_reads, hedges_won), host reads served from located or leased chunks (located_reads, leased_reads), rows of leased reads decoded from this controller's own parity copy instead of fetching a data chunk (leased_rows_decoded), read leases revoked by writes (leases_revoked), rows found with a chunk behind (rows_behind_found), chunks copied by resync and by moves (resync_chunks, moved_chunks)",
        );
        for (event, n) in [
            ("patched_writes", e.patched_writes),
            ("gathered_writes", e.gathered_writes),
            ("degraded_reads", e.degraded_reads),
            ("hedged_reads", e.hedged_reads),
            ("hedges_won", e.hedges_won),
            ("located_reads", e.located_reads),
            ("leased_reads", e.leased_reads),
            ("leased_rows_decoded", e.leased_rows_decoded),
            ("leases_revoked", e.leases_revoked),
            ("rows_behind_found", e.rows_behind_found),
            ("resync_chunks", e.resync_chunks),
            ("moved_chunks", e.moved_chunks),
        ] {
            o.sample(
                "rainio_engine_events_total",
                &[("controller", &id), ("event", event)],
                n as f64,
            );
        }
        let names: std::collections::BTreeMap<u32, String> = node
            .volume_records()
            .into_values()
            .map(|r| (r.id, r.name))
            .collect();
        let name_of = |v: u32| names.get(&v).cloned().unwrap_or_else(|| v.to_string());
        o.family(
            "rainio_volume_degraded",
            "gauge",
            "1 while a volume is not healthy",
        );
        for v in &s.volumes {
            o.sample(
                "rainio_volume_degraded",
                &[("volume", &name_of(v.id))],
                f64::from(u8::from(v.health != "healthy")),
            );
        }
        o.family(
            "rainio_volume_rows_behind",
            "gauge",
            "Stripe rows with a chunk behind",
        );
        for v in &s.volumes {
            o.sample(
                "rainio_volume_rows_behind",
                &[("volume", &name_of(v.id))],
                v.rows_behind as f64,
            );
        }
        o.family(
            "rainio_job_progress_ratio",
            "gauge",
            "Fraction done of each running job",
        );
        for v in &s.volumes {
            if let Some(p) = &v.resync {
                let frac = if p.total == 0 {
                    1.0
                } else {
                    p.done as f64 / p.total as f64
                };
                o.sample(
                    "rainio_job_progress_ratio",
                    &[
                        ("job", &format!("resync-{}", name_of(v.id))),
                        ("kind", "resync"),
                    ],
                    frac,
                );
            }
        }
        o.family(
            "rainio_resync_chunks_total",
            "counter",
            "Chunks this controller copied by resync",
        );
        o.sample(
            "rainio_resync_chunks_total",
            &[("controller", &id)],
            s.resync_chunks as f64,
        );
        o.family(
            "rainio_hedged_reads_total",
            "counter",
            "Reads whose holder was slower than the hedging threshold, so the row was also decoded from the other holders",
        );
        o.sample(
            "rainio_hedged_reads_total",
            &[("controller", &id)],
            s.hedged_reads as f64,
        );
        if let Some(l) = &s.scrub.last {
            for (name, help, v) in [
                (
                    "rainio_scrub_last_rows",
                    "Rows the last scrub pass checked",
                    l.rows,
                ),
                (
                    "rainio_scrub_last_bad_chunks",
                    "Damaged, missing or stale copies the last scrub pass found",
                    l.bad_chunks,
                ),
                (
                    "rainio_scrub_last_parity_rewritten",
                    "Parity copies the last scrub pass rewrote",
                    l.parity_rewritten,
                ),
                (
                    "rainio_scrub_last_finished_timestamp_seconds",
                    "When the last scrub pass ended",
                    l.finished_unix,
                ),
            ] {
                o.family(name, "gauge", help);
                o.sample(name, &[("controller", &id)], v as f64);
            }
        }
        let leader = f64::from(u8::from(s.leader == Some(u64::from(ctl.id()))));
        for (name, help, v) in [
            ("rainio_raft_term", "Metadata log term", s.log.term as f64),
            (
                "rainio_raft_last_log_index",
                "Index of the last metadata log entry",
                s.log.last_index as f64,
            ),
            (
                "rainio_raft_applied_index",
                "Index of the last applied metadata log entry",
                s.log.applied as f64,
            ),
            (
                "rainio_raft_leader",
                "1 when this controller leads the metadata log",
                leader,
            ),
        ] {
            o.family(name, "gauge", help);
            o.sample(name, &[("controller", &id)], v);
        }
        o.family(
            "rainio_peer_rtt_seconds",
            "gauge",
            "Round trip of a status call to each peer (absent while it does not answer)",
        );
        for p in node.peer_statuses(super::PEER_WAIT).await {
            if p.report.is_ok() {
                o.sample(
                    "rainio_peer_rtt_seconds",
                    &[("controller", &id), ("peer", &p.id.to_string())],
                    p.rtt.as_secs_f64(),
                );
            }
        }
    }
    o.0
}

/// `GET /metrics`.
pub async fn handler(State(st): State<ApiState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render(&st).await,
    )
}
