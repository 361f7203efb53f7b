//! The full inventory reaches the coordinator: `slipway get hardwaredata` gives the agent's
//! inventory as a metal3 HardwareData document, `describe` summarises it, and it survives a
//! coordinator restart.

use std::fs;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use slipway_agent::inventory::{Inventory, Options};
use slipway_tests::{Agent, Coordinator, pattern, sha256_hex, write_host};

fn text(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "slipway failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn hardware_data_is_stored_shown_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Coordinator::start(dir.path(), &[]);
    let image = pattern(1 << 20, 3);
    fs::write(c.images.join("os.img"), &image).unwrap();
    let disk = dir.path().join("disk.img");
    fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
    write_host(
        &c.hosts,
        "hw",
        &c.image_url("os.img"),
        &sha256_hex(&image),
        &disk.display().to_string(),
    );
    c.wait_state("hw", "inspecting", Duration::from_secs(10));

    let missing = c.cli(&["get", "hardwaredata", "hw"]);
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("has no hardware data yet"),
        "{missing:?}"
    );

    let _agent = Agent::start(
        &c,
        &c.token("hw", "10m"),
        &disk,
        &dir.path().join("agent"),
        &[],
    );
    c.wait_state("hw", "provisioned", Duration::from_secs(60));

    let here = Inventory::collect(
        Path::new("/"),
        &Options {
            disks: vec![disk.clone()],
            ..Default::default()
        },
    );
    let doc: Value =
        serde_json::from_str(&text(&c.cli(&["get", "hardwaredata", "hw", "-o", "json"]))).unwrap();
    assert_eq!(doc["apiVersion"], "metal3.io/v1alpha1");
    assert_eq!(doc["kind"], "HardwareData");
    assert_eq!(doc["metadata"]["name"], "hw");
    let hw = &doc["spec"]["hardware"];
    assert_eq!(hw["cpu"]["count"], here.cpu.count);
    assert_eq!(
        hw["cpu"]["flags"].as_array().unwrap().len(),
        here.cpu.flags.len()
    );
    assert_eq!(hw["memory"]["totalBytes"], here.memory.total_bytes);
    assert_eq!(
        hw["pciDevices"].as_array().map_or(0, Vec::len),
        here.pci_devices.len()
    );
    assert_eq!(hw["storage"][0]["name"], disk.display().to_string());
    let nics: Vec<&str> = hw["nics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    let expected: Vec<&str> = here.nics.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(nics, expected);
    // The metal3 summary in the status agrees with it.
    let host = c.host("hw").unwrap();
    assert_eq!(host["status"]["hardware"]["cpu"]["count"], here.cpu.count);

    let yaml = text(&c.cli(&["get", "hardwaredata", "hw", "-o", "yaml"]));
    assert!(
        yaml.starts_with("apiVersion: metal3.io/v1alpha1\nkind: HardwareData\n"),
        "{yaml}"
    );
    let table = text(&c.cli(&["get", "hardwaredata"]));
    assert!(
        table.starts_with("NAME") && table.contains("\nhw "),
        "{table}"
    );
    let describe = text(&c.cli(&["describe", "host", "hw"]));
    assert!(describe.contains("(full inventory from "), "{describe}");
    assert!(describe.contains("  PCI:         "), "{describe}");

    c.kill9();
    c.restart();
    c.wait_state("hw", "provisioned", Duration::from_secs(20));
    let again: Value =
        serde_json::from_str(&text(&c.cli(&["get", "hardwaredata", "hw", "-o", "json"]))).unwrap();
    assert_eq!(
        again["spec"], doc["spec"],
        "the stored record survives a restart"
    );
}
