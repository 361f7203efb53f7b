//! The inventory against captured and hand-built machines (snapshot tests), against hostile
//! files, against the machine it runs on (`lsblk`, `ip`, `/proc/cpuinfo`), and LLDP over a
//! real veth pair.
//!
//! Snapshots: `agent/tests/fixtures/<machine>/EXPECTED.json`; after a deliberate change, run
//! `UPDATE_EXPECT=1 cargo test -p slipway-agent --test inventory` and review the diff.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use expect_test::expect_file;
use slipway_agent::disk::{Hints, select_root_disk};
use slipway_agent::inventory::{self, Inventory, Options};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn collect(root: &Path) -> Inventory {
    Inventory::collect(
        root,
        &Options {
            boot_mac: Some("52:54:00:00:00:01".into()),
            ..Default::default()
        },
    )
}

fn json(inv: &Inventory) -> String {
    serde_json::to_string_pretty(inv).unwrap() + "\n"
}

/// One fixture: its snapshot, and a capture of it that reads back the same.
fn check(name: &str) -> Inventory {
    let root = fixture(name);
    let inv = collect(&root);
    expect_file![root.join("EXPECTED.json")].assert_eq(&json(&inv));
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("capture");
    let (captured, files) = inventory::capture(
        &root,
        &Options {
            boot_mac: Some("52:54:00:00:00:01".into()),
            ..Default::default()
        },
        &dir,
    )
    .unwrap();
    assert_eq!(captured, inv);
    assert!(files > 10, "{files} files captured");
    assert_eq!(
        collect(&dir),
        inv,
        "a capture of {name} reads back the same"
    );
    inv
}

#[test]
fn inventory_of_the_qemu_guest() {
    let inv = check("qemu-guest");
    assert_eq!(inv.boot_mode, "UEFI");
    assert_eq!(inv.system.serial_number.as_deref(), Some("SLW-QEMU-0001"));
    assert_eq!(inv.numa_nodes.len(), 2);
    assert_eq!(inv.memory.dimms.len(), 1);
    let transports: Vec<_> = inv
        .disks
        .iter()
        .map(|d| (d.name.as_str(), d.transport.as_deref().unwrap_or("?")))
        .collect();
    assert_eq!(
        transports,
        [
            ("/dev/nvme0n1", "nvme"),
            ("/dev/sda", "sata"),
            ("/dev/sdb", "scsi"),
            ("/dev/vda", "virtio")
        ]
    );
    let drivers: Vec<_> = inv
        .nics
        .iter()
        .map(|n| (n.name.as_str(), n.driver.as_deref().unwrap_or("?"), n.pxe))
        .collect();
    assert_eq!(
        drivers,
        [("eth0", "virtio_net", false), ("eth1", "e1000", true)],
        "the boot MAC marks the e1000 port"
    );
}

#[test]
fn inventory_of_the_sas_bond_numa_server() {
    let inv = check("sas-bond-numa");
    assert_eq!(inv.cpu.sockets, Some(2));
    assert_eq!(inv.cpu.cores, Some(4));
    assert_eq!(inv.cpu.threads_per_core, Some(2));
    assert_eq!(inv.numa_nodes[1].cpus, [2, 3, 6, 7]);
    assert_eq!(inv.memory.physical_mib, Some(65536));
    assert_eq!(inv.secure_boot, Some(true));
    let bond = inv.nics.iter().find(|n| n.name == "bond0").unwrap();
    assert_eq!(bond.bond.as_ref().unwrap().members, ["eno1", "eno2"]);
    let eno2 = inv.nics.iter().find(|n| n.name == "eno2").unwrap();
    assert_eq!(eno2.permanent_mac.as_deref(), Some("3c:fd:fe:a1:b2:c1"));
    assert_eq!(
        inv.bmc.as_ref().unwrap().ipv4_address.as_deref(),
        Some("198.51.100.20")
    );
    assert_eq!(inv.pci_devices.iter().filter(|p| p.gpu).count(), 1);

    // Root device hints against the full disk fields.
    let pick = |h: Hints| select_root_disk(&h, &inv.disks, 0).map(|d| d.disk().name.clone());
    let by_path = |p: &str| Hints {
        device_name: Some(format!("/dev/disk/by-path/{p}")),
        ..Default::default()
    };
    assert_eq!(
        pick(by_path(
            "pci-0000:18:00.0-sas-exp0x500056b37789abff-phy5-lun-0"
        ))
        .unwrap(),
        "/dev/sdc"
    );
    assert_eq!(
        pick(by_path("pci-0000:5e:00.0-nvme-1")).unwrap(),
        "/dev/nvme0n1"
    );
    assert_eq!(
        pick(Hints {
            wwn_with_extension: Some("0x600508b1001c7d1a2b3c4d5e6f708192".into()),
            wwn_vendor_extension: Some("0x2b3c4d5e6f708192".into()),
            ..Default::default()
        })
        .unwrap(),
        "/dev/sdc"
    );
    assert_eq!(
        pick(Hints {
            hctl: Some("0:0:1:0".into()),
            rotational: Some(false),
            ..Default::default()
        })
        .unwrap(),
        "/dev/sdb"
    );
    let err = pick(Hints {
        vendor: Some("hitachi".into()),
        min_size_gigabytes: Some(1000),
        ..Default::default()
    })
    .unwrap_err();
    assert!(
        err.0.contains(
            "/dev/sdb (vendor \"TOSHIBA\" does not contain \"hitachi\", size 745.2 GiB < 1000 GiB)"
        ),
        "{err}"
    );
}

