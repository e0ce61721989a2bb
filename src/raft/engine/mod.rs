//! The Raft state machine: Figure 2 of the Raft paper, plus PreVote,
//! CheckQuorum and leader stickiness (thesis §9.6, §6.2, §4.2.3), leadership
//! transfer (§3.10), ReadIndex reads (§6.4) and the fast conflict back-off
//! (§5.3).
//!
//! One entry point per kind of input (`tick`, `step`, `propose`,
//! `read_index`, `transfer_leadership`, `change_membership`); term rules are
//! applied once in `step`, before the body is looked at; every other rule
//! lives in exactly one handler, in the file of its concern: elections,
//! replication, reads, reconfiguration, transfer. What a round hands the
//! shell is collected beside the driver, in [`crate::raft::ready`].

mod election;
mod reads;
mod reconfiguration;
mod replication;
mod transfer;

use std::collections::VecDeque;

use log::{debug, error, info};

use self::reads::PendingRead;
use self::replication::Rejection;
use self::transfer::Transfer;
use super::log_store::LogStore;
use super::message::{Body, Message};
use super::progress::Progress;
use super::raft_log::RaftLog;
use super::ready::{ReadState, Role, SoftState};
use super::tracker::Tracker;
use super::types::{HardState, Index, Membership, NodeId, Payload, SnapshotInfo, SnapshotMeta, Term};

/// Timing and behaviour knobs, all in ticks so the core needs no clock.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    pub id: NodeId,
    /// Election timeouts are drawn uniformly from `[min, max)` ticks.
    pub election_ticks: (u64, u64),
    pub heartbeat_ticks: u64,
    /// Upper bound on the entries carried by one AppendEntries.
    pub max_append_bytes: usize,
    /// Upper bound on the committed entries handed out by one `Ready`.
    pub max_apply_bytes: usize,
    /// AppendEntries a leader keeps in flight to a follower whose log is
    /// known to match (see `Progress`); 1 sends the next only once the last
    /// is answered.
    pub max_inflight_appends: usize,
    pub pre_vote: bool,
    pub check_quorum: bool,
    /// Seeds the election-timeout randomness, so runs are reproducible.
    pub seed: u64,
}

impl CoreConfig {
    /// An unanswered AppendEntries is given up on after this many ticks, so a
    /// lost message never stalls a follower. Half the minimum election
    /// timeout: the retry still reaches the follower before its election
    /// timer fires and within the leader's CheckQuorum window.
    pub fn inflight_timeout(&self) -> u64 {
        (self.election_ticks.0 / 2).max(1)
    }

    /// A snapshot takes far longer to send than an AppendEntries, and the
    /// shell's transport sends it once however often it is asked: the
    /// leader asks again only after this many ticks without an answer.
    pub fn snapshot_timeout(&self) -> u64 {
        self.election_ticks.1 * 4
    }
}

/// Returned when a request needs the leader and this node is not it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotLeader {
    pub leader: Option<NodeId>,
}

/// Why [`Raft::transfer_leadership`] refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransferError {
    NotLeader(NotLeader),
    /// The target is this node or not a voter.
    NotAPeer(NodeId),
}

/// Why [`Raft::change_membership`] refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChangeError {
    NotLeader(NotLeader),
    /// Not now: another change is not committed yet, or this leader has not
    /// committed an entry of its own term yet, or it is handing over.
    Busy(&'static str),
    /// The change makes no sense for the current membership.
    Invalid(String),
}

/// This node's part in its term. What only a leader keeps is in
/// [`Leadership`], which exists only while it leads.
#[derive(Debug)]
pub(super) enum RoleState {
    Follower,
    PreCandidate,
    Candidate,
    Leader(Leadership),
}

