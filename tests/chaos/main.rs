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
//! Members are replaced at most `SPARES` times a run.

#[path = "../common/mod.rs"]
mod common;

mod cluster;
mod linearizability;
mod nemesis;
mod network;
mod probe;
mod proxy;
mod register;
mod workload;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cluster::ChaosCluster;
use common::wait_for;
use linearizability::{Outcome, Verdict};
use nemesis::{Fault, Scheduled};
use probe::Probe;
use register::Input;
use workload::{History, Session, Workload};

const CLIENTS: usize = 5;
const KEYS: usize = 5;
/// Checker runs spent shrinking a failing history.
const SHRINK_BUDGET: usize = 300;
/// The longest a failover may take (a fault takes the leader away → the
/// first acknowledgement of a write invoked after it), except after a power loss
/// of every node, which restarts them all: 5 × the maximum election timeout.
/// Typical failovers take 0.4–0.6 s; a liveness bug (no leader for good, a
/// cut-off leader that never steps down) takes forever.
const FAILOVER_BOUND: Duration = Duration::from_millis(5 * 600);
/// Ids for nodes that join during a run (each replacement takes one).
const SPARES: usize = 2;

#[test]
fn three_nodes() {
    chaos(3, curve(true));
}

#[test]
fn five_nodes() {
    chaos(5, curve(false));
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| v.parse().unwrap_or_else(|e| panic!("{name}={v}: {e}")))
}

/// `CHAOS_CURVE` if set, else `default`.
fn curve(default: bool) -> bool {
    env_u64("CHAOS_CURVE").map_or(default, |on| on != 0)
}

fn chaos(n: usize, curve: bool) {
    let secs = env_u64("CHAOS_SECS").unwrap_or(30);
    let seed = env_u64("CHAOS_SEED")
        .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64);
    let security = if curve { "CURVE" } else { "plaintext" };
    eprintln!("chaos, {n} nodes, {security}: {secs} s of load, CHAOS_SEED={seed}");
    let started = Instant::now();
    let mut cluster = ChaosCluster::start(n, SPARES, curve);
    cluster.wait_for_leader();

    let t0 = Instant::now();
    // Clients use the members of the moment; probes and the final reader
    // aim at whichever node leads.
    let endpoints = cluster.client_endpoints();
    let workload = Workload::start(&endpoints, cluster.published.clone(), CLIENTS, KEYS, seed, t0);
    // Client ids after the workload's: the probes, then the final reader.
    let (mut probes, reader_id) = Probe::each_kind(CLIENTS, &endpoints, &cluster.members, seed, t0);
    let mut rng = fastrand::Rng::with_seed(seed);
    let schedule = nemesis::run(&mut cluster, &mut probes, &mut rng, t0, Duration::from_secs(secs));
    let mut history = workload.finish();
    probes.into_iter().for_each(|probe| history.merge(probe.history));

    // Healed: a final read of every key through the leader joins the history.
    let leader = cluster.wait_for_leader();
    let mut reader = Session::new(reader_id, &endpoints, seed, t0);
    let keys: Vec<String> = history.by_key.keys().cloned().collect();
    for key in keys {
        let read = wait_for("a final read", || reader.perform(&[leader], &key, Input::Get));
        history.record(&key, Some(read));
    }
    let checks = check(&history, &schedule, seed);
    report(&history, &schedule, checks);
    check_failovers(&history, &schedule, seed);
    let applied = converge(&cluster);
    eprintln!("members {:?} applied {applied} entries and their logs/<id>.txt agree", cluster.members);
    eprintln!("chaos, {n} nodes: passed in {:.1} s", started.elapsed().as_secs_f64());
}

