//! Images beyond raw through the real processes: a zstd-compressed-cluster qcow2 image
//! verified by a checksum file, served by the coordinator's own HTTP server, written by the
//! agent onto a loop device, and compared with `qemu-img convert -O raw` of the same image;
//! the standalone `slipway-agent write-image` with an xz-compressed raw image; and https
//! from a server whose CA the agent knows from the machine's certificate store or `--ca`, or,
//! provisioning a host, from the coordinator's `--image-ca`.

#![allow(clippy::disallowed_methods)] // qemu-img, xz and sha256sum make the test images

use std::fs;
use std::process::Command;
use std::time::Duration;

use slipway_tests::{Agent, Coordinator, LoopDevice, bins, pattern, sha256_hex};

const MIB: usize = 1 << 20;

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A disk image with data in spread extents and zeros between them.
fn sparse_image(size: usize) -> Vec<u8> {
    let mut img = vec![0u8; size];
    let mut at = 0;
    let mut i = 0;
    while at < size {
        let len = (300_000 + i * 77_777).min(size - at);
        img[at..at + len].copy_from_slice(&pattern(len, i as u64 + 1));
        at += len + 2 * MIB + i * 4096;
        i += 1;
    }
    img
}

#[test]
fn qcow2_with_a_checksum_file_is_provisioned_onto_a_loop_device() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(dir.path(), &[]);
    let raw = dir.path().join("os.raw");
    let image = sparse_image(24 * MIB);
    fs::write(&raw, &image).unwrap();
    let qcow2 = c.images.join("os.qcow2");
    run(Command::new("qemu-img")
        .args([
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zstd",
        ])
        .arg(&raw)
        .arg(&qcow2));
    let file = fs::read(&qcow2).unwrap();
    fs::write(
        c.images.join("SHA256SUMS"),
        format!(
            "{}  other.qcow2\n{}  os.qcow2\n",
            sha256_hex(b"x"),
            sha256_hex(&file)
        ),
    )
    .unwrap();
    let disk = LoopDevice::new(&dir.path().join("disk.raw"), 64 * MIB as u64);
    disk.write_at(0, &pattern(MIB, 7)); // an old OS's boot sector
    let doc = format!(
        "apiVersion: metal3.io/v1alpha1\nkind: BareMetalHost\nmetadata:\n  name: worker-q\nspec:\n  online: true\n  image:\n    url: {}\n    checksum: {}\n    format: qcow2\n  rootDeviceHints:\n    deviceName: {}\n",
        c.image_url("os.qcow2"),
        c.image_url("SHA256SUMS"),
        disk.path.display()
    );
    fs::write(c.hosts.join("worker-q.yaml"), doc).unwrap();
    c.wait_state("worker-q", "inspecting", Duration::from_secs(10));
    let token = c.token("worker-q", "10m");
    let _agent = Agent::start(&c, &token, &disk.path, &dir.path().join("agent"), &[]);
    c.wait_state("worker-q", "provisioned", Duration::from_secs(60));

    let reference = dir.path().join("ref.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&qcow2)
        .arg(&reference));
    let want = fs::read(&reference).unwrap();
    assert_eq!(want, image);
    let got = disk.read(want.len());
    let diff = got.iter().zip(&want).position(|(a, b)| a != b);
    assert_eq!(diff, None, "the disk differs from qemu-img convert -O raw");
    let out = c.cli(&["describe", "host", "worker-q"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("sha256 verified"), "{text}");
}

