//! The simulated cluster: nodes, network, clients and faults driven by one
//! agenda on a virtual clock. Every fact the run produces goes through the
//! checker the moment it happens; the first violation panics with the seed,
//! the recent trace and the command that replays it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use raft_zmq::raft::{CoreConfig, Index, LogStore, MembershipChange, Message, NodeId, Raft, Role};
use raft_zmq::wire::protocol::{ErrorCode, Request};

use super::checker::{Check, Checker, Violation};
use super::faults::{Fault, Partition};
use super::history::{History, OpId, OpKind, Outcome};
use super::network::{NetProfile, Network};
use super::node::{Completion, Effects, Forwarded, SimNode, SnapshotRegistry};
use super::register::{Action, Held, KEYS, Key, Write, WriteResult};
use super::rng::Rng;
use super::schedule::{MS, Schedule, Time};
use super::storage::{Disk, sim_member};
use super::trace::{Event as Traced, Trace};

/// Nominal time between two ticks; each node's clock drifts from it.
const TICK: Time = 10 * MS;
/// How long the transport waits for a reply before reporting the peer
/// unreachable to the core.
const TRANSPORT_TIMEOUT: Time = 3 * TICK;
/// Gap between two client operations.
const CLIENT_GAP: (Time, Time) = (MS, 20 * MS);
/// While chaos goes on, every time the cluster becomes whole again (every
/// node up and running, no partition) and stays so this long, a write and a
/// read invoked since must have completed: five maximum election timeouts,
/// through whatever loss, delay and duplication the network has. Not with
/// one entry per AppendEntries (`max_append_bytes` 1, there to exercise log
/// matching entry by entry): replicating one entry per round trip, a
/// follower's backlog can take longer than any fixed bound while clients
/// keep adding.
const HEALED_BOUND: Time = 1_000 * MS;
/// Twice as long through the harshest networks, or with membership churn:
/// checked at `HEALED_BOUND` all the same, a run that has not recovered by
/// then gets the rest. Harsh (20% loss, or 5% of messages straggling up to 500 ms), seen at 1 s
/// in 1 run of about 150,000: stragglers and losses cut a new leader off
/// from both followers for a CheckQuorum period, and the next three
/// elections lost their vote requests. Churn: up to six voters (four of
/// them a majority to gather through a lossy network), and changes racing
/// with the election (a leader that removed itself hands over; a promotion
/// grows the quorum); seen at 1 s in 1 run of 2,000 with six voters and 20%
/// loss.
const HEALED_BOUND_SLOW: Time = 2_000 * MS;
/// With membership churn: nodes beyond the initial ones that can be added
/// (each once: ids are never reused).
const SPARE_NODES: u64 = 4;
/// With membership churn: the share of faults that are membership changes.
const CHANGE_SHARE: f64 = 0.3;
/// How long a node's sync thread takes to make its pending writes durable:
/// events keep coming meanwhile, acknowledgements wait, and a crash finds
/// writes not yet synced.
const SYNC_DELAY: (Time, Time) = (100, 3 * MS);

#[derive(Clone, Debug)]
pub struct Params {
    pub nodes: u64,
    pub pre_vote: bool,
    pub check_quorum: bool,
    /// Bytes per AppendEntries; tiny values send one entry at a time.
    pub max_append_bytes: usize,
    pub net: NetProfile,
    /// Chance that a Ready round which must sync crashes the node between
    /// sending its `messages` and the sync, while chaos is on.
    pub torn_crash: f64,
    /// Gap between two random faults while chaos is on.
    pub fault_gap: (Time, Time),
    /// Chance per tick that a node snapshots its state machine and
    /// compacts its log, so that lagging followers get snapshots.
    pub compaction: f64,
    /// Nodes are added (with fresh disks, often as ids removed before) and
    /// removed (the leader too) while faults go on; the voters never drop
    /// below three.
    pub churn: bool,
}

impl Params {
    /// A reliable network, and no faults unless a scenario injects them or
    /// starts chaos.
    pub fn calm(nodes: u64, pre_vote: bool, check_quorum: bool) -> Params {
        Params {
            nodes,
            pre_vote,
            check_quorum,
            max_append_bytes: 1 << 20,
            net: NetProfile::CALM,
            torn_crash: 0.0,
            fault_gap: (100 * MS, 1_000 * MS),
            compaction: 0.0,
            churn: false,
        }
    }
}

/// Where the background clients send their operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clients {
    Off,
    /// Mostly to a node that believes it leads (stale ones included).
    Leaders,
    /// Always to this node, as a client that knows no better.
    Stuck(NodeId),
}

