//! Disks that can hold the OS: `/sys/block`, with stable names computed from the sysfs device
//! path the way udev's `path_id` does (the ramdisk has no udev), and the partition table read
//! from the first sectors of the device.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::root::Root;

/// A disk that could hold the OS.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Disk {
    /// `/dev/sda`, or the path the agent was given (a loop device, a plain file).
    pub name: String,
    /// The stable `/dev/disk/by-path/...` name, computed from sysfs as udev would.
    pub by_path: Option<String>,
    /// Every other name of the disk: by-path (compatibility forms), by-id, wwn.
    pub alternate_names: Vec<String>,
    pub size_bytes: u64,
    pub logical_block_size: u32,
    pub physical_block_size: u32,
    pub rotational: bool,
    /// "HDD", "SSD", "NVME" (metal3's types), or "FILE" for a plain file.
    #[serde(rename = "type")]
    pub kind: String,
    /// How it is attached: sata, sas, nvme, virtio, usb, scsi, fc, iscsi, mmc.
    pub transport: Option<String>,
    pub model: Option<String>,
    pub vendor: Option<String>,
    pub serial_number: Option<String>,
    /// `0x` + 16 hex digits (NAA), or `eui.`/`nvme.` names for NVMe namespaces.
    pub wwn: Option<String>,
    pub wwn_with_extension: Option<String>,
    pub wwn_vendor_extension: Option<String>,
    /// SCSI host:channel:target:lun.
    pub hctl: Option<String>,
    pub removable: bool,
    pub read_only: bool,
    pub numa_node: Option<u32>,
    /// "gpt" or "dos" when the first sectors hold one; `None` when blank or unreadable.
    pub partition_table: Option<String>,
    pub partitions: Vec<Partition>,
    /// The kernel's name (`sda`), to find partitions; empty for plain files.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kernel_name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Partition {
    /// `/dev/sda1`.
    pub name: String,
    pub number: Option<u32>,
    pub start_bytes: Option<u64>,
    pub size_bytes: u64,
    /// The GPT partition name, where there is one.
    pub label: Option<String>,
}

/// Kernel block devices that cannot hold an OS install (or are the ramdisk's own media).
fn skipped_block(name: &str) -> bool {
    ["loop", "ram", "zram", "dm-", "md", "sr", "fd", "nbd", "zd"]
        .iter()
        .any(|p| name.starts_with(p))
        || (name.starts_with("mmcblk") && (name.contains("boot") || name.contains("rpmb")))
}

