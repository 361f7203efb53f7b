//! SMBIOS (DMI) structures from `/sys/firmware/dmi/tables/DMI`, the raw table the firmware
//! gave the kernel (DMTF DSP0134). Pure parsing of bytes: every offset is bounds-checked, so a
//! truncated or hostile table gives fewer or emptier structures, never a panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One structure: its type, formatted area (header included) and strings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Structure<'a> {
    pub kind: u8,
    pub data: &'a [u8],
    strings: Vec<&'a [u8]>,
}

impl<'a> Structure<'a> {
    pub fn byte(&self, off: usize) -> Option<u8> {
        self.data.get(off).copied()
    }

    pub fn word(&self, off: usize) -> Option<u16> {
        let b = self.data.get(off..off + 2)?;
        Some(u16::from_le_bytes([b[0], b[1]]))
    }

    pub fn dword(&self, off: usize) -> Option<u32> {
        let b = self.data.get(off..off + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// The string whose 1-based index is at `off`; `None` for index 0, a missing string,
    /// non-UTF-8 or only blanks.
    pub fn string(&self, off: usize) -> Option<String> {
        let idx = usize::from(self.byte(off)?);
        let raw = self.strings.get(idx.checked_sub(1)?)?;
        let s = std::str::from_utf8(raw).ok()?;
        super::root::clean(s)
    }
}

/// Splits a table into structures. Stops at the end-of-table structure (type 127) or at the
/// first structure that does not fit.
pub fn parse(table: &[u8]) -> Vec<Structure<'_>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos + 4 <= table.len() {
        let kind = table[pos];
        let len = usize::from(table[pos + 1]);
        if len < 4 || pos + len > table.len() {
            break;
        }
        let data = &table[pos..pos + len];
        // Strings: NUL-terminated, the set ends with an extra NUL (or two NULs when empty).
        let mut strings = Vec::new();
        let mut p = pos + len;
        let mut terminated = false;
        while p < table.len() {
            let Some(end) = table[p..].iter().position(|&b| b == 0) else {
                break;
            };
            if end == 0 {
                // Empty set ("\0\0") or the terminator after the last string.
                p += if strings.is_empty() { 2 } else { 1 };
                terminated = true;
                break;
            }
            strings.push(&table[p..p + end]);
            p += end + 1;
        }
        out.push(Structure {
            kind,
            data,
            strings,
        });
        if kind == 127 || !terminated {
            break;
        }
        pos = p;
    }
    out
}

/// The system UUID of type 1 in the byte order SMBIOS 2.6+ specifies (the first three fields
/// little-endian), as the kernel's `product_uuid` shows it. `None` for all-zero or all-FF.
pub fn uuid(s: &Structure<'_>) -> Option<String> {
    let b = s.data.get(8..24)?;
    if b.iter().all(|&x| x == 0) || b.iter().all(|&x| x == 0xff) {
        return None;
    }
    Some(format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        b[3],
        b[2],
        b[1],
        b[0],
        b[5],
        b[4],
        b[7],
        b[6],
        b[8],
        b[9],
        b[10],
        b[11],
        b[12],
        b[13],
        b[14],
        b[15]
    ))
}

/// A memory device (type 17) that holds a module.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryDevice {
    pub size_mib: Option<u64>,
    pub locator: Option<String>,
    pub bank_locator: Option<String>,
    pub kind: Option<String>,
    pub form_factor: Option<String>,
    pub speed_mts: Option<u32>,
    pub configured_speed_mts: Option<u32>,
    pub manufacturer: Option<String>,
    pub serial_number: Option<String>,
    pub part_number: Option<String>,
}

/// Type 17; `None` for an empty slot.
pub fn memory_device(s: &Structure<'_>) -> Option<MemoryDevice> {
    if s.kind != 17 {
        return None;
    }
    let size_mib = match s.word(0x0C) {
        Some(0) => return None,
        None | Some(0xFFFF) => None,
        Some(0x7FFF) => s.dword(0x1C).map(|e| u64::from(e & 0x7FFF_FFFF)),
        Some(w) if w & 0x8000 != 0 => Some(u64::from(w & 0x7FFF) / 1024),
        Some(w) => Some(u64::from(w)),
    }
    .filter(|m| *m > 0);
    let speed = |off: usize, ext: usize| match s.word(off) {
        None | Some(0) => None,
        Some(0xFFFF) => s.dword(ext).map(|e| e & 0x7FFF_FFFF).filter(|&e| e > 0),
        Some(w) => Some(u32::from(w)),
    };
    Some(MemoryDevice {
        size_mib,
        locator: s.string(0x10),
        bank_locator: s.string(0x11),
        kind: s.byte(0x12).and_then(memory_type),
        form_factor: s.byte(0x0E).and_then(form_factor),
        speed_mts: speed(0x15, 0x54),
        configured_speed_mts: speed(0x20, 0x58),
        manufacturer: s.string(0x17).filter(|m| !placeholder(m)),
        serial_number: s.string(0x18).filter(|m| !placeholder(m)),
        part_number: s.string(0x1A).filter(|m| !placeholder(m)),
    })
}

