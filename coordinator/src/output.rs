//! What `slipway get` and `slipway describe` print, as pure functions of the hosts and `now`
//! (golden-tested below; kubectl's conventions).

use std::fmt::Write as _;

use jiff::Timestamp;
use slipway_reconcile::host::{BareMetalHost, HostStatus, OperationalStatus, ProvisioningState};

use crate::hardware::{self, HardwareData};
use crate::sources::Problem;
use crate::view::HostView;

/// kubectl's age format: 45s, 12m, 5h, 3d.
pub fn age(since: Option<Timestamp>, now: Timestamp) -> String {
    let Some(since) = since else {
        return "<unknown>".into();
    };
    let secs = now.duration_since(since).as_secs().max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// Bytes in binary units, one decimal: 1.5 GiB.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn status(h: &BareMetalHost) -> HostStatus {
    h.status.clone().unwrap_or_default()
}

fn state_of(v: &HostView) -> String {
    let st = status(&v.host);
    let s = st.provisioning.state;
    let mut out = s.to_string();
    // Deleting goes through deprovisioning and powering off: the state says each step, and
    // that the host is on its way out.
    if v.deleted
        && !matches!(
            s,
            ProvisioningState::PoweringOffBeforeDelete | ProvisioningState::Deleting
        )
    {
        out.push_str(" (deleted)");
    }
    if st.paused {
        out.push_str(" (paused)");
    } else if st.operational_status == OperationalStatus::Detached {
        out.push_str(" (detached)");
    }
    out
}

fn progress_cell(st: &HostStatus) -> String {
    if st.operational_status == OperationalStatus::Delayed {
        return "waiting for a slot".into();
    }
    match &st.progress {
        Some(p) => match p.percent() {
            Some(pct) => format!("{pct}%"),
            None => bytes(p.bytes_done),
        },
        None => String::new(),
    }
}

/// The host table. `wide` adds CONSUMER, BOOTMAC, AGENT and IMAGE; NAMESPACE comes first
/// when a host is outside the default namespace.
pub fn table(hosts: &[&HostView], wide: bool, now: Timestamp) -> String {
    let mut rows: Vec<Vec<String>> = Vec::new();
    let namespaces = hosts
        .iter()
        .any(|v| v.key().namespace != slipway_reconcile::host::DEFAULT_NAMESPACE);
    let mut header = vec!["NAME", "STATE", "ONLINE", "ERROR", "PROGRESS", "AGE"];
    if namespaces {
        header.insert(0, "NAMESPACE");
    }
    if wide {
        header.extend(["CONSUMER", "BOOTMAC", "AGENT", "IMAGE"]);
    }
    rows.push(header.iter().map(ToString::to_string).collect());
    for v in hosts {
        let h = &v.host;
        let st = status(h);
        let mut row = vec![
            h.metadata.name.clone(),
            state_of(v),
            h.spec.online.to_string(),
            st.error_type.map(|e| e.to_string()).unwrap_or_default(),
            progress_cell(&st),
            age(h.metadata.creation_timestamp, now),
        ];
        if namespaces {
            row.insert(0, v.key().namespace);
        }
        if wide {
            row.push(
                h.spec
                    .consumer_ref
                    .as_ref()
                    .and_then(|c| c.name.clone())
                    .unwrap_or_default(),
            );
            row.push(h.spec.boot_mac_address.clone().unwrap_or_default());
            row.push(match &st.agent {
                Some(a) if a.connected => "connected".into(),
                Some(_) => "disconnected".into(),
                None => String::new(),
            });
            row.push(
                h.spec
                    .image
                    .as_ref()
                    .map(|i| i.url.clone())
                    .unwrap_or_default(),
            );
        }
        rows.push(row);
    }
    columns(&rows)
}

/// Aligns rows into columns separated by three spaces, kubectl style.
fn columns(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}   ", w = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Problems in the hosts directory, one line each, for stderr.
pub fn problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("{}: {p}\n", if p.warning { "warning" } else { "error" }))
        .collect()
}

