//! The coordinator's plain-HTTP server: what booting machines and agents download.
//!
//! Routes:
//! - `GET /boot/boot.ipxe`: the iPXE entry script (DHCP points iPXE here).
//! - `GET /boot/ipxe?mac=MAC`: the machine's own script: the ramdisk with a fresh one-time token,
//!   its disk if provisioned, or a refusal (unknown MACs, by `--unknown-hosts`).
//! - `GET /boot/vmlinuz`, `GET /boot/initramfs`: the ramdisk (from `--boot-dir`).
//! - `GET /boot/iso/CAPABILITY.iso`: a virtual-media ISO made for one boot of one host
//!   (`slipway boot iso HOST`; see `iso`). There is no ISO by host name.
//! - `GET /images/FILE`: OS images (Range supported, so downloads resume).
//! - `GET /healthz`: the process answers. `GET /readyz`: the engine has loaded its state
//!   and the hosts source has been read in full (503 until then).
//! - `GET /metrics`: Prometheus text format (see `metrics`).
//!
//! Scripts and ISOs carry bootstrap tokens, so both are rate-limited per source address
//! (`--boot-rate`, `--boot-burst`). A script carries a token only when the coordinator means
//! the host to boot the ramdisk, the same one until it is used; tokens are single-use and
//! expire, and an enrolment never displaces a live agent (README: trust model).

use std::collections::HashMap;
use std::path::PathBuf;

use axum::Router;
use axum::extract::{ConnectInfo, Path as UrlPath, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::net::SocketAddr;
use tokio::sync::{mpsc, oneshot};
use tower_http::services::{ServeDir, ServeFile};

use std::sync::Arc;

use crate::boot::{self, Urls};
use crate::engine::{BootDecision, Msg};
use crate::iso::Isos;
use crate::metrics::Metrics;
use crate::ratelimit::PerAddress;
use crate::view::SharedView;

/// Bytes per read when serving an image file.
const IMAGE_READ_CHUNK: usize = 1 << 20;

#[derive(Clone)]
struct BootState {
    tx: mpsc::Sender<Msg>,
    urls: Urls,
    console: String,
    isos: Arc<Isos>,
    boot_limit: Arc<PerAddress>,
    metrics: Arc<Metrics>,
    view: SharedView,
}

/// What the HTTP server needs besides its directories.
pub struct Shared {
    pub tx: mpsc::Sender<Msg>,
    pub isos: Arc<Isos>,
    /// Boot scripts and ISOs per source address.
    pub boot_limit: Arc<PerAddress>,
    pub metrics: Arc<Metrics>,
    pub view: SharedView,
}

pub fn router(
    images: PathBuf,
    boot_dir: PathBuf,
    urls: Urls,
    console: String,
    shared: Shared,
) -> Router {
    let state = BootState {
        tx: shared.tx,
        urls,
        console,
        isos: shared.isos,
        boot_limit: shared.boot_limit,
        metrics: shared.metrics,
        view: shared.view,
    };
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/boot/boot.ipxe", get(entry))
        .route("/boot/ipxe", get(per_host))
        .route("/boot/iso/{file}", get(iso))
        .route_service("/boot/vmlinuz", ServeFile::new(boot_dir.join("vmlinuz")))
        .route_service(
            "/boot/initramfs",
            ServeFile::new(boot_dir.join("initramfs")),
        )
        // 1 MiB reads instead of tower-http's 64 KiB: a blocking-pool hop per read costs more
        // CPU than the copy, and the coordinator shares its cores with many downloads.
        .nest_service(
            "/images",
            tower::ServiceBuilder::new()
                .layer(axum::middleware::from_fn_with_state(
                    images.clone(),
                    images_inside,
                ))
                .service(ServeDir::new(images).with_buf_chunk_size(IMAGE_READ_CHUNK)),
        )
        .with_state(state)
}

/// Images are served only from inside the images directory: a symlink there that resolves
/// elsewhere (the CA key, the store) is refused, saying so.
async fn images_inside(
    State(images): State<PathBuf>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let rel = req
        .uri()
        .path()
        .strip_prefix('/')
        .and_then(crate::sendfile::relative);
    if let Some(rel) = rel {
        let dir = images.clone();
        let check = rel.clone();
        let outside = tokio::task::spawn_blocking(move || crate::sendfile::escapes(&dir, &check))
            .await
            .ok()
            .flatten();
        if outside.is_some() {
            tracing::warn!(
                "refused /images/{}: a symlink to a file outside the images directory",
                crate::log::escape(&rel.display().to_string())
            );
            return text(
                StatusCode::FORBIDDEN,
                format!(
                    "/images/{} resolves outside the images directory: refused\n",
                    rel.display()
                ),
            );
        }
    }
    next.run(req).await
}

fn text(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

async fn readyz(State(s): State<BootState>) -> Response {
    let ready = s.view.read().map(|v| v.ready).unwrap_or(false);
    if ready {
        text(StatusCode::OK, "ok\n".into())
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the hosts source has not been read in full yet\n".into(),
        )
    }
}

async fn metrics(State(s): State<BootState>) -> Response {
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        s.metrics.render(),
    )
        .into_response()
}