enum Event {
    Tick(NodeId),
    Deliver(Message),
    /// A client request a follower forwards to the leader it knows.
    Forward {
        from: NodeId,
        forwarded: Forwarded,
    },
    /// The transport gave up waiting on a request between `node` and `peer`.
    Unreachable {
        node: NodeId,
        peer: NodeId,
        incarnation: u64,
    },
    Client,
    /// A client sends the write `of` again, after it failed.
    Retry {
        write: Write,
        of: OpId,
    },
    Fault,
    /// Heals the partition of this generation, if it is still in force.
    Heal(u64),
    Restart(NodeId),
    /// A node asked to stop cleanly looks again whether it may exit.
    Stopping {
        node: NodeId,
        incarnation: u64,
        downtime: Time,
    },
    /// The cluster has been whole for `HEALED_BOUND`, unless the generation
    /// moved on (something failed meanwhile).
    WholeFor(u64),
    /// A node's sync thread made the writes pending when it began durable.
    Synced {
        node: NodeId,
        incarnation: u64,
    },
}

/// What a run did, to see that it did something.
pub struct Summary {
    pub events: u64,
    /// Terms that had a leader.
    pub terms: usize,
    pub acked: usize,
    pub read: usize,
    pub failed: usize,
    pub crashes: usize,
    /// Snapshots installed from a leader.
    pub installs: usize,
    /// Retried writes the session check skipped (on any node).
    pub duplicates: usize,
    /// Heals during chaos after which liveness was checked.
    pub heals: usize,
    /// Membership changes asked of a leader.
    pub changes: usize,
    /// Clean stops (a leader's hand-over, writes in flight answered).
    pub stops: usize,
    /// Acknowledged cas that swapped, and that did not.
    pub swapped: usize,
    pub not_swapped: usize,
    /// Acknowledged deletes of a key that existed.
    pub deleted: usize,
    /// Acknowledged session-less writes.
    pub sessionless: usize,
    /// Operations sent to a follower, forwarded, and served by the leader.
    pub forwarded: usize,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let Summary {
            events, terms, acked, read, failed, crashes, installs, duplicates, heals, changes, stops, ..
        } = self;
        let Summary { swapped, not_swapped, deleted, sessionless, forwarded, .. } = self;
        write!(
            f,
            "{events} events, {terms} terms with a leader, {acked} writes acknowledged ({swapped} cas swapped, \
             {not_swapped} not, {deleted} deletes of a key present, {sessionless} without a session), \
             {read} reads served, {failed} operations failed, {crashes} crashes, {installs} snapshots installed, \
             {duplicates} duplicate writes skipped, {heals} heals checked for liveness, \
             {changes} membership changes, {stops} clean stops, {forwarded} operations forwarded and served"
        )
    }
}

pub struct Cluster {
    params: Params,
    /// Printed with a failure: how to replay this exact run.
    rerun: String,
    nodes: BTreeMap<NodeId, SimNode>,
    /// Nodes that applied their own removal and exited; they stay down
    /// unless added again (with a fresh disk).
    exited: BTreeSet<NodeId>,
    network: Network,
    schedule: Schedule<Event>,
    rng: Rng,
    checker: Checker,
    history: History,
    trace: Trace,
    clients: Clients,
    chaos_until: Time,
    partition_generation: u64,
    /// The latest acknowledged write, for the liveness check.
    last_ack: Option<(OpId, Index)>,
    /// The latest read served, for the liveness check.
    last_read: Option<OpId>,
    /// What the latest read of each key returned: what a cas expects.
    seen: BTreeMap<Key, Held>,
    /// Since when every node is up and running and no link is cut, if so
    /// (`Some(0)` at the start: only a heal after a fault counts).
    whole_since: Option<Time>,
    whole_generation: u64,
    /// Liveness checks passed after a heal in the middle of chaos.
    heals_checked: usize,
    events: u64,
    crashes: usize,
    installs: usize,
    duplicates: usize,
    /// Membership changes asked of the leader.
    changes: usize,
    stops: usize,
    /// Client operations a follower forwarded to a leader, still unanswered;
    /// and how many of those the leader answered with success.
    forwarded: BTreeSet<OpId>,
    forwarded_served: usize,
}

impl Cluster {
    /// A cluster whose node `i` starts from `disks[i - 1]`; with churn,
    /// spare nodes with empty disks wait to be added.
    pub fn new(mut rng: Rng, params: Params, mut disks: Vec<Disk>, rerun: String) -> Cluster {
        assert_eq!(disks.len() as u64, params.nodes);
        if params.churn {
            disks.extend((0..SPARE_NODES).map(|_| Disk::default()));
        }
        let mut schedule = Schedule::new();
        let mut nodes = BTreeMap::new();
        let snapshots = SnapshotRegistry::default();
        for (id, mut disk) in (1..).zip(disks) {
            disk.snapshots = snapshots.clone();
            let cfg = CoreConfig {
                id,
                election_ticks: (10, 20),
                heartbeat_ticks: 2,
                max_append_bytes: params.max_append_bytes,
                max_apply_bytes: params.max_append_bytes,
                // Each node its own: one at a time, or a window.
                max_inflight_appends: rng.range(1, 3) as usize,
                pre_vote: params.pre_vote,
                check_quorum: params.check_quorum,
                seed: rng.next_u64(),
            };
            let tick_period = TICK * rng.range(900, 1100) / 1000;
            schedule.after(rng.range(0, tick_period), Event::Tick(id));
            nodes.insert(id, SimNode::new(cfg, disk, tick_period));
        }
        Cluster {
            network: Network::new(params.net),
            params,
            rerun,
            nodes,
            exited: BTreeSet::new(),
            schedule,
            rng,
            checker: Checker::default(),
            history: History::default(),
            trace: Trace::default(),
            clients: Clients::Off,
            chaos_until: 0,
            partition_generation: 0,
            last_ack: None,
            last_read: None,
            seen: BTreeMap::new(),
            whole_since: Some(0),
            whole_generation: 0,
            heals_checked: 0,
            events: 0,
            crashes: 0,
            installs: 0,
            duplicates: 0,
            changes: 0,
            stops: 0,
            forwarded: BTreeSet::new(),
            forwarded_served: 0,
        }
    }