/// Waits until every node has applied the leader's commit index, and checks
/// that their log mirrors are identical; returns that index.
fn converge(cluster: &ChaosCluster) -> u64 {
    let members = &cluster.members;
    let applied = wait_for("every node to apply the leader's commit index", || {
        let statuses: Vec<_> = members.iter().map(|&id| cluster.nodes.status(id)).collect::<Option<_>>()?;
        let commit = statuses.iter().find(|s| s.role == "leader")?.commit_index;
        statuses.iter().all(|s| s.last_applied == commit).then_some(commit)
    });
    // Rotated files included; a node caught up by a snapshot has no lines
    // for what the snapshot covers, so replicas are compared by index.
    let mirrors = wait_for("every mirror to reach the applied index", || {
        let mirrors: Vec<_> = members.iter().map(|&id| cluster.nodes.mirror_entries(id)).collect();
        mirrors
            .iter()
            .all(|(_, last)| *last == applied)
            .then(|| mirrors.into_iter().map(|(m, _)| m).collect::<Vec<_>>())
    });
    for (id, mirror) in members.iter().zip(&mirrors) {
        for (index, line) in mirror {
            let other = mirrors.iter().find_map(|m| m.get(index).filter(|l| *l != line));
            assert!(other.is_none(), "logs/{id}.txt has {line:?} at {index}, another replica {other:?}");
        }
    }
    applied
}

/// Checks every key; on a violation prints the seed, the schedule and the
/// smallest failing sub-history found, then fails. Returns the checker runs.
fn check(history: &History, schedule: &[Scheduled], seed: u64) -> usize {
    for (key, ops) in &history.by_key {
        match linearizability::check(ops) {
            Verdict::Linearizable => {}
            verdict => {
                eprintln!("key {key}: {verdict:?} ({} ops); CHAOS_SEED={seed}\nnemesis schedule:", ops.len());
                schedule.iter().for_each(|s| eprintln!("  {s}"));
                if verdict == Verdict::Violation {
                    let small = linearizability::shrink(ops, SHRINK_BUDGET);
                    eprintln!("smallest failing sub-history of {key} ({} ops):", small.len());
                    small.iter().for_each(|op| eprintln!("  {op}"));
                }
                panic!("key {key}: history is not linearizable ({verdict:?}); CHAOS_SEED={seed}");
            }
        }
    }
    history.by_key.len()
}

fn report(history: &History, schedule: &[Scheduled], checks: usize) {
    let ops: Vec<_> = history.ops().collect();
    let unknown = ops.iter().filter(|op| op.outcome == Outcome::Unknown).count();
    eprintln!(
        "{} ops recorded ({} unknown), {} definitely failed; {} faults; {checks} checker runs",
        ops.len(),
        unknown,
        history.failed,
        schedule.len()
    );
    for s in schedule {
        eprintln!(
            "  {s}{}",
            failover(history, s).map_or(String::new(), |d| format!("  (next write acked {} ms later)", d.as_millis()))
        );
    }
    let leader_lost = |s: &&Scheduled| s.fault.removes_leader();
    let leader_killed = |s: &&Scheduled| matches!(s.fault, Fault::PowerOff { leader: true, .. });
    print_failovers("leader lost power", history, schedule.iter().filter(leader_killed));
    print_failovers(
        "leader lost power, paused or isolated, or all lost power",
        history,
        schedule.iter().filter(leader_lost),
    );
}

fn check_failovers(history: &History, schedule: &[Scheduled], seed: u64) {
    for s in schedule.iter().filter(|s| s.fault.removes_leader() && !matches!(s.fault, Fault::PowerOffAll)) {
        if let Some(took) = failover(history, s).filter(|&took| took > FAILOVER_BOUND) {
            panic!(
                "{s}: the next write was acknowledged only {took:?} later, over {FAILOVER_BOUND:?}; CHAOS_SEED={seed}"
            );
        }
    }
}

fn print_failovers<'a>(what: &str, history: &History, faults: impl Iterator<Item = &'a Scheduled>) {
    let mut times: Vec<Duration> = faults.filter_map(|s| failover(history, s)).collect();
    times.sort();
    if let (Some(p50), Some(max)) = (times.get(times.len() / 2), times.last()) {
        let (p50, max) = (p50.as_millis(), max.as_millis());
        eprintln!("failover ({what} → first acknowledged write), {} cases: p50 {p50} ms, max {max} ms", times.len());
    }
}

/// Time from the fault's start to the first acknowledgement of a write
/// invoked after it (a write invoked before may have been committed before).
fn failover(history: &History, scheduled: &Scheduled) -> Option<Duration> {
    let start = scheduled.start.as_micros() as u64;
    let first = history
        .ops()
        .filter(|op| op.input.is_write() && op.invoked > start)
        .filter_map(|op| match op.outcome {
            Outcome::Returned { at, .. } => Some(at),
            Outcome::Unknown => None,
        })
        .min()?;
    Some(Duration::from_micros(first - start))
}
