//! metal3's host lifecycle with real coordinator and agent processes on disk files: deleting a
//! provisioned host cleans it before it goes; `paused` freezes a host mid-provisioning;
//! `reboot.metal3.io`, `inspect.metal3.io` and `online` act through the agent; hosts sharing a
//! boot MAC are errors on both and boot neither; Secrets resolve in the host's namespace.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use slipway_tests::{
    Agent, Coordinator, http_get, pattern, run_tool, run_tool_code, sha256_hex, throttled_server,
    write_doc,
};

const MIB: u64 = 1 << 20;

fn doc(name: &str, annotations: &str, spec: &str) -> String {
    let annotations = if annotations.is_empty() {
        String::new()
    } else {
        format!("  annotations:\n{annotations}")
    };
    format!(
        "apiVersion: metal3.io/v1alpha1\nkind: BareMetalHost\nmetadata:\n  name: {name}\n{annotations}spec:\n{spec}"
    )
}

fn image_spec(url: &str, sha: &str, disk: &Path) -> String {
    format!(
        "  online: true\n  image:\n    url: {url}\n    checksum: {sha}\n    checksumType: sha256\n    format: raw\n  rootDeviceHints:\n    deviceName: {}\n",
        disk.display()
    )
}

/// A 16 MiB image with a GPT and an ext4 in partition 1: signatures cleaning must remove.
fn gpt_ext4_image(path: &Path) -> Vec<u8> {
    fs::File::create(path).unwrap().set_len(16 * MIB).unwrap();
    let p = path.display().to_string();
    run_tool(&["sgdisk", "-o", "-n1:2048:+8M", &p]);
    run_tool(&[
        "mkfs.ext4",
        "-q",
        "-F",
        "-E",
        &format!("offset={MIB}"),
        &p,
        "8M",
    ]);
    fs::read(path).unwrap()
}

fn events(c: &Coordinator, name: &str) -> String {
    String::from_utf8(c.cli(&["describe", "host", name]).stdout).unwrap()
}

fn status_of(h: &Value) -> &Value {
    &h["status"]
}