    // ----- driving --------------------------------------------------------

    pub fn now(&self) -> Time {
        self.schedule.now()
    }

    pub fn summary(&self) -> Summary {
        let ops = self.history.ops();
        let count = |outcome: fn(&Outcome) -> bool| ops.iter().filter(|op| outcome(&op.outcome)).count();
        let sessionless = ops
            .iter()
            .filter(|op| matches!(op.outcome, Outcome::Acked(_)))
            .filter(|op| op.kind.written(0).is_some_and(|(write, _)| !write.session))
            .count();
        Summary {
            events: self.events,
            terms: self.checker.leader_terms(),
            acked: count(|o| matches!(o, Outcome::Acked(_))),
            read: count(|o| matches!(o, Outcome::Read(_))),
            failed: count(|o| *o == Outcome::Failed),
            crashes: self.crashes,
            installs: self.installs,
            duplicates: self.duplicates,
            heals: self.heals_checked,
            changes: self.changes,
            stops: self.stops,
            swapped: count(|o| *o == Outcome::Acked(WriteResult::Cas { swapped: true, current: None })),
            not_swapped: count(|o| matches!(o, Outcome::Acked(WriteResult::Cas { swapped: false, .. }))),
            deleted: count(|o| *o == Outcome::Acked(WriteResult::Delete { existed: true })),
            sessionless,
            forwarded: self.forwarded_served,
        }
    }

    pub fn run_for(&mut self, duration: Time) {
        self.run_until(self.now() + duration, |_| false);
    }

    /// Runs until `done` holds (true) or the clock reaches `deadline` (false).
    pub fn run_until(&mut self, deadline: Time, done: impl Fn(&Cluster) -> bool) -> bool {
        while let Some(event) = self.schedule.pop_until(deadline) {
            self.events += 1;
            self.handle(event);
            if done(self) {
                return true;
            }
        }
        false
    }

    pub fn set_clients(&mut self, clients: Clients) {
        if self.clients == Clients::Off && clients != Clients::Off {
            self.schedule.after(0, Event::Client);
        }
        self.clients = clients;
    }

    /// Injects random faults for `duration`.
    pub fn start_chaos(&mut self, duration: Time) {
        self.chaos_until = self.now() + duration;
        self.schedule.after(self.rng.range(self.params.fault_gap.0, self.params.fault_gap.1), Event::Fault);
    }

    /// The end of all faults: the network heals and calms down, paused
    /// nodes resume and crashed ones restart.
    pub fn heal_all(&mut self) {
        self.chaos_until = self.now();
        self.heal_network();
        self.network.profile = NetProfile::CALM;
        for id in self.nodes.keys().copied().collect::<Vec<_>>() {
            self.nodes.get_mut(&id).expect("member").paused_until = 0;
            self.restart(id);
        }
    }

    /// After the last fault healed, a leader must be elected and a write
    /// invoked from now on acknowledged and applied by every node within
    /// `bound` of virtual time.
    pub fn await_liveness(&mut self, bound: Time) {
        let start = self.now();
        if self.clients == Clients::Off {
            self.set_clients(Clients::Leaders);
        }
        let live = |c: &Cluster| {
            c.last_ack.is_some_and(|(op, index)| {
                c.history.ops()[op as usize].invoked >= start
                    && c.members().iter().all(|id| c.nodes[id].applied() >= index)
            })
        };
        if !self.run_until(start + bound, live) {
            let applied: BTreeMap<NodeId, Index> =
                self.members().iter().map(|&id| (id, self.nodes[&id].applied())).collect();
            let detail = format!(
                "no write invoked after the heal at {start}us was acknowledged and applied everywhere within \
                 {bound}us (leader now: {:?}; members applied {applied:?}, last ack {:?})",
                self.leader(),
                self.last_ack
            );
            self.fail(Violation { rule: "liveness", detail });
        }
    }

    // ----- scripted faults and clients -------------------------------------