fn join_nonempty(parts: &[&str]) -> String {
    parts
        .iter()
        .filter(|p| !p.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ")
}

/// What the operator should do next, when the host waits on something outside Slipway.
fn waiting_for(v: &HostView) -> Option<String> {
    let st = status(&v.host);
    if st.operational_status == OperationalStatus::Delayed {
        let why = v
            .events
            .iter()
            .rev()
            .find(|e| e.reason == "Delayed")
            .map(|e| e.message.clone())
            .unwrap_or_else(|| {
                "a free provisioning slot (slipway serve --provisioning-limit)".into()
            });
        return Some(why);
    }
    let needs_agent = matches!(
        st.provisioning.state,
        ProvisioningState::Inspecting
            | ProvisioningState::Preparing
            | ProvisioningState::Provisioning
            | ProvisioningState::Deprovisioning
    );
    let connected = st.agent.as_ref().is_some_and(|a| a.connected);
    (needs_agent && !connected && v.host.spec.bmc.is_none()).then(|| {
        format!(
            "the host's agent. The host has no BMC, so power it on into the Slipway ramdisk by \
             hand, or run `slipway-agent run` on it with a token from `slipway token create {}`",
            v.host.metadata.name
        )
    })
}

/// `slipway describe host NAME`; the hardware section summarises the full inventory when there
/// is one, else the metal3 summary in the status.
pub fn describe(v: &HostView, full: Option<&HardwareData>, now: Timestamp) -> String {
    let h = &v.host;
    let st = status(h);
    let mut o = String::new();
    let mut kv = |k: &str, val: String| {
        let _ = writeln!(o, "{:<14}{}", format!("{k}:"), val);
    };
    kv("Name", h.metadata.name.clone());
    if let Some(ns) = &h.metadata.namespace {
        kv("Namespace", ns.clone());
    }
    kv("Source", v.source.clone());
    kv("State", state_of(v));
    for p in &v.problems {
        kv("Problem", p.to_string());
    }
    kv("Online", h.spec.online.to_string());
    kv("Powered On", st.powered_on.to_string());
    kv(
        "Operational",
        serde_json::to_value(st.operational_status)
            .ok()
            .and_then(|x| x.as_str().map(str::to_string))
            .unwrap_or_default(),
    );
    if let Some(e) = st.error_type {
        kv("Error", format!("{e} (count {})", st.error_count));
        kv("Message", st.error_message.clone());
        if let Some(at) = st.retry_after {
            kv(
                "Retry",
                if at > now {
                    format!("in {}", age(Some(now), at))
                } else {
                    "now".into()
                },
            );
        }
    }
    match &st.agent {
        Some(a) if a.connected => kv(
            "Agent",
            format!(
                "connected from {} for {} (agent {})",
                a.address,
                age(a.since, now),
                a.version
            ),
        ),
        Some(a) => kv(
            "Agent",
            format!(
                "disconnected {} ago (was {})",
                age(a.disconnected_at, now),
                a.address
            ),
        ),
        None => kv("Agent", "never connected".into()),
    }
    if let Some(c) = &st.current_command {
        kv(
            "Command",
            format!(
                "{} ({}, sent {} ago)",
                c.id,
                c.kind.name(),
                age(Some(c.issued_at), now)
            ),
        );
    }
    if let Some(p) = &st.progress {
        let total = if p.bytes_total > 0 {
            format!(" of {}", bytes(p.bytes_total))
        } else {
            String::new()
        };
        let pct = p.percent().map(|x| format!("{x}% ")).unwrap_or_default();
        kv(
            "Progress",
            format!(
                "{}{} {}{} at {}/s",
                pct,
                p.phase,
                bytes(p.bytes_done),
                total,
                bytes(p.bytes_per_second)
            ),
        );
    }
    if let Some(w) = waiting_for(v) {
        kv("Waiting For", w);
    }

    let _ = writeln!(o, "Spec:");
    if let Some(mac) = &h.spec.boot_mac_address {
        let _ = writeln!(o, "  Boot MAC:    {mac}");
    }
    if let Some(bmc) = &h.spec.bmc {
        let _ = writeln!(o, "  BMC:         {}", bmc.address);
    }
    match &h.spec.image {
        Some(i) => {
            let kind = i
                .checksum_type
                .and_then(|k| serde_json::to_value(k).ok())
                .and_then(|x| x.as_str().map(str::to_string))
                .unwrap_or_else(|| "auto".into());
            let digest: String = i.checksum.chars().take(16).collect();
            let _ = writeln!(o, "  Image:       {} ({kind} {digest}...)", i.url);
        }
        None => {
            let _ = writeln!(o, "  Image:       <none>");
        }
    }
    if let Some(hints) = &h.spec.root_device_hints {
        let text = serde_json::to_value(hints)
            .ok()
            .and_then(|v| v.as_object().cloned())
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k}={}", v.to_string().trim_matches('"')))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        let _ = writeln!(o, "  Root Disk:   {text}");
    }
    let cleaning = serde_json::to_value(h.spec.cleaning_mode())
        .ok()
        .and_then(|x| x.as_str().map(str::to_string))
        .unwrap_or_default();
    let _ = writeln!(o, "  Cleaning:    {cleaning}");

    if let Some(full) = full {
        o.push_str(&hardware_summary(full, now));
    } else if let Some(hw) = &st.hardware {
        let _ = writeln!(o, "Hardware:");
        let sv = &hw.system_vendor;
        let mut system = join_nonempty(&[&sv.manufacturer, &sv.product_name]);
        if !sv.serial_number.is_empty() {
            let _ = write!(system, " (serial {})", sv.serial_number);
        }
        if !system.is_empty() {
            let _ = writeln!(o, "  System:      {system}");
        }
        let model = if hw.cpu.model.is_empty() {
            "unknown model"
        } else {
            &hw.cpu.model
        };
        let _ = writeln!(
            o,
            "  CPU:         {} x {model} ({}, {} MHz)",
            hw.cpu.count, hw.cpu.arch, hw.cpu.clock_megahertz
        );
        let _ = writeln!(o, "  Memory:      {} MiB", hw.ram_mebibytes);
        let _ = writeln!(o, "  Disks:");
        let mut rows = Vec::new();
        for d in &hw.storage {
            rows.push(vec![
                format!("    {}", d.name),
                bytes(d.size_bytes),
                d.kind.clone(),
                d.model.clone(),
                d.serial_number.clone(),
            ]);
        }
        o.push_str(&columns(&rows));
        let _ = writeln!(o, "  NICs:");
        let mut rows = Vec::new();
        for n in &hw.nics {
            rows.push(vec![
                format!("    {}", n.name),
                n.mac.clone(),
                n.ip.clone(),
                n.model.clone(),
                if n.pxe { "pxe".into() } else { String::new() },
            ]);
        }
        o.push_str(&columns(&rows));
    }

    let hist = &st.operation_history;
    let _ = writeln!(o, "History:");
    for (name, m) in [
        ("register", &hist.register),
        ("inspect", &hist.inspect),
        ("provision", &hist.provision),
        ("deprovision", &hist.deprovision),
    ] {
        if let Some(start) = m.start {
            let took = m
                .end
                .map(|e| format!("took {:.1}s", e.duration_since(start).as_secs_f64()))
                .unwrap_or_else(|| "running".into());
            let _ = writeln!(o, "  {:<12} {start}  {took}", format!("{name}:"));
        }
    }

    if !st.conditions.is_empty() {
        let _ = writeln!(o, "Conditions:");
        let mut rows = vec![vec![
            "  TYPE".to_string(),
            "STATUS".into(),
            "REASON".into(),
            "SINCE".into(),
        ]];
        for c in &st.conditions {
            rows.push(vec![
                format!("  {}", c.type_),
                c.status.clone(),
                c.reason.clone(),
                age(Some(c.last_transition_time), now),
            ]);
        }
        o.push_str(&columns(&rows));
    }

    let _ = writeln!(o, "Events:");
    if v.events.is_empty() {
        let _ = writeln!(o, "  <none>");
    } else {
        let mut rows = vec![vec![
            "  AGE".to_string(),
            "TYPE".into(),
            "REASON".into(),
            "MESSAGE".into(),
        ]];
        for e in v.events.iter().rev().take(20).rev() {
            rows.push(vec![
                format!("  {}", age(Some(e.time), now)),
                if e.warning {
                    "Warning".into()
                } else {
                    "Normal".into()
                },
                e.reason.clone(),
                e.message.clone(),
            ]);
        }
        o.push_str(&columns(&rows));
    }
    o
}

