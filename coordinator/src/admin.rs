//! The admin API: HTTP/1.1 + JSON on a Unix socket, `STATE/admin.sock` (mode 0600).
//!
//! The CLI (`slipway get`, `describe`, `token create`, `info`) talks to the running coordinator
//! through it; filesystem permissions are the authentication, as for containerd or Docker.
//! `curl --unix-socket STATE/admin.sock http://slipway/v1/hosts` works too.
//!
//! Routes: `GET /v1/hosts`, `GET /v1/hosts/{name}`, `GET /v1/hosts/{name}/hardwaredata` (the
//! host's `HardwareData` document, `null` before its agent reported), `GET /v1/hardwaredata`
//! (every host's), `POST /v1/hosts/{name}/tokens` (`{"ttlSeconds": N}`), `POST
//! /v1/hosts/{name}/iso` (a virtual-media ISO for one boot: its capability URL), `DELETE
//! /v1/hosts/{name}` (a discovered host), `GET /v1/info`.
//! `{name}` is `NAME` (unique across namespaces, else an error naming them) or
//! `NAMESPACE%2FNAME`; `?namespace=NS` narrows a bare name.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use std::sync::Arc;

use crate::engine::Msg;
use crate::hardware::HardwareData;
use crate::sources::Problem;
use crate::state::HardwareStore;
use crate::view::{self, HostView, SharedHost, SharedView};

/// `GET /v1/hosts`.
#[derive(Debug, Serialize, Deserialize)]
pub struct HostList {
    pub hosts: Vec<HostView>,
    pub problems: Vec<Problem>,
}

/// `POST /v1/hosts/{name}/tokens` request.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenRequest {
    pub ttl_seconds: i64,
}

/// `POST /v1/hosts/{name}/tokens` response.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenResponse {
    pub host: String,
    pub token: String,
    pub expires_at: Timestamp,
    /// The command that runs an agent for this host with this token.
    pub agent_command: String,
}

/// `POST /v1/hosts/{name}/iso` response.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IsoResponse {
    pub host: String,
    /// The ISO's capability URL, for the BMC's virtual media (or a download).
    pub url: String,
    pub expires_at: Timestamp,
}

/// `DELETE /v1/hosts/{name}` response.
#[derive(Debug, Serialize, Deserialize)]
pub struct Deleted {
    pub message: String,
}

/// What the admin API needs to make virtual-media ISOs.
#[derive(Clone)]
pub struct Boot {
    pub isos: Arc<crate::iso::Isos>,
    /// Validity of the token in an ISO.
    pub ttl: SignedDuration,
}

/// `GET /v1/info`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Info {
    pub version: String,
    /// `https://ADDR:PORT` that agents dial.
    pub agent_url: String,
    /// `http://ADDR:PORT` of the boot and image server.
    pub http_url: String,
    /// `sha256:HEX` of the CA certificate, for `slipway.ca=` / `--ca-fingerprint`.
    pub ca_fingerprint: String,
    pub hosts_dir: PathBuf,
    pub state_dir: PathBuf,
}

#[derive(Clone)]
struct AppState {
    view: SharedView,
    tx: mpsc::Sender<Msg>,
    info: Info,
    hardware: Arc<dyn HardwareStore>,
    boot: Boot,
}

/// `?namespace=NS`.
#[derive(Debug, Default, Deserialize)]
pub struct Ns {
    pub namespace: Option<String>,
}

