//! The last few hundred things that happened, printed with a failure. Events
//! are small `Copy` summaries, so recording one costs no allocation; they are
//! only formatted when a check fails.

use std::collections::VecDeque;
use std::fmt;

use raft_zmq::raft::{Body, Index, MembershipChange, Message, NodeId, Role, Term};
use raft_zmq::wire::protocol::ErrorCode;

use super::faults::Fault;
use super::history::{OpId, OpKind};
use super::schedule::Time;

const CAPACITY: usize = 200;

/// A message without its payloads.
#[derive(Clone, Copy)]
pub struct Envelope {
    from: NodeId,
    to: NodeId,
    term: Term,
    body: Summary,
}

#[derive(Clone, Copy)]
enum Summary {
    Vote { pre_vote: bool, transfer: bool, last: (Index, Term) },
    VoteReply { pre_vote: bool, granted: bool },
    Append { prev: (Index, Term), entries: usize, commit: Index },
    AppendReply { success: bool, match_index: Index, conflict_index: Index },
    TimeoutNow,
    Snapshot { last: (Index, Term) },
    Removed,
}

impl From<&Message> for Envelope {
    fn from(m: &Message) -> Envelope {
        let body = match &m.body {
            Body::RequestVote { last_log_index, last_log_term, pre_vote, transfer } => {
                Summary::Vote { pre_vote: *pre_vote, transfer: *transfer, last: (*last_log_index, *last_log_term) }
            }
            Body::RequestVoteReply { granted, pre_vote } => {
                Summary::VoteReply { pre_vote: *pre_vote, granted: *granted }
            }
            Body::AppendEntries { prev_log_index, prev_log_term, entries, leader_commit, .. } => Summary::Append {
                prev: (*prev_log_index, *prev_log_term),
                entries: entries.len(),
                commit: *leader_commit,
            },
            Body::AppendEntriesReply { success, match_index, conflict_index, .. } => {
                Summary::AppendReply { success: *success, match_index: *match_index, conflict_index: *conflict_index }
            }
            Body::TimeoutNow => Summary::TimeoutNow,
            Body::InstallSnapshot { snapshot, .. } => Summary::Snapshot { last: (snapshot.index, snapshot.term) },
            Body::Removed => Summary::Removed,
        };
        Envelope { from: m.from, to: m.to, term: m.term, body }
    }
}

impl fmt::Display for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}->{} t{} ", self.from, self.to, self.term)?;
        match self.body {
            Summary::Vote { pre_vote, transfer, last } => {
                let kind = if pre_vote {
                    "Pre"
                } else if transfer {
                    "Transfer"
                } else {
                    ""
                };
                write!(f, "{kind}Vote last={}/t{}", last.0, last.1)
            }
            Summary::VoteReply { pre_vote, granted } => {
                write!(f, "{}VoteReply granted={granted}", if pre_vote { "Pre" } else { "" })
            }
            Summary::Append { prev, entries, commit } => {
                write!(f, "Append prev={}/t{} entries={entries} commit={commit}", prev.0, prev.1)
            }
            Summary::AppendReply { success, match_index, conflict_index } => {
                write!(f, "AppendReply ok={success} match={match_index} conflict={conflict_index}")
            }
            Summary::TimeoutNow => write!(f, "TimeoutNow"),
            Summary::Snapshot { last } => write!(f, "Snapshot last={}/t{}", last.0, last.1),
            Summary::Removed => write!(f, "Removed"),
        }
    }
}

#[derive(Clone, Copy)]
pub enum Event {
    Delivered(Envelope),
    Dropped(Envelope, &'static str),
    Role {
        node: NodeId,
        role: Role,
        term: Term,
    },
    Persisted {
        node: NodeId,
        from: Index,
        to: Index,
    },
    Applied {
        node: NodeId,
        from: Index,
        to: Index,
    },
    Fault(Fault),
    Healed,
    Crashed {
        node: NodeId,
        torn: bool,
    },
    Restarted(NodeId),
    Compacted {
        node: NodeId,
        index: Index,
    },
    Restored {
        node: NodeId,
        index: Index,
    },
    /// The leader was asked for a membership change (`add_node` or `remove_node`).
    Change {
        leader: NodeId,
        change: MembershipChange,
    },
    /// The node was asked to stop (SIGTERM): it hands over, answers, exits.
    Stopping(NodeId),
    Stopped(NodeId),
    /// The node applied its own removal and exited, as a real node does.
    Exited(NodeId),
    /// The node starts over with an empty disk, to be added.
    Wiped(NodeId),
    Invoked {
        op: OpId,
        kind: OpKind,
        node: NodeId,
    },
    Acked(OpId, Index),
    Read(OpId, Option<OpId>),
    Failed(OpId, Option<ErrorCode>),
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match *self {
            Event::Delivered(m) => write!(f, "deliver {m}"),
            Event::Dropped(m, why) => write!(f, "drop ({why}) {m}"),
            Event::Role { node, role, term } => write!(f, "node {node} is {} in term {term}", role.as_str()),
            Event::Persisted { node, from, to } => write!(f, "node {node} synced entries {from}..={to}"),
            Event::Applied { node, from, to } => write!(f, "node {node} applied {from}..={to}"),
            Event::Fault(fault) => write!(f, "FAULT {fault}"),
            Event::Healed => write!(f, "HEAL network"),
            Event::Crashed { node, torn } => {
                write!(f, "CRASH node {node}{}", if torn { " between send and sync" } else { "" })
            }
            Event::Restarted(node) => write!(f, "RESTART node {node}"),
            Event::Compacted { node, index } => write!(f, "node {node} snapshot at {index}, log compacted"),
            Event::Restored { node, index } => write!(f, "node {node} installed the snapshot at {index}"),
            Event::Change { leader, change } => write!(f, "MEMBERSHIP {change:?} asked of leader {leader}"),
            Event::Stopping(node) => write!(f, "STOP node {node} (clean shutdown begins)"),
            Event::Stopped(node) => write!(f, "node {node} STOPPED"),
            Event::Exited(node) => write!(f, "node {node} applied its removal and EXITED"),
            Event::Wiped(node) => write!(f, "node {node} starts over with an EMPTY disk"),
            Event::Invoked { op, kind, node } => write!(f, "client op {op} {kind:?} at node {node}"),
            Event::Acked(op, index) => write!(f, "client op {op} acknowledged at index {index}"),
            Event::Read(op, Some(value)) => write!(f, "client op {op} read the value of write {value}"),
            Event::Read(op, None) => write!(f, "client op {op} read nothing"),
            Event::Failed(op, Some(code)) => write!(f, "client op {op} failed: {code}"),
            Event::Failed(op, None) => write!(f, "client op {op} got no reply"),
        }
    }
}

#[derive(Default)]
pub struct Trace {
    events: VecDeque<(Time, Event)>,
}

impl Trace {
    pub fn record(&mut self, now: Time, event: Event) {
        if self.events.len() == CAPACITY {
            self.events.pop_front();
        }
        self.events.push_back((now, event));
    }
}

impl fmt::Display for Trace {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        for (at, event) in &self.events {
            writeln!(f, "  {:>6}.{:03}ms  {event}", at / 1000, at % 1000)?;
        }
        Ok(())
    }
}
