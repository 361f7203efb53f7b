//! The hardware of simulated machines: a plausible [`Inventory`], the same every time for an
//! index and different across indexes (1-4 disks of several kinds, 1-4 NICs, CPUs of 8 to
//! 128 threads, DIMMs, a BMC on most). Pure: no I/O, no clock, no randomness beyond a
//! generator seeded by the index.

use super::catalog::{
    CPUS, DIMM_MAKERS, DISKS, DiskKind, FLAGS_AMD, FLAGS_COMMON, FLAGS_INTEL, NICS, SYSTEMS,
};
use crate::inventory::{
    Bmc, Cpu, Dimm, Disk, Inventory, Memory, Neighbour, Nic, NumaNode, Partition, PciDevice,
    SystemInfo,
};

/// The boot MAC of simulated machine `index`: the three bytes of `prefix`, then the index in
/// three bytes (so 16,777,216 distinct machines per prefix).
pub fn mac_of(prefix: [u8; 3], index: u32) -> String {
    let [_, a, b, c] = index.to_be_bytes();
    format!(
        "{:02x}:{:02x}:{:02x}:{a:02x}:{b:02x}:{c:02x}",
        prefix[0], prefix[1], prefix[2]
    )
}

/// How many machines a prefix can name.
pub const MAX_MACHINES: u64 = 1 << 24;

/// Parses a MAC prefix of three bytes, `52:54:00` (or with `-`).
pub fn parse_prefix(text: &str) -> Result<[u8; 3], String> {
    let parts: Vec<&str> = text.trim().split([':', '-']).collect();
    let bytes: Vec<u8> = parts
        .iter()
        .filter_map(|p| {
            (p.len() == 2)
                .then(|| u8::from_str_radix(p, 16).ok())
                .flatten()
        })
        .collect();
    match bytes[..] {
        [a, b, c] if parts.len() == 3 => Ok([a, b, c]),
        _ => Err(format!(
            "{text:?} is not a MAC prefix of three bytes, such as 52:54:00"
        )),
    }
}

/// A small deterministic generator (splitmix64), seeded by the machine's index.
struct Rng(u64);

/// splitmix64's output function.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    fn new(index: u32, salt: u64) -> Rng {
        // Seeds far apart in the sequence, so neighbouring machines are not shifted copies.
        Rng(mix(u64::from(index) << 32 ^ salt))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// A number in `0..n`.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// True `percent` times in a hundred.
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn hex(&mut self, digits: usize) -> String {
        let mut s = String::new();
        while s.len() < digits {
            s.push_str(&format!("{:016x}", self.next()));
        }
        s.truncate(digits);
        s
    }

    fn alnum(&mut self, len: usize) -> String {
        const CHARS: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ0123456789";
        (0..len).map(|_| char::from(*self.pick(CHARS))).collect()
    }
}

