//! What a booting machine is told: iPXE scripts, kernel arguments, per-host ISOs, and the
//! dnsmasq configuration that sends PXE clients here. Pure functions; the HTTP handlers in
//! `http` serve them and the controller decides which one a MAC gets.

use std::fmt::Write as _;

/// Where agents and booting machines reach this coordinator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Urls {
    /// `http://HOST:PORT` of the boot and image server.
    pub http: String,
    /// `https://HOST:PORT` of the agent API.
    pub agent: String,
    /// `sha256:HEX` of the CA certificate.
    pub ca_fingerprint: String,
}

/// Console arguments when the ramdisk's manifest gives none.
pub const DEFAULT_CONSOLE: &str = "console=tty0 console=ttyS0,115200";

/// The placeholder the ISO template carries where per-host arguments go (see xtask ramdisk).
pub const ISO_PLACEHOLDER: &[u8] = b"@@SLIPWAY_KERNEL_ARGS@@";

/// `aa:bb:cc:dd:ee:ff` from the forms iPXE and operators write (`:`/`-` separated, any case).
pub fn normalize_mac(s: &str) -> Option<String> {
    let parts: Vec<&str> = s.trim().split([':', '-']).collect();
    if parts.len() != 6
        || parts
            .iter()
            .any(|p| p.len() != 2 || u8::from_str_radix(p, 16).is_err())
    {
        return None;
    }
    Some(parts.join(":").to_ascii_lowercase())
}

/// The entry script: DHCP handed the machine this URL (or iPXE embedded it); it asks for the
/// machine's own script by MAC. When that script exits (local boot, refusal), so does this
/// one, and the firmware goes on to the next boot device.
pub fn entry_script(urls: &Urls) -> String {
    let http = &urls.http;
    format!(
        "#!ipxe\n\
         echo Slipway: asking {http} for this machine's boot script\n\
         :retry\n\
         chain --autofree {http}/boot/ipxe?mac=${{mac:hexhyp}}&uuid=${{uuid}} || goto failed\n\
         exit\n\
         :failed\n\
         echo Slipway: the coordinator at {http} did not answer; retrying in 10 s\n\
         sleep 10\n\
         goto retry\n"
    )
}

/// Kernel arguments of the ramdisk for one host.
pub fn kernel_args(urls: &Urls, token: &str, boot_mac: Option<&str>, console: &str) -> String {
    let mut args = format!(
        "{console} slipway.coordinator={} slipway.token={token} slipway.ca={}",
        urls.agent, urls.ca_fingerprint
    );
    if let Some(mac) = boot_mac {
        let _ = write!(args, " BOOTIF=01-{}", mac.replace(':', "-"));
    }
    args
}

/// Boots the Slipway ramdisk.
pub fn ramdisk_script(urls: &Urls, host: &str, args: &str) -> String {
    let http = &urls.http;
    format!(
        "#!ipxe\n\
         echo Slipway: booting the ramdisk for host {host}\n\
         kernel {http}/boot/vmlinuz initrd=initramfs {args}\n\
         initrd --name initramfs {http}/boot/initramfs\n\
         boot\n"
    )
}

/// Leaves iPXE, so the firmware boots the next device: the installed disk.
pub fn local_boot_script(host: &str, state: &str) -> String {
    format!("#!ipxe\necho Slipway: host {host} is {state}; booting from its disk\nexit\n")
}

/// Declines to boot a machine, with the reason on its console.
/// Asks again after `seconds` (the host's agent is connected now; a machine that rebooted
/// gets its ramdisk once the old session has lapsed).
pub fn wait_script(urls: &Urls, reason: &str, seconds: u32) -> String {
    let reason = reason.replace(['\n', '\r'], " ");
    format!(
        "#!ipxe\necho Slipway: {reason}\necho Slipway: asking again in {seconds} s\nsleep {seconds}\nchain --autofree {}/boot/ipxe?mac=${{mac:hexhyp}} || exit\n",
        urls.http
    )
}

pub fn refusal_script(reason: &str) -> String {
    let reason = reason.replace(['\n', '\r'], " ");
    format!("#!ipxe\necho Slipway: {reason}\nexit\n")
}

/// The per-host ISO: the template with the placeholder region replaced by `args`, padded with
/// spaces to the same length, so the ISO's layout is unchanged. Every copy of the placeholder
/// is replaced (the BIOS and UEFI paths may each carry one).
pub fn patch_iso(template: &[u8], args: &str) -> Result<Vec<u8>, String> {
    let starts: Vec<usize> = template
        .windows(ISO_PLACEHOLDER.len())
        .enumerate()
        .filter(|(_, w)| *w == ISO_PLACEHOLDER)
        .map(|(i, _)| i)
        .collect();
    if starts.is_empty() {
        return Err("the ISO template has no kernel-arguments placeholder; rebuild it with cargo xtask ramdisk".into());
    }
    let mut out = template.to_vec();
    for start in starts {
        // The region is the placeholder and the '#' padding after it.
        let mut end = start + ISO_PLACEHOLDER.len();
        while end < out.len() && out[end] == b'#' {
            end += 1;
        }
        let room = end - start;
        if args.len() > room {
            return Err(format!(
                "the kernel arguments ({} bytes) do not fit the ISO's {room} bytes",
                args.len()
            ));
        }
        out[start..start + args.len()].copy_from_slice(args.as_bytes());
        out[start + args.len()..end].fill(b' ');
    }
    Ok(out)
}

