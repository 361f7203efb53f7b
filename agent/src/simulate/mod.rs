//! The load generator: N simulated machines in one process, each going the real way through
//! the coordinator's interfaces.
//!
//! A machine "PXE-boots": `GET /boot/ipxe?mac=MAC` on the coordinator's HTTP server, whose
//! script carries its one-time token ([`boot`]). It enrols through the real `Enroll` call
//! (a fresh key and CSR, its boot MAC in the hello), then runs the real session code
//! ([`crate::session::run`]) with its own TLS connection, heartbeats and reconnections (the
//! session's backoff plus a random jitter), driving a simulated executor ([`executor`]) that
//! reports generated hardware ([`hardware`]) and writes images to a disk that only hashes.
//! [`stats`] counts what happened and times it; [`hosts`] writes the hosts directory the
//! coordinator needs for such a run.
//!
//! All machines share one tokio runtime (two workers by default) and one HTTP client; a
//! machine is a few tasks and a few KiB, plus its connection.

pub mod boot;
pub mod catalog;
pub mod executor;
pub mod hardware;
pub mod hosts;
pub mod stats;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::session::{self, End, Identity, Settings};
use crate::tls::Fingerprint;
use boot::BootScript;
use executor::SimMachine;
use stats::{AgentStats, RunInfo, Stats};

/// `slipway-agent simulate`.
#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// How many machines to simulate.
    #[arg(long)]
    pub count: u32,
    /// The coordinator's agent URL, https://HOST:PORT (as for `slipway-agent run`).
    #[arg(long, value_name = "URL")]
    pub coordinator: String,
    /// The coordinator's HTTP server, http://HOST:PORT: each machine asks
    /// /boot/ipxe?mac=MAC there for its boot script and the one-time token in it.
    #[arg(long, value_name = "URL")]
    pub http: String,
    /// SHA-256 fingerprint of the coordinator's CA (`slipway info`).
    #[arg(long, value_name = "sha256:HEX")]
    pub ca_fingerprint: String,
    /// Index of the first machine: machine i has boot MAC PREFIX + i (3 bytes) and the
    /// hardware generated for i; `simulate-hosts` names its host sim-NNNNN after i.
    #[arg(long, default_value_t = 0, value_name = "I")]
    pub first_index: u32,
    /// First three bytes of every boot MAC.
    #[arg(long, default_value = "52:54:00", value_parser = hardware::parse_prefix, value_name = "XX:XX:XX")]
    pub mac_prefix: [u8; 3],
    /// Machines started per second (0: all at once).
    #[arg(long, default_value_t = 100.0, value_name = "PER_SECOND")]
    pub ramp: f64,
    /// Interval of each session's heartbeats.
    #[arg(long, default_value_t = 10, value_name = "S")]
    pub heartbeat_seconds: u64,
    /// Up to this many milliseconds, at random, added to every reconnection's and boot
    /// retry's backoff, so machines that lost the coordinator together do not come back
    /// together.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    pub jitter_ms: u64,
    /// Write the counts, the time from each command result to the next command, and the
    /// time to each milestone as JSON to FILE when the run ends.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// When the run is over: every machine provisioned (it received its power command
    /// after a verified image write), every machine connected (a session opened), or never.
    #[arg(long, value_enum, default_value_t = Until::Provisioned)]
    pub until: Until,
    /// Give up after this long (90s, 10m, 1h), printing who did not get there and exiting
    /// non-zero; with --until forever, the length of the run (exit 0).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: Option<Duration>,
    /// Worker threads of the runtime all machines share.
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub workers: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Until {
    Provisioned,
    Connected,
    Forever,
}

impl Until {
    fn name(self) -> &'static str {
        match self {
            Until::Provisioned => "provisioned",
            Until::Connected => "connected",
            Until::Forever => "forever",
        }
    }
}

/// `slipway-agent simulate-hosts`.
#[derive(Debug, clap::Args)]
pub struct HostsArgs {
    /// How many hosts.
    #[arg(long)]
    pub count: u32,
    /// The hosts directory to write into (created if missing); existing files of the same
    /// names are replaced.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// The image every host is provisioned with (without it: no image, the hosts are
    /// inspected, cleaned, and stay available).
    #[arg(long, value_name = "URL", requires = "checksum")]
    pub image_url: Option<String>,
    /// The image's digest (hex), or the URL of its checksum file.
    #[arg(long, value_name = "HEX", requires = "image_url")]
    pub checksum: Option<String>,
    /// md5, sha256, sha512 or auto.
    #[arg(long, default_value = "sha256", value_parser = ["md5", "sha256", "sha512", "auto"])]
    pub checksum_type: String,
    /// Index of the first host (see `simulate --first-index`).
    #[arg(long, default_value_t = 0, value_name = "I")]
    pub first_index: u32,
    /// First three bytes of every boot MAC (as given to `simulate`).
    #[arg(long, default_value = "52:54:00", value_parser = hardware::parse_prefix, value_name = "XX:XX:XX")]
    pub mac_prefix: [u8; 3],
    /// metadata.namespace of the hosts and their Secrets (default: none).
    #[arg(long, value_name = "NS")]
    pub namespace: Option<String>,
    /// Hosts (each with its Secret) per file.
    #[arg(long, default_value_t = 100, value_name = "K")]
    pub hosts_per_file: u32,
}

