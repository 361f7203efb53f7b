//! Enrolment (a one-time token and a CSR for a certificate naming one host) and agent
//! sessions.

use std::collections::{HashMap, HashSet};

use jiff::Timestamp;
use slipway_reconcile::AgentLink;
use slipway_reconcile::host::{HardwareDetails, HostKey};
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::Engine;
use super::host::{Act, Reply, Session};
use super::msg::{
    ACCEPT_HARDWARE_ANNOTATION, AgentInfo, AgentReport, CommandSender, Enrolled, Refusal,
    SILENCE_LIMIT,
};
use crate::hardware::Identity;
use crate::tokens::TokenSecret;

impl Engine {
    pub(super) fn enroll(
        &mut self,
        token: &TokenSecret,
        csr_der: &[u8],
        agent: &AgentInfo,
        peer: &str,
        reply: oneshot::Sender<Result<Enrolled, Refusal>>,
        now: Timestamp,
    ) {
        match self.try_enroll(token, csr_der, agent, peer, now) {
            Ok(enrolled) => {
                let key = enrolled.host.clone();
                self.hold_or_act(&key, Act::Reply(Reply::Enrolled(reply, Ok(enrolled))));
            }
            Err(Refusal(reason)) => {
                warn!(peer = %peer, token = %token.fingerprint(), "enrolment refused: {reason}");
                let _ = reply.send(Err(Refusal(reason)));
            }
        }
    }

