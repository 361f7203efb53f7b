//! What a machine on the provisioning network, or a careless edit, can no longer do: forge a
//! log line, read files outside the images directory through a symlink, delete hosts by
//! emptying their file for a moment, take over a host from its agent with a token from a
//! boot script, fetch an ISO by host name, or grow the coordinator's state and starve it with
//! boot, ISO and discovery floods.

use std::fs;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use slipway_tests::{
    Agent, Coordinator, http_get, http_get_from, sha256_hex, throttled_server, wait_until,
    write_doc,
};

/// The second machine on the network.
const ATTACKER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

/// The MAC of one of this machine's network cards, so that a real agent's inventory has it.
fn real_mac() -> String {
    let mut macs: Vec<String> = fs::read_dir("/sys/class/net")
        .expect("/sys/class/net")
        .flatten()
        .filter(|e| e.path().join("device").exists())
        .filter_map(|e| fs::read_to_string(e.path().join("address")).ok())
        .map(|m| m.trim().to_string())
        .filter(|m| m != "00:00:00:00:00:00")
        .collect();
    macs.sort();
    macs.into_iter()
        .next()
        .expect("this test needs a network card with a device (an eth0)")
}

/// The token in a boot script, if any.
fn script_token(script: &str) -> Option<String> {
    let at = script.find("slipway.token=")? + "slipway.token=".len();
    Some(
        script[at..]
            .split(|c: char| c.is_whitespace())
            .next()?
            .to_string(),
    )
}

const HOST: &str = "apiVersion: metal3.io/v1alpha1\nkind: BareMetalHost\nmetadata:\n  name: a\nspec:\n  online: true\n  bootMACAddress: 52:54:00:00:02:01\n";

#[test]
fn a_forged_log_line_stays_one_escaped_line() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(dir.path(), &[]);
    let forged =
        "2026-12-06T00:00:00.000000Z  INFO slipway_coordinator: agent enrolled host=default/victim";
    let (code, _) = http_get(&format!(
        "{}/boot/ipxe?mac=zz%0A{}%1B%5B31m",
        c.http_url(),
        forged.replace(' ', "%20")
    ));
    assert_eq!(code, 200);
    let log = c.wait_log("boot refused", Duration::from_secs(5));
    assert!(
        !log.lines().any(|l| l.starts_with(forged)),
        "a forged line was written:\n{log}"
    );
    let line = log.lines().find(|l| l.contains("boot refused")).unwrap();
    assert!(
        line.contains("zz\\n2026-12-06"),
        "escaped, on one line: {line}"
    );
    assert!(!log.contains('\u{1b}'), "no ESC reaches the log");
}

#[test]
fn a_symlink_in_the_images_directory_cannot_serve_files_outside_it() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(dir.path(), &[]);
    let key = c.state.join("pki").join("ca.key");
    assert!(key.exists());
    std::os::unix::fs::symlink(&key, c.images.join("ca.key")).unwrap();
    std::os::unix::fs::symlink(c.state.join("slipway.redb"), c.images.join("store.img")).unwrap();
    fs::write(c.images.join("ok.img"), b"fine").unwrap();
    for name in ["ca.key", "store.img"] {
        let (code, body) = http_get(&format!("{}/images/{name}", c.http_url()));
        assert_eq!(code, 403, "{name}: {body}");
        assert!(body.contains("outside the images directory"), "{body}");
        assert!(!body.contains("PRIVATE KEY"));
    }
    let (code, body) = http_get(&format!("{}/images/ok.img", c.http_url()));
    assert_eq!((code, body.as_str()), (200, "fine"));
}

#[test]
fn an_emptied_hosts_file_keeps_its_host_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(dir.path(), &[]);
    write_doc(&c.hosts, "a.yaml", HOST);
    c.wait_state("a", "inspecting", Duration::from_secs(10));
    // A non-atomic save: the file is truncated, and stays so for a few scans.
    fs::write(c.hosts.join("a.yaml"), b"").unwrap();
    std::thread::sleep(Duration::from_secs(4));
    let h = c.host("a").expect("the host is kept");
    assert_eq!(h["status"]["provisioning"]["state"], "inspecting");
    let out = c.cli(&["get", "hosts"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("a.yaml") && err.contains("empty") && err.contains("keeping the 1 host(s)"),
        "{err}"
    );
    // Deleting the file does remove it (two scans later).
    fs::remove_file(c.hosts.join("a.yaml")).unwrap();
    c.wait_log("host no longer declared", Duration::from_secs(10));
}

