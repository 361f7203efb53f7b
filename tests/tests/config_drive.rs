//! A host with userData and networkData from Secrets in the hosts directory ends provisioned,
//! and its disk has a `config-2` partition at the end holding that user data. The Secret's
//! contents appear nowhere else: not in the host's status, not in either log, not in the store.
//! A missing Secret is a provisioning error naming host, field and Secret, and the host goes
//! on by itself once the Secret appears.

use std::fs;
use std::time::Duration;

use slipway_tests::{Agent, Coordinator, run_tool, sha256_hex, write_doc};

const MIB: u64 = 1 << 20;
const MARKER: &str = "slipway-secret-marker-6f1d2a";

#[test]
fn host_with_user_data_secret_gets_a_config_drive() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(dir.path(), &[]);
    // The image: 8 MiB with its own GPT (backup header at its end) and one partition.
    let image = c.images.join("os.img");
    fs::File::create(&image).unwrap().set_len(8 * MIB).unwrap();
    run_tool(&[
        "sgdisk",
        "-o",
        "-n1:2048:+4M",
        "-c1:root",
        &image.display().to_string(),
    ]);
    let bytes = fs::read(&image).unwrap();
    let disk = dir.path().join("disk.img");
    fs::File::create(&disk).unwrap().set_len(64 * MIB).unwrap();
    let user_data = format!("#cloud-config\npassword: {MARKER}\n");

    let host = format!(
        "apiVersion: metal3.io/v1alpha1\nkind: BareMetalHost\nmetadata:\n  name: worker-cd\nspec:\n  online: true\n  image:\n    url: {}\n    checksum: {}\n    checksumType: sha256\n    format: raw\n  rootDeviceHints:\n    deviceName: {}\n  userData:\n    name: worker-cd-user-data\n  networkData:\n    name: worker-cd-network\n",
        c.image_url("os.img"),
        sha256_hex(&bytes),
        disk.display()
    );
    write_doc(&c.hosts, "worker-cd.yaml", &host);
    // Network data now; user data only later.
    write_doc(
        &c.hosts,
        "network.yaml",
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: worker-cd-network\nstringData:\n  networkData: |\n    links: [{id: eth0, type: phy}]\n    networks: [{id: n0, link: eth0, type: ipv4_dhcp}]\n    services: []\n",
    );
    c.wait_state("worker-cd", "inspecting", Duration::from_secs(10));
    let token = c.token("worker-cd", "10m");
    let mut agent = Agent::start(&c, &token, &disk, &dir.path().join("agent"), &[]);

    let waiting = c.wait_host(
        "worker-cd",
        Duration::from_secs(120),
        "waiting for its user data Secret",
        |h| h["status"]["errorType"] == "provisioning error",
    );
    let message = waiting["status"]["errorMessage"].as_str().unwrap();
    assert!(
        message.contains("spec.userData")
            && message.contains("worker-cd")
            && message.contains("worker-cd-user-data"),
        "{message}"
    );
    assert_eq!(waiting["status"]["provisioning"]["state"], "provisioning");

    // The Secret arrives (data, base64, as kubectl would write it): provisioning goes on.
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(&user_data);
    write_doc(
        &c.hosts,
        "user-data.yaml",
        &format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: worker-cd-user-data\ndata:\n  value: {encoded}\n"
        ),
    );
    let done = c.wait_state("worker-cd", "provisioned", Duration::from_secs(120));
    assert_eq!(done["status"]["errorCount"], 0);
    assert!(
        agent.wait_exit(Duration::from_secs(20)),
        "agent failed:\n{}",
        agent.log_text()
    );

    // The disk: the image, then a config-2 partition at the very end.
    let d = disk.display().to_string();
    let verify = run_tool(&["sgdisk", "-v", &d]);
    assert!(verify.contains("No problems found"), "{verify}");
    let info = run_tool(&["sgdisk", "-i", "2", &d]);
    assert!(info.contains("'config-2'"), "{info}");
    let last = info
        .lines()
        .find_map(|l| l.strip_prefix("Last sector: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .expect("last sector");
    let first = info
        .lines()
        .find_map(|l| l.strip_prefix("First sector: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .expect("first sector");
    assert_eq!(last, 64 * MIB / 512 - 34, "ends at the last usable sector");
    let written = fs::read(&disk).unwrap();
    assert_eq!(
        written[MIB as usize..8 * MIB as usize - 34 * 512],
        bytes[MIB as usize..8 * MIB as usize - 34 * 512]
    );
    let out = dir.path().join("drive");
    fs::create_dir_all(&out).unwrap();
    run_tool(&[
        "mcopy",
        "-s",
        "-n",
        "-i",
        &format!("{d}@@{}", first * 512),
        "::openstack",
        &out.display().to_string(),
    ]);
    for v in ["latest", "2012-08-10"] {
        let dir = out.join("openstack").join(v);
        assert_eq!(
            fs::read_to_string(dir.join("user_data")).unwrap(),
            user_data
        );
        let nd: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.join("network_data.json")).unwrap()).unwrap();
        assert_eq!(nd["links"][0]["id"], "eth0");
        let md: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.join("meta_data.json")).unwrap()).unwrap();
        assert_eq!(md["name"], "worker-cd");
        assert!(md["uuid"].as_str().is_some_and(|u| u.len() == 36), "{md}");
    }

    // The secret is nowhere but on the disk.
    let status = String::from_utf8(c.cli(&["get", "hosts", "-o", "json"]).stdout).unwrap();
    assert!(
        !status.contains(MARKER),
        "the user data is in the host status"
    );
    assert!(
        status.contains("worker-cd-user-data"),
        "the reference is in the status"
    );
    let describe = String::from_utf8(c.cli(&["describe", "host", "worker-cd"]).stdout).unwrap();
    assert!(!describe.contains(MARKER));
    assert!(
        !c.log_text().contains(MARKER),
        "the coordinator logged the user data"
    );
    assert!(
        !agent.log_text().contains(MARKER),
        "the agent logged the user data"
    );
    let store = fs::read(c.state.join("slipway.redb")).unwrap();
    assert!(
        !store.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()),
        "the user data is in the store"
    );
}

