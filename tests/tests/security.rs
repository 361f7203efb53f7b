//! Who may talk to the coordinator: refusals of foreign certificates, missing certificates,
//! reused and expired tokens, and a certificate speaking for another host. Each refusal must
//! be logged by the coordinator with its reason.

use std::fs;
use std::path::Path;
use std::time::Duration;

use slipway_agent::tls::{self, Fingerprint};
use slipway_proto::v1 as pb;
use slipway_tests::{Agent, Coordinator, pattern, sha256_hex, write_host};
use tokio_stream::wrappers::ReceiverStream;

fn host_with_image(c: &Coordinator, dir: &Path, name: &str) -> std::path::PathBuf {
    let image = pattern(1 << 20, 3);
    fs::write(c.images.join(format!("{name}.img")), &image).unwrap();
    let disk = dir.join(format!("{name}.disk"));
    fs::write(&disk, vec![0u8; 8 << 20]).unwrap();
    write_host(
        &c.hosts,
        name,
        &c.image_url(&format!("{name}.img")),
        &sha256_hex(&image),
        &disk.display().to_string(),
    );
    c.wait_state(name, "inspecting", Duration::from_secs(10));
    disk
}

/// A gRPC channel to the coordinator with the given TLS settings (an attacker's client).
async fn channel(c: &Coordinator, config: rustls::ClientConfig) -> tonic::transport::Channel {
    let config = std::sync::Arc::new(config);
    let addr = format!("127.0.0.1:{}", c.grpc_port);
    let connector = tower::service_fn(move |_: http::Uri| {
        let config = config.clone();
        let addr = addr.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let name = rustls::pki_types::ServerName::try_from(tls::SERVER_NAME).unwrap();
            let s = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
        }
    });
    tonic::transport::Endpoint::from_static("http://coordinator.slipway.internal")
        .connect_with_connector(connector)
        .await
        .expect("TLS connection")
}

/// The real agent's session settings for `c`, with `token`, keeping its identity in `state`.
fn settings(c: &Coordinator, token: String, state: &Path) -> slipway_agent::session::Settings {
    slipway_agent::session::Settings {
        address: format!("127.0.0.1:{}", c.grpc_port),
        token: Some(token),
        ca: Fingerprint::parse(&c.ca_fingerprint()).unwrap(),
        state_dir: state.to_path_buf(),
        boot_mac: None,
        ramdisk: false,
        heartbeat: Duration::from_secs(10),
        exit_on_refusal: true,
        reconnect_jitter: Duration::ZERO,
        milestones: false,
    }
}

fn hello(host: &str) -> pb::AgentEvent {
    pb::AgentEvent {
        event: Some(pb::agent_event::Event::Hello(pb::Hello {
            host: host.into(),
            agent: None,
            inventory: None,
            commands: vec![],
            namespace: String::new(),
        })),
    }
}

#[test]
fn certificate_from_another_ca_is_refused_at_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let a = Coordinator::start(&dir.path().join("a"), &[]);
    let b = Coordinator::start(&dir.path().join("b"), &[]);
    // A real agent enrols with coordinator B...
    let disk_b = host_with_image(&b, dir.path(), "host-b");
    let agent_state = dir.path().join("agent-b");
    let mut agent = Agent::start(&b, &b.token("host-b", "10m"), &disk_b, &agent_state, &[]);
    b.wait_state("host-b", "provisioned", Duration::from_secs(60));
    assert!(agent.wait_exit(Duration::from_secs(20)));
    // ...and then presents B's certificate to coordinator A (pinning A's CA, so only the
    // client certificate is wrong).
    host_with_image(&a, dir.path(), "host-b");
    let a_ca = fs::read(a.state.join("pki/ca.crt")).unwrap();
    let a_ca_der = pem_to_der(&a_ca);
    fs::write(agent_state.join("ca.der"), &a_ca_der).unwrap();
    let mut intruder = Agent::start(&a, "unused", &disk_b, &agent_state, &[]);
    let log = a.wait_log("TLS connection refused", Duration::from_secs(20));
    assert!(
        log.contains("the client certificate was not issued by this coordinator's CA"),
        "{log}"
    );
    assert!(
        intruder.is_running(),
        "the agent keeps retrying (it may be a network problem)"
    );
    assert_eq!(
        a.host("host-b").unwrap()["status"]["agent"],
        serde_json::Value::Null,
        "no session was opened"
    );
}

