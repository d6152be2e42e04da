//! The operator API (`/api/v1`, JSON), the Prometheus metrics (`/metrics`) and the web console
//! (`/`), served by every controller with axum.
//!
//! Any controller answers for the whole cluster: the metadata (controllers, volumes, health)
//! comes from its own replica of the log, the live figures (I/O, sessions) from its peers'
//! status answers, asked for at request time with a short timeout (a peer that does not
//! answer is shown unreachable, never waited for).
//!
//! Invariants:
//! - Every route is an entry of [`ROUTES`] (method, path, handler, summary, auth, body), the
//!   one table both the router and the OpenAPI document are built from, so they cannot drift
//!   apart (a test sends every documented method to every path).
//! - Every `/api/v1` route but `login` and `openapi.json` needs a session (cookie or bearer);
//!   a state-changing request made with the cookie also needs the CSRF header.
//! - Errors are JSON `{"error": ..., "field": ...}` with a 4xx/5xx status; a validation error
//!   names the request field. Nothing here panics on a request.
//! - No response carries the password, its hash or a token other than the caller's own new
//!   one at login.

pub mod auth;
mod console;
pub mod metrics;
pub mod openapi;
pub mod tls;

use crate::server::{NewVolume, Shared, VolumeInfo};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, patch, post, MethodRouter};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// How long a request waits for a peer's live figures.
pub const PEER_WAIT: Duration = Duration::from_millis(700);

/// One documented route.
#[derive(Debug, Clone, Copy)]
pub struct RouteDoc {
    /// HTTP method.
    pub method: &'static str,
    /// Path (axum and OpenAPI share the `{param}` syntax).
    pub path: &'static str,
    /// What it does.
    pub summary: &'static str,
    /// Whether it needs a session.
    pub auth: bool,
    /// Request body schema (a name in the document's components), if any.
    pub body: Option<&'static str>,
    /// The handler, for the router.
    pub handler: fn() -> MethodRouter<ApiState>,
}

const fn r(
    method: &'static str,
    path: &'static str,
    summary: &'static str,
    auth: bool,
    body: Option<&'static str>,
    handler: fn() -> MethodRouter<ApiState>,
) -> RouteDoc {
    RouteDoc {
        method,
        path,
        summary,
        auth,
        body,
        handler,
    }
}

/// Every route of the API (the console's static files and `/metrics` included).
pub const ROUTES: &[RouteDoc] = &[
    r(
        "GET",
        "/api/v1/openapi.json",
        "This document",
        false,
        None,
        || get(openapi_json),
    ),
    r(
        "POST",
        "/api/v1/login",
        "Log in as admin: sets the session cookie, returns a bearer token and the CSRF token",
        false,
        Some("Login"),
        || post(login),
    ),
    r(
        "POST",
        "/api/v1/logout",
        "End the session",
        true,
        None,
        || post(logout),
    ),
    r(
        "GET",
        "/api/v1/session",
        "The current session (its CSRF token)",
        true,
        None,
        || get(session),
    ),
    r(
        "GET",
        "/api/v1/cluster",
        "Cluster summary and health",
        true,
        None,
        || get(cluster),
    ),
    r(
        "GET",
        "/api/v1/controllers",
        "Every controller: state, portal, sessions, capacity, I/O",
        true,
        None,
        || get(controllers),
    ),
    r(
        "POST",
        "/api/v1/controllers",
        "Add a controller: it joins the metadata log and positions are rebalanced onto it (202; follow GET /api/v1/jobs)",
        true,
        Some("AddController"),
        || post(add_controller),
    ),
    r(
        "GET",
        "/api/v1/controllers/{id}",
        "One controller",
        true,
        None,
        || get(controller),
    ),
    r(
        "POST",
        "/api/v1/controllers/{id}/drain",
        "Drain a controller: its shards move to the others while it serves, then it leaves (202; follow GET /api/v1/jobs)",
        true,
        None,
        || post(drain_controller),
    ),
    r(
        "POST",
        "/api/v1/controllers/{id}/remove",
        "Remove a controller: drained first when it still holds shards, then it leaves (202, or 200 when it has left already)",
        true,
        None,
        || post(remove_controller),
    ),
    r(
        "POST",
        "/api/v1/controllers/{id}/mark-out",
        "Declare a controller out: its shards are rebuilt on the others (202; follow GET /api/v1/jobs)",
        true,
        None,
        || post(mark_out),
    ),
    r(
        "GET",
        "/api/v1/volumes",
        "Every volume with health and I/O",
        true,
        None,
        || get(volumes),
    ),
    r(
        "POST",
        "/api/v1/volumes",
        "Create a volume (served through every portal)",
        true,
        Some("NewVolume"),
        || post(create_volume),
    ),
    r(
        "GET",
        "/api/v1/volumes/{name}",
        "One volume",
        true,
        None,
        || get(volume),
    ),
    r(
        "PATCH",
        "/api/v1/volumes/{name}",
        "Grow a volume (not available yet)",
        true,
        Some("ResizeVolume"),
        || patch(resize_volume),
    ),
    r(
        "DELETE",
        "/api/v1/volumes/{name}",
        "Delete a volume created through the API, and its data; needs ?confirm=<name>",
        true,
        None,
        || delete(delete_volume),
    ),
    r(
        "GET",
        "/api/v1/sessions",
        "Every logged-in iSCSI session on every controller",
        true,
        None,
        || get(sessions),
    ),
    r(
        "GET",
        "/api/v1/jobs",
        "Running jobs (resync) with progress, rate and ETA",
        true,
        None,
        || get(jobs),
    ),
    r(
        "POST",
        "/api/v1/jobs/scrub",
        "Start a scrub: every controller checks each row it leads (checksums, parity) and repairs what is bad",
        true,
        None,
        || post(start_scrub),
    ),
    r(
        "POST",
        "/api/v1/jobs/{id}/cancel",
        "Cancel a job",
        true,
        None,
        || post(cancel_job),
    ),
    r(
        "GET",
        "/api/v1/events",
        "The events log, oldest first (?after=<id>&limit=<n>)",
        true,
        None,
        || get(events),
    ),
    r(
        "GET",
        "/metrics",
        "Prometheus metrics of this controller",
        false,
        None,
        || get(metrics::handler),
    ),
    r("GET", "/", "The web console", false, None, || {
        get(console::index)
    }),
    r(
        "GET",
        "/app.js",
        "The web console's script",
        false,
        None,
        || get(console::script),
    ),
    r(
        "GET",
        "/app.css",
        "The web console's style sheet",
        false,
        None,
        || get(console::style),
    ),
];

