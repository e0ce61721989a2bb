//! The faults a run injects: partitions of four shapes, crashes, pauses and
//! leadership transfers. Each lasts a while and then heals; which one, when
//! and for how long is drawn from the run's seed.

use std::collections::BTreeSet;
use std::fmt;

use raft_zmq::raft::NodeId;

use super::rng::Rng;
use super::schedule::{MS, Time};

/// A set of node ids as a bit mask, so that faults are `Copy` and cheap to
/// keep in the trace.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NodeSet(u64);

impl NodeSet {
    pub fn of(ids: &[NodeId]) -> NodeSet {
        NodeSet(ids.iter().fold(0, |mask, id| mask | 1 << id))
    }

    pub fn contains(self, id: NodeId) -> bool {
        self.0 & 1 << id != 0
    }
}

impl fmt::Debug for NodeSet {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.debug_set().entries((0..64).filter(|&id| self.contains(id))).finish()
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Partition {
    /// Two sides that cannot reach each other at all.
    Split(NodeSet),
    /// Asymmetric: nobody hears these nodes, while they still hear everyone.
    Mute(NodeSet),
    /// The current leader is cut off both ways (it may not know yet).
    IsolateLeader(NodeId),
    /// Two sides that can only reach each other's `bridge`: every node can
    /// see a majority, so leaders keep being disrupted without PreVote.
    Bridge { bridge: NodeId, side: NodeSet },
}

impl Partition {
    /// The directed links `(from, to)` that drop everything.
    pub fn cut_links(self, members: &[NodeId]) -> BTreeSet<(NodeId, NodeId)> {
        let mut cut = BTreeSet::new();
        for &from in members {
            for &to in members.iter().filter(|&&to| to != from) {
                let blocked = match self {
                    Partition::Split(side) => side.contains(from) != side.contains(to),
                    Partition::Mute(muted) => muted.contains(from) && !muted.contains(to),
                    Partition::IsolateLeader(leader) => from == leader || to == leader,
                    Partition::Bridge { bridge, side } => {
                        from != bridge && to != bridge && side.contains(from) != side.contains(to)
                    }
                };
                if blocked {
                    cut.insert((from, to));
                }
            }
        }
        cut
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Fault {
    Partition(Partition),
    /// Loses everything not synced, restarts from the disk afterwards.
    Crash(NodeId),
    /// Freezes the process: no ticks, no messages handled, then resumes
    /// with stale beliefs (the deposed-leader-wakes-up case).
    Pause(NodeId),
    /// Not a fault but an operator action racing with them: the current
    /// leader, if any, is asked to hand leadership over to this node.
    Transfer(NodeId),
    /// A clean stop (SIGTERM) with clients writing: the node hands
    /// leadership over, answers what it holds, exits, and restarts later.
    Stop(NodeId),
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl Fault {
    /// A random fault and how long it lasts. Leaders are favourite targets.
    pub fn random(rng: &mut Rng, members: &[NodeId], leader: Option<NodeId>) -> (Fault, Time) {
        let victim = match leader {
            Some(leader) if rng.chance(0.5) => leader,
            _ => rng.pick(members),
        };
        let fault = match rng.range(0, 7) {
            0 => Fault::Partition(Partition::Split(NodeSet::of(&rng.split(members).0))),
            1 => Fault::Partition(Partition::Mute(NodeSet::of(&[victim]))),
            2 => Fault::Partition(Partition::IsolateLeader(victim)),
            3 => {
                let others: Vec<NodeId> = members.iter().copied().filter(|&id| id != victim).collect();
                Fault::Partition(Partition::Bridge { bridge: victim, side: NodeSet::of(&rng.split(&others).0) })
            }
            4 => Fault::Crash(victim),
            5 => Fault::Transfer(rng.pick(members)),
            6 => Fault::Stop(victim),
            _ => Fault::Pause(victim),
        };
        (fault, rng.range(50 * MS, 1_000 * MS))
    }
}
