//! The nemesis: one fault at a time (power losses, pauses, partitions (a
//! bridge node's too), replacing a member), each healed before the next, with quiet
//! gaps in between so the cluster can recover and serve. Fault kinds are
//! dealt from a shuffled deck, so any run of [`kinds`] faults has them all.
//! While a fault cuts the leader off or takes it away, the probes aim at it.
//! A network that drops packets (hosts of their own) adds four kinds: a
//! host whose link goes down, loss on every link, every link slowed down
//! for a while, and packets sent twice.

use std::fmt;
use std::thread;
use std::time::{Duration, Instant};

use crate::cluster::ChaosCluster;
use crate::network::Network;
use crate::probe::Probe;

/// The kinds of fault [`Fault::pick`] deals on this network.
fn kinds() -> usize {
    if Network::DROPS_PACKETS { 13 } else { 9 }
}
/// The longest SIGSTOP.
pub const LONGEST_PAUSE: Duration = Duration::from_millis(2500);

#[derive(Clone, Debug)]
pub enum Fault {
    /// Power loss: `kill -9`, and every write the node had not fsynced is
    /// gone (its state dir is on lazyfs); restarted when healed.
    PowerOff { node: usize, leader: bool },
    /// SIGSTOP for longer than an election timeout, SIGCONT when healed.
    PauseLeader { node: usize },
    /// Every link to and from the leader cut.
    IsolateLeader { node: usize },
    /// A minority cut off from the majority, in both directions.
    Split { minority: Vec<usize> },
    /// `from` cannot reach `to`; `to` still reaches `from` (requests and replies).
    OneWay { from: usize, to: usize },
    /// The others split in two halves that cannot reach each other, while
    /// `bridge` reaches both.
    Bridge { bridge: usize, halves: [Vec<usize>; 2] },
    /// Every node loses power at once; all restarted when healed.
    PowerOffAll,
    /// Member `old` (perhaps the leader) is removed and stops; when healed,
    /// a new node `new` with an empty disk joins and is promoted.
    Replace { old: usize, new: usize },
    /// A host goes away: its network link down, for peers and clients
    /// alike, its process still running; the link back up when healed.
    HostDown { node: usize, leader: bool },
    /// Every node drops this share of the packets it receives.
    Loss { percent: u32 },
    /// Every link holds each packet this long (± a fifth) each way.
    Delay { ms: u64 },
    /// Every host sends this share of its packets twice.
    Duplicate { percent: u32 },
}

/// A fault as it happened: times are since the run started.
#[derive(Clone, Debug)]
pub struct Scheduled {
    pub fault: Fault,
    /// When it was in force (see [`Fault::in_force_once_injected`]).
    pub start: Duration,
    pub healed: Duration,
}

impl Fault {
    /// A fault of `kind` (below [`kinds`]) on random `members`; `leader`
    /// is the current leader, `spare` the id a node that joins would take.
    fn pick(kind: usize, rng: &mut fastrand::Rng, members: &[usize], leader: usize, spare: Option<usize>) -> Fault {
        let others: Vec<usize> = members.iter().copied().filter(|&m| m != leader).collect();
        let other = others[rng.usize(..others.len())];
        match kind {
            0 => Fault::PowerOff { node: other, leader: false },
            1 => Fault::PowerOff { node: leader, leader: true },
            2 => Fault::PauseLeader { node: leader },
            3 => Fault::IsolateLeader { node: leader },
            4 => {
                let mut nodes = members.to_vec();
                rng.shuffle(&mut nodes);
                nodes.truncate(rng.usize(1..=(members.len() - 1) / 2));
                nodes.sort_unstable();
                Fault::Split { minority: nodes }
            }
            5 if rng.bool() => Fault::OneWay { from: leader, to: other },
            5 => Fault::OneWay { from: other, to: leader },
            6 => Fault::PowerOffAll,
            8 => {
                let mut nodes = members.to_vec();
                rng.shuffle(&mut nodes);
                let bridge = nodes.pop().expect("members");
                let mut half = nodes.split_off(nodes.len() / 2);
                nodes.sort_unstable();
                half.sort_unstable();
                Fault::Bridge { bridge, halves: [nodes, half] }
            }
            9 if rng.bool() => Fault::HostDown { node: leader, leader: true },
            9 => Fault::HostDown { node: other, leader: false },
            10 => Fault::Loss { percent: rng.u32(1..=5) },
            11 => Fault::Delay { ms: rng.u64(5..=20) },
            12 => Fault::Duplicate { percent: rng.u32(5..=30) },
            // Without a spare slot left: a power loss instead.
            _ => match spare {
                Some(new) => Fault::Replace { old: if rng.bool() { leader } else { other }, new },
                None => Fault::PowerOff { node: other, leader: false },
            },
        }
    }

