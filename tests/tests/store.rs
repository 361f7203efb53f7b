//! The store fails loud and recovers: a full state filesystem is reported with the path and
//! the cause, nothing is acted on while it lasts, and the coordinator resumes by itself once
//! space returns; a zero-byte store refuses to start, naming the file and the way out.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use slipway_tests::{Coordinator, run_tool, run_tool_code, write_doc};

const HOST: &str = "apiVersion: metal3.io/v1alpha1\nkind: BareMetalHost\nmetadata:\n  name: NAME\nspec:\n  online: true\n  bootMACAddress: {{mac}}\n";

fn host(name: &str, mac: &str) -> String {
    HOST.replace("NAME", name).replace("{{mac}}", mac)
}

/// A small tmpfs mounted for the test, unmounted when dropped. Needs root.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(at).unwrap();
        run_tool(&[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size}"),
            "tmpfs",
            &at.display().to_string(),
        ]);
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = run_tool_code(&["umount", "-l", &self.0.display().to_string()]);
    }
}

/// Fills the filesystem of `path` with a file until it is full.
fn fill(path: &Path) {
    let mut f = fs::File::create(path).unwrap();
    let chunk = vec![0x5au8; 256 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
}

#[test]
fn a_full_state_filesystem_is_reported_and_writes_resume_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let _fs = Tmpfs::mount(&dir.path().join("state"), "32m");
    let mut c = Coordinator::start(dir.path(), &[]);
    write_doc(&c.hosts, "a.yaml", &host("a", "52:54:00:00:01:01"));
    c.wait_state("a", "inspecting", Duration::from_secs(10));

    let filler = c.state.join("filler");
    fill(&filler);
    write_doc(&c.hosts, "b.yaml", &host("b", "52:54:00:00:01:02"));
    let log = c.wait_log("cannot store the state", Duration::from_secs(20));
    assert!(
        log.contains("No space left on device") && log.contains("slipway.redb"),
        "the log names the file and the cause:\n{log}"
    );
    // The CLI still answers, from the view.
    assert!(c.host("b").is_some());
    // A boot answer depends on a token that cannot be stored: refused, with the reason.
    let (_, script) =
        slipway_tests::http_get(&format!("{}/boot/ipxe?mac=52:54:00:00:01:02", c.http_url()));
    assert!(
        script.contains("cannot store state") && !script.contains("slipway.token="),
        "{script}"
    );

    fs::remove_file(&filler).unwrap();
    c.wait_log("the store accepts writes again", Duration::from_secs(30));
    // What was planned during the outage is durable now: it survives a restart.
    c.restart();
    let b = c.wait_state("b", "inspecting", Duration::from_secs(20));
    assert_eq!(b["status"]["errorCount"], 0);
}

#[test]
fn a_zero_byte_store_refuses_to_start_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    fs::create_dir_all(&state).unwrap();
    fs::write(state.join("slipway.redb"), b"").unwrap();
    fs::create_dir_all(dir.path().join("hosts")).unwrap();
    let hosts = dir.path().join("hosts");
    let out = slipway_tests::slipway(&[
        "--state".as_ref(),
        state.as_os_str(),
        "serve".as_ref(),
        "--hosts".as_ref(),
        hosts.as_os_str(),
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--http-listen".as_ref(),
        "127.0.0.1:0".as_ref(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("slipway.redb") && err.contains("empty (0 bytes)") && err.contains("backup"),
        "{err}"
    );
    assert_eq!(fs::metadata(state.join("slipway.redb")).unwrap().len(), 0);
}
