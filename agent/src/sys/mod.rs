//! The kernel edge: the few calls that act on the machine itself (mounts, module loading,
//! netlink, reboot). Nothing above this module calls the kernel directly.

pub mod modules;
pub mod mount;
pub mod net;

use tracing::error;

/// Flushes filesystems and reboots or powers off. Only returns if the kernel refused.
pub fn power(reboot: bool) -> std::io::Error {
    nix::unistd::sync();
    let mode = if reboot {
        nix::sys::reboot::RebootMode::RB_AUTOBOOT
    } else {
        nix::sys::reboot::RebootMode::RB_POWER_OFF
    };
    match nix::sys::reboot::reboot(mode) {
        Ok(never) => match never {},
        Err(e) => {
            let e = std::io::Error::from(e);
            error!(
                "the kernel refused to {}: {e}",
                if reboot { "reboot" } else { "power off" }
            );
            e
        }
    }
}

/// Whether this process is the init of its PID namespace (the ramdisk's /init).
pub fn is_init() -> bool {
    std::process::id() == 1
}