pub fn router(
    view: SharedView,
    tx: mpsc::Sender<Msg>,
    info: Info,
    hardware: Arc<dyn HardwareStore>,
    boot: Boot,
) -> Router {
    Router::new()
        .route("/v1/hosts", get(list_hosts))
        .route("/v1/hosts/{name}", get(get_host).delete(delete_host))
        .route("/v1/hosts/{name}/iso", post(boot_iso))
        .route("/v1/hosts/{name}/hardwaredata", get(get_hardware))
        .route("/v1/hardwaredata", get(list_hardware))
        .route("/v1/hosts/{name}/tokens", post(create_token))
        .route(
            "/v1/info",
            get(|State(s): State<AppState>| async move { Json(s.info) }),
        )
        .with_state(AppState {
            view,
            tx,
            info,
            hardware,
            boot,
        })
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

async fn list_hosts(State(s): State<AppState>) -> Response {
    // Clone the handles under the lock; serialise outside it.
    let (hosts, problems): (Vec<Arc<SharedHost>>, _) = {
        let view = s.view.read().unwrap_or_else(|p| p.into_inner());
        (
            view.hosts.values().cloned().collect(),
            view.problems.clone(),
        )
    };
    #[derive(Serialize)]
    struct Out<'a> {
        hosts: Vec<&'a SharedHost>,
        problems: Vec<Problem>,
    }
    Json(Out {
        hosts: hosts.iter().map(|h| &**h).collect(),
        problems,
    })
    .into_response()
}

/// The host a request names, from the view. Not found, it says what the source reported
/// about documents of that name (a host whose only document does not parse).
fn lookup(s: &AppState, ns: &Ns, name: &str) -> Result<Arc<SharedHost>, Box<Response>> {
    let view = s.view.read().unwrap_or_else(|p| p.into_inner());
    view::find(&view.hosts, ns.namespace.as_deref(), name)
        .map(|(_, h)| h.clone())
        .map_err(|e| {
            let problems = view.problems_named(name);
            let e = if problems.is_empty() {
                e
            } else {
                let list: Vec<String> = problems.iter().map(ToString::to_string).collect();
                format!(
                    "{e}: its document is not in effect because of a problem: {}",
                    list.join("; ")
                )
            };
            Box::new(error(StatusCode::NOT_FOUND, e))
        })
}

