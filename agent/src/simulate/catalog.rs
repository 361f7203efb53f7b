//! The parts simulated machines are made of: server models, CPUs (with their flags), disks,
//! NICs and memory makers, as they appear in real inventories. Data only.

pub struct Model {
    pub manufacturer: &'static str,
    pub product: &'static str,
    pub family: &'static str,
    pub bios_vendor: &'static str,
    pub bios_version: &'static str,
    pub bios_date: &'static str,
}

pub const SYSTEMS: &[Model] = &[
    Model {
        manufacturer: "Dell Inc.",
        product: "PowerEdge R650",
        family: "PowerEdge",
        bios_vendor: "Dell Inc.",
        bios_version: "1.10.2",
        bios_date: "04/24/2023",
    },
    Model {
        manufacturer: "Dell Inc.",
        product: "PowerEdge R750",
        family: "PowerEdge",
        bios_vendor: "Dell Inc.",
        bios_version: "1.9.2",
        bios_date: "12/12/2022",
    },
    Model {
        manufacturer: "HPE",
        product: "ProLiant DL360 Gen10 Plus",
        family: "ProLiant",
        bios_vendor: "HPE",
        bios_version: "U46",
        bios_date: "07/20/2023",
    },
    Model {
        manufacturer: "HPE",
        product: "ProLiant DL385 Gen10 Plus v2",
        family: "ProLiant",
        bios_vendor: "HPE",
        bios_version: "A55",
        bios_date: "01/18/2024",
    },
    Model {
        manufacturer: "Lenovo",
        product: "ThinkSystem SR650 V2",
        family: "ThinkSystem",
        bios_vendor: "Lenovo",
        bios_version: "AFE124E-3.10",
        bios_date: "03/02/2023",
    },
    Model {
        manufacturer: "Supermicro",
        product: "SYS-120U-TNR",
        family: "Family",
        bios_vendor: "American Megatrends International, LLC.",
        bios_version: "1.4a",
        bios_date: "09/15/2022",
    },
];