/// The API's state: the controller and the admin sessions.
#[derive(Debug, Clone)]
pub struct ApiState {
    /// The controller.
    pub ctl: Arc<Shared>,
    /// Sessions.
    pub auth: Arc<auth::Auth>,
    /// Served over TLS: the session cookie is marked Secure.
    pub secure: bool,
    /// The last gathered view and when: requests within [`VIEW_TTL`] share it (the console
    /// asks for several routes at once; each would otherwise ask every peer).
    cache: Arc<tokio::sync::Mutex<Option<(std::time::Instant, Snapshot)>>>,
}

/// How long a gathered view of the cluster is reused.
pub const VIEW_TTL: Duration = Duration::from_millis(500);

impl ApiState {
    /// State for `ctl`, with the admin password from its config.
    pub fn new(ctl: Arc<Shared>) -> Self {
        let hash = ctl
            .cfg
            .api
            .as_ref()
            .and_then(|a| a.admin_password_hash.clone());
        let secure = ctl.cfg.api.as_ref().is_some_and(|a| a.tls);
        Self {
            ctl,
            auth: Arc::new(auth::Auth::new(hash)),
            secure,
            cache: Arc::default(),
        }
    }

    /// The cluster as this controller sees it, gathered at most every [`VIEW_TTL`].
    pub async fn view(&self) -> Snapshot {
        let mut c = self.cache.lock().await;
        if let Some((at, s)) = c.as_ref() {
            if at.elapsed() < VIEW_TTL {
                return s.clone();
            }
        }
        let s = snapshot(&self.ctl).await;
        *c = Some((std::time::Instant::now(), s.clone()));
        s
    }

    /// Forgets the gathered view (after a change made through this API).
    pub async fn invalidate(&self) {
        *self.cache.lock().await = None;
    }
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    field: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            field: None,
        }
    }

    fn field(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            message: format!("{field}: {}", message.into()),
            field: Some(field),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({"error": self.message, "field": self.field})),
        )
            .into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// The whole API, console and metrics: every route of [`ROUTES`] and nothing else.
pub fn router(state: ApiState) -> Router {
    let mut r = Router::new();
    for d in ROUTES {
        r = r.route(d.path, (d.handler)());
    }
    r.fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no such route; see /api/v1/openapi.json",
    )
}

fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == auth::COOKIE)
        .map(|(_, v)| v.to_string())
}

fn bearer_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string())
}

