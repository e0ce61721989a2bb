//! The nemesis: one fault at a time, chosen at random, each healed before
//! the next, with quiet gaps in between so the cluster can recover and serve.

use std::fmt;
use std::thread;
use std::time::{Duration, Instant};

use crate::cluster::ChaosCluster;

#[derive(Clone, Debug)]
pub enum Fault {
    /// `kill -9`, restarted when healed.
    Kill { node: usize, leader: bool },
    /// SIGSTOP for longer than an election timeout, SIGCONT when healed.
    PauseLeader { node: usize },
    /// Every link to and from the leader cut.
    IsolateLeader { node: usize },
    /// A minority cut off from the majority, in both directions.
    Split { minority: Vec<usize> },
    /// `from` cannot reach `to`; `to` still reaches `from` (requests and replies).
    OneWay { from: usize, to: usize },
    /// `kill -9` of every node at once, all restarted when healed.
    KillAll,
}

/// A fault as it happened: times are since the run started.
#[derive(Clone, Debug)]
pub struct Scheduled {
    pub fault: Fault,
    pub start: Duration,
    pub healed: Duration,
}

impl Fault {
    /// One fault at random; `leader` is the current leader if one is known
    /// (otherwise a random node stands in for it).
    fn pick(rng: &mut fastrand::Rng, n: usize, leader: Option<usize>) -> Fault {
        let leader = leader.unwrap_or_else(|| rng.usize(..n));
        let other = (leader + rng.usize(1..n)) % n;
        match rng.usize(..7) {
            0 => Fault::Kill { node: other, leader: false },
            1 => Fault::Kill { node: leader, leader: true },
            2 => Fault::PauseLeader { node: leader },
            3 => Fault::IsolateLeader { node: leader },
            4 => {
                let mut nodes: Vec<usize> = (0..n).collect();
                rng.shuffle(&mut nodes);
                nodes.truncate(rng.usize(1..=(n - 1) / 2));
                nodes.sort_unstable();
                Fault::Split { minority: nodes }
            }
            5 if rng.bool() => Fault::OneWay { from: leader, to: other },
            5 => Fault::OneWay { from: other, to: leader },
            _ => Fault::KillAll,
        }
    }

    /// How long it lasts: a pause must outlast the 600 ms election timeout.
    fn duration(&self, rng: &mut fastrand::Rng) -> Duration {
        let ms = match self {
            Fault::Kill { .. } | Fault::KillAll => rng.u64(300..2000),
            Fault::PauseLeader { .. } => rng.u64(1000..2500),
            Fault::IsolateLeader { .. } | Fault::Split { .. } | Fault::OneWay { .. } => rng.u64(1000..3000),
        };
        Duration::from_millis(ms)
    }

    fn inject(&self, cluster: &mut ChaosCluster) {
        match self {
            Fault::Kill { node, .. } => cluster.nodes.kill(*node),
            Fault::PauseLeader { node } => cluster.nodes.signal(*node, libc::SIGSTOP),
            Fault::IsolateLeader { node } => cluster.network.apply(|from, to| from == *node || to == *node),
            Fault::Split { minority } => {
                cluster.network.apply(|from, to| minority.contains(&from) != minority.contains(&to))
            }
            Fault::OneWay { from, to } => cluster.network.apply(|a, b| (a, b) == (*from, *to)),
            Fault::KillAll => (0..cluster.size()).for_each(|id| cluster.nodes.kill(id)),
        }
    }

    fn heal(&self, cluster: &mut ChaosCluster) {
        match self {
            Fault::Kill { node, .. } => cluster.restart(*node),
            Fault::PauseLeader { node } => cluster.nodes.signal(*node, libc::SIGCONT),
            Fault::IsolateLeader { .. } | Fault::Split { .. } | Fault::OneWay { .. } => cluster.network.heal(),
            Fault::KillAll => (0..cluster.size()).for_each(|id| cluster.restart(id)),
        }
    }

    /// Whether the fault takes the leader away, starting a failover.
    pub fn removes_leader(&self) -> bool {
        matches!(
            self,
            Fault::Kill { leader: true, .. } | Fault::PauseLeader { .. } | Fault::IsolateLeader { .. } | Fault::KillAll
        )
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Kill { node, leader: true } => write!(f, "kill -9 leader {node}"),
            Fault::Kill { node, leader: false } => write!(f, "kill -9 follower {node}"),
            Fault::PauseLeader { node } => write!(f, "SIGSTOP leader {node}"),
            Fault::IsolateLeader { node } => write!(f, "isolate leader {node}"),
            Fault::Split { minority } => write!(f, "split off minority {minority:?}"),
            Fault::OneWay { from, to } => write!(f, "one-way: {from} cannot reach {to}"),
            Fault::KillAll => write!(f, "kill -9 all"),
        }
    }
}

impl fmt::Display for Scheduled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:7.3}s – {:7.3}s  {}", self.start.as_secs_f64(), self.healed.as_secs_f64(), self.fault)
    }
}

/// Injects faults until `until` (since `t0`), and leaves everything healed.
pub fn run(cluster: &mut ChaosCluster, rng: &mut fastrand::Rng, t0: Instant, until: Duration) -> Vec<Scheduled> {
    let mut schedule = Vec::new();
    loop {
        thread::sleep(Duration::from_millis(rng.u64(1000..2000)));
        if t0.elapsed() >= until {
            return schedule;
        }
        let fault = Fault::pick(rng, cluster.size(), cluster.leader());
        let start = t0.elapsed();
        fault.inject(cluster);
        thread::sleep(fault.duration(rng));
        fault.heal(cluster);
        schedule.push(Scheduled { fault, start, healed: t0.elapsed() });
    }
}
