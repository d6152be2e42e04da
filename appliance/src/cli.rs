//! The operator CLI's commands that talk to the API of any controller (`appliance volume`,
//! `controller`, `session`, `job`): log in, one request, a table or `--json`.
//!
//! Invariants: the password comes from `$APPLIANCE_PASSWORD`, `--password-file` or the file
//! `appliance up` wrote, never from the command line (where `ps` would show it); errors print
//! the API's own message (which names the field or the cause) and exit non-zero.

use clap::{Args, Subcommand};
use serde_json::Value;
use std::path::PathBuf;
use std::process::ExitCode;

/// How to reach and log in to the API.
#[derive(Args, Debug, Clone)]
pub struct ApiArgs {
    /// Console/API address of any controller (`appliance up` prints it).
    #[arg(
        long,
        env = "APPLIANCE_API",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub api: String,
    /// File holding the admin password (`$APPLIANCE_PASSWORD` wins when set).
    #[arg(
        long,
        env = "APPLIANCE_PASSWORD_FILE",
        default_value = "appliance-data/admin-password",
        global = true
    )]
    pub password_file: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// `appliance volume ...`.
#[derive(Subcommand, Debug)]
pub enum VolumeCmd {
    /// List volumes with health and size.
    List,
    /// Create a volume, served through every portal.
    Create {
        /// Name (letters, digits, '-' and '_').
        name: String,
        /// Size, e.g. 10GiB.
        #[arg(long)]
        size: String,
        /// Logical block size (512 or 4096).
        #[arg(long, default_value_t = 512)]
        block_size: u32,
        /// LUN (default: the lowest free one).
        #[arg(long)]
        lun: Option<u16>,
        /// Data columns (cluster default when omitted).
        #[arg(long)]
        k: Option<usize>,
        /// Parity columns (cluster default when omitted).
        #[arg(long)]
        m: Option<usize>,
    },
    /// Grow a volume.
    Resize {
        /// Name.
        name: String,
        /// New size, e.g. 20GiB.
        #[arg(long)]
        size: String,
    },
    /// Delete a volume and its data.
    Delete {
        /// Name.
        name: String,
        /// Repeat the name to confirm.
        #[arg(long)]
        confirm: String,
    },
}

/// `appliance controller ...`.
#[derive(Subcommand, Debug)]
pub enum ControllerCmd {
    /// List controllers with state, portal, sessions and I/O.
    List,
    /// Add a controller (started with `appliance run`, a config naming the cluster's peers and
    /// a certificate from `appliance pki`): it joins and shards are rebalanced onto it.
    Add {
        /// New controller id.
        id: u32,
        /// Its peer address (ip:port).
        #[arg(long)]
        peer: String,
    },
    /// Move a controller's shards to the others while it serves; then it leaves.
    Drain {
        /// Controller id.
        id: u32,
    },
    /// Remove a controller: drained first when it still holds shards.
    Remove {
        /// Controller id.
        id: u32,
    },
    /// Declare a controller out so its shards are rebuilt elsewhere.
    MarkOut {
        /// Controller id.
        id: u32,
    },
}

/// `appliance session ...`.
#[derive(Subcommand, Debug)]
pub enum SessionCmd {
    /// List logged-in iSCSI sessions on every controller.
    List,
}

/// `appliance job ...`.
#[derive(Subcommand, Debug)]
pub enum JobCmd {
    /// List running jobs with progress bars (`--watch` follows them until they end).
    List {
        /// Redraw every second until no job is left.
        #[arg(long)]
        watch: bool,
    },
    /// Cancel a job.
    Cancel {
        /// Job id (from `job list`).
        id: String,
    },
    /// Start a scrub now: every controller checks each row it leads (checksums, parity) and
    /// repairs what is bad; `job list --watch` follows it.
    Scrub,
}

struct Client {
    base: String,
    agent: ureq::Agent,
    token: String,
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::FAILURE
}