/// The leader's own state for its term: born when it wins the election,
/// gone when it steps down.
#[derive(Debug)]
pub(super) struct Leadership {
    heartbeat_elapsed: u64,
    heartbeat_due: bool,
    /// A tick passed since the last round: a follower behind on the commit
    /// index hears of it in the next, even with nothing else to send.
    commit_due: bool,
    /// The follower it is handing leadership to.
    transfer: Option<Transfer>,
    /// Number of ReadIndex rounds started; AppendEntries carry it and
    /// replies echo it, so one heartbeat round confirms a whole batch of reads.
    /// Each leadership counts from 1 again: only replies of its own term
    /// reach it (a node leads at most once a term), and a reply to a request
    /// of an older term echoes no round (`reply_to_stale`).
    read_seq: u64,
    pending_reads: VecDeque<PendingRead>,
    /// Reads that arrived before this leader committed an entry of its own
    /// term: until then it does not know the true commit index (§6.4 step 1).
    reads_awaiting_commit: Vec<u64>,
}

impl Leadership {
    fn new() -> Leadership {
        Leadership {
            heartbeat_elapsed: 0,
            // A new leader announces itself at once.
            heartbeat_due: true,
            commit_due: false,
            transfer: None,
            read_seq: 0,
            pending_reads: VecDeque::new(),
            reads_awaiting_commit: Vec::new(),
        }
    }
}

/// The core of one node. Its fields are open to `crate::raft` so that the
/// `Ready` bookkeeping can live beside the driver (`ready.rs`).
pub struct Raft<S> {
    pub(super) cfg: CoreConfig,
    pub(super) term: Term,
    pub(super) vote: Option<NodeId>,
    pub(super) state: RoleState,
    pub(super) leader: Option<NodeId>,
    pub(super) log: RaftLog<S>,
    /// The membership in force, the leader's view of each member and a
    /// campaign's votes: every quorum is counted there.
    pub(super) tracker: Tracker,

    pub(super) ticks: u64,
    pub(super) election_elapsed: u64,
    pub(super) election_timeout: u64,
    pub(super) rng: u64,

    pub(super) messages: Vec<Message>,
    pub(super) persisted_messages: Vec<Message>,
    pub(super) read_states: Vec<ReadState>,
    pub(super) failed_reads: Vec<u64>,
    pub(super) last_hard_state: HardState,
    pub(super) last_soft_state: Option<SoftState>,
    /// A member said a committed membership removed this node.
    pub(super) removed: bool,
    /// The log's membership generation the tracker follows, and the one
    /// the shell was last told of (0: not even the first).
    pub(super) membership_followed: u64,
    pub(super) membership_reported: u64,
    /// Last entry handed out by `ready`, made stable by `advance`.
    pub(super) handed_out: Option<(Index, Term)>,
}

impl<S: LogStore> Raft<S> {
    /// A node restarting from `hard_state` and the durable log in `store`,
    /// its state machine at `applied` (the snapshot it loaded, if any). Its
    /// membership is the newest in the log; a node that is in none (one
    /// waiting to join) never campaigns and only follows a leader.
    pub fn new(cfg: CoreConfig, store: S, hard_state: HardState, applied: Index) -> Raft<S> {
        assert!(cfg.election_ticks.0 > cfg.heartbeat_ticks && cfg.election_ticks.0 <= cfg.election_ticks.1);
        let log = RaftLog::new(store, hard_state.commit, applied);
        let generation = log.membership_generation();
        let tracker = Tracker::new(cfg.id);
        let mut raft = Raft {
            term: hard_state.term,
            vote: hard_state.vote,
            state: RoleState::Follower,
            leader: None,
            last_hard_state: HardState { commit: log.committed(), ..hard_state },
            log,
            tracker,
            ticks: 0,
            election_elapsed: 0,
            election_timeout: 0,
            rng: cfg.seed ^ 0x9E37_79B9_7F4A_7C15,
            messages: Vec::new(),
            persisted_messages: Vec::new(),
            read_states: Vec::new(),
            failed_reads: Vec::new(),
            last_soft_state: None,
            removed: false,
            membership_followed: generation,
            membership_reported: 0,
            handed_out: None,
            cfg,
        };
        raft.randomize_election_timeout();
        raft
    }

