//! metal3's own example manifests (`tests/fixtures/metal3/`, copied unchanged from
//! baremetal-operator) applied to a coordinator in files mode: each host reaches the state
//! metal3 documents for it, or says in plain words why not.

use std::fs;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use slipway_tests::{Agent, Coordinator, write_doc};

fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/metal3")
        .join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn error_of(h: &Value) -> String {
    h["status"]["errorMessage"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[test]
fn example_host_registers_and_inspects_to_available_with_a_real_agent() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(dir.path(), &[]);
    write_doc(&c.hosts, "example-host.yaml", &fixture("example-host.yaml"));
    let h = c.wait_state(
        "example-baremetalhost",
        "inspecting",
        Duration::from_secs(20),
    );
    assert!(h["status"]["errorType"].is_null(), "{h}");
    // Its machine boots the ramdisk (no BMC driver yet: by hand, here an agent process).
    let disk = dir.path().join("disk.img");
    fs::File::create(&disk).unwrap().set_len(16 << 20).unwrap();
    let token = c.token("example-baremetalhost", "10m");
    let _agent = Agent::start(&c, &token, &disk, &dir.path().join("agent"), &[]);
    let h = c.wait_state(
        "example-baremetalhost",
        "available",
        Duration::from_secs(120),
    );
    assert!(
        h["status"]["hardware"]["storage"]
            .as_array()
            .is_some_and(|s| !s.is_empty())
    );
    assert_eq!(h["status"]["poweredOn"], true);
}

#[test]
fn bad_credentials_are_a_registration_error_that_clears_when_the_secret_is_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(dir.path(), &[]);
    write_doc(
        &c.hosts,
        "bad.yaml",
        &fixture("example-host-bad-credentials.yaml"),
    );
    let h = c.wait_host(
        "example-baremetalhost",
        Duration::from_secs(20),
        "a registration error",
        |h| h["status"]["errorType"] == "registration error",
    );
    let message = error_of(&h);
    assert!(
        message.contains("example-baremetalhost-secret-no-password")
            && message.contains("password"),
        "{message}"
    );
    assert_eq!(h["status"]["provisioning"]["state"], "registering");
    // A missing Secret is one too, naming it.
    write_doc(
        &c.hosts,
        "bad.yaml",
        &fixture("example-host-bad-credentials.yaml").replace(
            "credentialsName: example-baremetalhost-secret-no-password",
            "credentialsName: nowhere",
        ),
    );
    c.wait_host(
        "example-baremetalhost",
        Duration::from_secs(20),
        "the missing Secret",
        |h| error_of(h).contains("\"nowhere\"") && error_of(h).contains("does not exist"),
    );
    // The Secret is fixed: the host registers by itself.
    write_doc(
        &c.hosts,
        "secret.yaml",
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: nowhere\nstringData:\n  username: admin\n  password: s3cret\n",
    );
    let h = c.wait_state(
        "example-baremetalhost",
        "inspecting",
        Duration::from_secs(20),
    );
    assert!(h["status"]["errorType"].is_null(), "{h}");
    // The password is nowhere in what clients read.
    let all = String::from_utf8(c.cli(&["get", "hosts", "-o", "json"]).stdout).unwrap();
    assert!(!all.contains("s3cret"));
}

#[test]
fn worker_0_with_a_libvirt_bmc_registers() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(dir.path(), &[]);
    write_doc(&c.hosts, "worker-0.yaml", &fixture("worker-0.yaml"));
    // libvirt:// is IPMI underneath (virtualbmc): accepted. Its image is on a network this
    // machine may not reach, so no agent is started; it waits, registered, for its machine.
    let h = c.wait_state("worker-0", "inspecting", Duration::from_secs(20));
    assert!(h["status"]["errorType"].is_null(), "{h}");
    assert_eq!(h["spec"]["bootMACAddress"], "00:1a:74:74:e5:cb");
}

#[test]
fn demo_hosts_register_and_their_shared_mac_and_bmc_are_errors_on_each() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(dir.path(), &[]);
    write_doc(&c.hosts, "demo-hosts.yaml", &fixture("demo-hosts.yaml"));
    for name in [
        "demo-discovered",
        "demo-registering",
        "demo-available",
        "demo-inspecting",
    ] {
        let h = c.wait_state(name, "inspecting", Duration::from_secs(20));
        assert!(h["status"]["errorType"].is_null(), "{name}: {h}");
    }
    // Two hosts name the BMC at 192.168.122.1:6233.
    for (name, other) in [
        ("demo-externally-provisioned", "demo-registration-error"),
        ("demo-registration-error", "demo-externally-provisioned"),
    ] {
        let h = c.wait_host(name, Duration::from_secs(20), "a BMC conflict", |h| {
            h["status"]["errorType"] == "registration error"
        });
        let m = error_of(&h);
        assert!(
            m.contains("spec.bmc.address") && m.contains(other),
            "{name}: {m}"
        );
    }
    // Three hosts name boot MAC 00:c6:14:04:61:b2 (two of them one BMC too).
    for name in [
        "demo-provisioning",
        "demo-provisioned",
        "demo-validation-error",
    ] {
        let h = c.wait_host(name, Duration::from_secs(20), "a MAC conflict", |h| {
            h["status"]["errorType"] == "registration error"
        });
        let m = error_of(&h);
        assert!(
            m.contains("spec.bootMACAddress") && m.contains("00:c6:14:04:61:b2"),
            "{name}: {m}"
        );
        assert_eq!(
            h["status"]["provisioning"]["state"], "registering",
            "{name}"
        );
    }
    let m = error_of(&c.host("demo-provisioned").unwrap());
    assert!(
        m.contains("spec.bmc.address") && m.contains("demo-validation-error"),
        "{m}"
    );
    // The Machine document is another API's: ignored, with a warning.
    let out = c.cli(&["get", "hosts"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("kind Machine is not used by Slipway"), "{err}");
}

#[test]
fn the_crd_sample_with_its_placeholder_field_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(dir.path(), &[]);
    write_doc(
        &c.hosts,
        "sample.yaml",
        &fixture("metal3.io_v1alpha1_baremetalhost.yaml"),
    );
    // `foo: bar` (the scaffold's placeholder) would be pruned by an API server; Slipway's files
    // mode refuses unknown fields, so a typo never drops an intent, and names it.
    let start = std::time::Instant::now();
    let err = loop {
        let out = c.cli(&["describe", "host", "baremetalhost-sample"]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        if err.contains("foo") || start.elapsed() > Duration::from_secs(20) {
            break err;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        err.contains("sample.yaml") && err.contains("spec.foo"),
        "{err}"
    );
}
