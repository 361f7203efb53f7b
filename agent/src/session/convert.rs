//! Protobuf to the agent's own types and back: commands in; progress, results, command
//! states and the inventory out.

use slipway_proto::v1 as pb;

use crate::commands::{Command, Detail, FailureKind, Kind, Outcome, State, Update};
use crate::configdrive::ConfigDrive;
use crate::disk::Hints;
use crate::image::{Algo, Format, ImageSpec, Progress};
use crate::inventory::Inventory;

pub(super) fn event(e: pb::agent_event::Event) -> pb::AgentEvent {
    pb::AgentEvent { event: Some(e) }
}

pub(super) fn command_from_proto(c: pb::Command) -> Result<Command, (String, String)> {
    use pb::command::Kind as K;
    let id = c.id.clone();
    let kind = match c.kind {
        Some(K::Inspect(_)) => Kind::Inspect,
        Some(K::Reboot(_)) => Kind::Reboot,
        Some(K::Kexec(_)) => Kind::Kexec,
        Some(K::PowerOff(_)) => Kind::PowerOff,
        Some(K::EraseMetadata(e)) => Kind::EraseMetadata {
            full: e.mode() == pb::erase_metadata::Mode::Full,
        },
        Some(K::WriteImage(w)) => {
            let algo = match pb::ChecksumType::try_from(w.checksum_type)
                .unwrap_or(pb::ChecksumType::Auto)
            {
                pb::ChecksumType::Md5 => Some(Algo::Md5),
                pb::ChecksumType::Sha256 => Some(Algo::Sha256),
                pb::ChecksumType::Sha512 => Some(Algo::Sha512),
                _ => None,
            };
            let format = match pb::ImageFormat::try_from(w.format).unwrap_or(pb::ImageFormat::Raw) {
                pb::ImageFormat::Qcow2 => Format::Qcow2,
                pb::ImageFormat::LiveIso => Format::LiveIso,
                _ => Format::Raw,
            };
            let spec = ImageSpec::new(&w.url, &w.checksum, algo, format)
                .map_err(|e| (id.clone(), e.to_string()))?;
            let h = w.root_device_hints.unwrap_or_default();
            let hints = Hints {
                device_name: h.device_name,
                hctl: h.hctl,
                model: h.model,
                vendor: h.vendor,
                serial_number: h.serial_number,
                min_size_gigabytes: h.min_size_gigabytes,
                wwn: h.wwn,
                wwn_with_extension: h.wwn_with_extension,
                wwn_vendor_extension: h.wwn_vendor_extension,
                rotational: h.rotational,
            };
            let config_drive = w.config_drive.map(|c| ConfigDrive {
                user_data: c.user_data,
                network_data: c.network_data,
                meta_data: c.meta_data,
            });
            let extra_ca = match w.extra_ca_pem.trim() {
                "" => Vec::new(),
                pem => crate::image::source::pem_certs(pem).map_err(|e| {
                    (
                        id.clone(),
                        format!("the command's extra CA certificates (extra_ca_pem): {e}"),
                    )
                })?,
            };
            Kind::WriteImage {
                spec,
                hints,
                config_drive,
                extra_ca,
            }
        }
        None => {
            return Err((
                id,
                "a command without a kind (is the coordinator newer than this agent?)".into(),
            ));
        }
    };
    Ok(Command { id, kind })
}

fn progress_to_proto(id: &str, p: &Progress) -> pb::Progress {
    pb::Progress {
        command_id: id.to_string(),
        phase: p.phase.to_string(),
        bytes_done: p.bytes_done,
        bytes_total: p.bytes_total,
        bytes_per_second: p.bytes_per_second,
        stalled_seconds: p.stalled_seconds,
    }
}

