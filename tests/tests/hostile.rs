//! What a machine on the provisioning network, or a careless edit, can no longer do: forge a
//! log line, read files outside the images directory through a symlink, or delete hosts by
//! emptying their file for a moment.

use std::fs;
use std::time::Duration;

use slipway_tests::{Coordinator, http_get, write_doc};

const HOST: &str = "apiVersion: metal3.io/v1alpha1\nkind: BareMetalHost\nmetadata:\n  name: a\nspec:\n  online: true\n  bootMACAddress: 52:54:00:00:02:01\n";

#[test]
fn a_forged_log_line_stays_one_escaped_line() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(dir.path(), &[]);
    let forged =
        "2026-12-06T00:00:00.000000Z  INFO slipway_coordinator: agent enrolled host=default/victim";
    let (code, _) = http_get(&format!(
        "{}/boot/ipxe?mac=zz%0A{}%1B%5B31m",
        c.http_url(),
        forged.replace(' ', "%20")
    ));
    assert_eq!(code, 200);
    let log = c.wait_log("boot refused", Duration::from_secs(5));
    assert!(
        !log.lines().any(|l| l.starts_with(forged)),
        "a forged line was written:\n{log}"
    );
    let line = log.lines().find(|l| l.contains("boot refused")).unwrap();
    assert!(
        line.contains("zz\\n2026-12-06"),
        "escaped, on one line: {line}"
    );
    assert!(!log.contains('\u{1b}'), "no ESC reaches the log");
}

#[test]
fn a_symlink_in_the_images_directory_cannot_serve_files_outside_it() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(dir.path(), &[]);
    let key = c.state.join("pki").join("ca.key");
    assert!(key.exists());
    std::os::unix::fs::symlink(&key, c.images.join("ca.key")).unwrap();
    std::os::unix::fs::symlink(c.state.join("slipway.redb"), c.images.join("store.img")).unwrap();
    fs::write(c.images.join("ok.img"), b"fine").unwrap();
    for name in ["ca.key", "store.img"] {
        let (code, body) = http_get(&format!("{}/images/{name}", c.http_url()));
        assert_eq!(code, 403, "{name}: {body}");
        assert!(body.contains("outside the images directory"), "{body}");
        assert!(!body.contains("PRIVATE KEY"));
    }
    let (code, body) = http_get(&format!("{}/images/ok.img", c.http_url()));
    assert_eq!((code, body.as_str()), (200, "fine"));
}

#[test]
fn an_emptied_hosts_file_keeps_its_host_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(dir.path(), &[]);
    write_doc(&c.hosts, "a.yaml", HOST);
    c.wait_state("a", "inspecting", Duration::from_secs(10));
    // A non-atomic save: the file is truncated, and stays so for a few scans.
    fs::write(c.hosts.join("a.yaml"), b"").unwrap();
    std::thread::sleep(Duration::from_secs(4));
    let h = c.host("a").expect("the host is kept");
    assert_eq!(h["status"]["provisioning"]["state"], "inspecting");
    let out = c.cli(&["get", "hosts"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("a.yaml") && err.contains("empty") && err.contains("keeping the 1 host(s)"),
        "{err}"
    );
    // Deleting the file does remove it (two scans later).
    fs::remove_file(c.hosts.join("a.yaml")).unwrap();
    c.wait_log("host no longer declared", Duration::from_secs(10));
}
