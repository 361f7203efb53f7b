//! The coordinator's plain-HTTP server: OS images (and, later, boot scripts, kernels and
//! ISOs), with Range support so agents can resume a download.
//!
//! Routes: `GET /images/<file>` from the images directory, `GET /healthz`.

use std::path::PathBuf;

use axum::Router;
use axum::routing::get;
use tower_http::services::ServeDir;

pub fn router(images: PathBuf) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .nest_service("/images", ServeDir::new(images))
}
