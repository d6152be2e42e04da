//! The API through its router, without a socket (tower's `oneshot`), against a real single
//! controller in a temporary directory: every documented route, authentication failures,
//! validation errors naming the field, the OpenAPI document against the routes, metrics that
//! move with I/O.

use super::*;
use crate::config::Config;
use axum::body::Body;
use axum::http::Request as HttpRequest;
use http_body_util::BodyExt as _;
use tower::ServiceExt as _;

const PASSWORD: &str = "correct horse battery";

struct Fixture {
    dir: Option<tempfile::TempDir>,
    app: Router,
    ctl: Arc<Shared>,
    token: String,
    shutdown: tokio::sync::watch::Sender<bool>,
    running: tokio::task::JoinHandle<()>,
}

fn config_text(dir: &std::path::Path, hash: &str) -> String {
    format!(
        "data_dir = \"{}\"\n[iscsi]\nlisten = \"127.0.0.1:0\"\n[target]\niqn = \"iqn.2026-11.test:api\"\n[disk]\nengine = \"threads\"\ndirect = false\n[[volume]]\nname = \"vol0\"\nlun = 0\nsize = \"4MiB\"\n[api]\nlisten = \"127.0.0.1:0\"\nadmin_password_hash = \"{hash}\"\n",
        dir.display()
    )
}

async fn start(dir: tempfile::TempDir, hash: &str) -> Fixture {
    let cfg = Config::parse(
        &config_text(dir.path(), hash),
        &dir.path().join("appliance.toml"),
    )
    .expect("config");
    let c = crate::server::Controller::start(&cfg).await.expect("start");
    let ctl = c.shared();
    let (shutdown, rx) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(c.run(rx));
    let app = router(ApiState::new(Arc::clone(&ctl)));
    let mut f = Fixture {
        dir: Some(dir),
        app,
        ctl,
        token: String::new(),
        shutdown,
        running,
    };
    let (st, body, _) = f.login_with(json!({"password": PASSWORD})).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    f.token = body["token"].as_str().expect("token").to_string();
    f
}

async fn fixture() -> Fixture {
    let hash = auth::hash_password(PASSWORD).unwrap();
    start(tempfile::tempdir().unwrap(), &hash).await
}

use serde_json::json;

impl Fixture {
    /// Sends a request; `auth`: a header (name, value) to add.
    async fn call(
        &self,
        method: &str,
        uri: &str,
        auth: Option<(&str, String)>,
        body: Option<serde_json::Value>,
    ) -> (StatusCode, serde_json::Value, HeaderMap) {
        let mut b = HttpRequest::builder().method(method).uri(uri);
        if let Some((k, v)) = auth {
            b = b.header(k, v);
        }
        let req = match body {
            Some(j) => b
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(j.to_string())),
            None => b.body(Body::empty()),
        }
        .unwrap();
        self.raw(req).await
    }

    async fn raw(&self, req: HttpRequest<Body>) -> (StatusCode, serde_json::Value, HeaderMap) {
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into()));
        (status, v, headers)
    }

    /// `POST /api/v1/login` with `body`.
    async fn login_with(
        &self,
        body: serde_json::Value,
    ) -> (StatusCode, serde_json::Value, HeaderMap) {
        self.call("POST", "/api/v1/login", None, Some(body)).await
    }

    fn bearer(&self) -> Option<(&'static str, String)> {
        Some(("authorization", format!("Bearer {}", self.token)))
    }

    async fn get(&self, uri: &str) -> (StatusCode, serde_json::Value) {
        let (s, v, _) = self.call("GET", uri, self.bearer(), None).await;
        (s, v)
    }

    async fn send(
        &self,
        method: &str,
        uri: &str,
        body: serde_json::Value,
    ) -> (StatusCode, serde_json::Value) {
        let (s, v, _) = self.call(method, uri, self.bearer(), Some(body)).await;
        (s, v)
    }

    async fn stop(self) {
        let _ = self.shutdown.send(true);
        drop(self.app);
        drop(self.ctl);
        self.running.await.unwrap();
    }
}

/// Stops a controller the way a signal does (the value changes to true).
async fn stop(c: crate::server::Controller) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let t = tokio::spawn(c.run(rx));
    tx.send(true).unwrap();
    t.await.unwrap();
}