/// Authentication and CSRF for every route that needs them.
async fn guard(State(st): State<ApiState>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let needs = ROUTES
        .iter()
        .find(|d| d.method == method.as_str() && path_matches(d.path, &path))
        .is_none_or(|d| d.auth)
        && path.starts_with("/api/");
    if !needs {
        return next.run(req).await;
    }
    let headers = req.headers();
    let (token, by_cookie) = match (bearer_token(headers), cookie_token(headers)) {
        (Some(t), _) => (t, false),
        (None, Some(t)) => (t, true),
        (None, None) => {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "log in first: POST /api/v1/login, then send the cookie or `Authorization: Bearer <token>`",
            )
            .into_response()
        }
    };
    let Some(s) = st.auth.session(&token) else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "the session has expired or was ended; log in again",
        )
        .into_response();
    };
    let changes = !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
    if changes && by_cookie {
        let sent = headers
            .get("x-csrf-token")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !auth::same(sent, &s.csrf) {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "missing or wrong X-CSRF-Token header (the console sends it; scripts should use a bearer token)",
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Whether `path` matches the template `tpl` (`{x}` matches one segment).
pub fn path_matches(tpl: &str, path: &str) -> bool {
    let (a, b): (Vec<&str>, Vec<&str>) = (tpl.split('/').collect(), path.split('/').collect());
    a.len() == b.len()
        && a.iter()
            .zip(&b)
            .all(|(t, p)| (t.starts_with('{') && t.ends_with('}') && !p.is_empty()) || t == p)
}

async fn openapi_json() -> Json<serde_json::Value> {
    Json(openapi::document())
}

/// `POST /api/v1/login` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    #[serde(default = "admin")]
    user: String,
    password: String,
}

fn admin() -> String {
    "admin".into()
}

/// A JSON body, with a 4xx naming the problem when it does not parse.
fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the request body is not the expected JSON: {e}"),
        )
    })
}

async fn login(State(st): State<ApiState>, body: axum::body::Bytes) -> Response {
    let (user, password) = match login_request(&body) {
        Ok(l) => l,
        Err(e) => return e.into_response(),
    };
    match st.auth.login(&user, &password) {
        Ok((token, csrf)) => {
            st.ctl.events.push("admin.login", "admin logged in");
            let cookie = format!(
                "{}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
                auth::COOKIE,
                auth::SESSION_TTL.as_secs(),
                if st.secure { "; Secure" } else { "" }
            );
            (
                [(header::SET_COOKIE, cookie)],
                Json(serde_json::json!({"token": token, "csrf_token": csrf, "user": "admin"})),
            )
                .into_response()
        }
        Err(auth::LoginError::Wrong) => {
            st.ctl.events.push("admin.login_failed", "a login with a wrong user or password was refused");
            ApiError::new(StatusCode::UNAUTHORIZED, "wrong user or password").into_response()
        }
        Err(auth::LoginError::Throttled) => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too many failed logins in the last minute; wait a minute and try again",
        )
        .into_response(),
        Err(auth::LoginError::NoPassword) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no admin password is set: put the output of `appliance hash-password` in api.admin_password_hash and restart",
        )
        .into_response(),
    }
}

async fn logout(State(st): State<ApiState>, headers: HeaderMap) -> Response {
    if let Some(t) = bearer_token(&headers).or_else(|| cookie_token(&headers)) {
        st.auth.logout(&t);
    }
    (
        StatusCode::NO_CONTENT,
        [(
            header::SET_COOKIE,
            format!(
                "{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
                auth::COOKIE
            ),
        )],
    )
        .into_response()
}

async fn session(State(st): State<ApiState>, headers: HeaderMap) -> ApiResult<serde_json::Value> {
    let t = bearer_token(&headers)
        .or_else(|| cookie_token(&headers))
        .unwrap_or_default();
    let s = st
        .auth
        .session(&t)
        .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "not logged in"))?;
    Ok(Json(
        serde_json::json!({"user": "admin", "csrf_token": s.csrf}),
    ))
}