#[test]
fn inventory_of_this_kind_of_machine() {
    let inv = check("firecracker-vm");
    assert_eq!(inv.disks.len(), 1);
    assert_eq!(
        inv.disks[0].by_path.as_deref(),
        Some("/dev/disk/by-path/pci-0000:00:02.0")
    );
}

/// Copies a fixture to a scratch directory (symlinks as symlinks).
fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let ty = e.file_type().unwrap();
        if ty.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&src).unwrap(), &dst).unwrap();
        } else if ty.is_dir() {
            copy_tree(&src, &dst);
        } else {
            fs::copy(&src, &dst).unwrap();
        }
    }
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let ty = e.file_type().unwrap();
        if ty.is_dir() {
            files_under(&e.path(), out);
        } else if ty.is_file() {
            out.push(e.path());
        }
    }
}

/// Every file of a real-looking machine, replaced in turn by each hostile value: never a panic,
/// always an inventory, and the field it fed becomes unknown rather than wrong.
#[test]
fn hostile_values_give_unknown_fields_never_a_panic() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("m");
    copy_tree(&fixture("sas-bond-numa"), &root);
    let mut files = Vec::new();
    files_under(&root, &mut files);
    files.retain(|f| !f.ends_with("EXPECTED.json") && !f.ends_with("NOTES.md"));
    assert!(files.len() > 100, "{} files", files.len());
    let hostile: [&[u8]; 6] = [
        b"",
        b"\xff\xfe\xfd not utf-8 \xc3\n",
        b"184467440737095516161844674407370955161600000000000\n",
        b"-1\n",
        b"\0\0\0\0",
        b"0x\n",
    ];
    for f in &files {
        let original = fs::read(f).unwrap();
        for h in hostile {
            fs::write(f, h).unwrap();
            let inv = collect(&root);
            assert!(
                !inv.disks.is_empty() || f.to_string_lossy().contains("block"),
                "{} = {:?} lost every disk",
                f.display(),
                String::from_utf8_lossy(h)
            );
        }
        fs::remove_file(f).unwrap();
        let _ = collect(&root);
        fs::write(f, original).unwrap();
    }

    // Specific fields: unknown, not wrong.
    let put = |rel: &str, v: &[u8]| fs::write(root.join(rel), v).unwrap();
    put("sys/class/dmi/id/sys_vendor", b"\xff\xfe");
    put("sys/firmware/dmi/tables/DMI", b"");
    put(
        "sys/devices/pci0000:17/0000:17:00.0/0000:18:00.0/host0/port-0:0/end_device-0:0/target0:0:0/0:0:0:0/block/sda/size",
        b"99999999999999999999999\n",
    );
    put(
        "sys/devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0/net/eno1/speed",
        b"4294967296\n",
    );
    put(
        "sys/devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0/net/eno1/mtu",
        b"\n",
    );
    put(
        "proc/cpuinfo",
        b"processor : x\ncpu MHz : NaN\nmodel name : \xff\n",
    );
    let inv = collect(&root);
    assert_eq!(inv.system.manufacturer, None);
    assert!(
        inv.disks.iter().all(|d| d.name != "/dev/sda"),
        "a disk of unknown size is no candidate"
    );
    let eno1 = inv.nics.iter().find(|n| n.name == "eno1").unwrap();
    assert_eq!((eno1.speed_mbps, eno1.mtu), (None, None));
    assert_eq!(inv.cpu.frequency_mhz, None);
    assert_eq!(inv.cpu.model, None);
    assert_eq!(inv.memory.physical_mib, None);
    assert!(inv.memory.dimms.is_empty());
}