/// How dnsmasq should hand out PXE boot information.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DhcpMode {
    /// Next to the site's DHCP server: dnsmasq answers only the PXE part (ProxyDHCP).
    Proxy,
    /// dnsmasq is the network's DHCP server.
    Full,
}

/// Settings of the printed dnsmasq configuration.
#[derive(Clone, Debug)]
pub struct DnsmasqOptions {
    pub mode: DhcpMode,
    pub interface: Option<String>,
    /// Proxy mode: the subnet's network address (e.g. 192.168.1.0). Full mode: a range
    /// `START,END[,NETMASK]`.
    pub range: String,
    /// Where Debian's `ipxe` package keeps undionly.kpxe and ipxe.efi.
    pub tftp_root: String,
}

/// A dnsmasq configuration that chain-loads iPXE (BIOS and UEFI) and then Slipway's entry
/// script. iPXE is told apart by DHCP option 175; option 175 `b0:01:01` also tells iPXE not
/// to wait for a ProxyDHCP answer it will not get in full mode.
pub fn dnsmasq_config(o: &DnsmasqOptions, urls: &Urls) -> String {
    let entry = format!("{}/boot/boot.ipxe", urls.http);
    let mut c = String::new();
    let _ = writeln!(
        c,
        "# dnsmasq configuration for Slipway ({} DHCP), from `slipway boot dnsmasq-config`.",
        match o.mode {
            DhcpMode::Proxy => "proxy",
            DhcpMode::Full => "full",
        }
    );
    let _ = writeln!(c, "port=0  # no DNS service");
    if let Some(i) = &o.interface {
        let _ = writeln!(c, "interface={i}\nbind-interfaces");
    }
    let _ = writeln!(c, "log-dhcp");
    let _ = writeln!(c, "enable-tftp\ntftp-root={}", o.tftp_root);
    let _ = writeln!(c, "dhcp-match=set:ipxe,175");
    let _ = writeln!(
        c,
        "dhcp-match=set:efi64,option:client-arch,7\ndhcp-match=set:efi64,option:client-arch,9"
    );
    match o.mode {
        DhcpMode::Proxy => {
            let _ = writeln!(c, "dhcp-range={},proxy", o.range);
            let _ = writeln!(
                c,
                "# PXE ROMs: chain-load iPXE over TFTP; iPXE: Slipway's entry script over HTTP."
            );
            let _ = writeln!(
                c,
                "pxe-service=tag:!ipxe,x86PC,\"Slipway (iPXE, BIOS)\",undionly.kpxe"
            );
            let _ = writeln!(
                c,
                "pxe-service=tag:!ipxe,X86-64_EFI,\"Slipway (iPXE, UEFI)\",ipxe.efi"
            );
            let _ = writeln!(c, "pxe-service=tag:ipxe,x86PC,\"Slipway\",{entry}");
            let _ = writeln!(c, "pxe-service=tag:ipxe,X86-64_EFI,\"Slipway\",{entry}");
            let _ = writeln!(c, "dhcp-boot=tag:ipxe,{entry}");
        }
        DhcpMode::Full => {
            let _ = writeln!(c, "dhcp-range={},12h", o.range);
            let _ = writeln!(
                c,
                "dhcp-option=175,b0:01:01  # ipxe.no-pxedhcp: no ProxyDHCP wait"
            );
            let _ = writeln!(c, "dhcp-boot=tag:!ipxe,tag:!efi64,undionly.kpxe");
            let _ = writeln!(c, "dhcp-boot=tag:!ipxe,tag:efi64,ipxe.efi");
            let _ = writeln!(c, "dhcp-boot=tag:ipxe,{entry}");
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::expect;

    fn urls() -> Urls {
        Urls {
            http: "http://10.0.0.1:8080".into(),
            agent: "https://10.0.0.1:9443".into(),
            ca_fingerprint: "sha256:00ff".into(),
        }
    }

    #[test]
    fn scripts() {
        expect![[r#"
            #!ipxe
            echo Slipway: asking http://10.0.0.1:8080 for this machine's boot script
            :retry
            chain --autofree http://10.0.0.1:8080/boot/ipxe?mac=${mac:hexhyp}&uuid=${uuid} || goto failed
            exit
            :failed
            echo Slipway: the coordinator at http://10.0.0.1:8080 did not answer; retrying in 10 s
            sleep 10
            goto retry
        "#]]
        .assert_eq(&entry_script(&urls()));
        let args = kernel_args(&urls(), "TOKEN", Some("52:54:00:12:34:56"), DEFAULT_CONSOLE);
        expect![[r#"
            #!ipxe
            echo Slipway: booting the ramdisk for host worker-0
            kernel http://10.0.0.1:8080/boot/vmlinuz initrd=initramfs console=tty0 console=ttyS0,115200 slipway.coordinator=https://10.0.0.1:9443 slipway.token=TOKEN slipway.ca=sha256:00ff BOOTIF=01-52-54-00-12-34-56
            initrd --name initramfs http://10.0.0.1:8080/boot/initramfs
            boot
        "#]]
        .assert_eq(&ramdisk_script(&urls(), "worker-0", &args));
        expect![[r#"
            #!ipxe
            echo Slipway: host worker-0 is provisioned; booting from its disk
            exit
        "#]]
        .assert_eq(&local_boot_script("worker-0", "provisioned"));
        assert_eq!(refusal_script("a\nb"), "#!ipxe\necho Slipway: a b\nexit\n");
    }

    #[test]
    fn macs() {
        assert_eq!(
            normalize_mac("52-54-00-AB-cd-01").as_deref(),
            Some("52:54:00:ab:cd:01")
        );
        assert_eq!(
            normalize_mac("52:54:00:ab:cd:01").as_deref(),
            Some("52:54:00:ab:cd:01")
        );
        assert_eq!(normalize_mac("52:54:00:ab:cd"), None);
        assert_eq!(normalize_mac("zz:54:00:ab:cd:01"), None);
    }

    #[test]
    fn iso_patching_keeps_the_layout() {
        let mut template = b"HEADERlinux /vmlinuz console=ttyS0 ".to_vec();
        template.extend_from_slice(ISO_PLACEHOLDER);
        template.extend(std::iter::repeat_n(b'#', 40));
        template.extend_from_slice(b"\ninitrd /initramfs\nTAIL");
        let patched = patch_iso(&template, "slipway.token=abc").unwrap();
        assert_eq!(patched.len(), template.len());
        let text = String::from_utf8(patched).unwrap();
        assert!(
            text.contains("console=ttyS0 slipway.token=abc      "),
            "{text}"
        );
        assert!(!text.contains('#') && !text.contains("@@"));
        assert!(text.ends_with("\ninitrd /initramfs\nTAIL"));
        let too_long = "x".repeat(100);
        assert!(
            patch_iso(&template, &too_long)
                .unwrap_err()
                .contains("do not fit")
        );
        assert!(patch_iso(b"no placeholder", "a").is_err());
    }

    #[test]
    fn dnsmasq_configurations() {
        let proxy = DnsmasqOptions {
            mode: DhcpMode::Proxy,
            interface: Some("br0".into()),
            range: "192.168.1.0".into(),
            tftp_root: "/usr/lib/ipxe".into(),
        };
        expect![[r#"
            # dnsmasq configuration for Slipway (proxy DHCP), from `slipway boot dnsmasq-config`.
            port=0  # no DNS service
            interface=br0
            bind-interfaces
            log-dhcp
            enable-tftp
            tftp-root=/usr/lib/ipxe
            dhcp-match=set:ipxe,175
            dhcp-match=set:efi64,option:client-arch,7
            dhcp-match=set:efi64,option:client-arch,9
            dhcp-range=192.168.1.0,proxy
            # PXE ROMs: chain-load iPXE over TFTP; iPXE: Slipway's entry script over HTTP.
            pxe-service=tag:!ipxe,x86PC,"Slipway (iPXE, BIOS)",undionly.kpxe
            pxe-service=tag:!ipxe,X86-64_EFI,"Slipway (iPXE, UEFI)",ipxe.efi
            pxe-service=tag:ipxe,x86PC,"Slipway",http://10.0.0.1:8080/boot/boot.ipxe
            pxe-service=tag:ipxe,X86-64_EFI,"Slipway",http://10.0.0.1:8080/boot/boot.ipxe
            dhcp-boot=tag:ipxe,http://10.0.0.1:8080/boot/boot.ipxe
        "#]]
        .assert_eq(&dnsmasq_config(&proxy, &urls()));
        let full = DnsmasqOptions {
            mode: DhcpMode::Full,
            interface: None,
            range: "10.0.0.100,10.0.0.200".into(),
            tftp_root: "/usr/lib/ipxe".into(),
        };
        let text = dnsmasq_config(&full, &urls());
        assert!(text.contains("dhcp-range=10.0.0.100,10.0.0.200,12h"));
        assert!(text.contains("dhcp-boot=tag:!ipxe,tag:!efi64,undionly.kpxe"));
        assert!(text.contains("dhcp-boot=tag:ipxe,http://10.0.0.1:8080/boot/boot.ipxe"));
        assert!(!text.contains("proxy"));
    }
}
