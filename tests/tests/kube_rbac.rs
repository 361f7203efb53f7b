//! deploy/ as an operator applies it, and the coordinator run with exactly its RBAC: the
//! service account's token, no more. A host goes through its whole life (inspection,
//! provisioning, the finalizer's deprovisioning, a discovered machine, leader election);
//! any call the role does not allow shows in the coordinator's log and fails the test.

use std::fs;
use std::path::Path;
use std::time::Duration;

use slipway_tests::kube::{KubeCluster, SERVICE_ACCOUNT_NAMESPACE};
use slipway_tests::{Agent, Coordinator, pattern, run_tool, sha256_hex, wait_until};

const MIB: u64 = 1 << 20;

fn deploy_dir() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .display()
        .to_string()
}

fn state(k: &KubeCluster, name: &str) -> String {
    let out = k.kubectl(&[
        "get",
        "bmh",
        name,
        "-o",
        "jsonpath={.status.provisioning.state}",
    ]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_state(k: &KubeCluster, c: &Coordinator, name: &str, want: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while state(k, name) != want {
        assert!(
            std::time::Instant::now() < deadline,
            "{name} never {want}:\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_coordinator_runs_with_exactly_the_rbac_of_deploy() {
    let k = KubeCluster::start();
    if k.is_external() {
        // deploy/ names cluster-wide objects (ClusterRole slipway, namespace slipway-system):
        // applying them to a cluster that may run Slipway already would change it.
        eprintln!("skipped on an existing cluster (KUBECONFIG): deploy/'s RBAC is cluster-wide");
        return;
    }
    // Everything but the workload (this API server runs no pods): the namespace, the CRDs,
    // the service account and its roles, as `kubectl apply -k deploy/` makes them.
    let rendered = k.kubectl_ok(&["kustomize", &deploy_dir()]);
    let docs: Vec<&str> = rendered
        .split("\n---\n")
        .filter(|d| !d.contains("kind: Deployment") && !d.contains("kind: Service\n"))
        .collect();
    assert!(docs.len() >= 7, "{rendered}");
    k.apply_yaml(&docs.join("\n---\n"));
    // The workload is valid for the API server too.
    let out = k.kubectl(&["apply", "--dry-run=server", "-k", &deploy_dir()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for crd in ["baremetalhosts.metal3.io", "hardwaredata.metal3.io"] {
        k.kubectl_ok(&[
            "wait",
            "--for",
            "condition=established",
            "--timeout",
            "60s",
            &format!("crd/{crd}"),
        ]);
    }
    // What the role does not give, the service account cannot do: the test could fail.
    for (verb, what) in [
        ("delete", "nodes"),
        ("create", "pods"),
        ("list", "configmaps"),
        ("update", "baremetalhosts.metal3.io"),
        ("create", "leases.coordination.k8s.io"),
    ] {
        let mut args = vec!["auth", "can-i", verb, what];
        if what.starts_with("leases") {
            args.extend(["-n", k.namespace()]);
        }
        let out = k.kubectl_as_service_account(&args);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "no",
            "{verb} {what}"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let sa = k.service_account_kubeconfig().to_str().unwrap().to_string();
    let c = Coordinator::start_with_env(
        dir.path(),
        &[
            "--kube",
            "--namespace",
            SERVICE_ACCOUNT_NAMESPACE,
            "--unknown-hosts",
            "discover",
        ],
        &[
            ("KUBECONFIG", sa.as_str()),
            ("RUST_LOG", "info,slipway_coordinator=debug"),
        ],
    );
    // A host with BMC credentials and user data Secrets, provisioned and deleted.
    let image_path = c.images.join("os.img");
    fs::File::create(&image_path)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    run_tool(&[
        "sgdisk",
        "-o",
        "-n1:2048:+4M",
        &image_path.display().to_string(),
    ]);
    let image = fs::read(&image_path).unwrap();
    let disk = dir.path().join("disk.img");
    fs::write(&disk, pattern(32 * MIB as usize, 5)).unwrap();
    k.apply_yaml(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: bmc\nstringData:\n  username: admin\n  password: s3cret\n---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: ud\nstringData:\n  userData: \"#cloud-config\\n\"\n---\napiVersion: metal3.io/v1alpha1\nkind: BareMetalHost\nmetadata:\n  name: w\nspec:\n  online: true\n  bmc:\n    address: ipmi://127.0.0.1:6230\n    credentialsName: bmc\n  userData:\n    name: ud\n  image:\n    url: {}\n    checksum: {}\n    checksumType: sha256\n    format: raw\n  rootDeviceHints:\n    deviceName: {}\n",
        c.image_url("os.img"),
        sha256_hex(&image),
        disk.display()
    ));
    wait_state(&k, &c, "w", "inspecting");
    let key = format!("{}/w", k.namespace());
    let state_dir = dir.path().join("agent");
    let mut agent = Agent::start(&c, &c.token(&key, "10m"), &disk, &state_dir, &[]);
    wait_state(&k, &c, "w", "provisioned");
    assert!(
        agent.wait_exit(Duration::from_secs(20)),
        "{}",
        agent.log_text()
    );
    k.kubectl_ok(&["get", "hardwaredata", "w"]);
    let hd = c.cli(&["get", "hardwaredata", &key]);
    assert!(
        hd.status.success(),
        "{}",
        String::from_utf8_lossy(&hd.stderr)
    );
    // A discovered machine: its object is created, then forgotten when deleted.
    let (code, _) =
        slipway_tests::http_get(&format!("{}/boot/ipxe?mac=52:54:00:99:88:77", c.http_url()));
    assert_eq!(code, 200);
    wait_until(
        Duration::from_secs(30),
        "the discovered host's object",
        || {
            k.kubectl(&["get", "bmh", "-n", "default", "discovered-525400998877"])
                .status
                .success()
                .then_some(())
        },
    );
    k.kubectl_ok(&["delete", "bmh", "-n", "default", "discovered-525400998877"]);
    // Delete: deprovisioned with its agent, then the finalizer goes.
    k.kubectl_ok(&["delete", "bmh", "w", "--wait=false"]);
    wait_state(&k, &c, "w", "deprovisioning");
    let mut agent = Agent::start(&c, "unused", &disk, &state_dir, &[]);
    wait_until(Duration::from_secs(120), "the host gone", || {
        let out = k.kubectl(&["get", "bmh", "w", "--ignore-not-found", "-o", "name"]);
        out.stdout.is_empty().then_some(())
    });
    assert!(
        agent.wait_exit(Duration::from_secs(20)),
        "{}",
        agent.log_text()
    );

    let log = c.log_text();
    for word in ["forbidden", "Forbidden", "403"] {
        assert!(!log.contains(word), "a call RBAC refused ({word}):\n{log}");
    }
    let lease = k.kubectl_ok(&[
        "get",
        "lease",
        "-n",
        SERVICE_ACCOUNT_NAMESPACE,
        "slipway-coordinator",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    assert!(!lease.is_empty());
}