#[test]
fn config_drive_that_cannot_be_added_fails_provisioning_and_wipes_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(dir.path(), &[]);
    // An image without a partition table: nowhere to add a partition.
    let bytes = slipway_tests::pattern(3 * MIB as usize, 9);
    fs::write(c.images.join("bare.img"), &bytes).unwrap();
    let disk = dir.path().join("disk.img");
    fs::File::create(&disk).unwrap().set_len(32 * MIB).unwrap();
    let host = format!(
        "apiVersion: metal3.io/v1alpha1\nkind: BareMetalHost\nmetadata:\n  name: worker-bare\nspec:\n  online: true\n  image:\n    url: {}\n    checksum: {}\n    format: raw\n  rootDeviceHints:\n    deviceName: {}\n  userData:\n    name: ud\n---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: ud\nstringData:\n  userData: \"#cloud-config\\n\"\n",
        c.image_url("bare.img"),
        sha256_hex(&bytes),
        disk.display()
    );
    write_doc(&c.hosts, "worker-bare.yaml", &host);
    c.wait_state("worker-bare", "inspecting", Duration::from_secs(20));
    let token = c.token("worker-bare", "10m");
    let _agent = Agent::start(&c, &token, &disk, &dir.path().join("agent"), &[]);
    let h = c.wait_host(
        "worker-bare",
        Duration::from_secs(120),
        "in provisioning error",
        |h| h["status"]["errorType"] == "provisioning error",
    );
    let message = h["status"]["errorMessage"].as_str().unwrap();
    assert!(
        message.contains("config drive") && message.contains("no partition table"),
        "{message}"
    );
    let written = fs::read(&disk).unwrap();
    assert!(
        written[..MIB as usize].iter().all(|b| *b == 0),
        "the image's first MiB is still on the disk"
    );
}

#[test]
fn network_data_that_does_not_parse_is_a_provisioning_error_naming_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(dir.path(), &[]);
    let image = c.images.join("os.img");
    fs::File::create(&image).unwrap().set_len(4 * MIB).unwrap();
    run_tool(&["sgdisk", "-o", "-n1:2048:+1M", &image.display().to_string()]);
    let bytes = fs::read(&image).unwrap();
    let disk = dir.path().join("disk.img");
    fs::File::create(&disk).unwrap().set_len(32 * MIB).unwrap();
    let host = format!(
        "apiVersion: metal3.io/v1alpha1\nkind: BareMetalHost\nmetadata:\n  name: worker-nd\nspec:\n  online: true\n  image:\n    url: {}\n    checksum: {}\n  rootDeviceHints:\n    deviceName: {}\n  networkData:\n    name: nd\n---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: nd\nstringData:\n  networkData: \"{{links: [{MARKER}\"\n",
        c.image_url("os.img"),
        sha256_hex(&bytes),
        disk.display()
    );
    write_doc(&c.hosts, "worker-nd.yaml", &host);
    c.wait_state("worker-nd", "inspecting", Duration::from_secs(20));
    let token = c.token("worker-nd", "10m");
    let _agent = Agent::start(&c, &token, &disk, &dir.path().join("agent"), &[]);
    let h = c.wait_host(
        "worker-nd",
        Duration::from_secs(120),
        "in provisioning error",
        |h| h["status"]["errorType"] == "provisioning error",
    );
    let message = h["status"]["errorMessage"].as_str().unwrap();
    assert!(
        message.contains("\"nd\"") && message.contains("spec.networkData"),
        "{message}"
    );
    assert!(
        !message.contains(MARKER),
        "the error shows the Secret's contents"
    );
    assert!(!c.log_text().contains(MARKER));
    // Nothing was written: the agent never got the command.
    assert!(fs::read(&disk).unwrap().iter().all(|b| *b == 0));
}
