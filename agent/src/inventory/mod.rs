//! The machine's hardware, read from the kernel's own interfaces under a root path (`/` on a
//! real machine, a captured tree in tests).
//!
//! Every field is best effort: a missing, empty or unreadable file gives an empty or `None`
//! field, never a failed inventory.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Everything the agent reports about the machine.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Inventory {
    pub system: SystemInfo,
    pub cpu: Cpu,
    pub memory: Memory,
    pub disks: Vec<Disk>,
    pub nics: Vec<Nic>,
    /// "UEFI" or "legacy".
    pub boot_mode: String,
    pub hostname: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SystemInfo {
    pub manufacturer: String,
    pub product_name: String,
    pub serial_number: String,
    pub uuid: String,
    pub bios_vendor: String,
    pub bios_version: String,
    pub bios_date: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cpu {
    pub model: String,
    pub architecture: String,
    pub count: u32,
    pub frequency_mhz: u32,
    pub flags: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Memory {
    pub total_bytes: u64,
    /// Installed memory from SMBIOS; 0 when unknown.
    pub physical_mib: u64,
}

/// A disk that could hold the OS.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Disk {
    /// `/dev/sda`, or the path the agent was given (a loop device, a plain file).
    pub name: String,
    /// Other names of the same disk (by-path, by-id).
    pub alternate_names: Vec<String>,
    pub size_bytes: u64,
    pub rotational: bool,
    /// "HDD", "SSD", "NVME" (metal3's types), or "FILE" for a plain file.
    pub kind: String,
    pub model: String,
    pub vendor: String,
    pub serial_number: String,
    pub wwn: String,
    pub wwn_with_extension: String,
    pub wwn_vendor_extension: String,
    pub hctl: String,
    pub logical_block_size: u32,
    pub physical_block_size: u32,
    pub read_only: bool,
    pub removable: bool,
    /// The kernel's name (`sda`), to find partitions; empty for plain files.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kernel_name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Nic {
    pub name: String,
    pub mac: String,
    pub mtu: u32,
    pub driver: String,
    pub speed_mbps: u32,
    pub has_carrier: bool,
    pub ip_addresses: Vec<String>,
    /// The interface the host booted from.
    pub pxe: bool,
}

/// What to collect beyond the root path itself.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Disks given by the operator (loop devices, plain files). When any are given, they are the
    /// only disks: the machine's own disks are not listed, so they cannot be chosen.
    pub disks: Vec<PathBuf>,
    /// MAC of the interface the host booted from.
    pub boot_mac: Option<String>,
}

impl Inventory {
    /// Collects the inventory of the machine whose `/sys` and `/proc` are under `root`.
    pub fn collect(root: &Path, opts: &Options) -> Inventory {
        let live = root == Path::new("/");
        Inventory {
            system: system(root),
            cpu: cpu(root, live),
            memory: memory(root),
            disks: if opts.disks.is_empty() {
                disks(root)
            } else {
                opts.disks.iter().map(|p| explicit_disk(root, p)).collect()
            },
            nics: nics(root, live, opts.boot_mac.as_deref()),
            boot_mode: if root.join("sys/firmware/efi").exists() {
                "UEFI".into()
            } else {
                "legacy".into()
            },
            hostname: read(&root.join("proc/sys/kernel/hostname")).unwrap_or_default(),
        }
    }
}

/// Reads a small text file, trimmed; `None` when missing, unreadable or empty.
pub fn read(path: &Path) -> Option<String> {
    let bytes = fs::read(path).ok()?;
    let s = String::from_utf8_lossy(&bytes).trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn read_u64(path: &Path) -> Option<u64> {
    read(path)?.parse().ok()
}

fn system(root: &Path) -> SystemInfo {
    let d = root.join("sys/class/dmi/id");
    let f = |n: &str| read(&d.join(n)).unwrap_or_default();
    SystemInfo {
        manufacturer: f("sys_vendor"),
        product_name: f("product_name"),
        serial_number: f("product_serial"),
        uuid: f("product_uuid"),
        bios_vendor: f("bios_vendor"),
        bios_version: f("bios_version"),
        bios_date: f("bios_date"),
    }
}

fn cpu(root: &Path, live: bool) -> Cpu {
    let text = read(&root.join("proc/cpuinfo")).unwrap_or_default();
    let mut cpu = Cpu {
        architecture: std::env::consts::ARCH.into(),
        ..Default::default()
    };
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        match k {
            "processor" => cpu.count += 1,
            "model name" if cpu.model.is_empty() => cpu.model = v.into(),
            "flags" | "Features" if cpu.flags.is_empty() => {
                cpu.flags = v.split_whitespace().map(str::to_string).collect();
            }
            "cpu MHz" if cpu.frequency_mhz == 0 => {
                cpu.frequency_mhz = v.parse::<f64>().map(|f| f.round() as u32).unwrap_or(0);
            }
            _ => {}
        }
    }
    if live && (cpu.model.is_empty() || cpu.frequency_mhz == 0) {
        // Architectures whose cpuinfo lacks these (e.g. arm64): ask sysinfo.
        let Ok(mut sys) = sysinfo::System::new() else {
            return cpu;
        };
        sys.refresh_cpu_all();
        if let Some(c) = sys.cpus().first() {
            if cpu.model.is_empty() {
                cpu.model = c.brand().to_string();
            }
            if cpu.frequency_mhz == 0 {
                cpu.frequency_mhz = u32::try_from(c.frequency()).unwrap_or(0);
            }
        }
    }
    cpu
}

