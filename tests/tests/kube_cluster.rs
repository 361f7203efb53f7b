//! The Kubernetes test harness itself, against a real API server: our own kube-apiserver 1.20.2
//! (`cargo xtask kube-apiserver`), or the cluster of `KUBECONFIG`.

use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use slipway_tests::kube::{
    KubeCluster, SERVICE_ACCOUNT_NAME, SERVICE_ACCOUNT_NAMESPACE, SERVICE_ACCOUNT_USER, TEST_LABEL,
};
use slipway_tests::wait_until;

#[test]
fn the_cluster_starts_answers_and_is_gone_after_drop() {
    let cluster = KubeCluster::start();
    eprintln!(
        "cluster ready in {:.1} s ({})",
        cluster.startup_time().as_secs_f64(),
        if cluster.is_external() {
            "existing cluster"
        } else {
            "own etcd and kube-apiserver"
        }
    );
    let namespaces = cluster.kubectl_ok(&["get", "ns", "-o", "name"]);
    for ns in ["default", "kube-system", cluster.namespace()] {
        assert!(
            namespaces.lines().any(|l| l == format!("namespace/{ns}")),
            "namespace {ns} missing from `kubectl get ns`:\n{namespaces}"
        );
    }
    // The kubeconfig's default namespace is the test's.
    let context_ns =
        cluster.kubectl_ok(&["config", "view", "--minify", "-o", "jsonpath={..namespace}"]);
    assert_eq!(context_ns.trim(), cluster.namespace());
    let who = cluster.kubectl_ok(&["auth", "can-i", "*", "*", "--all-namespaces"]);
    assert_eq!(
        who.trim(),
        "yes",
        "the admin kubeconfig is not cluster admin"
    );

    if cluster.is_external() {
        return;
    }
    let version = cluster.kubectl_ok(&["get", "--raw", "/version"]);
    let version: serde_json::Value = serde_json::from_str(&version).expect("/version is JSON");
    assert_eq!(version["gitVersion"], "v1.20.2", "{version}");

    // Dropping the handle leaves no process, no port and no directory behind.
    let pids = cluster.pids();
    assert_eq!(pids.len(), 2);
    let server = cluster.server();
    let addr = server.trim_start_matches("https://").to_string();
    let dir = cluster.dir().to_path_buf();
    assert!(TcpStream::connect(&addr).is_ok());
    drop(cluster);
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} still there after drop"
        );
    }
    assert!(
        TcpStream::connect(&addr).is_err(),
        "{server} still answers after drop"
    );
    assert!(!dir.exists(), "{} still there after drop", dir.display());
}

/// A small CRD of the shape of metal3's: namespaced, a status subresource, a printer column.
const WIDGET_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.kubetest.slipway.dev
spec:
  group: kubetest.slipway.dev
  names:
    kind: Widget
    listKind: WidgetList
    plural: widgets
    singular: widget
  scope: Namespaced
  versions:
  - name: v1alpha1
    served: true
    storage: true
    subresources:
      status: {}
    additionalPrinterColumns:
    - name: Phase
      type: string
      jsonPath: .status.phase
      description: where the widget is
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size:
                type: integer
          status:
            type: object
            properties:
              phase:
                type: string
"#;

#[test]
fn a_crd_is_established_and_its_status_is_a_subresource() {
    let cluster = KubeCluster::start();
    cluster.apply_yaml(WIDGET_CRD);
    cluster.kubectl_ok(&[
        "wait",
        "--for",
        "condition=established",
        "--timeout=60s",
        "crd/widgets.kubetest.slipway.dev",
    ]);
    // No namespace in the document: it lands in the test's.
    cluster.apply_yaml(
        "apiVersion: kubetest.slipway.dev/v1alpha1\nkind: Widget\nmetadata:\n  name: w1\nspec:\n  size: 3\n",
    );
    let ns = cluster.namespace();
    let phase = |c: &KubeCluster| {
        c.kubectl_ok(&[
            "-n",
            ns,
            "get",
            "widget",
            "w1",
            "-o",
            "jsonpath={.status.phase}",
        ])
    };
    assert_eq!(phase(&cluster), "", "a new widget has no status");

    cluster.kubectl_ok(&[
        "patch",
        "widget",
        "w1",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Ready"}}"#,
    ]);
    assert_eq!(phase(&cluster), "Ready");
    // With a status subresource, the main resource ignores status, and /status ignores spec.
    cluster.kubectl_ok(&[
        "patch",
        "widget",
        "w1",
        "--type=merge",
        "-p",
        r#"{"spec":{"size":4},"status":{"phase":"Broken"}}"#,
    ]);
    assert_eq!(
        phase(&cluster),
        "Ready",
        "status changed through the main resource"
    );
    let size = cluster.kubectl_ok(&["get", "widget", "w1", "-o", "jsonpath={.spec.size}"]);
    assert_eq!(size, "4");

    // The printer column, as `kubectl get` shows it.
    let table = cluster.kubectl_ok(&["get", "widgets"]);
    let mut rows = table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>());
    assert_eq!(rows.next(), Some(vec!["NAME", "PHASE"]), "{table}");
    assert_eq!(rows.next(), Some(vec!["w1", "Ready"]), "{table}");
}

#[test]
fn rbac_forbids_the_service_account_until_a_role_grants_it() {
    let cluster = KubeCluster::start();
    let list_secrets = ["get", "secrets", "--all-namespaces"];
    let out = cluster.kubectl_as_service_account(&list_secrets);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("forbidden")
            && stderr.contains(SERVICE_ACCOUNT_USER),
        "the service account listed secrets without a grant ({}): {stderr}",
        out.status
    );

    let name = format!("slipway-test-read-secrets-{}", cluster.namespace());
    cluster.apply_yaml(&format!(
        r#"apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: {name}
  labels:
    {TEST_LABEL}: {ns}
rules:
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: {name}
  labels:
    {TEST_LABEL}: {ns}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: {name}
subjects:
- kind: ServiceAccount
  name: {SERVICE_ACCOUNT_NAME}
  namespace: {SERVICE_ACCOUNT_NAMESPACE}
"#,
        ns = cluster.namespace()
    ));
    // RBAC reads bindings from its informer cache: granted within moments.
    let listed = wait_until(Duration::from_secs(30), "the grant to take effect", || {
        let out = cluster.kubectl_as_service_account(&list_secrets);
        out.status.success().then_some(out)
    });
    assert!(
        String::from_utf8_lossy(&listed.stderr).contains("No resources found")
            || !listed.stdout.is_empty(),
        "{listed:?}"
    );
    // Exactly what was granted: reading, not deleting.
    let can_delete = cluster.kubectl_as_service_account(&["auth", "can-i", "delete", "secrets"]);
    assert_eq!(String::from_utf8_lossy(&can_delete.stdout).trim(), "no");
    let can_list = cluster.kubectl_as_service_account(&["auth", "can-i", "list", "secrets", "-A"]);
    assert_eq!(String::from_utf8_lossy(&can_list.stdout).trim(), "yes");
}