#[test]
fn deleting_a_provisioned_host_cleans_its_disk_before_it_goes() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(dir.path(), &[]);
    let image = gpt_ext4_image(&c.images.join("os.img"));
    let disk = dir.path().join("disk.img");
    fs::File::create(&disk).unwrap().set_len(64 * MIB).unwrap();
    write_doc(
        &c.hosts,
        "w.yaml",
        &doc(
            "w",
            "",
            &image_spec(&c.image_url("os.img"), &sha256_hex(&image), &disk),
        ),
    );
    c.wait_state("w", "inspecting", Duration::from_secs(20));
    let state_dir = dir.path().join("agent");
    let mut agent = Agent::start(&c, &c.token("w", "10m"), &disk, &state_dir, &[]);
    c.wait_state("w", "provisioned", Duration::from_secs(120));
    assert!(
        agent.wait_exit(Duration::from_secs(20)),
        "{}",
        agent.log_text()
    );
    let d = disk.display().to_string();
    assert!(
        run_tool(&["wipefs", "--no-act", &d]).contains("gpt"),
        "the image was not written"
    );

    // The document goes: the host is deprovisioned first, and waits for its agent.
    fs::remove_file(c.hosts.join("w.yaml")).unwrap();
    c.wait_state("w", "deprovisioning", Duration::from_secs(20));
    let table = String::from_utf8(c.cli(&["get", "hosts"]).stdout).unwrap();
    assert!(table.contains("deprovisioning (deleted)"), "{table}");
    assert!(events(&c, "w").contains("WaitingForAgent"));
    // Its machine boots the ramdisk again (same agent identity, as a reboot into the ramdisk
    // would bring with a boot token): it cleans, powers off, and the host is gone.
    let mut agent = Agent::start(&c, "unused", &disk, &state_dir, &[]);
    c.wait_host_gone("w", Duration::from_secs(120));
    assert!(
        agent.wait_exit(Duration::from_secs(20)),
        "{}",
        agent.log_text()
    );
    let log = c.log_text();
    // The last of each (the host was cleaned once before provisioning too).
    let at = |s: &str| {
        log.rfind(s)
            .unwrap_or_else(|| panic!("no {s:?} in the log"))
    };
    assert!(at("provisioned -> deprovisioning") < at("CleaningComplete"));
    assert!(at("CleaningComplete") < at("deprovisioning -> powering off before delete"));
    assert!(at("powering off before delete -> deleting") < at("host removed"));
    // The image's signatures are gone: nothing on the disk looks bootable.
    assert_eq!(
        run_tool(&["wipefs", "--no-act", &d]).trim(),
        "",
        "signatures survived"
    );
    assert_eq!(
        run_tool_code(&["blkid", "-p", "-O", &MIB.to_string(), &d]),
        2,
        "the ext4 survived"
    );
    let bytes = fs::read(&disk).unwrap();
    assert!(
        bytes[512..1024].iter().all(|b| *b == 0),
        "the GPT header survived"
    );

    // A deleted host whose machine never comes back can be dropped by the operator, its
    // disk left as it is.
    let disk2 = dir.path().join("disk2.img");
    fs::File::create(&disk2).unwrap().set_len(64 * MIB).unwrap();
    write_doc(
        &c.hosts,
        "w2.yaml",
        &doc(
            "w2",
            "",
            &image_spec(&c.image_url("os.img"), &sha256_hex(&image), &disk2),
        ),
    );
    c.wait_state("w2", "inspecting", Duration::from_secs(20));
    let mut agent = Agent::start(
        &c,
        &c.token("w2", "10m"),
        &disk2,
        &dir.path().join("a2"),
        &[],
    );
    c.wait_state("w2", "provisioned", Duration::from_secs(120));
    assert!(
        agent.wait_exit(Duration::from_secs(20)),
        "{}",
        agent.log_text()
    );
    let refused = c.cli(&["delete", "host", "w2"]);
    assert!(
        !refused.status.success(),
        "a declared host is deleted by its document"
    );
    fs::remove_file(c.hosts.join("w2.yaml")).unwrap();
    c.wait_state("w2", "deprovisioning", Duration::from_secs(20));
    let out = c.cli(&["delete", "host", "w2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("without cleaning"));
    c.wait_host_gone("w2", Duration::from_secs(10));
    let d2 = disk2.display().to_string();
    assert!(run_tool(&["wipefs", "--no-act", &d2]).contains("gpt"));
}

#[test]
fn a_paused_host_is_left_alone_mid_provisioning_until_the_annotation_goes() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(dir.path(), &[]);
    let image = pattern(6 * MIB as usize, 7);
    let url = throttled_server(image.clone(), MIB as usize);
    let disk = dir.path().join("disk.img");
    fs::File::create(&disk).unwrap().set_len(32 * MIB).unwrap();
    let spec = image_spec(&url, &sha256_hex(&image), &disk);
    write_doc(&c.hosts, "p.yaml", &doc("p", "", &spec));
    c.wait_state("p", "inspecting", Duration::from_secs(20));
    let _agent = Agent::start(&c, &c.token("p", "10m"), &disk, &dir.path().join("a"), &[]);
    c.wait_host("p", Duration::from_secs(120), "writing", |h| {
        h["status"]["provisioning"]["state"] == "provisioning"
            && h["status"]["currentCommand"]["kind"]["type"] == "writeImage"
    });
    write_doc(
        &c.hosts,
        "p.yaml",
        &doc("p", "    baremetalhost.metal3.io/paused: \"\"\n", &spec),
    );
    c.wait_host("p", Duration::from_secs(10), "paused", |h| {
        h["status"]["paused"] == true
    });
    // The agent finishes the write it had; the paused host does not move on.
    let start = Instant::now();
    while fs::read(&disk).unwrap()[..image.len()] != image[..] {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the write never finished"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    let h = c.host("p").unwrap();
    assert_eq!(h["status"]["provisioning"]["state"], "provisioning", "{h}");
    let table = String::from_utf8(c.cli(&["get", "hosts"]).stdout).unwrap();
    assert!(table.contains("provisioning (paused)"), "{table}");
    assert!(events(&c, "p").contains("Paused"));
    // Unpaused: it takes up where it was.
    write_doc(&c.hosts, "p.yaml", &doc("p", "", &spec));
    c.wait_state("p", "provisioned", Duration::from_secs(30));
    assert!(events(&c, "p").contains("Resumed"));
}

#[test]
fn inspect_reboot_and_online_act_through_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(dir.path(), &[]);
    let disk = dir.path().join("disk.img");
    fs::File::create(&disk).unwrap().set_len(16 * MIB).unwrap();
    let spec = |online: bool| {
        format!(
            "  online: {online}\n  rootDeviceHints:\n    deviceName: {}\n",
            disk.display()
        )
    };
    write_doc(&c.hosts, "r.yaml", &doc("r", "", &spec(true)));
    c.wait_state("r", "inspecting", Duration::from_secs(20));
    let state_dir = dir.path().join("agent");
    let mut agent = Agent::start(&c, &c.token("r", "10m"), &disk, &state_dir, &[]);
    let first = c.wait_state("r", "available", Duration::from_secs(120));
    let inspected = first["status"]["operationHistory"]["inspect"]["end"].clone();

    // inspect.metal3.io: inspected again, once.
    write_doc(
        &c.hosts,
        "r.yaml",
        &doc("r", "    inspect.metal3.io: \"\"\n", &spec(true)),
    );
    let again = c.wait_host("r", Duration::from_secs(60), "inspected again", |h| {
        h["status"]["provisioning"]["state"] == "available"
            && h["status"]["operationHistory"]["inspect"]["end"] != inspected
    });
    assert_eq!(
        again["status"]["handledAnnotations"]["inspect.metal3.io"], "",
        "{again}"
    );
    assert!(events(&c, "r").contains("InspectionRequested"));

    // reboot.metal3.io (forced: the host is not provisioned): the agent reboots the machine
    // (a test agent exits instead), once.
    write_doc(
        &c.hosts,
        "r.yaml",
        &doc(
            "r",
            "    reboot.metal3.io: '{\"mode\": \"hard\", \"force\": true}'\n",
            &spec(true),
        ),
    );
    assert!(
        agent.wait_exit(Duration::from_secs(30)),
        "{}",
        agent.log_text()
    );
    assert!(
        agent.log_text().contains("not rebooting"),
        "{}",
        agent.log_text()
    );
    let d = events(&c, "r");
    assert!(d.contains("Rebooting") && d.contains("hard reboot"), "{d}");
    // The machine is back: no second reboot for the same annotation.
    let mut agent = Agent::start(&c, "unused", &disk, &state_dir, &[]);
    c.wait_host("r", Duration::from_secs(30), "connected again", |h| {
        h["status"]["agent"]["connected"] == true
    });
    std::thread::sleep(Duration::from_secs(3));
    assert!(agent.is_running(), "rebooted twice:\n{}", agent.log_text());

    // online: false powers the machine off through its agent; no error.
    write_doc(&c.hosts, "r.yaml", &doc("r", "", &spec(false)));
    assert!(
        agent.wait_exit(Duration::from_secs(30)),
        "{}",
        agent.log_text()
    );
    let off = c.wait_host("r", Duration::from_secs(10), "off", |h| {
        h["status"]["poweredOn"] == false
    });
    assert_eq!(off["status"]["provisioning"]["state"], "available");
    assert!(status_of(&off)["errorType"].is_null(), "{off}");
    // online: true again: Slipway cannot power it on (no BMC driver) and says so, until the
    // machine is powered on by hand and its agent connects.
    write_doc(&c.hosts, "r.yaml", &doc("r", "", &spec(true)));
    let err = c.wait_host("r", Duration::from_secs(10), "a power error", |h| {
        h["status"]["errorType"] == "power management error"
    });
    let message = err["status"]["errorMessage"].as_str().unwrap();
    assert!(message.contains("power it on by hand"), "{message}");
    let _agent = Agent::start(&c, "unused", &disk, &state_dir, &[]);
    let on = c.wait_host("r", Duration::from_secs(30), "on, no error", |h| {
        h["status"]["poweredOn"] == true && h["status"]["errorType"].is_null()
    });
    assert_eq!(on["status"]["provisioning"]["state"], "available");
}