/// Durations as `90s`, `500ms`, `10m`, `1h` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as 90s, 10m or 1h"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        u => return Err(format!("{s:?}: unknown unit {u:?} (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{s:?} is out of range"))
}

/// Checks the index range: every machine needs a MAC of its own.
fn check_range(first: u32, count: u32) -> anyhow::Result<()> {
    if u64::from(first) + u64::from(count) > hardware::MAX_MACHINES {
        bail!(
            "--first-index {first} + --count {count} is beyond the {} machines a MAC prefix can name; use another --mac-prefix",
            hardware::MAX_MACHINES
        );
    }
    Ok(())
}

/// `slipway-agent simulate-hosts`: writes the files, says how many.
pub fn write_hosts(args: HostsArgs) -> anyhow::Result<String> {
    check_range(args.first_index, args.count)?;
    let set = hosts::HostSet {
        first_index: args.first_index,
        count: args.count,
        prefix: args.mac_prefix,
        namespace: args.namespace,
        image: args.image_url.map(|url| hosts::Image {
            url,
            checksum: args.checksum.unwrap_or_default(),
            checksum_type: args.checksum_type,
        }),
        per_file: args.hosts_per_file,
    };
    let files = hosts::write_hosts(&args.out, &set)?;
    Ok(format!(
        "wrote {} host{} ({}..{}) in {files} file{} to {}\n",
        args.count,
        if args.count == 1 { "" } else { "s" },
        hosts::host_name(args.first_index),
        hosts::host_name(args.first_index + args.count.saturating_sub(1)),
        if files == 1 { "" } else { "s" },
        args.out.display()
    ))
}

/// What every simulated machine shares.
struct Shared {
    http_base: String,
    client: reqwest::Client,
    stats: Arc<Stats>,
    settings: Settings,
}

/// `slipway-agent simulate` on a runtime of its own. Returns whether every machine got
/// where `--until` asked (always true for `forever`).
pub fn main(args: SimulateArgs) -> anyhow::Result<bool> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.workers.max(1))
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(simulate(args));
    // The machines' tasks are dropped with the runtime; none blocks.
    runtime.shutdown_timeout(Duration::from_secs(2));
    result
}