async fn get_host(
    State(s): State<AppState>,
    UrlPath(name): UrlPath<String>,
    Query(ns): Query<Ns>,
) -> Response {
    let h = match lookup(&s, &ns, &name) {
        Ok(h) => h,
        Err(r) => return *r,
    };
    let problems = {
        let view = s.view.read().unwrap_or_else(|p| p.into_inner());
        view.problems_of(&h.key())
    };
    match serde_json::to_value(&*h) {
        Ok(mut v) => {
            if !problems.is_empty()
                && let Some(o) = v.as_object_mut()
            {
                o.insert(
                    "problems".into(),
                    serde_json::to_value(&problems).unwrap_or_default(),
                );
            }
            Json(v).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn get_hardware(
    State(s): State<AppState>,
    UrlPath(name): UrlPath<String>,
    Query(ns): Query<Ns>,
) -> Response {
    let host = match lookup(&s, &ns, &name) {
        Ok(h) => h,
        Err(r) => return *r,
    };
    let store = s.hardware.clone();
    let key = host.key();
    match tokio::task::spawn_blocking(move || store.hardware(&key)).await {
        Ok(Ok(doc)) => Json(doc).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, crate::error_chain(&e)),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn list_hardware(State(s): State<AppState>) -> Response {
    let store = s.hardware.clone();
    match tokio::task::spawn_blocking(move || store.all_hardware()).await {
        Ok(Ok(docs)) => Json::<Vec<HardwareData>>(docs).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, crate::error_chain(&e)),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn create_token(
    State(s): State<AppState>,
    UrlPath(name): UrlPath<String>,
    Query(ns): Query<Ns>,
    Json(req): Json<TokenRequest>,
) -> Response {
    let key = match lookup(&s, &ns, &name) {
        Ok(h) => h.key(),
        Err(r) => return *r,
    };
    if req.ttl_seconds <= 0 {
        return error(
            StatusCode::BAD_REQUEST,
            "ttlSeconds must be positive".into(),
        );
    }
    let asked = ask(&s, |reply| Msg::CreateToken {
        host: key.clone(),
        ttl: SignedDuration::from_secs(req.ttl_seconds),
        reply,
    });
    match asked.await {
        Err(r) => *r,
        Ok(Ok(issued)) => {
            let (token, expires_at) = (issued.token, issued.expires_at);
            let agent_command = format!(
                "slipway-agent run --coordinator {} --token {} --ca-fingerprint {}",
                s.info.agent_url,
                token.expose(),
                s.info.ca_fingerprint
            );
            Json(TokenResponse {
                host: key.to_string(),
                token: token.expose().to_string(),
                expires_at,
                agent_command,
            })
            .into_response()
        }
        Ok(Err(message)) => error(StatusCode::NOT_FOUND, message),
    }
}

/// Sends the engine the message `make` builds around a reply channel, and waits for the
/// answer; a stopping coordinator is a 503.
async fn ask<T>(
    s: &AppState,
    make: impl FnOnce(oneshot::Sender<T>) -> Msg,
) -> Result<T, Box<Response>> {
    let (reply, rx) = oneshot::channel();
    let stopping = || {
        Box::new(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the coordinator is shutting down".into(),
        ))
    };
    if s.tx.send(make(reply)).await.is_err() {
        return Err(stopping());
    }
    rx.await.map_err(|_| stopping())
}

async fn boot_iso(
    State(s): State<AppState>,
    UrlPath(name): UrlPath<String>,
    Query(ns): Query<Ns>,
) -> Response {
    let key = match lookup(&s, &ns, &name) {
        Ok(h) => h.key(),
        Err(r) => return *r,
    };
    let asked = ask(&s, |reply| Msg::BootToken {
        host: key.clone(),
        ttl: s.boot.ttl,
        reply,
    });
    let issued = match asked.await {
        Ok(Ok(issued)) => issued,
        Ok(Err(message)) => return error(StatusCode::CONFLICT, message),
        Err(r) => return *r,
    };
    let urls = crate::boot::Urls {
        http: s.info.http_url.clone(),
        agent: s.info.agent_url.clone(),
        ca_fingerprint: s.info.ca_fingerprint.clone(),
    };
    // Virtual media: the host's bootMACAddress, when it declares one, is the NIC the ramdisk
    // configures and the MAC its agent says at enrolment; without one it tries every NIC.
    let args =
        crate::boot::kernel_args(&urls, issued.token.expose(), issued.boot_mac.as_deref(), "");
    match s
        .boot
        .isos
        .make(&key, &issued.token.fingerprint(), args, issued.expires_at)
        .await
    {
        Ok(capability) => Json(IsoResponse {
            host: key.to_string(),
            url: format!("{}/boot/iso/{capability}.iso", s.info.http_url),
            expires_at: issued.expires_at,
        })
        .into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, crate::error_chain(&e)),
    }
}

async fn delete_host(
    State(s): State<AppState>,
    UrlPath(name): UrlPath<String>,
    Query(ns): Query<Ns>,
) -> Response {
    let key = match lookup(&s, &ns, &name) {
        Ok(h) => h.key(),
        Err(r) => return *r,
    };
    let asked = ask(&s, |reply| Msg::DeleteHost {
        host: key.clone(),
        reply,
    });
    match asked.await {
        Ok(Ok(message)) => {
            s.boot.isos.forget(&key);
            Json(Deleted { message }).into_response()
        }
        Ok(Err(message)) => error(StatusCode::CONFLICT, message),
        Err(r) => *r,
    }
}

/// Calls the admin API of the coordinator whose state directory holds `socket`.
pub async fn call<T: serde::de::DeserializeOwned>(
    socket: &Path,
    method: http::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<T> {
    let stream = tokio::net::UnixStream::connect(socket).await.with_context(|| {
        format!(
            "cannot reach the coordinator's admin socket {}: is `slipway serve` running with this \
             --state directory (or SLIPWAY_STATE)?",
            socket.display()
        )
    })?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "slipway")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let resp = sender
        .send_request(req)
        .await
        .context("admin request failed")?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        let message = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        bail!("{message}");
    }
    serde_json::from_slice(&bytes)
        .with_context(|| format!("unexpected answer from the coordinator to {path}"))
}