#[test]
fn hosts_sharing_a_boot_mac_are_errors_on_each_and_neither_boots() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(dir.path(), &[]);
    let spec = "  online: true\n  bootMACAddress: 52:54:00:aa:bb:01\n";
    write_doc(&c.hosts, "one.yaml", &doc("one", "", spec));
    write_doc(&c.hosts, "two.yaml", &doc("two", "", spec));
    for (me, other) in [("one", "two"), ("two", "one")] {
        let h = c.wait_host(me, Duration::from_secs(20), "a registration error", |h| {
            h["status"]["errorType"] == "registration error"
        });
        let message = h["status"]["errorMessage"].as_str().unwrap();
        assert!(
            message.contains("spec.bootMACAddress")
                && message.contains(&format!("default/{other}")),
            "{message}"
        );
    }
    let boot = format!("{}/boot/ipxe?mac=52:54:00:aa:bb:01", c.http_url());
    let (code, script) = http_get(&boot);
    assert_eq!(code, 200);
    assert!(
        !script.contains("slipway.token=") && script.contains("all declare bootMACAddress"),
        "{script}"
    );
    // One goes: the other is fine again, and boots.
    fs::remove_file(c.hosts.join("two.yaml")).unwrap();
    c.wait_host("one", Duration::from_secs(20), "clear", |h| {
        h["status"]["errorType"].is_null() && h["status"]["provisioning"]["state"] == "inspecting"
    });
    let (_, script) = http_get(&boot);
    assert!(script.contains("slipway.token="), "{script}");
}

