//! The `slipway` command line.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use jiff::{SignedDuration, Timestamp};
use serde::Serialize;
use slipway_reconcile::host::BareMetalHost;

use crate::admin::{self, HostList, Info, TokenRequest, TokenResponse};
use crate::hardware::HardwareData;
use crate::output;
use crate::serve::{self, ServeArgs, parse_duration};
use crate::view::HostView;

/// Slipway provisions bare-metal machines: declare hosts as metal3 BareMetalHost documents,
/// and Slipway inspects, cleans, images and boots them through its agent.
#[derive(Debug, Parser)]
#[command(name = "slipway", version, propagate_version = true)]
pub struct Cli {
    /// The coordinator's state directory (CA, store, admin socket).
    #[arg(
        long,
        global = true,
        env = "SLIPWAY_STATE",
        default_value = "/var/lib/slipway",
        value_name = "DIR"
    )]
    pub state: PathBuf,
    /// The namespace of the hosts named (files mode: `metadata.namespace`, or `default`).
    /// Without it, a name is looked up in every namespace; NAMESPACE/NAME works too.
    #[arg(short = 'n', long, global = true, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the coordinator: files mode (--hosts DIR: hosts from a directory, state in an
    /// embedded store) or Kubernetes mode (--kube: BareMetalHosts, status and state in the
    /// cluster).
    Serve(ServeArgs),
    /// List hosts (like `kubectl get bmh`).
    Get {
        #[command(subcommand)]
        what: GetWhat,
    },
    /// Show one host in detail: spec, status, hardware, error and what to do, history, events.
    Describe {
        #[command(subcommand)]
        what: DescribeWhat,
    },
    /// Remove a discovered host, or drop at once a deleted host still waiting to be cleaned
    /// (declared hosts go when their document is removed).
    Delete {
        #[command(subcommand)]
        what: DeleteWhat,
    },
    /// Bootstrap tokens for agents.
    Token {
        #[command(subcommand)]
        what: TokenCmd,
    },
    /// Network boot helpers.
    Boot {
        #[command(subcommand)]
        what: BootCmd,
    },
    /// Print the Kubernetes CustomResourceDefinitions (baremetalhosts.metal3.io,
    /// hardwaredata.metal3.io) as YAML, generated from Slipway's types: `slipway crd | kubectl
    /// apply -f -`. The same files are in deploy/crds/.
    Crd,
    /// Move the hosts of a stopped files-mode coordinator (--state, and its --hosts
    /// directory) into the Kubernetes cluster of KUBECONFIG (or the in-cluster service
    /// account): BareMetalHosts with their status in metal3's `baremetalhost.metal3.io/status`
    /// annotation, HardwareData, the Secrets they reference and the CA. A coordinator in
    /// Kubernetes mode adopts them as they are: provisioned hosts are neither inspected nor
    /// imaged again. Objects that exist already are left alone and reported.
    ///
    /// With --to-files, the other way: the BareMetalHosts of the cluster (of -n NAMESPACE, or
    /// all; not discovered ones) go to a files-mode coordinator that is not running (--state,
    /// documents and Secrets written to --hosts). The coordinator in the cluster must be
    /// running: each host is detached first and moved once it has let go (an operation in
    /// flight finishes first), then deleted from the cluster without deprovisioning.
    Move {
        /// The files-mode coordinator's hosts directory (Secrets are read from it; with
        /// --to-files, documents and Secrets are written to it).
        #[arg(long, value_name = "DIR")]
        hosts: PathBuf,
        /// Where the coordinator in the cluster keeps its own objects (the CA's Secret).
        #[arg(
            long = "to-namespace",
            alias = "coordinator-namespace",
            value_name = "NAMESPACE",
            default_value = "slipway-system"
        )]
        to_namespace: String,
        /// Move from the cluster to files mode.
        #[arg(long)]
        to_files: bool,
        /// With --to-files: how long to wait for the cluster's coordinator to detach a host
        /// (and then to let it go).
        #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
        timeout: SignedDuration,
    },
    /// Show how agents reach this coordinator: URLs and the CA fingerprint.
    Info {
        #[arg(short, long, value_enum, default_value_t = Format::Text)]
        output: Format,
    },
}