    // ----- inputs ---------------------------------------------------------

    /// Advances the logical clock by one tick.
    pub fn tick(&mut self) {
        self.ticks += 1;
        self.election_elapsed += 1;
        if !self.is_leader() {
            self.tick_election();
            return;
        }
        if self.tick_transfer() {
            return;
        }
        if self.election_elapsed >= self.cfg.election_ticks.0 {
            self.election_elapsed = 0;
            if self.cfg.check_quorum && !self.tracker.quorum_active(self.log.membership()) {
                info!(
                    "node {}: no contact with a majority for an election timeout; stepping down in term {}",
                    self.cfg.id, self.term
                );
                self.become_follower(self.term, None);
                return;
            }
            self.tracker.progresses_mut().for_each(|pr| pr.recent_active = false);
        }
        self.tick_replication();
        self.promote_caught_up_learners();
    }

    /// Handles one message from a peer.
    ///
    /// Messages from outside the membership are dropped, so a removed node
    /// can neither disrupt the cluster nor be counted once its removal is
    /// committed (until then it may still be needed: see `may_campaign`).
    /// A leader's messages are the exception: a node that is joining, or
    /// that has not yet appended the entry adding that leader, must still
    /// follow it, and a leader that removed itself hands over with
    /// `TimeoutNow` (term rules keep a stale leader harmless).
    pub fn step(&mut self, m: Message) {
        if m.to != self.cfg.id || m.from == self.cfg.id {
            debug!("node {}: dropping misaddressed message {:?}", self.cfg.id, m);
            return;
        }
        let membership = self.log.membership();
        if m.body == Body::Removed {
            if membership.contains(m.from) && !self.removed {
                info!("node {}: member {} says this node was removed from the cluster", self.cfg.id, m.from);
                self.removed = true;
            }
            return;
        }
        // A removed node that campaigns is told, once its removal is
        // committed (an uncommitted one may be undone). A removed leader
        // still hands over: its messages are not answered so.
        if membership.removed.contains(&m.from)
            && matches!(m.body, Body::RequestVote { .. })
            && self.log.membership_index() <= self.log.committed()
        {
            self.messages.push(Message { from: self.cfg.id, to: m.from, term: self.term, body: Body::Removed });
            return;
        }
        let from_leader =
            matches!(m.body, Body::AppendEntries { .. } | Body::InstallSnapshot { .. } | Body::TimeoutNow);
        // A node whose removal is not committed yet may still campaign.
        let member = membership.contains(m.from) || self.log.committed_membership().contains(m.from);
        if !(from_leader || member) {
            debug!("node {}: dropping misaddressed message {:?}", self.cfg.id, m);
            return;
        }
        // The transport drops these already; the core must not depend on it.
        if let Err(problem) = m.validate() {
            error!("node {}: dropping an inconsistent message from {}: {problem}", self.cfg.id, m.from);
            return;
        }
        if m.term > self.term {
            if let Body::RequestVote { transfer: false, pre_vote, .. } = m.body
                && self.in_leader_lease(pre_vote)
            {
                info!(
                    "node {}: ignoring vote request from {} for term {}: leader {:?} is alive",
                    self.cfg.id, m.from, m.term, self.leader
                );
                return;
            }
            match m.body {
                // A pre-vote never changes the receiver's term, and a granted
                // pre-vote echoes the term the candidate has not taken yet.
                Body::RequestVote { pre_vote: true, .. } => {}
                Body::RequestVoteReply { pre_vote: true, granted: true } => {}
                Body::AppendEntries { .. } => self.become_follower(m.term, Some(m.from)),
                _ => self.become_follower(m.term, None),
            }
        } else if m.term < self.term {
            self.reply_to_stale(&m);
            return;
        }
        match m.body {
            Body::RequestVote { last_log_index, last_log_term, pre_vote, .. } => {
                self.handle_request_vote(&m, last_log_index, last_log_term, pre_vote)
            }
            Body::RequestVoteReply { granted, pre_vote } => self.handle_vote_reply(m.from, granted, pre_vote),
            Body::AppendEntries { prev_log_index, prev_log_term, entries, leader_commit, read_seq } => {
                self.handle_append_entries(m.from, prev_log_index, prev_log_term, entries, leader_commit, read_seq)
            }
            Body::AppendEntriesReply {
                success,
                prev_log_index,
                match_index,
                conflict_index,
                conflict_term,
                read_seq,
            } => {
                let rejection = (!success).then_some(Rejection { conflict_index, conflict_term });
                self.handle_append_reply(m.from, prev_log_index, match_index, rejection, read_seq)
            }
            Body::TimeoutNow => self.handle_timeout_now(m.from),
            Body::InstallSnapshot { snapshot, membership } => {
                self.handle_install_snapshot(m.from, SnapshotInfo { meta: snapshot, membership })
            }
            Body::Removed => unreachable!("handled above"),
        }
    }