async fn simulate(args: SimulateArgs) -> anyhow::Result<bool> {
    check_range(args.first_index, args.count)?;
    if args.count == 0 {
        bail!("--count must be at least 1");
    }
    match crate::sys::raise_open_files() {
        Ok((before, after)) => info!("open files: soft limit {before} -> {after}"),
        Err(e) => warn!("cannot raise the open files limit: {e}"),
    }
    let ca = Fingerprint::parse(&args.ca_fingerprint).map_err(|e| anyhow!(e))?;
    if !args.http.starts_with("http://") && !args.http.starts_with("https://") {
        bail!(
            "--http {:?} must be the coordinator's HTTP server, http://HOST:PORT",
            args.http
        );
    }
    let client = crate::image::client_with(&[], Duration::from_secs(60))
        .map_err(|e| anyhow!("cannot build the HTTP client: {e}"))?;
    let shared = Arc::new(Shared {
        http_base: args.http.trim_end_matches('/').to_string(),
        client,
        stats: Arc::new(Stats::new()),
        settings: Settings {
            address: session::address_of(&args.coordinator)?,
            token: None,
            ca,
            state_dir: PathBuf::new(),
            boot_mac: None,
            ramdisk: true,
            heartbeat: Duration::from_secs(args.heartbeat_seconds.max(1)),
            exit_on_refusal: false,
            reconnect_jitter: Duration::from_millis(args.jitter_ms),
            milestones: false,
        },
    });
    let agents: Vec<Arc<AgentStats>> = (0..args.count)
        .map(|k| {
            let i = args.first_index + k;
            Arc::new(AgentStats::new(i, hardware::mac_of(args.mac_prefix, i)))
        })
        .collect();
    info!(
        "simulating {} machines ({}..{}) against {} at {} per second, until {}",
        args.count,
        args.first_index,
        args.first_index + args.count - 1,
        shared.settings.address,
        if args.ramp > 0.0 {
            format!("{}", args.ramp)
        } else {
            "all at once".into()
        },
        args.until.name()
    );

    // Start the machines, `ramp` a second.
    let starter = {
        let agents = agents.clone();
        let shared = shared.clone();
        let ramp = args.ramp;
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            for (k, me) in agents.into_iter().enumerate() {
                if ramp > 0.0 {
                    let due = start + Duration::from_secs_f64(k as f64 / ramp);
                    tokio::time::sleep_until(due).await;
                }
                tokio::spawn(machine(shared.clone(), me));
            }
        })
    };

    let deadline = args.timeout.map(|t| Instant::now() + t);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last = (stats::process(None), Instant::now());
    let mut lines = 0u64;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot watch for SIGTERM")?;
    let how = loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => break "interrupted",
            _ = terminate.recv() => break "terminated",
        }
        let reached = match args.until {
            Until::Provisioned => agents.iter().all(|a| a.is_provisioned()),
            Until::Connected => agents.iter().all(|a| a.is_connected()),
            Until::Forever => false,
        };
        if reached {
            break "reached";
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break "timeout";
        }
        lines += 1;
        if lines.is_multiple_of(5) {
            let now = stats::process(Some((&last.0, last.1)));
            info!("{}", shared.stats.line(args.count, &now));
            last = (now, Instant::now());
        }
    };
    starter.abort();
    let process = stats::process(Some((&last.0, last.1)));
    info!("{}", shared.stats.line(args.count, &process));
    let reached = how == "reached";
    let mut report = shared.stats.report(
        RunInfo {
            agents: args.count,
            first_index: args.first_index,
            until: args.until.name().into(),
            reached,
            how_it_ended: how.into(),
        },
        process,
    );
    let unfinished: Vec<&Arc<AgentStats>> = agents
        .iter()
        .filter(|a| match args.until {
            Until::Provisioned => !a.is_provisioned(),
            Until::Connected => !a.is_connected(),
            Until::Forever => false,
        })
        .collect();
    report.unfinished = unfinished.iter().take(50).map(|a| a.describe()).collect();
    if let Some(path) = &args.report {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let r = &report.result_to_next_command.after_success;
    let goal = match args.until {
        Until::Forever => format!(
            "{} machines, {} connected, {} provisioned",
            args.count, report.counts.connected, report.counts.provisioned
        ),
        until => format!(
            "{} of {} machines {}",
            args.count as usize - unfinished.len(),
            args.count,
            until.name()
        ),
    };
    println!(
        "{how} after {:.1}s: {goal}; success to next command p50 {:.3}s p99 {:.3}s max {:.3}s ({} samples)",
        report.seconds, r.p50, r.p99, r.max, r.samples
    );
    for a in unfinished.iter().take(20) {
        println!("  not {}: {}", args.until.name(), a.describe());
    }
    if unfinished.len() > 20 {
        println!("  ... and {} more", unfinished.len() - 20);
    }
    Ok(reached || args.until == Until::Forever)
}

/// One simulated machine, from its first boot to its last power command.
async fn machine(shared: Arc<Shared>, me: Arc<AgentStats>) {
    let stats = shared.stats.clone();
    let settings = Settings {
        boot_mac: Some(me.mac.clone()),
        ..shared.settings.clone()
    };
    let (tx, mut updates) = mpsc::unbounded_channel();
    let (executor, mut power) = SimMachine::new(
        me.index,
        me.mac.clone(),
        shared.client.clone(),
        stats.clone(),
        me.clone(),
        tx,
    );
    loop {
        let id = enrol(&shared, &settings, &me).await;
        me.enrolled(&id.key(), &stats);
        match session::run(&settings, &id, &executor, &mut updates, &mut power).await {
            End::Power(_) => {
                stats.finished();
                me.note("went away after its power command");
                return;
            }
            End::Refused(reason) => {
                me.note(format!("the coordinator refused its certificate: {reason}"));
                // Like a machine that reboots into the ramdisk: a new token, a new key.
            }
        }
    }
}

/// Boots (asks for a token) and enrols until it works, with backoff and jitter.
async fn enrol(shared: &Shared, settings: &Settings, me: &AgentStats) -> Identity {
    let mut backoff = Duration::from_secs(1);
    loop {
        match boot::fetch(&shared.client, &shared.http_base, &me.mac).await {
            Ok(BootScript::Ramdisk { token }) => match session::enroll(settings, &token).await {
                Ok((id, _)) => return id,
                Err(e) => {
                    shared.stats.enrol_failure();
                    me.note(format!("enrolment failed: {e:#}"));
                }
            },
            Ok(BootScript::NoToken { reason }) => {
                shared.stats.refusal();
                me.note(format!("boot refused: {reason}"));
            }
            Err(e) => {
                shared.stats.enrol_failure();
                me.note(format!("no boot script: {e}"));
            }
        }
        tokio::time::sleep(backoff + session::jitter(settings.reconnect_jitter)).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn index_ranges_fit_the_mac_prefix() {
        assert!(check_range(0, 10_000).is_ok());
        assert!(check_range((1 << 24) - 10, 10).is_ok());
        let e = check_range((1 << 24) - 10, 11).unwrap_err().to_string();
        assert!(e.contains("--mac-prefix"), "{e}");
    }
}
