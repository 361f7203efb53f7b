//! Settings from the kernel command line (`slipway.coordinator=`, `slipway.token=`,
//! `slipway.ca=`, `slipway.mac=` or `BOOTIF=`), as the ramdisk's boot script passes them.

/// What the kernel command line says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cmdline {
    pub coordinator: Option<String>,
    pub token: Option<String>,
    pub ca: Option<String>,
    pub boot_mac: Option<String>,
}

/// Parses `/proc/cmdline`. Unknown words are ignored; the last occurrence of a key wins.
pub fn parse_cmdline(text: &str) -> Cmdline {
    let mut c = Cmdline::default();
    for word in text.split_whitespace() {
        let Some((k, v)) = word.split_once('=') else {
            continue;
        };
        let v = v.trim_matches('"').to_string();
        if v.is_empty() {
            continue;
        }
        match k {
            "slipway.coordinator" => c.coordinator = Some(v),
            "slipway.token" => c.token = Some(v),
            "slipway.ca" => c.ca = Some(v),
            "slipway.mac" => c.boot_mac = Some(v.to_ascii_lowercase()),
            // pxelinux/iPXE style: BOOTIF=01-52-54-00-12-34-56 (01 = Ethernet).
            "BOOTIF" if c.boot_mac.is_none() => {
                let hex = v.strip_prefix("01-").unwrap_or(&v);
                c.boot_mac = Some(hex.replace('-', ":").to_ascii_lowercase());
            }
            _ => {}
        }
    }
    c
}

/// Sizes as `4G`, `512M`, `64K` or plain bytes (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("{s:?}: unknown unit (use K, M, G or T)")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size such as 4G or 512M"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_settings() {
        let c = parse_cmdline(
            "BOOT_IMAGE=/vmlinuz console=ttyS0 slipway.coordinator=https://10.0.2.2:9443 slipway.token=abc \
             slipway.ca=sha256:00ff BOOTIF=01-52-54-00-AB-CD-EF quiet",
        );
        assert_eq!(c.coordinator.as_deref(), Some("https://10.0.2.2:9443"));
        assert_eq!(c.token.as_deref(), Some("abc"));
        assert_eq!(c.ca.as_deref(), Some("sha256:00ff"));
        assert_eq!(c.boot_mac.as_deref(), Some("52:54:00:ab:cd:ef"));
        assert_eq!(
            parse_cmdline("slipway.mac=AA:BB:CC:DD:EE:FF BOOTIF=01-00-00-00-00-00-00")
                .boot_mac
                .as_deref(),
            Some("aa:bb:cc:dd:ee:ff")
        );
        assert_eq!(parse_cmdline(""), Cmdline::default());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("4X").is_err());
        assert!(parse_size("lots").is_err());
    }
}
