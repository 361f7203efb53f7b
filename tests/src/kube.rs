//! A real Kubernetes API server for the tests of Kubernetes mode.
//!
//! [`KubeCluster::start`] starts etcd and kube-apiserver 1.20.2 (built by `cargo xtask
//! kube-apiserver`) on 127.0.0.1 with ports of their own, so tests run in parallel: certificates
//! made with openssl, static tokens for an admin (`system:masters`) and for Slipway's service
//! account ([`SERVICE_ACCOUNT_USER`]), RBAC on. There is no controller manager, scheduler or
//! kubelet: objects are stored and served, nothing runs them (no pods, no token controller).
//!
//! When `KUBECONFIG` is set, the tests use that cluster instead: each gets a namespace of its
//! own, and the service account's kubeconfig carries a token from `kubectl create token`
//! (Kubernetes 1.24+).
//!
//! Dropping the handle kills the API server and etcd (their process groups) and removes the
//! temporary directory; their logs are in it, and their tails are printed when a test panics.

use std::fs;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::{run_tool, sha256_hex};

/// The service account Slipway's coordinator runs as: its namespace, its name, and the user
/// name the API server gives its token.
pub const SERVICE_ACCOUNT_NAMESPACE: &str = "slipway-system";
pub const SERVICE_ACCOUNT_NAME: &str = "slipway";
pub const SERVICE_ACCOUNT_USER: &str = "system:serviceaccount:slipway-system:slipway";
const SERVICE_ACCOUNT_GROUPS: &str =
    "system:serviceaccounts,system:serviceaccounts:slipway-system,system:authenticated";

/// Label for the cluster-scoped objects a test creates (ClusterRoles, ClusterRoleBindings),
/// with the test's namespace as value: on an existing cluster they are deleted with the
/// namespace when the handle drops.
pub const TEST_LABEL: &str = "slipway.test/namespace";

/// How long the API server may take to answer `/readyz` (about 5 s on an idle 2-core machine;
/// parallel tests start several at once).
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Where `cargo xtask kube-apiserver` keeps the API server: `$SLIPWAY_CACHE/kube-apiserver-1.20.2`,
/// `$SLIPWAY_CACHE` being `$HOME/.cache/slipway` by default.
pub fn apiserver_cache_dir() -> PathBuf {
    let cache = match std::env::var_os("SLIPWAY_CACHE") {
        Some(c) if !c.is_empty() => PathBuf::from(c),
        _ => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(".cache/slipway"),
    };
    cache.join("kube-apiserver-1.20.2")
}

/// The API server binary: `$SLIPWAY_KUBE_APISERVER`, else the one in [`apiserver_cache_dir`].
pub fn apiserver_binary() -> PathBuf {
    match std::env::var_os("SLIPWAY_KUBE_APISERVER") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => apiserver_cache_dir().join("kube-apiserver"),
    }
}

/// A Kubernetes API server for one test, with a namespace of its own.
pub struct KubeCluster {
    dir: tempfile::TempDir,
    /// Our own etcd and API server; `None` on an existing cluster (`KUBECONFIG`).
    local: Option<Local>,
    kubeconfig: PathBuf,
    service_account_kubeconfig: OnceLock<PathBuf>,
    namespace: String,
    startup: Duration,
}

struct Local {
    apiserver: Child,
    etcd: Child,
    apiserver_log: PathBuf,
    etcd_log: PathBuf,
    port: u16,
}

impl KubeCluster {
    /// Uses the cluster of `KUBECONFIG` when set; otherwise starts etcd and kube-apiserver and
    /// waits until the API server is ready. Either way creates the test's namespace, which is
    /// the kubeconfigs' default.
    pub fn start() -> KubeCluster {
        let begin = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("slipway-kube-")
            .tempdir()
            .expect("temporary directory");
        let namespace = unique_namespace();
        let mut cluster = match std::env::var_os("KUBECONFIG") {
            Some(k) if !k.is_empty() => external(dir, namespace),
            _ => local(dir, namespace),
        };
        cluster.kubectl_ok(&["create", "namespace", &cluster.namespace]);
        cluster.startup = begin.elapsed();
        cluster
    }