/// One controller as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControllerView {
    /// Id.
    pub id: u32,
    /// Its scrub of the rows it leads: the pass running and the last result.
    #[serde(default)]
    pub scrub: crate::node::ScrubStatus,
    /// Moves (rebuild) in progress cluster-wide, as it sees them.
    #[serde(default)]
    pub moves: Option<crate::node::MovesStatus>,
    /// `up`, `resyncing` or `down` (as the answering controller's replica of the log says);
    /// `joining` before the log has placed it.
    pub state: String,
    /// Whether it answered the status request just now.
    pub reachable: bool,
    /// Why not, if not.
    pub error: Option<String>,
    /// Round trip of the status request in milliseconds (0 for the answering controller).
    pub rtt_ms: f64,
    /// Whether it refuses host I/O now (fenced).
    pub fenced: bool,
    /// Whether it leads the metadata log.
    pub leader: bool,
    /// Its view's epoch.
    pub epoch: u64,
    /// Its portals.
    pub portals: Vec<String>,
    /// Its API address.
    pub api: Option<String>,
    /// Seconds since it started.
    pub uptime_secs: u64,
    /// Sessions logged in to it.
    pub sessions: usize,
    /// Backing storage it holds, bytes.
    pub capacity_bytes: u64,
    /// Its I/O over every volume.
    pub io: lun::stats::IoSnapshot,
    /// Its I/O per volume.
    pub volumes: Vec<crate::server::VolumeIo>,
    /// Its replica of the metadata log.
    pub log: crate::node::LogFigures,
    /// Its backing devices and their error counters.
    pub devices: Vec<crate::server::DeviceView>,
}

/// One volume as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeView {
    /// Definition.
    #[serde(flatten)]
    pub info: VolumeInfo,
    /// `healthy`, `degraded` or `resyncing`.
    pub health: String,
    /// Stripe rows with a chunk behind.
    pub rows_behind: usize,
    /// Chunks behind per controller.
    pub chunks_behind: Vec<(u32, usize)>,
    /// The running resync, if any.
    pub resync: Option<crate::node::ResyncProgress>,
    /// I/O over every reachable controller.
    pub io: lun::stats::IoSnapshot,
}

/// A running job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobView {
    /// Id (`resync-<volume>`).
    pub id: String,
    /// Kind (`resync`).
    pub kind: String,
    /// Volume.
    pub volume: String,
    /// Chunks done.
    pub done: usize,
    /// Chunks in all.
    pub total: usize,
    /// Chunks per second.
    pub rate: f64,
    /// Seconds left.
    pub eta_secs: Option<f64>,
    /// Whether it can be cancelled.
    pub cancellable: bool,
}

/// The cluster at a glance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterSummary {
    /// Target IQN.
    pub iqn: String,
    /// The controller that answered.
    pub answered_by: u32,
    /// `healthy`, `degraded` (redundancy reduced), or `unavailable` (this controller cannot
    /// serve).
    pub health: String,
    /// Membership epoch.
    pub epoch: u64,
    /// Metadata leader.
    pub leader: Option<u64>,
    /// Controllers.
    pub controllers_total: usize,
    /// Controllers up.
    pub controllers_up: usize,
    /// Volumes.
    pub volumes_total: usize,
    /// Volumes not healthy.
    pub volumes_degraded: usize,
    /// Logical capacity of all volumes, bytes.
    pub volume_bytes: u64,
    /// Backing storage over all reachable controllers, bytes.
    pub capacity_bytes: u64,
    /// I/O over every reachable controller.
    pub io: lun::stats::IoSnapshot,
    /// Jobs running.
    pub jobs: usize,
    /// Problems to fix.
    pub problems: Vec<String>,
}

/// Everything the read routes show, gathered once per request.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Summary.
    pub summary: ClusterSummary,
    /// Controllers.
    pub controllers: Vec<ControllerView>,
    /// Volumes.
    pub volumes: Vec<VolumeView>,
    /// Jobs.
    pub jobs: Vec<JobView>,
    /// Sessions on every reachable controller.
    pub sessions: Vec<crate::server::SessionView>,
}

fn sum_io<'a>(it: impl Iterator<Item = &'a lun::stats::IoSnapshot>) -> lun::stats::IoSnapshot {
    let mut t = lun::stats::IoSnapshot::default();
    for s in it {
        t.add(s);
    }
    t
}