/// Firmware fillers that mean "unknown".
pub fn placeholder(s: &str) -> bool {
    let l = s.to_ascii_lowercase();
    [
        "unknown",
        "not specified",
        "not available",
        "to be filled by o.e.m.",
        "default string",
        "none",
        "n/a",
        "0000000000000000",
        "00000000",
    ]
    .contains(&l.as_str())
}

fn memory_type(b: u8) -> Option<String> {
    let s = match b {
        0x03 => "DRAM",
        0x04 => "EDRAM",
        0x05 => "VRAM",
        0x06 => "SRAM",
        0x07 => "RAM",
        0x08 => "ROM",
        0x09 => "Flash",
        0x0A => "EEPROM",
        0x0B => "FEPROM",
        0x0C => "EPROM",
        0x0D => "CDRAM",
        0x0E => "3DRAM",
        0x0F => "SDRAM",
        0x10 => "SGRAM",
        0x11 => "RDRAM",
        0x12 => "DDR",
        0x13 => "DDR2",
        0x14 => "DDR2 FB-DIMM",
        0x18 => "DDR3",
        0x19 => "FBD2",
        0x1A => "DDR4",
        0x1B => "LPDDR",
        0x1C => "LPDDR2",
        0x1D => "LPDDR3",
        0x1E => "LPDDR4",
        0x1F => "Logical non-volatile device",
        0x20 => "HBM",
        0x21 => "HBM2",
        0x22 => "DDR5",
        0x23 => "LPDDR5",
        0x24 => "HBM3",
        _ => return None,
    };
    Some(s.into())
}

fn form_factor(b: u8) -> Option<String> {
    let s = match b {
        0x03 => "SIMM",
        0x04 => "SIP",
        0x05 => "Chip",
        0x06 => "DIP",
        0x07 => "ZIP",
        0x08 => "Proprietary Card",
        0x09 => "DIMM",
        0x0A => "TSOP",
        0x0B => "Row of chips",
        0x0C => "RIMM",
        0x0D => "SODIMM",
        0x0E => "SRIMM",
        0x0F => "FB-DIMM",
        0x10 => "Die",
        _ => return None,
    };
    Some(s.into())
}

/// Type 38: how the host talks IPMI to its BMC.
pub fn ipmi_interface(s: &Structure<'_>) -> Option<String> {
    if s.kind != 38 {
        return None;
    }
    let t = match s.byte(0x04)? {
        1 => "KCS",
        2 => "SMIC",
        3 => "BT",
        4 => "SSIF",
        _ => return None,
    };
    let rev = s.byte(0x05).unwrap_or(0);
    Some(format!("IPMI {}.{} {t}", rev >> 4, rev & 0x0F))
}

/// Type 42 (Management Controller Host Interface): the Redfish service address of a
/// "Redfish over IP" protocol record, i.e. the BMC's address as the host reaches it.
pub fn redfish_service_address(s: &Structure<'_>) -> Option<IpAddr> {
    if s.kind != 42 {
        return None;
    }
    let specific_len = usize::from(s.byte(0x05)?);
    let mut p = 0x06 + specific_len;
    let count = s.byte(p)?;
    p += 1;
    for _ in 0..count {
        let proto = s.byte(p)?;
        let len = usize::from(s.byte(p + 1)?);
        let data = s.data.get(p + 2..p + 2 + len)?;
        if proto == 0x04 {
            // UUID(16) assignment(1) host format(1) host ip(16) host mask(16)
            // discovery(1) service format(1) service ip(16) ...
            let format = *data.get(51)?;
            let ip = data.get(52..68)?;
            let addr = match format {
                1 => IpAddr::V4(Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3])),
                2 => {
                    let mut a = [0u8; 16];
                    a.copy_from_slice(ip);
                    IpAddr::V6(Ipv6Addr::from(a))
                }
                _ => continue,
            };
            if !addr.is_unspecified() {
                return Some(addr);
            }
        }
        p += 2 + len;
    }
    None
}

#[cfg(test)]
pub mod build {
    //! Builds SMBIOS structures for tests and hand-made fixtures.

