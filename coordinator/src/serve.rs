//! `slipway serve`: opens the state, starts the engine, the agent API (gRPC over mutual
//! TLS), the HTTP image server, the admin socket and the source: the hosts directory (files
//! mode, state in redb) or the cluster (`--kube`: hosts, Secrets, status, inventories, tokens
//! and the CA all in Kubernetes).

use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use jiff::SignedDuration;
use slipway_reconcile::Policy;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::admin::{self, Info};
use crate::api::{self, Api};
use crate::engine::{
    DEFAULT_DISCOVERED_LIMIT, DEFAULT_PROVISIONING_LIMIT, Engine, Msg, Settings, UnknownHosts,
};
use crate::limits::{self, Caps, Gate, Port};
use crate::metrics::Metrics;
use crate::pki::Ca;
use crate::sources::SecretSource;
use crate::state::kube::KubeStore;
use crate::state::redb::RedbStore;
use crate::state::{HardwareStore, StateStore};

/// Flags of `slipway serve`.
#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    /// Directory of BareMetalHost (and Secret) YAML documents; watched for changes (files
    /// mode).
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "kube",
        conflicts_with = "kube"
    )]
    pub hosts: Option<PathBuf>,
    /// Kubernetes mode: BareMetalHosts and their Secrets are read from the cluster (every
    /// namespace), status is written to their status subresource, inventories to HardwareData
    /// objects, tokens and the CA to Secrets. The cluster is the in-cluster service account's,
    /// or KUBECONFIG's. The CRDs must be installed (`slipway crd | kubectl apply -f -`).
    #[arg(long)]
    pub kube: bool,
    /// The namespace of the coordinator's own objects in Kubernetes mode (the CA's Secret).
    #[arg(
        long,
        value_name = "NAMESPACE",
        env = "POD_NAMESPACE",
        default_value = "slipway-system"
    )]
    pub namespace: String,
    /// Kubernetes mode: how long the leader's Lease (`slipway-coordinator` in --namespace)
    /// lasts without renewal. Several replicas may run; one leads, the others wait (no port,
    /// no writes) and one takes over within this time of the leader's last renewal.
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = parse_duration)]
    pub leader_lease: SignedDuration,
    /// Address for agents (gRPC over mutual TLS).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:9443")]
    pub listen: SocketAddr,
    /// Address of the HTTP server (images; boot files later).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8080")]
    pub http_listen: SocketAddr,
    /// Directory served at /images/ (default: STATE/images).
    #[arg(long, value_name = "DIR")]
    pub images: Option<PathBuf>,
    /// PEM file of CA certificates that agents trust for https image URLs, besides the
    /// public roots and this coordinator's CA: for image servers with a private CA. Sent with
    /// every image command.
    #[arg(long, value_name = "FILE")]
    pub image_ca: Option<PathBuf>,
    /// Host name or IP address that agents use to reach this coordinator (default: the listen
    /// address, or 127.0.0.1 when listening on all addresses). Also put in the server
    /// certificate.
    #[arg(long, value_name = "HOST")]
    pub advertise: Option<String>,
    /// First retry delay after a failure; doubles up to --retry-max.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub retry_base: SignedDuration,
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    pub retry_max: SignedDuration,
    /// How long a command waits for a disconnected agent before the host shows an error.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    pub agent_lost_after: SignedDuration,
    /// Validity of agent certificates.
    #[arg(long, value_name = "DURATION", default_value = "720h", value_parser = parse_duration)]
    pub cert_validity: SignedDuration,
    /// Directory with the ramdisk (vmlinuz, initramfs, slipway.iso: `cargo xtask ramdisk`
    /// writes them to target/ramdisk/out). Default: STATE/boot.
    #[arg(long, value_name = "DIR")]
    pub boot_dir: Option<PathBuf>,
    /// What machines whose MAC no host declares get when they PXE-boot.
    #[arg(long, value_enum, default_value_t = UnknownHosts::Discover)]
    pub unknown_hosts: UnknownHosts,
    /// Validity of the one-time tokens in boot scripts and ISOs.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    pub boot_token_ttl: SignedDuration,
    /// How often the hosts directory is checked for changes.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub poll_interval: SignedDuration,
    /// How many hosts may inspect, clean or write their image at once (metal3's
    /// PROVISIONING_LIMIT, whose default is 20). Hosts beyond it wait, with operational status
    /// `delayed`, and start in the order they began waiting.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_PROVISIONING_LIMIT as u32,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub provisioning_limit: u32,
    /// Boot scripts and ISOs answered per second to one source address (bursts of
    /// --boot-burst); beyond it, 429. A machine asks a few times per boot. 0: no limit (a load
    /// generator whose machines all come from one address).
    #[arg(long, value_name = "PER_SECOND", default_value_t = 2.0, value_parser = parse_rate)]
    pub boot_rate: f64,
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub boot_burst: u32,
    /// Discovered hosts kept at most (undeclared machines that PXE-booted, with
    /// --unknown-hosts discover). Past it, the oldest that never enrolled makes room, else new
    /// machines are refused; `slipway delete host` removes one.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_DISCOVERED_LIMIT)]
    pub discovered_limit: usize,
    /// A discovered host whose agent enrolled is removed after this long unseen (no boot,
    /// no session); one that never enrolled, after --boot-token-ttl.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    pub discovered_ttl: SignedDuration,
    /// Connections the HTTP port holds at once; more are answered 503 and closed. Lowered at
    /// start to fit the open-files limit (a quarter of it, two descriptors each), and said so.
    #[arg(long, value_name = "N", default_value_t = limits::HTTP_MAX_CONNECTIONS as u32,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub http_max_connections: u32,
    /// Connections the HTTP port holds at once from one address (an IPv6 /64), so one
    /// address cannot fill --http-max-connections (at most half of it). Room for the load
    /// generator, whose machines all share one address.
    #[arg(long, value_name = "N", default_value_t = limits::HTTP_MAX_PER_SOURCE as u32,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub http_max_connections_per_source: u32,
    /// Connections the agent port holds at once: agent sessions, enrolments and TLS
    /// handshakes. Lowered at start to fit the open-files limit, and said so.
    #[arg(long, value_name = "N", default_value_t = limits::AGENT_MAX_CONNECTIONS as u32,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub agent_max_connections: u32,
    /// Connections on the agent port from one address (an IPv6 /64) that have not presented
    /// a client certificate: TLS handshakes in progress (10 s at most) and enrolments (60 s
    /// at most). Agent sessions do not count, so any number of agents may share an address.
    #[arg(long, value_name = "N", default_value_t = limits::AGENT_MAX_UNAUTHENTICATED_PER_SOURCE as u32,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub agent_max_unauthenticated_per_source: u32,
}