fn memory(root: &Path) -> Memory {
    let text = read(&root.join("proc/meminfo")).unwrap_or_default();
    let total_kib = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    Memory {
        total_bytes: total_kib.saturating_mul(1024),
        physical_mib: 0,
    }
}

/// Kernel block devices that cannot hold an OS install.
fn skipped_block(name: &str) -> bool {
    ["loop", "ram", "zram", "dm-", "md", "sr", "fd", "nbd"]
        .iter()
        .any(|p| name.starts_with(p))
}

fn disks(root: &Path) -> Vec<Disk> {
    let Ok(entries) = fs::read_dir(root.join("sys/block")) else {
        return Vec::new();
    };
    let mut out: Vec<Disk> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if skipped_block(&name) {
                return None;
            }
            let disk = block_disk(
                root,
                &root.join("sys/block").join(&name),
                &name,
                format!("/dev/{name}"),
            );
            (disk.size_bytes > 0).then_some(disk)
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// A disk the operator named: a block device (read from sysfs) or a plain file.
fn explicit_disk(root: &Path, path: &Path) -> Disk {
    let name = path.display().to_string();
    match fs::metadata(path) {
        Ok(meta) if meta.file_type().is_block_device() => {
            let (major, minor) = (
                nix::sys::stat::major(meta.rdev()),
                nix::sys::stat::minor(meta.rdev()),
            );
            let sys = root.join(format!("sys/dev/block/{major}:{minor}"));
            let kernel = fs::canonicalize(&sys)
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_default();
            block_disk(root, &sys, &kernel, name)
        }
        Ok(meta) => Disk {
            name,
            size_bytes: meta.len(),
            kind: "FILE".into(),
            model: "plain file".into(),
            logical_block_size: 512,
            physical_block_size: 512,
            read_only: meta.permissions().readonly(),
            ..Default::default()
        },
        Err(_) => Disk {
            name,
            kind: "FILE".into(),
            ..Default::default()
        },
    }
}

fn block_disk(root: &Path, sys: &Path, kernel_name: &str, name: String) -> Disk {
    let attr = |rel: &str| read(&sys.join(rel)).unwrap_or_default();
    let rotational = read(&sys.join("queue/rotational")).as_deref() == Some("1");
    let kind = if kernel_name.starts_with("nvme") {
        "NVME"
    } else if rotational {
        "HDD"
    } else {
        "SSD"
    };
    let wwid = attr("device/wwid");
    let wwn = read(&sys.join("device/wwn")).unwrap_or_else(|| {
        wwid.strip_prefix("naa.")
            .map(|w| format!("0x{w}"))
            .unwrap_or_default()
    });
    let hctl = fs::read_link(sys.join("device"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .filter(|n| n.split(':').count() == 4 && n.split(':').all(|p| p.parse::<u32>().is_ok()))
        .unwrap_or_default();
    Disk {
        alternate_names: alternate_names(root, kernel_name, &name),
        name,
        size_bytes: read_u64(&sys.join("size")).unwrap_or(0).saturating_mul(512),
        rotational,
        kind: kind.into(),
        model: attr("device/model"),
        vendor: attr("device/vendor"),
        serial_number: read(&sys.join("device/serial")).unwrap_or_default(),
        wwn: wwn.clone(),
        wwn_with_extension: wwn,
        wwn_vendor_extension: String::new(),
        hctl,
        logical_block_size: read_u64(&sys.join("queue/logical_block_size")).unwrap_or(512) as u32,
        physical_block_size: read_u64(&sys.join("queue/physical_block_size")).unwrap_or(512) as u32,
        read_only: read(&sys.join("ro")).as_deref() == Some("1"),
        removable: read(&sys.join("removable")).as_deref() == Some("1"),
        kernel_name: kernel_name.to_string(),
    }
}

/// `/dev/disk/by-*` links that point at the device, where udev made them.
fn alternate_names(root: &Path, kernel_name: &str, name: &str) -> Vec<String> {
    let mut out = Vec::new();
    if kernel_name.is_empty() {
        return out;
    }
    for dir in ["by-path", "by-id"] {
        let Ok(entries) = fs::read_dir(root.join("dev/disk").join(dir)) else {
            continue;
        };
        for e in entries.filter_map(Result::ok) {
            let target = fs::read_link(e.path()).ok();
            if target
                .as_ref()
                .and_then(|t| t.file_name())
                .is_some_and(|t| t == kernel_name)
            {
                let alt = format!("/dev/disk/{dir}/{}", e.file_name().to_string_lossy());
                if alt != name {
                    out.push(alt);
                }
            }
        }
    }
    out.sort();
    out
}

fn nics(root: &Path, live: bool, boot_mac: Option<&str>) -> Vec<Nic> {
    let Ok(entries) = fs::read_dir(root.join("sys/class/net")) else {
        return Vec::new();
    };
    let addresses = if live { ip_addresses() } else { Vec::new() };
    let mut out: Vec<Nic> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let dir = root.join("sys/class/net").join(&name);
            // Physical interfaces only (as IPA does): they have a device.
            if !dir.join("device").exists() {
                return None;
            }
            let mac = read(&dir.join("address")).unwrap_or_default();
            let driver = fs::read_link(dir.join("device/driver"))
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_default();
            let speed = read(&dir.join("speed"))
                .and_then(|s| s.parse::<i64>().ok())
                .filter(|s| *s > 0);
            Some(Nic {
                pxe: boot_mac.is_some_and(|b| b.eq_ignore_ascii_case(&mac)),
                ip_addresses: addresses
                    .iter()
                    .filter(|(n, _)| n == &name)
                    .map(|(_, a)| a.clone())
                    .collect(),
                name,
                mac,
                mtu: read_u64(&dir.join("mtu")).unwrap_or(0) as u32,
                driver,
                speed_mbps: speed.map_or(0, |s| s as u32),
                has_carrier: read(&dir.join("carrier")).as_deref() == Some("1"),
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// (interface, address) pairs of the running machine.
fn ip_addresses() -> Vec<(String, String)> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|a| {
            let addr = a.address?;
            let ip = if let Some(v4) = addr.as_sockaddr_in() {
                std::net::IpAddr::V4(v4.ip())
            } else {
                std::net::IpAddr::V6(addr.as_sockaddr_in6()?.ip())
            };
            Some((a.interface_name, ip.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    #[test]
    fn reads_a_small_tree() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        put(
            r,
            "proc/cpuinfo",
            "processor\t: 0\nmodel name\t: Test CPU\ncpu MHz\t\t: 2399.9\nflags\t\t: fpu sse2\n\nprocessor\t: 1\nmodel name\t: Test CPU\n",
        );
        put(
            r,
            "proc/meminfo",
            "MemTotal:        2048000 kB\nMemFree: 1 kB\n",
        );
        put(r, "proc/sys/kernel/hostname", "box\n");
        put(r, "sys/class/dmi/id/sys_vendor", "QEMU\n");
        put(r, "sys/block/vda/size", "41943040\n");
        put(r, "sys/block/vda/queue/rotational", "0\n");
        put(r, "sys/block/vda/device/serial", "disk-1\n");
        put(r, "sys/block/loop0/size", "100\n");
        put(r, "sys/block/sdb/size", "0\n");
        put(r, "sys/class/net/eth0/address", "52:54:00:12:34:56\n");
        put(r, "sys/class/net/eth0/mtu", "1500\n");
        put(r, "sys/class/net/eth0/speed", "-1\n");
        fs::create_dir_all(r.join("sys/class/net/eth0/device")).unwrap();
        put(r, "sys/class/net/lo/address", "00:00:00:00:00:00\n");
        let inv = Inventory::collect(
            r,
            &Options {
                boot_mac: Some("52:54:00:12:34:56".into()),
                ..Default::default()
            },
        );
        assert_eq!(inv.cpu.count, 2);
        assert_eq!(inv.cpu.model, "Test CPU");
        assert_eq!(inv.cpu.frequency_mhz, 2400);
        assert_eq!(inv.cpu.flags, ["fpu", "sse2"]);
        assert_eq!(inv.memory.total_bytes, 2048000 * 1024);
        assert_eq!(inv.hostname, "box");
        assert_eq!(inv.system.manufacturer, "QEMU");
        assert_eq!(inv.boot_mode, "legacy");
        assert_eq!(
            inv.disks.len(),
            1,
            "loop and empty devices are not root disk candidates"
        );
        assert_eq!(inv.disks[0].name, "/dev/vda");
        assert_eq!(inv.disks[0].size_bytes, 20 << 30);
        assert_eq!(inv.disks[0].kind, "SSD");
        assert_eq!(inv.disks[0].serial_number, "disk-1");
        assert_eq!(inv.nics.len(), 1);
        assert!(inv.nics[0].pxe);
        assert_eq!(inv.nics[0].speed_mbps, 0);
    }

    #[test]
    fn empty_root_gives_empty_inventory_not_an_error() {
        let t = tempfile::tempdir().unwrap();
        let inv = Inventory::collect(t.path(), &Options::default());
        assert_eq!(inv.cpu.count, 0);
        assert!(inv.disks.is_empty() && inv.nics.is_empty());
    }

    #[test]
    fn explicit_plain_file_is_the_only_disk() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("disk.img");
        fs::write(&f, vec![0u8; 4096]).unwrap();
        let inv = Inventory::collect(
            Path::new("/"),
            &Options {
                disks: vec![f.clone()],
                ..Default::default()
            },
        );
        assert_eq!(inv.disks.len(), 1);
        assert_eq!(inv.disks[0].name, f.display().to_string());
        assert_eq!(inv.disks[0].size_bytes, 4096);
        assert_eq!(inv.disks[0].kind, "FILE");
    }
}