impl Client {
    fn login(a: &ApiArgs) -> Result<Self, String> {
        let password = match std::env::var("APPLIANCE_PASSWORD") {
            Ok(p) => p,
            Err(_) => std::fs::read_to_string(&a.password_file)
                .map(|s| s.trim_end().to_string())
                .map_err(|e| {
                    format!(
                        "cannot read the admin password from {}: {e} (set APPLIANCE_PASSWORD or pass --password-file)",
                        a.password_file.display()
                    )
                })?,
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(60)))
            .build()
            .into();
        let mut c = Self {
            base: a.api.trim_end_matches('/').to_string(),
            agent,
            token: String::new(),
        };
        let (status, v) = c.call(
            "POST",
            "/api/v1/login",
            Some(serde_json::json!({"password": password})),
        )?;
        if status != 200 {
            return Err(format!("login refused: {}", message(&v)));
        }
        c.token = v["token"].as_str().unwrap_or_default().to_string();
        Ok(c)
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<(u16, Value), String> {
        let url = format!("{}{path}", self.base);
        let auth = format!("Bearer {}", self.token);
        let unreachable = |e: ureq::Error| {
            format!("cannot reach the API at {}: {e} (is the appliance running? `appliance up` prints the console address; pass it with --api)", self.base)
        };
        let mut resp = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("authorization", &auth).call(),
            ("DELETE", _) => self
                .agent
                .delete(&url)
                .header("authorization", &auth)
                .call(),
            (m, b) => {
                let req = match m {
                    "PATCH" => self.agent.patch(&url),
                    _ => self.agent.post(&url),
                };
                req.header("authorization", &auth)
                    .header("content-type", "application/json")
                    .send(b.unwrap_or(Value::Null).to_string())
            }
        }
        .map_err(unreachable)?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, v))
    }

    /// A request whose answer must be 2xx; the API's message otherwise.
    fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let (status, v) = self.call(method, path, body)?;
        if (200..300).contains(&status) {
            Ok(v)
        } else {
            Err(format!("{} (HTTP {status})", message(&v)))
        }
    }
}

fn message(v: &Value) -> String {
    v["error"]
        .as_str()
        .map_or_else(|| v.to_string(), ToString::to_string)
}

fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(head.iter().map(|s| s.to_uppercase()).collect()) + "\n";
    for r in rows {
        out += &line(r.clone());
        out.push('\n');
    }
    out
}

fn run(a: &ApiArgs, f: impl FnOnce(&Client) -> Result<String, String>) -> ExitCode {
    match Client::login(a).and_then(|c| f(&c)) {
        Ok(out) => crate::print_out(&out),
        Err(e) => fail(e),
    }
}

/// One table row per element of the JSON array `v`.
fn rows(v: &Value, row: impl Fn(&Value) -> Vec<String>) -> Vec<Vec<String>> {
    v.as_array().into_iter().flatten().map(row).collect()
}

fn json_or(a: &ApiArgs, v: &Value, text: impl FnOnce(&Value) -> String) -> String {
    if a.json {
        format!("{}\n", serde_json::to_string_pretty(v).unwrap_or_default())
    } else {
        text(v)
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        o => o.to_string(),
    }
}

fn size(v: &Value) -> String {
    crate::human_bytes(v.as_u64().unwrap_or(0))
}

/// `appliance volume ...`.
pub fn volume(a: &ApiArgs, cmd: VolumeCmd) -> ExitCode {
    run(a, |c| match cmd {
        VolumeCmd::List => {
            let v = c.ok("GET", "/api/v1/volumes", None)?;
            Ok(json_or(a, &v, |v| {
                let rows = rows(v, |x| {
                    vec![
                        s(&x["name"]),
                        s(&x["lun"]),
                        size(&x["size_bytes"]),
                        s(&x["block_size"]),
                        format!("k={} m={}", x["k"], x["m"]),
                        s(&x["health"]),
                        s(&x["rows_behind"]),
                    ]
                });
                table(
                    &[
                        "name",
                        "lun",
                        "size",
                        "block",
                        "protection",
                        "health",
                        "rows behind",
                    ],
                    &rows,
                )
            }))
        }
        VolumeCmd::Create {
            name,
            size: sz,
            block_size,
            lun,
            k,
            m,
        } => {
            let mut body = serde_json::json!({"name": name, "size": sz, "block_size": block_size});
            for (key, val) in [
                ("lun", lun.map(u64::from)),
                ("k", k.map(|x| x as u64)),
                ("m", m.map(|x| x as u64)),
            ] {
                if let Some(val) = val {
                    body[key] = Value::from(val);
                }
            }
            let v = c.ok("POST", "/api/v1/volumes", Some(body))?;
            Ok(json_or(a, &v, |v| {
                format!(
                    "created volume {} ({}) as LUN {} on every portal; hosts see it after a rescan\n",
                    s(&v["name"]),
                    size(&v["size_bytes"]),
                    s(&v["lun"])
                )
            }))
        }
        VolumeCmd::Resize { name, size: sz } => {
            let v = c.ok(
                "PATCH",
                &format!("/api/v1/volumes/{name}"),
                Some(serde_json::json!({"size": sz})),
            )?;
            Ok(json_or(a, &v, |_| format!("volume {name} resized\n")))
        }
        VolumeCmd::Delete { name, confirm } => {
            let v = c.ok(
                "DELETE",
                &format!("/api/v1/volumes/{name}?confirm={confirm}"),
                None,
            )?;
            Ok(json_or(a, &v, |_| format!("volume {name} deleted\n")))
        }
    })
}