    /// The admin's kubeconfig (its context's namespace is [`KubeCluster::namespace`]).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// A kubeconfig for [`SERVICE_ACCOUNT_USER`], with no more rights than RBAC grants it
    /// (none to begin with on our own API server), default namespace the test's.
    pub fn service_account_kubeconfig(&self) -> &Path {
        self.service_account_kubeconfig
            .get_or_init(|| self.external_service_account_kubeconfig())
    }

    /// The namespace created for this test.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Whether this is an existing cluster (`KUBECONFIG`) rather than our own API server.
    pub fn is_external(&self) -> bool {
        self.local.is_none()
    }

    /// From the call of [`KubeCluster::start`] to the namespace created.
    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    /// The temporary directory (certificates, kubeconfigs, etcd's data, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The process ids of our API server and etcd (none on an existing cluster).
    pub fn pids(&self) -> Vec<u32> {
        self.local
            .iter()
            .flat_map(|l| [l.apiserver.id(), l.etcd.id()])
            .collect()
    }

    /// The API server's URL.
    pub fn server(&self) -> String {
        match &self.local {
            Some(l) => format!("https://127.0.0.1:{}", l.port),
            None => self
                .kubectl_ok(&["config", "view", "--minify", "-o", "jsonpath={..server}"])
                .trim()
                .to_string(),
        }
    }

    /// `kubectl ARGS` as the admin.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        kubectl_with(&self.kubeconfig, args, None)
    }

    /// `kubectl ARGS` as the admin; panics with its stderr unless it succeeds. Returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        self.checked(args, self.kubectl(args))
    }

    /// `kubectl ARGS` as [`SERVICE_ACCOUNT_USER`].
    pub fn kubectl_as_service_account(&self, args: &[&str]) -> Output {
        kubectl_with(self.service_account_kubeconfig(), args, None)
    }

    /// `kubectl apply -f -` of `yaml` as the admin (namespaced objects without a namespace land
    /// in the test's); panics unless it succeeds. Returns stdout.
    pub fn apply_yaml(&self, yaml: &str) -> String {
        let args = ["apply", "-f", "-"];
        self.checked(&args, kubectl_with(&self.kubeconfig, &args, Some(yaml)))
    }

    /// The last lines of the API server's and etcd's logs.
    pub fn log_tails(&self) -> String {
        match &self.local {
            Some(l) => format!(
                "--- kube-apiserver log (tail) ---\n{}\n--- etcd log (tail) ---\n{}",
                tail(&l.apiserver_log, 40),
                tail(&l.etcd_log, 20)
            ),
            None => "(an existing cluster: no server logs here)".into(),
        }
    }

    fn checked(&self, args: &[&str], out: Output) -> String {
        if !out.status.success() {
            // The servers' log tails follow, printed as the handle drops.
            panic!(
                "kubectl {} failed ({}):\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// On an existing cluster: the service account (created if missing) and a token for it
    /// from `kubectl create token`, in a copy of the admin's kubeconfig.
    fn external_service_account_kubeconfig(&self) -> PathBuf {
        self.apply_yaml(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {SERVICE_ACCOUNT_NAMESPACE}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: {SERVICE_ACCOUNT_NAME}\n  namespace: {SERVICE_ACCOUNT_NAMESPACE}\n"
        ));
        let token = self.kubectl_ok(&[
            "-n",
            SERVICE_ACCOUNT_NAMESPACE,
            "create",
            "token",
            SERVICE_ACCOUNT_NAME,
            "--duration=1h",
        ]);
        let path = self.dir().join("service-account.kubeconfig");
        fs::copy(&self.kubeconfig, &path).expect("copy kubeconfig");
        let cred = format!("--token={}", token.trim());
        for args in [
            &[
                "config",
                "set-credentials",
                "slipway-service-account",
                &cred,
            ][..],
            &[
                "config",
                "set-context",
                "--current",
                "--user=slipway-service-account",
            ],
        ] {
            self.checked(args, kubectl_with(&path, args, None));
        }
        path
    }
}

impl Drop for KubeCluster {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("{}", self.log_tails());
        }
        match self.local.take() {
            Some(mut l) => {
                // The API server first, so it does not log etcd going away.
                stop(&mut l.apiserver);
                stop(&mut l.etcd);
            }
            None => {
                let selector = format!("{TEST_LABEL}={}", self.namespace);
                let _ = self.kubectl(&[
                    "delete",
                    "clusterrolebinding,clusterrole",
                    "-l",
                    &selector,
                    "--wait=false",
                ]);
                let _ = self.kubectl(&["delete", "namespace", &self.namespace, "--wait=false"]);
            }
        }
    }
}