pub(super) fn result_to_proto(id: String, o: Outcome) -> pb::CommandResult {
    use pb::command_result::Outcome as O;
    let outcome = match o {
        Outcome::Success { message, detail } => O::Success(pb::Success {
            message,
            detail: match detail {
                Detail::None | Detail::KexecLoaded => None,
                Detail::Inventory(inv) => {
                    Some(pb::success::Detail::Inventory(inventory_to_proto(&inv)))
                }
                Detail::Written(w) => Some(pb::success::Detail::WriteImage(pb::WriteImageResult {
                    device: w.device,
                    bytes_written: w.bytes,
                    digest: w.digest,
                    checksum_type: w.algo.to_string(),
                })),
            },
        }),
        Outcome::Failure { message, kind } => O::Failure(pb::Failure {
            message,
            kind: match kind {
                FailureKind::InvalidRequest => pb::failure::Kind::InvalidRequest,
                FailureKind::ChecksumMismatch => pb::failure::Kind::ChecksumMismatch,
                FailureKind::Download => pb::failure::Kind::Download,
                FailureKind::Disk => pb::failure::Kind::Disk,
                FailureKind::Busy => pb::failure::Kind::Busy,
                FailureKind::Internal => pb::failure::Kind::Internal,
            } as i32,
        }),
    };
    pb::CommandResult {
        command_id: id,
        outcome: Some(outcome),
    }
}

pub(super) fn status_to_proto(id: String, st: State) -> pb::CommandStatus {
    use pb::command_status::State as S;
    match st {
        State::Running(p) => pb::CommandStatus {
            progress: p.as_ref().map(|p| progress_to_proto(&id, p)),
            command_id: id,
            state: S::Running as i32,
            result: None,
        },
        State::Finished(o) => pb::CommandStatus {
            command_id: id.clone(),
            state: S::Finished as i32,
            result: Some(result_to_proto(id, o)),
            progress: None,
        },
    }
}

pub(super) fn update_to_proto(u: Update) -> pb::AgentEvent {
    use pb::agent_event::Event as E;
    event(match u {
        Update::Progress { id, progress } => E::Progress(progress_to_proto(&id, &progress)),
        Update::Finished { id, outcome } => E::Result(result_to_proto(id, outcome)),
        Update::Log {
            id,
            warning,
            message,
        } => E::Log(pb::LogLine {
            level: if warning {
                pb::log_line::Level::Warn
            } else {
                pb::log_line::Level::Info
            } as i32,
            message,
            command_id: id,
        }),
    })
}

fn s(v: &Option<String>) -> String {
    v.clone().unwrap_or_default()
}

