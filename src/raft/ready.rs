//! What the core hands the shell after a round of input (etcd's `Ready`).

use super::message::Message;
use super::types::{Entry, HardState, Index, NodeId, Term};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Follower,
    PreCandidate,
    Candidate,
    Leader,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Follower => "follower",
            Role::PreCandidate => "pre-candidate",
            Role::Candidate => "candidate",
            Role::Leader => "leader",
        }
    }
}

/// Volatile state the shell reports and routes by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SoftState {
    pub role: Role,
    pub term: Term,
    pub leader: Option<NodeId>,
}

/// A confirmed ReadIndex request: the read `ctx` may be served once the
/// state machine has applied `index`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadState {
    pub ctx: u64,
    pub index: Index,
}

/// One batch of work for the shell, to be carried out in this order:
/// 1. send `messages` (they do not depend on this batch being durable);
/// 2. persist `hard_state`, truncate at `truncate_from`, append `entries`,
///    and make all of it durable with one sync;
/// 3. send `persisted_messages` (votes and acknowledgements that promise
///    durability), then call `Raft::advance`;
/// 4. apply `committed`, serve `read_states`, fail `failed_reads`.
#[derive(Debug, Default)]
pub struct Ready {
    pub soft_state: Option<SoftState>,
    pub hard_state: Option<HardState>,
    pub truncate_from: Option<Index>,
    pub entries: Vec<Entry>,
    pub messages: Vec<Message>,
    pub persisted_messages: Vec<Message>,
    pub committed: Vec<Entry>,
    pub read_states: Vec<ReadState>,
    pub failed_reads: Vec<u64>,
}

impl Ready {
    /// Whether step 2 has anything to write.
    pub fn must_persist(&self) -> bool {
        self.hard_state.is_some() || self.truncate_from.is_some() || !self.entries.is_empty()
    }
}
