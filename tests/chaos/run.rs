//! One chaos run, shared by the chaos test (nodes on 127.0.0.1, partitions
//! by proxies) and the multi-host test (a network namespace per node,
//! partitions and loss by iptables): the workload, the probes and the
//! nemesis against a [`ChaosCluster`], then the checks and the report.

use std::fmt;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::cluster::ChaosCluster;
use crate::common::wait_for;
use crate::linearizability::{self, Op, Outcome, Verdict};
use crate::nemesis::{self, Fault, Scheduled};
use crate::probe::Probe;
use crate::register::Input;
use crate::workload::{History, Session, Workload};

const CLIENTS: usize = 5;
const KEYS: usize = 5;
/// Checker runs spent shrinking a failing history.
const SHRINK_BUDGET: usize = 300;
/// The longest a failover may take (a fault takes the leader away → the
/// first acknowledgement of a write invoked after it), but for the faults
/// [`check_failovers`] leaves out: 5 × the maximum election timeout.
/// Typical failovers take 0.4–0.6 s; a liveness bug (no leader for good, a
/// cut-off leader that never steps down) takes forever.
const FAILOVER_BOUND: Duration = Duration::from_millis(5 * 600);
/// Ids for nodes that join during a run (each replacement takes one).
pub const SPARES: usize = 2;

pub fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| v.parse().unwrap_or_else(|e| panic!("{name}={v}: {e}")))
}

/// `CHAOS_CURVE` if set, else `default`.
pub fn curve(default: bool) -> bool {
    env_u64("CHAOS_CURVE").map_or(default, |on| on != 0)
}

/// A run of `suite` ("chaos", "hosts") on `n` nodes: `{SUITE}_SECS` of load
/// (default `default_secs`), its random choices from `{SUITE}_SEED`
/// (default: the clock).
pub fn chaos(suite: &str, n: usize, curve: bool, default_secs: u64) {
    let prefix = suite.to_uppercase();
    let secs = env_u64(&format!("{prefix}_SECS")).unwrap_or(default_secs);
    let seed = env_u64(&format!("{prefix}_SEED"))
        .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64);
    let replay = format!("{prefix}_SEED={seed}");
    let security = if curve { "CURVE" } else { "plaintext" };
    eprintln!("{suite}, {n} nodes, {security}: {secs} s of load, {replay}");
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
    let throughput = Throughput::of(&history, t0.elapsed());
    probes.into_iter().for_each(|probe| history.merge(probe.history));

    // Healed: a final read of every key through the leader joins the history.
    let leader = cluster.wait_for_leader();
    let mut reader = Session::new(reader_id, &endpoints, seed, t0);
    let keys: Vec<String> = history.by_key.keys().cloned().collect();
    for key in keys {
        let read = wait_for("a final read", || reader.perform(&[leader], &key, Input::Get));
        history.record(&key, Some(read));
    }
    let checks = check(&history, &schedule, &replay);
    report(&history, &schedule, checks);
    eprintln!("{throughput}");
    check_failovers(&history, &schedule, &replay);
    let applied = converge(&cluster);
    eprintln!("members {:?} applied {applied} entries and their logs/<id>.txt agree", cluster.members);
    eprintln!("{suite}, {n} nodes: passed in {:.1} s", started.elapsed().as_secs_f64());
}

/// What the workload's clients got done, faults and all.
struct Throughput {
    load: Duration,
    acknowledged: usize,
    writes: usize,
    /// Acknowledged writes' latencies (invocation to reply, retries included), sorted.
    write_latencies: Vec<Duration>,
}

impl Throughput {
    fn of(history: &History, load: Duration) -> Throughput {
        let returned = |op: &&Op| matches!(op.outcome, Outcome::Returned { .. });
        let acknowledged = history.ops().filter(returned).count();
        let mut write_latencies: Vec<Duration> = history
            .ops()
            .filter(|op| op.input.is_write())
            .filter_map(|op| match op.outcome {
                Outcome::Returned { at, .. } => Some(Duration::from_micros(at - op.invoked)),
                Outcome::Unknown => None,
            })
            .collect();
        write_latencies.sort();
        Throughput { load, acknowledged, writes: write_latencies.len(), write_latencies }
    }
}

impl fmt::Display for Throughput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.load.as_secs_f64();
        let ms = |q: f64| {
            let i =
                ((self.write_latencies.len() as f64 * q) as usize).min(self.write_latencies.len().saturating_sub(1));
            self.write_latencies.get(i).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
        };
        write!(
            f,
            "throughput under faults, {CLIENTS} clients: {:.0} acknowledged ops/s ({:.0} writes/s) over {secs:.1} s; \
             acknowledged writes took p50 {:.1} ms, p99 {:.1} ms",
            self.acknowledged as f64 / secs,
            self.writes as f64 / secs,
            ms(0.5),
            ms(0.99)
        )
    }
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
fn check(history: &History, schedule: &[Scheduled], replay: &str) -> usize {
    for (key, ops) in &history.by_key {
        match linearizability::check(ops) {
            Verdict::Linearizable => {}
            verdict => {
                eprintln!("key {key}: {verdict:?} ({} ops); {replay}\nnemesis schedule:", ops.len());
                schedule.iter().for_each(|s| eprintln!("  {s}"));
                if verdict == Verdict::Violation {
                    let small = linearizability::shrink(ops, SHRINK_BUDGET);
                    eprintln!("smallest failing sub-history of {key} ({} ops):", small.len());
                    small.iter().for_each(|op| eprintln!("  {op}"));
                }
                panic!("key {key}: history is not linearizable ({verdict:?}); {replay}");
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
        "leader lost power, paused, isolated or its host gone, or all lost power",
        history,
        schedule.iter().filter(leader_lost),
    );
}

/// Bounds every failover but two: after a power loss of every node all
/// restart, and when the leader's host goes away, every client whose request
/// it holds (or a follower forwarded to it) waits out its 2 s attempt
/// first, so the next acknowledgement measures the clients' timeout as much
/// as the election. Both are reported.
fn check_failovers(history: &History, schedule: &[Scheduled], replay: &str) {
    let bounded = |s: &&Scheduled| !matches!(s.fault, Fault::PowerOffAll | Fault::HostDown { .. });
    for s in schedule.iter().filter(|s| s.fault.removes_leader()).filter(bounded) {
        if let Some(took) = failover(history, s).filter(|&took| took > FAILOVER_BOUND) {
            panic!("{s}: the next write was acknowledged only {took:?} later, over {FAILOVER_BOUND:?}; {replay}");
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