/// The `--image-ca` file: PEM text with at least one certificate, all of them parseable.
pub fn load_image_ca(path: &Path) -> anyhow::Result<String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --image-ca {}", path.display()))?;
    let count = CertificateDer::pem_slice_iter(text.as_bytes())
        .try_fold(0usize, |n, c| c.map(|_| n + 1))
        .map_err(|e| {
            anyhow::anyhow!(
                "--image-ca {}: not PEM certificates ({e}); give the CA's certificate in PEM \
                 (-----BEGIN CERTIFICATE-----)",
                path.display()
            )
        })?;
    if count == 0 {
        anyhow::bail!(
            "--image-ca {}: no certificate found; give the CA's certificate in PEM \
             (-----BEGIN CERTIFICATE-----)",
            path.display()
        );
    }
    Ok(text)
}

/// Durations as `30s`, `5m`, `1h30m`, `2d`.
/// A rate per second: a finite number, 0 or more.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r >= 0.0 => Ok(r),
        _ => Err(format!(
            "{s:?} is not a rate: give requests per second as a number, 0 or more (0: no limit)"
        )),
    }
}

pub fn parse_duration(s: &str) -> Result<SignedDuration, String> {
    let d: SignedDuration = s
        .parse::<SignedDuration>()
        .map_err(|e| format!("{s:?} is not a duration such as 30s, 5m or 1h ({e})"))?;
    if d.is_negative() || d.is_zero() {
        return Err(format!("{s:?} must be a positive duration"));
    }
    Ok(d)
}