#[test]
fn a_host_declared_in_two_files_keeps_its_declaration_and_names_both() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Coordinator::start(dir.path(), &[]);
    write_doc(&c.hosts, "calm.yaml", &doc("calm", "", "  online: true\n"));
    write_doc(&c.hosts, "b.yaml", &doc("dup", "", "  online: true\n"));
    let first = c.wait_state("dup", "inspecting", Duration::from_secs(20));
    let created = first["metadata"]["creationTimestamp"].clone();
    assert!(created.is_string(), "{first}");
    write_doc(&c.hosts, "a.yaml", &doc("dup", "", "  online: false\n"));
    let h = c.wait_host(
        "dup",
        Duration::from_secs(20),
        "a registration error",
        |h| h["status"]["errorType"] == "registration error",
    );
    let message = h["status"]["errorMessage"].as_str().unwrap();
    assert!(
        message.contains("a.yaml") && message.contains("b.yaml"),
        "{message}"
    );
    assert_eq!(h["spec"]["online"], true, "the last good declaration stays");
    let d = events(&c, "dup");
    assert!(
        d.contains("Problem:") && d.contains("declared 2 times"),
        "{d}"
    );
    // A document that does not parse: describe says why instead of "not found".
    write_doc(
        &c.hosts,
        "broken.yaml",
        &doc("broken", "", "  online: yes please\n"),
    );
    let start = Instant::now();
    let err = loop {
        let out = c.cli(&["describe", "host", "broken"]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        if err.contains("spec.online") || start.elapsed() > Duration::from_secs(10) {
            break err;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        err.contains("broken.yaml") && err.contains("spec.online"),
        "{err}"
    );
    // Resolved: the remaining document takes effect; the creation time never moved.
    fs::remove_file(c.hosts.join("b.yaml")).unwrap();
    let h = c.wait_host(
        "dup",
        Duration::from_secs(20),
        "the a.yaml declaration",
        |h| h["spec"]["online"] == false && h["status"]["errorType"].is_null(),
    );
    assert_eq!(h["metadata"]["creationTimestamp"], created);
    // And across a restart; the host nobody touched never "changed".
    let calm = c.host("calm").unwrap()["metadata"]["creationTimestamp"].clone();
    c.restart();
    let h = c.wait_state("dup", "inspecting", Duration::from_secs(20));
    assert_eq!(h["metadata"]["creationTimestamp"], created);
    let h = c.wait_state("calm", "inspecting", Duration::from_secs(20));
    assert_eq!(h["metadata"]["creationTimestamp"], calm);
    let log = c.log_text();
    assert!(
        !log.lines().any(
            |l| (l.contains("spec changed") || l.contains("annotations changed"))
                && l.contains("host=default/calm")
        ),
        "{log}"
    );
}

#[test]
fn secrets_resolve_in_the_hosts_own_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(dir.path(), &[]);
    let image = c.images.join("os.img");
    fs::File::create(&image).unwrap().set_len(4 * MIB).unwrap();
    run_tool(&["sgdisk", "-o", "-n1:2048:+1M", &image.display().to_string()]);
    let sha = sha256_hex(&fs::read(&image).unwrap());
    let mut agents = Vec::new();
    for ns in ["team-a", "team-b"] {
        let disk = dir.path().join(format!("{ns}.img"));
        fs::File::create(&disk).unwrap().set_len(32 * MIB).unwrap();
        let host = format!(
            "apiVersion: metal3.io/v1alpha1\nkind: BareMetalHost\nmetadata:\n  name: node\n  namespace: {ns}\nspec:\n{}  userData:\n    name: ud\n---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: ud\n  namespace: {ns}\nstringData:\n  userData: \"#cloud-config\\nhostname: marker-of-{ns}\\n\"\n",
            image_spec(&c.image_url("os.img"), &sha, &disk)
        );
        write_doc(&c.hosts, &format!("{ns}.yaml"), &host);
        let key = format!("{ns}/node");
        c.wait_state(&key, "inspecting", Duration::from_secs(20));
        let token = c.token(&key, "10m");
        agents.push(Agent::start(&c, &token, &disk, &dir.path().join(ns), &[]));
    }
    for ns in ["team-a", "team-b"] {
        c.wait_state(
            &format!("{ns}/node"),
            "provisioned",
            Duration::from_secs(120),
        );
    }
    for (ns, other) in [("team-a", "team-b"), ("team-b", "team-a")] {
        let bytes = fs::read(dir.path().join(format!("{ns}.img"))).unwrap();
        let has = |m: &str| bytes.windows(m.len()).any(|w| w == m.as_bytes());
        assert!(
            has(&format!("marker-of-{ns}")),
            "{ns} lacks its own user data"
        );
        assert!(
            !has(&format!("marker-of-{other}")),
            "{ns} got {other}'s user data"
        );
    }
}
