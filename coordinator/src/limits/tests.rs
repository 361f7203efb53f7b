use super::*;

const CAPS: Caps = Caps {
    total: 5,
    per_source: 2,
};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn one_source_cannot_fill_the_listener_and_places_come_back() {
    let mut c = Counts::default();
    let (a, b, d) = (ip("127.0.0.2"), ip("127.0.0.1"), ip("10.0.0.9"));
    assert_eq!(c.admit(a, CAPS), Ok(()));
    assert_eq!(c.admit(a, CAPS), Ok(()));
    assert_eq!(c.admit(a, CAPS), Err(Refused::SourceFull));
    assert_eq!(c.admit(b, CAPS), Ok(()));
    assert_eq!(c.admit(b, CAPS), Ok(()));
    assert_eq!(c.admit(d, CAPS), Ok(()));
    // Full in all: even a new source is refused, and a refusal takes no place.
    assert_eq!(c.admit(ip("10.0.0.10"), CAPS), Err(Refused::ListenerFull));
    assert_eq!((c.open(), c.of(a), c.sources()), (5, 2, 3));
    // An authenticated connection leaves its source's count but not the total.
    c.leave_source(a);
    assert_eq!(c.admit(a, CAPS), Err(Refused::ListenerFull));
    c.leave();
    assert_eq!(c.admit(a, CAPS), Ok(()));
    // Closing everything leaves nothing behind, and extra releases do not underflow.
    for s in [a, a, b, b, d] {
        c.leave_source(s);
        c.leave();
    }
    c.leave_source(a);
    c.leave();
    assert_eq!((c.open(), c.sources()), (0, 0));
    assert_eq!(c.admit(a, CAPS), Ok(()));
}

#[test]
fn sources_are_ipv4_addresses_and_ipv6_slash_64s() {
    assert_eq!(source_key(ip("192.0.2.7")), ip("192.0.2.7"));
    assert_eq!(source_key(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
    assert_eq!(
        source_key(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd")),
        ip("2001:db8:1:2::")
    );
    assert_eq!(source_key(ip("::1")), ip("::"));
}

fn caps(total: usize, per_source: usize) -> Caps {
    Caps { total, per_source }
}

#[test]
fn caps_are_fitted_to_the_open_files_limit() {
    let http = caps(HTTP_MAX_CONNECTIONS, HTTP_MAX_PER_SOURCE);
    let agent = caps(AGENT_MAX_CONNECTIONS, AGENT_MAX_UNAUTHENTICATED_PER_SOURCE);
    // A large limit (systemd's default hard limit) keeps the defaults.
    assert_eq!(fit(http, agent, 524_288), (http, agent, vec![]));
    // 1,024: (1024 - 128) / 8 = 112 HTTP connections, 224 descriptors; 672 agents.
    let (h, a, lowered) = fit(http, agent, 1024);
    assert_eq!((h, a), (caps(112, 56), caps(672, 256)));
    assert_eq!(lowered.len(), 3, "{lowered:?}");
    assert!(
        lowered[0].starts_with("--http-max-connections 8192 to 112"),
        "{lowered:?}"
    );
    assert!(
        lowered[1].starts_with("--http-max-connections-per-source 512 to 56"),
        "{lowered:?}"
    );
    assert!(
        lowered[2].starts_with("--agent-max-connections 20000 to 672"),
        "{lowered:?}"
    );
    // Everything fits: 2 * 112 + 672 + 128 = 1024.
    assert_eq!(2 * h.total + a.total + RESERVED_FILES as usize, 1024);
    // Smaller caps an operator chose leave the agents more.
    assert_eq!(fit(caps(50, 5), agent, 1024).1, caps(796, 256));
    // A per-source cap is at most half its listener's, whatever the limit.
    assert_eq!(fit(caps(10, 10), caps(4, 3), 1 << 20).0, caps(10, 5));
    assert_eq!(fit(caps(10, 10), caps(4, 3), 1 << 20).1, caps(4, 2));
    // A tiny limit still leaves one connection each, never zero.
    assert_eq!(
        fit(http, agent, 10),
        (caps(1, 1), caps(1, 1), fit(http, agent, 10).2)
    );
}

#[test]
fn refusal_logs_are_throttled_and_count_what_they_held_back() {
    let t0 = Instant::now();
    let mut t = Throttle::new(1, Duration::from_secs(10));
    assert_eq!(t.admit(t0), Some(0));
    for ms in 1..=1000 {
        assert_eq!(t.admit(t0 + Duration::from_millis(ms)), None);
    }
    assert_eq!(t.admit(t0 + Duration::from_secs(10)), Some(1000));
    assert_eq!(t.admit(t0 + Duration::from_secs(11)), None);
    let mut burst = Throttle::new(3, Duration::from_secs(1));
    let got: Vec<_> = (0..5).map(|_| burst.admit(t0)).collect();
    assert_eq!(got, [Some(0), Some(0), Some(0), None, None]);
    assert_eq!(burst.admit(t0 + Duration::from_secs(1)), Some(2));
    assert_eq!(held_back(0), "");
    assert_eq!(held_back(2), " (and 2 more since the last such line)");
}

#[test]
fn permits_give_their_places_back_when_dropped() {
    let metrics = Metrics::new();
    let gate = Gate::new(Port::Agent, CAPS, metrics.clone());
    let a = ip("127.0.0.1");
    let mut first = gate.admit(a).unwrap();
    let _second = gate.admit(a).unwrap();
    assert_eq!(gate.admit(a).err(), Some(Refused::SourceFull));
    // Authenticated: the address may start another handshake.
    first.authenticated();
    let third = gate.admit(a).unwrap();
    let text = metrics.render();
    assert!(
        text.contains("slipway_connections_open{listener=\"agent\"} 3"),
        "{text}"
    );
    assert!(
        text.contains(
            "slipway_connections_refused_total{listener=\"agent\",reason=\"source_full\"} 1"
        ),
        "{text}"
    );
    drop(third);
    drop(first);
    assert!(
        metrics
            .render()
            .contains("slipway_connections_open{listener=\"agent\"} 1")
    );
    let counts = lock(&gate.0.counts);
    assert_eq!((counts.open(), counts.of(a)), (1, 1));
}