fn pem_to_der(pem: &[u8]) -> Vec<u8> {
    use base64::Engine;
    let text = String::from_utf8_lossy(pem);
    let b64: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

#[test]
fn session_without_a_certificate_is_refused_and_logged() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(dir.path(), &[]);
    host_with_image(&c, dir.path(), "h");
    let pin = Fingerprint::parse(&c.ca_fingerprint()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status = rt.block_on(async {
        let ch = channel(&c, tls::enroll_config(pin).unwrap()).await;
        let mut client = pb::agent_service_client::AgentServiceClient::new(ch);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(hello("h")).await.unwrap();
        client.session(ReceiverStream::new(rx)).await.unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(status.message().contains("enrol"), "{}", status.message());
    c.wait_log(
        "agent session refused: no client certificate",
        Duration::from_secs(5),
    );
}

#[test]
fn reused_and_expired_tokens_are_refused_and_logged() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(dir.path(), &[]);
    let disk = host_with_image(&c, dir.path(), "h");
    let token = c.token("h", "10m");
    let mut first = Agent::start(&c, &token, &disk, &dir.path().join("first"), &[]);
    c.wait_state("h", "provisioned", Duration::from_secs(60));
    assert!(first.wait_exit(Duration::from_secs(20)));

    // The same token again, from a fresh agent.
    let mut second = Agent::start(&c, &token, &disk, &dir.path().join("second"), &[]);
    assert!(
        !second.wait_exit(Duration::from_secs(20)),
        "a reused token must not enrol"
    );
    let agent_log = second.log_text();
    assert!(
        agent_log.contains("already used"),
        "the agent says why: {agent_log}"
    );
    let log = c.wait_log("enrolment refused", Duration::from_secs(5));
    assert!(
        log.contains("bootstrap token for host default/h was already used"),
        "{log}"
    );
    assert!(!log.contains(&token), "the token itself is never logged");

    // An expired token.
    let old = c.token("h", "1s");
    std::thread::sleep(Duration::from_millis(1500));
    let mut third = Agent::start(&c, &old, &disk, &dir.path().join("third"), &[]);
    assert!(!third.wait_exit(Duration::from_secs(20)));
    assert!(third.log_text().contains("expired"), "{}", third.log_text());
    c.wait_log(
        "bootstrap token for host default/h expired at",
        Duration::from_secs(5),
    );

    // A token nobody issued.
    let mut fourth = Agent::start(&c, "made-up-token", &disk, &dir.path().join("fourth"), &[]);
    assert!(!fourth.wait_exit(Duration::from_secs(20)));
    c.wait_log("unknown bootstrap token", Duration::from_secs(5));
}

#[test]
fn host_a_certificate_cannot_speak_for_host_b() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(dir.path(), &[]);
    host_with_image(&c, dir.path(), "host-a");
    host_with_image(&c, dir.path(), "host-b");
    let token = c.token("host-a", "10m");
    let state = dir.path().join("agent-a");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status = rt.block_on(async {
        // Enrol as host-a with the real agent code, then open a session claiming host-b.
        let settings = settings(&c, token, &state);
        let id = slipway_agent::session::identity(&settings).await.unwrap();
        assert_eq!(id.host, "host-a");
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(
            fs::read(state.join("key.der")).unwrap().into(),
        );
        let config = tls::session_config(&id.ca_der, &id.cert_der, key).unwrap();
        let mut client =
            pb::agent_service_client::AgentServiceClient::new(channel(&c, config).await);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(hello("host-b")).await.unwrap();
        client.session(ReceiverStream::new(rx)).await.unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    let log = c.wait_log("agent session refused", Duration::from_secs(5));
    assert!(
        log.contains(
            "the certificate of host default/host-a was used to speak for host default/host-b"
        ),
        "{log}"
    );
    let b = c.host("host-b").unwrap();
    assert_eq!(b["status"]["provisioning"]["state"], "inspecting");
    assert_eq!(
        b["status"]["agent"],
        serde_json::Value::Null,
        "host-b saw no agent"
    );
}

/// An enrolled agent (or whoever holds its certificate) sending huge and endless log lines:
/// the store and the coordinator's memory stay bounded, the lines kept are cut with a marker,
/// the dropped ones are counted, and /healthz answers within a second throughout.
#[test]
fn a_log_flood_from_an_enrolled_agent_grows_nothing_and_starves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(dir.path(), &[]);
    host_with_image(&c, dir.path(), "host-a");
    let token = c.token("host-a", "10m");
    let state = dir.path().join("agent-a");
    let store = c.state.join("slipway.redb");
    let store_before = fs::metadata(&store).unwrap().len();
    let rss_before = c.rss_kib().unwrap();
    let healthz = format!("{}/healthz", c.http_url());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut worst = Duration::ZERO;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = std::time::Instant::now();
                assert_eq!(slipway_tests::http_get(&healthz).0, 200);
                worst = worst.max(t.elapsed());
                std::thread::sleep(Duration::from_millis(100));
            }
            worst
        })
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let settings = settings(&c, token, &state);
        let id = slipway_agent::session::identity(&settings).await.unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(
            fs::read(state.join("key.der")).unwrap().into(),
        );
        let config = tls::session_config(&id.ca_der, &id.cert_der, key).unwrap();
        let mut client =
            pb::agent_service_client::AgentServiceClient::new(channel(&c, config).await);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(hello("host-a")).await.unwrap();
        let _commands = client.session(ReceiverStream::new(rx)).await.unwrap();
        // 20 lines of 4 MiB (the report's), then 5,000 short ones as fast as they go.
        let big = "x".repeat(4 << 20);
        for i in 0..5020 {
            let message = if i < 20 {
                big.clone()
            } else {
                format!("line {i}")
            };
            let line = pb::AgentEvent {
                event: Some(pb::agent_event::Event::Log(pb::LogLine {
                    level: pb::log_line::Level::Warn as i32,
                    message,
                    command_id: String::new(),
                })),
            };
            if tx.send(line).await.is_err() {
                break;
            }
        }
        // A line after a pause is let through, saying how many were dropped.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let after = pb::AgentEvent {
            event: Some(pb::agent_event::Event::Log(pb::LogLine {
                level: pb::log_line::Level::Warn as i32,
                message: "after the flood".into(),
                command_id: String::new(),
            })),
        };
        tx.send(after).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let worst = watcher.join().unwrap();
    let store_after = fs::metadata(&store).unwrap().len();
    let rss_after = c.rss_kib().unwrap();
    println!(
        "store {store_before} -> {store_after} bytes; RSS {rss_before} -> {rss_after} KiB; worst /healthz {worst:?}"
    );
    assert!(worst < Duration::from_secs(1), "/healthz took {worst:?}");
    assert!(
        store_after < store_before + (4 << 20),
        "the store grew from {store_before} to {store_after} bytes"
    );
    assert!(
        rss_after < rss_before + 100 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
    let h = c.host("host-a").unwrap();
    let events = h["events"].as_array().cloned().unwrap_or_default();
    let logs: Vec<&str> = events
        .iter()
        .filter_map(|e| e["message"].as_str())
        .filter(|m| m.contains("xxxx") || m.contains("line "))
        .collect();
    assert!(logs.len() <= 10, "{} agent log events kept", logs.len());
    assert!(logs.iter().all(|m| m.len() < 4096), "long lines are cut");
    let log = c.log_text();
    assert!(
        log.contains("earlier log lines dropped") && log.contains("after the flood"),
        "dropped lines are counted in the next line kept"
    );
}

