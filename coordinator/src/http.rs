//! The coordinator's plain-HTTP server: what booting machines and agents download.
//!
//! Routes:
//! - `GET /boot/boot.ipxe`: the iPXE entry script (DHCP points iPXE here).
//! - `GET /boot/ipxe?mac=MAC`: the machine's own script: the ramdisk with a fresh one-time token,
//!   its disk if provisioned, or a refusal (unknown MACs, by `--unknown-hosts`).
//! - `GET /boot/vmlinuz`, `GET /boot/initramfs`: the ramdisk (from `--boot-dir`).
//! - `GET /boot/iso/HOST.iso`: the ISO template with HOST's kernel arguments, for virtual media.
//! - `GET /images/FILE`: OS images (Range supported, so downloads resume).
//! - `GET /healthz`.
//!
//! Scripts and ISOs carry bootstrap tokens: the provisioning network must be one that only
//! the machines being provisioned reach (as with Ironic), and tokens are single-use and short.

use std::collections::HashMap;
use std::path::PathBuf;

use axum::Router;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use jiff::SignedDuration;
use tokio::sync::{mpsc, oneshot};
use tower_http::services::{ServeDir, ServeFile};

use crate::boot::{self, Urls};
use crate::controller::{BootDecision, Msg};

/// Bytes per read when serving an image file.
const IMAGE_READ_CHUNK: usize = 1 << 20;

#[derive(Clone)]
struct BootState {
    tx: mpsc::Sender<Msg>,
    urls: Urls,
    dir: PathBuf,
    console: String,
    iso_token_ttl: SignedDuration,
}

pub fn router(
    images: PathBuf,
    boot_dir: PathBuf,
    urls: Urls,
    console: String,
    tx: mpsc::Sender<Msg>,
    iso_token_ttl: SignedDuration,
) -> Router {
    let state = BootState {
        tx,
        urls,
        dir: boot_dir.clone(),
        console,
        iso_token_ttl,
    };
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
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
            ServeDir::new(images).with_buf_chunk_size(IMAGE_READ_CHUNK),
        )
        .with_state(state)
}

fn text(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

async fn entry(State(s): State<BootState>) -> Response {
    text(StatusCode::OK, boot::entry_script(&s.urls))
}

async fn per_host(
    State(s): State<BootState>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
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
            boot::ramdisk_script(&s.urls, &host, &args)
        }
        Ok(BootDecision::LocalDisk { host, state }) => boot::local_boot_script(&host, &state),
        Ok(BootDecision::Refuse(reason)) => boot::refusal_script(&reason),
        Err(_) => boot::refusal_script("the coordinator is shutting down"),
    };
    text(StatusCode::OK, script)
}

async fn iso(State(s): State<BootState>, UrlPath(file): UrlPath<String>) -> Response {
    let Some(host) = file.strip_suffix(".iso") else {
        return text(StatusCode::NOT_FOUND, "ask for /boot/iso/HOST.iso\n".into());
    };
    let template = match tokio::fs::read(s.dir.join("slipway.iso")).await {
        Ok(t) => t,
        Err(e) => {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "no ISO template at {} ({e}); build it with cargo xtask ramdisk\n",
                    s.dir.join("slipway.iso").display()
                ),
            );
        }
    };
    let (reply, rx) = oneshot::channel();
    let msg = Msg::CreateToken {
        host: host.to_string(),
        ttl: s.iso_token_ttl,
        reply,
    };
    if s.tx.send(msg).await.is_err() {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the coordinator is shutting down\n".into(),
        );
    }
    let token = match rx.await {
        Ok(Ok((token, _))) => token,
        Ok(Err(message)) => return text(StatusCode::NOT_FOUND, format!("{message}\n")),
        Err(_) => {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the coordinator is shutting down\n".into(),
            );
        }
    };
    // Virtual media: no BOOTIF; the ramdisk tries every NIC.
    let args = boot::kernel_args(&s.urls, token.expose(), None, "");
    match boot::patch_iso(&template, args.trim()) {
        Ok(iso) => ([(header::CONTENT_TYPE, "application/x-iso9660-image")], iso).into_response(),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}
