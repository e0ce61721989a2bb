//! Jepsen-style chaos test of real `raft-zmq` processes on 127.0.0.1.
//!
//! Concurrent clients run random get/put/delete/cas through random nodes
//! while a nemesis cuts the power of nodes (`kill -9` with their unsynced
//! writes lost, see `tests/common/lazyfs.rs`), pauses and partitions them,
//! and replaces members (remove one, the leader too, then add a new node
//! with an empty disk), one fault at a time;
//! probes aim at every leader it pauses or isolates (see `probe.rs`).
//! Afterwards: every key's history must be linearizable (final reads through
//! the leader included, so no acknowledged write may be lost), all nodes must
//! converge on the same last applied index, and their `logs/<id>.txt` must
//! agree. Failover times are reported, and bounded (`FAILOVER_BOUND`).
//!
//! `CHAOS_SECS=n` sets the load's duration per cluster (default 30);
//! `CHAOS_SEED=n` replays a run's random choices (its nemesis schedule and
//! client ops; timing still varies). The 3-node cluster runs with CURVE on
//! every endpoint and the 5-node one without, so that one run covers both at
//! no extra cost; `CHAOS_CURVE=1` or `0` turns CURVE on or off for both.
//! Members are replaced at most `SPARES` times a run. The run itself
//! (`run.rs`) is shared with the multi-host test, `tests/hosts/`.

#[path = "../common/mod.rs"]
mod common;

mod cluster;
mod linearizability;
mod nemesis;
mod network;
mod probe;
mod proxy;
mod register;
mod run;
mod workload;

#[test]
fn three_nodes() {
    run::chaos("chaos", 3, run::curve(true), 30);
}

#[test]
fn five_nodes() {
    run::chaos("chaos", 5, run::curve(false), 30);
}
