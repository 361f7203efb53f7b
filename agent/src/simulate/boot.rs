//! What a simulated machine's PXE boot asks the coordinator: `GET /boot/ipxe?mac=MAC`, whose
//! answer is an iPXE script. For a declared host, it boots the ramdisk with the one-time token
//! on the kernel line (`kernel .../boot/vmlinuz initrd=initramfs ... slipway.token=TOKEN ...`);
//! otherwise it says why not and exits (to the local disk, or nowhere).

use crate::config;

/// What a per-host boot script tells the machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootScript {
    /// Boot the ramdisk and enrol with this token.
    Ramdisk { token: String },
    /// No ramdisk: the coordinator's reason, as the script echoes it (an undeclared MAC, a
    /// provisioned host sent to its disk, a host being deleted).
    NoToken { reason: String },
}

/// Reads an iPXE script: the token from its kernel line, parsed as the agent parses its own
/// kernel command line ([`config::parse_cmdline`]).
pub fn parse_boot_script(script: &str) -> BootScript {
    let kernel = script
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("kernel "));
    if let Some(line) = kernel
        && let Some(token) = config::parse_cmdline(line).token
    {
        return BootScript::Ramdisk { token };
    }
    let said: Vec<&str> = script
        .lines()
        .filter_map(|l| l.trim().strip_prefix("echo "))
        .map(|l| l.strip_prefix("Slipway: ").unwrap_or(l))
        .collect();
    BootScript::NoToken {
        reason: if said.is_empty() {
            format!(
                "the boot script has no slipway.token=: {:?}",
                script.chars().take(200).collect::<String>()
            )
        } else {
            said.join("; ")
        },
    }
}

/// Asks the coordinator's HTTP server (`http`, `http://HOST:PORT`) how the machine with `mac`
/// boots.
pub async fn fetch(client: &reqwest::Client, http: &str, mac: &str) -> Result<BootScript, String> {
    let url = format!("{}/boot/ipxe?mac={mac}", http.trim_end_matches('/'));
    let resp = client
        .get(&url)
        .timeout(std::time::Duration::from_secs(30))
        .send()
        .await
        .map_err(|e| format!("GET {url}: {}", crate::error_chain(&e)))?;
    let status = resp.status();
    let text = resp
        .text()
        .await
        .map_err(|e| format!("GET {url}: {}", crate::error_chain(&e)))?;
    if !status.is_success() && !text.starts_with("#!ipxe") {
        return Err(format!("GET {url} answered HTTP {status}"));
    }
    Ok(parse_boot_script(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_comes_from_the_ramdisk_scripts_kernel_line() {
        // As coordinator/src/boot.rs writes it (ramdisk_script with kernel_args).
        let script = "#!ipxe\n\
            echo Slipway: booting the ramdisk for host sim-00007\n\
            kernel http://10.0.0.1:8080/boot/vmlinuz initrd=initramfs console=tty0 console=ttyS0,115200 slipway.coordinator=https://10.0.0.1:9443 slipway.token=Zm9vYmFy-tok_en slipway.ca=sha256:00ff BOOTIF=01-52-54-00-00-00-07\n\
            initrd --name initramfs http://10.0.0.1:8080/boot/initramfs\n\
            boot\n";
        assert_eq!(
            parse_boot_script(script),
            BootScript::Ramdisk {
                token: "Zm9vYmFy-tok_en".into()
            }
        );
    }

    #[test]
    fn refusals_and_local_boots_carry_the_reason_and_no_token() {
        let refused = "#!ipxe\necho Slipway: no host has bootMACAddress 52:54:00:00:00:07: declare one, or run slipway serve --unknown-hosts discover\nexit\n";
        assert_eq!(
            parse_boot_script(refused),
            BootScript::NoToken {
                reason: "no host has bootMACAddress 52:54:00:00:00:07: declare one, or run \
                         slipway serve --unknown-hosts discover"
                    .into()
            }
        );
        let local =
            "#!ipxe\necho Slipway: host sim-00007 is provisioned; booting from its disk\nexit\n";
        assert!(matches!(
            parse_boot_script(local),
            BootScript::NoToken { reason } if reason.contains("booting from its disk")
        ));
        // A kernel line without a token (not Slipway's) is no token either.
        let other = "#!ipxe\nkernel http://x/vmlinuz console=ttyS0\nboot\n";
        assert!(matches!(
            parse_boot_script(other),
            BootScript::NoToken { reason } if reason.contains("no slipway.token=")
        ));
        assert!(matches!(parse_boot_script(""), BootScript::NoToken { .. }));
    }
}
