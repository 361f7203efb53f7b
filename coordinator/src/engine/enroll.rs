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
use super::msg::{AgentInfo, AgentReport, CommandSender, Enrolled, Refusal};
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
        let Some(entry) = self
            .hosts
            .get_mut(&host)
            .filter(|e| !e.record.deleted && !e.forgotten)
        else {
            return Err(Refusal(format!("host {host} is no longer declared")));
        };
        // A ramdisk says which NIC it booted from; it must be the host's.
        let declared = entry.boot_mac();
        let booted = crate::boot::normalize_mac(&agent.boot_mac);
        if let (Some(declared), Some(booted)) = (&declared, &booted)
            && declared != booted
        {
            return Err(Refusal(format!(
                "the agent booted from MAC {booted}, but host {host} has bootMACAddress {declared}"
            )));
        }
        let cert = self
            .ca
            .sign_agent(&host, csr_der, self.settings.cert_validity, now)
            .map_err(|e| Refusal(format!("{e}")))?;
        let mut used = record.clone();
        used.used_at = Some(now);
        used.used_by = Some(peer.to_string());
        self.tokens.insert(hash.clone(), used.clone());
        entry.pending.tokens.push((hash, Some(used)));
        std::sync::Arc::make_mut(&mut entry.record).agent_cert_sha256 = Some(cert.sha256.clone());
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
        commands: CommandSender,
        now: Timestamp,
    ) -> Result<u64, Refusal> {
        let Some(entry) = self
            .hosts
            .get_mut(host)
            .filter(|e| !e.record.deleted && !e.forgotten)
        else {
            return Err(Refusal(format!("host {host} is not declared")));
        };
        if entry.record.agent_cert_sha256.as_deref() != Some(cert_sha256) {
            return Err(Refusal(format!(
                "the client certificate is not host {host}'s current one (a later enrolment \
                 replaced it, or the host was re-created); enrol again with a new token"
            )));
        }
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
        });
        if replaced.is_none() {
            self.metrics.sessions.inc();
        }
        info!(host = %host, peer = %peer, session = id, "agent session started");
        self.to_plan.insert(host.clone());
        Ok(id)
    }
}
