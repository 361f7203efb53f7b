//! Config drives written by the agent, read back by other implementations: `sgdisk -v` and
//! `sfdisk` check the partition tables, `blkid` sees a `vfat` labelled `config-2`, `fsck.vfat`
//! finds the filesystem clean, mtools copies the files out, and cloud-init's own ConfigDrive
//! datasource (`DataSourceConfigDrive.read_config_drive`, Debian package `cloud-init`) reads
//! them; every file is compared with what was given. This machine's kernel has no vfat
//! module, so the drive is read with mtools rather than mounted.
//!
//! Needs root (loop devices) and the tools of `.ci/run`.

mod common;

use std::fs;
use std::path::Path;

use common::*;
use serde_json::Value;
use slipway_agent::configdrive::{self, ConfigDrive};
use slipway_agent::disk::FileDisk;

const USER_DATA: &str = "#cloud-config\nhostname: worker-7\npassword: s3cret-in-user-data\nruncmd:\n  - [touch, /tmp/slipway]\n";
const NETWORK_DATA: &str = r#"{"links":[{"id":"eth0","type":"phy","ethernet_mac_address":"52:54:00:12:34:56"}],"networks":[{"id":"n0","link":"eth0","type":"ipv4_dhcp"}],"services":[]}"#;

fn drive() -> ConfigDrive {
    let meta =
        serde_json::json!({"public_keys": {"default": "ssh-ed25519 AAAAC3Nza test@slipway"}});
    let meta = configdrive::complete_meta_data(
        meta.as_object().unwrap().clone(),
        "6c559874-f3ce-48b6-b377-c99d878edbac",
        "worker-7",
    );
    ConfigDrive {
        user_data: Some(USER_DATA.as_bytes().to_vec()),
        network_data: Some(NETWORK_DATA.as_bytes().to_vec()),
        meta_data: serde_json::to_vec(&meta).unwrap(),
    }
}

/// Python that loads a config drive directory with cloud-init's own datasource code.
const READER: &str = r#"
import json, sys
from cloudinit.sources.DataSourceConfigDrive import read_config_drive
r = read_config_drive(sys.argv[1])
ud = r.get("userdata")
if isinstance(ud, bytes):
    ud = ud.decode()
print(json.dumps({"version": r["version"], "metadata": r["metadata"],
                  "userdata": ud, "networkdata": r.get("networkdata")}, default=str))
"#;

/// Copies the drive's files out of the partition with mtools and reads them with cloud-init.
fn read_back(disk: &Path, offset: u64, dir: &Path) -> Value {
    let out = dir.join("drive");
    fs::create_dir_all(&out).unwrap();
    let image = format!("{}@@{offset}", disk.display());
    run(&[
        "mcopy",
        "-s",
        "-n",
        "-i",
        &image,
        "::openstack",
        &out.display().to_string(),
    ]);
    // Every file is there, byte for byte, under both versions.
    for v in configdrive::VERSIONS {
        let d = out.join("openstack").join(v);
        assert_eq!(fs::read_to_string(d.join("user_data")).unwrap(), USER_DATA);
        assert_eq!(
            fs::read_to_string(d.join("network_data.json")).unwrap(),
            NETWORK_DATA
        );
        assert_eq!(
            fs::read(d.join("meta_data.json")).unwrap(),
            drive().meta_data
        );
    }
    let python = if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3" // Debian's, where the cloud-init package lives
    } else {
        "python3"
    };
    let json = run(&[python, "-c", READER, &out.display().to_string()]);
    serde_json::from_str(&json).unwrap_or_else(|e| panic!("cloud-init said {json}: {e}"))
}

fn check_cloud_init(r: &Value) {
    assert_eq!(r["version"], 2);
    assert_eq!(r["userdata"], USER_DATA);
    let nd: Value = serde_json::from_str(NETWORK_DATA).unwrap();
    assert_eq!(r["networkdata"], nd);
    let md = &r["metadata"];
    assert_eq!(md["uuid"], "6c559874-f3ce-48b6-b377-c99d878edbac");
    assert_eq!(md["hostname"], "worker-7");
    assert_eq!(md["name"], "worker-7");
    assert_eq!(
        md["public_keys"]["default"],
        "ssh-ed25519 AAAAC3Nza test@slipway"
    );
}

/// blkid's view of the partition: (TYPE, LABEL).
fn blkid(dev: &str, offset: u64, len: u64) -> (String, String) {
    let (o, l) = (offset.to_string(), len.to_string());
    let get = |tag: &str| {
        run(&[
            "blkid", "-p", "-o", "value", "-s", tag, "-O", &o, "-S", &l, dev,
        ])
        .trim()
        .to_string()
    };
    (get("TYPE"), get("LABEL"))
}