async fn entry(State(s): State<BootState>) -> Response {
    text(StatusCode::OK, boot::entry_script(&s.urls))
}

/// Too many boot requests from one address: refused for now, saying so.
fn too_many(s: &BootState, peer: &SocketAddr, what: &str) -> Option<Response> {
    if s.boot_limit.admit(peer.ip(), std::time::Instant::now()) {
        return None;
    }
    s.metrics.boot_rate_limited.inc();
    Some(text(
        StatusCode::TOO_MANY_REQUESTS,
        boot::refusal_script(&format!(
            "too many {what} requests from {}; try again in a few seconds",
            peer.ip()
        )),
    ))
}

async fn per_host(
    State(s): State<BootState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(refused) = too_many(&s, &peer, "boot script") {
        return refused;
    }
    let Some(mac) = q.get("mac") else {
        return text(
            StatusCode::OK,
            boot::refusal_script("the boot script URL needs ?mac=; chain /boot/boot.ipxe instead"),
        );
    };
    let (reply, rx) = oneshot::channel();
    if s.tx
        .send(Msg::Boot {
            mac: mac.clone(),
            reply,
        })
        .await
        .is_err()
    {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            boot::refusal_script("the coordinator is shutting down"),
        );
    }
    let script = match rx.await {
        Ok(BootDecision::Ramdisk { host, token, mac }) => {
            let args = boot::kernel_args(&s.urls, token.expose(), Some(&mac), &s.console);
            boot::ramdisk_script(&s.urls, &host.to_string(), &args)
        }
        Ok(BootDecision::LocalDisk { host, state }) => {
            boot::local_boot_script(&host.to_string(), &state)
        }
        Ok(BootDecision::Refuse(reason)) => boot::refusal_script(&reason),
        Ok(BootDecision::Wait(reason)) => boot::wait_script(&s.urls, &reason, 15),
        Err(_) => boot::refusal_script("the coordinator is shutting down"),
    };
    text(StatusCode::OK, script)
}

async fn iso(
    State(s): State<BootState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    UrlPath(file): UrlPath<String>,
    req: axum::extract::Request,
) -> Response {
    if let Some(refused) = too_many(&s, &peer, "ISO") {
        return refused;
    }
    let found = file
        .strip_suffix(".iso")
        .and_then(|cap| s.isos.find(cap, jiff::Timestamp::now()));
    let Some(path) = found else {
        return text(
            StatusCode::NOT_FOUND,
            "no such ISO: virtual-media ISOs are made for one boot of one host (slipway boot \
             iso HOST) and expire with the token inside\n"
                .into(),
        );
    };
    use tower::ServiceExt;
    // ServeFile answers Range requests (and types .iso by its extension).
    match ServeFile::new(&path).oneshot(req).await {
        Ok(r) => r.into_response(),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}
