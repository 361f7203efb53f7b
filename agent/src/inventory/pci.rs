//! PCI functions from `/sys/bus/pci/devices`. Ids only: names are the coordinator's business.

use serde::{Deserialize, Serialize};

use super::root::Root;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PciDevice {
    /// Domain:bus:device.function, "0000:3b:00.0".
    pub address: String,
    /// Class code, 6 hex digits (class, subclass, programming interface): "020000".
    pub class: Option<String>,
    /// "0x8086".
    pub vendor_id: Option<String>,
    pub device_id: Option<String>,
    pub subsystem_vendor_id: Option<String>,
    pub subsystem_device_id: Option<String>,
    pub revision: Option<String>,
    pub driver: Option<String>,
    pub numa_node: Option<u32>,
    /// A display controller (class 03): a GPU.
    pub gpu: bool,
}

pub fn collect(root: &Root) -> Vec<PciDevice> {
    root.list("sys/bus/pci/devices")
        .into_iter()
        .map(|address| {
            let dir = format!("sys/bus/pci/devices/{address}");
            let id = |name: &str| {
                root.hex(format!("{dir}/{name}"))
                    .filter(|v| *v <= 0xFFFF)
                    .map(|v| format!("0x{v:04x}"))
            };
            let class = root
                .hex(format!("{dir}/class"))
                .filter(|c| *c <= 0xFF_FFFF)
                .map(|c| format!("{c:06x}"));
            PciDevice {
                gpu: class.as_deref().is_some_and(|c| c.starts_with("03")),
                class,
                vendor_id: id("vendor"),
                device_id: id("device"),
                subsystem_vendor_id: id("subsystem_vendor"),
                subsystem_device_id: id("subsystem_device"),
                revision: root
                    .hex(format!("{dir}/revision"))
                    .filter(|v| *v <= 0xFF)
                    .map(|v| format!("0x{v:02x}")),
                driver: root.link_name(format!("{dir}/driver")),
                numa_node: root
                    .i64(format!("{dir}/numa_node"))
                    .and_then(|n| u32::try_from(n).ok()),
                address,
            }
        })
        .collect()
}
