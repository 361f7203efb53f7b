//! The ramdisk's early mounts. Debian kernels do not mount devtmpfs by themselves.

use std::fs;
use std::path::Path;

use nix::mount::{MsFlags, mount};

/// Mounts /dev, /proc, /sys, /run and /tmp. Returns one message per mount that failed (a
/// failure is reported, not fatal: the agent goes on with what it has).
pub fn early_mounts() -> Vec<String> {
    let plan: [(&str, &str, &str, MsFlags, Option<&str>); 6] = [
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
        (
            "proc",
            "/proc",
            "proc",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None,
        ),
        (
            "sysfs",
            "/sys",
            "sysfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None,
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "efivarfs",
            "/sys/firmware/efi/efivars",
            "efivarfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None,
        ),
    ];
    let mut problems = Vec::new();
    for (source, target, fstype, flags, data) in plan {
        if fstype == "efivarfs" && !Path::new("/sys/firmware/efi").exists() {
            continue; // BIOS boot
        }
        if let Err(e) = fs::create_dir_all(target) {
            problems.push(format!("cannot create {target}: {e}"));
            continue;
        }
        match mount(Some(source), target, Some(fstype), flags, data) {
            Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
            Err(e) => problems.push(format!("cannot mount {fstype} on {target}: {e}")),
        }
    }
    problems
}

/// Makes fds 0, 1 and 2 the console, in case the kernel could not open it for us.
pub fn console() {
    use std::os::fd::AsRawFd;
    let Ok(console) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    else {
        return;
    };
    let fd = console.as_raw_fd();
    for target in 0..3 {
        // SAFETY: fd is open; dup2 onto the standard descriptors is what init does.
        unsafe {
            libc::dup2(fd, target);
        }
    }
}
