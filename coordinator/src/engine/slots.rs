//! The fleet's slots for work that loads the provisioning network and the image server:
//! inspection, cleaning and image writes (metal3's `PROVISIONING_LIMIT`,
//! `slipway serve --provisioning-limit`).
//!
//! A host holds a slot while its current command takes one. A host that needs one when none
//! is free waits, `delayed`, in arrival order: when slots free up, the hosts that waited
//! longest are invited first, and a newcomer does not overtake a host already waiting.

use std::collections::{HashSet, VecDeque};

use slipway_reconcile::Slot;
use slipway_reconcile::host::HostKey;

#[derive(Debug)]
pub struct Slots {
    limit: usize,
    holders: HashSet<HostKey>,
    /// Delayed hosts, oldest first (entries of hosts no longer waiting are skipped).
    queue: VecDeque<HostKey>,
    waiting: HashSet<HostKey>,
    /// Hosts told a slot is theirs, planned next.
    invited: HashSet<HostKey>,
}

impl Slots {
    pub fn new(limit: usize) -> Slots {
        Slots {
            limit: limit.max(1),
            holders: HashSet::new(),
            queue: VecDeque::new(),
            waiting: HashSet::new(),
            invited: HashSet::new(),
        }
    }

    pub fn in_use(&self) -> usize {
        self.holders.len()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// What the planner is told about `host`.
    pub fn standing(&self, host: &HostKey) -> Slot {
        let free = self.holders.len() + self.invited.len() < self.limit;
        if self.holders.contains(host)
            || self.invited.contains(host)
            || (free && self.waiting.is_empty())
        {
            Slot::Free
        } else {
            Slot::Busy { limit: self.limit }
        }
    }

    /// After a plan: whether `host` now holds a slot, and whether it waits for one.
    pub fn update(&mut self, host: &HostKey, holds: bool, delayed: bool) {
        self.invited.remove(host);
        if holds {
            self.holders.insert(host.clone());
        } else {
            self.holders.remove(host);
        }
        if delayed && !holds {
            if self.waiting.insert(host.clone()) {
                self.queue.push_back(host.clone());
            }
        } else {
            self.waiting.remove(host);
        }
    }

    /// The host is gone.
    pub fn forget(&mut self, host: &HostKey) {
        self.update(host, false, false);
    }

    /// Hosts to plan now because a slot is theirs (the longest waiting first).
    pub fn invite(&mut self) -> Vec<HostKey> {
        let mut out = Vec::new();
        while self.holders.len() + self.invited.len() < self.limit {
            let Some(host) = self.queue.pop_front() else {
                break;
            };
            if self.waiting.remove(&host) {
                self.invited.insert(host.clone());
                out.push(host);
            }
        }
        // The queue holds stale entries of hosts that stopped waiting; drop them when it
        // grows well past the hosts really waiting.
        if self.queue.len() > 2 * self.waiting.len() + 64 {
            let waiting = &self.waiting;
            self.queue.retain(|h| waiting.contains(h));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(n: &str) -> HostKey {
        HostKey::default_ns(n)
    }

    #[test]
    fn waiting_hosts_get_slots_in_arrival_order_and_newcomers_queue_behind() {
        let mut s = Slots::new(2);
        assert_eq!(s.standing(&k("a")), Slot::Free);
        s.update(&k("a"), true, false);
        s.update(&k("b"), true, false);
        assert_eq!(s.standing(&k("c")), Slot::Busy { limit: 2 });
        s.update(&k("c"), false, true);
        s.update(&k("d"), false, true);
        assert_eq!(s.invite(), Vec::<HostKey>::new(), "no slot free");
        // a finishes: c (first to wait) is invited; a newcomer e does not overtake d.
        s.update(&k("a"), false, false);
        assert_eq!(s.invite(), vec![k("c")]);
        assert_eq!(s.standing(&k("c")), Slot::Free);
        assert_eq!(s.standing(&k("e")), Slot::Busy { limit: 2 });
        s.update(&k("c"), true, false);
        assert_eq!(s.in_use(), 2);
        // d stops waiting (its image was removed); b finishes: nobody left to invite but e.
        s.update(&k("d"), false, false);
        s.update(&k("e"), false, true);
        s.update(&k("b"), false, false);
        assert_eq!(s.invite(), vec![k("e")]);
        assert_eq!(s.waiting(), 0);
        // An invited host that does not take its slot gives it back at its plan.
        s.update(&k("e"), false, false);
        assert_eq!(s.standing(&k("f")), Slot::Free);
    }
}