#[test]
fn standalone_write_image_takes_an_xz_image_from_the_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(dir.path(), &[]);
    let image = sparse_image(10 * MIB + 333);
    let raw = c.images.join("os.img");
    fs::write(&raw, &image).unwrap();
    run(Command::new("xz").args(["-0", "-T1"]).arg(&raw));
    let xz = fs::read(c.images.join("os.img.xz")).unwrap();
    slipway_tests::wait_until(Duration::from_secs(10), "the image server", || {
        std::net::TcpStream::connect(("127.0.0.1", c.http_port)).ok()
    });
    let target = dir.path().join("target.disk");
    fs::write(&target, pattern(16 * MIB, 3)).unwrap();
    let out = Command::new(&bins().agent)
        .arg("write-image")
        .arg(c.image_url("os.img.xz"))
        .arg(&target)
        .args(["--checksum", &sha256_hex(&xz), "--format", "raw"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("xz-compressed raw") && stdout.contains("verified"),
        "{stdout}"
    );
    let got = fs::read(&target).unwrap();
    assert!(got[..image.len()] == image[..]);
    // A wrong checksum: non-zero exit, the message names URL, device and offset, and the
    // target's ends are zeroed.
    let out = Command::new(&bins().agent)
        .arg("write-image")
        .arg(c.image_url("os.img.xz"))
        .arg(&target)
        .args(["--checksum", &sha256_hex(b"no")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("checksum mismatch") && err.contains(&target.display().to_string()),
        "{err}"
    );
    let got = fs::read(&target).unwrap();
    assert!(got[..MIB].iter().all(|b| *b == 0) && got[got.len() - MIB..].iter().all(|b| *b == 0));
}

/// A CA, and a certificate for 127.0.0.1 it signed, made by the `openssl` tool as an
/// operator would, as PEM files in `dir`: (ca, cert, key).
fn test_ca(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let p = |name: &str| dir.join(name).display().to_string();
    let ext = dir.join("leaf.ext");
    fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    run(Command::new("openssl")
        .args(["req", "-x509"])
        .args(ec)
        .args(["-keyout", &p("ca.key"), "-out", &p("ca.pem"), "-days", "2"])
        .args(["-subj", "/CN=Slipway test CA"])
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .args(["-addext", "keyUsage=critical,keyCertSign"]));
    run(Command::new("openssl").arg("req").args(ec).args([
        "-keyout",
        &p("key.pem"),
        "-out",
        &p("leaf.csr"),
        "-subj",
        "/CN=127.0.0.1",
    ]));
    run(Command::new("openssl")
        .args(["x509", "-req", "-in", &p("leaf.csr"), "-CA", &p("ca.pem")])
        .args([
            "-CAkey",
            &p("ca.key"),
            "-CAcreateserial",
            "-out",
            &p("cert.pem"),
        ])
        .args(["-days", "2", "-extfile", &p("leaf.ext")]));
    (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    )
}

/// Python's http.server over TLS, serving `root`; killed on drop.
struct HttpsServer(std::process::Child, u16);

impl HttpsServer {
    /// A test CA in `dir`, and a server with its certificate serving an image as /os.img:
    /// (the CA's PEM file, the server, the image).
    fn with_image(dir: &std::path::Path) -> (std::path::PathBuf, HttpsServer, Vec<u8>) {
        let (ca, cert, key) = test_ca(dir);
        let www = dir.join("www");
        fs::create_dir(&www).unwrap();
        let image = sparse_image(6 * MIB + 5);
        fs::write(www.join("os.img"), &image).unwrap();
        (ca, HttpsServer::start(&www, &cert, &key), image)
    }

    fn start(root: &std::path::Path, cert: &std::path::Path, key: &std::path::Path) -> Self {
        use std::io::BufRead;
        let script = "import http.server, ssl, sys\n\
            s = http.server.HTTPServer(('127.0.0.1', 0), http.server.SimpleHTTPRequestHandler)\n\
            c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n\
            c.load_cert_chain(sys.argv[1], sys.argv[2])\n\
            s.socket = c.wrap_socket(s.socket, server_side=True)\n\
            print(s.server_port, flush=True)\n\
            s.serve_forever()\n";
        let mut child = Command::new("python3")
            .args(["-c", script])
            .arg(cert)
            .arg(key)
            .current_dir(root)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 runs the test's https server");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("no port: {line:?}"));
        HttpsServer(child, port)
    }
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// https: the agent trusts a private CA from the machine's certificate store (here
/// `SSL_CERT_FILE`, which the store loader reads like /etc/ssl/certs) or from `--ca`, and
/// refuses the server without either, leaving the disk unbootable.
#[test]
fn standalone_write_image_over_https_trusts_the_machine_store_and_ca_files() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, server, image) = HttpsServer::with_image(dir.path());
    let url = format!("https://127.0.0.1:{}/os.img", server.1);
    let target = dir.path().join("target.disk");
    let write = |env_ca: Option<&std::path::Path>, flag_ca: Option<&std::path::Path>| {
        fs::write(&target, pattern(8 * MIB, 4)).unwrap();
        let mut cmd = Command::new(&bins().agent);
        cmd.args(["write-image", &url])
            .arg(&target)
            .args(["--checksum", &sha256_hex(&image), "--retries", "0"])
            .env_remove("SSL_CERT_FILE")
            .env_remove("SSL_CERT_DIR");
        if let Some(p) = env_ca {
            cmd.env("SSL_CERT_FILE", p);
        }
        if let Some(p) = flag_ca {
            cmd.arg("--ca").arg(p);
        }
        let out = cmd.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text, fs::read(&target).unwrap())
    };
    for (how, env_ca, flag_ca) in [("store", Some(&ca), None), ("--ca", None, Some(&ca))] {
        let (ok, text, got) = write(env_ca.map(|p| p.as_path()), flag_ca.map(|p| p.as_path()));
        assert!(ok && text.contains("verified"), "{how}: {text}");
        assert!(got[..image.len()] == image[..], "{how}");
    }
    let (ok, text, got) = write(None, None);
    assert!(!ok, "an unknown CA was trusted: {text}");
    assert!(
        text.contains(&url) && text.to_lowercase().contains("certificate"),
        "{text}"
    );
    assert!(got[..MIB].iter().all(|b| *b == 0) && got[got.len() - MIB..].iter().all(|b| *b == 0));
}

/// A host provisioned from an https image server with a private CA: the coordinator sends the
/// CA given with `--image-ca` in the image command, and the agent (which has no store of its
/// own to find it in) trusts it for that download.
#[test]
fn images_from_an_https_server_with_a_private_ca_are_provisioned_with_image_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, server, image) = HttpsServer::with_image(dir.path());
    let c = Coordinator::start(dir.path(), &["--image-ca", &ca.display().to_string()]);
    let disk = LoopDevice::new(&dir.path().join("disk.raw"), 16 * MIB as u64);
    let doc = format!(
        "apiVersion: metal3.io/v1alpha1\nkind: BareMetalHost\nmetadata:\n  name: worker-tls\nspec:\n  online: true\n  image:\n    url: https://127.0.0.1:{}/os.img\n    checksum: {}\n  rootDeviceHints:\n    deviceName: {}\n",
        server.1,
        sha256_hex(&image),
        disk.path.display()
    );
    fs::write(c.hosts.join("worker-tls.yaml"), doc).unwrap();
    c.wait_state("worker-tls", "inspecting", Duration::from_secs(10));
    let token = c.token("worker-tls", "10m");
    // No SSL_CERT_FILE: the CA can only come from the command.
    let _agent = Agent::start(&c, &token, &disk.path, &dir.path().join("agent"), &[]);
    c.wait_state("worker-tls", "provisioned", Duration::from_secs(60));
    assert!(disk.read(image.len()) == image);
}
