//! Harness for Slipway's cross-component tests: real `slipway` and `slipway-agent` processes
//! talking mutual TLS on 127.0.0.1, hosts directories in temporary folders, disks as plain files
//! or loop devices.
//!
//! Every process a test starts is killed when its handle drops; every loop device is
//! detached. Logs of both processes are files in the test's directory and are printed when a
//! wait times out.

#![allow(clippy::disallowed_methods)] // this harness is the one place that spawns processes

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

pub mod kube;
pub mod vm;

/// Paths of the binaries under test, built once per test run.
pub struct Bins {
    pub slipway: PathBuf,
    pub agent: PathBuf,
}

/// Builds `slipway` and `slipway-agent` (same profile as the tests) and returns their paths.
pub fn bins() -> &'static Bins {
    static BINS: OnceLock<Bins> = OnceLock::new();
    BINS.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root")
            .to_path_buf();
        let mut build = Command::new(cargo);
        // Cargo sets CARGO_MANIFEST_DIR and friends for the test process; build scripts (ring's)
        // fingerprint them, so passing them on would rebuild half the tree on every run.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            let keep = ["CARGO_HOME", "CARGO_TARGET_DIR"].contains(&key.as_ref())
                || [
                    "CARGO_BUILD_",
                    "CARGO_TERM_",
                    "CARGO_NET_",
                    "CARGO_REGISTRIES_",
                    "CARGO_HTTP_",
                ]
                .iter()
                .any(|p| key.starts_with(p));
            if (key.starts_with("CARGO_") && !keep) || key == "OUT_DIR" {
                build.env_remove(key.as_ref());
            }
        }
        let status = build
            .current_dir(&workspace)
            .args([
                "build",
                "--quiet",
                "-p",
                "slipway-coordinator",
                "-p",
                "slipway-agent",
                "--bins",
            ])
            .status()
            .expect("run cargo build");
        assert!(
            status.success(),
            "building slipway and slipway-agent failed"
        );
        // A test executable lives in target/<profile>/deps/, xtask (the benchmarks) in
        // target/<profile>/; the binaries are in target/<profile>/.
        let exe = std::env::current_exe().expect("current exe");
        let mut dir = exe.parent().expect("target dir").to_path_buf();
        if dir.file_name().is_some_and(|n| n == "deps") {
            dir.pop();
        }
        let bins = Bins {
            slipway: dir.join("slipway"),
            agent: dir.join("slipway-agent"),
        };
        assert!(bins.slipway.exists(), "{} missing", bins.slipway.display());
        assert!(bins.agent.exists(), "{} missing", bins.agent.display());
        bins
    })
}

/// Runs `slipway ARGS` (no coordinator needed, e.g. a `serve` expected to refuse to start).
pub fn slipway(args: &[&std::ffi::OsStr]) -> Output {
    slipway_with_env(args, &[])
}

/// [`slipway`] with extra environment (`KUBECONFIG` for `slipway move`).
pub fn slipway_with_env(args: &[&std::ffi::OsStr], env: &[(&str, &std::ffi::OsStr)]) -> Output {
    Command::new(&bins().slipway)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run slipway")
}

/// A port free right now on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Random-looking bytes (deterministic per seed), so a misplaced block cannot pass as zeros.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// A running coordinator with its own directories and ports.
pub struct Coordinator {
    child: Option<Child>,
    pub dir: PathBuf,
    pub hosts: PathBuf,
    pub state: PathBuf,
    pub images: PathBuf,
    pub grpc_port: u16,
    pub http_port: u16,
    pub extra_args: Vec<String>,
    pub log: PathBuf,
    /// The address the coordinator listens on (127.0.0.1, or a bridge address in a netns).
    pub listen_ip: String,
    /// Run inside this network namespace.
    pub netns: Option<String>,
    /// Extra environment of the next start (cleared by [`Coordinator::restart_clean`]).
    pub env: Vec<(String, String)>,
    /// The open-files limit (soft and hard) the coordinator starts with, instead of this
    /// process's: a machine with a low hard limit.
    pub open_files: Option<u64>,
    /// Logs of the agents started against this coordinator, printed with its own on timeouts.
    agent_logs: std::sync::Mutex<Vec<PathBuf>>,
}

impl Coordinator {
    /// Starts a coordinator in `dir` (hosts in `dir/hosts`, state in `dir/state`).
    pub fn start(dir: &Path, extra_args: &[&str]) -> Coordinator {
        Coordinator::start_in(dir, extra_args, None, "127.0.0.1")
    }