/// The hijack of the report that opened issue 16, step by step, with real agent processes:
/// the boot script's token is the same on every fetch and none is given while the host's
/// agent works; an enrolment without the boot MAC, and a second enrolment during the write,
/// get no certificate and no command; the impostor is raised on the host; the real agent
/// finishes and the disk holds the image.
#[test]
fn a_machine_asking_for_another_hosts_boot_script_gets_no_host_command_or_secret() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(dir.path(), &["--unknown-hosts", "refuse"]);
    let mac = real_mac();
    // An image with a partition table, so the config drive (with the userData) can be added.
    let image_file = dir.path().join("os.img");
    fs::write(&image_file, slipway_tests::pattern(6 << 20, 11)).unwrap();
    slipway_tests::run_tool(&["sgdisk", "-o", &image_file.display().to_string()]);
    let image = fs::read(&image_file).unwrap();
    // 1 MiB/s: the write takes about 6 s, time for the impostor to try while it runs.
    let url = throttled_server(image.clone(), 1 << 20);
    let disk = dir.path().join("node-a.disk");
    fs::write(&disk, vec![0u8; 16 << 20]).unwrap();
    write_doc(
        &c.hosts,
        "node-a.yaml",
        &format!(
            "apiVersion: metal3.io/v1alpha1\nkind: BareMetalHost\nmetadata:\n  name: node-a\nspec:\n  online: true\n  bootMACAddress: \"{mac}\"\n  image:\n    url: {url}\n    checksum: {}\n    checksumType: sha256\n    format: raw\n  rootDeviceHints:\n    deviceName: {}\n  userData:\n    name: node-a-user-data\n---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: node-a-user-data\nstringData:\n  userData: \"#cloud-config\\nssh_authorized_keys: [ssh-ed25519 AAAAsecret]\\n\"\n",
            sha256_hex(&image),
            disk.display()
        ),
    );
    c.wait_state("node-a", "inspecting", Duration::from_secs(10));
    let boot_url = format!("{}/boot/ipxe?mac={mac}", c.http_url());
    // Anyone may ask; a repeated fetch gets the same token, not a new one.
    let (code, first) = http_get_from(Some(ATTACKER), &boot_url);
    assert_eq!(code, 200, "{first}");
    let token = script_token(&first).expect("a token in the ramdisk script");
    let (_, again) = http_get(&boot_url);
    assert_eq!(script_token(&again).as_deref(), Some(token.as_str()));

    // An impostor with that token that does not say the boot MAC: refused, token unused.
    let mut impostor = Agent::start(&c, &token, &disk, &dir.path().join("impostor-1"), &[]);
    wait_until(Duration::from_secs(20), "the refused agent to exit", || {
        (!impostor.is_running()).then_some(())
    });
    assert!(
        impostor.log_text().contains("did not say which MAC"),
        "{}",
        impostor.log_text()
    );
    // The real machine, with its boot MAC.
    let real_state = dir.path().join("real");
    let mut real = Agent::start(&c, &token, &disk, &real_state, &["--boot-mac", &mac]);
    c.wait_host(
        "node-a",
        Duration::from_secs(60),
        "writing its image",
        |h| {
            h["status"]["provisioning"]["state"] == "provisioning"
                && h["status"]["currentCommand"]["kind"]["type"] == "writeImage"
        },
    );
    // While it writes, a boot script carries no token...
    let (code, during) = http_get_from(Some(ATTACKER), &boot_url);
    assert_eq!(code, 200);
    assert!(script_token(&during).is_none(), "{during}");
    assert!(during.contains("connected"), "{during}");
    // ...and a second enrolment (even with an operator's token) is refused, and raised.
    let second = c.token("node-a", "10m");
    let mut impostor = Agent::start(
        &c,
        &second,
        &dir.path().join("impostor.disk"),
        &dir.path().join("impostor-2"),
        &["--boot-mac", &mac],
    );
    wait_until(Duration::from_secs(20), "the refused agent to exit", || {
        (!impostor.is_running()).then_some(())
    });
    let log = impostor.log_text();
    assert!(log.contains("while its agent from"), "{log}");
    assert!(
        !log.contains("AAAAsecret") && !log.contains("write_image") && !log.contains("writing")
    );
    assert!(!dir.path().join("impostor-2").join("agent.crt").exists());
    let h = c.host("node-a").unwrap();
    let alert = &h["status"]["possibleImpostor"];
    assert!(
        alert["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{alert}"
    );
    let describe =
        String::from_utf8_lossy(&c.cli(&["describe", "host", "node-a"]).stdout).into_owned();
    assert!(describe.contains("PossibleImpostor"), "{describe}");
    // The real agent was not displaced: it finishes, and the disk holds the image.
    c.wait_state("node-a", "provisioned", Duration::from_secs(60));
    assert!(real.wait_exit(Duration::from_secs(30)));
    // The image's data (its partition table was extended by the config drive).
    let written = fs::read(&disk).unwrap();
    assert!(
        written[1 << 20..5 << 20] == image[1 << 20..5 << 20],
        "the disk holds the image"
    );
    // Provisioned: the machine boots its disk, and no token is given.
    let (_, after) = http_get_from(Some(ATTACKER), &boot_url);
    assert!(script_token(&after).is_none(), "{after}");
}

