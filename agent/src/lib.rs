//! The Slipway agent: the ramdisk's init, and a standalone tool for each of its layers.
//!
//! Code map (see ARCHITECTURE.md):
//! - [`cli`]: subcommands (`run`, `inventory`, `disks`, `write-image`, `wipe`,
//!   `config-drive`); thin.
//! - [`init`]: the ramdisk's PID 1: mounts, module coldplug, DHCP, then [`run`].
//! - [`run`]: the enrol-and-serve loop of `slipway-agent run` and of the ramdisk, and the
//!   power action that ends it.
//! - [`session`]: enrolment and the session with the coordinator; the only module that knows
//!   protobuf.
//! - [`commands`]: runs commands by id, idempotently.
//! - [`console`]: the `SLIPWAY-EVENT` milestone lines.
//! - [`simulate`]: the load generator: many simulated machines in one process, each with
//!   the real boot-script, enrolment and session path; and the hosts directory for them.
//! - [`inventory`]: the hardware, read from a root path.
//! - [`disk`]: root device hints, the disk selection (the only source of [`disk::SelectedDisk`]),
//!   writing and wiping.
//! - [`image`]: streaming, verified image writes.
//! - [`dhcp`]: DHCPv4 messages, pure.
//! - [`configdrive`]: the `config-2` partition with the host's first-boot data.
//! - [`kexec`]: the installed OS's boot entry (syslinux/extlinux on FAT), for kexec.
//! - [`tls`]: the pinned-CA verifier and client configurations. [`config`]: the kernel
//!   command line. [`sys`]: the kernel edge: mounts, modules, netlink, reboot.
//!
//! The run-time layers call only downwards: `cli` -> `init`/`simulate` -> `run` -> `session`
//! -> `commands` -> `console` (a layer may skip the ones between; `agent/tests/tidy.rs`
//! checks it).

pub mod cli;
pub mod commands;
pub mod config;
pub mod configdrive;
pub mod console;
pub mod dhcp;
pub mod disk;
pub mod image;
pub mod init;
pub mod inventory;
pub mod kexec;
pub mod run;
pub mod session;
pub mod simulate;
pub mod sys;
pub mod tls;

/// An error with its causes, on one line (a cause already quoted by its parent is skipped).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}