    /// A structure of `kind` with formatted bytes after the 4-byte header, and its strings.
    pub fn structure(kind: u8, handle: u16, body: &[u8], strings: &[&str]) -> Vec<u8> {
        let len = u8::try_from(4 + body.len()).unwrap_or(u8::MAX);
        let mut v = vec![kind, len];
        v.extend_from_slice(&handle.to_le_bytes());
        v.extend_from_slice(body);
        if strings.is_empty() {
            v.extend_from_slice(&[0, 0]);
        } else {
            for s in strings {
                v.extend_from_slice(s.as_bytes());
                v.push(0);
            }
            v.push(0);
        }
        v
    }

    /// A type 17 memory device of `size_mib` MiB.
    pub fn dimm(handle: u16, size_mib: u16, speed: u16, strings: &[&str]) -> Vec<u8> {
        // Offsets are from the start of the structure; the body starts at 4.
        let mut b = vec![0u8; 0x28 - 4];
        let mut put = |off: usize, bytes: &[u8]| {
            b[off - 4..off - 4 + bytes.len()].copy_from_slice(bytes);
        };
        put(0x08, &72u16.to_le_bytes());
        put(0x0A, &64u16.to_le_bytes());
        put(0x0C, &size_mib.to_le_bytes());
        put(0x0E, &[0x09]); // DIMM
        put(0x10, &[1, 2]); // locator, bank locator
        put(0x12, &[0x1A]); // DDR4
        put(0x15, &speed.to_le_bytes());
        put(0x17, &[3, 4, 0, 5]); // manufacturer, serial, asset tag, part number
        put(0x20, &speed.to_le_bytes());
        structure(17, handle, &b, strings)
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;

    #[test]
    fn parses_dimms_and_survives_truncation() {
        let mut t = structure(1, 1, &[1, 2, 0, 3], &["QEMU", "Standard PC", "S-1"]);
        t.extend(dimm(
            2,
            16384,
            3200,
            &[
                "DIMM A1",
                "P0 CHANNEL A",
                "Samsung",
                "0xDEADBEEF",
                "M393A2K43DB3-CWE",
            ],
        ));
        t.extend(dimm(3, 0, 0, &["DIMM A2", "P0 CHANNEL A"]));
        t.extend(structure(127, 4, &[], &[]));
        let s = parse(&t);
        assert_eq!(s.len(), 4);
        assert_eq!(s[0].string(4).as_deref(), Some("QEMU"));
        assert_eq!(s[0].string(6), None, "index 0 is no string");
        let d = memory_device(&s[1]).unwrap();
        assert_eq!(d.size_mib, Some(16384));
        assert_eq!(d.kind.as_deref(), Some("DDR4"));
        assert_eq!(d.form_factor.as_deref(), Some("DIMM"));
        assert_eq!(d.speed_mts, Some(3200));
        assert_eq!(d.locator.as_deref(), Some("DIMM A1"));
        assert_eq!(d.part_number.as_deref(), Some("M393A2K43DB3-CWE"));
        assert_eq!(memory_device(&s[2]), None, "empty slot");
        // Every truncation parses without panicking, to fewer structures.
        for n in 0..t.len() {
            let s = parse(&t[..n]);
            for x in &s {
                let _ = memory_device(x);
                let _ = redfish_service_address(x);
                let _ = ipmi_interface(x);
                let _ = uuid(x);
            }
        }
    }

    #[test]
    fn extended_sizes_and_kib_units() {
        let mut b = dimm(1, 0x7FFF, 0xFFFF, &[]);
        b[0x1C..0x20].copy_from_slice(&(64u32 * 1024).to_le_bytes());
        let s = parse(&b);
        assert_eq!(memory_device(&s[0]).unwrap().size_mib, Some(65536));
        let b = dimm(1, 0x8000 | 2048, 2400, &[]);
        assert_eq!(memory_device(&parse(&b)[0]).unwrap().size_mib, Some(2));
    }

    #[test]
    fn redfish_host_interface_gives_the_bmc_address() {
        // interface type 0x40, 1 byte of specific data, one Redfish-over-IP record.
        let mut proto = vec![0u8; 91];
        proto[51] = 1;
        proto[52..56].copy_from_slice(&[169, 254, 0, 1]);
        let mut body = vec![0x40, 1, 0x05, 1, 0x04, u8::try_from(proto.len()).unwrap()];
        body.extend(proto);
        let t = structure(42, 9, &body, &[]);
        let s = parse(&t);
        assert_eq!(
            redfish_service_address(&s[0]),
            Some("169.254.0.1".parse().unwrap())
        );
    }
}
