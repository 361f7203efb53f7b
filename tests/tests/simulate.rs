//! The load generator against a real coordinator: `slipway-agent simulate-hosts` writes the
//! hosts directory, `slipway-agent simulate` boots, enrols and provisions 20 machines in one
//! process through the coordinator's real HTTP and gRPC interfaces. One host has a wrong
//! checksum: it must fail with an error that says so, while the 19 others are provisioned and
//! their HardwareData is the generated inventory.

use std::fs;
use std::time::{Duration, Instant};

use serde_json::Value;
use slipway_agent::simulate::hardware;
use slipway_tests::{Coordinator, agent_tool, pattern, sha256_hex, wait_until};

const COUNT: u32 = 20;
const BAD: u32 = 19;
const PREFIX: [u8; 3] = [0x52, 0x54, 0x00];

fn name(i: u32) -> String {
    format!("sim-{i:05}")
}

#[test]
fn simulated_machines_are_provisioned_and_a_wrong_checksum_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    // Unknown MACs are refused (the last part checks how the generator takes that).
    // Every simulated machine asks for its boot script from 127.0.0.1: no per-address limit.
    let c = Coordinator::start(
        dir.path(),
        &["--unknown-hosts", "refuse", "--boot-rate", "0"],
    );
    let image = pattern((4 << 20) + 4321, 7);
    fs::write(c.images.join("sim.raw"), &image).unwrap();
    let good = sha256_hex(&image);
    let wrong = sha256_hex(b"some other image");
    let url = c.image_url("sim.raw");
    let hosts = c.hosts.display().to_string();
    let out = agent_tool(&[
        "simulate-hosts",
        "--count",
        &BAD.to_string(),
        "--out",
        &hosts,
        "--image-url",
        &url,
        "--checksum",
        &good,
        "--hosts-per-file",
        "5",
    ]);
    assert!(out.contains("wrote 19 hosts"), "{out}");
    agent_tool(&[
        "simulate-hosts",
        "--count",
        "1",
        "--first-index",
        &BAD.to_string(),
        "--out",
        &hosts,
        "--image-url",
        &url,
        "--checksum",
        &wrong,
    ]);
    let files = fs::read_dir(&c.hosts).unwrap().count();
    assert_eq!(files, 5, "4 files of 5 hosts and 1 of the bad host");

    // The machines boot once the coordinator knows them (else they are refused at first,
    // and retry).
    wait_until(Duration::from_secs(30), "the 20 hosts declared", || {
        (c.hosts().len() == COUNT as usize).then_some(())
    });

    let report = dir.path().join("report.json");
    let mut sim = c.simulate(
        &[
            "--count",
            &COUNT.to_string(),
            "--until",
            "provisioned",
            "--timeout",
            "300s",
            "--heartbeat-seconds",
            "2",
            "--jitter-ms",
            "200",
            "--report",
            &report.display().to_string(),
        ],
        &dir.path().join("simulate.log"),
    );

    // The coordinator's view: 19 provisioned, the bad one failed on its checksum.
    let by_name = |hosts: &[Value], n: &str| -> Value {
        hosts
            .iter()
            .find(|h| h["metadata"]["name"] == n)
            .cloned()
            .unwrap_or(Value::Null)
    };
    let start = Instant::now();
    let hosts = loop {
        let hosts = c.hosts();
        let provisioned = hosts
            .iter()
            .filter(|h| h["status"]["provisioning"]["state"] == "provisioned")
            .count();
        let bad = by_name(&hosts, &name(BAD));
        let failed = bad["status"]["errorMessage"]
            .as_str()
            .is_some_and(|m| m.contains("checksum"));
        if provisioned == BAD as usize && failed {
            break hosts;
        }
        if start.elapsed() > Duration::from_secs(120) {
            let states: Vec<String> = hosts
                .iter()
                .map(|h| {
                    format!(
                        "{} {} {}",
                        h["metadata"]["name"],
                        h["status"]["provisioning"]["state"],
                        h["status"]["errorMessage"]
                    )
                })
                .collect();
            panic!(
                "timed out waiting for 19 provisioned hosts and a checksum error on the 20th:\n{}\n{}",
                states.join("\n"),
                c.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(hosts.len(), COUNT as usize, "{}", c.logs());
    let bad = by_name(&hosts, &name(BAD));
    assert_eq!(bad["status"]["provisioning"]["state"], "provisioning");
    assert_eq!(bad["status"]["errorType"], "provisioning error");
    let message = bad["status"]["errorMessage"].as_str().unwrap();
    assert!(
        message.contains("checksum mismatch")
            && message.contains(&wrong)
            && message.contains(&good),
        "the error names both digests: {message}"
    );

    // Every provisioned host's HardwareData is its generated inventory.
    for i in 0..BAD {
        let mac = hardware::mac_of(PREFIX, i);
        let want = hardware::inventory(i, &mac);
        let hw = &c.hardware_data(&name(i))["spec"]["hardware"];
        let what = format!("{}: {hw}", name(i));
        assert_eq!(
            hw["systemVendor"]["serialNumber"],
            want.system.serial_number.as_deref().unwrap(),
            "{what}"
        );
        assert_eq!(
            hw["systemVendor"]["productName"],
            want.system.product_name.as_deref().unwrap(),
            "{what}"
        );
        assert_eq!(
            hw["cpu"]["model"],
            want.cpu.model.as_deref().unwrap(),
            "{what}"
        );
        assert_eq!(hw["cpu"]["count"], want.cpu.count, "{what}");
        assert_eq!(
            hw["memory"]["totalBytes"], want.memory.total_bytes,
            "{what}"
        );
        let disks: Vec<&str> = hw["storage"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["name"].as_str().unwrap())
            .collect();
        let want_disks: Vec<&str> = want.disks.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(disks, want_disks, "{what}");
        let serials: Vec<&str> = hw["storage"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["serialNumber"].as_str().unwrap())
            .collect();
        let want_serials: Vec<&str> = want
            .disks
            .iter()
            .map(|d| d.serial_number.as_deref().unwrap())
            .collect();
        assert_eq!(serials, want_serials, "{what}");
        let nics = hw["nics"].as_array().unwrap();
        assert_eq!(nics.len(), want.nics.len(), "{what}");
        assert_eq!(nics[0]["mac"], mac.as_str(), "{what}");
        assert_eq!(nics[0]["pxe"], true, "{what}");
        // The root device hint named the first disk, and the image went there.
        let host = by_name(&hosts, &name(i));
        assert_eq!(
            host["spec"]["rootDeviceHints"]["deviceName"],
            want.disks[0].name.as_str(),
            "{what}"
        );
    }

    // The provisioned machines went away after their reboot command: the coordinator sees
    // each session's stream end, and the agent's session returns half a second later (the
    // moment it gives the coordinator to read the result).
    wait_until(Duration::from_secs(30), "19 agents gone", || {
        let gone = c
            .hosts()
            .iter()
            .filter(|h| {
                h["status"]["provisioning"]["state"] == "provisioned"
                    && h["status"]["agent"]["connected"] == false
            })
            .count();
        (gone == BAD as usize).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));

    // The generator's own account: it would give up at its timeout (the bad machine never
    // finishes); it is stopped here, now that the coordinator shows the outcome.
    sim.terminate();
    assert!(
        !sim.wait_exit(Duration::from_secs(30)),
        "the run did not reach its goal, so it fails:\n{}",
        sim.log_text()
    );
    let log = sim.log_text();
    assert!(
        log.contains("19 of 20 machines provisioned")
            && log.contains(&format!("host default/{}", name(BAD)))
            && log.contains("checksum mismatch"),
        "the summary names the machine that did not finish and why:\n{log}"
    );
    let r: Value = serde_json::from_slice(&fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["run"]["reached"], false, "{r}");
    assert_eq!(r["run"]["howItEnded"], "terminated", "{r}");
    let counts = &r["counts"];
    assert_eq!(counts["enrolled"], COUNT, "{r}");
    assert_eq!(counts["connected"], COUNT, "{r}");
    assert_eq!(counts["inspected"], COUNT, "{r}");
    assert_eq!(counts["provisioned"], BAD, "{r}");
    assert_eq!(counts["finished"], BAD, "{r}");
    assert_eq!(counts["imagesVerified"], BAD, "{r}");
    assert!(counts["checksumFailures"].as_u64().unwrap() >= 1, "{r}");
    assert_eq!(counts["commands"]["inspect"], COUNT, "{r}");
    assert_eq!(counts["commands"]["reboot"], BAD, "{r}");
    // Each provisioned machine: inspect -> erase, erase -> write, write -> reboot.
    let after = &r["resultToNextCommand"]["afterSuccess"];
    assert!(
        after["samples"].as_u64().unwrap() >= 3 * u64::from(BAD),
        "{r}"
    );
    assert!(after["p50"].as_f64().unwrap() > 0.0, "{r}");
    assert!(after["max"].as_f64().unwrap() >= after["p99"].as_f64().unwrap());
    assert_eq!(r["startTo"]["provisioned"]["samples"], BAD, "{r}");
    assert_eq!(r["startTo"]["enrolled"]["samples"], COUNT, "{r}");
    let unfinished = r["unfinished"].as_array().unwrap();
    assert_eq!(unfinished.len(), 1, "{r}");
    assert!(unfinished[0].as_str().unwrap().contains(&name(BAD)), "{r}");
    assert!(r["process"]["peakRssMib"].as_f64().unwrap() > 0.0, "{r}");

    // A machine no host declares is refused its boot script, retries, and the run gives up
    // at its timeout, saying so.
    let mut lost = c.simulate(
        &[
            "--count",
            "1",
            "--first-index",
            "4242",
            "--until",
            "connected",
            "--timeout",
            "3s",
            "--jitter-ms",
            "0",
        ],
        &dir.path().join("simulate-unknown.log"),
    );
    let exited_ok = lost.wait_exit(Duration::from_secs(30));
    let log = lost.log_text();
    assert!(!exited_ok, "{log}");
    assert!(
        log.contains("timeout after")
            && log.contains("0 of 1 machines connected")
            && !log.contains("refusals=0 ")
            && log.contains("boot refused: no host has bootMACAddress 52:54:00:00:10:92"),
        "{log}"
    );
}