    /// Appends a client command. Returns its index; it is committed once
    /// `committed` hands back an entry with this index and the current term.
    ///
    /// Refused while leadership is being transferred, with no leader named:
    /// a new entry would keep the transferee behind, and the client should
    /// retry once the new leader is known, as after any election.
    pub fn propose(&mut self, command: Vec<u8>) -> Result<(Index, Term), NotLeader> {
        if self.require_leader()?.transfer.is_some() {
            return Err(NotLeader { leader: None });
        }
        let index = self.log.append(self.term, Payload::Command(command.into()));
        Ok((index, self.term))
    }

    /// The transport gave up on the requests in flight to `peer`: allow the
    /// next one to go out right away instead of waiting for the timeout (the
    /// transport paces failures that come back at once).
    pub fn peer_unreachable(&mut self, peer: NodeId) {
        if let Some(pr) = self.tracker.progress_mut(peer) {
            pr.forget_inflight();
            pr.pending_snapshot = None;
        }
    }

    // ----- observers ------------------------------------------------------

    pub fn id(&self) -> NodeId {
        self.cfg.id
    }

    pub fn soft_state(&self) -> SoftState {
        SoftState { role: self.role(), term: self.term, leader: self.leader }
    }

    pub fn hard_state(&self) -> HardState {
        HardState { term: self.term, vote: self.vote, commit: self.log.committed() }
    }

    pub fn commit_index(&self) -> Index {
        self.log.committed()
    }

    /// The durable log. The shell writes to it only as a `Ready` asks, and
    /// compacts it only up to what it has applied.
    pub fn store(&self) -> &S {
        self.log.store()
    }

    pub fn store_mut(&mut self) -> &mut S {
        self.log.store_mut()
    }

    /// What survives a crash: the store, as the shell last persisted it.
    pub fn into_store(self) -> S {
        self.log.into_store()
    }

    /// Last index handed to the shell to apply (or restored from a snapshot).
    pub fn handed_to_apply(&self) -> Index {
        self.log.handed_to_apply()
    }

    /// Where the log starts: after the snapshot it was compacted to, or
    /// one being installed.
    pub fn log_start(&self) -> SnapshotMeta {
        self.log.log_start()
    }

    pub fn last_index(&self) -> Index {
        self.log.last_index()
    }

    /// The membership in force (the newest in the log).
    pub fn membership(&self) -> &Membership {
        self.log.membership()
    }

    /// The membership as of the commit index: unlike the one in force, it
    /// can no longer be cut off.
    pub fn committed_membership(&self) -> &Membership {
        self.log.committed_membership()
    }

    /// The membership once the log up to `index` is applied, for a snapshot
    /// taken there (`index` applied, so at or after the log start).
    pub fn membership_at(&self, index: Index) -> &Membership {
        self.log.membership_at(index)
    }