// ----- the running machine ---------------------------------------------------------------

#[allow(clippy::disallowed_methods)] // reference tools; the failure message carries the command
fn tool(program: &str, args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program} {args:?}: {e} (install util-linux and iproute2)")
        });
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The inventory of this machine agrees with `lsblk -J -b -O`, `ip -j link` and
/// `/proc/cpuinfo`. Needs root for the partition tables, as CI has.
#[test]
fn inventory_of_this_machine_agrees_with_lsblk_ip_and_cpuinfo() {
    let inv = Inventory::collect(Path::new("/"), &Options::default());

    let lsblk = tool("lsblk", &["-J", "-b", "-O"]);
    let mut checked = 0;
    for dev in lsblk["blockdevices"].as_array().unwrap() {
        let kname = dev["kname"].as_str().unwrap();
        let size = dev["size"].as_u64().unwrap_or(0);
        let candidate = dev["type"] == "disk"
            && size > 0
            && !["loop", "ram", "zram", "sr", "md", "dm-", "nbd"]
                .iter()
                .any(|p| kname.starts_with(p));
        let Some(d) = inv.disks.iter().find(|d| d.kernel_name == kname) else {
            assert!(!candidate, "lsblk has disk {kname}; the inventory does not");
            continue;
        };
        assert_eq!(d.size_bytes, size, "{kname} size");
        assert_eq!(
            u64::from(d.logical_block_size),
            dev["log-sec"].as_u64().unwrap(),
            "{kname}"
        );
        assert_eq!(
            u64::from(d.physical_block_size),
            dev["phy-sec"].as_u64().unwrap(),
            "{kname}"
        );
        assert_eq!(
            Some(d.rotational),
            dev["rota"].as_bool(),
            "{kname} rotational"
        );
        assert_eq!(Some(d.read_only), dev["ro"].as_bool(), "{kname} ro");
        assert_eq!(Some(d.removable), dev["rm"].as_bool(), "{kname} removable");
        for (ours, theirs) in [
            (&d.model, "model"),
            (&d.serial_number, "serial"),
            (&d.hctl, "hctl"),
            (&d.vendor, "vendor"),
            (&d.wwn, "wwn"),
            (&d.partition_table, "pttype"),
        ] {
            if let Some(t) = dev[theirs].as_str() {
                assert_eq!(ours.as_deref(), Some(t.trim()), "{kname} {theirs}");
            }
        }
        if let Some(t) = dev["tran"].as_str() {
            assert_eq!(d.transport.as_deref(), Some(t), "{kname} transport");
        }
        let parts = dev["children"]
            .as_array()
            .map(|c| c.iter().filter(|p| p["type"] == "part").count())
            .unwrap_or(0);
        assert_eq!(d.partitions.len(), parts, "{kname} partitions");
        checked += 1;
    }
    assert!(checked > 0, "no disk compared: {lsblk}");

    let links = tool("ip", &["-j", "link"]);
    let mut nics = 0;
    for l in links.as_array().unwrap() {
        let name = l["ifname"].as_str().unwrap();
        let hardware = Path::new("/sys/class/net")
            .join(name)
            .join("device")
            .exists();
        let Some(n) = inv.nics.iter().find(|n| n.name == name) else {
            assert!(!hardware, "ip link has {name}; the inventory does not");
            continue;
        };
        assert_eq!(n.mac.as_deref(), l["address"].as_str(), "{name} mac");
        assert_eq!(n.mtu.map(u64::from), l["mtu"].as_u64(), "{name} mtu");
        // `ip` prints the kernel's permanent address (IFLA_PERM_ADDRESS) only where it
        // differs from the current one; where it does not, a permanent MAC we report must be
        // the current one.
        match l["permaddr"].as_str() {
            Some(p) => assert_eq!(n.permanent_mac.as_deref(), Some(p), "{name} permanent mac"),
            None => {
                if let Some(p) = n.permanent_mac.as_deref() {
                    assert_eq!(Some(p), n.mac.as_deref(), "{name} permanent mac");
                }
            }
        }
        let up = l["operstate"].as_str().map(str::to_ascii_lowercase);
        assert_eq!(n.operstate, up, "{name} operstate");
        nics += 1;
    }
    assert!(nics > 0, "no NIC compared: {links}");

    let addrs = tool("ip", &["-j", "addr"]);
    for l in addrs.as_array().unwrap() {
        let name = l["ifname"].as_str().unwrap();
        let Some(n) = inv.nics.iter().find(|n| n.name == name) else {
            continue;
        };
        let mut theirs: Vec<String> = l["addr_info"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["local"].as_str().unwrap().to_string())
            .collect();
        let mut ours = n.ip_addresses.clone();
        theirs.sort();
        ours.sort();
        assert_eq!(ours, theirs, "{name} addresses");
    }

    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap();
    let field = |k: &str| {
        cpuinfo.lines().find_map(|l| {
            l.split_once(':')
                .filter(|(a, _)| a.trim() == k)
                .map(|(_, v)| v.trim().to_string())
        })
    };
    let count = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    assert_eq!(inv.cpu.count as usize, count);
    assert_eq!(inv.cpu.model, field("model name"));
    assert_eq!(
        inv.cpu.flags.join(" "),
        field("flags")
            .or_else(|| field("Features"))
            .unwrap_or_default()
    );
    let mut packages: Vec<String> = cpuinfo
        .lines()
        .filter(|l| l.starts_with("physical id"))
        .map(str::to_string)
        .collect();
    packages.sort();
    packages.dedup();
    if !packages.is_empty() {
        assert_eq!(inv.cpu.sockets, Some(packages.len() as u32));
    }
    if let Some(cores) = field("cpu cores").and_then(|c| c.parse::<u32>().ok()) {
        assert_eq!(inv.cpu.cores, Some(cores * packages.len().max(1) as u32));
    }
}