#[derive(Debug, Subcommand)]
pub enum GetWhat {
    /// The host table: NAME, STATE, ONLINE, ERROR, PROGRESS, AGE.
    #[command(alias = "host", alias = "bmh", alias = "baremetalhosts")]
    Hosts {
        /// Only these hosts.
        names: Vec<String>,
        #[arg(short, long, value_enum, default_value_t = TableFormat::Table)]
        output: TableFormat,
    },
    /// Full hardware inventories (metal3 HardwareData documents): a table of every host's, or
    /// the documents with -o yaml|json.
    #[command(alias = "hardwaredatas", alias = "hd")]
    Hardwaredata {
        /// Only these hosts.
        names: Vec<String>,
        #[arg(short, long, value_enum, default_value_t = TableFormat::Table)]
        output: TableFormat,
    },
}

#[derive(Debug, Subcommand)]
pub enum DescribeWhat {
    #[command(alias = "hosts", alias = "bmh")]
    Host { name: String },
}

#[derive(Debug, Subcommand)]
pub enum DeleteWhat {
    /// A discovered host (`discovered-MAC`): its record, inventory, tokens and certificate.
    /// Or a host whose document was removed and that waits for its agent to clean its disks
    /// (deprovisioning before delete): dropped now, its disks left as they are.
    #[command(alias = "hosts", alias = "bmh")]
    Host { name: String },
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Create a one-time bootstrap token for HOST and print it with the agent command line.
    Create {
        host: String,
        /// How long the token stays valid.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: SignedDuration,
        #[arg(short, long, value_enum, default_value_t = Format::Text)]
        output: Format,
    },
}

