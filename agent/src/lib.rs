//! The Slipway agent: the ramdisk's init, and a standalone tool for each of its layers.
//!
//! Code map (see ARCHITECTURE.md):
//! - [`cli`]: subcommands (`run`, `inventory`, `disks`, `write-image`, `wipe`,
//!   `config-drive`); thin.
//! - [`session`]: enrolment and the session with the coordinator; the only module that knows
//!   protobuf.
//! - [`commands`]: runs commands by id, idempotently.
//! - [`inventory`]: the hardware, read from a root path.
//! - [`disk`]: root device hints, the disk selection (the only source of [`disk::SelectedDisk`]),
//!   writing and wiping.
//! - [`image`]: streaming, verified image writes.
//! - [`configdrive`]: the `config-2` partition with the host's first-boot data.
//! - [`tls`]: the pinned-CA verifier and client configurations. [`config`]: the kernel
//!   command line. [`sys`]: reboot and power off.

pub mod cli;
pub mod commands;
pub mod config;
pub mod configdrive;
pub mod disk;
pub mod image;
pub mod inventory;
pub mod session;
pub mod sys;
pub mod tls;