// ----- LLDP over a real veth pair ----------------------------------------------------------

struct Veth(String);

impl Drop for Veth {
    #[allow(clippy::disallowed_methods)]
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.0])
            .status();
    }
}

#[allow(clippy::disallowed_methods)]
fn ip(args: &[&str]) {
    let st = std::process::Command::new("ip")
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("cannot run ip {args:?}: {e} (install iproute2)"));
    assert!(st.success(), "ip {args:?} failed (these tests run as root)");
}

/// Sends one frame on an interface through a raw socket.
fn send(ifindex: i32, frame: &[u8]) {
    // SAFETY: plain socket/sendto calls on a socket this function owns; buffers are valid.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&inventory::lldp::LLDP_MULTICAST);
        let n = libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        libc::close(fd);
        assert_eq!(
            n as usize,
            frame.len(),
            "sendto: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[test]
fn lldp_neighbour_heard_over_a_veth_pair() {
    let a = format!("slwl{}a", std::process::id() % 100_000);
    let b = format!("slwl{}b", std::process::id() % 100_000);
    ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
    let _cleanup = Veth(a.clone());
    ip(&["link", "set", &a, "up"]);
    ip(&["link", "set", &b, "up"]);
    let index = |n: &str| {
        fs::read_to_string(format!("/sys/class/net/{n}/ifindex"))
            .unwrap()
            .trim()
            .parse::<i32>()
            .unwrap()
    };
    let (ia, ib) = (index(&a), index(&b));
    let frame = inventory::lldp::frame::switch(
        [0x02, 0x1c, 0x73, 0, 0, 0x01],
        "Ethernet7",
        "tor-test",
        &[(42, "provisioning")],
    );
    let started = std::time::Instant::now();
    let heard = std::thread::scope(|s| {
        let listener =
            s.spawn(|| inventory::lldp::listen(&[(a.clone(), ia)], Duration::from_secs(10)));
        // The listener may not be bound yet: send until it has heard, like a switch would.
        while !listener.is_finished() && started.elapsed() < Duration::from_secs(10) {
            send(ib, &frame);
            std::thread::sleep(Duration::from_millis(100));
        }
        listener.join().unwrap()
    });
    let n = heard
        .get(&a)
        .unwrap_or_else(|| panic!("nothing heard on {a}: {heard:?}"));
    assert_eq!(n.port_id.as_deref(), Some("Ethernet7"));
    assert_eq!(n.system_name.as_deref(), Some("tor-test"));
    assert_eq!(n.port_vlan_id, Some(42));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the listen returns once every interface was heard"
    );
    // A listen with nothing to hear ends on time.
    let t = std::time::Instant::now();
    let none = inventory::lldp::listen(&[(b.clone(), ib)], Duration::from_millis(300));
    assert!(none.is_empty());
    assert!(t.elapsed() < Duration::from_secs(2));
}
