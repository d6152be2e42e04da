//! The web console: one page, its script and style sheet, compiled into the binary (no
//! separate web server, nothing fetched from elsewhere). The page talks to `/api/v1` with the
//! session cookie and the CSRF header.
//!
//! Invariant: the page carries a Content-Security-Policy that allows only this origin's
//! script and style, so an injected string cannot run code.

use axum::http::header;
use axum::response::IntoResponse;

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'";

/// `GET /`.
pub async fn index() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("../../console/index.html"),
    )
}

/// `GET /app.js`.
pub async fn script() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("../../console/app.js"),
    )
}

/// `GET /app.css`.
pub async fn style() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("../../console/app.css"),
    )
}