/// Times a request from this machine while a flood comes from the attacker's address.
fn timed(what: &str, f: impl FnOnce() -> bool) -> Duration {
    let t = Instant::now();
    assert!(f(), "{what} failed during the flood");
    let took = t.elapsed();
    println!(
        "{what}: {:.1} ms during the flood",
        took.as_secs_f64() * 1e3
    );
    assert!(took < Duration::from_secs(1), "{what} took {took:?}");
    took
}

/// Boot scripts by random MAC (discovery), ISOs by host name and by guessed capability, from
/// one address, bounded in count and time: the attacker is rate-limited (429) past a burst,
/// discovered hosts stay within the limit, no ISO is made, and /healthz, a legitimate boot
/// and an enrolment from another address answer within a second throughout.
#[test]
fn boot_iso_and_discovery_floods_are_limited_and_starve_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(
        dir.path(),
        &["--unknown-hosts", "discover", "--discovered-limit", "50"],
    );
    write_doc(&c.hosts, "a.yaml", HOST);
    c.wait_state("a", "inspecting", Duration::from_secs(10));
    let http = c.http_url();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let counts = std::sync::Arc::new(std::sync::Mutex::new(
        std::collections::BTreeMap::<u16, u32>::new(),
    ));
    let flood: Vec<_> = (0..4)
        .map(|t| {
            let (stop, counts, http) = (stop.clone(), counts.clone(), http.clone());
            std::thread::spawn(move || {
                let start = Instant::now();
                let mut i = 0u32;
                // At most 1,500 requests a thread, at most 8 s.
                while !stop.load(std::sync::atomic::Ordering::Relaxed)
                    && i < 1500
                    && start.elapsed() < Duration::from_secs(8)
                {
                    let path = match i % 3 {
                        0 => format!(
                            "/boot/ipxe?mac=02:00:{t:02x}:00:{:02x}:{:02x}",
                            i >> 8,
                            i & 0xff
                        ),
                        1 => "/boot/iso/a.iso".to_string(),
                        _ => format!("/boot/iso/{}.iso", "G".repeat(43)),
                    };
                    let (code, _) = http_get_from(Some(ATTACKER), &format!("{http}{path}"));
                    *counts.lock().unwrap().entry(code).or_default() += 1;
                    i += 1;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut worst = Duration::ZERO;
    for _ in 0..3 {
        worst = worst.max(timed("/healthz", || {
            http_get(&format!("{http}/healthz")).0 == 200
        }));
        worst = worst.max(timed("a legitimate boot", || {
            let (code, script) = http_get(&format!("{http}/boot/ipxe?mac=52:54:00:00:02:01"));
            code == 200 && script_token(&script).is_some()
        }));
        std::thread::sleep(Duration::from_millis(300));
    }
    // An enrolment: a real agent gets its certificate and session.
    let disk = dir.path().join("a.disk");
    fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
    let t = Instant::now();
    let _agent = Agent::start(
        &c,
        &c.token("a", "10m"),
        &disk,
        &dir.path().join("agent"),
        &[],
    );
    wait_until(Duration::from_secs(10), "the agent's session", || {
        c.host("a")
            .filter(|h| h["status"]["agent"]["connected"] == true)
    });
    println!(
        "enrolment to session: {:.0} ms during the flood",
        t.elapsed().as_secs_f64() * 1e3
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for f in flood {
        f.join().unwrap();
    }
    let counts = counts.lock().unwrap().clone();
    println!("flood answers by status: {counts:?}; worst legitimate answer {worst:?}");
    assert!(counts.get(&429).copied().unwrap_or(0) > 0, "{counts:?}");
    assert!(counts.get(&200).copied().unwrap_or(0) <= 40, "{counts:?}");
    let discovered = c
        .hosts()
        .iter()
        .filter(|h| {
            h["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("discovered-"))
        })
        .count();
    assert!(discovered <= 50, "{discovered} discovered hosts");
    // The operator removes one; a declared host is refused, naming its file.
    let one = c
        .hosts()
        .iter()
        .filter_map(|h| h["metadata"]["name"].as_str().map(str::to_string))
        .find(|n| n.starts_with("discovered-"))
        .expect("a discovered host");
    let out = c.cli(&["delete", "host", &one]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until(Duration::from_secs(5), "the discovered host to go", || {
        c.host(&one).is_none().then_some(())
    });
    let out = c.cli(&["delete", "host", "a"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("a.yaml"), "{err}");
    assert!(
        fs::read_dir(c.state.join("iso")).unwrap().count() == 0,
        "no ISO was made by the flood"
    );
}

/// An ISO is made for one boot by the operator (`slipway boot iso`), at an unguessable URL
/// served with Range; by host name there is none.
#[test]
fn isos_are_capability_urls_made_by_the_operator() {
    let dir = tempfile::tempdir().unwrap();
    let boot = dir.path().join("boot");
    fs::create_dir_all(&boot).unwrap();
    let mut template = vec![0u8; 256 << 10];
    template[4096..4096 + 23].copy_from_slice(b"@@SLIPWAY_KERNEL_ARGS@@");
    template[4096 + 23..4096 + 23 + 1024].fill(b'#');
    fs::write(boot.join("slipway.iso"), &template).unwrap();
    let boot_dir = boot.display().to_string();
    let c = Coordinator::start(dir.path(), &["--boot-dir", &boot_dir]);
    write_doc(&c.hosts, "a.yaml", HOST);
    c.wait_state("a", "inspecting", Duration::from_secs(10));
    for path in ["/boot/iso/a.iso", "/boot/iso/default/a.iso"] {
        let (code, body) = http_get(&format!("{}{path}", c.http_url()));
        assert_eq!(code, 404, "{path}: {body}");
    }
    let out = c.cli(&["boot", "iso", "a", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let made: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let url = made["url"].as_str().unwrap();
    let path = &url[url.find("/boot/iso/").unwrap()..];
    let (code, body) = http_get(&format!("{}{path}", c.http_url()));
    assert_eq!(code, 200);
    assert!(
        body.contains("slipway.token=") && body.contains("BOOTIF=01-52-54-00-00-02-01"),
        "the host's kernel arguments"
    );
    // Asking again for the same boot gives the same ISO; the boot script shares its token.
    let again: serde_json::Value =
        serde_json::from_slice(&c.cli(&["boot", "iso", "a", "-o", "json"]).stdout).unwrap();
    assert_eq!(again["url"], made["url"]);
    let (_, script) = http_get(&format!("{}/boot/ipxe?mac=52:54:00:00:02:01", c.http_url()));
    assert!(body.contains(&format!("slipway.token={}", script_token(&script).unwrap())));
    // A Range request, as a BMC's virtual media reads.
    let mut s = std::net::TcpStream::connect(c.http_url().trim_start_matches("http://")).unwrap();
    use std::io::{Read, Write};
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nRange: bytes=4096-4118\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 206"), "{out}");
    assert!(out.ends_with("\r\n\r\nslipway.coordinator=htt"), "{out}");
}