pub fn collect(root: &Root) -> Vec<Disk> {
    let mut out: Vec<Disk> = root
        .list("sys/block")
        .iter()
        .filter(|name| !skipped_block(name))
        .filter(|name| root.flag(format!("sys/block/{name}/hidden")) != Some(true))
        .filter_map(|name| {
            let disk = block_disk(
                root,
                &PathBuf::from(format!("sys/block/{name}")),
                name,
                format!("/dev/{name}"),
            );
            (disk.size_bytes > 0).then_some(disk)
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// A disk the operator named: a block device (read from sysfs) or a plain file. These are
/// outside the root path by nature, so they are read from the running machine.
pub fn explicit_disk(root: &Root, path: &Path) -> Disk {
    let name = path.display().to_string();
    match fs::metadata(path) {
        Ok(meta) if meta.file_type().is_block_device() => {
            let (major, minor) = (
                nix::sys::stat::major(meta.rdev()),
                nix::sys::stat::minor(meta.rdev()),
            );
            let sys = PathBuf::from(format!("sys/dev/block/{major}:{minor}"));
            let kernel = root
                .resolve(&sys)
                .and_then(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_string))
                .unwrap_or_default();
            let mut d = block_disk(root, &sys, &kernel, name);
            d.partition_table = partition_table(root, path, d.logical_block_size);
            d
        }
        Ok(meta) => Disk {
            name,
            size_bytes: meta.len(),
            kind: "FILE".into(),
            model: Some("plain file".into()),
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

fn block_disk(root: &Root, sys: &Path, kernel_name: &str, name: String) -> Disk {
    let attr = |rel: &str| root.text(sys.join(rel));
    let rotational = root.flag(sys.join("queue/rotational")) == Some(true);
    let kind = if kernel_name.starts_with("nvme") {
        "NVME"
    } else if rotational {
        "HDD"
    } else {
        "SSD"
    };
    let device = root.resolve(sys);
    let path = device.as_deref().map(|d| path_id(root, d, kernel_name));
    let (by_path, compat, transport) = match path {
        Some(p) => (p.path, p.compat, p.transport),
        None => (None, None, None),
    };
    let transport = transport.or_else(|| kernel_name.starts_with("vd").then(|| "virtio".into()));

    let wwid = attr("device/wwid").or_else(|| attr("wwid"));
    let (wwn, wwn_vendor_extension) = wwn_of(wwid.as_deref(), kernel_name);
    let wwn = wwn.or_else(|| attr("device/wwn").map(|w| w.to_ascii_lowercase()));
    let wwn_with_extension = match (&wwn, &wwn_vendor_extension) {
        (Some(w), Some(e)) => Some(format!("{w}{}", e.trim_start_matches("0x"))),
        (Some(w), None) => Some(w.clone()),
        _ => None,
    };
    // Behind libata, IDENTIFY DEVICE has the full model (SCSI's is cut at 16 characters).
    let identify = device.as_deref().and_then(|d| ata_identify(root, d));
    let serial_number = identify
        .as_ref()
        .and_then(|i| i.serial.clone())
        .or_else(|| serial(root, sys, kernel_name));
    let model = identify
        .as_ref()
        .and_then(|i| i.model.clone())
        .or_else(|| attr("device/model"));
    let vendor = attr("device/vendor");
    let hctl = root
        .link_name(sys.join("device"))
        .filter(|n| n.split(':').count() == 4 && n.split(':').all(|p| p.parse::<u32>().is_ok()));
    let block = |rel: &str| {
        root.u64(sys.join(rel))
            .and_then(|v| u32::try_from(v).ok())
            .filter(|v| *v > 0)
    };
    let logical_block_size = block("queue/logical_block_size").unwrap_or(512);
    let numa_node = device.as_deref().and_then(|d| numa_node(root, d));

    let mut alternate_names: Vec<String> = Vec::new();
    if let Some(c) = compat {
        alternate_names.push(c);
    }
    alternate_names.extend(by_id_names(
        transport.as_deref(),
        kernel_name,
        model.as_deref(),
        serial_number.as_deref(),
        wwid.as_deref(),
        wwn_with_extension.as_deref(),
    ));
    alternate_names.extend(udev_links(root, kernel_name));
    alternate_names.retain(|a| a != &name && Some(a) != by_path.as_ref());
    alternate_names.sort();
    alternate_names.dedup();

    Disk {
        partition_table: (!kernel_name.is_empty())
            .then(|| {
                partition_table(
                    root,
                    &PathBuf::from(format!("dev/{kernel_name}")),
                    logical_block_size,
                )
            })
            .flatten(),
        partitions: partitions(root, sys, kernel_name),
        alternate_names,
        by_path,
        name,
        size_bytes: root
            .u64(sys.join("size"))
            .and_then(|s| s.checked_mul(512))
            .unwrap_or(0),
        rotational,
        kind: kind.into(),
        transport,
        model,
        vendor,
        serial_number,
        wwn,
        wwn_with_extension,
        wwn_vendor_extension,
        hctl,
        logical_block_size,
        physical_block_size: block("queue/physical_block_size").unwrap_or(logical_block_size),
        read_only: root.flag(sys.join("ro")) == Some(true),
        removable: root.flag(sys.join("removable")) == Some(true),
        numa_node,
        kernel_name: kernel_name.to_string(),
    }
}

/// The serial number: the block device's own (virtio, NVMe namespaces), the SCSI unit serial
/// number page (0x80), or the device's `serial` attribute.
fn serial(root: &Root, sys: &Path, kernel_name: &str) -> Option<String> {
    if let Some(s) = root.text(sys.join("serial")) {
        return Some(s);
    }
    if !kernel_name.starts_with("nvme")
        && let Some(page) = root.bytes_max(sys.join("device/vpd_pg80"), 512)
        && page.len() > 4
        && page[1] == 0x80
    {
        let len = usize::from(u16::from_be_bytes([page[2], page[3]]));
        let body = page.get(4..4 + len.min(page.len() - 4))?;
        if let Some(s) = std::str::from_utf8(body).ok().and_then(super::root::clean) {
            return Some(s);
        }
    }
    root.text(sys.join("device/serial"))
}

/// WWN and vendor extension from the kernel's `wwid` (udev's ID_WWN and
/// ID_WWN_VENDOR_EXTENSION): `naa.` identifiers split after 16 hex digits; NVMe namespaces use
/// their `eui.`/`nvme.`/`uuid.` name whole.
fn wwn_of(wwid: Option<&str>, kernel_name: &str) -> (Option<String>, Option<String>) {
    let Some(w) = wwid else {
        return (None, None);
    };
    if kernel_name.starts_with("nvme") {
        return (Some(w.to_string()), None);
    }
    let Some(hex) = w.strip_prefix("naa.") else {
        return (None, None);
    };
    let hex = hex.to_ascii_lowercase();
    if hex.len() < 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return (None, None);
    }
    let (id, ext) = hex.split_at(16);
    (
        Some(format!("0x{id}")),
        (!ext.is_empty()).then(|| format!("0x{ext}")),
    )
}

/// udev's whitespace and character rules for ID_SERIAL parts of by-id names.
fn udev_escape(s: &str) -> String {
    let mut out = String::new();
    let mut space = false;
    for c in s.trim().chars() {
        if c.is_whitespace() {
            space = true;
            continue;
        }
        if space {
            out.push('_');
            space = false;
        }
        if c.is_ascii_alphanumeric() || "#+-.:=@_".contains(c) {
            out.push(c);
        } else {
            out.push('_');
        }
    }
    out
}

/// `/dev/disk/by-id` names as udev's persistent storage rules make them.
fn by_id_names(
    transport: Option<&str>,
    kernel_name: &str,
    model: Option<&str>,
    serial: Option<&str>,
    wwid: Option<&str>,
    wwn_with_extension: Option<&str>,
) -> Vec<String> {
    let mut out = Vec::new();
    let id = |s: String| format!("/dev/disk/by-id/{s}");
    let model_serial = match (model, serial) {
        (Some(m), Some(s)) => Some(format!("{}_{}", udev_escape(m), udev_escape(s))),
        _ => None,
    };
    if kernel_name.starts_with("nvme") {
        if let Some(ms) = model_serial {
            out.push(id(format!("nvme-{ms}")));
        }
        if let Some(w) = wwid.filter(|w| w.contains('.')) {
            out.push(id(format!("nvme-{}", udev_escape(w))));
        }
        return out;
    }
    if kernel_name.starts_with("vd") {
        if let Some(s) = serial {
            out.push(id(format!("virtio-{}", udev_escape(s))));
        }
        return out;
    }
    match transport {
        Some("sata") => {
            if let Some(ms) = model_serial {
                out.push(id(format!("ata-{ms}")));
            }
        }
        Some("usb") => {}
        _ => {
            if let Some(hex) = wwid.and_then(|w| w.strip_prefix("naa.")) {
                out.push(id(format!("scsi-3{}", hex.to_ascii_lowercase())));
            }
        }
    }
    if let Some(w) = wwn_with_extension {
        out.push(id(format!("wwn-{w}")));
    }
    out
}

/// Links udev made, on machines that run it.
fn udev_links(root: &Root, kernel_name: &str) -> Vec<String> {
    let mut out = Vec::new();
    if kernel_name.is_empty() || !root.exists("dev/disk") {
        return out;
    }
    for dir in ["by-path", "by-id"] {
        for link in root.list(format!("dev/disk/{dir}")) {
            if root
                .link_name(format!("dev/disk/{dir}/{link}"))
                .is_some_and(|t| t == kernel_name)
            {
                out.push(format!("/dev/disk/{dir}/{link}"));
            }
        }
    }
    out
}

/// The NUMA node of the nearest ancestor device that knows it (the PCI function).
pub fn numa_node(root: &Root, device: &Path) -> Option<u32> {
    let mut p = device.to_path_buf();
    while p.starts_with("sys/devices") && p != Path::new("sys/devices") {
        if let Some(n) = root.i64(p.join("numa_node")) {
            return u32::try_from(n).ok();
        }
        p.pop();
    }
    None
}

/// What path_id computes for a device.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PathId {
    pub path: Option<String>,
    /// The older form udev also links (`ata-1` for `ata-1.0`, `virtio-pci-...`).
    pub compat: Option<String>,
    pub transport: Option<String>,
}

fn is_hctl(s: &str) -> Option<[u64; 4]> {
    let v: Vec<u64> = s.split(':').filter_map(|p| p.parse().ok()).collect();
    (v.len() == 4 && s.split(':').count() == 4).then(|| [v[0], v[1], v[2], v[3]])
}

fn lun(l: u64) -> String {
    if l < 256 {
        format!("lun-{l}")
    } else {
        format!("lun-0x{:04x}{:04x}00000000", l & 0xffff, (l >> 16) & 0xffff)
    }
}

fn name_of(p: &Path) -> &str {
    p.file_name().and_then(|n| n.to_str()).unwrap_or("")
}

/// udev's `path_id` for the sysfs device `device` (relative to the root), walking up its
/// parents: `pci-0000:00:1f.2-ata-1.0`, `pci-0000:01:00.0-nvme-1`, `pci-0000:00:04.0`,
/// `pci-0000:03:00.0-sas-exp0x500...-phy4-lun-0`, `pci-0000:00:14.0-usb-0:1:1.0-scsi-0:0:0:0`.
pub fn path_id(root: &Root, device: &Path, kernel_name: &str) -> PathId {
    let mut parts: Vec<String> = Vec::new();
    let mut compat: Vec<String> = Vec::new();
    let mut transport: Option<&str> = None;
    let full = device.display().to_string();
    let mut cur = device.to_path_buf();
    let mut in_usb = false;
    let mut skipping: Option<String> = None;
    while cur.starts_with("sys/devices") && cur != Path::new("sys/devices") {
        let sysname = name_of(&cur).to_string();
        let subsystem = root.link_name(cur.join("subsystem"));
        match subsystem.as_deref() {
            Some("scsi") => {
                if let Some([host, bus, target, l]) = is_hctl(&sysname) {
                    if full.contains("/end_device-") {
                        transport = Some("sas");
                        if let Some(p) = sas_path(root, &cur, l) {
                            parts.push(p);
                        }
                    } else if full.contains("/rport-") {
                        transport = Some("fc");
                        parts.push(format!("scsi-{host}:{bus}:{target}:{l}"));
                    } else if full.contains("/session") {
                        transport = Some("iscsi");
                        parts.push(format!("scsi-{host}:{bus}:{target}:{l}"));
                    } else if let Some(port) = ata_port(root, &cur) {
                        transport = Some("sata");
                        parts.push(if bus != 0 {
                            format!("ata-{port}.{bus}.0")
                        } else {
                            format!("ata-{port}.{target}")
                        });
                        compat.push(format!("ata-{port}"));
                    } else {
                        let base = host_base(root, &cur).unwrap_or(host);
                        parts.push(format!(
                            "scsi-{}:{bus}:{target}:{l}",
                            host.saturating_sub(base)
                        ));
                        transport = transport.or(Some("scsi"));
                    }
                }
            }
            Some("nvme") => {
                transport = Some("nvme");
                if let Some(nsid) = root.text(device.join("nsid")).or_else(|| {
                    // nvme0n1 -> namespace 1 on kernels without the nsid attribute.
                    kernel_name.rsplit_once('n').map(|(_, n)| n.to_string())
                }) {
                    parts.push(format!("nvme-{nsid}"));
                }
            }
            Some("virtio") if transport.is_none() || kernel_name.starts_with("vd") => {
                transport = Some("virtio");
            }
            // An interface, "1-1.2:1.0": usb-0:1.2:1.0; the hubs above it add nothing.
            Some("usb") if !in_usb && sysname.contains(':') => {
                if let Some((_, port)) = sysname.split_once('-') {
                    parts.push(format!("usb-0:{port}"));
                }
                in_usb = true;
                transport = Some("usb");
            }
            Some("mmc") => transport = Some("mmc"),
            // Like udev, only the nearest device of these buses counts (a PCI function, not
            // the bridges above it).
            Some(bus @ ("pci" | "platform" | "acpi")) if skipping.as_deref() != Some(bus) => {
                parts.push(format!("{bus}-{sysname}"));
                skipping = Some(bus.to_string());
            }
            _ => {}
        }
        cur.pop();
    }
    if parts.is_empty() {
        return PathId {
            transport: transport.map(str::to_string),
            ..Default::default()
        };
    }
    parts.reverse();
    let path = parts.join("-");
    let compat = if !compat.is_empty() {
        // The same path with the old ATA component.
        Some(
            path.rsplit_once("-ata-")
                .map_or(path.clone(), |(head, _)| format!("{head}-{}", compat[0])),
        )
    } else if kernel_name.starts_with("vd") {
        Some(format!("virtio-{path}"))
    } else {
        None
    };
    PathId {
        path: Some(format!("/dev/disk/by-path/{path}")),
        compat: compat.map(|c| format!("/dev/disk/by-path/{c}")),
        transport: transport.map(str::to_string),
    }
}

/// What ATA IDENTIFY DEVICE says, from libata's `ata_device/devN.M/id` (hex words).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Identify {
    pub model: Option<String>,
    pub serial: Option<String>,
}

/// IDENTIFY data of the ATA device behind a SCSI block device, if it is one.
fn ata_identify(root: &Root, block_dev: &Path) -> Option<Identify> {
    // .../ata3/host2/target2:0:0/2:0:0:0/block/sda
    let scsi_dev = block_dev.parent()?.parent()?;
    let [_, bus, target, _] = is_hctl(name_of(scsi_dev))?;
    let ata = scsi_dev.parent()?.parent()?.parent()?;
    let n = name_of(ata).strip_prefix("ata")?;
    let dev = if bus == 0 {
        format!("dev{n}.{target}")
    } else {
        format!("dev{n}.{bus}.0")
    };
    let text = root.raw_text(ata.join(format!("link{n}/{dev}/ata_device/{dev}/id")))?;
    parse_identify(&text)
}

/// Decodes the model (words 27-46) and serial (words 10-19) of IDENTIFY DEVICE data given as
/// hex words; ATA strings hold two characters per word, high byte first.
pub fn parse_identify(text: &str) -> Option<Identify> {
    let words: Vec<u16> = text
        .split_whitespace()
        .map(|w| u16::from_str_radix(w, 16).ok())
        .collect::<Option<_>>()?;
    if words.len() < 256 {
        return None;
    }
    let string = |from: usize, to: usize| {
        let bytes: Vec<u8> = words[from..to]
            .iter()
            .flat_map(|w| w.to_be_bytes())
            .collect();
        std::str::from_utf8(&bytes)
            .ok()
            .and_then(super::root::clean)
    };
    Some(Identify {
        model: string(27, 47),
        serial: string(10, 20),
    })
}

/// The ATA port number of a SCSI device behind libata (`.../ata3/host2/target2:0:0/2:0:0:0`).
fn ata_port(root: &Root, scsi_dev: &Path) -> Option<String> {
    let host = scsi_dev.parent()?.parent()?;
    let ata = host.parent()?;
    let name = name_of(ata);
    if !name.starts_with("ata") {
        return None;
    }
    root.text(ata.join("ata_port").join(name).join("port_no"))
}

/// The lowest SCSI host number beside this device's host, as udev's default SCSI path uses.
fn host_base(root: &Root, scsi_dev: &Path) -> Option<u64> {
    let host = scsi_dev.parent()?.parent()?;
    let parent = host.parent()?;
    root.list(parent)
        .iter()
        .filter_map(|n| n.strip_prefix("host")?.parse::<u64>().ok())
        .min()
}

/// SAS: `sas-exp<expander address>-phy<N>-lun-<L>` behind an expander, `sas-phy<N>-lun-<L>`
/// on an HBA port, `sas-<disk address>-lun-<L>` on a wide port.
fn sas_path(root: &Root, scsi_dev: &Path, l: u64) -> Option<String> {
    let target = scsi_dev.parent()?;
    let end_device = target.parent()?;
    let end_name = name_of(end_device);
    let sas_dev = end_device.join("sas_device").join(end_name);
    let port = end_device.parent()?;
    let port_name = name_of(port);
    let num_phys = root.u64(port.join("sas_port").join(port_name).join("num_phys"));
    if num_phys != Some(1) {
        let addr = root.text(sas_dev.join("sas_address"))?;
        return Some(format!("sas-{addr}-{}", lun(l)));
    }
    let phy = root.text(sas_dev.join("phy_identifier"))?;
    let expander = port.parent()?;
    let exp_name = name_of(expander);
    match root.text(
        expander
            .join("sas_device")
            .join(exp_name)
            .join("sas_address"),
    ) {
        Some(addr) => Some(format!("sas-exp{addr}-phy{phy}-{}", lun(l))),
        None => Some(format!("sas-phy{phy}-{}", lun(l))),
    }
}

fn partitions(root: &Root, sys: &Path, kernel_name: &str) -> Vec<Partition> {
    if kernel_name.is_empty() {
        return Vec::new();
    }
    let mut out: Vec<Partition> = root
        .list(sys)
        .into_iter()
        .filter(|n| n.starts_with(kernel_name) && n != kernel_name)
        .filter_map(|n| {
            let dir = sys.join(&n);
            let number = root.u64(dir.join("partition"))?;
            let label = root.raw_text(dir.join("uevent")).and_then(|u| {
                u.lines()
                    .find_map(|l| l.strip_prefix("PARTNAME="))
                    .and_then(super::root::clean)
            });
            Some(Partition {
                name: format!("/dev/{n}"),
                number: u32::try_from(number).ok(),
                start_bytes: root.u64(dir.join("start")).and_then(|s| s.checked_mul(512)),
                size_bytes: root
                    .u64(dir.join("size"))
                    .and_then(|s| s.checked_mul(512))
                    .unwrap_or(0),
                label,
            })
        })
        .collect();
    out.sort_by_key(|p| p.number);
    out
}

/// "gpt" or "dos" from the first sectors of the device (`dev/NAME` under the root; a capture
/// keeps just those bytes).
fn partition_table(root: &Root, dev: &Path, sector: u32) -> Option<String> {
    let sector = usize::try_from(sector)
        .ok()
        .filter(|s| (512..=4096).contains(s))?;
    let bytes = root.bytes_max(dev, (2 * sector) as u64)?;
    detect_table(&bytes, sector)
}

pub fn detect_table(bytes: &[u8], sector: usize) -> Option<String> {
    if bytes.get(sector..sector + 8) == Some(b"EFI PART") {
        return Some("gpt".into());
    }
    if bytes.get(510..512) == Some(&[0x55, 0xAA]) {
        // A protective MBR without a readable GPT header is still GPT's.
        let protective = (0..4).any(|i| bytes.get(0x1BE + i * 16 + 4) == Some(&0xEE));
        return Some(if protective { "gpt" } else { "dos" }.into());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wwn_split_like_udev() {
        assert_eq!(
            wwn_of(Some("naa.5000c500a1b2c3d4"), "sda"),
            (Some("0x5000c500a1b2c3d4".into()), None)
        );
        assert_eq!(
            wwn_of(Some("naa.600508B1001C7D1A2B3C4D5E6F708192"), "sdb"),
            (
                Some("0x600508b1001c7d1a".into()),
                Some("0x2b3c4d5e6f708192".into())
            )
        );
        assert_eq!(
            wwn_of(Some("t10.ATA     QEMU HARDDISK"), "sda"),
            (None, None)
        );
        assert_eq!(
            wwn_of(Some("eui.0025385b71b07e2f"), "nvme0n1").0.as_deref(),
            Some("eui.0025385b71b07e2f")
        );
        assert_eq!(wwn_of(Some("naa.12"), "sda"), (None, None));
    }

    #[test]
    fn udev_escaping() {
        assert_eq!(udev_escape("  QEMU HARDDISK  "), "QEMU_HARDDISK");
        assert_eq!(udev_escape("Samsung SSD 970/Pro"), "Samsung_SSD_970_Pro");
    }

    #[test]
    fn partition_tables() {
        let mut mbr = vec![0u8; 1024];
        mbr[510] = 0x55;
        mbr[511] = 0xAA;
        assert_eq!(detect_table(&mbr, 512).as_deref(), Some("dos"));
        mbr[0x1BE + 4] = 0xEE;
        assert_eq!(detect_table(&mbr, 512).as_deref(), Some("gpt"));
        mbr[512..520].copy_from_slice(b"EFI PART");
        assert_eq!(detect_table(&mbr, 512).as_deref(), Some("gpt"));
        assert_eq!(detect_table(&[0u8; 1024], 512), None);
        assert_eq!(detect_table(&[], 4096), None);
    }

    #[test]
    fn ata_identify_strings() {
        let mut words = vec![0u16; 256];
        let put = |w: &mut [u16], at: usize, s: &str, len: usize| {
            let b = format!("{s:<len$}");
            for (i, c) in b.as_bytes().chunks(2).enumerate() {
                w[at + i] = u16::from_be_bytes([c[0], c[1]]);
            }
        };
        put(&mut words, 10, "SATA-0001", 20);
        put(&mut words, 27, "Slipway SATA Disk", 40);
        let text: String = words.iter().map(|w| format!("{w:04x} ")).collect();
        let id = parse_identify(&text).unwrap();
        assert_eq!(id.model.as_deref(), Some("Slipway SATA Disk"));
        assert_eq!(id.serial.as_deref(), Some("SATA-0001"));
        assert_eq!(parse_identify("0040 zzzz"), None);
        assert_eq!(parse_identify("0040"), None);
    }

    #[test]
    fn luns() {
        assert_eq!(lun(0), "lun-0");
        assert_eq!(lun(0x4001_0000), "lun-0x0000400100000000");
    }
}
