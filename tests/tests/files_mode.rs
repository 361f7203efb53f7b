//! The hosts directory: bad documents get clear errors naming file and field, other hosts keep
//! working, and added, changed and removed files are noticed while the coordinator runs.

use std::fs;
use std::time::Duration;

use slipway_tests::{Agent, Coordinator, pattern, sha256_hex, write_host};

#[test]
fn bad_documents_are_reported_and_other_hosts_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    fs::create_dir_all(&hosts).unwrap();
    fs::write(
        hosts.join("broken.yaml"),
        "apiVersion: metal3.io/v1alpha1\nkind: BareMetalHost\nmetadata: {name: broken\nspec: {}\n",
    )
    .unwrap();
    fs::write(
        hosts.join("typo.yaml"),
        "apiVersion: metal3.io/v1alpha1\nkind: BareMetalHost\nmetadata:\n  name: typo\nspec:\n  online: true\n  image:\n    url: http://x/y\n    checksumTyp: sha256\n",
    )
    .unwrap();
    let c = Coordinator::start(dir.path(), &[]);

    // A good host declared next to them is provisioned.
    let image = pattern(2 << 20, 5);
    fs::write(c.images.join("os.img"), &image).unwrap();
    let disk = dir.path().join("good.disk");
    fs::write(&disk, vec![0u8; 8 << 20]).unwrap();
    write_host(
        &c.hosts,
        "good",
        &c.image_url("os.img"),
        &sha256_hex(&image),
        &disk.display().to_string(),
    );
    c.wait_state("good", "inspecting", Duration::from_secs(10));
    let mut agent = Agent::start(
        &c,
        &c.token("good", "10m"),
        &disk,
        &dir.path().join("agent"),
        &[],
    );
    c.wait_state("good", "provisioned", Duration::from_secs(60));
    assert!(agent.wait_exit(Duration::from_secs(20)));

    let out = c.cli(&["get", "hosts"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stdout.contains("typo") && !stdout.contains("broken"),
        "{stdout}"
    );
    assert!(
        stderr.contains(
            "typo.yaml: document 1 (host typo): spec.image.checksumTyp: unknown field `checksumTyp`"
        ),
        "names file, document, host and field: {stderr}"
    );
    assert!(
        stderr.contains("broken.yaml: document 1: not valid YAML"),
        "{stderr}"
    );
    let log = c.log_text();
    assert!(
        log.contains("spec.image.checksumTyp: unknown field"),
        "the coordinator logs it too"
    );

    // Fixing the typo brings the host in.
    fs::write(
        hosts.join("typo.yaml"),
        "apiVersion: metal3.io/v1alpha1\nkind: BareMetalHost\nmetadata:\n  name: typo\nspec:\n  online: true\n",
    )
    .unwrap();
    c.wait_state("typo", "inspecting", Duration::from_secs(10));
    let out = c.cli(&["get", "hosts"]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("typo.yaml"));
}

#[test]
fn a_broken_edit_keeps_the_host_and_removal_deletes_it() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(dir.path(), &[]);
    let image = pattern(1 << 20, 6);
    write_host(
        &c.hosts,
        "h",
        "http://127.0.0.1:1/none.img",
        &sha256_hex(&image),
        "/dev/null-disk",
    );
    c.wait_state("h", "inspecting", Duration::from_secs(10));

    // An edit that no longer parses: the host stays, with its last good spec, and the problem
    // is reported.
    let path = c.hosts.join("h.yaml");
    let good = fs::read_to_string(&path).unwrap();
    fs::write(
        &path,
        good.replace("online: true", "online: true\n  onlin: false"),
    )
    .unwrap();
    let problem = slipway_tests::wait_until(Duration::from_secs(10), "the problem to show", || {
        let out = c.cli(&["get", "hosts"]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        err.contains("unknown field `onlin`").then_some(err)
    });
    assert!(
        problem.contains("the last good version stays in effect"),
        "{problem}"
    );
    assert_eq!(c.host("h").unwrap()["spec"]["online"], true);

    // A semantic problem that parses: the host shows a registration error naming the field.
    fs::write(
        &path,
        good.replace("online: true", "online: true\n  bootMACAddress: not-a-mac"),
    )
    .unwrap();
    let h = c.wait_host("h", Duration::from_secs(10), "in registration error", |h| {
        h["status"]["errorType"] == "registration error"
    });
    assert!(
        h["status"]["errorMessage"]
            .as_str()
            .unwrap()
            .starts_with("spec.bootMACAddress:"),
        "{h}"
    );

    // Removing the file deletes the host.
    fs::remove_file(&path).unwrap();
    slipway_tests::wait_until(Duration::from_secs(10), "the host to be removed", || {
        c.host("h").is_none().then_some(())
    });
    assert!(c.log_text().contains("host removed"));
}
