//! Leader election in Kubernetes mode: several replicas of `slipway serve --kube`, one active.
//!
//! The replicas contend for a `coordination.k8s.io/v1` Lease ([`LEASE_NAME`] in the
//! coordinator's namespace) through kube-lease-manager (server-side apply, so two replicas
//! never both hold it). A replica that does not hold it waits before doing anything else: it
//! reads no hosts, writes nothing and listens on no port, so agents (and a Service whose
//! readiness probe checks the agent port) reach only the leader, and an agent whose
//! coordinator died reconnects until the new leader answers. The leader renews the Lease;
//! if it ever loses it (the API server unreachable for longer than the Lease lasts, or
//! another replica took over) it exits at once, so that two leaders never write the same
//! hosts, and its restart joins as a follower. A follower takes over once the Lease expires:
//! within the Lease duration of the leader's last renewal.

use std::time::Duration;

use anyhow::Context;
use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tracing::{error, info};

/// The Lease the replicas contend for.
pub const LEASE_NAME: &str = "slipway-coordinator";

/// This replica's name in the Lease: the pod's name (downward API `POD_NAME`), else the
/// machine's host name, with the process id (two processes on one machine are two
/// replicas).
pub fn identity() -> String {
    let host = std::env::var("POD_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "slipway".into());
    format!("{host}-{}", std::process::id())
}

/// The period before the Lease expires in which the leader renews it: a third of the
/// duration, at least a second.
pub fn renew_grace(duration: Duration) -> u64 {
    (duration.as_secs() / 3).max(1)
}

/// Waits until this replica holds the Lease, then keeps it in the background; exits the
/// process if it is lost.
pub async fn lead(client: Client, namespace: &str, duration: Duration) -> anyhow::Result<()> {
    let identity = identity();
    let lease = format!("{namespace}/{LEASE_NAME}");
    let manager = LeaseManagerBuilder::new(client, LEASE_NAME)
        .with_namespace(namespace)
        .with_identity(identity.clone())
        .with_duration(duration.as_secs().max(2))
        .with_grace(renew_grace(duration))
        .with_field_manager("slipway")
        .build()
        .await
        .with_context(|| {
            format!(
                "cannot use the leader Lease {lease}: the coordinator's service account needs \
                 get, create and patch on leases in {namespace}"
            )
        })?;
    let (mut leading, task) = manager.watch().await;
    if !*leading.borrow_and_update() {
        info!(%identity, %lease, "waiting to become the leader");
    }
    while !*leading.borrow_and_update() {
        leading
            .changed()
            .await
            .with_context(|| format!("leader election on {lease} stopped"))?;
    }
    info!(%identity, %lease, "this replica is the leader");
    tokio::spawn(async move {
        // The receiver stays alive as long as the process: dropping it releases the Lease.
        let _task = task;
        loop {
            let lost = match leading.changed().await {
                Ok(()) => !*leading.borrow_and_update(),
                Err(_) => true,
            };
            if lost {
                error!(
                    %identity, %lease,
                    "lost the leader Lease: exiting so that only the new leader acts; a restart \
                     joins as a follower"
                );
                std::process::exit(3);
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_leader_renews_well_before_its_lease_expires() {
        assert_eq!(renew_grace(Duration::from_secs(15)), 5);
        assert_eq!(renew_grace(Duration::from_secs(2)), 1);
        assert!(identity().ends_with(&format!("-{}", std::process::id())));
    }
}
