//! The agent as the ramdisk's `/init` (PID 1).
//!
//! Mounts the kernel filesystems, loads the modules the hardware needs, reaps zombies, gets an
//! address by DHCP on the boot interface, then runs the same enrol-and-serve loop as
//! `slipway-agent run` ([`crate::run`]), with settings from the kernel command line. It never
//! returns: PID 1 exiting panics the kernel. Every fatal-looking error is shown on the console
//! and retried.
//!
//! Each milestone prints one `SLIPWAY-EVENT` line on the console ([`crate::console`]).

use std::path::Path;
use std::time::Duration;

use tracing::{error, info, warn};

use crate::config;
use crate::console::milestone;
use crate::run::{RunArgs, run_agent};
use crate::sys::{self, modules, mount, net};

/// Modules loaded whatever the hardware (filesystems and helpers no modalias asks for).
const ALWAYS: &[&str] = &[
    "isofs",
    "vfat",
    "nls_cp437",
    "nls_iso8859_1",
    "crc32c_generic",
    "af_packet",
];

/// Modules loaded once another has: `/dev/ipmi0` (`ipmi_devintf`, which no device's modalias
/// names) when `ipmi_si` found a BMC through ACPI, SMBIOS or a platform device.
const COMPANIONS: &[(&str, &str)] = &[("ipmi_si", "ipmi_devintf")];

/// Runs the ramdisk. Never returns.
pub fn main() -> ! {
    mount::console();
    let problems = mount::early_mounts();
    mount::console();
    milestone("init", &format!("version={}", env!("CARGO_PKG_VERSION")));
    for p in &problems {
        eprintln!("slipway-init: {p}");
    }
    spawn_reaper();

    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let modules_dir = Path::new("/lib/modules").join(&kernel);
    let always: Vec<String> = ALWAYS.iter().map(|s| s.to_string()).collect();
    let loaded = modules::coldplug(&modules_dir, &always, COMPANIONS);
    milestone(
        "modules",
        &format!("loaded={} kernel={kernel}", loaded.len()),
    );

    loop {
        let result = std::panic::catch_unwind(|| match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(run()),
            Err(e) => Err(anyhow::anyhow!("cannot start the async runtime: {e}")),
        });
        match result {
            Ok(Ok(())) => error!("the agent finished without a power action; starting again"),
            Ok(Err(e)) => error!("the agent stopped: {e:#}; starting again in 10 s"),
            Err(_) => error!(
                "the agent panicked (a bug: please report the console log); starting again in 10 s"
            ),
        }
        milestone("retry", "");
        std::thread::sleep(Duration::from_secs(10));
    }
}

async fn run() -> anyhow::Result<()> {
    let cmdline =
        config::parse_cmdline(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    if cmdline.coordinator.is_none() {
        // Without a coordinator there is nothing to do; say so where the operator looks.
        anyhow::bail!(
            "no slipway.coordinator= on the kernel command line; this ramdisk must be booted by Slipway's iPXE script or ISO"
        );
    }
    let (iface, lease) = network(cmdline.boot_mac.as_deref()).await;
    milestone(
        "network",
        &format!(
            "iface={} mac={} ip={}/{} gw={}",
            iface.name,
            iface.mac_string(),
            lease.ip,
            lease.prefix_len,
            lease.router.map(|r| r.to_string()).unwrap_or_default()
        ),
    );
    let boot_mac = cmdline
        .boot_mac
        .clone()
        .or_else(|| Some(iface.mac_string()));
    run_agent(
        RunArgs {
            boot_mac,
            ..RunArgs::from_cmdline()
        },
        true,
    )
    .await
}

/// Brings the boot interface up with a DHCP address, retrying forever.
async fn network(boot_mac: Option<&str>) -> (net::Iface, crate::dhcp::Lease) {
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let ifaces = net::candidates(boot_mac);
        if ifaces.is_empty() {
            warn!(
                "no network interface found (attempt {attempt}); is the NIC driver in this ramdisk?"
            );
            tokio::time::sleep(Duration::from_secs(3)).await;
            // A late driver probe: try loading modules again.
            continue;
        }
        let names: Vec<String> = ifaces.iter().map(|i| i.name.clone()).collect();
        if let Err(e) = net::links_up(&names).await {
            warn!("cannot bring up {}: {e}", names.join(", "));
        }
        // All candidates at once; the first lease wins.
        let (tx, mut rx) = tokio::sync::mpsc::channel(ifaces.len());
        for iface in ifaces.clone() {
            let tx = tx.clone();
            tokio::task::spawn_blocking(move || {
                let r = net::dhcp(&iface, Duration::from_secs(20));
                let _ = tx.blocking_send((iface, r));
            });
        }
        drop(tx);
        while let Some((iface, result)) = rx.recv().await {
            match result {
                Ok(lease) => match net::apply(&iface.name, &lease).await {
                    Ok(()) => return (iface, lease),
                    Err(e) => warn!("cannot configure {} on {}: {e}", lease.ip, iface.name),
                },
                Err(e) => info!("{e} (carrier: {})", net::has_carrier(&iface.name)),
            }
        }
        warn!(
            "no DHCP lease on {} (attempt {attempt}); retrying",
            names.join(", ")
        );
        milestone("dhcp-retry", &format!("attempt={attempt}"));
    }
}

/// PID 1 inherits every orphan; reap them so they do not pile up as zombies.
fn spawn_reaper() {
    std::thread::spawn(|| {
        loop {
            match nix::sys::wait::waitpid(None, None) {
                Ok(_) => {}
                Err(nix::errno::Errno::ECHILD) => std::thread::sleep(Duration::from_secs(1)),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    });
}

/// Whether to run as init: PID 1, or forced for tests.
pub fn wanted() -> bool {
    sys::is_init()
}