    /// How long it lasts: a pause must outlast the 600 ms election timeout.
    fn duration(&self, rng: &mut fastrand::Rng) -> Duration {
        let ms = match self {
            Fault::PowerOff { .. } | Fault::PowerOffAll | Fault::Replace { .. } => rng.u64(300..2000),
            Fault::PauseLeader { .. } => rng.u64(1000..=LONGEST_PAUSE.as_millis() as u64),
            Fault::IsolateLeader { .. }
            | Fault::Split { .. }
            | Fault::OneWay { .. }
            | Fault::Bridge { .. }
            | Fault::HostDown { .. } => rng.u64(1000..3000),
            Fault::Loss { .. } | Fault::Delay { .. } | Fault::Duplicate { .. } => rng.u64(2000..4000),
        };
        Duration::from_millis(ms)
    }

    fn inject(&self, cluster: &mut ChaosCluster) {
        match self {
            Fault::PowerOff { node, .. } => cluster.nodes.power_off(*node),
            Fault::PauseLeader { node } => cluster.nodes.signal(*node, libc::SIGSTOP),
            Fault::IsolateLeader { node } => cluster.network.apply(|from, to| from == *node || to == *node),
            Fault::Split { minority } => {
                cluster.network.apply(|from, to| minority.contains(&from) != minority.contains(&to))
            }
            Fault::OneWay { from, to } => cluster.network.apply(|a, b| (a, b) == (*from, *to)),
            Fault::Bridge { halves: [one, other], .. } => cluster
                .network
                .apply(|a, b| (one.contains(&a) && other.contains(&b)) || (other.contains(&a) && one.contains(&b))),
            Fault::PowerOffAll => cluster.members.clone().into_iter().for_each(|id| cluster.nodes.power_off(id)),
            Fault::Replace { old, .. } => cluster.remove(*old),
            Fault::HostDown { node, .. } => cluster.network.set_link(*node, false),
            Fault::Loss { percent } => cluster.network.set_loss(*percent),
            Fault::Delay { ms } => cluster.network.set_delay(Some(Duration::from_millis(*ms))),
            Fault::Duplicate { percent } => cluster.network.set_duplication(*percent),
        }
    }

    fn heal(&self, cluster: &mut ChaosCluster) {
        match self {
            Fault::PowerOff { node, .. } => cluster.restart(*node),
            Fault::PauseLeader { node } => cluster.nodes.signal(*node, libc::SIGCONT),
            Fault::IsolateLeader { .. } | Fault::Split { .. } | Fault::OneWay { .. } | Fault::Bridge { .. } => {
                cluster.network.heal()
            }
            Fault::PowerOffAll => cluster.members.clone().into_iter().for_each(|id| cluster.restart(id)),
            Fault::Replace { new, .. } => assert_eq!(cluster.join(), *new),
            Fault::HostDown { node, .. } => cluster.network.set_link(*node, true),
            Fault::Loss { .. } => cluster.network.set_loss(0),
            Fault::Delay { .. } => cluster.network.set_delay(None),
            Fault::Duplicate { .. } => cluster.network.set_duplication(0),
        }
    }

    /// Whether the fault is in force only once it is wholly injected (rules
    /// loaded on every host, a link down), rather than from its first step
    /// (a kill, a signal): writes acknowledged while iptables loads rules
    /// are no failover.
    fn in_force_once_injected(&self) -> bool {
        matches!(
            self,
            Fault::IsolateLeader { .. }
                | Fault::Split { .. }
                | Fault::OneWay { .. }
                | Fault::Bridge { .. }
                | Fault::HostDown { .. }
                | Fault::Loss { .. }
                | Fault::Delay { .. }
                | Fault::Duplicate { .. }
        )
    }

