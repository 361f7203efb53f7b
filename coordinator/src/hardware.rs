//! The full inventory of a host as a metal3 `HardwareData` document
//! (`apiVersion: metal3.io/v1alpha1, kind: HardwareData`, same name as the host).
//!
//! `spec.hardware` keeps metal3's `HardwareDetails` field names (systemVendor, firmware,
//! ramMebibytes, nics, storage, cpu, hostname), so metal3 consumers read what they know, and
//! adds Slipway's extra fields beside them (memory modules, NUMA nodes, PCI devices, BMC, LLDP,
//! partitions...). [`details`] derives the `status.hardware` summary from it. Pure data and
//! functions; `api` builds it from protobuf, the store keeps it, `output` summarises it.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use slipway_reconcile::host::{
    Bios, Cpu as SummaryCpu, Firmware as SummaryFirmware, HardwareDetails, HardwareSystemVendor,
    HostKey, Nic as SummaryNic, ObjectMeta, Storage as SummaryStorage,
};

pub const KIND: &str = "HardwareData";
/// Annotations Slipway sets on the document.
pub const COLLECTED_AT: &str = "slipway.dev/collected-at";
pub const COLLECTED_BY: &str = "slipway.dev/collected-by";

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HardwareData {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: HardwareDataSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HardwareDataSpec {
    pub hardware: Hardware,
}

impl HardwareData {
    /// The document for `host`, collected at `at` by `by` ("hello" or "inspect").
    pub fn new(host: &HostKey, hardware: Hardware, at: Timestamp, by: &str) -> HardwareData {
        let mut metadata = ObjectMeta {
            name: host.name.clone(),
            namespace: Some(host.namespace.clone()),
            ..Default::default()
        };
        metadata
            .annotations
            .insert(COLLECTED_AT.into(), at.to_string());
        metadata.annotations.insert(COLLECTED_BY.into(), by.into());
        HardwareData {
            api_version: slipway_reconcile::host::API_VERSION.into(),
            kind: KIND.into(),
            metadata,
            spec: HardwareDataSpec { hardware },
        }
    }

    pub fn collected_at(&self) -> Option<Timestamp> {
        self.metadata.annotations.get(COLLECTED_AT)?.parse().ok()
    }

    /// The host this document describes.
    pub fn key(&self) -> HostKey {
        HostKey::of(&self.metadata)
    }
}

/// What identifies a machine: its SMBIOS system UUID and serial number, and the MACs of its
/// network cards (permanent ones where the driver knows them). An agent whose machine does
/// not match the one inspected for its host is refused before it gets any command.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    #[serde(default)]
    pub uuid: String,
    #[serde(default)]
    pub serial: String,
    /// The MACs of the NICs on a PCI (or other physical) bus, lower case, sorted.
    #[serde(default)]
    pub macs: std::collections::BTreeSet<String>,
    /// Every MAC the machine shows (virtual interfaces included), for the boot MAC check.
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub all_macs: std::collections::BTreeSet<String>,
}

impl Identity {
    pub fn of(h: &Hardware) -> Identity {
        let mac = |n: &Nic| {
            if n.permanent_mac.is_empty() {
                n.mac.to_ascii_lowercase()
            } else {
                n.permanent_mac.to_ascii_lowercase()
            }
        };
        let mut all_macs = std::collections::BTreeSet::new();
        for n in &h.nics {
            for m in [&n.mac, &n.permanent_mac] {
                if !m.is_empty() {
                    all_macs.insert(m.to_ascii_lowercase());
                }
            }
        }
        Identity {
            uuid: h.system_vendor.uuid.to_ascii_lowercase(),
            serial: h.system_vendor.serial_number.clone(),
            macs: h
                .nics
                .iter()
                .filter(|n| !n.pci_address.is_empty())
                .map(mac)
                .filter(|m| !m.is_empty())
                .collect(),
            all_macs,
        }
    }

    /// What differs from `recorded`, in words; empty when it is the same machine.
    pub fn differences(&self, recorded: &Identity) -> Vec<String> {
        let mut out = Vec::new();
        if !recorded.uuid.is_empty() && self.uuid != recorded.uuid {
            out.push(format!(
                "system UUID {} (inspected: {})",
                shown(&self.uuid),
                recorded.uuid
            ));
        }
        if !recorded.serial.is_empty() && self.serial != recorded.serial {
            out.push(format!(
                "serial number {} (inspected: {})",
                shown(&self.serial),
                recorded.serial
            ));
        }
        if !recorded.macs.is_empty() && self.macs != recorded.macs {
            let missing: Vec<&str> = recorded
                .macs
                .difference(&self.macs)
                .map(String::as_str)
                .collect();
            let new: Vec<&str> = self
                .macs
                .difference(&recorded.macs)
                .map(String::as_str)
                .collect();
            out.push(format!(
                "network cards: {} missing, {} new",
                if missing.is_empty() {
                    "none".into()
                } else {
                    missing.join(", ")
                },
                if new.is_empty() {
                    "none".into()
                } else {
                    new.join(", ")
                },
            ));
        }
        out
    }
}