/// Gathers the cluster as `ctl` sees it, with its peers' live figures.
pub async fn snapshot(ctl: &Shared) -> Snapshot {
    let me = ctl.id();
    let local_live = ctl.live();
    let infos = ctl.volumes();
    let mut lives: BTreeMap<u32, crate::server::LiveFigures> = BTreeMap::new();
    lives.insert(me, local_live.clone());
    let mut controllers = Vec::new();
    let mut volumes = Vec::new();
    let mut problems = Vec::new();
    let (epoch, leader);
    match ctl.node() {
        Some(node) => {
            let st = node.status();
            let peers = node.peer_statuses(PEER_WAIT).await;
            epoch = st.epoch;
            leader = st.leader;
            problems = st.problems.clone();
            let mut reports = BTreeMap::new();
            reports.insert(me, (Ok(st.clone()), Duration::ZERO));
            for p in peers {
                reports.insert(p.id, (p.report, p.rtt));
            }
            // Every configured controller, also before the log has placed it.
            let mut states: BTreeMap<u32, String> = ctl
                .cfg
                .cluster
                .iter()
                .flat_map(|c| c.peers.keys())
                .map(|id| (*id, "joining".to_string()))
                .collect();
            states.extend(st.controllers.iter().cloned());
            for (id, state) in &states {
                let (report, rtt) = reports
                    .remove(id)
                    .unwrap_or((Err("not a configured peer".into()), Duration::ZERO));
                let live: crate::server::LiveFigures = report
                    .as_ref()
                    .ok()
                    .and_then(|r| serde_json::from_value(r.live.clone()).ok())
                    .unwrap_or_default();
                lives.insert(*id, live.clone());
                controllers.push(ControllerView {
                    id: *id,
                    scrub: report.as_ref().map(|r| r.scrub.clone()).unwrap_or_default(),
                    moves: report.as_ref().ok().and_then(|r| r.moves.clone()),
                    state: state.clone(),
                    reachable: report.is_ok(),
                    error: report.as_ref().err().cloned(),
                    rtt_ms: rtt.as_secs_f64() * 1e3,
                    fenced: report.as_ref().is_ok_and(|r| r.fenced),
                    leader: st.leader == Some(u64::from(*id)),
                    epoch: report.as_ref().map_or(0, |r| r.epoch),
                    portals: live.portals.clone(),
                    api: live.api.clone(),
                    uptime_secs: live.uptime_secs,
                    sessions: live.sessions.len(),
                    capacity_bytes: live.capacity_bytes,
                    io: sum_io(live.volumes.iter().map(|v| &v.io)),
                    volumes: live.volumes.clone(),
                    log: report.as_ref().map(|r| r.log.clone()).unwrap_or_default(),
                    devices: live.devices.clone(),
                });
            }
            let by_id: BTreeMap<u32, &crate::node::VolumeStatus> =
                st.volumes.iter().map(|v| (v.id, v)).collect();
            for info in &infos {
                let id = crate::server::volume_id(&ctl.cfg.iqn, &info.name) as u32;
                let vs = by_id.get(&id);
                volumes.push(VolumeView {
                    info: info.clone(),
                    health: vs.map_or("unknown".into(), |v| v.health.clone()),
                    rows_behind: vs.map_or(0, |v| v.rows_behind),
                    chunks_behind: vs.map_or_else(Vec::new, |v| v.chunks_behind.clone()),
                    resync: vs.and_then(|v| v.resync.clone()),
                    io: lun::stats::IoSnapshot::default(),
                });
            }
        }
        None => {
            epoch = 0;
            leader = None;
            controllers.push(ControllerView {
                id: me,
                scrub: crate::node::ScrubStatus::default(),
                moves: None,
                state: "up".into(),
                reachable: true,
                error: None,
                rtt_ms: 0.0,
                fenced: false,
                leader: true,
                epoch: 0,
                portals: local_live.portals.clone(),
                api: local_live.api.clone(),
                uptime_secs: local_live.uptime_secs,
                sessions: local_live.sessions.len(),
                capacity_bytes: local_live.capacity_bytes,
                io: sum_io(local_live.volumes.iter().map(|v| &v.io)),
                volumes: local_live.volumes.clone(),
                log: crate::node::LogFigures::default(),
                devices: local_live.devices.clone(),
            });
            for info in &infos {
                volumes.push(VolumeView {
                    info: info.clone(),
                    health: "healthy".into(),
                    rows_behind: 0,
                    chunks_behind: Vec::new(),
                    resync: None,
                    io: lun::stats::IoSnapshot::default(),
                });
            }
        }
    }
    for v in &mut volumes {
        v.io = sum_io(
            lives
                .values()
                .flat_map(|l| l.volumes.iter())
                .filter(|x| x.name == v.info.name)
                .map(|x| &x.io),
        );
    }
    let mut jobs: Vec<JobView> = volumes
        .iter()
        .filter_map(|v| {
            v.resync.as_ref().map(|p| JobView {
                id: format!("resync-{}", v.info.name),
                kind: "resync".into(),
                volume: v.info.name.clone(),
                done: p.done,
                total: p.total,
                rate: p.chunks_per_sec,
                eta_secs: p.eta_secs,
                cancellable: false,
            })
        })
        .collect();
    // Each controller scrubs the rows it leads, of every volume.
    jobs.extend(controllers.iter().filter_map(|c| {
        c.scrub.running.as_ref().map(|p| JobView {
            id: format!("scrub-controller-{}", c.id),
            kind: "scrub".into(),
            volume: "*".into(),
            done: p.done as usize,
            total: p.total as usize,
            rate: p.rows_per_sec,
            eta_secs: p.eta_secs,
            cancellable: false,
        })
    }));
    // Moves (rebuild, drain, rebalance) are cluster-wide: one job, as the answering
    // controller (else any) sees it.
    let moves = controllers
        .iter()
        .filter(|c| c.id == me)
        .chain(controllers.iter())
        .find_map(|c| c.moves.clone());
    if let Some(m) = moves {
        jobs.push(JobView {
            id: m.kind.clone(),
            kind: m.kind.clone(),
            volume: "*".into(),
            done: m.rows_done as usize,
            total: m.rows_total as usize,
            rate: m.rows_per_sec,
            eta_secs: m.eta_secs,
            cancellable: false,
        });
    }
    let sessions: Vec<_> = lives.values().flat_map(|l| l.sessions.clone()).collect();
    let me_view = controllers.iter().find(|c| c.id == me);
    let health = if me_view.is_some_and(|c| c.fenced) {
        "unavailable"
    } else if controllers.iter().any(|c| c.state != "up")
        || volumes.iter().any(|v| v.health != "healthy")
    {
        "degraded"
    } else {
        "healthy"
    };
    let summary = ClusterSummary {
        iqn: ctl.cfg.iqn.clone(),
        answered_by: me,
        health: health.into(),
        epoch,
        leader,
        controllers_total: controllers.len(),
        controllers_up: controllers.iter().filter(|c| c.state == "up").count(),
        volumes_total: volumes.len(),
        volumes_degraded: volumes.iter().filter(|v| v.health != "healthy").count(),
        volume_bytes: volumes.iter().map(|v| v.info.size_bytes).sum(),
        capacity_bytes: controllers.iter().map(|c| c.capacity_bytes).sum(),
        io: sum_io(controllers.iter().map(|c| &c.io)),
        jobs: jobs.len(),
        problems,
    };
    Snapshot {
        summary,
        controllers,
        volumes,
        jobs,
        sessions,
    }
}