    /// Starts a coordinator with extra environment variables (e.g. `SLIPWAY_FAILPOINT`).
    pub fn start_with_env(dir: &Path, extra_args: &[&str], env: &[(&str, &str)]) -> Coordinator {
        Coordinator::start_full(dir, extra_args, None, "127.0.0.1", env, None)
    }

    /// Starts a coordinator whose open-files limit, soft and hard, is `open_files` (so
    /// raising it to the hard limit gains nothing, as on a machine configured so).
    pub fn start_with_open_files(dir: &Path, extra_args: &[&str], open_files: u64) -> Coordinator {
        Coordinator::start_full(dir, extra_args, None, "127.0.0.1", &[], Some(open_files))
    }

    /// Starts a coordinator listening on `listen_ip`, inside `netns` if given.
    pub fn start_in(
        dir: &Path,
        extra_args: &[&str],
        netns: Option<&str>,
        listen_ip: &str,
    ) -> Coordinator {
        Coordinator::start_full(dir, extra_args, netns, listen_ip, &[], None)
    }

    /// Starts a coordinator that is not expected to be ready (a replica waiting for the leader
    /// Lease): returns once its log has `line`. [`Coordinator::wait_ready`] waits for the rest.
    pub fn start_until_log(
        dir: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
        line: &str,
    ) -> Coordinator {
        Coordinator::start_inner(dir, extra_args, None, "127.0.0.1", env, None, Some(line))
    }

    fn start_full(
        dir: &Path,
        extra_args: &[&str],
        netns: Option<&str>,
        listen_ip: &str,
        env: &[(&str, &str)],
        open_files: Option<u64>,
    ) -> Coordinator {
        Coordinator::start_inner(dir, extra_args, netns, listen_ip, env, open_files, None)
    }

    fn start_inner(
        dir: &Path,
        extra_args: &[&str],
        netns: Option<&str>,
        listen_ip: &str,
        env: &[(&str, &str)],
        open_files: Option<u64>,
        until_log: Option<&str>,
    ) -> Coordinator {
        let hosts = dir.join("hosts");
        let state = dir.join("state");
        let images = dir.join("images");
        for d in [&hosts, &images] {
            fs::create_dir_all(d).expect("create test dirs");
        }
        let mut c = Coordinator {
            child: None,
            dir: dir.to_path_buf(),
            hosts,
            state,
            images,
            grpc_port: free_port(),
            http_port: free_port(),
            extra_args: extra_args.iter().map(ToString::to_string).collect(),
            log: dir.join("coordinator.log"),
            listen_ip: listen_ip.to_string(),
            netns: netns.map(str::to_string),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            open_files,
            agent_logs: std::sync::Mutex::new(Vec::new()),
        };
        // A port free_port() found can be taken (by another test's server or an outgoing
        // connection) before the coordinator binds it: then pick new ports and start again.
        for attempt in 1.. {
            match c.try_spawn_until(until_log) {
                Ok(()) => break,
                Err(log) if attempt < 5 && log.contains("Address already in use") => {
                    c.grpc_port = free_port();
                    c.http_port = free_port();
                }
                Err(log) => panic!("{log}"),
            }
        }
        c
    }

    fn spawn(&mut self) {
        if let Err(log) = self.try_spawn() {
            panic!("{log}");
        }
    }

    fn try_spawn(&mut self) -> Result<(), String> {
        self.try_spawn_until(None)
    }

