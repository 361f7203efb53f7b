//! The coordinator is SIGKILLed mid-provisioning and started again: the host still ends
//! `provisioned`, never stuck without a message.

use std::fs;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use slipway_tests::{Agent, Coordinator, pattern, sha256_hex, throttled_server, write_host};

const MIB: usize = 1 << 20;

/// The image comes from another server: the agent keeps writing while the coordinator is
/// down, and reports the finished command when it reconnects.
#[test]
fn coordinator_killed_while_the_agent_writes_resumes_to_provisioned() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Coordinator::start(dir.path(), &[]);
    let image = pattern(24 * MIB, 8);
    let url = throttled_server(image.clone(), 6 * MIB); // about 4 s
    let disk = dir.path().join("disk.img");
    fs::write(&disk, vec![0u8; 32 * MIB]).unwrap();
    write_host(
        &c.hosts,
        "h",
        &url,
        &sha256_hex(&image),
        &disk.display().to_string(),
    );
    c.wait_state("h", "inspecting", Duration::from_secs(10));
    let _agent = Agent::start(
        &c,
        &c.token("h", "10m"),
        &disk,
        &dir.path().join("agent"),
        &[],
    );

    c.wait_host("h", Duration::from_secs(60), "writing its image", |h| {
        h["status"]["progress"]["bytesDone"].as_u64().unwrap_or(0) > 0
    });
    c.kill9();
    std::thread::sleep(Duration::from_secs(1));
    c.restart();
    let h = c.wait_state("h", "provisioned", Duration::from_secs(60));
    assert_eq!(
        h["status"]["errorCount"], 0,
        "no error: the agent finished while the coordinator was away"
    );
    assert!(fs::read(&disk).unwrap()[..image.len()] == image[..]);
    let log = c.log_text();
    assert_eq!(
        log.matches("agent session started").count(),
        2,
        "the agent reconnected once: {log}"
    );
    assert_eq!(
        log.matches("sending write-image").count(),
        1,
        "the agent's hello said the write was running (or done), so it was not sent again: {log}"
    );
}

/// The image comes from the coordinator itself: the kill breaks the download, the agent
/// reports the failure on reconnect, and the retry provisions the host.
#[test]
fn coordinator_killed_while_serving_the_image_retries_to_provisioned() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Coordinator::start(dir.path(), &["--retry-base", "1s"]);
    // Large enough that the write is still going when the kill lands: the agent writes about
    // 800 MiB/s here, so a 64 MiB image was done (in 0.09 s) before a status poll saw it start.
    let image = pattern(640 * MIB, 9);
    fs::write(c.images.join("os.img"), &image).unwrap();
    let disk = dir.path().join("disk.img");
    fs::File::create(&disk)
        .unwrap()
        .set_len((image.len() + 16 * MIB) as u64)
        .unwrap();
    write_host(
        &c.hosts,
        "h",
        &c.image_url("os.img"),
        &sha256_hex(&image),
        &disk.display().to_string(),
    );
    c.wait_state("h", "inspecting", Duration::from_secs(10));
    let _agent = Agent::start(
        &c,
        &c.token("h", "10m"),
        &disk,
        &dir.path().join("agent"),
        &[],
    );

    // Killed once the agent's writes have reached 32 MiB into the disk: mid-download, with
    // most of the image still to come (the first MiB is held back until the end).
    let started = Instant::now();
    let mut probe = [0u8; 4096];
    let disk_file = fs::File::open(&disk).unwrap();
    loop {
        disk_file
            .read_exact_at(&mut probe, 32 * MIB as u64)
            .unwrap();
        if probe.iter().any(|b| *b != 0) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the agent never wrote 32 MiB into the disk\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    c.kill9();
    assert!(
        fs::read(&disk).unwrap()[..image.len()] != image[..],
        "the write was finished before the kill; the test did not interrupt a download"
    );
    c.restart();
    let h = c.wait_host(
        "h",
        Duration::from_secs(90),
        "provisioned, or in a clear error",
        |h| {
            h["status"]["provisioning"]["state"] == "provisioned"
                || !h["status"]["errorMessage"]
                    .as_str()
                    .unwrap_or("")
                    .is_empty()
        },
    );
    if h["status"]["provisioning"]["state"] != "provisioned" {
        // A clear error is acceptable on the way; the retry must still get there.
        let msg = h["status"]["errorMessage"].as_str().unwrap();
        assert!(msg.contains("os.img"), "the error names the image: {msg}");
        c.wait_state("h", "provisioned", Duration::from_secs(90));
    }
    assert!(fs::read(&disk).unwrap()[..image.len()] == image[..]);
}
