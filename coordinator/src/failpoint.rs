//! Crash points for the crash-consistency tests: `SLIPWAY_FAILPOINT=NAME[@TAG][:N]` makes the
//! coordinator SIGKILL itself the N-th time (default: the first) it passes the point `NAME`
//! (with `@TAG`: only passes whose batch carries that tag, the name of a command a host's
//! status holds, e.g. `write-image`), exactly as a power cut would stop it there. Unset
//! (always, outside tests), a point costs a check of a `OnceLock`.
//!
//! Points: `store-before-commit` (a batch is written into the redb transaction but not
//! committed), `engine-after-commit` (a batch is durable, nothing of it acted on yet),
//! `engine-mid-act` (the first of a batch's actions has been taken, the rest not).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

struct Point {
    name: String,
    tag: Option<String>,
    at: u64,
    seen: AtomicU64,
}

fn point() -> Option<&'static Point> {
    static POINT: OnceLock<Option<Point>> = OnceLock::new();
    POINT
        .get_or_init(|| {
            let spec = std::env::var("SLIPWAY_FAILPOINT").ok()?;
            let (name, at) = match spec.split_once(':') {
                Some((n, a)) => (n.to_string(), a.parse().unwrap_or(1)),
                None => (spec, 1),
            };
            let (name, tag) = match name.split_once('@') {
                Some((n, t)) => (n.to_string(), Some(t.to_string())),
                None => (name, None),
            };
            Some(Point {
                name,
                tag,
                at,
                seen: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Passes the crash point `name`.
pub fn hit(name: &str) {
    hit_tagged(name, Vec::new);
}

/// Passes the crash point `name` with the tags `tags()` gives (asked only when a point of
/// that name is set).
pub fn hit_tagged(name: &str, tags: impl FnOnce() -> Vec<&'static str>) {
    let Some(p) = point() else { return };
    if p.name != name {
        return;
    }
    if let Some(tag) = &p.tag
        && !tags().iter().any(|t| t == tag)
    {
        return;
    }
    let n = p.seen.fetch_add(1, Ordering::SeqCst) + 1;
    if n == p.at {
        eprintln!("failpoint {name}: killing this process (SIGKILL), as SLIPWAY_FAILPOINT asks");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