pub async fn serve(args: ServeArgs, state: PathBuf) -> anyhow::Result<()> {
    if let Some(hosts) = &args.hosts
        && !hosts.is_dir()
    {
        bail!(
            "the hosts directory {} does not exist: create it, or point --hosts at the directory \
             of your BareMetalHost YAML files",
            hosts.display()
        );
    }
    let image_ca_pem = match &args.image_ca {
        Some(path) => load_image_ca(path)?,
        None => String::new(),
    };
    fs::create_dir_all(&state)
        .with_context(|| format!("cannot create the state directory {}", state.display()))?;
    fs::set_permissions(&state, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot restrict permissions of {}", state.display()))?;
    let images = args.images.clone().unwrap_or_else(|| state.join("images"));
    fs::create_dir_all(&images)
        .with_context(|| format!("cannot create the images directory {}", images.display()))?;

    let kube = match args.kube {
        true => Some(kube::Client::try_default().await.context(
            "cannot reach the Kubernetes API server: run inside the cluster (service account) or \
             set KUBECONFIG",
        )?),
        false => None,
    };
    if let Some(client) = &kube {
        let lease = Duration::try_from(args.leader_lease).unwrap_or(Duration::from_secs(15));
        crate::leader::lead(client.clone(), &args.namespace, lease).await?;
        crate::state::kube::sync_ca(client.clone(), &args.namespace, &state.join("pki")).await?;
    }
    let ca = Arc::new(
        Ca::load_or_create(&state.join("pki"))
            .map_err(|e| anyhow::anyhow!(crate::error_chain(&e)))?,
    );
    let open_files = raise_open_files_limit();
    let (http_caps, agent_caps) = connection_caps(&args, open_files);
    let (store, hardware): (Box<dyn StateStore>, Arc<dyn HardwareStore>) = match &kube {
        Some(client) => {
            let store = KubeStore::connect(client.clone())
                .await
                .map_err(|e| anyhow::anyhow!(crate::error_chain(&e)))?;
            let hardware = Arc::new(store.hardware_store());
            (Box::new(store), hardware)
        }
        None => {
            let store =
                RedbStore::open(&state).map_err(|e| anyhow::anyhow!(crate::error_chain(&e)))?;
            (Box::new(store.clone()), Arc::new(store))
        }
    };
    let settings = Settings {
        policy: Policy {
            retry_base: args.retry_base,
            retry_max: args.retry_max,
            agent_lost_after: args.agent_lost_after,
            // The ramdisk `cargo xtask ramdisk` builds (Debian's amd64 kernel, the agent for
            // x86_64-unknown-linux-musl).
            ramdisk_architecture: "x86_64".into(),
        },
        cert_validity: args.cert_validity,
        unknown_hosts: args.unknown_hosts,
        boot_token_ttl: args.boot_token_ttl,
        provisioning_limit: args.provisioning_limit as usize,
        discovered_limit: args.discovered_limit,
        discovered_ttl: args.discovered_ttl,
    };
    let metrics = Metrics::new();
    let (tx, rx) = mpsc::channel::<Msg>(4096);

    // The source: the hosts directory (read in full, then polled) or the cluster's watches;
    // its events go to the engine.
    let poll = Duration::try_from(args.poll_interval).unwrap_or(Duration::from_secs(1));
    let (source_tx, mut source_rx) = mpsc::channel(1024);
    let secrets: Arc<dyn SecretSource> = match (&kube, &args.hosts) {
        (Some(client), _) => crate::sources::kube::spawn(client.clone(), source_tx),
        (None, Some(dir)) => crate::sources::files::spawn(dir.clone(), poll, source_tx).await,
        (None, None) => bail!("give --hosts DIR (files mode) or --kube (Kubernetes mode)"),
    };
    let forward = tx.clone();
    tokio::spawn(async move {
        while let Some(event) = source_rx.recv().await {
            if forward.send(Msg::Source(event)).await.is_err() {
                return;
            }
        }
    });
    let engine = Engine::new(store, ca.clone(), secrets, settings, metrics.clone())
        .map_err(|e| anyhow::anyhow!(crate::error_chain(&e)))?;
    let view = engine.view();
    let engine_task = tokio::spawn(engine.run(rx));

    let advertise = match &args.advertise {
        Some(a) => a.clone(),
        None if args.listen.ip().is_unspecified() => {
            warn!(
                "listening on all addresses without --advertise: agents are told to dial 127.0.0.1; set --advertise to an address the hosts can reach"
            );
            "127.0.0.1".into()
        }
        None => args.listen.ip().to_string(),
    };

    // Agent API.
    let grpc = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen for agents on {}", args.listen))?;
    let grpc_addr = grpc.local_addr()?;
    let tls = ca
        .server_tls(std::slice::from_ref(&advertise))
        .map_err(|e| anyhow::anyhow!(crate::error_chain(&e)))?;
    let api = Api::new(tx.clone(), &image_ca_pem, metrics.clone());
    let agent_gate = Gate::new(Port::Agent, agent_caps, metrics.clone());
    let http_gate = Gate::new(Port::Http, http_caps, metrics.clone());
    let grpc_task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(20)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(api.into_service())
            .serve_with_incoming(api::tls_incoming(grpc, Arc::new(tls), agent_gate))
            .await
    });

    // HTTP.
    let http = TcpListener::bind(args.http_listen)
        .await
        .with_context(|| format!("cannot listen for HTTP on {}", args.http_listen))?;
    let http_addr = http.local_addr()?;

    // Admin socket.
    let socket = state.join("admin.sock");
    if socket.exists() {
        fs::remove_file(&socket)
            .with_context(|| format!("cannot remove the stale socket {}", socket.display()))?;
    }
    let admin = UnixListener::bind(&socket)
        .with_context(|| format!("cannot create the admin socket {}", socket.display()))?;
    fs::set_permissions(&socket, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict permissions of {}", socket.display()))?;
    let info = Info {
        version: env!("CARGO_PKG_VERSION").into(),
        agent_url: format!("https://{}", host_port(&advertise, grpc_addr.port())),
        http_url: format!("http://{}", host_port(&advertise, http_addr.port())),
        ca_fingerprint: ca.fingerprint(),
        hosts_dir: args
            .hosts
            .clone()
            .unwrap_or_else(|| PathBuf::from("(Kubernetes: BareMetalHosts in the cluster)")),
        state_dir: state.clone(),
    };
    // HTTP: boot files, scripts, ISOs and images.
    let boot_dir = args.boot_dir.clone().unwrap_or_else(|| state.join("boot"));
    let isos = crate::iso::Isos::new(state.join("iso"), boot_dir.join("slipway.iso"))
        .context("cannot prepare the directory of virtual-media ISOs")?;
    let admin_task = tokio::spawn(
        axum::serve(
            admin,
            admin::router(
                view.clone(),
                tx.clone(),
                info.clone(),
                hardware,
                admin::Boot {
                    isos: isos.clone(),
                    ttl: args.boot_token_ttl,
                },
            ),
        )
        .into_future(),
    );
    let console = ramdisk_console(&boot_dir);
    if !boot_dir.join("initramfs").exists() {
        warn!(
            "no ramdisk in {} (vmlinuz, initramfs, slipway.iso): machines cannot PXE-boot until it is there (cargo xtask ramdisk; --boot-dir)",
            boot_dir.display()
        );
    }
    let urls = crate::boot::Urls {
        http: info.http_url.clone(),
        agent: info.agent_url.clone(),
        ca_fingerprint: info.ca_fingerprint.clone(),
    };
    let router = crate::http::router(
        images.clone(),
        boot_dir,
        urls,
        console,
        crate::http::Shared {
            tx: tx.clone(),
            isos,
            boot_limit: Arc::new(crate::ratelimit::PerAddress::new(
                args.boot_rate,
                args.boot_burst,
            )),
            metrics,
            view,
        },
    );
    // Image downloads are answered with sendfile in front of the router (`sendfile`).
    let http_task = tokio::spawn(crate::sendfile::serve(
        http,
        images,
        router,
        http_gate,
        crate::sendfile::DEADLINES,
    ));
    drop(tx);

    info!(
        agents = %grpc_addr,
        http = %http_addr,
        admin = %socket.display(),
        ca = %info.ca_fingerprint,
        "slipway ready: agents dial {}, images at {}/images/",
        info.agent_url,
        info.http_url
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("interrupted; stopping"),
        _ = term.recv() => info!("terminated; stopping"),
        r = grpc_task => bail!("the agent API stopped: {r:?}"),
        r = http_task => bail!("the HTTP server stopped: {r:?}"),
        r = admin_task => bail!("the admin socket stopped: {r:?}"),
        r = engine_task => bail!("the engine stopped: {r:?}"),
    }
    let _ = fs::remove_file(&socket);
    Ok(())
}

