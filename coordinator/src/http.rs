//! The coordinator's plain-HTTP server: OS images (and, later, boot scripts, kernels and
//! ISOs), with Range support so agents can resume a download.
//!
//! Routes: `GET /images/<file>` from the images directory, `GET /healthz`.

use std::path::PathBuf;

use axum::Router;
use axum::routing::get;
use tower_http::services::ServeDir;

/// Bytes per read when serving an image file.
const IMAGE_READ_CHUNK: usize = 1 << 20;

pub fn router(images: PathBuf) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        // 1 MiB reads instead of tower-http's 64 KiB: a blocking-pool hop per read costs more
        // CPU than the copy, and the coordinator shares its cores with many downloads.
        .nest_service(
            "/images",
            ServeDir::new(images).with_buf_chunk_size(IMAGE_READ_CHUNK),
        )
}
