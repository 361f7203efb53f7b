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
            BootDecision::Wait(reason) => {
                warn!(mac = %mac, "boot deferred: {}", crate::log::escape(reason))
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
        // A host deleted but still being cleaned boots first (its disks must be wiped before
        // anything else uses the machine); several declared hosts with the MAC boot none.
        let candidates: Vec<(HostKey, ProvisioningState, bool)> = self
            .macs
            .get(&mac)
            .map(|keys| {
                keys.iter()
                    .filter_map(|k| self.hosts.get(k).map(|e| (k, e)))
                    .filter(|(_, e)| e.in_play())
                    .map(|(k, e)| (k.clone(), e.state(), e.record.deleted))
                    .collect()
            })
            .unwrap_or_default();
        let declared: Vec<&HostKey> = candidates
            .iter()
            .filter(|(k, _, deleted)| !deleted && self.hosts.get(k).is_some_and(|e| e.declared()))
            .map(|(k, _, _)| k)
            .collect();
        let found = match candidates.iter().find(|(_, _, deleted)| *deleted) {
            Some((k, state, _)) => Some((k.clone(), *state)),
            None if declared.len() > 1 => {
                let names: Vec<String> = declared.iter().map(ToString::to_string).collect();
                return BootDecision::Refuse(format!(
                    "hosts {} all declare bootMACAddress {mac}: none of them is booted by MAC \
                     until all but one are changed",
                    names.join(", ")
                ));
            }
            None => candidates
                .iter()
                .find(|(_, _, deleted)| !deleted)
                .map(|(k, s, _)| (k.clone(), *s)),
        };
        let host = match found {
            Some((key, state)) => {
                if let Some(e) = self.hosts.get_mut(&key) {
                    e.seen_at = now;
                }
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
                UnknownHosts::Discover => match self.discovered(&mac, now) {
                    Ok(key) => key,
                    Err(why) => return BootDecision::Refuse(why),
                },
            },
        };
        match self.boot_token(&host, self.settings.boot_token_ttl, now) {
            Ok(Some((token, fresh))) => {
                if fresh {
                    self.event(
                        &host,
                        false,
                        "BootRamdisk",
                        format!("{mac} asked how to boot: sent the Slipway ramdisk"),
                    );
                }
                BootDecision::Ramdisk { host, token, mac }
            }
            Ok(None) => {
                let address = self
                    .hosts
                    .get(&host)
                    .and_then(|e| e.session.as_ref())
                    .map(|s| s.link.address.clone())
                    .unwrap_or_default();
                BootDecision::Wait(format!(
                    "host {host}'s agent is connected (from {address}); no token is given while \
                     it is. A machine that rebooted is answered once the old session has been \
                     silent for {}s",
                    super::SILENCE_LIMIT.as_secs()
                ))
            }
            Err(e) => BootDecision::Refuse(e),
        }
    }

    /// The token a boot script carries: none while the host's agent is live; the one already
    /// handed out for this boot while it is unused and valid; else a new one, revoking any
    /// other unused boot token of the host (one outstanding per host). `(token, new)`.
    fn boot_token(
        &mut self,
        host: &HostKey,
        ttl: SignedDuration,
        now: Timestamp,
    ) -> Result<Option<(TokenSecret, bool)>, String> {
        let Some(entry) = self.hosts.get(host) else {
            return Err(format!("host {host} is not declared"));
        };
        if entry.session.as_ref().is_some_and(|s| s.live(now)) {
            return Ok(None);
        }
        if let Some(t) = &entry.boot_token
            && self
                .tokens
                .get(&t.hash())
                .is_some_and(|r| r.used_at.is_none() && r.expires_at > now)
        {
            return Ok(Some((t.clone(), false)));
        }
        let stale: Vec<String> = self
            .tokens_by_host
            .get(host)
            .map(|hashes| {
                hashes
                    .iter()
                    .filter(|h| {
                        self.tokens
                            .get(*h)
                            .is_some_and(|r| r.boot && r.used_at.is_none())
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let (token, _) = self.mint(host, ttl, true, now)?;
        for hash in stale {
            self.tokens.remove(&hash);
            if let Some(set) = self.tokens_by_host.get_mut(host) {
                set.remove(&hash);
            }
            if let Some(e) = self.hosts.get_mut(host) {
                e.pending.tokens.push((hash, None));
            }
        }
        if let Some(e) = self.hosts.get_mut(host) {
            e.boot_token = Some(token.clone());
        }
        Ok(Some((token, true)))
    }

    /// The token of a boot by virtual media (`slipway boot iso`): the host's one outstanding
    /// boot token, refused while its agent is connected.
    pub(super) fn iso_token(
        &mut self,
        host: &HostKey,
        ttl: SignedDuration,
        now: Timestamp,
    ) -> Result<(TokenSecret, Timestamp), String> {
        if self.hosts.get(host).is_none_or(|e| !e.in_play()) {
            return Err(format!("host {host} is not declared"));
        }
        match self.boot_token(host, ttl, now)? {
            Some((token, fresh)) => {
                let expires_at = self.tokens.get(&token.hash()).map_or(now, |r| r.expires_at);
                if fresh {
                    self.event(
                        host,
                        false,
                        "BootIso",
                        "a virtual-media ISO of the Slipway ramdisk was made for the host".into(),
                    );
                }
                Ok((token, expires_at))
            }
            None => Err(format!(
                "host {host}'s agent is connected; no boot token is given while it is (it is \
                 given once the session has been silent for {}s)",
                super::SILENCE_LIMIT.as_secs()
            )),
        }
    }

    /// The discovered hosts still kept, oldest seen first.
    fn discovered_hosts(&mut self) -> Vec<HostKey> {
        let hosts = &self.hosts;
        self.discovered.retain(|k| {
            hosts
                .get(k)
                .is_some_and(|e| !e.forgotten && !e.record.deleted)
        });
        let mut keys: Vec<HostKey> = self.discovered.iter().cloned().collect();
        keys.sort_by_key(|k| self.hosts.get(k).map(|e| e.seen_at));
        keys
    }

    /// Removes a discovered host, with its record, tokens and certificate.
    pub(super) fn drop_discovered(&mut self, key: &HostKey, why: &str) {
        let Some(e) = self.hosts.get_mut(key) else {
            return;
        };
        info!(host = %key, "removing the discovered host: {why}");
        std::sync::Arc::make_mut(&mut e.record).deleted = true;
        e.pending.record = true;
        self.discovered.remove(key);
        self.unsaved.insert(key.clone());
        self.to_plan.insert(key.clone());
        self.view_dirty.insert(key.clone());
    }

    /// `slipway delete host`: only discovered hosts; declared ones go with their document.
    pub(super) fn delete_discovered(&mut self, key: &HostKey) -> Result<String, String> {
        let Some(e) = self.hosts.get(key).filter(|e| e.in_play()) else {
            return Err(format!("no host {key}"));
        };
        if e.record.deleted {
            // Its document is gone and it waits for its agent to clean it: the operator gives
            // up on the cleaning.
            warn!(host = %key, "dropped by the operator before its disks were cleaned");
            self.forget(key);
            return Ok(format!(
                "host {key} removed without cleaning its disks (its document was already gone)"
            ));
        }
        if e.record.origin != DISCOVERED {
            return Err(format!(
                "host {key} is declared in {}: remove its document there to delete it (a \
                 provisioned host is then deprovisioned first)",
                e.record.origin
            ));
        }
        self.drop_discovered(key, "deleted by the operator");
        Ok(format!("discovered host {key} deleted"))
    }

    /// Discovered hosts not seen for long enough go: after the boot token's validity for one
    /// whose agent never enrolled, after `discovered_ttl` for one that did.
    pub(super) fn sweep_discovered(&mut self, now: Timestamp) {
        for key in self.discovered_hosts() {
            let Some(e) = self.hosts.get(&key) else {
                continue;
            };
            if e.session.as_ref().is_some_and(|s| s.live(now)) {
                continue;
            }
            let ttl = if e.record.agent_cert_sha256.is_some() {
                self.settings.discovered_ttl
            } else {
                self.settings.boot_token_ttl
            };
            if now.duration_since(e.seen_at) > ttl {
                self.drop_discovered(&key, "not seen again");
            }
        }
    }

    /// The record of an undeclared machine, created on its first boot. At the limit, the
    /// oldest discovered host that never enrolled (and was last seen over two minutes ago)
    /// makes room; else the machine is refused.
    fn discovered(&mut self, mac: &str, now: Timestamp) -> Result<HostKey, String> {
        let key = HostKey::default_ns(format!("discovered-{}", mac.replace(':', "")));
        if self.hosts.get(&key).is_none_or(|e| e.forgotten) {
            let kept = self.discovered_hosts();
            if kept.len() >= self.settings.discovered_limit {
                let room = kept.iter().find(|k| {
                    self.hosts.get(*k).is_some_and(|e| {
                        e.record.agent_cert_sha256.is_none()
                            && e.session.is_none()
                            && now.duration_since(e.seen_at) > SignedDuration::from_mins(2)
                    })
                });
                match room.cloned() {
                    Some(old) => self.drop_discovered(&old, "making room for a newer one"),
                    None => {
                        return Err(format!(
                            "{} discovered hosts are kept already (--discovered-limit): declare \
                             this machine ({mac}), or remove discovered ones with slipway \
                             delete host",
                            kept.len()
                        ));
                    }
                }
            }
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
        Ok(key)
    }

    /// A token an operator asked for (`slipway token create`).
    pub(super) fn create_token(
        &mut self,
        host: &HostKey,
        ttl: SignedDuration,
        now: Timestamp,
    ) -> Result<(TokenSecret, Timestamp), String> {
        self.mint(host, ttl, false, now)
    }

    fn mint(
        &mut self,
        host: &HostKey,
        ttl: SignedDuration,
        boot: bool,
        now: Timestamp,
    ) -> Result<(TokenSecret, Timestamp), String> {
        let Some(entry) = self.hosts.get_mut(host).filter(|e| e.in_play()) else {
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
            boot,
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