/// Every agent holds a connection: raise the open-files limit to the hard limit (10,000
/// agents need more than the usual 1,024), and say what it is. Returns the limit now in
/// force (1,024, the usual default, when it cannot be read).
fn raise_open_files_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => {
                info!("open-files limit raised from {soft} to {hard} (the hard limit)");
                hard
            }
            Err(e) => {
                warn!("cannot raise the open-files limit from {soft} to {hard}: {e}");
                soft
            }
        },
        Ok((soft, _)) => {
            info!("open-files limit: {soft}");
            soft
        }
        Err(e) => {
            warn!("cannot read the open-files limit: {e}");
            1024
        }
    }
}

/// The listeners' caps from the flags, fitted to the open-files limit; says what they are,
/// and warns when the limit lowered any.
fn connection_caps(args: &ServeArgs, open_files: u64) -> (Caps, Caps) {
    let (http, agent, lowered) = limits::fit(
        Caps {
            total: args.http_max_connections as usize,
            per_source: args.http_max_connections_per_source as usize,
        },
        Caps {
            total: args.agent_max_connections as usize,
            per_source: args.agent_max_unauthenticated_per_source as usize,
        },
        open_files,
    );
    if !lowered.is_empty() {
        warn!(
            "connection caps lowered to fit the open-files limit {open_files}: {}; raise the hard \
             limit for more (LimitNOFILE= for a systemd service)",
            lowered.join("; ")
        );
    }
    info!(
        "connection caps: HTTP {} ({} per address), agent port {} ({} unauthenticated per address)",
        http.total, http.per_source, agent.total, agent.per_source
    );
    (http, agent)
}