async fn cluster(State(st): State<ApiState>) -> ApiResult<ClusterSummary> {
    Ok(Json(st.view().await.summary))
}

async fn controllers(State(st): State<ApiState>) -> ApiResult<Vec<ControllerView>> {
    Ok(Json(st.view().await.controllers))
}

fn parse_id(id: &str) -> Result<u32, ApiError> {
    id.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("controller id `{id}` is not a number"),
        )
    })
}

async fn controller(
    State(st): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<ControllerView> {
    let id = parse_id(&id)?;
    st.view()
        .await
        .controllers
        .into_iter()
        .find(|c| c.id == id)
        .map(Json)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no controller {id} in this cluster"),
            )
        })
}

/// `POST /api/v1/controllers` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddControllerBody {
    id: u32,
    peer: String,
}

/// Parses and checks a `POST /api/v1/controllers` body: the new controller's id and peer
/// address.
///
/// # Errors
/// 400 for a body that is not the JSON expected, 422 naming the field that is wrong.
pub fn add_controller_request(body: &[u8]) -> Result<(u32, std::net::SocketAddr), ApiError> {
    let b: AddControllerBody = parse_body(body)?;
    if b.id == 0 {
        return Err(ApiError::field(
            "id",
            "controller ids start at 1 (0 is the operator's certificate)",
        ));
    }
    let peer = b.peer.parse().map_err(|_| {
        ApiError::field(
            "peer",
            "give the new controller's peer address as ip:port (its cluster.peers entry)",
        )
    })?;
    Ok((b.id, peer))
}

fn cluster_node(st: &ApiState, what: &str) -> Result<crate::node::NodeHandle, ApiError> {
    st.ctl.node().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            format!("a single controller is not a cluster: {what} needs one (configure [cluster])"),
        )
    })
}

fn change_error(e: (bool, String)) -> ApiError {
    match e {
        (true, why) => ApiError::new(StatusCode::CONFLICT, why),
        (false, why) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{why} (is a majority of controllers up?)"),
        ),
    }
}

fn accepted(message: String) -> Response {
    (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "message": message })),
    )
        .into_response()
}

async fn add_controller(
    State(st): State<ApiState>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let (id, peer) = add_controller_request(&body)?;
    let node = cluster_node(&st, "adding a controller")?;
    node.add_controller(id, peer.to_string())
        .await
        .map_err(change_error)?;
    Ok(accepted(format!("controller {id} joins the cluster: once it answers on {peer} it catches up, votes in the metadata log, and shards are rebalanced onto it; follow it with `appliance job list --watch` or GET /api/v1/jobs (start it with `appliance run` and a certificate of this cluster's CA if it is not running)")))
}