fn concrete(path: &str) -> String {
    path.replace("{id}", "1").replace("{name}", "vol0")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_and_the_routes_agree() {
    let mut f = fixture().await;
    let (st, doc) = f.get("/api/v1/openapi.json").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(doc, openapi::document());
    let paths = doc["paths"].as_object().unwrap();
    let documented: usize = paths.values().map(|p| p.as_object().unwrap().len()).sum();
    assert_eq!(documented, ROUTES.len(), "one operation per route");
    for (path, ops) in paths {
        for method in ["GET", "POST", "PATCH", "PUT", "DELETE"] {
            let body = (method != "GET").then(|| json!({}));
            let (s, v, _) = f.call(method, &concrete(path), f.bearer(), body).await;
            if (method, path.as_str()) == ("POST", "/api/v1/logout") {
                // That ended the session; open another for the rest.
                let (_, l, _) = f.login_with(json!({"password": PASSWORD})).await;
                f.token = l["token"].as_str().unwrap().to_string();
            }
            let is_documented = ops.get(method.to_lowercase()).is_some();
            if is_documented {
                assert_ne!(s, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
                assert!(
                    !v.to_string().contains("no such route"),
                    "{method} {path} fell through to the fallback: {v}"
                );
            } else {
                assert_eq!(
                    s,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path} is not documented but answered {s} {v}"
                );
            }
        }
    }
    let (s, v) = f.get("/api/v1/nothing-here").await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    f.stop().await;
}

#[test]
fn path_templates_match_one_segment_per_parameter() {
    assert!(path_matches("/api/v1/volumes/{name}", "/api/v1/volumes/v1"));
    assert!(!path_matches("/api/v1/volumes/{name}", "/api/v1/volumes/"));
    assert!(!path_matches(
        "/api/v1/volumes/{name}",
        "/api/v1/volumes/a/b"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_protected_route_refuses_without_a_valid_session() {
    let f = fixture().await;
    for d in ROUTES {
        let uri = concrete(d.path);
        let body = (d.method != "GET").then(|| json!({}));
        let (none, v, _) = f.call(d.method, &uri, None, body.clone()).await;
        let (wrong, _, _) = f
            .call(
                d.method,
                &uri,
                Some(("authorization", "Bearer 00ff".into())),
                body,
            )
            .await;
        if d.auth {
            assert_eq!(
                none,
                StatusCode::UNAUTHORIZED,
                "{} {}: {v}",
                d.method,
                d.path
            );
            assert!(v["error"].as_str().unwrap().contains("log in"), "{v}");
            assert_eq!(wrong, StatusCode::UNAUTHORIZED, "{} {}", d.method, d.path);
        } else {
            assert_ne!(
                none,
                StatusCode::UNAUTHORIZED,
                "{} {} is public",
                d.method,
                d.path
            );
        }
    }
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_cookie_csrf_and_logout() {
    let f = fixture().await;
    // Wrong password, wrong user, bad body.
    let (s, v, _) = f.login_with(json!({"password": "not it at all"})).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    let (s, _, _) = f
        .login_with(json!({"user": "root", "password": PASSWORD}))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, v, _) = f.login_with(json!({"pass": PASSWORD})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    // The cookie: HttpOnly, SameSite=Strict; the response carries no password or hash.
    let (s, v, h) = f.login_with(json!({"password": PASSWORD})).await;
    assert_eq!(s, StatusCode::OK);
    assert!(!v.to_string().contains("argon2") && !v.to_string().contains(PASSWORD));
    let set = h[header::SET_COOKIE].to_str().unwrap().to_string();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    let cookie = set.split(';').next().unwrap().to_string();
    let csrf = v["csrf_token"].as_str().unwrap().to_string();
    // Reads with the cookie alone; changes need the CSRF header too.
    let (s, _, _) = f
        .call(
            "GET",
            "/api/v1/cluster",
            Some(("cookie", cookie.clone())),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let new = json!({"name": "viacookie", "size": "2MiB"});
    let (s, v, _) = f
        .call(
            "POST",
            "/api/v1/volumes",
            Some(("cookie", cookie.clone())),
            Some(new.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(v["error"].as_str().unwrap().contains("X-CSRF-Token"));
    let req = HttpRequest::builder()
        .method("POST")
        .uri("/api/v1/volumes")
        .header("cookie", &cookie)
        .header("x-csrf-token", "0".repeat(64))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(new.to_string()))
        .unwrap();
    assert_eq!(
        f.raw(req).await.0,
        StatusCode::FORBIDDEN,
        "a wrong CSRF token"
    );
    let req = HttpRequest::builder()
        .method("POST")
        .uri("/api/v1/volumes")
        .header("cookie", &cookie)
        .header("x-csrf-token", &csrf)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(new.to_string()))
        .unwrap();
    let (s, v, _) = f.raw(req).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v, _) = f
        .call(
            "GET",
            "/api/v1/session",
            Some(("cookie", cookie.clone())),
            None,
        )
        .await;
    assert_eq!(
        (s, v["csrf_token"].as_str()),
        (StatusCode::OK, Some(csrf.as_str()))
    );
    // Logout ends the session.
    let req = HttpRequest::builder()
        .method("POST")
        .uri("/api/v1/logout")
        .header("cookie", &cookie)
        .header("x-csrf-token", &csrf)
        .body(Body::empty())
        .unwrap();
    let (s, _, h) = f.raw(req).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(h[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    let (s, _, _) = f
        .call("GET", "/api/v1/cluster", Some(("cookie", cookie)), None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_password_hash_logins_are_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(dir.path(), "x").replace("admin_password_hash = \"x\"\n", "");
    let cfg = Config::parse(&text, &dir.path().join("a.toml")).unwrap();
    let c = crate::server::Controller::start(&cfg).await.unwrap();
    let app = router(ApiState::new(c.shared()));
    let req = HttpRequest::builder()
        .method("POST")
        .uri("/api/v1/login")
        .body(Body::from(
            json!({"password": "anything at all"}).to_string(),
        ))
        .unwrap();
    let resp = app.oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&b).contains("hash-password"));
    stop(c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_routes_show_the_controller_and_its_volume() {
    let f = fixture().await;
    let (s, c) = f.get("/api/v1/cluster").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(c["health"], "healthy");
    assert_eq!(c["controllers_up"], 1);
    assert_eq!(c["volumes_total"], 1);
    assert_eq!(c["iqn"], "iqn.2026-11.test:api");
    let (_, cs) = f.get("/api/v1/controllers").await;
    assert_eq!(cs.as_array().unwrap().len(), 1);
    assert_eq!(cs[0]["state"], "up");
    assert_eq!(cs[0]["portals"].as_array().unwrap().len(), 1);
    let (s, one) = f.get("/api/v1/controllers/1").await;
    assert_eq!((s, &one["id"]), (StatusCode::OK, &json!(1)));
    assert_eq!(
        f.get("/api/v1/controllers/9").await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        f.get("/api/v1/controllers/x").await.0,
        StatusCode::BAD_REQUEST
    );
    let (_, vs) = f.get("/api/v1/volumes").await;
    assert_eq!(vs[0]["name"], "vol0");
    assert_eq!(vs[0]["size_bytes"], 4 << 20);
    assert_eq!(vs[0]["health"], "healthy");
    let (s, v) = f.get("/api/v1/volumes/vol0").await;
    assert_eq!((s, &v["lun"]), (StatusCode::OK, &json!(0)));
    assert_eq!(f.get("/api/v1/volumes/nope").await.0, StatusCode::NOT_FOUND);
    let (s, sessions) = f.get("/api/v1/sessions").await;
    assert_eq!((s, sessions), (StatusCode::OK, json!([])));
    let (s, jobs) = f.get("/api/v1/jobs").await;
    assert_eq!((s, jobs), (StatusCode::OK, json!([])));
    let (s, ev) = f.get("/api/v1/events").await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        ev.as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "controller.started"),
        "{ev}"
    );
    assert!(
        ev.as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "admin.login"),
        "{ev}"
    );
    let (s, v) = f.get("/api/v1/events?limit=0").await;
    assert_eq!(
        (s, &v["field"]),
        (StatusCode::UNPROCESSABLE_ENTITY, &json!("limit"))
    );
    assert_eq!(
        f.get("/api/v1/events?after=abc").await.0,
        StatusCode::BAD_REQUEST
    );
    let (s, v) = f.get("/api/v1/events?after=1&limit=1").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v.as_array().unwrap().len(), 1);
    // The console's page and assets.
    for (path, kind) in [
        ("/", "text/html"),
        ("/app.js", "text/javascript"),
        ("/app.css", "text/css"),
    ] {
        let (s, _, h) = f.call("GET", path, None, None).await;
        assert_eq!(s, StatusCode::OK, "{path}");
        assert!(
            h[header::CONTENT_TYPE].to_str().unwrap().starts_with(kind),
            "{path}"
        );
    }
    let (_, _, h) = f.call("GET", "/", None, None).await;
    assert!(h[header::CONTENT_SECURITY_POLICY]
        .to_str()
        .unwrap()
        .contains("script-src 'self'"));
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_creation_validates_each_field_and_serves_the_new_lun() {
    let hash = auth::hash_password(PASSWORD).unwrap();
    let mut f = start(tempfile::tempdir().unwrap(), &hash).await;
    // Kept past the fixture's stop, for the restart.
    let dir = f.dir.take().unwrap();
    let keep = dir.path().to_owned();
    let cases = [
        (
            json!({"name": "bad name", "size": "2MiB"}),
            "name",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"name": "v", "size": "2 parsecs"}),
            "size",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"name": "v", "size": 1000}),
            "size",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"name": "v", "size": true}),
            "size",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"name": "v", "size": "2MiB", "block_size": 1000}),
            "block_size",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"name": "v", "size": "2MiB", "k": 2}),
            "k",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"name": "v", "size": "2MiB", "lun": 300}),
            "lun",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"name": "vol0", "size": "2MiB"}),
            "name",
            StatusCode::CONFLICT,
        ),
        (
            json!({"name": "v", "size": "2MiB", "lun": 0}),
            "lun",
            StatusCode::CONFLICT,
        ),
    ];
    for (body, field, status) in cases {
        let (s, v) = f.send("POST", "/api/v1/volumes", body.clone()).await;
        assert_eq!(
            (s, v["field"].as_str()),
            (status, Some(field)),
            "{body}: {v}"
        );
        assert!(v["error"].as_str().unwrap().starts_with(field), "{v}");
    }
    let (s, v) = f
        .send(
            "POST",
            "/api/v1/volumes",
            json!({"name": "v", "sise": "2MiB"}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "unknown field: {v}");
    // Too large a body is refused before it is read whole.
    let huge = json!({"name": "v", "size": "2MiB", "pad": "x".repeat(100_000)});
    assert_eq!(
        f.send("POST", "/api/v1/volumes", huge).await.0,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    // A good one: listed, served on the lowest free LUN, writable, and in the events.
    let (s, v) = f
        .send(
            "POST",
            "/api/v1/volumes",
            json!({"name": "data1", "size": "8MiB", "block_size": 4096}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(
        (v["lun"].as_u64(), v["block_size"].as_u64()),
        (Some(1), Some(4096))
    );
    let (_, list) = f.get("/api/v1/volumes").await;
    assert!(list
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["name"] == "data1" && x["runtime"] == true));
    let lu = f.ctl.luns.get(1).expect("LUN 1 served");
    assert_eq!(lu.block_size(), 4096);
    let (_, ev) = f.get("/api/v1/events").await;
    assert!(
        ev.as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "volume.created"),
        "{ev}"
    );
    // Resize and delete are not available yet; they say so (and check their input first).
    let (s, v) = f
        .send("PATCH", "/api/v1/volumes/data1", json!({"size": "16MiB"}))
        .await;
    assert_eq!(s, StatusCode::NOT_IMPLEMENTED, "{v}");
    let (s, v, _) = f
        .call("DELETE", "/api/v1/volumes/data1", f.bearer(), None)
        .await;
    assert_eq!(
        (s, &v["field"]),
        (StatusCode::UNPROCESSABLE_ENTITY, &json!("confirm"))
    );
    let (s, v, _) = f
        .call(
            "DELETE",
            "/api/v1/volumes/data1?confirm=data2",
            f.bearer(),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(
        f.call("DELETE", "/api/v1/volumes/zz?confirm=zz", f.bearer(), None)
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    // A config volume is not deleted through the API.
    let (s, v, _) = f
        .call(
            "DELETE",
            "/api/v1/volumes/vol0?confirm=vol0",
            f.bearer(),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(v["error"].as_str().unwrap().contains("config file"), "{v}");
    // A second run-time volume, deleted: unserved, its files gone, its LUN free again.
    let (s, v) = f
        .send(
            "POST",
            "/api/v1/volumes",
            json!({"name": "gone", "size": "2MiB"}),
        )
        .await;
    assert_eq!(
        (s, v["lun"].as_u64()),
        (StatusCode::CREATED, Some(2)),
        "{v}"
    );
    assert!(keep.join("gone.img").exists());
    let (s, _, _) = f
        .call(
            "DELETE",
            "/api/v1/volumes/gone?confirm=gone",
            f.bearer(),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(f.ctl.luns.get(2).is_none());
    assert!(!keep.join("gone.img").exists() && !keep.join("gone.pr").exists());
    assert_eq!(f.get("/api/v1/volumes/gone").await.0, StatusCode::NOT_FOUND);
    let (_, ev) = f.get("/api/v1/events").await;
    assert!(
        ev.as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "volume.deleted"),
        "{ev}"
    );
    f.stop().await;
    // The volume survives a restart; the deleted one stays deleted.
    let cfg = Config::parse(&config_text(&keep, &hash), &keep.join("a.toml")).unwrap();
    let c = crate::server::Controller::start(&cfg)
        .await
        .expect("restart");
    let names: Vec<String> = c.shared().volumes().into_iter().map(|v| v.name).collect();
    assert_eq!(names, ["data1", "vol0"]);
    stop(c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_actions_and_jobs_answer_what_they_cannot_do() {
    let f = fixture().await;
    let (s, v) = f
        .send("POST", "/api/v1/controllers/1/mark-out", json!({}))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("mark-out needs one"),
        "{v}"
    );
    let (s, _) = f
        .send("POST", "/api/v1/controllers/7/mark-out", json!({}))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    for a in ["drain", "remove"] {
        let (s, v) = f
            .send("POST", &format!("/api/v1/controllers/1/{a}"), json!({}))
            .await;
        assert_eq!(s, StatusCode::CONFLICT, "{a}: {v}");
        assert!(v["error"].as_str().unwrap().contains("needs one"), "{v}");
        let (s, _) = f
            .send("POST", &format!("/api/v1/controllers/7/{a}"), json!({}))
            .await;
        assert_eq!(s, StatusCode::NOT_FOUND);
    }
    // Adding a controller: the body is checked first (field named), then the cluster.
    let (s, v) = f
        .send("POST", "/api/v1/controllers", json!({"id": 4}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["error"].as_str().unwrap().contains("peer"), "{v}");
    let (s, v) = f
        .send(
            "POST",
            "/api/v1/controllers",
            json!({"id": 4, "peer": "not-an-address"}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["field"], "peer", "{v}");
    let (s, v) = f
        .send(
            "POST",
            "/api/v1/controllers",
            json!({"id": 0, "peer": "127.0.0.1:4000"}),
        )
        .await;
    assert_eq!(v["field"], "id", "{s} {v}");
    let (s, v) = f
        .send(
            "POST",
            "/api/v1/controllers",
            json!({"id": 4, "peer": "127.0.0.1:4000"}),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    let (s, v) = f
        .send("POST", "/api/v1/jobs/resync-vol0/cancel", json!({}))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    f.stop().await;
}

/// The exposition format, checked line by line: HELP and TYPE before samples, one family
/// each, histogram buckets cumulative up to +Inf = _count.
fn check_exposition(text: &str) -> BTreeMap<String, f64> {
    let mut typed: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(
                typed.insert(name.into(), kind.into()).is_none(),
                "{name} typed twice"
            );
            assert!(["counter", "gauge", "histogram"].contains(&kind));
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (key, value) = line.rsplit_once(' ').unwrap();
        let v: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
        let name = key.split('{').next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| typed.get(*f).is_some_and(|k| k == "histogram"))
            })
            .unwrap_or(name);
        let kind = typed
            .get(family)
            .unwrap_or_else(|| panic!("{name} has no TYPE before it"));
        if kind == "counter" {
            assert!(name.ends_with("_total"), "{name}");
        }
        samples.insert(key.to_string(), v);
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move_with_io() {
    let f = fixture().await;
    let (s, body, h) = f.call("GET", "/metrics", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(h[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let before = check_exposition(body.as_str().unwrap());
    let key = "rainio_volume_write_ops_total{controller=\"1\",volume=\"vol0\"}";
    assert_eq!(before[key], 0.0);
    // Two 4 KiB writes through a device server on the controller's LUN table.
    let dev = lun::DeviceServer::new(
        lun::TargetPort {
            relative_port: 1,
            port_group: 1,
        },
        BTreeMap::new(),
    )
    .with_lun_table(Arc::clone(&f.ctl.luns));
    let nexus = lun::command::ItNexus {
        initiator_name: "iqn.2026-11.test:init".into(),
        isid: 1,
        relative_port: 1,
    };
    let mut sent = 0;
    for _ in 0..6 {
        let mut cdb = vec![0u8; 16];
        cdb[0] = 0x2a; // WRITE(10), LBA 8, 8 blocks
        cdb[5] = 8;
        cdb[8] = 8;
        let o = dev
            .execute(lun::command::ScsiCommand {
                nexus: nexus.clone(),
                lun: 0,
                cdb,
                attr: lun::command::TaskAttr::Simple,
                data_out: vec![0xab; 4096],
                data_in_len: 0,
            })
            .await;
        if o.status == lun::sense::CommandStatus::Good {
            sent += 1;
        }
    }
    assert!(
        sent >= 2,
        "after the power-on unit attention, writes succeed"
    );
    let (_, body, _) = f.call("GET", "/metrics", None, None).await;
    let after = check_exposition(body.as_str().unwrap());
    assert_eq!(after[key], 6.0);
    assert_eq!(
        after["rainio_volume_write_bytes_total{controller=\"1\",volume=\"vol0\"}"],
        f64::from(sent * 4096)
    );
    assert_eq!(
        after["rainio_volume_latency_seconds_count{controller=\"1\",volume=\"vol0\"}"],
        6.0
    );
    assert_eq!(
        after["rainio_volume_latency_seconds_bucket{controller=\"1\",volume=\"vol0\",le=\"+Inf\"}"],
        6.0
    );
    // The backing device counted the writes, without errors.
    let dev_ios: f64 = after
        .iter()
        .filter(|(k, _)| k.starts_with("rainio_device_ios_total{controller=\"1\""))
        .map(|(_, v)| *v)
        .sum();
    assert!(dev_ios >= f64::from(sent), "device requests: {dev_ios}");
    let (_, cs) = f.get("/api/v1/controllers").await;
    let d = &cs[0]["devices"][0];
    assert_eq!(d["role"], "volume vol0", "{cs}");
    assert_eq!(
        (d["read_errors"].as_u64(), d["write_errors"].as_u64()),
        (Some(0), Some(0))
    );
    assert!(d["ios"].as_u64().unwrap() >= sent as u64);
    let (_, vols) = f.get("/api/v1/volumes/vol0").await;
    assert_eq!(vols["io"]["write_ops"], 6);
    f.stop().await;
}

/// Sends one HTTP/1.1 request over `io` and returns the whole response as text.
async fn http_over<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut io: S,
    request: &str,
) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    io.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = io.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_generated_certificate() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let hash = auth::hash_password(PASSWORD).unwrap();
    let text = config_text(dir.path(), &hash) + "tls = true\n";
    let cfg = Config::parse(&text, &dir.path().join("a.toml")).unwrap();
    let c = crate::server::Controller::start(&cfg).await.expect("start");
    let shared = c.shared();
    let addr = shared.api_addr.lock().unwrap().expect("bound");
    let (tx, rx) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(c.run(rx));
    let key = dir.path().join("api-key.pem");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // A client that trusts the generated certificate gets the API over TLS, and the session
    // cookie is marked Secure.
    let mut roots = rustls::RootCertStore::empty();
    for c in
        rustls::pki_types::CertificateDer::pem_file_iter(dir.path().join("api-cert.pem")).unwrap()
    {
        roots.add(c.unwrap()).unwrap();
    }
    use rustls::pki_types::pem::PemObject as _;
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let body = json!({"password": PASSWORD}).to_string();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("handshake with the generated certificate");
    let resp = http_over(
        tls,
        &format!("POST /api/v1/login HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.to_ascii_lowercase().contains("; secure"), "{resp}");
    // Plain HTTP to the TLS port gets no HTTP answer.
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let resp = http_over(
        tcp,
        "GET /api/v1/openapi.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(!resp.contains("HTTP/1.1 200"), "{resp}");
    tx.send(true).unwrap();
    running.await.unwrap();
    drop(shared);
}
