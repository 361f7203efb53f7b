//! The BMC, where the host exposes it. Its LAN address and MAC come from the BMC itself over
//! the kernel's IPMI device ([`super::ipmi`], Get LAN Configuration Parameters; the running
//! machine only); the Redfish host interface (SMBIOS type 42) gives the address the host
//! reaches the BMC at, used when IPMI says nothing; SMBIOS type 38, the IPMI version from Get
//! Device ID, or a `/dev/ipmi*` node say how the host talks to it. Absent on virtual machines
//! and on many servers: then `None` (and any field it cannot learn is `None`), never an
//! error.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::ipmi::LanInfo;
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

/// `ipmi_device`: an IPMI device node exists ([`ipmi::device_path`]); `lan`: what the BMC
/// said through it (see [`ipmi::query_device`]), when it was asked.
pub fn collect(table: &[Structure<'_>], ipmi_device: bool, lan: Option<&LanInfo>) -> Option<Bmc> {
    let mut bmc = Bmc::default();
    // The BMC's own LAN settings first: that is where operators and Slipway reach it.
    if let Some(lan) = lan {
        bmc.ipv4_address = lan.ipv4.map(|a| a.to_string());
        bmc.ipv6_address = lan.ipv6.map(|a| a.to_string());
        bmc.mac = lan.mac.clone();
    }
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
    if bmc.interface.is_none() {
        if let Some(v) = lan.and_then(|l| l.ipmi_version.as_deref()) {
            bmc.interface = Some(format!("IPMI {v}"));
        } else if lan.is_some() || ipmi_device {
            bmc.interface = Some("IPMI".into());
        }
    }
    (bmc != Bmc::default()).then_some(bmc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn the_bmc_s_own_lan_settings_come_first() {
        let lan = LanInfo {
            ipmi_version: Some("2.0".into()),
            channel: Some(1),
            ipv4: Some(Ipv4Addr::new(192, 0, 2, 45)),
            ipv6: None,
            mac: Some("52:54:00:b3:c0:01".into()),
        };
        assert_eq!(
            collect(&[], true, Some(&lan)),
            Some(Bmc {
                ipv4_address: Some("192.0.2.45".into()),
                ipv6_address: None,
                mac: Some("52:54:00:b3:c0:01".into()),
                interface: Some("IPMI 2.0".into()),
            })
        );
        // A BMC that said nothing is still a BMC.
        assert_eq!(
            collect(&[], true, Some(&LanInfo::default())),
            Some(Bmc {
                interface: Some("IPMI".into()),
                ..Bmc::default()
            })
        );
        // A device node that could not be asked says there is an IPMI BMC.
        assert_eq!(
            collect(&[], true, None),
            Some(Bmc {
                interface: Some("IPMI".into()),
                ..Bmc::default()
            })
        );
        assert_eq!(collect(&[], false, None), None);
    }
}