    /// Whether the fault takes away a leader that was serving, leaving the
    /// others to elect a new one (not `PowerOffAll`: then all restart together).
    pub fn removes_live_leader(&self) -> bool {
        self.removes_leader() && !matches!(self, Fault::PowerOffAll)
    }

    /// The leader this fault cuts off from the others while it still runs:
    /// a deposed leader that clients can reach.
    pub fn cuts_off(&self) -> Option<usize> {
        match self {
            Fault::PauseLeader { node } | Fault::IsolateLeader { node } => Some(*node),
            _ => None,
        }
    }

    /// Whether the fault takes the leader away, starting a failover.
    pub fn removes_leader(&self) -> bool {
        matches!(
            self,
            Fault::PowerOff { leader: true, .. }
                | Fault::HostDown { leader: true, .. }
                | Fault::PauseLeader { .. }
                | Fault::IsolateLeader { .. }
                | Fault::PowerOffAll
        )
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::PowerOff { node, leader: true } => write!(f, "power loss of leader {node}"),
            Fault::PowerOff { node, leader: false } => write!(f, "power loss of follower {node}"),
            Fault::PauseLeader { node } => write!(f, "SIGSTOP leader {node}"),
            Fault::IsolateLeader { node } => write!(f, "isolate leader {node}"),
            Fault::Split { minority } => write!(f, "split off minority {minority:?}"),
            Fault::OneWay { from, to } => write!(f, "one-way: {from} cannot reach {to}"),
            Fault::Bridge { bridge, halves: [one, other] } => {
                write!(f, "bridge: {bridge} reaches {one:?} and {other:?}, which cannot reach each other")
            }
            Fault::PowerOffAll => write!(f, "power loss of every node"),
            Fault::Replace { old, new } => write!(f, "replace member {old} by a new node {new}"),
            Fault::HostDown { node, leader: true } => write!(f, "link down: leader {node}'s host goes away"),
            Fault::HostDown { node, leader: false } => write!(f, "link down: follower {node}'s host goes away"),
            Fault::Loss { percent } => write!(f, "{percent}% packet loss on every link"),
            Fault::Delay { ms } => write!(f, "{ms} ms delay each way on every link"),
            Fault::Duplicate { percent } => write!(f, "{percent}% of the packets sent twice on every link"),
        }
    }
}

impl fmt::Display for Scheduled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:7.3}s – {:7.3}s  {}", self.start.as_secs_f64(), self.healed.as_secs_f64(), self.fault)
    }
}

/// Injects faults until `until` (since `t0`), and leaves everything healed.
/// The probes run while each fault lasts, and finish after it heals.
pub fn run(
    cluster: &mut ChaosCluster,
    probes: &mut [Probe],
    rng: &mut fastrand::Rng,
    t0: Instant,
    until: Duration,
) -> Vec<Scheduled> {
    let mut schedule = Vec::new();
    let mut deck = Vec::new();
    loop {
        thread::sleep(Duration::from_millis(rng.u64(1000..2000)));
        if t0.elapsed() >= until {
            return schedule;
        }
        if deck.is_empty() {
            deck.extend(0..kinds());
            rng.shuffle(&mut deck);
        }
        let kind = deck.pop().expect("refilled");
        // Each fault strikes a cluster that has recovered from the last one
        // (after a power loss of all it takes about 2 s to serve again): a failover then
        // measures its own fault, and "the leader" is the one that leads.
        let leader = cluster.wait_for_leader();
        let fault = Fault::pick(kind, rng, &cluster.members, leader, cluster.spare());
        let members = cluster.members.clone();
        probes.iter_mut().for_each(|probe| probe.before(&fault, leader));
        let before = t0.elapsed();
        fault.inject(cluster);
        let start = if fault.in_force_once_injected() { t0.elapsed() } else { before };
        let healed = thread::scope(|s| {
            let fault = &fault;
            let members = &members;
            let probing: Vec<_> =
                probes.iter_mut().map(|probe| s.spawn(move || probe.during(fault, leader, members))).collect();
            thread::sleep(fault.duration(rng));
            fault.heal(cluster);
            let healed = t0.elapsed();
            probing.into_iter().for_each(|probe| probe.join().expect("a probe panicked"));
            healed
        });
        schedule.push(Scheduled { fault, start, healed });
    }
}