async fn known_controller(st: &ApiState, id: &str) -> Result<u32, ApiError> {
    let id = parse_id(id)?;
    if !st.view().await.controllers.iter().any(|c| c.id == id) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no controller {id} in this cluster"),
        ));
    }
    Ok(id)
}

async fn drain_controller(
    State(st): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = known_controller(&st, &id).await?;
    let node = cluster_node(&st, "draining")?;
    node.drain(id).await.map_err(change_error)?;
    Ok(accepted(format!("controller {id} is draining: its ports report transitioning, its shards move to the others, then it leaves; follow it with `appliance job list --watch` or GET /api/v1/jobs")))
}

async fn remove_controller(
    State(st): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = known_controller(&st, &id).await?;
    let node = cluster_node(&st, "removing a controller")?;
    if node.has_left(id) {
        return Ok((
            StatusCode::OK,
            Json(serde_json::json!({"message": format!("controller {id} has left the cluster; its process can be stopped")})),
        )
            .into_response());
    }
    node.drain(id).await.map_err(change_error)?;
    Ok(accepted(format!("controller {id} is drained first (its shards move to the others), then it leaves; stop its process once `appliance controller list` shows it out")))
}

async fn mark_out(
    State(st): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    if !st.view().await.controllers.iter().any(|c| c.id == id) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no controller {id} in this cluster"),
        ));
    }
    let node = cluster_node(&st, "mark-out")?;
    match node.mark_out(id).await {
        Ok(()) => Ok((
            StatusCode::ACCEPTED,
            Json(serde_json::json!({"message": format!("controller {id} is out: its shards are being rebuilt on the others; follow it with `appliance job list --watch` or GET /api/v1/jobs")})),
        )
            .into_response()),
        Err((true, why)) => Err(ApiError::new(StatusCode::CONFLICT, why)),
        Err((false, why)) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{why} (is a majority of controllers up?)"),
        )),
    }
}

async fn volumes(State(st): State<ApiState>) -> ApiResult<Vec<VolumeView>> {
    Ok(Json(st.view().await.volumes))
}

async fn volume(State(st): State<ApiState>, Path(name): Path<String>) -> ApiResult<VolumeView> {
    st.view()
        .await
        .volumes
        .into_iter()
        .find(|v| v.info.name == name)
        .map(Json)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no volume named {name}")))
}

/// `POST /api/v1/volumes` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewVolumeBody {
    name: String,
    /// A size such as "10GiB", or a number of bytes.
    size: serde_json::Value,
    block_size: Option<u32>,
    lun: Option<u16>,
    k: Option<usize>,
    m: Option<usize>,
}

