//! The system and its firmware: `/sys/class/dmi/id` (the kernel's decoded SMBIOS types 0, 1),
//! falling back to the raw SMBIOS table; boot mode and Secure Boot from `/sys/firmware/efi`.

use serde::{Deserialize, Serialize};

use super::root::Root;
use super::smbios::{self, Structure};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SystemInfo {
    pub manufacturer: Option<String>,
    pub product_name: Option<String>,
    /// The product version (SMBIOS type 1).
    pub version: Option<String>,
    pub serial_number: Option<String>,
    /// Lower-case, as the kernel shows it.
    pub uuid: Option<String>,
    pub sku: Option<String>,
    pub family: Option<String>,
    pub bios_vendor: Option<String>,
    pub bios_version: Option<String>,
    pub bios_date: Option<String>,
}

pub fn collect(root: &Root, table: &[Structure<'_>]) -> SystemInfo {
    let id = |name: &str| {
        root.text(format!("sys/class/dmi/id/{name}"))
            .filter(|v| !smbios::placeholder(v))
    };
    let t0 = table.iter().find(|s| s.kind == 0);
    let t1 = table.iter().find(|s| s.kind == 1);
    let from = |s: Option<&Structure<'_>>, off: usize| {
        s.and_then(|s| s.string(off))
            .filter(|v| !smbios::placeholder(v))
    };
    SystemInfo {
        manufacturer: id("sys_vendor").or_else(|| from(t1, 4)),
        product_name: id("product_name").or_else(|| from(t1, 5)),
        version: id("product_version").or_else(|| from(t1, 6)),
        serial_number: id("product_serial").or_else(|| from(t1, 7)),
        uuid: id("product_uuid")
            .or_else(|| t1.and_then(smbios::uuid))
            .map(|u| u.to_ascii_lowercase()),
        sku: id("product_sku").or_else(|| from(t1, 0x19)),
        family: id("product_family").or_else(|| from(t1, 0x1A)),
        bios_vendor: id("bios_vendor").or_else(|| from(t0, 4)),
        bios_version: id("bios_version").or_else(|| from(t0, 5)),
        bios_date: id("bios_date").or_else(|| from(t0, 8)),
    }
}

/// "UEFI" when the kernel was booted by UEFI firmware, else "legacy".
pub fn boot_mode(root: &Root) -> String {
    if root.exists("sys/firmware/efi") {
        "UEFI".into()
    } else {
        "legacy".into()
    }
}

const SECURE_BOOT_VAR: &str =
    "sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c";

/// Secure Boot state from the `SecureBoot` EFI variable (4 bytes of attributes, then the
/// value). `None` on BIOS machines or when efivarfs is not mounted.
pub fn secure_boot(root: &Root) -> Option<bool> {
    let b = root.bytes_max(SECURE_BOOT_VAR, 64)?;
    match b.get(4) {
        Some(1) => Some(true),
        Some(0) => Some(false),
        _ => None,
    }
}

pub fn hostname(root: &Root) -> Option<String> {
    root.text("proc/sys/kernel/hostname")
        .filter(|h| h != "(none)")
}