pub fn inventory_to_proto(inv: &Inventory) -> pb::Inventory {
    let sys = &inv.system;
    pb::Inventory {
        system: Some(pb::SystemInfo {
            manufacturer: s(&sys.manufacturer),
            product_name: s(&sys.product_name),
            serial_number: s(&sys.serial_number),
            uuid: s(&sys.uuid),
            bios_vendor: s(&sys.bios_vendor),
            bios_version: s(&sys.bios_version),
            bios_date: s(&sys.bios_date),
            version: s(&sys.version),
            sku: s(&sys.sku),
            family: s(&sys.family),
        }),
        cpu: Some(pb::Cpu {
            model: s(&inv.cpu.model),
            architecture: s(&inv.cpu.architecture),
            count: inv.cpu.count,
            frequency_mhz: inv.cpu.frequency_mhz.unwrap_or(0),
            flags: inv.cpu.flags.clone(),
            vendor: s(&inv.cpu.vendor),
            cores: inv.cpu.cores,
            sockets: inv.cpu.sockets,
            threads_per_core: inv.cpu.threads_per_core,
            max_frequency_mhz: inv.cpu.max_frequency_mhz,
        }),
        memory: Some(pb::Memory {
            total_bytes: inv.memory.total_bytes,
            physical_mib: inv.memory.physical_mib.unwrap_or(0),
            dimms: inv
                .memory
                .dimms
                .iter()
                .map(|d| pb::Dimm {
                    locator: s(&d.locator),
                    bank_locator: s(&d.bank_locator),
                    size_mib: d.size_mib.unwrap_or(0),
                    r#type: s(&d.kind),
                    form_factor: s(&d.form_factor),
                    speed_mts: d.speed_mts.unwrap_or(0),
                    configured_speed_mts: d.configured_speed_mts.unwrap_or(0),
                    manufacturer: s(&d.manufacturer),
                    serial_number: s(&d.serial_number),
                    part_number: s(&d.part_number),
                })
                .collect(),
        }),
        disks: inv
            .disks
            .iter()
            .map(|d| pb::Disk {
                name: d.name.clone(),
                alternate_names: d.alternate_names.clone(),
                size_bytes: d.size_bytes,
                rotational: d.rotational,
                model: s(&d.model),
                vendor: s(&d.vendor),
                serial_number: s(&d.serial_number),
                wwn: s(&d.wwn),
                wwn_with_extension: s(&d.wwn_with_extension),
                wwn_vendor_extension: s(&d.wwn_vendor_extension),
                hctl: s(&d.hctl),
                r#type: d.kind.clone(),
                logical_block_size: d.logical_block_size,
                physical_block_size: d.physical_block_size,
                by_path: s(&d.by_path),
                transport: s(&d.transport),
                removable: d.removable,
                read_only: d.read_only,
                numa_node: d.numa_node,
                partition_table: s(&d.partition_table),
                partitions: d
                    .partitions
                    .iter()
                    .map(|p| pb::Partition {
                        name: p.name.clone(),
                        number: p.number.unwrap_or(0),
                        start_bytes: p.start_bytes,
                        size_bytes: p.size_bytes,
                        label: s(&p.label),
                    })
                    .collect(),
            })
            .collect(),
        nics: inv
            .nics
            .iter()
            .map(|n| pb::Nic {
                name: n.name.clone(),
                mac: s(&n.mac),
                mtu: n.mtu.unwrap_or(0),
                driver: s(&n.driver),
                speed_mbps: n.speed_mbps.unwrap_or(0),
                has_carrier: n.has_carrier.unwrap_or(false),
                ip_addresses: n.ip_addresses.clone(),
                pxe: n.pxe,
                kind: n.kind.clone(),
                permanent_mac: s(&n.permanent_mac),
                pci_address: s(&n.pci_address),
                vendor_id: s(&n.vendor_id),
                device_id: s(&n.device_id),
                operstate: s(&n.operstate),
                numa_node: n.numa_node,
                bond_master: s(&n.bond_master),
                bond: n.bond.as_ref().map(|b| pb::Bond {
                    mode: s(&b.mode),
                    members: b.members.clone(),
                }),
                lldp: n.lldp.as_ref().map(|l| pb::LldpNeighbour {
                    chassis_id: s(&l.chassis_id),
                    port_id: s(&l.port_id),
                    port_description: s(&l.port_description),
                    system_name: s(&l.system_name),
                    system_description: s(&l.system_description),
                    management_addresses: l.management_addresses.clone(),
                    port_vlan_id: l.port_vlan_id.map(u32::from),
                    vlans: l
                        .vlans
                        .iter()
                        .map(|v| pb::LldpVlan {
                            id: u32::from(v.id),
                            name: s(&v.name),
                        })
                        .collect(),
                }),
            })
            .collect(),
        boot_mode: inv.boot_mode.clone(),
        hostname: s(&inv.hostname),
        secure_boot: inv.secure_boot,
        numa_nodes: inv
            .numa_nodes
            .iter()
            .map(|n| pb::NumaNode {
                id: n.id,
                cpus: n.cpus.clone(),
                memory_bytes: n.memory_bytes.unwrap_or(0),
            })
            .collect(),
        pci_devices: inv
            .pci_devices
            .iter()
            .map(|p| pb::PciDevice {
                address: p.address.clone(),
                class: s(&p.class),
                vendor_id: s(&p.vendor_id),
                device_id: s(&p.device_id),
                subsystem_vendor_id: s(&p.subsystem_vendor_id),
                subsystem_device_id: s(&p.subsystem_device_id),
                revision: s(&p.revision),
                driver: s(&p.driver),
                numa_node: p.numa_node,
                gpu: p.gpu,
            })
            .collect(),
        bmc: inv.bmc.as_ref().map(|b| pb::Bmc {
            ipv4_address: s(&b.ipv4_address),
            ipv6_address: s(&b.ipv6_address),
            mac: s(&b.mac),
            interface: s(&b.interface),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stalled_report_carries_its_seconds() {
        let p = Progress {
            phase: crate::image::STALLED,
            bytes_done: 7,
            bytes_total: 9,
            bytes_per_second: 0,
            stalled_seconds: 12,
        };
        let pb::agent_event::Event::Progress(got) = update_to_proto(Update::Progress {
            id: "w".into(),
            progress: p,
        })
        .event
        .unwrap() else {
            panic!("not progress");
        };
        assert_eq!(
            (
                got.command_id.as_str(),
                got.phase.as_str(),
                got.bytes_done,
                got.stalled_seconds
            ),
            ("w", "stalled", 7, 12)
        );
    }

    #[test]
    fn write_image_command_with_a_bad_checksum_is_refused_with_its_id() {
        let c = pb::Command {
            id: "write-image-1".into(),
            kind: Some(pb::command::Kind::WriteImage(pb::WriteImage {
                url: "http://x/y".into(),
                checksum: "abc".into(),
                ..Default::default()
            })),
        };
        let (id, msg) = command_from_proto(c).unwrap_err();
        assert_eq!(id, "write-image-1");
        assert!(msg.contains("3 hex digits"), "{msg}");
    }

    #[test]
    fn image_cas_arrive_as_der_and_bad_ones_are_refused_with_the_id() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let command = |pem: String| pb::Command {
            id: "w".into(),
            kind: Some(pb::command::Kind::WriteImage(pb::WriteImage {
                url: "https://x/y".into(),
                checksum: "a".repeat(64),
                extra_ca_pem: pem,
                ..Default::default()
            })),
        };
        let Kind::WriteImage { extra_ca, .. } =
            command_from_proto(command(cert.pem())).unwrap().kind
        else {
            panic!("not a write-image");
        };
        assert_eq!(extra_ca, vec![cert.der().to_vec()]);
        let (id, msg) = command_from_proto(command("not a certificate".into())).unwrap_err();
        assert_eq!(id, "w");
        assert!(
            msg.contains("extra_ca_pem") && msg.contains("no PEM certificate"),
            "{msg}"
        );
    }

    #[test]
    fn config_drive_and_erase_mode_arrive() {
        let c = pb::Command {
            id: "w".into(),
            kind: Some(pb::command::Kind::WriteImage(pb::WriteImage {
                url: "http://x/y".into(),
                checksum: "a".repeat(64),
                config_drive: Some(pb::ConfigDrive {
                    user_data: Some(b"#cloud-config".to_vec()),
                    network_data: None,
                    meta_data: b"{}".to_vec(),
                }),
                ..Default::default()
            })),
        };
        let Kind::WriteImage { config_drive, .. } = command_from_proto(c).unwrap().kind else {
            panic!("not a write-image");
        };
        let d = config_drive.unwrap();
        assert_eq!(d.user_data.as_deref(), Some(&b"#cloud-config"[..]));
        assert_eq!(d.network_data, None);
        let erase = |mode: pb::erase_metadata::Mode| {
            command_from_proto(pb::Command {
                id: "e".into(),
                kind: Some(pb::command::Kind::EraseMetadata(pb::EraseMetadata {
                    mode: mode as i32,
                })),
            })
            .unwrap()
            .kind
        };
        assert_eq!(
            erase(pb::erase_metadata::Mode::Unspecified),
            Kind::EraseMetadata { full: false }
        );
        assert_eq!(
            erase(pb::erase_metadata::Mode::Full),
            Kind::EraseMetadata { full: true }
        );
    }
}
