//! The engine seen from outside, with real agents: hosts named by namespace and name (two
//! namespaces each with a `node-1` and a Secret of the same name, each host provisioned with
//! its own namespace's user data), `/metrics` and `/readyz`, and the provisioning limit
//! (a host waiting for a slot shows it, says why, and goes on when the slot frees).

use std::fs;
use std::path::Path;
use std::time::Duration;

use slipway_tests::{
    Agent, Coordinator, http_get, pattern, run_tool, sha256_hex, throttled_server, write_doc,
};

const MIB: u64 = 1 << 20;

fn host_doc(ns: &str, name: &str, url: &str, sum: &str, disk: &Path, user_data: bool) -> String {
    let user_data = if user_data {
        format!("  userData:\n    name: {name}-user-data\n")
    } else {
        String::new()
    };
    format!(
        "apiVersion: metal3.io/v1alpha1\nkind: BareMetalHost\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  online: true\n  image:\n    url: {url}\n    checksum: {sum}\n    checksumType: sha256\n    format: raw\n  rootDeviceHints:\n    deviceName: {}\n{user_data}",
        disk.display()
    )
}

fn cli_ok(c: &Coordinator, args: &[&str]) -> String {
    let out = c.cli(args);
    assert!(
        out.status.success(),
        "slipway {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The user data on a provisioned disk's config-2 partition (the second GPT partition).
fn user_data_on(disk: &Path, dir: &Path) -> String {
    let d = disk.display().to_string();
    let info = run_tool(&["sgdisk", "-i", "2", &d]);
    let first = info
        .lines()
        .find_map(|l| l.strip_prefix("First sector: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .expect("first sector of config-2");
    let out = dir.join(format!(
        "drive-{}",
        disk.file_name().unwrap().to_string_lossy()
    ));
    fs::create_dir_all(&out).unwrap();
    run_tool(&[
        "mcopy",
        "-n",
        "-i",
        &format!("{d}@@{}", first * 512),
        "::openstack/latest/user_data",
        &out.join("user_data").display().to_string(),
    ]);
    fs::read_to_string(out.join("user_data")).unwrap()
}

#[test]
fn two_namespaces_each_provision_their_node_1_with_their_own_secret() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(dir.path(), &[]);
    let (code, _) = http_get(&format!("{}/readyz", c.http_url()));
    assert_eq!(code, 200, "ready once the hosts directory was read");
    // An image with a partition table, so a config drive can be added.
    let image = c.images.join("os.img");
    fs::File::create(&image).unwrap().set_len(8 * MIB).unwrap();
    run_tool(&["sgdisk", "-o", "-n1:2048:+4M", &image.display().to_string()]);
    let sum = sha256_hex(&fs::read(&image).unwrap());
    let url = c.image_url("os.img");
    let mut agents = Vec::new();
    let mut disks = Vec::new();
    for ns in ["team-a", "team-b"] {
        let disk = dir.path().join(format!("{ns}.disk"));
        fs::File::create(&disk).unwrap().set_len(64 * MIB).unwrap();
        write_doc(
            &c.hosts,
            &format!("{ns}.yaml"),
            &format!(
                "{}---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: node-1-user-data\n  namespace: {ns}\nstringData:\n  userData: \"#cloud-config for {ns}\"\n",
                host_doc(ns, "node-1", &url, &sum, &disk, true)
            ),
        );
        disks.push(disk);
    }
    c.wait_state("team-a/node-1", "inspecting", Duration::from_secs(10));
    c.wait_state("team-b/node-1", "inspecting", Duration::from_secs(10));

    // A bare name that two namespaces have is ambiguous, and the CLI says which they are.
    let out = c.cli(&["describe", "host", "node-1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("team-a, team-b"),
        "{err}"
    );
    let table = cli_ok(&c, &["get", "hosts"]);
    assert!(table.starts_with("NAMESPACE"), "{table}");

    for (ns, disk) in ["team-a", "team-b"].iter().zip(&disks) {
        let token = cli_ok(&c, &["token", "create", "node-1", "-n", ns, "-o", "json"]);
        let token: serde_json::Value = serde_json::from_str(&token).unwrap();
        assert_eq!(token["host"], format!("{ns}/node-1"));
        agents.push(Agent::start(
            &c,
            token["token"].as_str().unwrap(),
            disk,
            &dir.path().join(format!("agent-{ns}")),
            &[],
        ));
    }
    for ns in ["team-a", "team-b"] {
        let h = c.wait_state(
            &format!("{ns}/node-1"),
            "provisioned",
            Duration::from_secs(120),
        );
        assert_eq!(h["metadata"]["namespace"], ns);
        let describe = cli_ok(&c, &["-n", ns, "describe", "host", "node-1"]);
        assert!(
            describe.contains(&format!("Namespace:    {ns}")),
            "{describe}"
        );
        let hd = cli_ok(
            &c,
            &["get", "hardwaredata", &format!("{ns}/node-1"), "-o", "json"],
        );
        let hd: serde_json::Value = serde_json::from_str(&hd).unwrap();
        assert_eq!(hd["metadata"]["namespace"], ns);
    }
    for (ns, disk) in ["team-a", "team-b"].iter().zip(&disks) {
        assert_eq!(
            user_data_on(disk, dir.path()),
            format!("#cloud-config for {ns}"),
            "each host got its own namespace's Secret"
        );
    }

    // The metrics tell the same story.
    let (code, metrics) = http_get(&format!("{}/metrics", c.http_url()));
    assert_eq!(code, 200);
    for want in [
        "slipway_hosts{state=\"provisioned\"} 2",
        "slipway_transitions_total{from=\"provisioning\",to=\"provisioned\"} 2",
        "slipway_agent_sessions ",
        "# TYPE slipway_reconcile_duration_seconds histogram",
        "# TYPE slipway_event_to_durable_seconds histogram",
    ] {
        assert!(metrics.contains(want), "{want} not in:\n{metrics}");
    }
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name).map(str::trim))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} not in:\n{metrics}"))
    };
    assert!(value("slipway_store_commit_duration_seconds_count") > 0.0);
    assert!(
        value("slipway_image_bytes_written_total") >= (2 * 8 * MIB) as f64,
        "{metrics}"
    );
    drop(agents);
}