pub struct CpuModel {
    pub vendor: &'static str,
    pub name: &'static str,
    pub cores: u32,
    pub mhz: u32,
    pub max_mhz: u32,
    /// DDR generation and speed of the memory it takes.
    pub ddr: (&'static str, u32),
    pub max_sockets: u32,
}

pub const CPUS: &[CpuModel] = &[
    CpuModel {
        vendor: "GenuineIntel",
        name: "Intel(R) Xeon(R) E-2334 CPU @ 3.40GHz",
        cores: 4,
        mhz: 3400,
        max_mhz: 4800,
        ddr: ("DDR4", 3200),
        max_sockets: 1,
    },
    CpuModel {
        vendor: "GenuineIntel",
        name: "Intel(R) Xeon(R) E-2388G CPU @ 3.20GHz",
        cores: 8,
        mhz: 3200,
        max_mhz: 5100,
        ddr: ("DDR4", 3200),
        max_sockets: 1,
    },
    CpuModel {
        vendor: "GenuineIntel",
        name: "Intel(R) Xeon(R) Silver 4314 CPU @ 2.40GHz",
        cores: 16,
        mhz: 2400,
        max_mhz: 3400,
        ddr: ("DDR4", 2666),
        max_sockets: 2,
    },
    CpuModel {
        vendor: "GenuineIntel",
        name: "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz",
        cores: 32,
        mhz: 2000,
        max_mhz: 3200,
        ddr: ("DDR4", 3200),
        max_sockets: 2,
    },
    CpuModel {
        vendor: "AuthenticAMD",
        name: "AMD EPYC 7313P 16-Core Processor",
        cores: 16,
        mhz: 3000,
        max_mhz: 3700,
        ddr: ("DDR4", 3200),
        max_sockets: 1,
    },
    CpuModel {
        vendor: "AuthenticAMD",
        name: "AMD EPYC 7543 32-Core Processor",
        cores: 32,
        mhz: 2800,
        max_mhz: 3700,
        ddr: ("DDR4", 3200),
        max_sockets: 2,
    },
    CpuModel {
        vendor: "AuthenticAMD",
        name: "AMD EPYC 9354 32-Core Processor",
        cores: 32,
        mhz: 3250,
        max_mhz: 3800,
        ddr: ("DDR5", 4800),
        max_sockets: 2,
    },
];

/// Flags every x86-64 server CPU of the last decade has.
pub const FLAGS_COMMON: &str = concat!(
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx ",
    "fxsr sse sse2 ht syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology ",
    "nonstop_tsc cpuid aperfmperf pni pclmulqdq monitor ssse3 fma cx16 sse4_1 sse4_2 ",
    "x2apic movbe popcnt aes xsave avx f16c rdrand lahf_lm abm ssbd ibrs ",
    "ibpb stibp fsgsbase bmi1 avx2 smep bmi2 invpcid rdseed adx smap clflushopt clwb ",
    "sha_ni xsaveopt xsavec xgetbv1 xsaves umip vaes vpclmulqdq rdpid ",
);
pub const FLAGS_INTEL: &str = concat!(
    "dtes64 est tm2 xtpr pdcm pcid dca tsc_deadline_timer arat pln pts hwp ept vpid ",
    "ept_ad vmx smx erms rtm avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni pku ",
    "ospke md_clear flush_l1d arch_capabilities ",
);
pub const FLAGS_AMD: &str = concat!(
    "cpb hw_pstate mmxext fxsr_opt 3dnowprefetch osvw ibs skinit wdt tce topoext perfctr_core ",
    "perfctr_nb bpext perfctr_llc mwaitx svm extapic cr8_legacy misalignsse sse4a clzero ",
    "irperf xsaveerptr wbnoinvd npt lbrv svm_lock nrip_save tsc_scale vmcb_clean ",
    "decodeassists avic v_vmsave_vmload vgif succor smca sev sev_es ",
);

#[derive(Clone, Copy)]
pub enum DiskKind {
    Hdd,
    Ssd,
    Nvme,
}

pub struct DiskModel {
    pub kind: DiskKind,
    pub vendor: Option<&'static str>,
    pub model: &'static str,
    pub size: u64,
    /// The first bytes of its WWN (`0x` + 16 hex digits for SCSI/ATA).
    pub wwn_oui: &'static str,
}

pub const DISKS: &[DiskModel] = &[
    DiskModel {
        kind: DiskKind::Hdd,
        vendor: Some("SEAGATE"),
        model: "ST1200MM0009",
        size: 1_200_243_695_616,
        wwn_oui: "5000c500",
    },
    DiskModel {
        kind: DiskKind::Hdd,
        vendor: Some("ATA"),
        model: "ST4000NM0035-1V4",
        size: 4_000_787_030_016,
        wwn_oui: "5000c500",
    },
    DiskModel {
        kind: DiskKind::Hdd,
        vendor: Some("ATA"),
        model: "HGST HUH721212AL",
        size: 12_000_138_625_024,
        wwn_oui: "5000cca2",
    },
    DiskModel {
        kind: DiskKind::Ssd,
        vendor: Some("ATA"),
        model: "INTEL SSDSC2KB480G8",
        size: 480_103_981_056,
        wwn_oui: "55cd2e41",
    },
    DiskModel {
        kind: DiskKind::Ssd,
        vendor: Some("ATA"),
        model: "SAMSUNG MZ7LH960HAJR-00005",
        size: 960_197_124_096,
        wwn_oui: "5002538e",
    },
    DiskModel {
        kind: DiskKind::Ssd,
        vendor: Some("ATA"),
        model: "Micron_5300_MTFDDAK1T9TDS",
        size: 1_920_383_410_176,
        wwn_oui: "500a0751",
    },
    DiskModel {
        kind: DiskKind::Nvme,
        vendor: None,
        model: "SAMSUNG MZQL23T8HCLS-00A07",
        size: 3_840_755_982_336,
        wwn_oui: "",
    },
    DiskModel {
        kind: DiskKind::Nvme,
        vendor: None,
        model: "INTEL SSDPE2KX020T8",
        size: 2_000_398_934_016,
        wwn_oui: "",
    },
    DiskModel {
        kind: DiskKind::Nvme,
        vendor: None,
        model: "Micron_7450_MTFDKCC1T6TFS",
        size: 1_600_321_314_816,
        wwn_oui: "",
    },
];

pub struct NicModel {
    pub driver: &'static str,
    pub vendor_id: &'static str,
    pub device_id: &'static str,
    pub speed_mbps: u32,
    pub ports: usize,
}

pub const NICS: &[NicModel] = &[
    NicModel {
        driver: "tg3",
        vendor_id: "0x14e4",
        device_id: "0x165f",
        speed_mbps: 1000,
        ports: 2,
    },
    NicModel {
        driver: "ixgbe",
        vendor_id: "0x8086",
        device_id: "0x1563",
        speed_mbps: 10000,
        ports: 2,
    },
    NicModel {
        driver: "i40e",
        vendor_id: "0x8086",
        device_id: "0x158b",
        speed_mbps: 25000,
        ports: 2,
    },
    NicModel {
        driver: "ice",
        vendor_id: "0x8086",
        device_id: "0x159b",
        speed_mbps: 25000,
        ports: 2,
    },
    NicModel {
        driver: "mlx5_core",
        vendor_id: "0x15b3",
        device_id: "0x1017",
        speed_mbps: 25000,
        ports: 2,
    },
    NicModel {
        driver: "bnxt_en",
        vendor_id: "0x14e4",
        device_id: "0x16d7",
        speed_mbps: 25000,
        ports: 2,
    },
];

pub const DIMM_MAKERS: &[(&str, &str)] = &[
    ("Samsung", "M393A4K40DB3-CWE"),
    ("SK Hynix", "HMA84GR7CJR4N-XN"),
    ("Micron Technology", "36ASF4G72PZ-3G2R1"),
];
