//! Real (virtual) machines booting the real ramdisk under QEMU/TCG:
//! 1. PXE through QEMU's user-mode network, inspected, provisioned, booted from its disk.
//! 2. PXE in a network namespace with a bridge, a tap and dnsmasq as the DHCP server; e1000
//!    NIC and AHCI disk; provisioned and booted from its disk.
//! 3. dnsmasq in proxy-DHCP mode next to a separate DHCP server; the machine registers.
//! 4. The per-host ISO as a CD (BIOS); the machine registers. It has an IPMI BMC (OpenIPMI's
//!    ipmi_sim, Debian `openipmi`, behind QEMU's KCS interface), whose LAN address and MAC
//!    the agent reads through /dev/ipmi0 into the host's hardware data.
//! 5. The same ISO under UEFI (OVMF).
//!
//! They need the ramdisk and the test image (`cargo xtask test` builds both first), QEMU and,
//! for 2 and 3, root (network namespaces) and dnsmasq; 4 needs ipmi_sim. Each VM run is
//! bounded; the serial console is saved to target/vm-artifacts/ when a test fails.

use std::fs;
use std::time::Duration;

use slipway_tests::vm::{self, Bus, IpmiSim, Net, Netns, Spec, Vm};
use slipway_tests::{Coordinator, sha256_hex, wait_until};

const MARKER: &str = "SLIPWAY-TEST-OS booted";

fn host_yaml(name: &str, mac: &str, image_url: &str, checksum: &str, device: &str) -> String {
    format!(
        "apiVersion: metal3.io/v1alpha1\nkind: BareMetalHost\nmetadata:\n  name: {name}\nspec:\n  online: true\n  bootMACAddress: \"{mac}\"\n  image:\n    url: {image_url}\n    checksum: {checksum}\n    checksumType: sha256\n    format: raw\n  rootDeviceHints:\n    deviceName: {device}\n"
    )
}

fn declare(c: &Coordinator, name: &str, yaml: &str) {
    let tmp = c.hosts.join(format!(".{name}.tmp"));
    fs::write(&tmp, yaml).unwrap();
    fs::rename(&tmp, c.hosts.join(format!("{name}.yaml"))).unwrap();
}

#[test]
fn pxe_user_network_inspect_provision_and_boot_from_disk() {
    let _one = vm::exclusive();
    let art = vm::artifacts();
    let dir = tempfile::tempdir().unwrap();
    let boot_dir = art.dir.display().to_string();
    // Inside the guest, 10.0.2.2 is this machine's 127.0.0.1.
    let c = Coordinator::start(
        dir.path(),
        &[
            "--advertise",
            "10.0.2.2",
            "--boot-dir",
            &boot_dir,
            "--unknown-hosts",
            "refuse",
        ],
    );
    let image = fs::read(&art.test_os).unwrap();
    fs::copy(&art.test_os, c.images.join("test-os.img")).unwrap();
    let mac = "52:54:00:5a:00:01";
    let url = format!("http://10.0.2.2:{}/images/test-os.img", c.http_port);
    declare(
        &c,
        "vm-1",
        &host_yaml("vm-1", mac, &url, &sha256_hex(&image), "/dev/vda"),
    );
    c.wait_state("vm-1", "inspecting", Duration::from_secs(10));

    let disk = dir.path().join("vm-1.raw");
    vm::sparse_disk(&disk, 8 << 30);
    let bootfile = format!("http://10.0.2.2:{}/boot/boot.ipxe", c.http_port);
    let mut vm = Vm::start(
        Spec {
            name: "vm-1",
            cpus: 2,
            mem_mib: 1024,
            nic: "virtio-net-pci",
            mac,
            net: Net::User {
                bootfile: Some(bootfile),
            },
            disk: Some((&disk, Bus::Virtio, "slipway-vm1-disk")),
            cdrom: None,
            boot_cdrom: false,
            uefi: false,
            bmc: None,
            netns: None,
        },
        dir.path(),
    );
    let registered = vm.wait_serial("SLIPWAY-EVENT registered", Duration::from_secs(180));
    eprintln!(
        "vm-1 registered {:.1}s after start",
        registered.as_secs_f64()
    );

    // Inspection reports the VM as configured.
    let host = c.wait_host("vm-1", Duration::from_secs(120), "inspected", |h| {
        h["status"]["hardware"].is_object()
    });
    let hw = &host["status"]["hardware"];
    assert_eq!(hw["cpu"]["count"], 2, "{hw}");
    let ram = hw["ramMebibytes"].as_u64().unwrap();
    assert!(
        (800..=1024).contains(&ram),
        "RAM {ram} MiB for a 1024 MiB VM"
    );
    let disks = hw["storage"].as_array().unwrap();
    assert!(
        disks
            .iter()
            .any(|d| d["name"] == "/dev/vda" && d["sizeBytes"] == 8u64 << 30),
        "{disks:?}"
    );
    let nics = hw["nics"].as_array().unwrap();
    assert!(
        nics.iter().any(|n| n["mac"] == mac && n["pxe"] == true),
        "{nics:?}"
    );

    // Provisioned, rebooted into its disk, which prints the marker and powers off.
    c.wait_state("vm-1", "provisioned", Duration::from_secs(180));
    vm.wait_serial(MARKER, Duration::from_secs(180));
    assert!(vm.wait_exit(Duration::from_secs(60)).success());
    let written = fs::read(&disk).unwrap();
    assert!(
        written[..image.len()] == image[..],
        "the disk holds the image"
    );
    let log = c.log_text();
    assert!(
        log.contains("boot: local disk"),
        "the second PXE boot was sent to the disk"
    );
}