    pub fn partition(&mut self, partition: Partition) {
        self.trace.record(self.now(), Traced::Fault(Fault::Partition(partition)));
        self.partition_generation += 1;
        let all: Vec<NodeId> = self.nodes.keys().copied().collect();
        self.network.set_cut(partition.cut_links(&all));
    }

    pub fn heal_network(&mut self) {
        self.trace.record(self.now(), Traced::Healed);
        self.partition_generation += 1;
        self.network.set_cut(BTreeSet::new());
    }

    pub fn crash(&mut self, id: NodeId) {
        let mut fx = Effects::default();
        self.nodes.get_mut(&id).expect("member").crash(&mut fx);
        self.trace.record(self.now(), Traced::Crashed { node: id, torn: false });
        self.crashes += 1;
        self.absorb(id, fx);
        self.checker.restarted(id);
    }

    /// Restarts `id` from its disk, if it is down (and did not exit).
    pub fn restart(&mut self, id: NodeId) {
        let seed = self.rng.next_u64();
        let node = self.nodes.get_mut(&id).expect("member");
        if !node.is_up() && !self.exited.contains(&id) {
            node.restart(seed);
            let start = node.disk().log_start();
            self.trace.record(self.now(), Traced::Restarted(id));
            if start.index > 0 {
                let check = self.checker.restored(id, start);
                self.check(check);
            }
            self.process(id, Effects::default());
        }
    }

    /// Fires `id`'s election timer now, as if it had drawn the shortest
    /// timeout, so a scenario can choose who campaigns first.
    pub fn expire_election_timer(&mut self, id: NodeId) {
        let now = self.now();
        let node = self.nodes.get_mut(&id).expect("member");
        let before = node.raft().expect("node is up").soft_state();
        assert_ne!(before.role, Role::Leader, "a leader has no election timer");
        while node.raft().expect("node is up").soft_state() == before {
            node.tick(now);
        }
        self.process(id, Effects::default());
    }

    /// A client operation sent to `id`.
    pub fn submit(&mut self, id: NodeId, kind: OpKind) -> OpId {
        let now = self.now();
        let op = self.history.invoke(kind, id, now);
        self.trace.record(now, Traced::Invoked { op, kind, node: id });
        if let Some((_, value)) = kind.written(op) {
            self.checker.write_sent(value, op, now);
        }
        let mut fx = Effects::default();
        self.nodes.get_mut(&id).expect("member").submit(op, kind, now, &mut fx);
        self.process(id, fx);
        op
    }

    // ----- observing ------------------------------------------------------

    pub fn node(&self, id: NodeId) -> &SimNode {
        &self.nodes[&id]
    }

    pub fn raft(&self, id: NodeId) -> &Raft<Disk> {
        self.nodes[&id].raft().expect("node is up")
    }

    pub fn history(&self) -> &History {
        &self.history
    }

    /// The members as the leader sees them (voters and learners), or as the
    /// most advanced node with a membership does when there is no leader.
    pub fn members(&self) -> Vec<NodeId> {
        let up = self.nodes.values().filter_map(|n| n.raft()).filter(|r| !r.membership().voters.is_empty());
        let judge = self.leader().map(|id| self.raft(id)).or_else(|| up.max_by_key(|r| r.commit_index()));
        match judge {
            Some(raft) => raft.membership().ids().collect(),
            None => self.nodes.keys().copied().filter(|id| !self.exited.contains(id)).collect(),
        }
    }

    /// The up node that believes it leads the highest term.
    pub fn leader(&self) -> Option<NodeId> {
        let leaders = self.nodes.values().filter_map(|n| n.raft()).map(|r| r.soft_state());
        leaders.filter(|s| s.role == Role::Leader).max_by_key(|s| s.term).and_then(|s| s.leader)
    }

    // ----- events ---------------------------------------------------------