#[test]
fn config_drive_after_a_gpt_image_is_read_by_cloud_init() {
    let dir = tempfile::tempdir().unwrap();
    // The "image": 96 MiB with a GPT (backup header at its own end) and one partition.
    let image = dir.path().join("image.raw");
    sparse(&image, 96 * MIB);
    let i = image.display().to_string();
    run(&["sgdisk", "-o", "-n1:2048:+64M", "-c1:root", &i]);
    let img = fs::read(&image).unwrap();
    // Written onto a 256 MiB disk, as the image writer leaves it.
    let file = dir.path().join("disk.img");
    sparse(&file, 256 * MIB);
    write_at(&file, 0, &img);
    write_at(&file, 30 * MIB, &pattern(4096, 3)); // image data that must survive

    let dev = LoopDevice::new(&file);
    let target = select(&dev.path);
    let mut w = FileDisk::open(&target).unwrap();
    let placed = configdrive::write_config_drive(&target, &mut w, &drive(), 96 * MIB).unwrap();
    drop(w);
    assert_eq!(placed.number, 2);
    assert!(placed.start >= 96 * MIB, "{placed}");
    assert_eq!(
        placed.start + placed.len,
        256 * MIB - 512 - 16384,
        "{placed}"
    );

    let f = file.display().to_string();
    let verify = run(&["sgdisk", "-v", &f]);
    assert!(verify.contains("No problems found"), "{verify}");
    let table = run(&["sgdisk", "-p", &f]);
    assert!(
        table.contains("config-2") && table.contains("root"),
        "{table}"
    );
    assert_eq!(
        blkid(&dev.name(), placed.start, placed.len),
        ("vfat".to_string(), "config-2".to_string())
    );
    let part = LoopDevice::window(&file, placed.start, placed.len);
    run(&["fsck.vfat", "-n", &part.name()]);
    drop(part);
    assert_eq!(read_at(&file, 30 * MIB, 4096), pattern(4096, 3));

    check_cloud_init(&read_back(&file, placed.start, dir.path()));
}

#[test]
fn config_drive_subcommand_on_an_mbr_image() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    sparse(&file, 128 * MIB);
    let f = file.display().to_string();
    run_stdin(
        &["sfdisk", "-q", &f],
        "label: dos\nstart=2048, size=65536, type=83\n",
    );
    let user = dir.path().join("user-data");
    fs::write(&user, USER_DATA).unwrap();
    let network = dir.path().join("network.yaml");
    // YAML is accepted and written as JSON.
    fs::write(
        &network,
        "links:\n- {id: eth0, type: phy, ethernet_mac_address: '52:54:00:12:34:56'}\nnetworks:\n- {id: n0, link: eth0, type: ipv4_dhcp}\nservices: []\n",
    )
    .unwrap();
    let meta = dir.path().join("meta.json");
    fs::write(
        &meta,
        r#"{"public_keys": {"default": "ssh-ed25519 AAAAC3Nza test@slipway"}}"#,
    )
    .unwrap();
    let out = run(&[
        env!("CARGO_BIN_EXE_slipway-agent"),
        "config-drive",
        &f,
        "--user-data",
        &user.display().to_string(),
        "--network-data",
        &network.display().to_string(),
        "--meta-data",
        &meta.display().to_string(),
        "--hostname",
        "worker-7",
        "--uuid",
        "6c559874-f3ce-48b6-b377-c99d878edbac",
    ]);
    assert!(out.contains("config-2 partition 2"), "{out}");
    let dump = run(&["sfdisk", "-J", &f]);
    let j: Value = serde_json::from_str(&dump).unwrap();
    let parts = j["partitiontable"]["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 2, "{dump}");
    assert_eq!(parts[1]["type"], "c");
    let start = parts[1]["start"].as_u64().unwrap() * 512;
    let len = parts[1]["size"].as_u64().unwrap() * 512;
    assert_eq!(
        start + len,
        128 * MIB,
        "the config drive is at the end of the disk"
    );
    assert_eq!(
        blkid(&f, start, len),
        ("vfat".to_string(), "config-2".to_string())
    );
    // The meta data was completed the same way; compare through cloud-init (the network data
    // went YAML -> JSON, so compare it as JSON).
    let outdir = dir.path().join("drive");
    fs::create_dir_all(&outdir).unwrap();
    run(&[
        "mcopy",
        "-s",
        "-n",
        "-i",
        &format!("{f}@@{start}"),
        "::openstack",
        &outdir.display().to_string(),
    ]);
    let python = if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    let r: Value =
        serde_json::from_str(&run(&[python, "-c", READER, &outdir.display().to_string()])).unwrap();
    check_cloud_init(&r);
}
