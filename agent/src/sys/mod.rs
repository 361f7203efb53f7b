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

/// Loads a kernel, an initrd (empty: none) and a command line to be booted by
/// [`kexec_reboot`] (kexec_file_load: the kernel checks the image; with Secure Boot it must be
/// signed).
pub fn kexec_load(kernel: &[u8], initrd: &[u8], cmdline: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    const KEXEC_FILE_NO_INITRAMFS: libc::c_ulong = 0x4;
    let memfd = |name: &std::ffi::CStr, data: &[u8]| -> std::io::Result<std::fs::File> {
        // SAFETY: plain memfd_create(2) with a valid C string; the result is checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
        let mut f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.write_all(data)?;
        Ok(f)
    };
    let kernel = memfd(c"slipway-kexec-kernel", kernel)?;
    let initrd = if initrd.is_empty() {
        None
    } else {
        Some(memfd(c"slipway-kexec-initrd", initrd)?)
    };
    let cmdline = std::ffi::CString::new(cmdline)
        .map_err(|_| std::io::Error::other("the kernel command line contains a NUL byte"))?;
    let bytes = cmdline.as_bytes_with_nul();
    let (initrd_fd, flags) = match &initrd {
        Some(f) => (f.as_raw_fd(), 0),
        None => (-1, KEXEC_FILE_NO_INITRAMFS),
    };
    // SAFETY: kexec_file_load(2) with open descriptors and a NUL-terminated command line whose
    // length includes the NUL, as the kernel expects.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_kexec_file_load,
            kernel.as_raw_fd(),
            initrd_fd,
            bytes.len() as libc::c_ulong,
            bytes.as_ptr(),
            flags,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Flushes filesystems and boots what [`kexec_load`] loaded. Only returns if the kernel
/// refused.
pub fn kexec_reboot() -> std::io::Error {
    nix::unistd::sync();
    match nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_KEXEC) {
        Ok(never) => match never {},
        Err(e) => {
            let e = std::io::Error::from(e);
            error!("the kernel refused to kexec: {e}");
            e
        }
    }
}

/// Whether this process is the init of its PID namespace (the ramdisk's /init).
pub fn is_init() -> bool {
    std::process::id() == 1
}

/// Raises this process's soft limit of open files to its hard limit (one process holding
/// thousands of connections: the load generator). Returns the soft limit before and after.
pub fn raise_open_files() -> std::io::Result<(u64, u64)> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    let (now, _) = getrlimit(Resource::RLIMIT_NOFILE)?;
    Ok((soft, now))
}
