//! What the core hands the shell after a round of input (etcd's `Ready`).

use super::message::Message;
use super::types::{Entry, HardState, Index, Membership, NodeId, SnapshotInfo, Term};

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

/// A write whose sync the shell took over ([`crate::raft::Raft::defer_persistence`]):
/// its last entry, and how many times the log had been cut back when it
/// was written. After a cut the same entry may come back (a leader of a
/// later term that holds it) in a write not yet synced, so a sync begun
/// before the cut vouches for nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogWrite {
    pub index: Index,
    pub term: Term,
    pub(crate) cuts: u64,
}

/// One batch of work for the shell, to be carried out in this order:
/// 0. take note of `membership` (the members to reach from now on);
/// 1. send `messages` (they do not depend on this batch being durable);
/// 2. install `snapshot` (the state machine and the store start over from
///    it), persist `hard_state`, write `entries` (replacing whatever the
///    store holds from the first of them on), and make all of it durable;
/// 3. send `persisted_messages` (votes and acknowledgements that promise
///    durability), then call `Raft::advance`;
/// 4. apply `committed`, serve `read_states`, fail `failed_reads`.
///
/// Steps 2 and 3 may finish later, off the caller's thread (asynchronous
/// storage writes), unless the batch installs a snapshot or records a new
/// term or vote ([`Ready::may_sync_later`]): write now, call
/// `Raft::defer_persistence`, and once the write is durable call
/// `Raft::persisted` and send `persisted_messages` — after those of every
/// earlier batch, since an acknowledgement promises all that came before.
///
/// [`crate::raft::driver`] carries this out; it is the only code that does.
#[derive(Debug, Default)]
pub struct Ready {
    pub soft_state: Option<SoftState>,
    /// The membership in force, when it changed.
    pub membership: Option<Membership>,
    pub hard_state: Option<HardState>,
    /// `hard_state` records a new term or vote (not only a commit index).
    pub new_term_or_vote: bool,
    pub snapshot: Option<SnapshotInfo>,
    pub entries: Vec<Entry>,
    pub messages: Vec<Message>,
    pub persisted_messages: Vec<Message>,
    pub committed: Vec<Entry>,
    pub read_states: Vec<ReadState>,
    pub failed_reads: Vec<u64>,
}

impl Ready {
    /// Whether step 2 has anything to write. The core hands out the hard
    /// state with every snapshot and every entry (the commit index rides
    /// along), so the hard state alone tells.
    pub fn must_persist(&self) -> bool {
        debug_assert!(
            self.hard_state.is_some() || (self.snapshot.is_none() && self.entries.is_empty()),
            "a write without its hard state"
        );
        self.hard_state.is_some()
    }

    /// Whether steps 2 and 3 may finish after step 4. Not for a new term
    /// or vote: a candidate counts its own vote at once, and a vote must be
    /// durable before anyone may count it. Not for a snapshot: the state
    /// machine restores from the store.
    pub fn may_sync_later(&self) -> bool {
        self.snapshot.is_none() && !self.new_term_or_vote
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_each_role() {
        let roles = [Role::Follower, Role::PreCandidate, Role::Candidate, Role::Leader];
        assert_eq!(roles.map(Role::as_str), ["follower", "pre-candidate", "candidate", "leader"]);
    }

    #[test]
    fn only_a_ready_that_writes_must_persist() {
        assert!(!Ready::default().must_persist(), "an idle round costs no fsync");
        let hard_state = Some(HardState { term: 1, vote: None, commit: 0 });
        assert!(Ready { hard_state, ..Ready::default() }.must_persist());
    }
}