    fn handle(&mut self, event: Event) {
        let now = self.now();
        match event {
            Event::Tick(id) => {
                let node = self.nodes.get_mut(&id).expect("member");
                let next = if node.paused_until > now {
                    node.paused_until - now
                } else {
                    if node.is_up() {
                        node.tick(now);
                        if self.params.compaction > 0.0 && self.rng.chance(self.params.compaction) {
                            node.operator(Request::Snapshot, now);
                        }
                        self.process(id, Effects::default());
                    }
                    let period = self.nodes[&id].tick_period;
                    self.rng.range(period * 95 / 100, period * 105 / 100)
                };
                self.schedule.after(next, Event::Tick(id));
            }
            Event::Deliver(m) => {
                let node = &self.nodes[&m.to];
                if self.network.is_cut(m.from, m.to) {
                    self.dropped(&m, "partition");
                } else if !node.is_up() {
                    self.dropped(&m, "receiver down");
                } else if node.paused_until > now {
                    self.schedule.after(node.paused_until - now, Event::Deliver(m));
                } else {
                    let id = m.to;
                    self.trace.record(now, Traced::Delivered((&m).into()));
                    self.nodes.get_mut(&id).expect("up").step(m, now);
                    self.process(id, Effects::default());
                }
            }
            Event::Forward { from, forwarded } => {
                let Forwarded { op, leader, request } = forwarded;
                let node = &self.nodes[&leader];
                if self.network.is_cut(from, leader) || !node.is_up() {
                    // The follower's endpoint hears nothing back in time.
                    self.complete(Completion::Failed(op, Some(ErrorCode::Timeout)));
                } else if node.paused_until > now {
                    let forwarded = Forwarded { op, leader, request };
                    self.schedule.after(node.paused_until - now, Event::Forward { from, forwarded });
                } else {
                    self.forwarded.insert(op);
                    let mut fx = Effects::default();
                    self.nodes.get_mut(&leader).expect("up").submit_forwarded(op, request, now, &mut fx);
                    self.process(leader, fx);
                }
            }
            Event::Unreachable { node: id, peer, incarnation } => {
                let node = self.nodes.get_mut(&id).expect("member");
                if node.paused_until > now {
                    self.schedule.after(node.paused_until - now, Event::Unreachable { node: id, peer, incarnation });
                } else if node.incarnation == incarnation && node.is_up() {
                    node.peer_unreachable(peer);
                    self.process(id, Effects::default());
                }
            }
            Event::Client => self.client_op(None),
            Event::Retry { write, of } => self.client_op(Some(OpKind::Retry(write, of))),
            Event::Fault if now < self.chaos_until => {
                if self.params.churn && self.rng.chance(CHANGE_SHARE) {
                    self.change_membership();
                } else {
                    let leader = self.leader();
                    let members = self.members();
                    let (fault, duration) = Fault::random(&mut self.rng, &members, leader);
                    self.inject(fault, duration);
                }
                self.schedule.after(self.rng.range(self.params.fault_gap.0, self.params.fault_gap.1), Event::Fault);
            }
            Event::Fault => {}
            Event::Heal(generation) => {
                if generation == self.partition_generation {
                    self.heal_network();
                }
            }
            Event::Restart(id) => self.restart(id),
            Event::Stopping { node, incarnation, downtime } => self.stopping(node, incarnation, downtime),
            Event::Synced { node: id, incarnation } => {
                let node = self.nodes.get_mut(&id).expect("member");
                if node.paused_until > now {
                    self.schedule.after(node.paused_until - now, Event::Synced { node: id, incarnation });
                } else if node.incarnation == incarnation && node.is_up() {
                    node.sync_scheduled = false;
                    self.process_syncing(id, true, Effects::default());
                }
            }
            Event::WholeFor(generation) => {
                if generation == self.whole_generation
                    && let Some(since) = self.whole_since
                {
                    self.check_live_since(since);
                }
            }
        }
        self.track_wholeness();
    }

    /// Notes when the cluster becomes whole during chaos (and schedules the
    /// liveness check), and when it stops being whole.
    fn track_wholeness(&mut self) {
        let now = self.now();
        let whole = now < self.chaos_until
            && self.clients != Clients::Off
            && self.params.max_append_bytes > 1
            && self.network.is_whole()
            && self.members().iter().all(|id| self.nodes[id].is_up() && self.nodes[id].paused_until <= now);
        match (whole, self.whole_since) {
            (true, None) => {
                self.whole_since = Some(now);
                self.whole_generation += 1;
                self.schedule.after(HEALED_BOUND, Event::WholeFor(self.whole_generation));
            }
            (false, Some(_)) => {
                self.whole_since = None;
                self.whole_generation += 1;
            }
            _ => {}
        }
    }

    fn healed_bound(&self) -> Time {
        let net = self.params.net;
        let harsh = net.loss >= 0.2 || net.straggle >= 0.05;
        if self.params.churn || harsh { HEALED_BOUND_SLOW } else { HEALED_BOUND }
    }

    fn check_live_since(&mut self, since: Time) {
        let invoked_since = |op: OpId| self.history.ops()[op as usize].invoked >= since;
        let wrote = self.last_ack.is_some_and(|(op, _)| invoked_since(op));
        let read = self.last_read.is_some_and(invoked_since);
        let waited = self.now() - since;
        if !(wrote && read) && waited < self.healed_bound() {
            self.schedule.after(self.healed_bound() - waited, Event::WholeFor(self.whole_generation));
            return;
        }
        if !(wrote && read) {
            let detail = format!(
                "the cluster has been whole since {since}us, but in {}us no {} invoked since completed \
                 (leader now: {:?})",
                self.healed_bound(),
                if wrote { "read" } else { "write" },
                self.leader()
            );
            self.fail(Violation { rule: "liveness after a heal", detail });
        }
        self.heals_checked += 1;
    }