async fn create_volume(State(st): State<ApiState>, body: axum::body::Bytes) -> Response {
    match create_volume_inner(&st, &body).await {
        Ok(v) => (StatusCode::CREATED, Json(v)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn create_volume_inner(st: &ApiState, body: &[u8]) -> Result<VolumeInfo, ApiError> {
    let req = new_volume_request(body, st.ctl.cfg.cluster.is_some())?;
    let r = st.ctl.create_volume(req).await.map_err(volume_error);
    st.invalidate().await;
    r
}

/// A `POST /api/v1/volumes` body, parsed and checked field by field (`cluster`: whether k and
/// m may be given). Pure, so the fuzzer can run it on any bytes.
///
/// # Errors
/// 400 for a body that is not the expected JSON, 422 naming the field otherwise.
pub fn new_volume_request(body: &[u8], cluster: bool) -> Result<NewVolume, ApiError> {
    let b: NewVolumeBody = parse_body(body)?;
    crate::config::check_volume_name(&b.name).map_err(|m| ApiError::field("name", m))?;
    let size_bytes = match &b.size {
        serde_json::Value::String(s) => {
            crate::config::check_volume_size(s).map_err(|m| ApiError::field("size", m))?
        }
        serde_json::Value::Number(n) => {
            let n = n
                .as_u64()
                .ok_or_else(|| ApiError::field("size", "must be a whole number of bytes"))?;
            crate::config::check_volume_size(&n.to_string())
                .map_err(|m| ApiError::field("size", m))?
        }
        _ => {
            return Err(ApiError::field(
                "size",
                "give a size such as \"10GiB\" or a number of bytes",
            ))
        }
    };
    let block_size = b.block_size.unwrap_or(512);
    crate::config::check_block_size(block_size).map_err(|m| ApiError::field("block_size", m))?;
    if !cluster && (b.k.is_some() || b.m.is_some()) {
        return Err(ApiError::field(
            if b.k.is_some() { "k" } else { "m" },
            "a single controller keeps one copy; k and m apply to a cluster",
        ));
    }
    Ok(NewVolume {
        name: b.name,
        size_bytes,
        block_size,
        lun: b.lun,
        k: b.k,
        m: b.m,
    })
}

/// A `POST /api/v1/login` body: `(user, password)`.
///
/// # Errors
/// 400 for a body that is not the expected JSON.
pub fn login_request(body: &[u8]) -> Result<(String, String), ApiError> {
    let l: Login = parse_body(body)?;
    Ok((l.user, l.password))
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The request field it names, if any.
    pub fn field_name(&self) -> Option<&'static str> {
        self.field
    }
}

fn volume_error(e: crate::server::VolumeOpError) -> ApiError {
    use crate::server::VolumeOpError as E;
    match e {
        E::NotFound(name) => {
            ApiError::new(StatusCode::NOT_FOUND, format!("no volume named {name}"))
        }
        E::Conflict { field, message } => ApiError {
            status: StatusCode::CONFLICT,
            message: format!("{field}: {message}"),
            field: Some(field),
        },
        E::Invalid { field, message } => ApiError::field(field, message),
        E::Unavailable(m) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, m),
    }
}

async fn resize_volume(State(st): State<ApiState>, Path(name): Path<String>) -> ApiError {
    if !st.ctl.volumes().iter().any(|v| v.name == name) {
        return ApiError::new(StatusCode::NOT_FOUND, format!("no volume named {name}"));
    }
    ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        "growing a volume is not available in this release: create a larger volume and copy the data",
    )
}

#[derive(Debug, Deserialize)]
struct Confirm {
    confirm: Option<String>,
}

async fn delete_volume(
    State(st): State<ApiState>,
    Path(name): Path<String>,
    Query(q): Query<Confirm>,
) -> Response {
    if !st.ctl.volumes().iter().any(|v| v.name == name) {
        return ApiError::new(StatusCode::NOT_FOUND, format!("no volume named {name}"))
            .into_response();
    }
    if q.confirm.as_deref() != Some(name.as_str()) {
        return ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            message: format!(
                "confirm: deleting destroys the volume's data; repeat its name: ?confirm={name}"
            ),
            field: Some("confirm"),
        }
        .into_response();
    }
    let r = st.ctl.delete_volume(&name).await;
    st.invalidate().await;
    match r {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => volume_error(e).into_response(),
    }
}

async fn sessions(State(st): State<ApiState>) -> ApiResult<Vec<crate::server::SessionView>> {
    Ok(Json(st.view().await.sessions))
}

async fn jobs(State(st): State<ApiState>) -> ApiResult<Vec<JobView>> {
    Ok(Json(st.view().await.jobs))
}

async fn start_scrub(State(st): State<ApiState>) -> Result<Response, ApiError> {
    let Some(node) = st.ctl.node() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "a single controller keeps whole volumes on its own disk and has nothing to scrub against; scrub needs a cluster",
        ));
    };
    node.request_scrub().await.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{e} (is a majority of controllers up?)"),
        )
    })?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({"message": "scrub requested: every controller scrubs the rows it leads; follow it with `appliance job list --watch` or GET /api/v1/jobs"})),
    )
        .into_response())
}

async fn cancel_job(State(st): State<ApiState>, Path(id): Path<String>) -> ApiError {
    if st.view().await.jobs.iter().any(|j| j.id == id) {
        ApiError::new(
            StatusCode::CONFLICT,
            "a resync restores redundancy and cannot be cancelled; it stops by itself when every chunk is copied",
        )
    } else {
        ApiError::new(StatusCode::NOT_FOUND, format!("no running job {id}"))
    }
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    after: Option<u64>,
    limit: Option<usize>,
}

async fn events(
    State(st): State<ApiState>,
    q: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Vec<crate::events::Event>> {
    let Query(q) = q.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("after and limit must be whole numbers: {e}"),
        )
    })?;
    let limit = q.limit.unwrap_or(200);
    if limit == 0 || limit > crate::events::KEEP {
        return Err(ApiError::field(
            "limit",
            format!("must be 1 to {}", crate::events::KEEP),
        ));
    }
    Ok(Json(st.ctl.events.since(q.after.unwrap_or(0), limit)))
}

#[cfg(test)]
mod tests;
