//! Connections cannot starve the coordinator (issue 16). A coordinator whose open-files limit
//! is the common 1,024 (soft and hard, so raising it gains nothing) is flooded from another
//! loopback address, 127.0.0.2: 1,500 HTTP connections that send their request head a byte a
//! second, and 400 connections to the agent port that never send a ClientHello, each one
//! coming back a second after the coordinator closes it. While the flood is on, everyone
//! else (127.0.0.1) is served: `/healthz`, a declared host's boot script with its token, and
//! an enrolment followed by an agent session each take less than a second.
//!
//! Before the connection limits, the flood used up the coordinator's descriptors: from
//! 127.0.0.1, `/healthz`, boot scripts and enrolments all went unanswered (for 3 s, when
//! this test gives up) at every point of the flood.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use slipway_agent::tls::{self, Fingerprint};
use slipway_proto::v1 as pb;
use slipway_tests::{Coordinator, write_doc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_stream::wrappers::ReceiverStream;

/// The coordinator's open-files limit, soft and hard.
const OPEN_FILES: u64 = 1024;
const HTTP_FLOOD: usize = 1500;
const AGENT_FLOOD: usize = 400;
/// How long the flood lasts: past the coordinator's head and handshake deadlines, so the
/// flood's first connections are cut and come back while it is measured.
const FLOOD_FOR: Duration = Duration::from_secs(20);
/// Where the flood comes from (all of 127.0.0.0/8 is loopback on Linux).
const FLOOD_FROM: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// What each legitimate request may take.
const WITHIN: Duration = Duration::from_secs(1);
/// When a measurement gives up (so a starved coordinator fails the test quickly).
const GIVE_UP: Duration = Duration::from_secs(3);
/// When the rounds of legitimate requests start: once the flood holds what it can; while
/// its first connections are cut at the coordinator's 10 s deadlines; and while they come
/// back a second later.
const ROUNDS: [Duration; 3] = [
    Duration::from_secs(3),
    Duration::from_millis(10_300),
    Duration::from_millis(11_300),
];

const BOOT_MAC: &str = "52:54:00:16:00:01";

fn host(name: &str, mac: &str) -> String {
    format!(
        "apiVersion: metal3.io/v1alpha1\nkind: BareMetalHost\nmetadata:\n  name: {name}\nspec:\n  online: true\n  bootMACAddress: {mac}\n"
    )
}

#[test]
fn a_connection_flood_from_one_address_starves_no_one_else() {
    raise_own_open_files_limit();
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start_with_open_files(dir.path(), &[], OPEN_FILES);
    write_doc(&c.hosts, "boot.yaml", &host("boot", BOOT_MAC));
    let agents = ["enrol-1", "enrol-2", "enrol-3"];
    for (i, name) in agents.iter().enumerate() {
        write_doc(
            &c.hosts,
            &format!("{name}.yaml"),
            &host(name, &format!("52:54:00:16:01:0{i}")),
        );
    }
    for name in agents.iter().chain(&["boot"]) {
        c.wait_state(name, "inspecting", Duration::from_secs(15));
    }
    let tokens = agents.map(|a| c.token(a, "10m"));
    let pin = Fingerprint::parse(&c.ca_fingerprint()).unwrap();
    let http: SocketAddr = format!("127.0.0.1:{}", c.http_port).parse().unwrap();
    let grpc: SocketAddr = format!("127.0.0.1:{}", c.grpc_port).parse().unwrap();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (rounds, stats) = rt.block_on(async {
        let stats = Arc::new(Stats::default());
        let until = tokio::time::Instant::now() + FLOOD_FOR;
        let mut flood = tokio::task::JoinSet::new();
        for _ in 0..HTTP_FLOOD {
            flood.spawn(drip(http, until, stats.clone()));
        }
        for _ in 0..AGENT_FLOOD {
            flood.spawn(silent(grpc, until, stats.clone()));
        }
        let start = Instant::now();
        let mut rounds = Vec::new();
        for (i, at) in ROUNDS.iter().enumerate() {
            tokio::time::sleep(at.saturating_sub(start.elapsed())).await;
            let t = start.elapsed();
            let dir = dir.path().join(agents[i]);
            let round = measure(http, grpc, pin, &tokens[i], &dir).await;
            rounds.push((t, start.elapsed() < FLOOD_FOR, round));
        }
        // Every flood socket is closed when its task ends, at `until`.
        while flood.join_next().await.is_some() {}
        (rounds, stats)
    });
    drop(rt);

    eprintln!("flood: {}", stats.summary());
    let mut slow = Vec::new();
    for (at, flood_on, round) in &rounds {
        if !flood_on {
            slow.push(format!("the round at {at:.1?} ended after the flood"));
        }
        for (what, took) in round {
            match took {
                Ok(d) => eprintln!("flood at {at:.1?}: {what}: {} ms", d.as_millis()),
                Err(e) => eprintln!("flood at {at:.1?}: {what}: FAILED: {e}"),
            }
            if !matches!(took, Ok(d) if *d < WITHIN) {
                slow.push(format!("{what} at {at:.1?}: {took:?}"));
            }
        }
    }
    let tried = [
        &stats.http_opened,
        &stats.agent_opened,
        &stats.connect_failed,
    ]
    .iter()
    .map(|n| n.load(Ordering::Relaxed))
    .sum::<u64>();
    assert!(
        tried >= (HTTP_FLOOD + AGENT_FLOOD) as u64,
        "the flood was on: {}",
        stats.summary()
    );
    assert!(
        slow.is_empty(),
        "not answered within {WITHIN:?} during the flood: {slow:#?}\n{}",
        c.logs()
    );

    // The flood was refused and counted, and said in the log without a line per connection.
    let (code, metrics) = slipway_tests::http_get(&format!("{}/metrics", c.http_url()));
    assert_eq!(code, 200);
    for listener in ["http", "agent"] {
        let refused: f64 = metrics
            .lines()
            .filter(|l| {
                l.starts_with("slipway_connections_refused_total{")
                    && l.contains(&format!("listener=\"{listener}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert!(refused > 0.0, "{listener} refusals counted:\n{metrics}");
    }
    let log = c.log_text();
    let lines: Vec<_> = log.lines().filter(|l| l.contains("connection")).collect();
    eprintln!(
        "the coordinator's log about connections:\n{}",
        lines.join("\n")
    );
    assert!(
        lines.len() < 100,
        "{} log lines about connections: the flood is summarised, not logged line by line:\n{log}",
        lines.len()
    );
}

/// The times of one round of legitimate requests from 127.0.0.1, made at once: `/healthz`,
/// a boot script, and an enrolment followed by an agent session.
async fn measure(
    http: SocketAddr,
    grpc: SocketAddr,
    pin: Fingerprint,
    token: &str,
    dir: &std::path::Path,
) -> Vec<(&'static str, Result<Duration, String>)> {
    let healthz = timed(async {
        let answer = get(http, "/healthz").await?;
        answer
            .ends_with("ok\n")
            .then_some(())
            .ok_or(format!("unexpected answer: {answer}"))
    });
    let boot = timed(async {
        let answer = get(http, &format!("/boot/ipxe?mac={BOOT_MAC}")).await?;
        (answer.starts_with("HTTP/1.1 200") && answer.contains("slipway.token="))
            .then_some(())
            .ok_or(format!("no token in the answer: {answer}"))
    });
    let settings = slipway_agent::session::Settings {
        address: grpc.to_string(),
        token: Some(token.to_string()),
        ca: pin,
        state_dir: dir.to_path_buf(),
        boot_mac: None,
        ramdisk: false,
        heartbeat: Duration::from_secs(10),
        exit_on_refusal: true,
        reconnect_jitter: Duration::ZERO,
        milestones: false,
    };
    let agent = async {
        let mut id = None;
        let enrolled = timed(async {
            let enrolled = slipway_agent::session::identity(&settings).await;
            id = Some(enrolled.map_err(|e| format!("{e:#}"))?);
            Ok(())
        })
        .await;
        let session = match id {
            Some(id) => timed(session(grpc, &id, dir)).await,
            None => Err("not enrolled".into()),
        };
        (enrolled, session)
    };
    let (healthz, boot, (enrolled, session)) = tokio::join!(healthz, boot, agent);
    vec![
        ("GET /healthz", healthz),
        ("GET /boot/ipxe (a declared host's boot script)", boot),
        ("enrolment (TLS handshake and Enroll)", enrolled),
        ("agent session (mutual TLS handshake and hello)", session),
    ]
}

async fn timed(f: impl Future<Output = Result<(), String>>) -> Result<Duration, String> {
    let start = Instant::now();
    match tokio::time::timeout(GIVE_UP, f).await {
        Ok(Ok(())) => Ok(start.elapsed()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no answer within {GIVE_UP:?}")),
    }
}

/// `GET path` on a fresh connection from 127.0.0.1: the whole answer.
async fn get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)
        .await
        .map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// Opens an agent session with the enrolled identity and says hello: done when the
/// coordinator has accepted it.
async fn session(
    grpc: SocketAddr,
    id: &slipway_agent::session::Identity,
    dir: &std::path::Path,
) -> Result<(), String> {
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(
        std::fs::read(dir.join("key.der"))
            .map_err(|e| e.to_string())?
            .into(),
    );
    let config =
        Arc::new(tls::session_config(&id.ca_der, &id.cert_der, key).map_err(|e| e.to_string())?);
    let connector = tower::service_fn(move |_: http::Uri| {
        let config = config.clone();
        async move {
            let tcp = TcpStream::connect(grpc).await?;
            let name = rustls::pki_types::ServerName::try_from(tls::SERVER_NAME)
                .map_err(std::io::Error::other)?;
            let s = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
        }
    });
    let channel = tonic::transport::Endpoint::from_static("http://coordinator.slipway.internal")
        .connect_with_connector(connector)
        .await
        .map_err(|e| format!("{e:?}"))?;
    let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let hello = pb::AgentEvent {
        event: Some(pb::agent_event::Event::Hello(pb::Hello {
            host: id.host.clone(),
            namespace: id.namespace.clone(),
            agent: None,
            inventory: None,
            commands: vec![],
        })),
    };
    tx.send(hello).await.map_err(|e| e.to_string())?;
    client
        .session(ReceiverStream::new(rx))
        .await
        .map(drop)
        .map_err(|st| format!("session refused: {st}"))
}

#[derive(Default)]
struct Stats {
    http_opened: AtomicU64,
    /// HTTP flood connections the coordinator ended (refused, or cut at a deadline).
    http_ended: AtomicU64,
    /// ... of which with a 503.
    http_503: AtomicU64,
    agent_opened: AtomicU64,
    agent_ended: AtomicU64,
    connect_failed: AtomicU64,
}

impl Stats {
    fn summary(&self) -> String {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "HTTP: {} connections opened, {} ended by the coordinator ({} with a 503); agent port: {} opened, {} ended by the coordinator; {} connects failed",
            n(&self.http_opened),
            n(&self.http_ended),
            n(&self.http_503),
            n(&self.agent_opened),
            n(&self.agent_ended),
            n(&self.connect_failed),
        )
    }
}

/// A TCP connection from [`FLOOD_FROM`].
async fn connect_from_flood(to: SocketAddr) -> Option<TcpStream> {
    let s = TcpSocket::new_v4().ok()?;
    s.bind(SocketAddr::new(FLOOD_FROM, 0)).ok()?;
    tokio::time::timeout(Duration::from_secs(1), s.connect(to))
        .await
        .ok()?
        .ok()
}

/// An HTTP client that sends its request head a byte a second, never finishing it, and
/// comes back a second after the coordinator closes the connection.
async fn drip(to: SocketAddr, until: tokio::time::Instant, stats: Arc<Stats>) {
    const HEAD: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: flood\r\nX-Drip: ";
    while tokio::time::Instant::now() < until {
        let Some(mut s) = connect_from_flood(to).await else {
            stats.connect_failed.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep_until(
                until.min(tokio::time::Instant::now() + Duration::from_secs(1)),
            )
            .await;
            continue;
        };
        stats.http_opened.fetch_add(1, Ordering::Relaxed);
        let mut buf = [0u8; 64];
        for i in 0.. {
            let byte = HEAD.get(i).copied().unwrap_or(b'a');
            if s.write_all(&[byte]).await.is_err() {
                stats.http_ended.fetch_add(1, Ordering::Relaxed);
                break;
            }
            let next = until.min(tokio::time::Instant::now() + Duration::from_secs(1));
            match tokio::time::timeout_at(next, s.read(&mut buf)).await {
                Err(_) if next >= until => return,
                Err(_) => {}
                Ok(r) => {
                    if matches!(r, Ok(n) if buf[..n].starts_with(b"HTTP/1.1 503")) {
                        stats.http_503.fetch_add(1, Ordering::Relaxed);
                    }
                    stats.http_ended.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
        drop(s);
        tokio::time::sleep_until(until.min(tokio::time::Instant::now() + Duration::from_secs(1)))
            .await;
    }
}

/// A connection to the agent port that never sends a ClientHello, back a second after the
/// coordinator closes it.
async fn silent(to: SocketAddr, until: tokio::time::Instant, stats: Arc<Stats>) {
    while tokio::time::Instant::now() < until {
        let Some(mut s) = connect_from_flood(to).await else {
            stats.connect_failed.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep_until(
                until.min(tokio::time::Instant::now() + Duration::from_secs(1)),
            )
            .await;
            continue;
        };
        stats.agent_opened.fetch_add(1, Ordering::Relaxed);
        let mut buf = [0u8; 64];
        if tokio::time::timeout_at(until, s.read(&mut buf))
            .await
            .is_err()
        {
            return;
        }
        stats.agent_ended.fetch_add(1, Ordering::Relaxed);
        drop(s);
        tokio::time::sleep_until(until.min(tokio::time::Instant::now() + Duration::from_secs(1)))
            .await;
    }
}

/// The flood needs more descriptors than the usual soft limit: up to the hard limit.
fn raise_own_open_files_limit() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit with a valid resource and a pointer to a live rlimit.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut l), 0);
        l.rlim_cur = l.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &l), 0);
    }
    let need = (HTTP_FLOOD + AGENT_FLOOD + 256) as u64;
    assert!(
        l.rlim_cur >= need as libc::rlim_t,
        "this test needs {need} open files; the hard limit is {}",
        l.rlim_cur
    );
}
