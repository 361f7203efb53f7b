//! Automated cleaning through the coordinator: by default (metal3's `metadata` mode) the
//! agent wipes partition tables and signatures, including inside partitions, and leaves the
//! data between them; with the `slipway.io/erase: full` annotation every byte is zeroed.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use slipway_tests::{Agent, Coordinator, pattern, run_tool, run_tool_code, write_doc};

const MIB: u64 = 1 << 20;

fn host(name: &str, disk: &Path, annotation: &str) -> String {
    format!(
        "apiVersion: metal3.io/v1alpha1\nkind: BareMetalHost\nmetadata:\n  name: {name}\n{annotation}spec:\n  online: true\n  rootDeviceHints:\n    deviceName: {}\n",
        disk.display()
    )
}

/// A 64 MiB disk file with a GPT, an ext4 filesystem in partition 1 and data in its middle.
fn old_disk(path: &Path) -> Vec<u8> {
    fs::File::create(path).unwrap().set_len(64 * MIB).unwrap();
    let p = path.display().to_string();
    run_tool(&["sgdisk", "-o", "-n1:2048:+32M", &p]);
    run_tool(&[
        "mkfs.ext4",
        "-q",
        "-F",
        "-E",
        &format!("offset={}", MIB),
        &p,
        "32M",
    ]);
    let data = pattern(MIB as usize, 42);
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&data, 16 * MIB).unwrap();
    let found = run_tool(&["blkid", "-p", "-O", &MIB.to_string(), &p]);
    assert!(
        found.contains("ext4"),
        "the test did not build an ext4: {found}"
    );
    data
}

#[test]
fn metadata_cleaning_wipes_signatures_and_full_erase_zeroes_everything() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(dir.path(), &[]);
    let meta_disk = dir.path().join("meta.img");
    let full_disk = dir.path().join("full.img");
    let data = old_disk(&meta_disk);
    old_disk(&full_disk);
    write_doc(&c.hosts, "meta.yaml", &host("clean-meta", &meta_disk, ""));
    write_doc(
        &c.hosts,
        "full.yaml",
        &host(
            "clean-full",
            &full_disk,
            "  annotations:\n    slipway.io/erase: full\n",
        ),
    );
    c.wait_state("clean-meta", "inspecting", Duration::from_secs(20));
    c.wait_state("clean-full", "inspecting", Duration::from_secs(20));
    let t1 = c.token("clean-meta", "10m");
    let t2 = c.token("clean-full", "10m");
    let _a1 = Agent::start(&c, &t1, &meta_disk, &dir.path().join("agent-meta"), &[]);
    let _a2 = Agent::start(&c, &t2, &full_disk, &dir.path().join("agent-full"), &[]);
    c.wait_state("clean-meta", "available", Duration::from_secs(120));
    c.wait_state("clean-full", "available", Duration::from_secs(120));

    let m = meta_disk.display().to_string();
    assert_eq!(
        run_tool(&["wipefs", "--no-act", &m]).trim(),
        "",
        "signatures survived"
    );
    let code = run_tool_code(&["blkid", "-p", "-O", &MIB.to_string(), &m]);
    assert_eq!(code, 2, "the ext4 inside partition 1 survived");
    let bytes = fs::read(&meta_disk).unwrap();
    assert!(
        bytes[16 * MIB as usize..17 * MIB as usize] == data[..],
        "metadata cleaning touched data between the signatures"
    );
    let describe = String::from_utf8(c.cli(&["describe", "host", "clean-meta"]).stdout).unwrap();
    assert!(
        describe.contains("wiped partition tables and signatures"),
        "{describe}"
    );

    let bytes = fs::read(&full_disk).unwrap();
    assert_eq!(bytes.len(), 64 * MIB as usize);
    assert!(bytes.iter().all(|b| *b == 0), "full erase left data behind");
    let describe = String::from_utf8(c.cli(&["describe", "host", "clean-full"]).stdout).unwrap();
    assert!(describe.contains("erased every byte"), "{describe}");
}
