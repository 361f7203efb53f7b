//! Boot decisions (what a machine asking by MAC gets), discovered machines, and bootstrap
//! tokens.

use jiff::{SignedDuration, Timestamp};
use slipway_reconcile::host::{
    API_VERSION, BareMetalHost, HostKey, HostSpec, HostStatus, KIND, OperationalStatus,
    ProvisioningState,
};
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::Engine;
use super::host::{Act, Entry, Reply};
use super::msg::{BootDecision, DISCOVERED, UnknownHosts};
use crate::state::{HostRecord, TokenRecord};
use crate::tokens::{self, TokenSecret};

impl Engine {
    pub(super) fn boot(&mut self, mac: &str, reply: oneshot::Sender<BootDecision>, now: Timestamp) {
        let decision = self.decide_boot(mac, now);
        let mac = crate::log::escape(mac);
        match &decision {
            BootDecision::Ramdisk { host, .. } => {
                info!(host = %host, mac = %mac, "boot: serving the ramdisk")
            }
            BootDecision::LocalDisk { host, .. } => {
                info!(host = %host, mac = %mac, "boot: local disk")
            }
            BootDecision::Refuse(reason) => {
                warn!(mac = %mac, "boot refused: {}", crate::log::escape(reason))
            }
        }
        match &decision {
            // The token (and a discovered host) must be stored before the script is answered.
            BootDecision::Ramdisk { host, .. } => {
                let host = host.clone();
                self.hold_or_act(&host, Act::Reply(Reply::Boot(reply, decision)));
            }
            _ => {
                let _ = reply.send(decision);
            }
        }
    }

    /// Decides how the machine with `mac` boots.
    fn decide_boot(&mut self, mac: &str, now: Timestamp) -> BootDecision {
        let Some(mac) = crate::boot::normalize_mac(mac) else {
            return BootDecision::Refuse(format!("{mac:?} is not a MAC address"));
        };
        let found = self.macs.get(&mac).and_then(|keys| {
            keys.iter()
                .filter_map(|k| self.hosts.get(k).map(|e| (k, e)))
                .find(|(_, e)| !e.record.deleted && !e.forgotten)
                .map(|(k, e)| (k.clone(), e.state()))
        });
        let host = match found {
            Some((key, state)) => {
                use ProvisioningState as S;
                match state {
                    S::Provisioned | S::ExternallyProvisioned => {
                        return BootDecision::LocalDisk {
                            host: key,
                            state: state.to_string(),
                        };
                    }
                    S::PoweringOffBeforeDelete | S::Deleting => {
                        return BootDecision::Refuse(format!("host {key} is being deleted"));
                    }
                    _ => key,
                }
            }
            None => match self.settings.unknown_hosts {
                UnknownHosts::Refuse => {
                    return BootDecision::Refuse(format!(
                        "no host has bootMACAddress {mac}: declare one, or run slipway serve \
                         --unknown-hosts discover"
                    ));
                }
                UnknownHosts::Discover => self.discovered(&mac, now),
            },
        };
        match self.create_token(&host, self.settings.boot_token_ttl, now) {
            Ok((token, _)) => {
                self.event(
                    &host,
                    false,
                    "BootRamdisk",
                    format!("{mac} asked how to boot: sent the Slipway ramdisk"),
                );
                BootDecision::Ramdisk { host, token, mac }
            }
            Err(e) => BootDecision::Refuse(e),
        }
    }

    /// The record of an undeclared machine, created on its first boot.
    fn discovered(&mut self, mac: &str, now: Timestamp) -> HostKey {
        let key = HostKey::default_ns(format!("discovered-{}", mac.replace(':', "")));
        if self.hosts.get(&key).is_none_or(|e| e.forgotten) {
            info!(host = %key, mac = %mac, "an undeclared machine booted: registering it as discovered");
            let mut host = BareMetalHost {
                api_version: API_VERSION.into(),
                kind: KIND.into(),
                spec: HostSpec {
                    boot_mac_address: Some(mac.to_string()),
                    online: true,
                    ..Default::default()
                },
                ..Default::default()
            };
            host.metadata.name = key.name.clone();
            host.metadata.namespace = Some(key.namespace.clone());
            host.metadata.creation_timestamp = Some(now);
            let mut status = HostStatus::default();
            status.provisioning.state = ProvisioningState::Unmanaged;
            status.operational_status = OperationalStatus::Discovered;
            status.last_updated = Some(now);
            let record = HostRecord {
                host,
                origin: DISCOVERED.into(),
                ..Default::default()
            };
            let mut entry = Entry::new(record, status, now);
            entry.pending.remove = self.hosts.contains_key(&key);
            entry.pending.record = true;
            entry.pending.status = true;
            self.add_entry(&key, entry);
            self.unsaved.insert(key.clone());
        }
        key
    }

    pub(super) fn create_token(
        &mut self,
        host: &HostKey,
        ttl: SignedDuration,
        now: Timestamp,
    ) -> Result<(TokenSecret, Timestamp), String> {
        let Some(entry) = self
            .hosts
            .get_mut(host)
            .filter(|e| !e.record.deleted && !e.forgotten)
        else {
            return Err(format!(
                "host {host} is not declared; add it to the hosts directory first"
            ));
        };
        let secret = tokens::generate().map_err(|e| format!("cannot generate a token: {e}"))?;
        let expires_at = now.checked_add(ttl).unwrap_or(Timestamp::MAX);
        let hash = secret.hash();
        let record = TokenRecord {
            host: host.clone(),
            created_at: now,
            expires_at,
            used_at: None,
            used_by: None,
        };
        entry
            .pending
            .tokens
            .push((hash.clone(), Some(record.clone())));
        self.unsaved.insert(host.clone());
        self.tokens.insert(hash.clone(), record);
        self.tokens_by_host
            .entry(host.clone())
            .or_default()
            .insert(hash);
        info!(host = %host, expires = %expires_at, token = %secret.fingerprint(), "bootstrap token created");
        Ok((secret, expires_at))
    }

    /// Tokens expired for a day are of no more use, not even for a clear refusal.
    pub(super) fn sweep_tokens(&mut self, now: Timestamp) {
        let cutoff = now
            .checked_sub(SignedDuration::from_hours(24))
            .unwrap_or(Timestamp::MIN);
        let stale: Vec<(String, HostKey)> = self
            .tokens
            .iter()
            .filter(|(_, t)| t.expires_at < cutoff)
            .map(|(k, t)| (k.clone(), t.host.clone()))
            .collect();
        for (hash, host) in stale {
            self.tokens.remove(&hash);
            if let Some(set) = self.tokens_by_host.get_mut(&host) {
                set.remove(&hash);
            }
            if let Some(e) = self.hosts.get_mut(&host).filter(|e| !e.forgotten) {
                e.pending.tokens.push((hash, None));
                self.unsaved.insert(host);
            }
        }
    }
}