    fn inject(&mut self, fault: Fault, duration: Time) {
        match fault {
            Fault::Partition(partition) => {
                self.partition(partition);
                self.schedule.after(duration, Event::Heal(self.partition_generation));
            }
            Fault::Crash(id) if self.nodes[&id].is_up() => {
                self.crash(id);
                self.schedule.after(duration, Event::Restart(id));
            }
            Fault::Pause(id) if self.nodes[&id].is_up() => {
                self.trace.record(self.now(), Traced::Fault(fault));
                let node = self.nodes.get_mut(&id).expect("member");
                node.paused_until = node.paused_until.max(self.schedule.now() + duration);
            }
            Fault::Stop(id) if self.nodes[&id].is_up() => {
                self.trace.record(self.now(), Traced::Stopping(id));
                let incarnation = self.nodes[&id].incarnation;
                self.stopping(id, incarnation, duration);
            }
            Fault::Crash(_) | Fault::Pause(_) | Fault::Stop(_) => {}
            Fault::Transfer(to) => {
                let now = self.now();
                let Some(leader) = self.leader().filter(|&l| l != to && self.nodes[&l].paused_until <= now) else {
                    return;
                };
                self.trace.record(now, Traced::Fault(fault));
                // Refused for a learner, which may not lead.
                let request = Request::TransferLeader { to: Some(to) };
                self.nodes.get_mut(&leader).expect("leader is up").operator(request, now);
                self.process(leader, Effects::default());
            }
        }
    }

    /// Node `id`, asked to stop, exits once its server says it may (a
    /// leader hands over first) and comes back after `downtime`.
    fn stopping(&mut self, id: NodeId, incarnation: u64, downtime: Time) {
        let now = self.now();
        let node = self.nodes.get_mut(&id).expect("member");
        if node.incarnation != incarnation || !node.is_up() {
            return;
        }
        let next = Event::Stopping { node: id, incarnation, downtime };
        if node.paused_until > now {
            return self.schedule.after(node.paused_until - now, next);
        }
        let mut fx = Effects::default();
        if node.stop(now, &mut fx) {
            self.trace.record(now, Traced::Stopped(id));
            self.stops += 1;
            self.absorb(id, fx);
            self.checker.restarted(id);
            self.schedule.after(downtime, Event::Restart(id));
        } else {
            self.absorb(id, fx);
            self.process(id, Effects::default());
            self.schedule.after(TICK, next);
        }
    }

    /// An operator's membership change, racing with the faults: adds a node
    /// that is not a member (on a fresh disk: a new machine, or a dead one
    /// replaced under the same id), usually to be promoted, or removes a
    /// member, the leader included, keeping at least three voters.
    fn change_membership(&mut self) {
        let now = self.now();
        let Some(leader) = self.leader().filter(|&l| self.nodes[&l].paused_until <= now) else { return };
        let membership = self.raft(leader).membership().clone();
        let outsiders: Vec<NodeId> = self
            .nodes
            .keys()
            .copied()
            .filter(|&id| !membership.contains(id) && !membership.removed.contains(&id))
            .collect();
        let change = if !outsiders.is_empty() && (membership.voters.len() <= 3 || self.rng.chance(0.5)) {
            let id = self.rng.pick(&outsiders);
            self.wipe(id);
            MembershipChange::AddLearner { id, promote: self.rng.chance(0.8) }
        } else {
            let removable: Vec<NodeId> =
                membership.ids().filter(|&id| !membership.is_voter(id) || membership.voters.len() > 3).collect();
            if removable.is_empty() {
                return;
            }
            let removed =
                if removable.contains(&leader) && self.rng.chance(0.3) { leader } else { self.rng.pick(&removable) };
            MembershipChange::Remove(removed)
        };
        let request = match change {
            MembershipChange::AddLearner { id, promote } => Request::AddNode { member: sim_member(id), voter: promote },
            MembershipChange::Remove(id) => Request::RemoveNode { id },
            other => unreachable!("not asked for: {other:?}"),
        };
        self.nodes.get_mut(&leader).expect("leader is up").operator(request, now);
        self.trace.record(now, Traced::Change { leader, change });
        self.changes += 1;
        self.process(leader, Effects::default());
    }

    /// Node `id` starts over on an empty disk, waiting to be added.
    fn wipe(&mut self, id: NodeId) {
        let seed = self.rng.next_u64();
        let mut fx = Effects::default();
        self.nodes.get_mut(&id).expect("a node").wipe(seed, &mut fx);
        self.exited.remove(&id);
        self.trace.record(self.now(), Traced::Wiped(id));
        self.checker.restarted(id);
        self.absorb(id, fx);
    }

    /// A new operation, or `retry`, sent to a node chosen as `clients` says.
    fn client_op(&mut self, retry: Option<OpKind>) {
        let now = self.now();
        let available: Vec<NodeId> = self
            .members()
            .into_iter()
            .filter(|id| self.nodes[id].is_up() && self.nodes[id].paused_until <= now)
            .collect();
        let target = match self.clients {
            Clients::Off => return,
            Clients::Stuck(id) => Some(id).filter(|id| available.contains(id)),
            Clients::Leaders => {
                let leaders: Vec<NodeId> =
                    available.iter().copied().filter(|&id| self.raft(id).soft_state().role == Role::Leader).collect();
                let pool = if leaders.is_empty() || self.rng.chance(0.1) { &available } else { &leaders };
                (!pool.is_empty()).then(|| self.rng.pick(pool))
            }
        };
        if let Some(retry) = retry {
            if let Some(id) = target {
                self.submit(id, retry);
            }
            return;
        }
        if let Some(id) = target {
            let key = self.rng.pick(&KEYS);
            let kind = if self.rng.chance(0.6) { OpKind::Write(self.new_write(key)) } else { OpKind::Read(key) };
            self.submit(id, kind);
        }
        self.schedule.after(self.rng.range(CLIENT_GAP.0, CLIENT_GAP.1), Event::Client);
    }