    /// Whether a member told this node that a committed membership removed
    /// it (see [`Body::Removed`]). The shell then stops the node, as it does
    /// when it applies its own removal.
    pub fn removed(&self) -> bool {
        self.removed
    }

    /// On the leader: what it knows of member `id`'s log.
    pub fn progress(&self, id: NodeId) -> Option<&Progress> {
        self.tracker.progress(id)
    }

    // ----- helpers --------------------------------------------------------

    pub(super) fn is_leader(&self) -> bool {
        matches!(self.state, RoleState::Leader(_))
    }

    pub(super) fn role(&self) -> Role {
        match self.state {
            RoleState::Follower => Role::Follower,
            RoleState::PreCandidate => Role::PreCandidate,
            RoleState::Candidate => Role::Candidate,
            RoleState::Leader(_) => Role::Leader,
        }
    }

    fn leadership(&self) -> Option<&Leadership> {
        match &self.state {
            RoleState::Leader(lead) => Some(lead),
            _ => None,
        }
    }

    fn leadership_mut(&mut self) -> Option<&mut Leadership> {
        match &mut self.state {
            RoleState::Leader(lead) => Some(lead),
            _ => None,
        }
    }

    /// This leader's state, or who leads as far as this node knows.
    fn require_leader(&mut self) -> Result<&mut Leadership, NotLeader> {
        let leader = self.leader;
        self.leadership_mut().ok_or(NotLeader { leader })
    }

    /// What must hold between any two inputs. Checked with debug assertions,
    /// which the test suite's `ci` profile turns on and releases leave off.
    pub(super) fn debug_check_invariants(&self) {
        let last = self.log.last_index();
        debug_assert!(self.log.committed() <= last, "commit {} past the last entry {last}", self.log.committed());
        debug_assert!(self.log.committed() >= self.log.log_start().index, "commit behind the snapshot");
        debug_assert!(self.term >= self.last_hard_state.term, "the term went back");
        debug_assert_eq!(self.is_leader(), self.leader == Some(self.cfg.id), "leader but not leading");
        debug_assert!(
            self.tracker.progresses().all(|(_, pr)| pr.matched < pr.next && pr.next <= last + 1),
            "progress out of bounds: {:?} (last {last})",
            self.tracker
        );
        debug_assert!(
            !self.is_leader()
                || self.tracker.progresses().map(|(id, _)| id).eq(self.log.membership().others(self.cfg.id)),
            "the leader does not track exactly the other members: {:?}",
            self.tracker
        );
        debug_assert_eq!(self.membership_followed, self.log.membership_generation(), "the tracker lags the log");
        debug_assert!(
            self.transfer_target().is_none_or(|to| self.log.membership().is_voter(to)),
            "transfer to {:?}, not a voter",
            self.transfer_target()
        );
    }

    /// Whether this node's vote counts (for itself as for others).
    fn is_voter(&self) -> bool {
        self.log.membership().is_voter(self.cfg.id)
    }

    /// Answers a request from an older term with ours, so a deposed leader or
    /// stale candidate steps down; stale replies are simply dropped.
    fn reply_to_stale(&mut self, m: &Message) {
        let body = match m.body {
            // No read round echoed: it belongs to an older leadership, and
            // every leadership counts its rounds from 1, so the echo could
            // confirm the newer one's reads without a quorum (found by the
            // simulator, with a leader that restarted).
            Body::AppendEntries { prev_log_index, .. }
            | Body::InstallSnapshot { snapshot: SnapshotMeta { index: prev_log_index, .. }, .. } => {
                Body::AppendEntriesReply {
                    success: false,
                    prev_log_index,
                    match_index: 0,
                    conflict_index: 0,
                    conflict_term: None,
                    read_seq: 0,
                }
            }
            Body::RequestVote { pre_vote, .. } => Body::RequestVoteReply { granted: false, pre_vote },
            _ => return,
        };
        self.persisted_messages.push(Message { from: self.cfg.id, to: m.from, term: self.term, body });
    }
}