/// The console arguments the ramdisk was built for (its manifest), or the default.
fn ramdisk_console(dir: &std::path::Path) -> String {
    std::fs::read(dir.join("manifest.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["console"].as_str().map(str::to_string))
        .unwrap_or_else(|| crate::boot::DEFAULT_CONSOLE.to_string())
}

fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_numbers_of_zero_or_more() {
        assert_eq!(parse_rate("2.5"), Ok(2.5));
        assert_eq!(parse_rate("0"), Ok(0.0));
        for bad in ["-1", "NaN", "inf", "fast"] {
            let e = parse_rate(bad).unwrap_err();
            assert!(e.contains("not a rate") && e.contains(bad), "{e}");
        }
    }

    #[test]
    fn image_ca_files_must_hold_pem_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = load_image_ca(&missing).unwrap_err();
        assert!(format!("{e:#}").contains("missing.pem"), "{e:#}");
        let junk = dir.path().join("junk.pem");
        fs::write(&junk, "hello").unwrap();
        let e = load_image_ca(&junk).unwrap_err().to_string();
        assert!(
            e.contains("junk.pem") && e.contains("no certificate"),
            "{e}"
        );
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let good = dir.path().join("ca.pem");
        fs::write(&good, cert.pem()).unwrap();
        assert_eq!(load_image_ca(&good).unwrap(), cert.pem());
    }
}