/// A kernel-style CPU list: 0-3,8,10-11.
fn cpu_ranges(cpus: &[u32]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let start = cpus[i];
        let mut end = start;
        while i + 1 < cpus.len() && cpus[i + 1] == end + 1 {
            i += 1;
            end = cpus[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

/// The hardware section of `describe`, from a full inventory.
pub fn hardware_summary(doc: &HardwareData, now: Timestamp) -> String {
    let h = &doc.spec.hardware;
    let mut o = String::new();
    let by = doc
        .metadata
        .annotations
        .get(hardware::COLLECTED_BY)
        .map(String::as_str)
        .unwrap_or("agent");
    let _ = writeln!(
        o,
        "Hardware:     (full inventory from {by}, {} ago; `slipway get hardwaredata {}`)",
        age(doc.collected_at(), now),
        doc.metadata.name
    );
    let sv = &h.system_vendor;
    let mut system = join_nonempty(&[&sv.manufacturer, &sv.product_name]);
    if !sv.serial_number.is_empty() {
        let _ = write!(system, " (serial {})", sv.serial_number);
    }
    let bios = &h.firmware.bios;
    let fw = join_nonempty(&[&bios.vendor, &bios.version]);
    if !fw.is_empty() {
        let _ = write!(system, ", BIOS {fw}");
        if !bios.date.is_empty() {
            let _ = write!(system, " ({})", bios.date);
        }
    }
    if !h.firmware.boot_mode.is_empty() {
        let _ = write!(system, ", {}", h.firmware.boot_mode);
    }
    match h.firmware.secure_boot {
        Some(true) => system.push_str(", Secure Boot on"),
        Some(false) => system.push_str(", Secure Boot off"),
        None => {}
    }
    let _ = writeln!(o, "  System:      {}", system.trim_start_matches(", "));
    let c = &h.cpu;
    let model = if c.model.is_empty() {
        "unknown model"
    } else {
        &c.model
    };
    let mut cpu = format!("{} x {model}", c.sockets.unwrap_or(1));
    let mut topo = vec![format!("{} threads", c.count)];
    if let Some(cores) = c.cores {
        topo.push(format!("{cores} cores"));
    }
    if c.clock_megahertz > 0.0 {
        topo.push(format!("{} MHz", c.clock_megahertz));
    }
    if let Some(max) = c.max_clock_megahertz {
        topo.push(format!("max {max} MHz"));
    }
    let _ = write!(cpu, " ({}, {})", c.arch, topo.join(", "));
    let _ = writeln!(o, "  CPU:         {cpu}");
    let m = &h.memory;
    let mut mem = if m.physical_mebibytes > 0 {
        format!(
            "{} installed, {} usable",
            bytes(m.physical_mebibytes << 20),
            bytes(m.total_bytes)
        )
    } else {
        format!("{} usable", bytes(m.total_bytes))
    };
    if !m.dimms.is_empty() {
        let dimms: Vec<String> = m
            .dimms
            .iter()
            .map(|d| {
                let mut s = format!("{} {}", d.locator, bytes(d.size_mebibytes << 20));
                if !d.kind.is_empty() {
                    let _ = write!(s, " {}", d.kind);
                }
                if d.speed_mts > 0 {
                    let _ = write!(s, " {} MT/s", d.speed_mts);
                }
                s
            })
            .collect();
        let _ = write!(mem, "; {} DIMMs: {}", m.dimms.len(), dimms.join(", "));
    }
    let _ = writeln!(o, "  Memory:      {mem}");
    if h.numa_nodes.len() > 1 {
        let nodes: Vec<String> = h
            .numa_nodes
            .iter()
            .map(|n| {
                format!(
                    "{} (cpus {}, {})",
                    n.id,
                    cpu_ranges(&n.cpus),
                    bytes(n.memory_bytes)
                )
            })
            .collect();
        let _ = writeln!(o, "  NUMA:        {}", nodes.join("; "));
    }
    let _ = writeln!(o, "  Disks:");
    let rows: Vec<Vec<String>> = h
        .storage
        .iter()
        .map(|d| {
            vec![
                format!("    {}", d.name),
                bytes(d.size_bytes),
                d.kind.clone(),
                d.transport.clone(),
                d.model.clone(),
                d.serial_number.clone(),
                d.by_path.clone(),
            ]
        })
        .collect();
    o.push_str(&columns(&rows));
    let _ = writeln!(o, "  NICs:");
    let rows: Vec<Vec<String>> = h
        .nics
        .iter()
        .map(|n| {
            let mut what = Vec::new();
            if let Some(b) = &n.bond {
                what.push(format!("bond {} ({})", b.mode, b.members.join(", ")));
            }
            if !n.bond_master.is_empty() {
                what.push(format!("in {}", n.bond_master));
            }
            if n.speed_mbps > 0 {
                what.push(if n.speed_mbps % 1000 == 0 {
                    format!("{} Gb/s", n.speed_mbps / 1000)
                } else {
                    format!("{} Mb/s", n.speed_mbps)
                });
            }
            if n.pxe {
                what.push("pxe".into());
            }
            if let Some(l) = &n.lldp {
                let mut s = format!(
                    "switch {} port {}",
                    if l.system_name.is_empty() {
                        &l.chassis_id
                    } else {
                        &l.system_name
                    },
                    l.port_id
                );
                if let Some(v) = l.port_vlan_id {
                    let _ = write!(s, " vlan {v}");
                }
                what.push(s);
            }
            vec![
                format!("    {}", n.name),
                n.mac.clone(),
                n.ip.clone(),
                n.driver.clone(),
                what.join(", "),
            ]
        })
        .collect();
    o.push_str(&columns(&rows));
    let gpus: Vec<String> = h
        .pci_devices
        .iter()
        .filter(|p| p.gpu)
        .map(|p| {
            let vendor = if p.vendor_name.is_empty() {
                &p.vendor_id
            } else {
                &p.vendor_name
            };
            format!("{vendor} {} at {}", p.device_id, p.address)
        })
        .collect();
    let mut pci = format!("{} devices", h.pci_devices.len());
    if !gpus.is_empty() {
        let _ = write!(pci, ", {} GPU: {}", gpus.len(), gpus.join(", "));
    }
    let _ = writeln!(o, "  PCI:         {pci}");
    let bmc = match &h.bmc {
        Some(b) => {
            let addr = join_nonempty(&[&b.ipv4_address, &b.ipv6_address]);
            let mut addr = if addr.is_empty() {
                "address unknown".to_string()
            } else {
                addr
            };
            if !b.mac.is_empty() {
                let _ = write!(addr, ", MAC {}", b.mac);
            }
            if b.interface.is_empty() {
                addr
            } else {
                format!("{addr} ({})", b.interface)
            }
        }
        None => "none seen from the host".into(),
    };
    let _ = writeln!(o, "  BMC:         {bmc}");
    o
}

/// `slipway get hardwaredata`: one row per host.
pub fn hardware_table(docs: &[HardwareData], now: Timestamp) -> String {
    let mut rows = vec![
        ["NAME", "CPUS", "MEMORY", "DISKS", "NICS", "GPUS", "AGE"]
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
    ];
    for d in docs {
        let h = &d.spec.hardware;
        let mem = if h.memory.physical_mebibytes > 0 {
            h.memory.physical_mebibytes << 20
        } else {
            h.memory.total_bytes
        };
        rows.push(vec![
            d.metadata.name.clone(),
            h.cpu.count.to_string(),
            bytes(mem),
            h.storage.len().to_string(),
            h.nics.len().to_string(),
            h.pci_devices.iter().filter(|p| p.gpu).count().to_string(),
            age(d.collected_at(), now),
        ]);
    }
    columns(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::EventRecord;
    use expect_test::expect;
    use jiff::SignedDuration;
    use slipway_reconcile::host::{
        AgentStatus, ErrorType, HardwareDetails, Image, Progress, Storage,
    };

    fn now() -> Timestamp {
        "2026-11-24T12:00:00Z".parse().unwrap()
    }

    fn host(name: &str, state: ProvisioningState) -> HostView {
        let mut h = BareMetalHost::default();
        h.metadata.name = name.into();
        h.metadata.creation_timestamp = Some(now() - SignedDuration::from_secs(300));
        h.spec.online = true;
        h.spec.image = Some(Image {
            url: "http://10.0.0.1:8080/images/os.img".into(),
            checksum: "ab".repeat(32),
            ..Default::default()
        });
        let mut st = HostStatus::default();
        st.provisioning.state = state;
        h.status = Some(st);
        HostView {
            host: h,
            source: format!("hosts/{name}.yaml"),
            deleted: false,
            events: vec![],
            problems: vec![],
        }
    }

    #[test]
    fn host_table() {
        let a = host("worker-0", ProvisioningState::Provisioned);
        let mut b = host("worker-1", ProvisioningState::Provisioning);
        {
            let st = b.host.status.as_mut().unwrap();
            st.progress = Some(Progress {
                command_id: "w".into(),
                phase: "write".into(),
                bytes_done: 3 << 30,
                bytes_total: 4 << 30,
                bytes_per_second: 200 << 20,
            });
            st.error_type = Some(ErrorType::Provisioning);
            st.agent = Some(AgentStatus {
                connected: true,
                ..Default::default()
            });
        }
        let mut c = host("new-one", ProvisioningState::None);
        c.host.metadata.creation_timestamp = Some(now() - SignedDuration::from_hours(50));
        c.host.spec.online = false;
        expect![[r#"
            NAME       STATE          ONLINE   ERROR                PROGRESS   AGE
            worker-0   provisioned    true                                     5m
            worker-1   provisioning   true     provisioning error   75%        5m
            new-one                   false                                    2d
        "#]]
        .assert_eq(&table(&[&a, &b, &c], false, now()));
        expect![[r#"
            NAME       STATE         ONLINE   ERROR   PROGRESS   AGE   CONSUMER   BOOTMAC   AGENT   IMAGE
            worker-0   provisioned   true                        5m                                 http://10.0.0.1:8080/images/os.img
        "#]]
        .assert_eq(&table(&[&a], true, now()));
    }

    #[test]
    fn describe_host_in_error() {
        let mut v = host("worker-1", ProvisioningState::Provisioning);
        {
            let st = v.host.status.as_mut().unwrap();
            st.error_type = Some(ErrorType::Provisioning);
            st.error_count = 2;
            st.error_message = "checksum mismatch for http://10.0.0.1:8080/images/os.img".into();
            st.retry_after = Some(now() + SignedDuration::from_secs(20));
            st.agent = Some(AgentStatus {
                connected: false,
                disconnected_at: Some(now() - SignedDuration::from_secs(30)),
                address: "10.0.0.9:4000".into(),
                ..Default::default()
            });
            st.hardware = Some(std::sync::Arc::new(HardwareDetails {
                ram_mebibytes: 2048,
                storage: vec![Storage {
                    name: "/dev/vda".into(),
                    size_bytes: 20 << 30,
                    kind: "SSD".into(),
                    model: "QEMU".into(),
                    serial_number: "d1".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }));
            st.operation_history.register.start = Some(now() - SignedDuration::from_secs(100));
            st.operation_history.register.end = Some(now() - SignedDuration::from_secs(99));
            slipway_reconcile::conditions::update(st, now() - SignedDuration::from_secs(60));
        }
        v.events.push(std::sync::Arc::new(EventRecord {
            time: now() - SignedDuration::from_secs(10),
            warning: true,
            reason: "Error".into(),
            message: "provisioning error: checksum mismatch".into(),
        }));
        expect![[r#"
            Name:         worker-1
            Source:       hosts/worker-1.yaml
            State:        provisioning
            Online:       true
            Powered On:   false
            Operational:  OK
            Error:        provisioning error (count 2)
            Message:      checksum mismatch for http://10.0.0.1:8080/images/os.img
            Retry:        in 20s
            Agent:        disconnected 30s ago (was 10.0.0.9:4000)
            Waiting For:  the host's agent. The host has no BMC, so power it on into the Slipway ramdisk by hand, or run `slipway-agent run` on it with a token from `slipway token create worker-1`
            Spec:
              Image:       http://10.0.0.1:8080/images/os.img (auto abababababababab...)
              Cleaning:    metadata
            Hardware:
              CPU:         0 x unknown model (, 0 MHz)
              Memory:      2048 MiB
              Disks:
                /dev/vda   20.0 GiB   SSD   QEMU   d1
              NICs:
            History:
              register:    2026-11-24T11:58:20Z  took 1.0s
            Conditions:
              TYPE                       STATUS    REASON           SINCE
              Manageable                 True      Manageable       60s
              AvailableForProvisioning   False     NotAvailable     60s
              Provisioned                False     NotProvisioned   60s
              Ready                      False     NotProvisioned   60s
              Progressing                True      Provisioning     60s
              Healthy                    Unknown   Unknown          60s
            Events:
              AGE   TYPE      REASON   MESSAGE
              10s   Warning   Error    provisioning error: checksum mismatch
        "#]]
        .assert_eq(&describe(&v, None, now()));
    }

    #[test]
    fn describe_with_the_full_inventory() {
        use crate::hardware::*;
        let mut v = host("r740-07", ProvisioningState::Available);
        v.host.spec.image = None;
        let h = Hardware {
            system_vendor: SystemVendor {
                manufacturer: "Dell Inc.".into(),
                product_name: "PowerEdge R740xd".into(),
                serial_number: "7XK2M93".into(),
                ..Default::default()
            },
            firmware: Firmware {
                bios: slipway_reconcile::host::Bios {
                    date: "06/12/2023".into(),
                    vendor: "Dell Inc.".into(),
                    version: "2.19.1".into(),
                },
                boot_mode: "UEFI".into(),
                secure_boot: Some(true),
            },
            cpu: Cpu {
                arch: "x86_64".into(),
                model: "Intel(R) Xeon(R) Gold 6130 CPU @ 2.10GHz".into(),
                clock_megahertz: 2100.0,
                count: 8,
                cores: Some(4),
                sockets: Some(2),
                max_clock_megahertz: Some(3700),
                ..Default::default()
            },
            memory: Memory {
                total_bytes: 62 << 30,
                physical_mebibytes: 65536,
                dimms: vec![
                    Dimm {
                        locator: "A1".into(),
                        size_mebibytes: 32768,
                        kind: "DDR4".into(),
                        speed_mts: 2666,
                        ..Default::default()
                    },
                    Dimm {
                        locator: "B1".into(),
                        size_mebibytes: 32768,
                        kind: "DDR4".into(),
                        speed_mts: 2666,
                        ..Default::default()
                    },
                ],
            },
            numa_nodes: vec![
                NumaNode {
                    id: 0,
                    cpus: vec![0, 1, 4, 5],
                    memory_bytes: 31 << 30,
                },
                NumaNode {
                    id: 1,
                    cpus: vec![2, 3, 6, 7],
                    memory_bytes: 31 << 30,
                },
            ],
            storage: vec![Storage {
                name: "/dev/sda".into(),
                kind: "HDD".into(),
                size_bytes: 2 << 40,
                model: "ST2000NM0045".into(),
                serial_number: "ZC20A1B2".into(),
                transport: "sas".into(),
                by_path: "/dev/disk/by-path/pci-0000:18:00.0-sas-phy0-lun-0".into(),
                ..Default::default()
            }],
            nics: vec![
                Nic {
                    name: "bond0".into(),
                    mac: "3c:fd:fe:a1:b2:c0".into(),
                    ip: "203.0.113.10".into(),
                    bond: Some(Bond {
                        mode: "802.3ad".into(),
                        members: vec!["eno1".into(), "eno2".into()],
                    }),
                    ..Default::default()
                },
                Nic {
                    name: "eno1".into(),
                    mac: "3c:fd:fe:a1:b2:c0".into(),
                    driver: "i40e".into(),
                    speed_mbps: 10000,
                    bond_master: "bond0".into(),
                    pxe: true,
                    lldp: Some(Lldp {
                        system_name: "tor-a".into(),
                        port_id: "Ethernet12".into(),
                        port_vlan_id: Some(100),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ],
            pci_devices: vec![
                PciDevice {
                    address: "0000:d8:00.0".into(),
                    class: "030200".into(),
                    vendor_id: "0x10de".into(),
                    vendor_name: "NVIDIA".into(),
                    device_id: "0x1eb8".into(),
                    gpu: true,
                    ..Default::default()
                },
                PciDevice {
                    address: "0000:3b:00.0".into(),
                    ..Default::default()
                },
            ],
            bmc: Some(Bmc {
                ipv4_address: "198.51.100.20".into(),
                mac: "3c:fd:fe:a1:b2:ff".into(),
                interface: "IPMI 2.0 KCS".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let doc = HardwareData::new(
            &slipway_reconcile::host::HostKey::default_ns("r740-07"),
            h,
            now() - SignedDuration::from_secs(120),
            "inspect",
        );
        expect![[r#"
            Hardware:     (full inventory from inspect, 2m ago; `slipway get hardwaredata r740-07`)
              System:      Dell Inc. PowerEdge R740xd (serial 7XK2M93), BIOS Dell Inc. 2.19.1 (06/12/2023), UEFI, Secure Boot on
              CPU:         2 x Intel(R) Xeon(R) Gold 6130 CPU @ 2.10GHz (x86_64, 8 threads, 4 cores, 2100 MHz, max 3700 MHz)
              Memory:      64.0 GiB installed, 62.0 GiB usable; 2 DIMMs: A1 32.0 GiB DDR4 2666 MT/s, B1 32.0 GiB DDR4 2666 MT/s
              NUMA:        0 (cpus 0-1,4-5, 31.0 GiB); 1 (cpus 2-3,6-7, 31.0 GiB)
              Disks:
                /dev/sda   2.0 TiB   HDD   sas   ST2000NM0045   ZC20A1B2   /dev/disk/by-path/pci-0000:18:00.0-sas-phy0-lun-0
              NICs:
                bond0   3c:fd:fe:a1:b2:c0   203.0.113.10          bond 802.3ad (eno1, eno2)
                eno1    3c:fd:fe:a1:b2:c0                  i40e   in bond0, 10 Gb/s, pxe, switch tor-a port Ethernet12 vlan 100
              PCI:         2 devices, 1 GPU: NVIDIA 0x1eb8 at 0000:d8:00.0
              BMC:         198.51.100.20, MAC 3c:fd:fe:a1:b2:ff (IPMI 2.0 KCS)
        "#]]
        .assert_eq(&hardware_summary(&doc, now()));
        let text = describe(&v, Some(&doc), now());
        assert!(text.contains("  BMC:         198.51.100.20"), "{text}");
        expect![[r#"
            NAME      CPUS   MEMORY     DISKS   NICS   GPUS   AGE
            r740-07   8      64.0 GiB   1       2      1      2m
        "#]]
        .assert_eq(&hardware_table(&[doc], now()));
    }

    #[test]
    fn units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(4 << 30), "4.0 GiB");
        assert_eq!(
            age(Some(now()), now() + SignedDuration::from_secs(7200)),
            "2h"
        );
    }
}