    /// Waits (up to `timeout`) for the admin socket of a coordinator started by
    /// [`Coordinator::start_until_log`]: it is ready (the leader, for a replica).
    pub fn wait_ready(&mut self, timeout: Duration) {
        let socket = self.state.join("admin.sock");
        let r = wait_until(timeout, "the coordinator's admin socket", || {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Some(Err(format!(
                    "slipway serve exited with {status}:\n{}",
                    self.log_text()
                )));
            }
            std::os::unix::net::UnixStream::connect(&socket)
                .ok()
                .map(|_| Ok(()))
        });
        if let Err(log) = r {
            panic!("{log}");
        }
    }

    /// Starts `slipway serve` and waits for its admin socket (or for `until_log` in its log);
    /// Err(what it said) if it exited.
    fn try_spawn_until(&mut self, until_log: Option<&str>) -> Result<(), String> {
        let log_start = fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0) as usize;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open log");
        let mut command = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&bins().slipway);
                c
            }
            None => Command::new(&bins().slipway),
        };
        if let Some(n) = self.open_files {
            use std::os::unix::process::CommandExt;
            let limit = libc::rlimit {
                rlim_cur: n as libc::rlim_t,
                rlim_max: n as libc::rlim_t,
            };
            // SAFETY: setrlimit is async-signal-safe, and the closure touches nothing else
            // (its one value is copied in).
            unsafe {
                command.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        command.arg("serve");
        // Kubernetes mode reads its hosts from the cluster (KUBECONFIG in `env`).
        if !self.extra_args.iter().any(|a| a == "--kube") {
            command.arg("--hosts").arg(&self.hosts);
        }
        let child = command
            .arg("--state")
            .arg(&self.state)
            .arg("--images")
            .arg(&self.images)
            .arg("--listen")
            .arg(format!("{}:{}", self.listen_ip, self.grpc_port))
            .arg("--http-listen")
            .arg(format!("{}:{}", self.listen_ip, self.http_port))
            .args(&self.extra_args)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn slipway serve");
        self.child = Some(child);
        let socket = self.state.join("admin.sock");
        wait_until(
            Duration::from_secs(30),
            "the coordinator's admin socket",
            || {
                if let Some(status) = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                {
                    self.child = None;
                    return Some(Err(format!(
                        "slipway serve exited with {status}:\n{}",
                        self.log_text()
                    )));
                }
                if let Some(line) = until_log {
                    let log = self.log_text();
                    return log
                        .get(log_start..)
                        .unwrap_or("")
                        .contains(line)
                        .then_some(Ok(()));
                }
                std::os::unix::net::UnixStream::connect(&socket)
                    .ok()
                    .map(|_| Ok(()))
            },
        )
    }

    /// SIGKILL: no chance to clean up, like a power cut of the coordinator.
    /// The coordinator's resident memory in KiB (VmRSS), while it runs.
    pub fn rss_kib(&self) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// The coordinator's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again with the same directories and ports.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Starts again without the extra environment of the last start.
    pub fn restart_clean(&mut self) {
        self.env.clear();
        self.restart();
    }

    /// Waits for the coordinator process to exit by itself; true when it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            match self.child.as_mut().map(|c| c.try_wait()) {
                Some(Ok(Some(_))) | None => {
                    self.child = None;
                    return true;
                }
                _ => thread::sleep(Duration::from_millis(50)),
            }
        }
        false
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The coordinator's log, then the log of every agent started against it: what a timeout
    /// prints, so a failure shows both sides.
    pub fn logs(&self) -> String {
        let mut out = format!("--- coordinator log ---\n{}", self.log_text());
        let agents = self
            .agent_logs
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default();
        for log in agents {
            out.push_str(&format!(
                "--- agent log {} ---\n{}",
                log.display(),
                fs::read_to_string(&log).unwrap_or_default()
            ));
        }
        out
    }

    pub fn agent_url(&self) -> String {
        format!("https://{}:{}", self.listen_ip, self.grpc_port)
    }

    pub fn image_url(&self, name: &str) -> String {
        format!("http://{}:{}/images/{name}", self.listen_ip, self.http_port)
    }

    /// `http://IP:PORT` of the coordinator's HTTP server, as reached from here.
    pub fn http_url(&self) -> String {
        format!("http://{}:{}", self.listen_ip, self.http_port)
    }

    /// Runs `slipway ARGS` against this coordinator.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(&bins().slipway)
            .args(args)
            .env("SLIPWAY_STATE", &self.state)
            .output()
            .expect("run slipway")
    }

    pub fn ca_fingerprint(&self) -> String {
        let out = self.cli(&["info", "-o", "json"]);
        assert!(
            out.status.success(),
            "slipway info: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("info json");
        v["caFingerprint"]
            .as_str()
            .expect("fingerprint")
            .to_string()
    }

    /// A fresh bootstrap token for `host`.
    pub fn token(&self, host: &str, ttl: &str) -> String {
        let out = self.cli(&["token", "create", host, "--ttl", ttl, "-o", "json"]);
        assert!(
            out.status.success(),
            "slipway token create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("token json");
        v["token"].as_str().expect("token").to_string()
    }

    /// `slipway get hosts -o json` items by name.
    pub fn hosts(&self) -> Vec<Value> {
        let out = self.cli(&["get", "hosts", "-o", "json"]);
        assert!(
            out.status.success(),
            "slipway get hosts: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("hosts json");
        v["items"].as_array().cloned().unwrap_or_default()
    }

    /// Host `name`, or `namespace/name`.
    pub fn host(&self, name: &str) -> Option<Value> {
        let (ns, name) = match name.split_once('/') {
            Some((ns, n)) => (Some(ns), n),
            None => (None, name),
        };
        self.hosts().into_iter().find(|h| {
            h["metadata"]["name"] == name
                && ns
                    .is_none_or(|ns| h["metadata"]["namespace"].as_str().unwrap_or("default") == ns)
        })
    }

    /// Waits until host `name` satisfies `pred`; on timeout prints the logs.
    pub fn wait_host(
        &self,
        name: &str,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let start = Instant::now();
        loop {
            if let Some(h) = self.host(name) {
                if pred(&h) {
                    return h;
                }
                if start.elapsed() > timeout {
                    panic!(
                        "timed out after {timeout:?} waiting for host {name} to be {what}; it is:\n{}\n{}",
                        serde_json::to_string_pretty(&h["status"]).unwrap_or_default(),
                        self.logs()
                    );
                }
            } else if start.elapsed() > timeout {
                panic!("host {name} never appeared\n{}", self.logs());
            }
            thread::sleep(Duration::from_millis(150));
        }
    }

    /// Waits until host `name` is no longer listed.
    pub fn wait_host_gone(&self, name: &str, timeout: Duration) {
        let start = Instant::now();
        while self.host(name).is_some() {
            if start.elapsed() > timeout {
                panic!("host {name} was never removed:\n{}", self.logs());
            }
            thread::sleep(Duration::from_millis(150));
        }
    }

    pub fn wait_state(&self, name: &str, state: &str, timeout: Duration) -> Value {
        self.wait_host(name, timeout, state, |h| {
            h["status"]["provisioning"]["state"] == state
        })
    }

    /// Waits until the coordinator's log contains `text`.
    pub fn wait_log(&self, text: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            let log = self.log_text();
            if log.contains(text) {
                return log;
            }
            if start.elapsed() > timeout {
                panic!("the coordinator log never said {text:?}:\n{}", self.logs());
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `GET url` (plain http, `http://HOST:PORT/PATH`) with a short-lived connection: the status
/// code and the body.
pub fn http_get(url: &str) -> (u16, String) {
    http_get_from(None, url)
}

/// A TCP connection to `to` from the loopback address `from` (e.g. 127.0.0.2: the whole of
/// 127.0.0.0/8 is this machine), so a test can play a second machine on the network.
pub fn connect_from(
    from: std::net::IpAddr,
    to: std::net::SocketAddr,
) -> std::io::Result<TcpStream> {
    assert!(
        from.is_loopback() && to.ip().is_loopback(),
        "tests talk to loopback only"
    );
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.bind(&std::net::SocketAddr::new(from, 0).into())?;
    s.connect(&to.into())?;
    Ok(s.into())
}

/// [`http_get`] from source address `from`.
pub fn http_get_from(from: Option<std::net::IpAddr>, url: &str) -> (u16, String) {
    let rest = url.strip_prefix("http://").expect("an http:// URL");
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut s = match from {
        Some(ip) => connect_from(ip, host.parse().expect("an IP:PORT URL")).expect("connect"),
        None => TcpStream::connect(host).expect("connect"),
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(
        s,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

impl Coordinator {
    /// `slipway get hardwaredata NAME -o json`.
    pub fn hardware_data(&self, name: &str) -> Value {
        let out = self.cli(&["get", "hardwaredata", name, "-o", "json"]);
        assert!(
            out.status.success(),
            "slipway get hardwaredata {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("hardwaredata json")
    }

    /// Starts `slipway-agent simulate` against this coordinator (its agent URL, HTTP server
    /// and CA fingerprint) with `args`; its log (`log`) is printed with the others on
    /// timeouts.
    pub fn simulate(&self, args: &[&str], log: &Path) -> Agent {
        let file = fs::File::create(log).expect("simulate log");
        let child = Command::new(&bins().agent)
            .arg("simulate")
            .arg("--coordinator")
            .arg(self.agent_url())
            .arg("--http")
            .arg(self.http_url())
            .arg("--ca-fingerprint")
            .arg(self.ca_fingerprint())
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(file.try_clone().expect("simulate log"))
            .stderr(file)
            .spawn()
            .expect("spawn slipway-agent simulate");
        if let Ok(mut logs) = self.agent_logs.lock() {
            logs.push(log.to_path_buf());
        }
        Agent {
            child: Some(child),
            log: log.to_path_buf(),
        }
    }
}

/// Runs `slipway-agent ARGS` to completion (e.g. `simulate-hosts`), asserting it succeeds;
/// returns its stdout.
pub fn agent_tool(args: &[&str]) -> String {
    let out = Command::new(&bins().agent)
        .args(args)
        .output()
        .expect("run slipway-agent");
    assert!(
        out.status.success(),
        "slipway-agent {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes a BareMetalHost document to the coordinator's hosts directory.
pub fn write_host(hosts: &Path, name: &str, image_url: &str, checksum: &str, device: &str) {
    let doc = format!(
        "apiVersion: metal3.io/v1alpha1\nkind: BareMetalHost\nmetadata:\n  name: {name}\nspec:\n  online: true\n  image:\n    url: {image_url}\n    checksum: {checksum}\n    checksumType: sha256\n    format: raw\n  rootDeviceHints:\n    deviceName: {device}\n"
    );
    // Write then rename, as editors and config tools do, so the watcher never reads half a file.
    let tmp = hosts.join(format!(".{name}.tmp"));
    fs::write(&tmp, doc).expect("write host");
    fs::rename(&tmp, hosts.join(format!("{name}.yaml"))).expect("rename host");
}

/// Runs a system tool (sgdisk, mcopy, ...) and returns its stdout; panics with the command
/// line and stderr when it fails or is missing.
pub fn run_tool(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{} is needed by this test (see .ci/run): {e}", args[0]));
    assert!(
        out.status.success(),
        "{} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a system tool and returns its exit code (-1 when killed by a signal).
pub fn run_tool_code(args: &[&str]) -> i32 {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{} is needed by this test (see .ci/run): {e}", args[0]))
        .status
        .code()
        .unwrap_or(-1)
}

/// Writes a file into the hosts directory the way editors do (write, then rename).
pub fn write_doc(hosts: &Path, file: &str, doc: &str) {
    let tmp = hosts.join(format!(".{file}.tmp"));
    fs::write(&tmp, doc).expect("write document");
    fs::rename(&tmp, hosts.join(file)).expect("rename document");
}

/// A running agent process.
pub struct Agent {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Agent {
    /// Starts `slipway-agent run` for the coordinator with `token`, managing only `disk`.
    pub fn start(
        c: &Coordinator,
        token: &str,
        disk: &Path,
        state_dir: &Path,
        extra: &[&str],
    ) -> Agent {
        Agent::start_at(c, &c.agent_url(), token, disk, state_dir, extra)
    }

    /// The same, dialling `url` (a proxy in front of the coordinator).
    pub fn start_at(
        c: &Coordinator,
        url: &str,
        token: &str,
        disk: &Path,
        state_dir: &Path,
        extra: &[&str],
    ) -> Agent {
        let log = state_dir.with_extension("log");
        let file = fs::File::create(&log).expect("agent log");
        let child = Command::new(&bins().agent)
            .arg("run")
            .arg("--coordinator")
            .arg(url)
            .arg("--token")
            .arg(token)
            .arg("--ca-fingerprint")
            .arg(c.ca_fingerprint())
            .arg("--state-dir")
            .arg(state_dir)
            .arg("--disk")
            .arg(disk)
            .args(["--heartbeat-seconds", "2"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn slipway-agent");
        if let Ok(mut logs) = c.agent_logs.lock() {
            logs.push(log.clone());
        }
        Agent {
            child: Some(child),
            log,
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the agent to exit; returns whether it succeeded.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let child = self.child.as_mut().expect("agent running");
        let status = wait_until(timeout, "the agent to exit", || {
            child.try_wait().ok().flatten()
        });
        self.child = None;
        status.success()
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }
}

impl Agent {
    /// Sends SIGTERM (a graceful stop) to the process.
    pub fn terminate(&self) {
        if let Some(c) = &self.child {
            let pid = libc::pid_t::try_from(c.id()).expect("pid");
            // SAFETY: kill(2) on our own child's pid, with a valid signal number.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A TCP proxy on 127.0.0.1 in front of `target`, whose connections a test can cut (a
/// network that drops every connection at once), while new ones are accepted as before.
pub struct Proxy {
    pub port: u16,
    conns: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    pub fn start(target: std::net::SocketAddr) -> Proxy {
        Proxy::start_failover(vec![target])
    }

    /// A proxy that connects each client to the first of `targets` accepting a connection,
    /// as a Service does with the one ready replica: a coordinator replica that does not
    /// lead listens on nothing.
    pub fn start_failover(targets: Vec<std::net::SocketAddr>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::<TcpStream>::new()));
        let kept = conns.clone();
        thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Some(server) = targets.iter().find_map(|t| TcpStream::connect(t).ok()) else {
                    continue;
                };
                if let Ok(mut c) = kept.lock() {
                    c.extend(client.try_clone().ok());
                    c.extend(server.try_clone().ok());
                }
                for (mut from, mut to) in [
                    (client.try_clone(), server.try_clone()),
                    (server.try_clone(), client.try_clone()),
                ]
                .into_iter()
                .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                {
                    thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Proxy { port, conns }
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Drops every connection made so far.
    pub fn cut(&self) {
        if let Ok(mut c) = self.conns.lock() {
            for s in c.drain(..) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

/// A loop device over a sparse file; detached on drop. Needs root.
pub struct LoopDevice {
    pub path: PathBuf,
    pub file: PathBuf,
}

impl LoopDevice {
    pub fn new(file: &Path, size: u64) -> LoopDevice {
        assert!(
            nix_is_root(),
            "this test needs root for loop devices (losetup); run the tests as root, as CI does"
        );
        let f = fs::File::create(file).expect("create backing file");
        f.set_len(size).expect("size backing file");
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .unwrap_or_else(|e| {
                panic!("losetup is needed for loop-device tests (apt-get install -y mount): {e}")
            });
        assert!(
            out.status.success(),
            "losetup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        LoopDevice {
            path,
            file: file.to_path_buf(),
        }
    }

    pub fn read(&self, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        fs::File::open(&self.path)
            .and_then(|mut f| f.read_exact(&mut buf))
            .expect("read loop device");
        buf
    }

    pub fn write_at(&self, offset: u64, data: &[u8]) {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .expect("open loop device");
        f.write_all_at(data, offset).expect("write loop device");
        f.sync_all().expect("sync loop device");
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A tiny HTTP/1.1 file server that sends at most `bytes_per_second`: slow enough to catch a
/// write in progress. Serves `body` at every path. Runs until the process ends.
pub fn throttled_server(body: Vec<u8>, bytes_per_second: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/image.raw", listener.local_addr().expect("addr"));
    let body = std::sync::Arc::new(body);
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let body = body.clone();
            thread::spawn(move || serve_slowly(stream, &body, bytes_per_second));
        }
    });
    url
}

fn serve_slowly(mut stream: TcpStream, body: &[u8], rate: usize) {
    let mut req = [0u8; 4096];
    let _ = stream.read(&mut req);
    let header = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if stream.write_all(header.as_bytes()).is_err() {
        return;
    }
    let slice = (rate / 10).max(1);
    for chunk in body.chunks(slice) {
        if stream.write_all(chunk).is_err() {
            return;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// The ELF program interpreter (`PT_INTERP`) of a 64-bit little-endian executable: `None`
/// for a statically linked one.
pub fn elf_interpreter(bytes: &[u8]) -> Result<Option<String>, String> {
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |o: usize| {
        bytes
            .get(o..o + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    };
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if bytes.get(..4) != Some(b"\x7fELF") || bytes.get(4) != Some(&2) || bytes.get(5) != Some(&1) {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let phoff = u64_at(0x20).ok_or("truncated header")? as usize;
    let phentsize = u16_at(0x36).ok_or("truncated header")? as usize;
    let phnum = u16_at(0x38).ok_or("truncated header")? as usize;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(ph).ok_or("truncated program headers")? == 3 {
            let off = u64_at(ph + 8).ok_or("truncated program header")? as usize;
            let size = u64_at(ph + 32).ok_or("truncated program header")? as usize;
            let raw = bytes
                .get(off..off + size)
                .ok_or("PT_INTERP out of the file")?;
            return Ok(Some(
                String::from_utf8_lossy(raw)
                    .trim_end_matches('\0')
                    .to_string(),
            ));
        }
    }
    Ok(None)
}