#[derive(Debug, Subcommand)]
pub enum BootCmd {
    /// Make a virtual-media ISO of the ramdisk for one boot of HOST and print its URL (a
    /// capability: unguessable, valid as long as the token inside, at most one per host).
    /// Attach it to the machine's BMC as virtual media, or download it. Refused while the
    /// host's agent is connected.
    Iso {
        host: String,
        #[arg(short, long, value_enum, default_value_t = Format::Text)]
        output: Format,
    },
    /// Print a dnsmasq configuration that PXE-boots machines into this coordinator's ramdisk:
    /// `--mode proxy` next to the site's DHCP server (ProxyDHCP), `--mode full` as the DHCP
    /// server. URLs come from the running coordinator (or --http-url).
    DnsmasqConfig {
        #[arg(long, value_enum, default_value_t = crate::boot::DhcpMode::Proxy)]
        mode: crate::boot::DhcpMode,
        /// Proxy mode: the subnet address (e.g. 192.168.1.0); full mode: START,END[,NETMASK].
        #[arg(long)]
        range: String,
        /// Interface dnsmasq serves.
        #[arg(long)]
        interface: Option<String>,
        /// TFTP root holding undionly.kpxe and ipxe.efi (Debian package ipxe).
        #[arg(long, default_value = "/usr/lib/ipxe")]
        tftp_root: String,
        /// The coordinator's HTTP URL, instead of asking the running coordinator.
        #[arg(long)]
        http_url: Option<String>,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum TableFormat {
    Table,
    Wide,
    Json,
    Yaml,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Format {
    Text,
    Json,
    Yaml,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(matches!(cli.command, Command::Serve(_)));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(ToString::to_string).collect();
            eprintln!("error: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(serving: bool) {
    let default = if serving { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// The admin API path of host `name` (`NAME` or `NAMESPACE/NAME`), with `rest` appended.
fn host_path(name: &str, namespace: Option<&str>, rest: &str) -> String {
    let enc = |s: &str| {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    let mut path = format!("/v1/hosts/{}{rest}", enc(name));
    if let Some(ns) = namespace {
        path.push_str(&format!("?namespace={}", enc(ns)));
    }
    path
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let socket = cli.state.join("admin.sock");
    let ns = cli.namespace.as_deref();
    match cli.command {
        Command::Serve(args) => serve::serve(args, cli.state).await,
        Command::Crd => print(&crate::crd::all_yaml()?),
        Command::Move {
            hosts,
            to_namespace,
            to_files,
            timeout,
        } => {
            let client = kube::Client::try_default().await.context(
                "cannot reach the Kubernetes API server: set KUBECONFIG (or run in the cluster)",
            )?;
            let mut out = String::new();
            if to_files {
                let moved = crate::transfer::to_files(
                    client,
                    &cli.state,
                    &hosts,
                    ns,
                    &to_namespace,
                    timeout.unsigned_abs(),
                )
                .await?;
                out.push_str(&moved_lines(&moved.hosts, &moved.skipped));
                for (key, why) in &moved.left {
                    out.push_str(&format!("left    {key}: {why}\n"));
                }
                out.push_str(&format!(
                    "{} host(s) moved to {}, {} skipped, {} Secret(s) written; {}\n",
                    moved.hosts.len(),
                    hosts.display(),
                    moved.skipped.len(),
                    moved.secrets,
                    moved.ca
                ));
                return print(&out);
            }
            let moved = crate::transfer::to_kube(client, &cli.state, &hosts, &to_namespace).await?;
            out.push_str(&moved_lines(&moved.hosts, &moved.skipped));
            out.push_str(&format!(
                "{} host(s) moved, {} skipped, {} Secret(s) created; {}\n",
                moved.hosts.len(),
                moved.skipped.len(),
                moved.secrets,
                moved.ca
            ));
            print(&out)
        }
        Command::Get {
            what: GetWhat::Hosts { names, output },
        } => {
            let list: HostList = admin::call(&socket, http::Method::GET, "/v1/hosts", None).await?;
            let all: std::collections::BTreeMap<_, &HostView> =
                list.hosts.iter().map(|h| (h.key(), h)).collect();
            let hosts: Vec<&HostView> = if names.is_empty() {
                all.values()
                    .filter(|h| ns.is_none_or(|ns| h.key().namespace == ns))
                    .copied()
                    .collect()
            } else {
                let mut out = Vec::new();
                for n in &names {
                    let (_, h) = crate::view::find(&all, ns, n).map_err(|e| anyhow::anyhow!(e))?;
                    out.push(*h);
                }
                out
            };
            let now = Timestamp::now();
            let text = match output {
                TableFormat::Table => output::table(&hosts, false, now),
                TableFormat::Wide => output::table(&hosts, true, now),
                TableFormat::Json | TableFormat::Yaml => {
                    let items: Vec<BareMetalHost> =
                        hosts.iter().map(|h| with_kind(&h.host)).collect();
                    let list = KubeList {
                        api_version: "v1",
                        kind: "List",
                        items,
                    };
                    encode(&list, matches!(output, TableFormat::Yaml))?
                }
            };
            print(&text)?;
            if names.is_empty() && !list.problems.is_empty() {
                eprint!("{}", output::problems(&list.problems));
            }
            Ok(())
        }
        Command::Get {
            what: GetWhat::Hardwaredata { names, output },
        } => {
            let docs: Vec<HardwareData> = if names.is_empty() {
                admin::call(&socket, http::Method::GET, "/v1/hardwaredata", None).await?
            } else {
                let mut docs = Vec::new();
                for n in &names {
                    let doc: Option<HardwareData> = admin::call(
                        &socket,
                        http::Method::GET,
                        &host_path(n, ns, "/hardwaredata"),
                        None,
                    )
                    .await?;
                    docs.push(doc.ok_or_else(|| {
                        anyhow::anyhow!(
                            "host {n} has no hardware data yet: its agent has not reported an \
                             inventory (see `slipway describe host {n}`)"
                        )
                    })?);
                }
                docs
            };
            let yaml = matches!(output, TableFormat::Yaml);
            let text = match output {
                TableFormat::Table | TableFormat::Wide => {
                    output::hardware_table(&docs, Timestamp::now())
                }
                _ if names.len() == 1 => encode(&docs[0], yaml)?,
                _ => encode(
                    &serde_json::json!({"apiVersion": "v1", "kind": "List", "items": docs}),
                    yaml,
                )?,
            };
            print(&text)
        }
        Command::Describe {
            what: DescribeWhat::Host { name },
        } => {
            let host: HostView =
                admin::call(&socket, http::Method::GET, &host_path(&name, ns, ""), None).await?;
            let hardware: Option<HardwareData> = admin::call(
                &socket,
                http::Method::GET,
                &host_path(&name, ns, "/hardwaredata"),
                None,
            )
            .await?;
            print(&output::describe(
                &host,
                hardware.as_ref(),
                Timestamp::now(),
            ))
        }
        Command::Token {
            what: TokenCmd::Create { host, ttl, output },
        } => {
            let body = serde_json::to_value(TokenRequest {
                ttl_seconds: ttl.as_secs(),
            })?;
            let t: TokenResponse = admin::call(
                &socket,
                http::Method::POST,
                &host_path(&host, ns, "/tokens"),
                Some(body),
            )
            .await?;
            match output {
                Format::Text => print(&format!(
                    "token for host {} (single use, expires {}):\n  {}\nrun the agent with:\n  {}\n",
                    t.host, t.expires_at, t.token, t.agent_command
                )),
                Format::Json => print(&encode(&t, false)?),
                Format::Yaml => print(&encode(&t, true)?),
            }
        }
        Command::Delete {
            what: DeleteWhat::Host { name },
        } => {
            let d: admin::Deleted = admin::call(
                &socket,
                http::Method::DELETE,
                &host_path(&name, ns, ""),
                None,
            )
            .await?;
            print(&format!("{}\n", d.message))
        }
        Command::Boot {
            what: BootCmd::Iso { host, output },
        } => {
            let iso: admin::IsoResponse = admin::call(
                &socket,
                http::Method::POST,
                &host_path(&host, ns, "/iso"),
                None,
            )
            .await?;
            match output {
                Format::Text => print(&format!(
                    "virtual-media ISO for host {} (one boot; valid until {}):\n  {}\n",
                    iso.host, iso.expires_at, iso.url
                )),
                Format::Json => print(&encode(&iso, false)?),
                Format::Yaml => print(&encode(&iso, true)?),
            }
        }
        Command::Boot {
            what:
                BootCmd::DnsmasqConfig {
                    mode,
                    range,
                    interface,
                    tftp_root,
                    http_url,
                },
        } => {
            let http = match http_url {
                Some(u) => u,
                None => {
                    let info: Info =
                        admin::call(&socket, http::Method::GET, "/v1/info", None).await?;
                    info.http_url
                }
            };
            let urls = crate::boot::Urls {
                http: http.trim_end_matches('/').to_string(),
                agent: String::new(),
                ca_fingerprint: String::new(),
            };
            let opts = crate::boot::DnsmasqOptions {
                mode,
                interface,
                range,
                tftp_root,
            };
            print(&crate::boot::dnsmasq_config(&opts, &urls))
        }
        Command::Info { output } => {
            let info: Info = admin::call(&socket, http::Method::GET, "/v1/info", None).await?;
            match output {
                Format::Text => print(&format!(
                    "agents dial:     {}\nhttp server:     {}\nCA fingerprint:  {}\nhosts directory: {}\nstate directory: {}\nversion:         {}\n",
                    info.agent_url,
                    info.http_url,
                    info.ca_fingerprint,
                    info.hosts_dir.display(),
                    info.state_dir.display(),
                    info.version
                )),
                Format::Json => print(&encode(&info, false)?),
                Format::Yaml => print(&encode(&info, true)?),
            }
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct KubeList {
    api_version: &'static str,
    kind: &'static str,
    items: Vec<BareMetalHost>,
}

fn with_kind(h: &BareMetalHost) -> BareMetalHost {
    let mut h = h.clone();
    if h.api_version.is_empty() {
        h.api_version = slipway_reconcile::host::API_VERSION.into();
    }
    if h.kind.is_empty() {
        h.kind = slipway_reconcile::host::KIND.into();
    }
    h
}

fn encode<T: Serialize>(value: &T, yaml: bool) -> anyhow::Result<String> {
    Ok(if yaml {
        serde_yaml_ng::to_string(value)?
    } else {
        let mut s = serde_json::to_string_pretty(value)?;
        s.push('\n');
        s
    })
}

/// Prints to stdout; a closed pipe (`| head`) is not an error.
/// A move's report, a line per host: moved (with its state) or skipped (with why).
fn moved_lines(
    moved: &[(slipway_reconcile::host::HostKey, String)],
    skipped: &[(slipway_reconcile::host::HostKey, String)],
) -> String {
    let mut out = String::new();
    for (key, state) in moved {
        out.push_str(&format!("moved   {key} ({state})\n"));
    }
    for (key, why) in skipped {
        out.push_str(&format!("skipped {key}: {why}\n"));
    }
    out
}

fn print(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("cannot write to stdout"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s").unwrap().as_secs(), 90);
        assert_eq!(parse_duration("1h30m").unwrap().as_secs(), 5400);
        assert!(parse_duration("0s").is_err());
        assert!(
            parse_duration("soon")
                .unwrap_err()
                .contains("not a duration")
        );
    }
}
