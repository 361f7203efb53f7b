//! Processors: `/proc/cpuinfo` for model and flags, `/sys/devices/system/cpu/cpuN/topology`
//! for cores and sockets, cpufreq for the maximum frequency.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::root::Root;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cpu {
    pub model: Option<String>,
    pub vendor: Option<String>,
    /// x86_64, aarch64, ... (from cpuinfo; the agent's own architecture when it says nothing).
    pub architecture: Option<String>,
    /// Logical CPUs (hardware threads) online.
    pub count: u32,
    /// Physical cores.
    pub cores: Option<u32>,
    pub sockets: Option<u32>,
    pub threads_per_core: Option<u32>,
    /// Current frequency of the first CPU, MHz.
    pub frequency_mhz: Option<u32>,
    /// Highest frequency cpufreq reports, MHz.
    pub max_frequency_mhz: Option<u32>,
    pub flags: Vec<String>,
}

/// What cpuinfo says about one logical CPU.
#[derive(Default)]
struct Proc {
    id: Option<u32>,
    physical_id: Option<u32>,
    core_id: Option<u32>,
}

pub fn collect(root: &Root) -> Cpu {
    let text = root.raw_text("proc/cpuinfo").unwrap_or_default();
    let mut cpu = Cpu::default();
    let mut procs: Vec<Proc> = Vec::new();
    let mut arm_arch: Option<u32> = None;
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        match k {
            "processor" => {
                cpu.count = cpu.count.saturating_add(1);
                procs.push(Proc {
                    id: v.parse().ok(),
                    ..Default::default()
                });
            }
            "physical id" => {
                if let Some(p) = procs.last_mut() {
                    p.physical_id = v.parse().ok();
                }
            }
            "core id" => {
                if let Some(p) = procs.last_mut() {
                    p.core_id = v.parse().ok();
                }
            }
            "model name" | "cpu model" | "cpu" if cpu.model.is_none() => {
                cpu.model = super::root::clean(v);
            }
            "vendor_id" | "CPU implementer" if cpu.vendor.is_none() => {
                cpu.vendor = super::root::clean(v);
            }
            "flags" | "Features" if cpu.flags.is_empty() => {
                cpu.flags = v.split_whitespace().map(str::to_string).collect();
            }
            "cpu MHz" if cpu.frequency_mhz.is_none() => {
                cpu.frequency_mhz = v
                    .parse::<f64>()
                    .ok()
                    .filter(|f| f.is_finite() && *f > 0.0 && *f < 1e6)
                    .map(|f| f.round() as u32);
            }
            "CPU architecture" => arm_arch = v.parse().ok(),
            _ => {}
        }
    }
    cpu.architecture = if cpu.flags.iter().any(|f| f == "lm") {
        Some("x86_64".into())
    } else if cpu
        .vendor
        .as_deref()
        .is_some_and(|v| v.contains("Intel") || v.contains("AMD"))
    {
        Some("i686".into())
    } else if let Some(a) = arm_arch {
        Some(if a >= 8 { "aarch64" } else { "arm" }.into())
    } else if root.is_live() {
        Some(std::env::consts::ARCH.into())
    } else {
        None
    };

    // Topology: sysfs first, cpuinfo's physical/core ids otherwise.
    let mut sockets = BTreeSet::new();
    let mut cores = BTreeSet::new();
    for p in &procs {
        let Some(id) = p.id else { continue };
        let dir = format!("sys/devices/system/cpu/cpu{id}/topology");
        let package = root
            .u64(format!("{dir}/physical_package_id"))
            .or(p.physical_id.map(u64::from));
        let die = root.u64(format!("{dir}/die_id")).unwrap_or(0);
        let core = root
            .u64(format!("{dir}/core_id"))
            .or(p.core_id.map(u64::from));
        if let Some(pkg) = package {
            sockets.insert(pkg);
            if let Some(core) = core {
                cores.insert((pkg, die, core));
            }
        }
        if cpu.max_frequency_mhz.is_none() {
            cpu.max_frequency_mhz = root
                .u64(format!(
                    "sys/devices/system/cpu/cpu{id}/cpufreq/cpuinfo_max_freq"
                ))
                .and_then(|khz| u32::try_from(khz / 1000).ok())
                .filter(|m| *m > 0);
        }
    }
    let count_of = |s: usize| u32::try_from(s).ok().filter(|n| *n > 0);
    cpu.sockets = count_of(sockets.len());
    cpu.cores = count_of(cores.len()).filter(|_| cores.len() <= procs.len());
    cpu.threads_per_core = cpu
        .cores
        .filter(|c| cpu.count % c == 0)
        .map(|c| cpu.count / c);
    cpu
}

/// Parses a kernel CPU list (`0-3,8,10-11`). Gives up (empty) on anything malformed or absurd.
pub fn parse_list(s: &str) -> Vec<u32> {
    const LIMIT: usize = 1 << 16;
    let mut out = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim().parse::<u32>(), b.trim().parse::<u32>()),
            None => (part.trim().parse(), part.trim().parse()),
        };
        let (Ok(a), Ok(b)) = (a, b) else {
            return Vec::new();
        };
        if b < a || (b - a) as usize > LIMIT || out.len() > LIMIT {
            return Vec::new();
        }
        out.extend(a..=b);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_list("0-3,8,10-11\n"), [0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(parse_list(""), Vec::<u32>::new());
        assert_eq!(parse_list("0-4294967295"), Vec::<u32>::new());
        assert_eq!(parse_list("3-1"), Vec::<u32>::new());
        assert_eq!(parse_list("a"), Vec::<u32>::new());
    }
}
