//! Crash consistency: the coordinator SIGKILLs itself (`SLIPWAY_FAILPOINT`) at each point
//! between a plan and its effects, is started again, and every host still ends provisioned,
//! with its image written once; and an agent whose connection drops mid-write reconnects,
//! reports, and the disk is written once.

use std::fs;
use std::time::Duration;

use slipway_tests::{Agent, Coordinator, Proxy, pattern, sha256_hex, throttled_server, write_doc};

const MIB: usize = 1 << 20;

fn hosts_doc(names: &[&str], disks: &[String], image: Option<(&str, &str)>) -> String {
    names
        .iter()
        .zip(disks)
        .map(|(name, disk)| {
            let image = image
                .map(|(url, sum)| {
                    format!(
                        "  image:\n    url: {url}\n    checksum: {sum}\n    checksumType: sha256\n    format: raw\n"
                    )
                })
                .unwrap_or_default();
            format!(
                "apiVersion: metal3.io/v1alpha1\nkind: BareMetalHost\nmetadata:\n  name: {name}\nspec:\n  online: true\n{image}  rootDeviceHints:\n    deviceName: {disk}\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// How many write-image commands the agent ran (a command id runs once; a second id would
/// write the disk again).
fn writes(agent: &Agent) -> usize {
    agent.log_text().matches("running write-image").count()
}

/// Two hosts become available; then both get their image in one edit, so both write-image
/// commands are planned, stored and sent in the same batch; the coordinator dies at `point`,
/// having sent `sent_before` of them.
fn crash_at(point: &str, sent_before: usize) {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Coordinator::start_with_env(
        dir.path(),
        &["--retry-base", "1s"],
        &[("SLIPWAY_FAILPOINT", point)],
    );
    let image = pattern(8 * MIB, 3);
    fs::write(c.images.join("os.img"), &image).unwrap();
    let names = ["h1", "h2"];
    let disks: Vec<String> = names
        .iter()
        .map(|n| {
            let d = dir.path().join(format!("{n}.disk"));
            fs::File::create(&d)
                .unwrap()
                .set_len((image.len() + 16 * MIB) as u64)
                .unwrap();
            d.display().to_string()
        })
        .collect();
    write_doc(&c.hosts, "hosts.yaml", &hosts_doc(&names, &disks, None));
    for n in names {
        c.wait_state(n, "inspecting", Duration::from_secs(10));
    }
    let agents: Vec<Agent> = names
        .iter()
        .zip(&disks)
        .map(|(n, d)| {
            Agent::start(
                &c,
                &c.token(n, "10m"),
                std::path::Path::new(d),
                &dir.path().join(format!("agent-{n}")),
                &[],
            )
        })
        .collect();
    for n in names {
        c.wait_state(n, "available", Duration::from_secs(60));
    }
    let url = c.image_url("os.img");
    let sum = sha256_hex(&image);
    write_doc(
        &c.hosts,
        "hosts.yaml",
        &hosts_doc(&names, &disks, Some((&url, &sum))),
    );
    assert!(
        c.wait_exit(Duration::from_secs(30)),
        "the coordinator never reached {point}\n{}",
        c.logs()
    );
    assert!(
        c.log_text().contains(&format!(
            "failpoint {}",
            point.split(['@', ':']).next().unwrap()
        )),
        "{}",
        c.logs()
    );
    assert_eq!(
        c.log_text().matches("sending write-image").count(),
        sent_before,
        "{}",
        c.logs()
    );
    c.restart_clean();
    for n in names {
        let h = c.wait_state(n, "provisioned", Duration::from_secs(90));
        assert_eq!(h["status"]["errorCount"], 0, "{n}: {h}");
    }
    for (agent, disk) in agents.iter().zip(&disks) {
        assert_eq!(
            writes(agent),
            1,
            "the disk was written once: {}",
            agent.log_text()
        );
        assert!(fs::read(disk).unwrap()[..image.len()] == image[..]);
    }
}

#[test]
fn killed_after_the_write_commands_are_stored_before_they_are_sent() {
    crash_at("engine-after-commit@write-image", 0);
}

#[test]
fn killed_mid_batch_before_the_write_commands_are_stored() {
    crash_at("store-before-commit@write-image", 0);
}

#[test]
fn killed_between_two_sends_of_one_batch() {
    crash_at("engine-mid-act@write-image", 1);
}

/// The agent's connection to the coordinator breaks while it writes: it reconnects through
/// the same (cut) path, reports, and the host is provisioned with the disk written once.
#[test]
fn an_agent_whose_connection_drops_mid_write_reconnects_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(dir.path(), &[]);
    let proxy = Proxy::start(format!("127.0.0.1:{}", c.grpc_port).parse().unwrap());
    let image = pattern(24 * MIB, 4);
    let url = throttled_server(image.clone(), 6 * MIB); // about 4 s
    let disk = dir.path().join("disk.img");
    fs::write(&disk, vec![0u8; 32 * MIB]).unwrap();
    let d = disk.display().to_string();
    write_doc(
        &c.hosts,
        "h.yaml",
        &hosts_doc(&["h"], &[d], Some((&url, &sha256_hex(&image)))),
    );
    c.wait_state("h", "inspecting", Duration::from_secs(10));
    let agent = Agent::start_at(
        &c,
        &proxy.url(),
        &c.token("h", "10m"),
        &disk,
        &dir.path().join("agent"),
        &[],
    );
    c.wait_host("h", Duration::from_secs(60), "writing its image", |h| {
        h["status"]["progress"]["bytesDone"].as_u64().unwrap_or(0) > 0
    });
    proxy.cut();
    let h = c.wait_state("h", "provisioned", Duration::from_secs(60));
    assert_eq!(h["status"]["errorCount"], 0, "{h}");
    assert_eq!(writes(&agent), 1, "{}", agent.log_text());
    assert!(fs::read(&disk).unwrap()[..image.len()] == image[..]);
    let log = c.log_text();
    assert!(
        log.matches("agent session started").count() >= 2,
        "the agent reconnected: {log}"
    );
    assert_eq!(
        log.matches("sending write-image").count(),
        1,
        "the hello said the write was running, so it was not sent again: {log}"
    );
}