    /// Half puts, a third cas (expecting what the last read of the key
    /// returned, or the key absent), the rest deletes; a quarter of the puts
    /// and cas without a session.
    fn new_write(&mut self, key: Key) -> Write {
        let action = match self.rng.range(0, 6) {
            0..=2 => Action::Put,
            3 | 4 if self.rng.chance(0.7) => Action::Cas(self.seen.get(&key).copied().flatten()),
            3 | 4 => Action::Cas(None),
            _ => Action::Delete,
        };
        let session = action == Action::Delete || self.rng.chance(0.75);
        Write { key, action, session }
    }

    fn send(&mut self, m: Message) {
        let mut delays = self.network.delays(&mut self.rng);
        let Some(last) = delays.pop() else { return self.dropped(&m, "lost") };
        for delay in delays {
            self.schedule.after(delay, Event::Deliver(m.clone()));
        }
        self.schedule.after(last, Event::Deliver(m));
    }

    /// A message that never arrives leaves a request unanswered; the
    /// requester's transport notices after a timeout.
    fn dropped(&mut self, m: &Message, why: &'static str) {
        self.trace.record(self.now(), Traced::Dropped(m.into(), why));
        let (requester, peer) = if m.body.is_request() { (m.from, m.to) } else { (m.to, m.from) };
        let incarnation = self.nodes[&requester].incarnation;
        self.schedule.after(TRANSPORT_TIMEOUT, Event::Unreachable { node: requester, peer, incarnation });
    }

    fn process(&mut self, id: NodeId, fx: Effects) {
        self.process_syncing(id, false, fx);
    }

    /// Processes, first finishing the node's pending syncs if `sync_now`;
    /// schedules the next sync if writes are left pending.
    fn process_syncing(&mut self, id: NodeId, sync_now: bool, mut fx: Effects) {
        let torn_crash = self.now() < self.chaos_until && self.rng.chance(self.params.torn_crash);
        let node = self.nodes.get_mut(&id).expect("member");
        node.process(torn_crash, sync_now, &mut fx);
        if node.has_unsynced() && !node.sync_scheduled {
            node.sync_scheduled = true;
            let next = Event::Synced { node: id, incarnation: node.incarnation };
            self.schedule.after(self.rng.range(SYNC_DELAY.0, SYNC_DELAY.1), next);
        }
        self.absorb(id, fx);
    }

    /// Routes what a node did and checks every fact it produced.
    fn absorb(&mut self, id: NodeId, fx: Effects) {
        let now = self.now();
        for m in fx.sent {
            self.send(m);
        }
        for forwarded in fx.forwarded {
            // One way across the network; lost like any message.
            match self.network.delays(&mut self.rng).pop() {
                Some(delay) => self.schedule.after(delay, Event::Forward { from: id, forwarded }),
                None => self.complete(Completion::Failed(forwarded.op, Some(ErrorCode::Timeout))),
            }
        }
        if let Some(snapshot) = fx.compacted {
            self.trace.record(now, Traced::Compacted { node: id, index: snapshot.index });
        }
        if let Some(snapshot) = fx.restored {
            self.trace.record(now, Traced::Restored { node: id, index: snapshot.index });
            self.installs += 1;
            let check = self.checker.restored(id, snapshot);
            self.check(check);
        }
        let node = &self.nodes[&id];
        if let Some(from) = fx.wrote_from {
            let (start, entries) = (node.disk().log_start(), node.disk().entries());
            let to = start.index + entries.len() as u64;
            self.trace.record(now, Traced::Persisted { node: id, from, to });
            let check = self.checker.persisted(id, start, &entries, from);
            self.check(check);
        }
        if let Some(soft) = fx.role {
            self.trace.record(now, Traced::Role { node: id, role: soft.role, term: soft.term });
            if soft.role == Role::Leader {
                let disk = self.nodes[&id].disk();
                let check = self.checker.became_leader(id, soft.term, disk.log_start(), &disk.entries());
                self.check(check);
            }
        }
        if let Some(raft) = self.nodes[&id].raft()
            && raft.commit_index() > raft.last_index()
        {
            let detail =
                format!("node {id} has commit index {} past its last entry {}", raft.commit_index(), raft.last_index());
            self.fail(Violation { rule: "log", detail });
        }
        if let (Some(first), Some(last)) = (fx.applied.first(), fx.applied.last()) {
            self.trace.record(now, Traced::Applied { node: id, from: first.index, to: last.index });
            let node = &self.nodes[&id];
            let term = node.raft().map_or(node.disk().hard_state().term, |r| r.soft_state().term);
            for entry in &fx.applied {
                let check = self.checker.applied(id, term, entry);
                self.check(check);
            }
            for e in &fx.executed {
                self.duplicates += usize::from(e.duplicate);
                let check = self.checker.executed(id, e.index, (e.name, e.write), e.duplicate, now);
                self.check(check);
            }
        }
        for completion in fx.completed {
            self.complete(completion);
        }
        if self.nodes[&id].must_exit() {
            let mut fx = Effects::default();
            self.nodes.get_mut(&id).expect("a node").crash(&mut fx);
            self.trace.record(now, Traced::Exited(id));
            self.exited.insert(id);
            self.checker.restarted(id);
            self.absorb(id, fx);
        } else if fx.torn_crash {
            self.trace.record(now, Traced::Crashed { node: id, torn: true });
            self.crashes += 1;
            self.checker.restarted(id);
            let downtime = self.rng.range(10 * MS, 500 * MS);
            self.schedule.after(downtime, Event::Restart(id));
        }
    }