fn shown(v: &str) -> &str {
    if v.is_empty() { "(none)" } else { v }
}

/// Hex SHA-256 of the hardware's JSON: equal for equal inventories whenever they were taken.
pub fn digest(hardware: &Hardware) -> String {
    use sha2::Digest;
    let bytes = serde_json::to_vec(hardware).unwrap_or_default();
    hex::encode(sha2::Sha256::digest(&bytes))
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// metal3's HardwareDetails, extended.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hardware {
    pub system_vendor: SystemVendor,
    pub firmware: Firmware,
    pub ram_mebibytes: u64,
    pub nics: Vec<Nic>,
    pub storage: Vec<Storage>,
    pub cpu: Cpu,
    pub hostname: String,
    // Slipway's additions.
    pub memory: Memory,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub numa_nodes: Vec<NumaNode>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pci_devices: Vec<PciDevice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bmc: Option<Bmc>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SystemVendor {
    pub manufacturer: String,
    pub product_name: String,
    pub serial_number: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uuid: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sku: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub family: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Firmware {
    pub bios: Bios,
    /// "UEFI" or "legacy".
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub boot_mode: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_boot: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cpu {
    pub arch: String,
    pub model: String,
    pub clock_megahertz: f64,
    pub flags: Vec<String>,
    pub count: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub vendor: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cores: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sockets: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads_per_core: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_clock_megahertz: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Memory {
    /// Usable by the kernel, bytes.
    pub total_bytes: u64,
    /// Installed, from SMBIOS; 0 when unknown.
    pub physical_mebibytes: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dimms: Vec<Dimm>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Dimm {
    pub locator: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub bank_locator: String,
    pub size_mebibytes: u64,
    #[serde(rename = "type", default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub form_factor: String,
    #[serde(default)]
    pub speed_mts: u32,
    #[serde(default)]
    pub configured_speed_mts: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub manufacturer: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub serial_number: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub part_number: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NumaNode {
    pub id: u32,
    pub cpus: Vec<u32>,
    pub memory_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Nic {
    pub name: String,
    /// metal3: "vendor device" ids, e.g. "0x8086 0x1572"; the driver when not on PCI.
    pub model: String,
    pub mac: String,
    pub ip: String,
    pub speed_gbps: u32,
    pub pxe: bool,
    // Slipway's additions.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub permanent_mac: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub driver: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pci_address: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub vendor_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub device_id: String,
    #[serde(default)]
    pub speed_mbps: u32,
    #[serde(default)]
    pub mtu: u32,
    #[serde(default, skip_serializing_if = "is_false")]
    pub has_carrier: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub operstate: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_node: Option<u32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub bond_master: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bond: Option<Bond>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lldp: Option<Lldp>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Bond {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mode: String,
    pub members: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lldp {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub chassis_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub port_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub port_description: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub system_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub system_description: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub management_addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_vlan_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vlans: Vec<LldpVlan>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LldpVlan {
    pub id: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Storage {
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alternate_names: Vec<String>,
    pub rotational: bool,
    #[serde(rename = "type")]
    pub kind: String,
    pub size_bytes: u64,
    pub vendor: String,
    pub model: String,
    pub serial_number: String,
    pub wwn: String,
    pub wwn_vendor_extension: String,
    pub wwn_with_extension: String,
    pub hctl: String,
    // Slipway's additions.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub by_path: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub transport: String,
    #[serde(default)]
    pub logical_block_size: u32,
    #[serde(default)]
    pub physical_block_size: u32,
    #[serde(default, skip_serializing_if = "is_false")]
    pub removable: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_node: Option<u32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub partition_table: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<Partition>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Partition {
    pub name: String,
    pub number: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_bytes: Option<u64>,
    pub size_bytes: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub label: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PciDevice {
    pub address: String,
    pub class: String,
    /// Resolved here, from the class code.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub class_name: String,
    pub vendor_id: String,
    /// Resolved here, from a small built-in table.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub vendor_name: String,
    pub device_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub subsystem_vendor_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub subsystem_device_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub revision: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub driver: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_node: Option<u32>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub gpu: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Bmc {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ipv4_address: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ipv6_address: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub interface: String,
}

/// metal3's `status.hardware` summary of the full record.
pub fn details(h: &Hardware) -> HardwareDetails {
    HardwareDetails {
        system_vendor: HardwareSystemVendor {
            manufacturer: h.system_vendor.manufacturer.clone(),
            product_name: h.system_vendor.product_name.clone(),
            serial_number: h.system_vendor.serial_number.clone(),
        },
        firmware: SummaryFirmware {
            bios: h.firmware.bios.clone(),
        },
        ram_mebibytes: h.ram_mebibytes,
        nics: h
            .nics
            .iter()
            .map(|n| SummaryNic {
                name: n.name.clone(),
                model: n.model.clone(),
                mac: n.mac.clone(),
                ip: n.ip.clone(),
                speed_gbps: n.speed_gbps,
                pxe: n.pxe,
            })
            .collect(),
        storage: h
            .storage
            .iter()
            .map(|d| {
                let mut alternate_names = d.alternate_names.clone();
                if !d.by_path.is_empty() {
                    alternate_names.insert(0, d.by_path.clone());
                }
                SummaryStorage {
                    name: d.name.clone(),
                    alternate_names,
                    rotational: d.rotational,
                    kind: d.kind.clone(),
                    size_bytes: d.size_bytes,
                    vendor: d.vendor.clone(),
                    model: d.model.clone(),
                    serial_number: d.serial_number.clone(),
                    wwn: d.wwn.clone(),
                    wwn_vendor_extension: d.wwn_vendor_extension.clone(),
                    wwn_with_extension: d.wwn_with_extension.clone(),
                    hctl: d.hctl.clone(),
                }
            })
            .collect(),
        cpu: SummaryCpu {
            arch: h.cpu.arch.clone(),
            model: h.cpu.model.clone(),
            clock_megahertz: h.cpu.clock_megahertz,
            flags: h.cpu.flags.clone().into(),
            count: h.cpu.count,
        },
        hostname: h.hostname.clone(),
    }
}

/// A display name for a PCI class code ("020000" -> "Ethernet controller").
pub fn class_name(class: &str) -> &'static str {
    let sub = class.get(..4).unwrap_or("");
    match sub {
        "0100" => "SCSI storage controller",
        "0101" => "IDE interface",
        "0104" => "RAID bus controller",
        "0106" => "SATA controller",
        "0107" => "Serial Attached SCSI controller",
        "0108" => "Non-Volatile memory controller",
        "0180" => "Mass storage controller",
        "0200" => "Ethernet controller",
        "0207" => "Infiniband controller",
        "0280" => "Network controller",
        "0300" => "VGA compatible controller",
        "0302" => "3D controller",
        "0380" => "Display controller",
        "0403" => "Audio device",
        "0600" => "Host bridge",
        "0601" => "ISA bridge",
        "0604" => "PCI bridge",
        "0680" => "Bridge",
        "0c03" => "USB controller",
        "0c05" => "SMBus",
        "1200" => "Processing accelerators",
        _ => match class.get(..2).unwrap_or("") {
            "01" => "Mass storage controller",
            "02" => "Network controller",
            "03" => "Display controller",
            "04" => "Multimedia controller",
            "05" => "Memory controller",
            "06" => "Bridge",
            "07" => "Communication controller",
            "08" => "Generic system peripheral",
            "0c" => "Serial bus controller",
            "12" => "Processing accelerators",
            _ => "",
        },
    }
}

/// A display name for the PCI vendors common in servers; empty for others.
pub fn vendor_name(id: &str) -> &'static str {
    match id.trim_start_matches("0x") {
        "8086" => "Intel",
        "1022" => "AMD",
        "1002" => "AMD/ATI",
        "10de" => "NVIDIA",
        "15b3" => "Mellanox",
        "14e4" => "Broadcom",
        "1000" => "Broadcom/LSI",
        "9005" => "Microchip/Adaptec",
        "1077" => "QLogic",
        "19a2" | "10df" => "Emulex",
        "1924" => "Solarflare",
        "1d0f" => "Amazon",
        "144d" => "Samsung",
        "1c5c" => "SK hynix",
        "15b7" => "Sandisk/WD",
        "1344" => "Micron",
        "1e0f" => "KIOXIA",
        "8888" => "Huawei",
        "19e5" => "Huawei",
        "102b" => "Matrox",
        "1a03" => "ASPEED",
        "103c" => "HPE",
        "1028" => "Dell",
        "1af4" => "Red Hat (virtio)",
        "1b36" => "Red Hat (QEMU)",
        "1234" => "QEMU",
        "15ad" => "VMware",
        "1414" => "Microsoft",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(class_name("020000"), "Ethernet controller");
        assert_eq!(class_name("030200"), "3D controller");
        assert_eq!(class_name("0d1100"), "");
        assert_eq!(class_name(""), "");
        assert_eq!(vendor_name("0x10de"), "NVIDIA");
        assert_eq!(vendor_name("0xffff"), "");
    }
}