/// `appliance controller ...`.
pub fn controller(a: &ApiArgs, cmd: ControllerCmd) -> ExitCode {
    run(a, |c| {
        let (path, body) = match cmd {
            ControllerCmd::List => {
                let v = c.ok("GET", "/api/v1/controllers", None)?;
                return Ok(json_or(a, &v, |v| {
                    let rows = rows(v, |x| {
                        let io = &x["io"];
                        vec![
                            format!("{}{}", x["id"], if x["leader"] == true { " *" } else { "" }),
                            s(&x["state"]),
                            x["portals"].as_array().map_or("-".into(), |p| {
                                p.iter().map(s).collect::<Vec<_>>().join(",")
                            }),
                            s(&x["sessions"]),
                            size(&x["capacity_bytes"]),
                            format!(
                                "{}",
                                io["read_ops"].as_u64().unwrap_or(0)
                                    + io["write_ops"].as_u64().unwrap_or(0)
                            ),
                            if x["reachable"] == true {
                                format!("{:.1} ms", x["rtt_ms"].as_f64().unwrap_or(0.0))
                            } else {
                                s(&x["error"])
                            },
                        ]
                    });
                    table(
                        &[
                            "id",
                            "state",
                            "portal",
                            "sessions",
                            "storage",
                            "i/os",
                            "round trip",
                        ],
                        &rows,
                    ) + "(* leads the metadata log)\n"
                }));
            }
            ControllerCmd::Add { id, peer } => (
                "/api/v1/controllers".to_string(),
                serde_json::json!({"id": id, "peer": peer}),
            ),
            ControllerCmd::Drain { id } => (format!("/api/v1/controllers/{id}/drain"), Value::Null),
            ControllerCmd::Remove { id } => {
                (format!("/api/v1/controllers/{id}/remove"), Value::Null)
            }
            ControllerCmd::MarkOut { id } => {
                (format!("/api/v1/controllers/{id}/mark-out"), Value::Null)
            }
        };
        let v = c.ok("POST", &path, Some(body))?;
        Ok(json_or(a, &v, |v| {
            format!("{}\n", v["message"].as_str().unwrap_or("done"))
        }))
    })
}

/// `appliance session list`.
pub fn session(a: &ApiArgs, _cmd: SessionCmd) -> ExitCode {
    run(a, |c| {
        let v = c.ok("GET", "/api/v1/sessions", None)?;
        Ok(json_or(a, &v, |v| {
            let rows = rows(v, |x| {
                vec![
                    s(&x["initiator"]),
                    s(&x["isid"]),
                    s(&x["controller"]),
                    s(&x["portal"]),
                    s(&x["peer"]),
                    s(&x["in_flight"]),
                    s(&x["commands"]),
                ]
            });
            table(
                &[
                    "initiator",
                    "isid",
                    "controller",
                    "portal",
                    "from",
                    "in flight",
                    "commands",
                ],
                &rows,
            )
        }))
    })
}

fn job_lines(v: &Value) -> String {
    let jobs = v.as_array().cloned().unwrap_or_default();
    if jobs.is_empty() {
        return "no jobs running\n".into();
    }
    let mut out = String::new();
    for j in &jobs {
        let p = crate::node_progress(j);
        let unit = if j["kind"] == "scrub" || j["kind"] == "rebuild" {
            "rows"
        } else {
            "chunks"
        };
        out += &format!("{:<24} {}\n", s(&j["id"]), crate::progress_line(&p, unit));
    }
    out
}

/// `appliance job ...`.
pub fn job(a: &ApiArgs, cmd: JobCmd) -> ExitCode {
    match cmd {
        JobCmd::Cancel { id } => run(a, |c| {
            let v = c.ok(
                "POST",
                &format!("/api/v1/jobs/{id}/cancel"),
                Some(Value::Null),
            )?;
            Ok(json_or(a, &v, |_| format!("job {id} cancelled\n")))
        }),
        JobCmd::Scrub => run(a, |c| {
            let v = c.ok("POST", "/api/v1/jobs/scrub", Some(Value::Null))?;
            Ok(json_or(a, &v, |v| {
                format!("{}\n", v["message"].as_str().unwrap_or("scrub requested"))
            }))
        }),
        JobCmd::List { watch: false } => run(a, |c| {
            let v = c.ok("GET", "/api/v1/jobs", None)?;
            Ok(json_or(a, &v, job_lines))
        }),
        JobCmd::List { watch: true } => {
            let c = match Client::login(a) {
                Ok(c) => c,
                Err(e) => return fail(e),
            };
            use std::io::IsTerminal as _;
            let tty = std::io::stdout().is_terminal();
            let mut drawn = 0usize;
            loop {
                let v = match c.ok("GET", "/api/v1/jobs", None) {
                    Ok(v) => v,
                    Err(e) => return fail(e),
                };
                let text = job_lines(&v);
                if tty && drawn > 0 {
                    // Back over the previous frame, so the bars move in place.
                    print!("\x1b[{drawn}A\x1b[J");
                }
                drawn = text.lines().count();
                if crate::print_out(&text) != ExitCode::SUCCESS {
                    return ExitCode::FAILURE;
                }
                if v.as_array().is_none_or(Vec::is_empty) {
                    return ExitCode::SUCCESS;
                }
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
    }
}
