//! A host goes from a YAML file to `provisioned`, and a wrong checksum leaves the disk
//! unbootable with a readable error. Real coordinator and agent processes, real mutual TLS.

use std::fs;
use std::time::Duration;

use slipway_tests::{Agent, Coordinator, LoopDevice, pattern, sha256_hex, write_host};

const MIB: usize = 1 << 20;

#[test]
fn host_from_yaml_reaches_provisioned_and_the_disk_holds_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(dir.path(), &[]);
    let image = pattern(9 * MIB + 12345, 1); // not a multiple of anything convenient
    fs::write(c.images.join("os.img"), &image).unwrap();
    let disk = dir.path().join("disk.img");
    fs::write(&disk, pattern(32 * MIB, 99)).unwrap(); // an "old OS" to be replaced
    write_host(
        &c.hosts,
        "worker-0",
        &c.image_url("os.img"),
        &sha256_hex(&image),
        &disk.display().to_string(),
    );
    c.wait_state("worker-0", "inspecting", Duration::from_secs(10));

    let token = c.token("worker-0", "10m");
    let mut agent = Agent::start(&c, &token, &disk, &dir.path().join("agent"), &[]);
    let host = c.wait_state("worker-0", "provisioned", Duration::from_secs(60));

    let written = fs::read(&disk).unwrap();
    assert_eq!(written.len(), 32 * MIB, "the disk file was not resized");
    assert!(
        written[..image.len()] == image[..],
        "the bytes on the disk differ from the image"
    );
    // Inspection reported the only disk the agent was given.
    let storage = host["status"]["hardware"]["storage"].as_array().unwrap();
    assert_eq!(storage.len(), 1);
    assert_eq!(storage[0]["name"], disk.display().to_string());
    assert_eq!(storage[0]["sizeBytes"], 32 * MIB);
    assert!(host["status"]["hardware"]["cpu"]["count"].as_u64().unwrap() >= 1);
    assert_eq!(host["status"]["errorCount"], 0);
    assert_eq!(host["status"]["poweredOn"], true);
    // The agent is not the ramdisk's init, so it reports the reboot and exits instead.
    assert!(
        agent.wait_exit(Duration::from_secs(20)),
        "agent failed:\n{}",
        agent.log_text()
    );
    assert!(agent.log_text().contains("not rebooting"));

    // The table and the description show it.
    let out = c.cli(&["get", "hosts"]);
    let table = String::from_utf8(out.stdout).unwrap();
    let row = table.lines().find(|l| l.starts_with("worker-0")).unwrap();
    assert!(
        row.contains("provisioned") && row.contains("true"),
        "{table}"
    );
    let out = c.cli(&["describe", "host", "worker-0"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("ProvisioningComplete"), "{text}");
    assert!(text.contains("sha256 verified"), "{text}");
}

#[test]
fn wrong_checksum_is_a_provisioning_error_and_the_disk_cannot_boot() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(dir.path(), &[]);
    let image = pattern(6 * MIB, 2);
    fs::write(c.images.join("os.img"), &image).unwrap();
    let disk = LoopDevice::new(&dir.path().join("disk.raw"), 64 * MIB as u64);
    // A previous OS's boot sector must not survive either.
    disk.write_at(0, &pattern(MIB, 7));
    let wrong = sha256_hex(b"not the image");
    let url = c.image_url("os.img");
    write_host(
        &c.hosts,
        "worker-1",
        &url,
        &wrong,
        &disk.path.display().to_string(),
    );
    c.wait_state("worker-1", "inspecting", Duration::from_secs(10));

    let token = c.token("worker-1", "10m");
    let _agent = Agent::start(&c, &token, &disk.path, &dir.path().join("agent"), &[]);
    let host = c.wait_host(
        "worker-1",
        Duration::from_secs(60),
        "in provisioning error",
        |h| h["status"]["errorType"] == "provisioning error",
    );
    let status = &host["status"];
    assert_eq!(
        status["provisioning"]["state"], "provisioning",
        "not provisioned"
    );
    assert_eq!(status["operationalStatus"], "error");
    let message = status["errorMessage"].as_str().unwrap();
    assert!(message.contains(&url), "names the URL: {message}");
    assert!(
        message.contains(&wrong),
        "names the expected digest: {message}"
    );
    assert!(
        message.contains(&sha256_hex(&image)),
        "names the actual digest: {message}"
    );
    assert!(
        message.contains(&disk.path.display().to_string()),
        "names the device: {message}"
    );

    let head = disk.read(MIB);
    assert_ne!(
        head,
        image[..MIB],
        "the image's first MiB must not be on the disk"
    );
    assert!(
        head.iter().all(|b| *b == 0),
        "the first MiB is wiped, not left with old data"
    );
    // The rest of the image was streamed and then wiped at both ends; nothing bootable remains.
    let out = c.cli(&["get", "hosts"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("provisioning error"));
}
