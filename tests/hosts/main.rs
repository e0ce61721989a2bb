//! The chaos test (`tests/chaos/`) with every node on a host of its own
//! (docs/testing.md "Multi-host testing"): a network namespace per node,
//! with its own address on a bridge, instead of 127.0.0.1 and proxies (see
//! `network.rs`). Nodes run as `ip netns exec HOST raft-zmq ...`, bind
//! their host's address and advertise it; the test's clients reach them
//! over the bridge.
//!
//! The same workload, probes, nemesis and checks run (`run.rs`: every key's
//! history linearizable, final reads included, so no acknowledged write is
//! lost; replicas converge; failovers bounded), with real partitions
//! (iptables in the namespaces: leader isolated, minority split off, one
//! way), power loss (`kill -9` over lazyfs) of one node or all, SIGSTOP,
//! members replaced, and two faults that only a network of hosts has: a
//! host whose link goes down (for clients too) and comes back, and 1–5 %
//! packet loss on every link. No delay yet: this kernel has no `netem`.
//!
//! Without root, iptables or `ip netns`, it prints one line saying why and
//! passes (skipped); `RAFT_ZMQ_REQUIRE_HOSTS=1` (CI) makes that a failure.
//! `HOSTS_SECS=n` sets the load's duration per cluster (default 20),
//! `HOSTS_SEED=n` replays a run's random choices, `CHAOS_CURVE` as in the
//! chaos test.

#[path = "../common/mod.rs"]
mod common;

#[path = "../chaos/cluster.rs"]
mod cluster;
#[path = "../chaos/linearizability.rs"]
mod linearizability;
#[path = "../chaos/nemesis.rs"]
mod nemesis;
mod network;
#[path = "../chaos/probe.rs"]
mod probe;
#[path = "../chaos/register.rs"]
mod register;
#[path = "../chaos/run.rs"]
mod run;
#[path = "../chaos/workload.rs"]
mod workload;

use std::io::Write;
use std::sync::OnceLock;

use network::Network;

/// Load per cluster by default: both clusters run at once, within about a
/// minute on two cores.
const SECS: u64 = 20;

#[test]
fn three_hosts() {
    if available() {
        run::chaos("hosts", 3, run::curve(true), SECS);
    }
}

#[test]
fn five_hosts() {
    if available() {
        run::chaos("hosts", 5, run::curve(false), SECS);
    }
}

/// The subnet a run takes overlaps nothing the machine has: neither an
/// address, nor a route, however long or short its prefix.
#[test]
fn a_run_takes_a_subnet_nothing_else_uses() {
    let machine = "inet 192.0.2.2/24 brd 192.0.2.255\ndefault via 192.0.2.1 dev eth0\n";
    assert_eq!(network::subnet_clear_of(machine, 5), Some([10, 213, 5]));
    let taken = format!("{machine}10.213.5.0/24 dev rz1-0b\n10.213.6.7 dev x\n10.213.7.128/25 dev y");
    assert_eq!(network::subnet_clear_of(&taken, 5), Some([10, 213, 8]));
    assert_eq!(network::subnet_clear_of(&format!("{machine}10.213.0.0/16 dev z"), 5), None);
    assert_eq!(network::subnet_clear_of("10.0.0.0/8 dev z", 5), None);
    assert_eq!(network::subnet_clear_of("10.213.255.0/24 dev z", 255), Some([10, 213, 0]));
}

/// Whether this machine can give nodes hosts of their own. If not, the
/// first test to ask says why, in one line that the test harness does not
/// capture.
fn available() -> bool {
    static WHY_NOT: OnceLock<Option<String>> = OnceLock::new();
    let mut asked = false;
    let why_not = WHY_NOT.get_or_init(|| {
        asked = true;
        Network::unavailable()
    });
    let Some(why) = why_not else { return true };
    if std::env::var_os("RAFT_ZMQ_REQUIRE_HOSTS").is_some_and(|v| v != "0") {
        panic!("RAFT_ZMQ_REQUIRE_HOSTS is set, but the multi-host test cannot run: {why}");
    }
    if asked {
        let _ = writeln!(std::io::stderr(), "hosts: skipped, {why}");
    }
    false
}
