//! Per-source-address rate limits for what anyone on the provisioning network may ask
//! without a certificate (boot scripts, ISOs): a token bucket per IP address, refilled at
//! `per_second` up to `burst`. The table is bounded: past [`MAX_ADDRESSES`] addresses, those
//! whose bucket has refilled are dropped (they are as good as new), and if that is not
//! enough the table starts afresh, so a flood from many addresses costs memory once, not
//! without bound.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// Addresses tracked at most.
pub const MAX_ADDRESSES: usize = 65_536;

#[derive(Debug)]
pub struct PerAddress {
    per_second: f64,
    burst: f64,
    max_addresses: usize,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refilled(&self, now: Instant, per_second: f64, burst: f64) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (self.tokens + elapsed * per_second).min(burst)
    }
}

impl PerAddress {
    /// `per_second` requests a second per address, with bursts of `burst`; a zero rate
    /// means no limit.
    pub fn new(per_second: f64, burst: u32) -> PerAddress {
        PerAddress::with_capacity(per_second, burst, MAX_ADDRESSES)
    }

    fn with_capacity(per_second: f64, burst: u32, max_addresses: usize) -> PerAddress {
        PerAddress {
            per_second,
            burst: f64::from(burst.max(1)),
            max_addresses,
            buckets: Mutex::default(),
        }
    }

    /// Whether a request from `ip` at `now` is admitted (and counts).
    pub fn admit(&self, ip: IpAddr, now: Instant) -> bool {
        if self.per_second <= 0.0 {
            return true;
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= self.max_addresses && !buckets.contains_key(&ip) {
            let (rate, burst) = (self.per_second, self.burst);
            buckets.retain(|_, b| b.refilled(now, rate, burst) < burst);
            if buckets.len() >= self.max_addresses {
                buckets.clear();
            }
        }
        let bucket = buckets.entry(ip).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let tokens = bucket.refilled(now, self.per_second, self.burst);
        let admitted = tokens >= 1.0;
        bucket.tokens = if admitted { tokens - 1.0 } else { tokens };
        bucket.at = now;
        admitted
    }

    /// How many addresses are tracked.
    pub fn tracked(&self) -> usize {
        self.buckets.lock().map(|b| b.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::from(0x7f00_0000 + n))
    }

    #[test]
    fn a_burst_then_the_rate_per_address() {
        let l = PerAddress::new(2.0, 5);
        let t = Instant::now();
        let admitted = (0..20).filter(|_| l.admit(ip(2), t)).count();
        assert_eq!(admitted, 5);
        // Another address is not affected.
        assert!(l.admit(ip(3), t));
        // Half a second later, one more; two seconds later, four.
        assert!(l.admit(ip(2), t + Duration::from_millis(500)));
        assert!(!l.admit(ip(2), t + Duration::from_millis(500)));
        let later = t + Duration::from_millis(2500);
        assert_eq!((0..10).filter(|_| l.admit(ip(2), later)).count(), 4);
    }

    #[test]
    fn zero_means_unlimited() {
        let l = PerAddress::new(0.0, 1);
        let t = Instant::now();
        assert!((0..1000).all(|_| l.admit(ip(1), t)));
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn the_table_is_bounded() {
        let l = PerAddress::with_capacity(1.0, 3, 100);
        let t = Instant::now();
        for n in 0..1000 {
            l.admit(ip(n), t);
            assert!(l.tracked() <= 100);
        }
        // An address that exhausted its bucket keeps it while the table has room.
        let l = PerAddress::with_capacity(1.0, 3, 100);
        for _ in 0..3 {
            assert!(l.admit(ip(7), t));
        }
        for n in 100..150 {
            l.admit(ip(n), t);
        }
        assert!(!l.admit(ip(7), t));
    }
}