/// A machine that is not the one inspected for a host, with a valid certificate for it (a
/// stolen disk image, a copied state directory, a token used elsewhere): its session is
/// refused before it is sent any command or Secret, saying what differs and how to accept a
/// replaced machine, and the host raises it as a possible impostor.
#[test]
fn an_agent_on_other_hardware_than_inspected_gets_no_command() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(dir.path(), &[]);
    let disk = host_with_image(&c, dir.path(), "host-a");
    // The real machine is inspected and provisioned.
    let mut real = Agent::start(
        &c,
        &c.token("host-a", "10m"),
        &disk,
        &dir.path().join("real"),
        &[],
    );
    c.wait_state("host-a", "provisioned", Duration::from_secs(60));
    assert!(real.wait_exit(Duration::from_secs(20)));
    // Another machine enrols for it (with an operator's token: the strongest credential) and
    // describes itself.
    let state = dir.path().join("other");
    let settings = settings(&c, c.token("host-a", "10m"), &state);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status = rt.block_on(async {
        let id = slipway_agent::session::identity(&settings).await.unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(
            fs::read(state.join("key.der")).unwrap().into(),
        );
        let config = tls::session_config(&id.ca_der, &id.cert_der, key).unwrap();
        let mut client =
            pb::agent_service_client::AgentServiceClient::new(channel(&c, config).await);
        let mut hello = hello("host-a");
        if let Some(pb::agent_event::Event::Hello(h)) = &mut hello.event {
            h.inventory = Some(pb::Inventory {
                system: Some(pb::SystemInfo {
                    uuid: "00000000-0000-4000-8000-00000000bad1".into(),
                    serial_number: "IMPOSTOR-1".into(),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(hello).await.unwrap();
        client.session(ReceiverStream::new(rx)).await.unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    let why = status.message();
    assert!(
        why.contains("not the one inspected for host default/host-a")
            && why.contains("00000000-0000-4000-8000-00000000bad1")
            && why.contains("slipway.io/accept-hardware"),
        "{why}"
    );
    let h = c.host("host-a").unwrap();
    assert!(
        h["status"]["possibleImpostor"]["what"]
            .as_str()
            .is_some_and(|w| w.contains("not the one inspected")),
        "{}",
        h["status"]
    );
    assert_eq!(h["status"]["provisioning"]["state"], "provisioned");
}