/// Kills the process group `child` leads (SIGKILL: nothing of it should outlive the test)
/// and reaps it.
fn stop(child: &mut Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) on the process group of our own child (it was started as the leader
        // of a new group), with a valid signal number.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// `slipway-test-PID-N-XXXX`: unique within this process (N), across processes on this machine
/// (PID), and likely across machines sharing a cluster (XXXX from the clock).
fn unique_namespace() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let salt = &sha256_hex(format!("{nanos}").as_bytes())[..6];
    format!("slipway-test-{}-{n}-{salt}", std::process::id())
}

/// A random-enough token (loopback only, one test's lifetime).
fn token(what: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    sha256_hex(format!("{what}-{}-{nanos}", std::process::id()).as_bytes())[..40].to_string()
}

/// `n` distinct ports free right now on 127.0.0.1 (all bound at once, so never the same one
/// twice).
fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    std::array::from_fn(|i| listeners[i].local_addr().expect("local address").port())
}

/// The cluster of `KUBECONFIG`: a flattened copy of its current context, with the test's
/// namespace as default.
fn external(dir: tempfile::TempDir, namespace: String) -> KubeCluster {
    let kubeconfig = dir.path().join("admin.kubeconfig");
    let out = kubectl_env(&["config", "view", "--raw", "--minify", "--flatten"]);
    assert!(
        out.status.success(),
        "KUBECONFIG is set but `kubectl config view` fails: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::write(&kubeconfig, &out.stdout).expect("write kubeconfig");
    let cluster = KubeCluster {
        dir,
        local: None,
        kubeconfig,
        service_account_kubeconfig: OnceLock::new(),
        namespace,
        startup: Duration::ZERO,
    };
    let ns = format!("--namespace={}", cluster.namespace);
    cluster.kubectl_ok(&["config", "set-context", "--current", &ns]);
    cluster.kubectl_ok(&["get", "--raw", "/readyz"]);
    cluster
}

/// Our own etcd and API server in `dir`.
fn local(dir: tempfile::TempDir, namespace: String) -> KubeCluster {
    let bin = apiserver_binary();
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo xtask kube-apiserver` (it builds kube-apiserver 1.20.2, \
         about 17 minutes the first time), or set SLIPWAY_KUBE_APISERVER, or KUBECONFIG to use \
         an existing cluster",
        bin.display()
    );
    let d = dir.path();
    make_certificates(d);
    let admin_token = token("admin");
    let sa_token = token("service-account");
    fs::write(
        d.join("tokens.csv"),
        format!(
            "{admin_token},admin,admin-uid,system:masters\n\
             {sa_token},{SERVICE_ACCOUNT_USER},slipway-sa-uid,\"{SERVICE_ACCOUNT_GROUPS}\"\n"
        ),
    )
    .expect("write tokens.csv");

    // A port found free can be taken by another test's server before ours binds it: then
    // start again on new ports.
    let mut attempt = 0;
    let local = loop {
        attempt += 1;
        match start_servers(&bin, d, &admin_token, &namespace) {
            Ok(l) => break l,
            Err(e) if attempt < 5 && e.contains("address already in use") => {
                let _ = fs::remove_dir_all(d.join("etcd"));
            }
            Err(e) => panic!("{e}"),
        }
    };
    let server = format!("https://127.0.0.1:{}", local.port);
    let kubeconfig = d.join("admin.kubeconfig");
    let sa_kubeconfig = d.join("service-account.kubeconfig");
    write_kubeconfig(&kubeconfig, &server, d, "admin", &admin_token, &namespace);
    write_kubeconfig(
        &sa_kubeconfig,
        &server,
        d,
        "slipway-service-account",
        &sa_token,
        &namespace,
    );
    KubeCluster {
        dir,
        local: Some(local),
        kubeconfig,
        service_account_kubeconfig: OnceLock::from(sa_kubeconfig),
        namespace,
        startup: Duration::ZERO,
    }
}

/// A CA; the API server's certificate (127.0.0.1, localhost, kubernetes.default.svc); the
/// service accounts' signing key pair.
fn make_certificates(d: &Path) {
    let p = |name: &str| d.join(name).to_str().expect("UTF-8 path").to_string();
    let ext = d.join("server.ext");
    fs::write(
        &ext,
        "basicConstraints=CA:FALSE\n\
         keyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth\n\
         subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n",
    )
    .expect("write server.ext");
    run_tool(&[
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        &p("ca.key"),
        "-out",
        &p("ca.crt"),
        "-days",
        "7",
        "-subj",
        "/CN=slipway-test-ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    run_tool(&[
        "openssl",
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        &p("server.key"),
        "-out",
        &p("server.csr"),
        "-subj",
        "/CN=kube-apiserver",
    ]);
    run_tool(&[
        "openssl",
        "x509",
        "-req",
        "-in",
        &p("server.csr"),
        "-CA",
        &p("ca.crt"),
        "-CAkey",
        &p("ca.key"),
        "-CAcreateserial",
        "-CAserial",
        &p("ca.srl"),
        "-out",
        &p("server.crt"),
        "-days",
        "7",
        "-extfile",
        &p("server.ext"),
    ]);
    run_tool(&["openssl", "genrsa", "-out", &p("sa.key"), "2048"]);
    run_tool(&[
        "openssl",
        "rsa",
        "-in",
        &p("sa.key"),
        "-pubout",
        "-out",
        &p("sa.pub"),
    ]);
}

fn write_kubeconfig(
    path: &Path,
    server: &str,
    dir: &Path,
    user: &str,
    token: &str,
    namespace: &str,
) {
    let ca = dir.join("ca.crt");
    fs::write(
        path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: slipway-test\n  cluster:\n    server: {server}\n    certificate-authority: {}\nusers:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n- name: slipway-test\n  context:\n    cluster: slipway-test\n    user: {user}\n    namespace: {namespace}\ncurrent-context: slipway-test\n",
            ca.display()
        ),
    )
    .expect("write kubeconfig");
}

/// Starts etcd, then the API server, and waits for `/readyz`; Err(what went wrong, with the
/// logs' tails) after killing what started.
fn start_servers(
    bin: &Path,
    d: &Path,
    admin_token: &str,
    namespace: &str,
) -> Result<Local, String> {
    let [client, peer, port] = free_ports::<3>();
    let etcd_log = d.join("etcd.log");
    let apiserver_log = d.join("kube-apiserver.log");
    let client_url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let mut etcd = spawn(
        Command::new("etcd")
            .arg("--name=slipway-test")
            .arg(format!("--data-dir={}", d.join("etcd").display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=slipway-test={peer_url}")),
        &etcd_log,
        "etcd (apt-get install etcd-server, or `cargo xtask kube-apiserver`)",
    );
    // Ready by its own log, not by its port answering: that could be another test's etcd.
    if let Err(e) = wait_for(Duration::from_secs(30), || {
        if let Ok(Some(status)) = etcd.try_wait() {
            return Some(Err(format!("etcd exited with {status}")));
        }
        fs::read_to_string(&etcd_log)
            .is_ok_and(|l| l.contains("ready to serve client requests"))
            .then_some(Ok(()))
    }) {
        stop(&mut etcd);
        return Err(format!(
            "{e}\n--- etcd log (tail) ---\n{}",
            tail(&etcd_log, 20)
        ));
    }
    let p = |name: &str| d.join(name).display().to_string();
    let mut apiserver = spawn(
        Command::new(bin)
            .arg(format!("--etcd-servers={client_url}"))
            // Our own etcd, but a prefix of our own too, so a mix-up cannot share data.
            .arg(format!("--etcd-prefix=/{namespace}"))
            .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
            .arg(format!("--secure-port={port}"))
            .arg("--insecure-port=0")
            .arg(format!("--tls-cert-file={}", p("server.crt")))
            .arg(format!("--tls-private-key-file={}", p("server.key")))
            .arg(format!("--client-ca-file={}", p("ca.crt")))
            .arg(format!("--token-auth-file={}", p("tokens.csv")))
            .arg("--authorization-mode=RBAC")
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg(format!("--service-account-key-file={}", p("sa.pub")))
            .arg(format!(
                "--service-account-signing-key-file={}",
                p("sa.key")
            ))
            .arg("--service-cluster-ip-range=10.96.0.0/24")
            .arg("--endpoint-reconciler-type=none")
            .arg(format!("--cert-dir={}", p("apiserver-certs"))),
        &apiserver_log,
        "kube-apiserver",
    );
    // A kubeconfig just for the readiness probe; the real ones are written once it is ready.
    let probe = d.join("probe.kubeconfig");
    write_kubeconfig(
        &probe,
        &format!("https://127.0.0.1:{port}"),
        d,
        "admin",
        admin_token,
        "default",
    );
    let ready = wait_for(READY_TIMEOUT, || {
        for (name, child) in [("kube-apiserver", &mut apiserver), ("etcd", &mut etcd)] {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(Err(format!("{name} exited with {status}")));
            }
        }
        // Our CA and token: another test's API server on this port would fail both.
        (TcpStream::connect(("127.0.0.1", port)).is_ok()
            && kubectl_with(&probe, &["get", "--raw=/readyz"], None)
                .status
                .success())
        .then_some(Ok(()))
    });
    match ready {
        Ok(()) => Ok(Local {
            apiserver,
            etcd,
            apiserver_log,
            etcd_log,
            port,
        }),
        Err(e) => {
            stop(&mut apiserver);
            stop(&mut etcd);
            Err(format!(
                "the API server did not become ready: {e}\n--- kube-apiserver log (tail) ---\n{}\n--- etcd log (tail) ---\n{}",
                tail(&apiserver_log, 40),
                tail(&etcd_log, 20)
            ))
        }
    }
}

/// Starts `command` as the leader of a new process group, stdout and stderr to `log`.
fn spawn(command: &mut Command, log: &Path, what: &str) -> Child {
    let file = fs::File::create(log).expect("create log");
    command
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log"))
        .stderr(file)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"))
}

/// Polls `f` every 200 ms until it gives a result, or Err after `timeout`.
fn wait_for(
    timeout: Duration,
    mut f: impl FnMut() -> Option<Result<(), String>>,
) -> Result<(), String> {
    let start = Instant::now();
    loop {
        if let Some(r) = f() {
            return r;
        }
        if start.elapsed() > timeout {
            return Err(format!("timed out after {timeout:?}"));
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// `kubectl --kubeconfig K ARGS`, with `stdin` fed when given.
fn kubectl_with(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut c = Command::new("kubectl");
    c.arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c
        .spawn()
        .unwrap_or_else(|e| panic!("kubectl (1.24 or newer) is needed on PATH: {e}"));
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("kubectl stdin");
        // A kubectl that exits early says why on stderr.
        let _ = pipe.write_all(text.as_bytes());
    }
    child.wait_with_output().expect("wait for kubectl")
}

/// `kubectl ARGS` with the environment's KUBECONFIG.
fn kubectl_env(args: &[&str]) -> Output {
    Command::new("kubectl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("kubectl (1.24 or newer) is needed on PATH: {e}"))
}

/// The last `n` lines of a file.
fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
