//! Every client operation with its invocation and completion on the virtual
//! clock: the raw material of the read-safety check and of scenario asserts.

use raft_zmq::raft::NodeId;

use super::register::{Held, Key, Write, WriteResult};
use super::schedule::Time;

/// Also the name of the write an op first sends, and the value it stores
/// (if it stores one), which makes every written value unique.
pub type OpId = u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    Write(Write),
    /// The same write as op `OpId` (same value, same session, if any), sent
    /// again after that one failed: applied at most once, whatever happens.
    Retry(Write, OpId),
    Read(Key),
}

impl OpKind {
    /// The write op `op` of this kind sends, and its name, if it writes.
    pub fn written(self, op: OpId) -> Option<(Write, OpId)> {
        match self {
            OpKind::Write(write) => Some((write, op)),
            OpKind::Retry(write, of) => Some((write, of)),
            OpKind::Read(_) => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Pending,
    /// The write was applied by the node it was proposed on, at the index and
    /// term it was proposed with: the client was told it succeeded, and what
    /// it did.
    Acked(WriteResult),
    /// The read was confirmed by a quorum and served from the state machine.
    Read(Held),
    /// The client was told "failed" or got no answer (its node crashed, lost
    /// leadership, or the slot went to another entry): the effect is unknown.
    Failed,
}

#[derive(Clone, Debug)]
pub struct Op {
    pub kind: OpKind,
    pub node: NodeId,
    pub invoked: Time,
    pub completed: Option<Time>,
    pub outcome: Outcome,
}

#[derive(Default)]
pub struct History {
    ops: Vec<Op>,
}

impl History {
    pub fn invoke(&mut self, kind: OpKind, node: NodeId, now: Time) -> OpId {
        self.ops.push(Op { kind, node, invoked: now, completed: None, outcome: Outcome::Pending });
        self.ops.len() as OpId - 1
    }

    pub fn complete(&mut self, id: OpId, now: Time, outcome: Outcome) -> &Op {
        let op = &mut self.ops[id as usize];
        assert_eq!(op.outcome, Outcome::Pending, "op {id} completed twice");
        op.completed = Some(now);
        op.outcome = outcome;
        op
    }

    pub fn ops(&self) -> &[Op] {
        &self.ops
    }
}
