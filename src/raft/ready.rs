//! What the core hands the shell after a round of input (etcd's `Ready`).

use super::Raft;
use super::engine::RoleState;
use super::log_store::LogStore;
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

/// The core's side of the Ready cycle (etcd's `rawnode.go`): what has
/// changed since the last `Ready`, and what the shell reports back.
impl<S: LogStore> Raft<S> {
    // ----- outputs --------------------------------------------------------

    pub fn has_ready(&self) -> bool {
        let (last, committed) = (self.log.last_index(), self.log.committed());
        let wants_append = |lead: &super::engine::Leadership| {
            let window = self.cfg.max_inflight_appends;
            self.tracker.progresses().any(|(_, pr)| lead.wants_append(pr, window, last, committed))
        };
        matches!(&self.state, RoleState::Leader(lead) if wants_append(lead))
            || self.hard_state_changed()
            || self.log.has_unstable()
            || self.log.has_committed_to_apply()
            || !self.messages.is_empty()
            || !self.persisted_messages.is_empty()
            || !self.read_states.is_empty()
            || !self.failed_reads.is_empty()
            || self.last_soft_state != Some(self.soft_state())
            || self.membership_reported != self.log.membership_generation()
    }

    /// Collects everything the shell must do now; see [`Ready`] for the order.
    pub fn ready(&mut self) -> Ready {
        self.debug_check_invariants();
        self.send_appends();
        let snapshot = self.log.take_snapshot();
        let entries = self.log.take_unstable();
        if let Some(last) = entries.last() {
            self.handed_out = Some((last.index, last.term));
        }
        // The commit index rides along with writes that happen anyway; after a
        // crash the mirror of applied entries recovers anything newer.
        let new_term_or_vote = self.hard_state_changed();
        let hard_state = (new_term_or_vote || !entries.is_empty() || snapshot.is_some()).then(|| {
            self.last_hard_state = self.hard_state();
            self.last_hard_state
        });
        let soft = self.soft_state();
        let soft_state = (self.last_soft_state != Some(soft)).then(|| {
            self.last_soft_state = Some(soft);
            soft
        });
        let membership = (self.membership_reported != self.log.membership_generation()).then(|| {
            self.membership_reported = self.log.membership_generation();
            self.log.membership().clone()
        });
        Ready {
            soft_state,
            membership,
            hard_state,
            new_term_or_vote,
            snapshot,
            entries,
            messages: std::mem::take(&mut self.messages),
            persisted_messages: std::mem::take(&mut self.persisted_messages),
            committed: self.log.take_committed(self.cfg.max_apply_bytes),
            read_states: std::mem::take(&mut self.read_states),
            failed_reads: std::mem::take(&mut self.failed_reads),
        }
    }

    /// The shell has made the last `Ready`'s writes durable.
    pub fn advance(&mut self) {
        self.log.snapshot_installed();
        if let Some((index, term)) = self.handed_out.take() {
            self.log.stable_to(index, term);
            self.maybe_commit_as_leader();
        }
    }

    /// The shell wrote the last `Ready` and will make it durable later
    /// (asynchronous storage writes): the last entry it wrote, to hand to
    /// [`Raft::persisted`] then. Until that, those entries count toward no
    /// commit of this node's and are not applied.
    pub fn defer_persistence(&mut self) -> Option<LogWrite> {
        let cuts = self.log.cuts();
        self.handed_out.take().map(|(index, term)| LogWrite { index, term, cuts })
    }

    /// Storage made durable every entry written up to `written`. Ignored if
    /// the log was cut back or started over since it was written: the
    /// write that followed covers what is left (see [`LogWrite`]).
    pub fn persisted(&mut self, written: LogWrite) {
        if written.cuts == self.log.cuts() {
            self.log.stable_to(written.index, written.term);
            self.maybe_commit_as_leader();
        }
    }

    fn hard_state_changed(&self) -> bool {
        self.term != self.last_hard_state.term || self.vote != self.last_hard_state.vote
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