#[test]
fn a_host_beyond_the_provisioning_limit_waits_shows_why_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(dir.path(), &["--provisioning-limit", "1"]);
    let image = pattern(12 * MIB as usize, 5);
    // About 3 s per write: long enough to see the second host wait.
    let url = throttled_server(image.clone(), 4 * MIB as usize);
    let sum = sha256_hex(&image);
    let mut disks = Vec::new();
    for name in ["first", "second"] {
        let disk = dir.path().join(format!("{name}.disk"));
        fs::write(&disk, vec![0u8; 16 * MIB as usize]).unwrap();
        write_doc(
            &c.hosts,
            &format!("{name}.yaml"),
            &host_doc("default", name, &url, &sum, &disk, false),
        );
        disks.push(disk);
    }
    c.wait_state("first", "inspecting", Duration::from_secs(10));
    let first = Agent::start(
        &c,
        &c.token("first", "10m"),
        &disks[0],
        &dir.path().join("agent-first"),
        &[],
    );
    c.wait_host("first", Duration::from_secs(60), "writing", |h| {
        h["status"]["progress"]["bytesDone"].as_u64().unwrap_or(0) > 0
    });
    let second = Agent::start(
        &c,
        &c.token("second", "10m"),
        &disks[1],
        &dir.path().join("agent-second"),
        &[],
    );
    let waiting = c.wait_host("second", Duration::from_secs(30), "delayed", |h| {
        h["status"]["operationalStatus"] == "delayed"
    });
    assert_eq!(
        waiting["status"]["provisioning"]["state"], "inspecting",
        "it waits in its state, with no command: {waiting}"
    );
    assert!(waiting["status"]["currentCommand"].is_null());
    let table = cli_ok(&c, &["get", "hosts"]);
    let row = table.lines().find(|l| l.starts_with("second")).unwrap();
    assert!(row.contains("waiting for a slot"), "{table}");
    let describe = cli_ok(&c, &["describe", "host", "second"]);
    assert!(
        describe.contains("--provisioning-limit 1"),
        "describe says why: {describe}"
    );
    let (_, metrics) = http_get(&format!("{}/metrics", c.http_url()));
    assert!(metrics.contains("slipway_hosts_delayed 1"), "{metrics}");
    assert!(
        metrics.contains("slipway_provisioning_slots_in_use 1"),
        "{metrics}"
    );
    for name in ["first", "second"] {
        let h = c.wait_state(name, "provisioned", Duration::from_secs(120));
        assert_eq!(h["status"]["operationalStatus"], "OK", "{h}");
    }
    for disk in &disks {
        assert!(fs::read(disk).unwrap()[..image.len()] == image[..]);
    }
    drop((first, second));
}
