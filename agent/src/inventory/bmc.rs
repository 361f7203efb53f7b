//! The BMC, where the host exposes it: the Redfish host interface (SMBIOS type 42) gives the
//! BMC's address; SMBIOS type 38 and `/dev/ipmi*` say there is an IPMI BMC. Absent on virtual
//! machines and on many servers: then `None`, never an error.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::root::Root;
use super::smbios::{self, Structure};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Bmc {
    pub ipv4_address: Option<String>,
    pub ipv6_address: Option<String>,
    pub mac: Option<String>,
    /// How the host talks to it: "IPMI 2.0 KCS", "Redfish host interface".
    pub interface: Option<String>,
}

pub fn collect(root: &Root, table: &[Structure<'_>]) -> Option<Bmc> {
    let mut bmc = Bmc::default();
    for s in table {
        if let Some(i) = smbios::ipmi_interface(s) {
            bmc.interface.get_or_insert(i);
        }
        if let Some(addr) = smbios::redfish_service_address(s) {
            match addr {
                IpAddr::V4(a) => bmc.ipv4_address.get_or_insert(a.to_string()),
                IpAddr::V6(a) => bmc.ipv6_address.get_or_insert(a.to_string()),
            };
            if bmc.interface.is_none() {
                bmc.interface = Some("Redfish host interface".into());
            }
        }
    }
    if bmc.interface.is_none()
        && ["dev/ipmi0", "dev/ipmi/0", "dev/ipmidev/0"]
            .iter()
            .any(|p| root.exists(p))
    {
        bmc.interface = Some("IPMI".into());
    }
    (bmc != Bmc::default()).then_some(bmc)
}