#[test]
fn pxe_in_a_network_namespace_with_dnsmasq_e1000_and_ahci() {
    let _one = vm::exclusive();
    let art = vm::artifacts();
    let dir = tempfile::tempdir().unwrap();
    let mut ns = Netns::new("pxe", "10.77.0");
    let boot_dir = art.dir.display().to_string();
    let c = Coordinator::start_in(
        dir.path(),
        &[
            "--advertise",
            &ns.bridge_ip.clone(),
            "--boot-dir",
            &boot_dir,
            "--unknown-hosts",
            "refuse",
        ],
        Some(&ns.name),
        &ns.bridge_ip.clone(),
    );
    // dnsmasq as the network's DHCP server, configured by `slipway boot dnsmasq-config`.
    let out = c.cli(&[
        "boot",
        "dnsmasq-config",
        "--mode",
        "full",
        "--range",
        "10.77.0.100,10.77.0.200",
        "--interface",
        "br0",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut conf = String::from_utf8(out.stdout).unwrap();
    // IPv6 router advertisements, or iPXE waits 18 s for IPv6 autoconfiguration.
    conf.push_str("enable-ra\ndhcp-range=fd00:5117::,ra-only\n");
    conf.push_str(&format!(
        "dhcp-leasefile={}\npid-file={}\n",
        dir.path().join("leases").display(),
        dir.path().join("dnsmasq.pid").display()
    ));
    let conf_path = dir.path().join("dnsmasq.conf");
    fs::write(&conf_path, conf).unwrap();
    ns.spawn(
        "dnsmasq",
        &[
            "--keep-in-foreground",
            "--log-facility=-",
            &format!("--conf-file={}", conf_path.display()),
        ],
        &dir.path().join("dnsmasq.log"),
    );
    vm::wait_file_contains(
        &dir.path().join("dnsmasq.log"),
        "DHCP, sockets bound",
        Duration::from_secs(10),
    );

    let image = fs::read(&art.test_os).unwrap();
    fs::copy(&art.test_os, c.images.join("test-os.img")).unwrap();
    let mac = "52:54:00:5a:00:02";
    let url = format!("{}/images/test-os.img", c.http_url());
    declare(
        &c,
        "vm-2",
        // This one boots its new OS by kexec, straight from the ramdisk.
        &host_yaml("vm-2", mac, &url, &sha256_hex(&image), "/dev/sda").replace(
            "  name: vm-2\n",
            "  name: vm-2\n  annotations:\n    slipway.io/reboot: kexec\n",
        ),
    );
    c.wait_state("vm-2", "inspecting", Duration::from_secs(10));

    let disk = dir.path().join("vm-2.raw");
    vm::sparse_disk(&disk, 8 << 30);
    let tap = ns.tap.clone();
    let mut vm = Vm::start(
        Spec {
            name: "vm-2",
            cpus: 1,
            mem_mib: 1024,
            nic: "e1000",
            mac,
            net: Net::Tap { ifname: tap },
            disk: Some((&disk, Bus::Ahci, "slipway-vm2-disk")),
            cdrom: None,
            boot_cdrom: false,
            uefi: false,
            bmc: None,
            netns: Some(&ns.name),
        },
        dir.path(),
    );
    let registered = vm.wait_serial("SLIPWAY-EVENT registered", Duration::from_secs(180));
    eprintln!(
        "vm-2 registered {:.1}s after start",
        registered.as_secs_f64()
    );
    let host = c.wait_host("vm-2", Duration::from_secs(120), "inspected", |h| {
        h["status"]["hardware"].is_object()
    });
    let hw = &host["status"]["hardware"];
    assert!(
        hw["nics"]
            .as_array()
            .unwrap()
            .iter()
            // metal3 reports the PCI vendor and device ids as the model: 8086:100e is QEMU's e1000 (82540EM).
            .any(|n| n["mac"] == mac && n["model"] == "0x8086 0x100e"),
        "{hw}"
    );
    assert!(
        hw["storage"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["name"] == "/dev/sda"),
        "{hw}"
    );
    c.wait_state("vm-2", "provisioned", Duration::from_secs(240));
    vm.wait_serial(MARKER, Duration::from_secs(180));
    assert!(vm.wait_exit(Duration::from_secs(60)).success());
    assert!(fs::read(&disk).unwrap()[..image.len()] == image[..]);
    // Booted by kexec: the agent said so, the firmware did not PXE-boot again, and
    // the OS got the command line of its syslinux.cfg without what syslinux itself adds
    // (BOOT_IMAGE=, initrd=).
    let serial = vm.serial_text();
    assert!(serial.contains("SLIPWAY-EVENT kexec"), "no kexec milestone");
    assert!(
        !c.log_text().contains("boot: local disk"),
        "the machine went through the firmware and PXE again"
    );
    let marker = serial.lines().find(|l| l.contains(MARKER)).unwrap();
    assert!(
        marker.contains("panic=5") && !marker.contains("BOOT_IMAGE"),
        "{marker}"
    );
    assert!(
        serial.contains("kexec done: kexec into /vmlinuz"),
        "the agent did not report what it loaded"
    );
}

#[test]
fn proxy_dhcp_next_to_an_existing_dhcp_server() {
    let _one = vm::exclusive();
    let art = vm::artifacts();
    let dir = tempfile::tempdir().unwrap();
    let mut ns = Netns::new("proxy", "10.78.0");
    let boot_dir = art.dir.display().to_string();
    let c = Coordinator::start_in(
        dir.path(),
        &[
            "--advertise",
            &ns.bridge_ip.clone(),
            "--boot-dir",
            &boot_dir,
            "--unknown-hosts",
            "discover",
        ],
        Some(&ns.name),
        &ns.bridge_ip.clone(),
    );
    // The site's DHCP server: addresses only, knows nothing of PXE.
    let site = format!(
        "port=0\ninterface=br0\nbind-interfaces\ndhcp-range=10.78.0.100,10.78.0.200,12h\nenable-ra\ndhcp-range=fd00:5117::,ra-only\ndhcp-leasefile={}\npid-file={}\n",
        dir.path().join("site.leases").display(),
        dir.path().join("site.pid").display()
    );
    fs::write(dir.path().join("site.conf"), site).unwrap();
    ns.spawn(
        "dnsmasq",
        &[
            "--keep-in-foreground",
            "--log-facility=-",
            &format!("--conf-file={}", dir.path().join("site.conf").display()),
        ],
        &dir.path().join("site.log"),
    );
    vm::wait_file_contains(
        &dir.path().join("site.log"),
        "DHCP, sockets bound",
        Duration::from_secs(10),
    );
    // Slipway's dnsmasq in proxy mode beside it: it answers only the PXE part.
    let out = c.cli(&[
        "boot",
        "dnsmasq-config",
        "--mode",
        "proxy",
        "--range",
        "10.78.0.0",
        "--interface",
        "br0",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut conf = String::from_utf8(out.stdout).unwrap();
    conf.push_str(&format!(
        "dhcp-leasefile={}\npid-file={}\n",
        dir.path().join("proxy.leases").display(),
        dir.path().join("proxy.pid").display()
    ));
    fs::write(dir.path().join("proxy.conf"), conf).unwrap();
    ns.spawn(
        "dnsmasq",
        &[
            "--keep-in-foreground",
            "--log-facility=-",
            &format!("--conf-file={}", dir.path().join("proxy.conf").display()),
        ],
        &dir.path().join("proxy.log"),
    );
    vm::wait_file_contains(
        &dir.path().join("proxy.log"),
        "proxy on subnet",
        Duration::from_secs(10),
    );

    // An undeclared machine: discovery registers it.
    let mac = "52:54:00:5a:00:03";
    let tap = ns.tap.clone();
    let mut vm = Vm::start(
        Spec {
            name: "vm-3",
            cpus: 1,
            mem_mib: 1024,
            nic: "e1000",
            mac,
            net: Net::Tap { ifname: tap },
            disk: None,
            cdrom: None,
            boot_cdrom: false,
            uefi: false,
            bmc: None,
            netns: Some(&ns.name),
        },
        dir.path(),
    );
    let registered = vm.wait_serial("SLIPWAY-EVENT registered", Duration::from_secs(180));
    eprintln!(
        "vm-3 registered {:.1}s after start",
        registered.as_secs_f64()
    );
    let host = c.wait_host(
        "discovered-5254005a0003",
        Duration::from_secs(60),
        "discovered with its inventory",
        |h| h["status"]["hardware"].is_object(),
    );
    assert_eq!(host["status"]["provisioning"]["state"], "unmanaged");
    assert_eq!(host["status"]["operationalStatus"], "discovered");
    assert!(
        host["status"]["hardware"]["nics"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["mac"] == mac)
    );
    let leases = fs::read_to_string(dir.path().join("site.leases")).unwrap_or_default();
    assert!(
        leases.contains(mac),
        "the site's DHCP server gave the address: {leases}"
    );
}

/// This machine also has an IPMI BMC (ipmi_sim behind a KCS interface): its LAN address and
/// MAC reach the host's hardware data.
#[test]
fn per_host_iso_boots_as_a_cd_and_enrols() {
    iso_boot(false, "vm-4", "52:54:00:5a:00:04", true);
}

/// The same ISO through its UEFI El Torito image (GRUB EFI), under OVMF.
#[test]
fn per_host_iso_boots_under_uefi_and_enrols() {
    iso_boot(true, "vm-5", "52:54:00:5a:00:05", false);
}

/// The BMC's LAN settings, as ipmi_sim is told to answer them.
const BMC_IPV4: &str = "192.0.2.45";
const BMC_MAC: &str = "52:54:00:b3:c0:01";

fn iso_boot(uefi: bool, name: &str, mac: &str, with_bmc: bool) {
    let _one = vm::exclusive();
    let art = vm::artifacts();
    let dir = tempfile::tempdir().unwrap();
    let bmc = with_bmc.then(|| IpmiSim::start(dir.path(), BMC_IPV4, BMC_MAC));
    let boot_dir = art.dir.display().to_string();
    let c = Coordinator::start(
        dir.path(),
        &[
            "--advertise",
            "10.0.2.2",
            "--boot-dir",
            &boot_dir,
            "--unknown-hosts",
            "refuse",
        ],
    );
    declare(
        &c,
        name,
        &format!(
            "apiVersion: metal3.io/v1alpha1\nkind: BareMetalHost\nmetadata:\n  name: {name}\nspec:\n  online: true\n  bootMACAddress: \"{mac}\"\n"
        ),
    );
    c.wait_state(name, "inspecting", Duration::from_secs(10));
    // ISOs are made for one boot (a capability URL), not served by host name.
    let by_name = slipway_tests::http_get(&format!("{}/boot/iso/{name}.iso", c.http_url()));
    assert_eq!(by_name.0, 404, "{}", by_name.1);
    let made = c.cli(&["boot", "iso", name, "-o", "json"]);
    assert!(made.status.success(), "{made:?}");
    let made: serde_json::Value = serde_json::from_slice(&made.stdout).unwrap();
    // The URL names the advertised address (the VM's view); fetch the same path locally.
    let url = made["url"].as_str().unwrap();
    let path = &url[url.find("/boot/iso/").expect("an ISO path")..];
    assert!(
        path.len() > "/boot/iso/.iso".len() + 40,
        "unguessable: {path}"
    );
    let iso = vm::http_get(&format!("{}{path}", c.http_url()));
    let template = fs::metadata(art.dir.join("slipway.iso")).unwrap().len();
    assert_eq!(
        iso.len() as u64,
        template,
        "the per-host ISO keeps the template's layout"
    );
    let text = String::from_utf8_lossy(&iso);
    assert!(
        text.contains("slipway.token=")
            && text.contains(&format!(
                "slipway.coordinator=https://10.0.2.2:{}",
                c.grpc_port
            ))
    );
    let iso_path = dir.path().join(format!("{name}.iso"));
    fs::write(&iso_path, &iso).unwrap();

    let mut vm = Vm::start(
        Spec {
            name,
            cpus: 1,
            mem_mib: 1024,
            nic: "virtio-net-pci",
            mac,
            net: Net::User { bootfile: None },
            disk: None,
            cdrom: Some(&iso_path),
            boot_cdrom: true,
            uefi,
            netns: None,
            bmc: bmc.as_ref().map(|b| b.port),
        },
        dir.path(),
    );
    let registered = vm.wait_serial("SLIPWAY-EVENT registered", Duration::from_secs(180));
    assert!(
        vm.serial_text()
            .contains(&format!("host=default/{name} coordinator=")),
        "enrolled as {name}"
    );
    // The kernel names the firmware it was started by.
    assert_eq!(
        vm.serial_text().contains("efi: EFI v"),
        uefi,
        "booted by the wrong firmware"
    );
    eprintln!(
        "{name} registered {:.1}s after start ({}, CD)",
        registered.as_secs_f64(),
        if uefi { "UEFI" } else { "BIOS" }
    );
    c.wait_host(name, Duration::from_secs(60), "connected", |h| {
        h["status"]["agent"]["connected"] == true
    });
    if let Some(sim) = &bmc {
        // The hello's inventory is stored as the host's hardware data.
        let doc = wait_until(Duration::from_secs(30), "hardware data", || {
            let out = c.cli(&["get", "hardwaredata", name, "-o", "json"]);
            out.status
                .success()
                .then(|| serde_json::from_slice::<serde_json::Value>(&out.stdout).ok())
                .flatten()
        });
        let bmc = &doc["spec"]["hardware"]["bmc"];
        let serial = vm.serial_text();
        let said: Vec<&str> = serial
            .lines()
            .filter(|l| l.contains("BMC through"))
            .collect();
        let said = if said.is_empty() {
            "(the agent logged no IPMI line)".to_string()
        } else {
            said.join("\n")
        };
        assert!(
            bmc["ipv4Address"] == BMC_IPV4 && bmc["mac"] == BMC_MAC,
            "BMC in the hardware data: {bmc}\nagent: {said}\nipmi_sim: {}",
            fs::read_to_string(&sim.log).unwrap_or_default()
        );
        // SMBIOS type 38 (QEMU makes one for its KCS interface) names the interface.
        assert_eq!(bmc["interface"], "IPMI 2.0 KCS", "{bmc}");
        eprintln!("{name}: {said}");
    }
}