/// The disks of machine `index`, sorted by name as the real inventory lists them. The first
/// is the one the generated hosts name in their root device hints.
pub fn disks(index: u32) -> Vec<Disk> {
    let mut rng = Rng::new(index, 0xD15C);
    let count = 1 + rng.below(4);
    let nvme_ctrl = format!("0000:{:02x}:00.0", 0x5e + rng.below(4) * 0x20);
    let hba = *rng.pick(&["0000:00:17.0", "0000:3b:00.0"]);
    let (mut sd, mut ns) = (0u8, 0u32);
    let mut out = Vec::new();
    for _ in 0..count {
        let m = rng.pick(DISKS);
        let serial;
        let mut d = Disk {
            size_bytes: m.size,
            logical_block_size: 512,
            physical_block_size: if matches!(m.kind, DiskKind::Hdd) {
                4096
            } else {
                512
            },
            rotational: matches!(m.kind, DiskKind::Hdd),
            model: Some(m.model.to_string()),
            vendor: m.vendor.map(str::to_string),
            numa_node: Some(0),
            ..Default::default()
        };
        match m.kind {
            DiskKind::Nvme => {
                ns += 1;
                serial = format!("S{}", rng.alnum(13));
                let eui = format!("eui.{}", rng.hex(16));
                d.kernel_name = format!("nvme0n{ns}");
                d.kind = "NVME".into();
                d.transport = Some("nvme".into());
                d.by_path = Some(format!("/dev/disk/by-path/pci-{nvme_ctrl}-nvme-{ns}"));
                d.alternate_names = vec![
                    format!(
                        "/dev/disk/by-id/nvme-{}_{serial}",
                        m.model.replace(' ', "_")
                    ),
                    format!("/dev/disk/by-id/nvme-{eui}"),
                ];
                d.wwn = Some(eui);
            }
            DiskKind::Hdd | DiskKind::Ssd => {
                let letter = char::from(b'a' + sd);
                serial = if m.vendor == Some("SEAGATE") {
                    format!("Z{}", rng.alnum(7))
                } else {
                    rng.alnum(12)
                };
                let wwn = format!("0x{}{}", m.wwn_oui, rng.hex(8));
                d.kernel_name = format!("sd{letter}");
                d.kind = if matches!(m.kind, DiskKind::Hdd) {
                    "HDD"
                } else {
                    "SSD"
                }
                .into();
                let sas = m.vendor == Some("SEAGATE");
                d.transport = Some(if sas { "sas" } else { "sata" }.into());
                d.hctl = Some(format!("{}:0:{sd}:0", if sas { 2 } else { 0 }));
                d.by_path = Some(if sas {
                    format!("/dev/disk/by-path/pci-{hba}-sas-phy{sd}-lun-0")
                } else {
                    format!("/dev/disk/by-path/pci-{hba}-ata-{}", sd + 1)
                });
                let id_kind = if sas { "scsi-3" } else { "ata-" };
                d.alternate_names = vec![
                    if sas {
                        format!("/dev/disk/by-id/{id_kind}{}", &wwn[2..])
                    } else {
                        format!(
                            "/dev/disk/by-id/{id_kind}{}_{serial}",
                            m.model.replace(' ', "_")
                        )
                    },
                    format!("/dev/disk/by-id/wwn-{wwn}"),
                ];
                d.wwn_with_extension = Some(wwn.clone());
                d.wwn = Some(wwn);
                sd += 1;
            }
        }
        d.name = format!("/dev/{}", d.kernel_name);
        d.serial_number = Some(serial);
        // Some machines come back from an earlier life with a partition table.
        if rng.chance(25) {
            let esp = 512u64 << 20;
            let p = |n: u32| {
                if d.kernel_name.starts_with("nvme") {
                    format!("/dev/{}p{n}", d.kernel_name)
                } else {
                    format!("/dev/{}{n}", d.kernel_name)
                }
            };
            d.partition_table = Some("gpt".into());
            d.partitions = vec![
                Partition {
                    name: p(1),
                    number: Some(1),
                    start_bytes: Some(1 << 20),
                    size_bytes: esp,
                    label: Some("EFI System Partition".into()),
                },
                Partition {
                    name: p(2),
                    number: Some(2),
                    start_bytes: Some((1 << 20) + esp),
                    size_bytes: m.size - esp - (2 << 20),
                    label: Some("root".into()),
                },
            ];
        }
        out.push(d);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The name of the first disk of machine `index` (for its root device hints).
pub fn first_disk(index: u32) -> String {
    disks(index)
        .into_iter()
        .next()
        .map(|d| d.name)
        .unwrap_or_default()
}

/// The whole inventory of machine `index`, whose boot NIC has `boot_mac`.
pub fn inventory(index: u32, boot_mac: &str) -> Inventory {
    let mut rng = Rng::new(index, 0x5157);
    let sys = rng.pick(SYSTEMS);
    let uuid = rng.hex(32);
    let uefi = rng.chance(85);
    let system = SystemInfo {
        manufacturer: Some(sys.manufacturer.into()),
        product_name: Some(sys.product.into()),
        version: Some("Not Specified".into()),
        serial_number: Some(format!("SIM{index:07}{}", rng.alnum(3))),
        uuid: Some(format!(
            "{}-{}-4{}-{}-{}",
            &uuid[..8],
            &uuid[8..12],
            &uuid[13..16],
            format_args!("{:x}{}", 8 + rng.below(4), &uuid[17..20]),
            &uuid[20..32]
        )),
        sku: Some(format!("SKU=SIM-{:04}", rng.below(10000))),
        family: Some(sys.family.into()),
        bios_vendor: Some(sys.bios_vendor.into()),
        bios_version: Some(sys.bios_version.into()),
        bios_date: Some(sys.bios_date.into()),
    };

    // CPUs: 8 to 128 threads.
    let model = rng.pick(CPUS);
    let sockets = if model.max_sockets > 1 && rng.chance(50) {
        2
    } else {
        1
    };
    let smt = if model.cores * sockets < 8 || rng.chance(80) {
        2
    } else {
        1
    };
    let threads = model.cores * sockets * smt;
    let extra = if model.vendor == "GenuineIntel" {
        FLAGS_INTEL
    } else {
        FLAGS_AMD
    };
    let flags: Vec<String> = FLAGS_COMMON
        .split_whitespace()
        .chain(extra.split_whitespace())
        .map(str::to_string)
        .collect();
    let cpu = Cpu {
        model: Some(model.name.into()),
        vendor: Some(model.vendor.into()),
        architecture: Some("x86_64".into()),
        count: threads,
        cores: Some(model.cores * sockets),
        sockets: Some(sockets),
        threads_per_core: Some(smt),
        frequency_mhz: Some(model.mhz),
        max_frequency_mhz: Some(model.max_mhz),
        flags,
    };

    // Memory: DIMMs on each socket.
    let per_socket = *rng.pick(&[2u32, 4, 6, 8]);
    let dimm_mib = *rng.pick(&[16_384u64, 32_768, 65_536]);
    let (maker, part) = *rng.pick(DIMM_MAKERS);
    let mut dimms = Vec::new();
    for s in 0..sockets {
        for d in 0..per_socket {
            dimms.push(Dimm {
                locator: Some(format!(
                    "CPU{}_DIMM_{}{}",
                    s + 1,
                    char::from(b'A' + d as u8),
                    1
                )),
                bank_locator: Some(format!("P{s}_Node{s}_Channel{d}_Dimm0")),
                size_mib: Some(dimm_mib),
                kind: Some(model.ddr.0.into()),
                form_factor: Some("DIMM".into()),
                speed_mts: Some(model.ddr.1),
                configured_speed_mts: Some(model.ddr.1),
                manufacturer: Some(maker.into()),
                serial_number: Some(rng.hex(8).to_uppercase()),
                part_number: Some(part.into()),
            });
        }
    }
    let physical_mib = dimm_mib * u64::from(per_socket * sockets);
    // What the kernel reports is a little less than what is installed.
    let total_bytes = (physical_mib << 20) / 100 * 98;
    let memory = Memory {
        total_bytes,
        physical_mib: Some(physical_mib),
        dimms,
    };
    let per_node = model.cores * smt;
    let numa_nodes = (0..sockets)
        .map(|s| NumaNode {
            id: s,
            cpus: (s * per_node..(s + 1) * per_node).collect(),
            memory_bytes: Some(total_bytes / u64::from(sockets)),
        })
        .collect();

    // NICs: the boot NIC first.
    let nic_model = rng.pick(NICS);
    let nic_count = 1 + rng.below(4);
    let rack = 1 + rng.below(40);
    let [_, i2, i1, i0] = index.to_be_bytes();
    let mut nics = Vec::new();
    let mut pci_devices = Vec::new();
    for n in 0..nic_count {
        let bus = 0x18 + (n / nic_model.ports) as u32 * 0x20;
        let pci = format!("0000:{bus:02x}:00.{}", n % nic_model.ports);
        let mac = if n == 0 {
            boot_mac.to_ascii_lowercase()
        } else {
            format!("02:{n:02x}:00:{i2:02x}:{i1:02x}:{i0:02x}")
        };
        let up = n == 0 || rng.chance(50);
        let mut addrs = Vec::new();
        if n == 0 {
            addrs.push(format!("10.{}.{}.{}", 64 + (i2 & 63), i1, i0));
        }
        if up {
            addrs.push(link_local(&mac));
        }
        nics.push(Nic {
            name: if n < 2 {
                format!("eno{}", n + 1)
            } else {
                format!("ens{}f{}", 1 + n / 2, n % 2)
            },
            kind: "physical".into(),
            mac: Some(mac.clone()),
            permanent_mac: Some(mac),
            driver: Some(nic_model.driver.into()),
            pci_address: Some(pci.clone()),
            vendor_id: Some(nic_model.vendor_id.into()),
            device_id: Some(nic_model.device_id.into()),
            speed_mbps: up.then_some(nic_model.speed_mbps),
            has_carrier: Some(up),
            operstate: Some(if up { "up" } else { "down" }.into()),
            mtu: Some(1500),
            ip_addresses: addrs,
            numa_node: Some(0),
            pxe: n == 0,
            bond_master: None,
            bond: None,
            lldp: (n == 0).then(|| Neighbour {
                chassis_id: Some(format!("44:38:39:00:{rack:02x}:01")),
                port_id: Some(format!("swp{}", 1 + (index % 48))),
                port_description: Some(format!("rack{rack:02} server port")),
                system_name: Some(format!("leaf-r{rack:02}")),
                system_description: Some("Cumulus Linux version 5.4.0".into()),
                management_addresses: vec![format!("192.168.255.{rack}")],
                port_vlan_id: Some(100),
                vlans: Vec::new(),
            }),
        });
        pci_devices.push(PciDevice {
            address: pci,
            class: Some("0x020000".into()),
            vendor_id: Some(nic_model.vendor_id.into()),
            device_id: Some(nic_model.device_id.into()),
            subsystem_vendor_id: Some(nic_model.vendor_id.into()),
            subsystem_device_id: Some("0x0000".into()),
            revision: Some("0x01".into()),
            driver: Some(nic_model.driver.into()),
            numa_node: Some(0),
            gpu: false,
        });
    }

    let disks = disks(index);
    for d in &disks {
        if let Some(path) = &d.by_path
            && let Some(addr) = path
                .strip_prefix("/dev/disk/by-path/pci-")
                .and_then(|p| p.get(..12))
            && !pci_devices.iter().any(|p| p.address == addr)
        {
            let nvme = d.kind == "NVME";
            pci_devices.push(PciDevice {
                address: addr.to_string(),
                class: Some(if nvme { "0x010802" } else { "0x010601" }.into()),
                vendor_id: Some(if nvme { "0x144d" } else { "0x8086" }.into()),
                device_id: Some(if nvme { "0xa80a" } else { "0xa182" }.into()),
                subsystem_vendor_id: None,
                subsystem_device_id: None,
                revision: Some("0x00".into()),
                driver: Some(if nvme { "nvme" } else { "ahci" }.into()),
                numa_node: Some(0),
                gpu: false,
            });
        }
    }
    if rng.chance(10) {
        pci_devices.push(PciDevice {
            address: "0000:ca:00.0".into(),
            class: Some("0x030200".into()),
            vendor_id: Some("0x10de".into()),
            device_id: Some("0x20b5".into()),
            subsystem_vendor_id: Some("0x10de".into()),
            subsystem_device_id: Some("0x1533".into()),
            revision: Some("0xa1".into()),
            driver: Some("nvidia".into()),
            numa_node: Some(sockets - 1),
            gpu: true,
        });
    }
    pci_devices.sort_by(|a, b| a.address.cmp(&b.address));

    let bmc = rng.chance(90).then(|| Bmc {
        ipv4_address: Some(format!("172.{}.{}.{}", 16 + (i2 & 15), i1, i0)),
        ipv6_address: None,
        mac: Some(format!("02:bc:00:{i2:02x}:{i1:02x}:{i0:02x}")),
        interface: Some("IPMI 2.0 KCS".into()),
    });

    Inventory {
        system,
        boot_mode: if uefi { "UEFI" } else { "legacy" }.into(),
        secure_boot: uefi.then(|| rng.chance(30)),
        hostname: None,
        cpu,
        memory,
        numa_nodes,
        disks,
        nics,
        pci_devices,
        bmc,
    }
}

/// The IPv6 link-local address a Linux interface with `mac` takes (EUI-64).
fn link_local(mac: &str) -> String {
    let b: Vec<u8> = mac
        .split(':')
        .filter_map(|x| u8::from_str_radix(x, 16).ok())
        .collect();
    if b.len() != 6 {
        return "fe80::1".into();
    }
    format!(
        "fe80::{:x}:{:x}:{:x}:{:x}",
        u16::from_be_bytes([b[0] ^ 2, b[1]]),
        u16::from_be_bytes([b[2], 0xff]),
        u16::from_be_bytes([0xfe, b[3]]),
        u16::from_be_bytes([b[4], b[5]])
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::disk::{self, Hints};

    #[test]
    fn macs_are_the_prefix_and_the_index() {
        let p = parse_prefix("52:54:00").unwrap();
        assert_eq!(mac_of(p, 0), "52:54:00:00:00:00");
        assert_eq!(mac_of(p, 1), "52:54:00:00:00:01");
        assert_eq!(mac_of(p, 0x0a0b0c), "52:54:00:0a:0b:0c");
        assert_eq!(mac_of(p, (1 << 24) - 1), "52:54:00:ff:ff:ff");
        assert_eq!(
            mac_of(parse_prefix("02-AB-cd").unwrap(), 5),
            "02:ab:cd:00:00:05"
        );
        for bad in ["52:54", "52:54:00:01", "52:54:zz", "525400", ""] {
            assert!(parse_prefix(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn macs_are_distinct_for_every_index_a_prefix_can_name() {
        // Each MAC reads back as its own index, for all 16M: no two indexes share one.
        let p = [0x52, 0x54, 0x00];
        for i in 0..MAX_MACHINES as u32 {
            let m = mac_of(p, i);
            let b = m.as_bytes();
            assert!(m.len() == 17 && m.starts_with("52:54:00:"), "{m}");
            let hex = |k: usize| char::from(b[k]).to_digit(16).unwrap();
            let back = [9, 10, 12, 13, 15, 16]
                .iter()
                .fold(0u32, |acc, k| acc << 4 | hex(*k));
            assert_eq!(back, i, "{m}");
        }
    }

    #[test]
    fn inventories_are_deterministic_per_index() {
        for i in [0, 1, 77, 99_999] {
            let m = mac_of([0x52, 0x54, 0], i);
            assert_eq!(inventory(i, &m), inventory(i, &m));
            assert_eq!(first_disk(i), inventory(i, &m).disks[0].name);
        }
    }

    #[test]
    fn inventories_are_plausible() {
        for i in 0..2000 {
            let mac = mac_of([0x52, 0x54, 0], i);
            let inv = inventory(i, &mac);
            let what = format!("machine {i}");
            assert!((1..=4).contains(&inv.disks.len()), "{what}");
            assert!((1..=4).contains(&inv.nics.len()), "{what}");
            assert!(
                (8..=128).contains(&inv.cpu.count),
                "{what}: {}",
                inv.cpu.count
            );
            assert_eq!(
                inv.cpu.count,
                inv.cpu.cores.unwrap() * inv.cpu.threads_per_core.unwrap(),
                "{what}"
            );
            assert!(inv.cpu.flags.len() > 60 && inv.cpu.flags.contains(&"sse4_2".into()));
            let dimm_mib: u64 = inv.memory.dimms.iter().filter_map(|d| d.size_mib).sum();
            assert_eq!(Some(dimm_mib), inv.memory.physical_mib, "{what}");
            assert!(inv.memory.total_bytes < dimm_mib << 20);
            assert!(inv.memory.total_bytes >= 16 << 30, "{what}");
            // The boot NIC is the first and the only one marked pxe.
            assert_eq!(inv.nics[0].mac.as_deref(), Some(mac.as_str()), "{what}");
            assert_eq!(inv.nics.iter().filter(|n| n.pxe).count(), 1, "{what}");
            let names: BTreeSet<&str> = inv.disks.iter().map(|d| d.name.as_str()).collect();
            assert_eq!(names.len(), inv.disks.len(), "{what}: disk names repeat");
            for d in &inv.disks {
                let ok = match d.kind.as_str() {
                    "NVME" => d.name.starts_with("/dev/nvme0n") && d.wwn.is_some(),
                    "SSD" | "HDD" => {
                        d.name.starts_with("/dev/sd") && d.wwn.as_deref().unwrap().len() == 18
                    }
                    _ => false,
                };
                assert!(ok, "{what}: {d:?}");
                assert_eq!(d.rotational, d.kind == "HDD");
                assert!(d.size_bytes > 400_000_000_000 && d.serial_number.is_some());
                assert!(
                    d.by_path
                        .as_deref()
                        .unwrap()
                        .starts_with("/dev/disk/by-path/pci-")
                );
            }
            // The hosts name the first disk in their hints: that is the one chosen.
            let hints = Hints {
                device_name: Some(first_disk(i)),
                ..Default::default()
            };
            let chosen = disk::select_root_disk(&hints, &inv.disks, 0).unwrap();
            assert_eq!(chosen.disk().name, inv.disks[0].name, "{what}");
            assert!(["UEFI", "legacy"].contains(&inv.boot_mode.as_str()));
            assert_eq!(inv.secure_boot.is_some(), inv.boot_mode == "UEFI");
            // Through the real conversion, as the session sends it.
            let pb = crate::session::convert::inventory_to_proto(&inv);
            assert_eq!(pb.disks.len(), inv.disks.len());
        }
    }

    #[test]
    fn machines_differ() {
        let invs: Vec<Inventory> = (0..500)
            .map(|i| inventory(i, &mac_of([0x52, 0x54, 0], i)))
            .collect();
        let distinct = |f: &dyn Fn(&Inventory) -> String| -> usize {
            invs.iter().map(f).collect::<BTreeSet<_>>().len()
        };
        assert_eq!(distinct(&|i| i.system.serial_number.clone().unwrap()), 500);
        assert_eq!(distinct(&|i| i.system.uuid.clone().unwrap()), 500);
        assert_eq!(distinct(&|i| i.nics[0].mac.clone().unwrap()), 500);
        let all_nic_macs: BTreeSet<String> = invs
            .iter()
            .flat_map(|i| i.nics.iter().filter_map(|n| n.mac.clone()))
            .collect();
        assert_eq!(
            all_nic_macs.len(),
            invs.iter().map(|i| i.nics.len()).sum::<usize>()
        );
        let serials: BTreeSet<String> = invs
            .iter()
            .flat_map(|i| i.disks.iter().filter_map(|d| d.serial_number.clone()))
            .collect();
        assert_eq!(
            serials.len(),
            invs.iter().map(|i| i.disks.len()).sum::<usize>()
        );
        assert_eq!(distinct(&|i| i.disks.len().to_string()), 4);
        assert_eq!(distinct(&|i| i.nics.len().to_string()), 4);
        assert!(distinct(&|i| i.cpu.model.clone().unwrap()) >= 6);
        assert!(distinct(&|i| i.cpu.count.to_string()) >= 4);
        assert!(distinct(&|i| i.memory.total_bytes.to_string()) >= 6);
        assert!(distinct(&|i| i.system.product_name.clone().unwrap()) >= 5);
        assert_eq!(distinct(&|i| i.disks[0].kind.clone()), 3);
        assert_eq!(distinct(&|i| i.boot_mode.clone()), 2);
        let min = invs.iter().map(|i| i.cpu.count).min().unwrap();
        let max = invs.iter().map(|i| i.cpu.count).max().unwrap();
        assert!(min == 8 && max == 128, "{min}..{max}");
    }

    #[test]
    fn link_local_addresses_follow_eui64() {
        assert_eq!(link_local("52:54:00:12:34:56"), "fe80::5054:ff:fe12:3456");
    }
}