    fn complete(&mut self, completion: Completion) {
        let now = self.now();
        let op = match completion {
            Completion::WriteAcked { op, .. } | Completion::ReadServed { op, .. } | Completion::Failed(op, _) => op,
        };
        let served = !matches!(completion, Completion::Failed(..));
        if self.forwarded.remove(&op) && served {
            self.forwarded_served += 1;
        }
        match completion {
            Completion::WriteAcked { op, index, effect } => {
                self.trace.record(now, Traced::Acked(op, index));
                let kind = self.history.complete(op, now, Outcome::Acked(effect)).kind;
                let (write, name) = kind.written(op).expect("only writes are acknowledged");
                let check = self.checker.write_acked(write.key, name, index, effect, now);
                self.check(check);
                self.last_ack = Some((op, index));
            }
            Completion::ReadServed { op, value } => {
                self.last_read = Some(op);
                self.trace.record(now, Traced::Read(op, value));
                let done = self.history.complete(op, now, Outcome::Read(value));
                let (OpKind::Read(key), invoked) = (done.kind, done.invoked) else { unreachable!("only reads read") };
                self.seen.insert(key, value);
                let check = self.checker.read_served(key, invoked, now, value);
                self.check(check);
            }
            Completion::Failed(op, code) => {
                self.trace.record(now, Traced::Failed(op, code));
                let kind = self.history.complete(op, now, Outcome::Failed).kind;
                let Some((write, name)) = kind.written(op) else { return };
                if let Some(code) = code {
                    let check = self.checker.write_failed(name, op, code);
                    self.check(check);
                }
                // Half the failed writes are sent again: in a session, as the
                // same session write, after any failure (whatever became of
                // the first, it applies at most once); without one, only
                // after an answer that promises nothing applied.
                let may_retry = write.session
                    || matches!(code, Some(ErrorCode::NoLeader | ErrorCode::Busy | ErrorCode::ShuttingDown));
                if may_retry && self.clients != Clients::Off && self.rng.chance(0.5) {
                    self.schedule.after(self.rng.range(CLIENT_GAP.0, CLIENT_GAP.1), Event::Retry { write, of: name });
                }
            }
        }
    }

    fn check(&self, check: Check) {
        if let Err(violation) = check {
            self.fail(violation);
        }
    }

    fn fail(&self, v: Violation) -> ! {
        panic!(
            "\n{} VIOLATED at {}us: {}\nparams: {:?}\nnodes now:\n{}recent events:\n{}\nrerun: {}\n",
            v.rule.to_uppercase(),
            self.now(),
            v.detail,
            self.params,
            self.node_states(),
            self.trace,
            self.rerun
        );
    }

    /// What each node believes, for the failure report: most liveness
    /// failures are explained by one node's term, log or membership.
    fn node_states(&self) -> String {
        let mut out = String::new();
        for (id, node) in &self.nodes {
            let Some(raft) = node.raft() else {
                out += &format!("  node {id}: down\n");
                continue;
            };
            let (soft, hard, m) = (raft.soft_state(), raft.hard_state(), raft.membership());
            // What the disk holds: later entries may wait for their sync.
            let (last, start) = (raft.store().last_index(), raft.store().log_start());
            let last_term = if last == start.index { start.term } else { raft.store().term(last) };
            out += &format!(
                "  node {id}: {:?} term {} vote {:?} leader {:?} stored {last}/t{} commit {} applied {} \
                 voters {:?} learners {:?} promote {:?} removed {:?}\n",
                soft.role,
                soft.term,
                hard.vote,
                soft.leader,
                last_term,
                hard.commit,
                raft.handed_to_apply(),
                m.voters,
                m.learners,
                m.promote,
                m.removed,
            );
        }
        out
    }
}