    fn try_enroll(
        &mut self,
        token: &TokenSecret,
        csr_der: &[u8],
        agent: &AgentInfo,
        peer: &str,
        now: Timestamp,
    ) -> Result<Enrolled, Refusal> {
        let hash = token.hash();
        let Some(record) = self.tokens.get(&hash) else {
            return Err(Refusal(
                "unknown bootstrap token (never issued here, or its host was removed)".into(),
            ));
        };
        let host = record.host.clone();
        let boot_token = record.boot;
        if let Some(used) = record.used_at {
            return Err(Refusal(format!(
                "bootstrap token for host {host} was already used at {used} by {}; tokens are \
                 single-use: create a new one with `slipway token create {host}`",
                record.used_by.as_deref().unwrap_or("?"),
            )));
        }
        if record.expires_at <= now {
            return Err(Refusal(format!(
                "bootstrap token for host {host} expired at {}; create a new one with \
                 `slipway token create {host}`",
                record.expires_at
            )));
        }
        let Some(entry) = self.hosts.get_mut(&host).filter(|e| e.in_play()) else {
            return Err(Refusal(format!("host {host} is no longer declared")));
        };
        // An enrolment never displaces a live agent: a second machine with the host's token
        // (or MAC) is an impostor until the first one has been silent for the limit.
        if let Some(s) = entry.session.as_ref().filter(|s| s.live(now)) {
            let what = format!(
                "a second agent enrolled for host {host} from {peer} while its agent from {} is \
                 connected; refused. If the machine rebooted, its new agent gets in once the old \
                 session has been silent for {}s",
                s.link.address,
                SILENCE_LIMIT.as_secs()
            );
            self.impostor(&host, peer, &what, now);
            return Err(Refusal(what));
        }
        // A ramdisk says which NIC it booted from. With a token from a boot script or ISO
        // (which anyone on the network may have asked for), a host that declares a boot MAC
        // requires it, and the machine must have that NIC (checked at its hello). A token an
        // operator made through the admin socket (`slipway token create`) is trusted as it is;
        // a boot MAC its agent says must still be the host's.
        let declared = entry.boot_mac();
        let booted = crate::boot::normalize_mac(&agent.boot_mac);
        match (&declared, &booted) {
            (Some(declared), None) if boot_token => {
                let what = format!(
                    "the agent from {peer} did not say which MAC it booted from; host {host} has \
                     bootMACAddress {declared} (the ramdisk says it from BOOTIF=/slipway.mac=; \
                     by hand: slipway-agent run --boot-mac {declared})"
                );
                self.impostor(&host, peer, &what, now);
                return Err(Refusal(what));
            }
            (Some(declared), Some(booted)) if declared != booted => {
                let what = format!(
                    "the agent from {peer} booted from MAC {booted}, but host {host} has \
                     bootMACAddress {declared}"
                );
                self.impostor(&host, peer, &what, now);
                return Err(Refusal(what));
            }
            _ => {}
        }
        let Some(entry) = self.hosts.get_mut(&host) else {
            return Err(Refusal(format!("host {host} is no longer declared")));
        };
        let cert = self
            .ca
            .sign_agent(&host, csr_der, self.settings.cert_validity, now)
            .map_err(|e| Refusal(format!("{e}")))?;
        let mut used = record.clone();
        used.used_at = Some(now);
        used.used_by = Some(peer.to_string());
        self.tokens.insert(hash.clone(), used.clone());
        entry.pending.tokens.push((hash, Some(used)));
        let record = std::sync::Arc::make_mut(&mut entry.record);
        record.agent_cert_sha256 = Some(cert.sha256.clone());
        record.agent_boot_mac = booted.clone().filter(|_| boot_token);
        if entry.status.possible_impostor.is_some() {
            // A real agent is in again; the alert stays in the events.
            std::sync::Arc::make_mut(&mut entry.status).possible_impostor = None;
            entry.pending.status = true;
            self.view_dirty.insert(host.clone());
        }
        entry.pending.record = true;
        // A session on an older certificate is over.
        if entry.session.take().is_some() {
            self.metrics.sessions.dec();
            self.to_plan.insert(host.clone());
        }
        let message = format!(
            "agent {} enrolled from {peer}{}; certificate valid until {}",
            agent.version,
            if agent.boot_mac.is_empty() {
                String::new()
            } else {
                format!(" (boot MAC {})", agent.boot_mac)
            },
            cert.not_after
        );
        self.event(&host, false, "Enrolled", message);
        info!(host = %host, peer = %peer, "agent enrolled");
        Ok(Enrolled {
            host,
            cert_der: cert.der,
            ca_der: self.ca.cert_der().to_vec(),
            not_after: cert.not_after,
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn connect(
        &mut self,
        host: &HostKey,
        cert_sha256: &str,
        peer: &str,
        agent: &AgentInfo,
        reports: Vec<AgentReport>,
        inventory: Option<std::sync::Arc<HardwareDetails>>,
        identity: Option<Identity>,
        alive: std::sync::Arc<std::sync::atomic::AtomicI64>,
        commands: CommandSender,
        now: Timestamp,
    ) -> Result<u64, Refusal> {
        let Some(entry) = self.hosts.get_mut(host).filter(|e| e.in_play()) else {
            return Err(Refusal(format!("host {host} is not declared")));
        };
        if entry.record.agent_cert_sha256.as_deref() != Some(cert_sha256) {
            return Err(Refusal(format!(
                "the client certificate is not host {host}'s current one (a later enrolment \
                 replaced it, or the host was re-created); enrol again with a new token"
            )));
        }
        if let Some(seen) = &identity
            && let Err(what) = self.check_machine(host, seen, peer)
        {
            self.impostor(host, peer, &what, now);
            return Err(Refusal(what));
        }
        let Some(entry) = self.hosts.get_mut(host) else {
            return Err(Refusal(format!("host {host} is not declared")));
        };
        // The hello's hardware is usually what inspection stored: share it.
        let inventory = match (inventory, &entry.status.hardware) {
            (Some(seen), Some(known)) if seen == *known => Some(known.clone()),
            (seen, _) => seen,
        };
        let id = self.next_session;
        self.next_session += 1;
        let reports: HashMap<String, AgentReport> = reports
            .into_iter()
            .map(|r| (r.id().to_string(), r))
            .collect();
        let replaced = entry.session.replace(Session {
            id,
            link: AgentLink {
                since: now,
                address: peer.to_string(),
                version: agent.version.clone(),
            },
            commands,
            sent: HashSet::new(),
            reports,
            inventory,
            alive,
        });
        if replaced.is_none() {
            self.metrics.sessions.inc();
        }
        if let Some(e) = self.hosts.get_mut(host) {
            e.seen_at = now;
        }
        info!(host = %host, peer = %peer, session = id, "agent session started");
        if let Some(old) = replaced
            && old.live(now)
        {
            warn!(host = %host, peer = %peer, "a session replaced a live one of the same certificate (the agent reconnected)");
        }
        self.to_plan.insert(host.clone());
        Ok(id)
    }

    /// Whether the machine an agent describes is the host's: the boot MAC it enrolled with is
    /// one of its NICs, and once the host was inspected, its UUID, serial and NICs are the
    /// inspected ones (or the operator accepted the new machine by annotation).
    fn check_machine(&mut self, host: &HostKey, seen: &Identity, peer: &str) -> Result<(), String> {
        let Some(entry) = self.hosts.get_mut(host) else {
            return Ok(());
        };
        if let Some(mac) = &entry.record.agent_boot_mac
            && !seen.all_macs.is_empty()
            && !seen.all_macs.contains(mac)
        {
            return Err(format!(
                "the agent from {peer} enrolled for host {host} saying it booted from {mac}, but \
                 its machine has no such NIC ({}); refused",
                seen.all_macs.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        let Some(recorded) = &entry.record.identity else {
            return Ok(());
        };
        let differs = seen.differences(recorded);
        if differs.is_empty() {
            return Ok(());
        }
        let accepted = entry
            .record
            .host
            .metadata
            .annotations
            .get(ACCEPT_HARDWARE_ANNOTATION)
            .map(|v| v.trim().to_ascii_lowercase())
            .is_some_and(|v| {
                !v.is_empty() && (v == seen.uuid || v == seen.serial.to_ascii_lowercase())
            });
        if accepted {
            info!(host = %host, "the machine changed ({}); accepted by the {ACCEPT_HARDWARE_ANNOTATION} annotation", differs.join("; "));
            std::sync::Arc::make_mut(&mut entry.record).identity = Some(seen.clone());
            entry.pending.record = true;
            self.unsaved.insert(host.clone());
            return Ok(());
        }
        Err(format!(
            "the agent from {peer} runs on a machine that is not the one inspected for host \
             {host}: {}; refused before it is sent anything. If the machine was replaced, \
             accept it with the annotation {ACCEPT_HARDWARE_ANNOTATION}: \"{}\" on the host",
            differs.join("; "),
            if seen.uuid.is_empty() {
                &seen.serial
            } else {
                &seen.uuid
            }
        ))
    }

    /// Raises a possible impostor on the host: status, event and log, with its address.
    pub(super) fn impostor(&mut self, host: &HostKey, peer: &str, what: &str, now: Timestamp) {
        warn!(host = %host, peer = %peer, "possible impostor: {}", crate::log::escape(what));
        self.metrics.possible_impostors.inc();
        if let Some(entry) = self.hosts.get_mut(host) {
            std::sync::Arc::make_mut(&mut entry.status).possible_impostor =
                Some(slipway_reconcile::host::ImpostorAlert {
                    at: now,
                    peer: peer.to_string(),
                    what: what.to_string(),
                });
            entry.pending.status = true;
            self.unsaved.insert(host.clone());
            self.view_dirty.insert(host.clone());
        }
        self.event(host, true, "PossibleImpostor", what.to_string());
    }
}
