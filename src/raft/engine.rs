//! The Raft state machine: Figure 2 of the Raft paper, plus PreVote,
//! CheckQuorum and leader stickiness (thesis §9.6, §6.2, §4.2.3), leadership
//! transfer (§3.10), ReadIndex reads (§6.4) and the fast conflict back-off
//! (§5.3).
//!
//! One entry point per kind of input (`tick`, `step`, `propose`,
//! `read_index`, `transfer_leadership`); term rules are applied once in `step`, before the body is
//! looked at; every other rule lives in exactly one handler.

use std::collections::VecDeque;

use log::{debug, error, info};

use super::log_store::LogStore;
use super::membership::MembershipChange;
use super::message::{Body, Message};
use super::progress::Progress;
use super::raft_log::RaftLog;
use super::ready::{LogWrite, ReadState, Ready, Role, SoftState};
use super::tracker::{Tracker, VoteResult};
use super::types::{Entry, HardState, Index, Membership, NodeId, Payload, SnapshotInfo, SnapshotMeta, Term};

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

/// A leadership transfer in progress on the leader.
#[derive(Clone, Copy, Debug)]
struct Transfer {
    to: NodeId,
    /// Tick at which it started; it is abandoned one minimum election
    /// timeout later.
    since: u64,
}

/// What a campaign asks voters for (etcd's `CampaignType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Campaign {
    PreVote,
    Election,
    /// An election the leader asked for with `TimeoutNow`.
    Transfer,
}

/// A follower's refusal of an AppendEntries whose `prev_log_index` it does
/// not hold, with its hint where to resume.
#[derive(Clone, Copy, Debug)]
struct Rejection {
    prev_log_index: Index,
    conflict_index: Index,
    conflict_term: Option<Term>,
}

#[derive(Debug)]
struct PendingRead {
    ctx: u64,
    index: Index,
    seq: u64,
}

pub struct Raft<S> {
    cfg: CoreConfig,
    term: Term,
    vote: Option<NodeId>,
    role: Role,
    leader: Option<NodeId>,
    log: RaftLog<S>,
    /// The membership in force, the leader's view of each member and a
    /// campaign's votes: every quorum is counted there.
    tracker: Tracker,
    /// Only on the leader: the follower it is handing leadership to.
    transfer: Option<Transfer>,

    ticks: u64,
    election_elapsed: u64,
    heartbeat_elapsed: u64,
    election_timeout: u64,
    rng: u64,
    heartbeat_due: bool,

    /// Number of ReadIndex rounds started; AppendEntries carry it and
    /// replies echo it, so one heartbeat round confirms a whole batch of reads.
    read_seq: u64,
    pending_reads: VecDeque<PendingRead>,
    /// Reads that arrived before this leader committed an entry of its own
    /// term: until then it does not know the true commit index (§6.4 step 1).
    reads_awaiting_commit: Vec<u64>,

    messages: Vec<Message>,
    persisted_messages: Vec<Message>,
    read_states: Vec<ReadState>,
    failed_reads: Vec<u64>,
    last_hard_state: HardState,
    last_soft_state: Option<SoftState>,
    /// A member said a committed membership removed this node.
    removed: bool,
    /// The log's membership generation the tracker follows, and the one
    /// the shell was last told of (0: not even the first).
    membership_followed: u64,
    membership_reported: u64,
    /// Last entry handed out by `ready`, made stable by `advance`.
    handed_out: Option<(Index, Term)>,
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
            role: Role::Follower,
            leader: None,
            last_hard_state: HardState { commit: log.committed(), ..hard_state },
            log,
            tracker,
            transfer: None,
            ticks: 0,
            election_elapsed: 0,
            heartbeat_elapsed: 0,
            election_timeout: 0,
            rng: cfg.seed ^ 0x9E37_79B9_7F4A_7C15,
            heartbeat_due: false,
            read_seq: 0,
            pending_reads: VecDeque::new(),
            reads_awaiting_commit: Vec::new(),
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
        if self.role != Role::Leader {
            // Learners and nodes outside the membership never campaign
            // (a voter whose removal is pending is still in it).
            if self.election_elapsed >= self.election_timeout {
                if self.may_campaign() {
                    self.campaign(if self.cfg.pre_vote { Campaign::PreVote } else { Campaign::Election });
                } else if self.log.membership().learners.contains(&self.cfg.id) {
                    self.ask_if_still_a_member();
                }
            }
            return;
        }
        if let Some(Transfer { to, since }) = self.transfer
            && self.ticks - since >= self.cfg.election_ticks.0
        {
            self.transfer = None;
            if !self.is_voter() {
                info!("node {}: handing over to {} timed out; removed, so stepping down", self.cfg.id, to);
                self.become_follower(self.term, None);
                return;
            }
            info!("node {}: leadership transfer to {} timed out; leading on in term {}", self.cfg.id, to, self.term);
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
        self.heartbeat_elapsed += 1;
        if self.heartbeat_elapsed >= self.cfg.heartbeat_ticks {
            self.heartbeat_elapsed = 0;
            self.heartbeat_due = true;
        }
        let now = self.ticks;
        let (append_timeout, snapshot_timeout) = (self.cfg.inflight_timeout(), self.cfg.snapshot_timeout());
        for pr in self.tracker.progresses_mut() {
            if pr.inflight_since.is_some_and(|sent| now - sent >= append_timeout) {
                pr.inflight_since = None;
            }
            if pr.pending_snapshot.is_some_and(|(_, sent)| now - sent >= snapshot_timeout) {
                pr.pending_snapshot = None;
            }
        }
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
                let rejection = (!success).then_some(Rejection { prev_log_index, conflict_index, conflict_term });
                self.handle_append_reply(m.from, match_index, rejection, read_seq)
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
        self.require_leader()?;
        if self.transfer.is_some() {
            return Err(NotLeader { leader: None });
        }
        let index = self.log.append(self.term, Payload::Command(command));
        Ok((index, self.term))
    }

    /// Starts a linearizable read tagged `ctx`. It comes back in
    /// `Ready::read_states` once leadership is confirmed by a majority, or in
    /// `Ready::failed_reads` if leadership is lost first.
    pub fn read_index(&mut self, ctx: u64) -> Result<(), NotLeader> {
        self.require_leader()?;
        if self.committed_in_current_term() {
            self.start_read(ctx);
        } else {
            self.reads_awaiting_commit.push(ctx);
        }
        Ok(())
    }

    /// Hands leadership to `to` (thesis §3.10): proposals stop, `to` is
    /// caught up, then told to campaign at once with `TimeoutNow`. Abandoned
    /// if no new leader has taken over within one minimum election timeout;
    /// a later call replaces the pending transfer.
    pub fn transfer_leadership(&mut self, to: NodeId) -> Result<(), TransferError> {
        self.require_leader().map_err(TransferError::NotLeader)?;
        if to == self.cfg.id || !self.log.membership().is_voter(to) {
            return Err(TransferError::NotAPeer(to));
        }
        info!("node {}: transferring leadership to {} in term {}", self.cfg.id, to, self.term);
        self.transfer = Some(Transfer { to, since: self.ticks });
        self.send_timeout_now_if_caught_up();
        Ok(())
    }

    /// Proposes a membership change (see [`super::membership`]); `context`
    /// becomes the new membership's shell data. Returns the index of the
    /// membership entry, which takes effect at once and is committed like
    /// any other. A leader that removes itself hands leadership to the most
    /// up-to-date voter once the change is committed, and steps down.
    pub fn change_membership(&mut self, change: MembershipChange, context: Vec<u8>) -> Result<Index, ChangeError> {
        self.require_leader().map_err(ChangeError::NotLeader)?;
        if self.transfer.is_some() {
            return Err(ChangeError::Busy("leadership is being transferred"));
        }
        if !self.committed_in_current_term() {
            return Err(ChangeError::Busy("the new leader has not committed an entry of its term yet"));
        }
        if self.log.membership_index() > self.log.committed() {
            return Err(ChangeError::Busy("another membership change is not committed yet"));
        }
        let next = change.apply_to(self.log.membership(), context).map_err(ChangeError::Invalid)?;
        info!("node {}: proposing {:?} in term {}", self.cfg.id, change, self.term);
        let index = self.log.append(self.term, Payload::Membership(next));
        self.membership_may_have_changed();
        Ok(index)
    }

    /// The transport gave up on the request in flight to `peer`: allow the
    /// next one to go out right away instead of waiting for the timeout (the
    /// transport paces failures that come back at once).
    pub fn peer_unreachable(&mut self, peer: NodeId) {
        if let Some(pr) = self.tracker.progress_mut(peer) {
            pr.inflight_since = None;
            pr.pending_snapshot = None;
        }
    }

    // ----- outputs --------------------------------------------------------

    pub fn has_ready(&self) -> bool {
        (self.role == Role::Leader && self.tracker.progresses().any(|(_, pr)| self.wants_append(pr)))
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
        if self.role == Role::Leader {
            self.send_appends();
        }
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

    fn maybe_commit_as_leader(&mut self) {
        if self.role == Role::Leader {
            self.maybe_commit();
        }
    }

    // ----- observers ------------------------------------------------------

    pub fn id(&self) -> NodeId {
        self.cfg.id
    }

    pub fn soft_state(&self) -> SoftState {
        SoftState { role: self.role, term: self.term, leader: self.leader }
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

    /// On the leader: the voter that can take over soonest, i.e. the one
    /// holding the most of the log, preferring those recently heard from.
    pub fn transfer_candidate(&self) -> Option<NodeId> {
        if self.role != Role::Leader {
            return None;
        }
        let voters = &self.log.membership().voters;
        self.tracker
            .progresses()
            .filter(|(id, _)| voters.contains(id))
            .max_by_key(|(_, pr)| (pr.matched, pr.recent_active))
            .map(|(id, _)| id)
    }

    /// On the leader: what it knows of member `id`'s log.
    pub fn progress(&self, id: NodeId) -> Option<&Progress> {
        self.tracker.progress(id)
    }

    /// The follower a pending leadership transfer goes to.
    pub fn transfer_target(&self) -> Option<NodeId> {
        self.transfer.map(|t| t.to)
    }

    // ----- elections ------------------------------------------------------

    fn campaign(&mut self, campaign: Campaign) {
        if campaign == Campaign::PreVote {
            info!("node {}: election timeout; starting pre-vote for term {}", self.cfg.id, self.term + 1);
            self.role = Role::PreCandidate;
        } else {
            self.term += 1;
            self.vote = Some(self.cfg.id);
            self.role = Role::Candidate;
            info!("node {}: became candidate in term {}", self.cfg.id, self.term);
        }
        self.leader = None;
        self.start_election(campaign);
    }

    /// A learner that has not heard from a leader for an election timeout
    /// may have been removed while it was away, and no leader replicates to
    /// a removed node: it sends the voters a pre-vote request, which changes
    /// nothing (a learner counts no votes), but which members answer
    /// with `Removed` once its removal is committed, as for a removed voter.
    fn ask_if_still_a_member(&mut self) {
        self.election_elapsed = 0;
        self.randomize_election_timeout();
        debug!("node {}: learner without a leader for an election timeout; asking the voters", self.cfg.id);
        let body = Body::RequestVote {
            last_log_index: self.log.last_index(),
            last_log_term: self.log.last_term(),
            pre_vote: true,
            transfer: false,
        };
        let voters: Vec<NodeId> = self.log.membership().other_voters(self.cfg.id).collect();
        for to in voters {
            self.messages.push(Message { from: self.cfg.id, to, term: self.term + 1, body: body.clone() });
        }
    }

    fn start_election(&mut self, campaign: Campaign) {
        self.election_elapsed = 0;
        self.randomize_election_timeout();
        self.tracker.start_campaign();
        let pre_vote = campaign == Campaign::PreVote;
        let term = if pre_vote { self.term + 1 } else { self.term };
        let body = Body::RequestVote {
            last_log_index: self.log.last_index(),
            last_log_term: self.log.last_term(),
            pre_vote,
            transfer: campaign == Campaign::Transfer,
        };
        // The vote for ourselves must be durable before we ask for others'.
        let voters: Vec<NodeId> = self.log.membership().other_voters(self.cfg.id).collect();
        for to in voters {
            self.persisted_messages.push(Message { from: self.cfg.id, to, term, body: body.clone() });
        }
        self.tally_votes();
    }

    fn handle_request_vote(&mut self, m: &Message, last_log_index: Index, last_log_term: Term, pre_vote: bool) {
        let can_vote = self.vote == Some(m.from)
            || (self.vote.is_none() && self.leader.is_none())
            || (pre_vote && m.term > self.term);
        // Granted on the log alone, whatever our membership says of the
        // candidate (thesis §4.1): it may have appended a membership we have
        // not (its promotion, say), and the candidate counts only the votes
        // of its own voters. A learner never campaigns; its requests only
        // ask whether it is still a member.
        let granted = can_vote && self.log.is_up_to_date(last_log_term, last_log_index);
        if granted && !pre_vote {
            self.vote = Some(m.from);
            self.election_elapsed = 0;
        }
        info!(
            candidate = m.from, term = m.term, granted, pre_vote;
            "node {}: {} {}vote to {} for term {} (its last log {}/{}, ours {}/{})",
            self.cfg.id,
            if granted { "granted" } else { "rejected" },
            if pre_vote { "pre-" } else { "" },
            m.from,
            m.term,
            last_log_term,
            last_log_index,
            self.log.last_term(),
            self.log.last_index()
        );
        // A granted pre-vote answers in the candidate's future term; anything
        // else carries ours so a stale candidate learns it is behind.
        let term = if granted { m.term } else { self.term };
        self.persisted_messages.push(Message {
            from: self.cfg.id,
            to: m.from,
            term,
            body: Body::RequestVoteReply { granted, pre_vote },
        });
    }

    fn handle_vote_reply(&mut self, from: NodeId, granted: bool, pre_vote: bool) {
        let expected = match self.role {
            Role::PreCandidate => pre_vote,
            Role::Candidate => !pre_vote,
            _ => false,
        };
        if expected {
            self.tracker.record_vote(self.log.membership(), from, granted);
            self.tally_votes();
        }
    }

    fn tally_votes(&mut self) {
        match (self.tracker.vote_result(self.log.membership()), self.role) {
            (VoteResult::Won, Role::PreCandidate) => self.campaign(Campaign::Election),
            (VoteResult::Won, Role::Candidate) => self.become_leader(),
            (VoteResult::Lost, _) => {
                info!("node {}: lost the election for term {}", self.cfg.id, self.term);
                self.become_follower(self.term, None);
            }
            _ => {}
        }
    }

    fn become_leader(&mut self) {
        info!("node {}: became leader in term {} (votes {:?})", self.cfg.id, self.term, self.tracker.votes());
        self.role = Role::Leader;
        self.leader = Some(self.cfg.id);
        self.election_elapsed = 0;
        self.heartbeat_elapsed = 0;
        self.heartbeat_due = true;
        self.tracker.start_leading(self.log.membership(), self.log.last_index() + 1);
        // A no-op of our own term lets entries of earlier terms commit (§5.4.2).
        self.log.append(self.term, Payload::Noop);
    }

    fn become_follower(&mut self, term: Term, leader: Option<NodeId>) {
        if term > self.term {
            self.term = term;
            self.vote = None;
        }
        if self.role != Role::Follower || self.leader != leader {
            info!("node {}: follower in term {}, leader {:?}", self.cfg.id, self.term, leader);
        }
        if self.role != Role::Follower {
            self.randomize_election_timeout();
        }
        self.role = Role::Follower;
        self.leader = leader;
        self.tracker.stop_leading();
        self.transfer = None;
        self.failed_reads.extend(self.pending_reads.drain(..).map(|r| r.ctx));
        self.failed_reads.append(&mut self.reads_awaiting_commit);
    }

    /// The leader asked us to take over, having caught our log up to its own:
    /// campaign now, without a pre-vote round (the leader is alive, so it
    /// would fail) and telling voters to disregard that leader's lease.
    /// Anything else claiming to be `TimeoutNow` is ignored: after `step`'s
    /// term rules, only our current leader in our current term qualifies.
    fn handle_timeout_now(&mut self, from: NodeId) {
        if self.leader != Some(from) || !self.is_voter() {
            debug!("node {}: ignoring TimeoutNow from {}, not our leader", self.cfg.id, from);
            return;
        }
        info!("node {}: leader {} hands over leadership; campaigning in term {}", self.cfg.id, from, self.term + 1);
        self.campaign(Campaign::Transfer);
    }

    /// Nodes that heard from a leader within the minimum election timeout
    /// ignore vote requests, so a node rejoining from a partition cannot
    /// depose a healthy leader (§4.2.3). A transfer election is exempt: that
    /// leader asked for it. Pre-votes always respect the lease (§9.6: grant
    /// one only if no leader was heard from recently); real votes only with
    /// CheckQuorum, which makes a leader that lost its majority give up its
    /// lease — without it, a cut-off leader would keep blocking elections.
    fn in_leader_lease(&self, pre_vote: bool) -> bool {
        (pre_vote || self.cfg.check_quorum)
            && self.leader.is_some()
            && self.election_elapsed < self.cfg.election_ticks.0
    }

    // ----- replication ----------------------------------------------------

    fn handle_append_entries(
        &mut self,
        from: NodeId,
        prev_log_index: Index,
        prev_log_term: Term,
        entries: Vec<Entry>,
        leader_commit: Index,
        read_seq: u64,
    ) {
        if !self.follow(from) {
            return;
        }
        let reply = |this: &mut Raft<S>, success, match_index, conflict_index, conflict_term| {
            this.persisted_messages.push(Message {
                from: this.cfg.id,
                to: from,
                term: this.term,
                body: Body::AppendEntriesReply {
                    success,
                    prev_log_index,
                    match_index,
                    conflict_index,
                    conflict_term,
                    read_seq,
                },
            });
        };
        if prev_log_index < self.log.log_start().index {
            // Our snapshot covers `prev`: everything up to our commit index is
            // committed, hence in the leader's log too (Leader Completeness).
            let committed = self.log.committed();
            return reply(self, true, committed, 0, None);
        }
        match self.log.term(prev_log_index) {
            None => {
                let next = self.log.last_index() + 1;
                reply(self, false, 0, next, None);
            }
            Some(term) if term != prev_log_term => {
                let first = self.log.first_index_of_term_at(prev_log_index);
                reply(self, false, 0, first, Some(term));
            }
            Some(_) => {
                let last_new = prev_log_index + entries.len() as Index;
                if let Err(index) = self.log.merge(entries) {
                    // Two leaders disagree on a committed entry: a bug or a
                    // forgery. Acting on it would break state machine safety.
                    error!(
                        "node {}: leader {} tried to overwrite committed entry {} (commit {}); ignoring its message",
                        self.cfg.id,
                        from,
                        index,
                        self.log.committed()
                    );
                    return;
                }
                self.membership_may_have_changed();
                // Only what this message verified may be committed: our log
                // past `last_new` might still diverge from the leader's.
                self.log.commit_to(leader_commit.min(last_new));
                reply(self, true, last_new, 0, None);
            }
        }
    }

    /// A message only a leader sends came from `from` in our term: follow it
    /// and hold off elections. False if we lead this term ourselves, which
    /// only a bug or a forgery can cause.
    fn follow(&mut self, from: NodeId) -> bool {
        if self.role == Role::Leader {
            error!("node {}: two leaders in term {} (other: {}); ignoring", self.cfg.id, self.term, from);
            return false;
        }
        if self.role != Role::Follower || self.leader != Some(from) {
            self.become_follower(self.term, Some(from));
        }
        self.election_elapsed = 0;
        true
    }

    /// A snapshot from the leader, already received and checked by the
    /// shell: install it unless our log already covers it.
    fn handle_install_snapshot(&mut self, from: NodeId, install: SnapshotInfo) {
        if !self.follow(from) {
            return;
        }
        let snapshot = install.meta;
        let match_index = if snapshot.index <= self.log.committed() {
            self.log.committed()
        } else if self.log.term(snapshot.index) == Some(snapshot.term) {
            // We hold its last entry, hence every entry before it: they are committed.
            self.log.commit_to(snapshot.index);
            snapshot.index
        } else {
            info!(
                "node {}: installing snapshot {}/{} from leader {} (our log ends at {})",
                self.cfg.id,
                snapshot.index,
                snapshot.term,
                from,
                self.log.last_index()
            );
            self.log.restore(install);
            self.membership_may_have_changed();
            snapshot.index
        };
        self.persisted_messages.push(Message {
            from: self.cfg.id,
            to: from,
            term: self.term,
            body: Body::AppendEntriesReply {
                success: true,
                prev_log_index: snapshot.index,
                match_index,
                conflict_index: 0,
                conflict_term: None,
                read_seq: 0,
            },
        });
    }

    fn handle_append_reply(&mut self, from: NodeId, match_index: Index, rejection: Option<Rejection>, read_seq: u64) {
        if self.role != Role::Leader {
            return;
        }
        let last = self.log.last_index();
        let Some(pr) = self.tracker.progress_mut(from) else { return };
        pr.recent_active = true;
        pr.inflight_since = None;
        // A reply cannot acknowledge a read round that has not started.
        pr.read_acked = pr.read_acked.max(read_seq.min(self.read_seq));
        match rejection {
            None => {
                if pr.on_success(match_index.min(last)) {
                    self.maybe_commit();
                }
                if self.transfer.is_some_and(|t| t.to == from) {
                    self.send_timeout_now_if_caught_up();
                }
                self.promote_caught_up_learners();
            }
            // No hint: the follower answered a request from an older term.
            Some(Rejection { conflict_index: 0, .. }) => {}
            Some(Rejection { prev_log_index, conflict_index, conflict_term }) => {
                // Skip the follower's whole conflicting term at once; if we have
                // entries of that term, resume right after our last one of it.
                let next = conflict_term
                    .and_then(|t| self.log.last_index_of_term(t).map(|i| i + 1))
                    .unwrap_or(conflict_index)
                    .min(last + 1);
                let pr = self.tracker.progress_mut(from).expect("checked above");
                if pr.on_reject(prev_log_index, next) {
                    info!(
                        "node {}: follower {} no longer holds entry {} it had acknowledged \
                         (its state was lost?); replicating to it from {}",
                        self.cfg.id, from, prev_log_index, pr.next
                    );
                }
            }
        }
        self.confirm_reads();
    }

    fn wants_append(&self, pr: &Progress) -> bool {
        pr.inflight_since.is_none()
            && pr.pending_snapshot.is_none()
            && (self.heartbeat_due
                || pr.next <= self.log.last_index()
                || pr.commit_sent < self.log.committed()
                || (!self.pending_reads.is_empty() && pr.read_acked < self.read_seq))
    }

    /// One AppendEntries to every follower that is not waiting on one and has
    /// something to learn; all proposals since the last round go in it.
    fn send_appends(&mut self) {
        let wanting: Vec<NodeId> =
            self.tracker.progresses().filter(|(_, pr)| self.wants_append(pr)).map(|(id, _)| id).collect();
        for to in wanting {
            let pr = self.tracker.progress(to).expect("listed above");
            let prev_log_index = pr.next - 1;
            let body = match self.log.term(prev_log_index) {
                Some(prev_log_term) => Body::AppendEntries {
                    prev_log_index,
                    prev_log_term,
                    entries: self.log.entries_from(pr.next, self.cfg.max_append_bytes),
                    leader_commit: self.log.committed(),
                    read_seq: self.read_seq,
                },
                // What the follower needs next was compacted away.
                None => {
                    let SnapshotInfo { meta, membership } = self.log.newest_snapshot();
                    Body::InstallSnapshot { snapshot: meta, membership }
                }
            };
            let pr = self.tracker.progress_mut(to).expect("listed above");
            if let Body::InstallSnapshot { snapshot, .. } = &body {
                info!("node {}: sending snapshot {}/{} to {}", self.cfg.id, snapshot.index, snapshot.term, to);
                pr.pending_snapshot = Some((snapshot.index, self.ticks));
            }
            pr.inflight_since = Some(self.ticks);
            pr.commit_sent = self.log.committed();
            // The leader may send before its own write is durable (thesis
            // §10.2.1): it counts itself toward commit only once it is.
            self.messages.push(Message { from: self.cfg.id, to, term: self.term, body });
        }
        self.heartbeat_due = false;
    }

    /// Tells the transferee to campaign once it holds our whole log, so that
    /// it wins on the up-to-date check. Proposals are refused meanwhile, so
    /// `last_index` stands still. `TimeoutNow` takes the follower's request
    /// slot like an AppendEntries would: the transport keeps one request per
    /// peer in flight and only the newest of those queued behind it, so an
    /// append right after would replace it.
    fn send_timeout_now_if_caught_up(&mut self) {
        let Some(Transfer { to, .. }) = self.transfer else { return };
        let (last, now) = (self.log.last_index(), self.ticks);
        let pr = self.tracker.progress_mut(to).expect("the transferee is a member");
        if pr.matched == last {
            pr.inflight_since = Some(now);
            self.messages.push(Message { from: self.cfg.id, to, term: self.term, body: Body::TimeoutNow });
        }
    }

    /// Commits the highest index stored on a majority, but only if it is from
    /// the current term; older entries commit with it (Figure 8).
    fn maybe_commit(&mut self) {
        let index = self.tracker.committed(self.log.membership(), self.log.stable());
        if index <= self.log.committed() || self.log.term(index) != Some(self.term) {
            return;
        }
        let first_in_term = !self.committed_in_current_term();
        self.log.commit_to(index);
        if first_in_term {
            for ctx in std::mem::take(&mut self.reads_awaiting_commit) {
                self.start_read(ctx);
            }
        }
        self.hand_over_if_removed();
    }

    // ----- membership -----------------------------------------------------

    /// The log's newest membership is the one in force: called whenever the
    /// log may have gained or lost a membership entry. Only a leader (by its
    /// own proposal, never during a transfer) or a follower (from its
    /// leader) gets here: a candidate's log does not change.
    fn membership_may_have_changed(&mut self) {
        debug_assert!(matches!(self.role, Role::Leader | Role::Follower), "{:?}", self.role);
        let generation = self.log.membership_generation();
        if self.membership_followed == generation {
            return;
        }
        self.membership_followed = generation;
        let membership = self.log.membership();
        info!(
            "node {}: membership from entry {}: voters {:?}, learners {:?}",
            self.cfg.id,
            self.log.membership_index(),
            membership.voters,
            membership.learners
        );
        if self.role == Role::Leader {
            self.tracker.membership_changed(membership, self.log.last_index() + 1);
        }
    }

    /// A leader whose removal is committed hands leadership to the most
    /// up-to-date voter (like a transfer: it catches that voter up, then
    /// sends `TimeoutNow`), so the cluster goes on without waiting out an
    /// election timeout. Should the transfer time out, it just steps down.
    fn hand_over_if_removed(&mut self) {
        if self.role != Role::Leader
            || self.is_voter()
            || self.transfer.is_some()
            || self.log.committed() < self.log.membership_index()
        {
            return;
        }
        let to = self.transfer_candidate().expect("a membership always keeps a voter");
        info!("node {}: removed from the cluster; handing leadership to {} in term {}", self.cfg.id, to, self.term);
        self.transfer = Some(Transfer { to, since: self.ticks });
        self.send_timeout_now_if_caught_up();
    }

    /// Promotes a learner that was added to become a voter once it has caught
    /// up (thesis §4.2.1): it is replicated to in rounds, each up to the
    /// leader's last index when the round began; when a round completes
    /// within a minimum election timeout, the learner is close enough that
    /// making it a voter will not stall commits, and the leader proposes it.
    /// Leaders only: called on their ticks and their followers' replies.
    fn promote_caught_up_learners(&mut self) {
        debug_assert_eq!(self.role, Role::Leader);
        if self.log.membership().promote.is_empty() {
            return;
        }
        let (last, now, round) = (self.log.last_index(), self.ticks, self.cfg.election_ticks.0);
        let learners: Vec<NodeId> = self.log.membership().promote.iter().copied().collect();
        for id in learners {
            let Some(pr) = self.tracker.progress_mut(id) else { continue };
            match pr.catch_up {
                Some((target, started)) if pr.matched >= target && now - started < round => {
                    let context = self.log.membership().context.clone();
                    match self.change_membership(MembershipChange::Promote(id), context) {
                        Ok(index) => {
                            info!("node {}: learner {id} caught up; promoting it (entry {index})", self.cfg.id)
                        }
                        Err(e) => debug!("node {}: learner {id} caught up, not promoted yet: {e:?}", self.cfg.id),
                    }
                    return;
                }
                Some((target, _)) if pr.matched < target => {}
                _ => pr.catch_up = Some((last, now)),
            }
        }
    }

    // ----- reads ----------------------------------------------------------

    fn committed_in_current_term(&self) -> bool {
        self.log.term(self.log.committed()) == Some(self.term)
    }

    fn start_read(&mut self, ctx: u64) {
        self.read_seq += 1;
        self.pending_reads.push_back(PendingRead { ctx, index: self.log.committed(), seq: self.read_seq });
        self.confirm_reads();
    }

    /// Releases every read whose round a majority (ourselves included) has
    /// acknowledged in this term.
    fn confirm_reads(&mut self) {
        let confirmed = self.tracker.read_confirmed(self.log.membership());
        while self.pending_reads.front().is_some_and(|r| r.seq <= confirmed) {
            let read = self.pending_reads.pop_front().expect("checked");
            self.read_states.push(ReadState { ctx: read.ctx, index: read.index });
        }
    }

    // ----- helpers --------------------------------------------------------

    /// What must hold between any two inputs. Checked with debug assertions,
    /// which the test suite's `ci` profile turns on and releases leave off.
    fn debug_check_invariants(&self) {
        let last = self.log.last_index();
        debug_assert!(self.log.committed() <= last, "commit {} past the last entry {last}", self.log.committed());
        debug_assert!(self.log.committed() >= self.log.log_start().index, "commit behind the snapshot");
        debug_assert!(self.term >= self.last_hard_state.term, "the term went back");
        debug_assert_eq!(self.role == Role::Leader, self.leader == Some(self.cfg.id), "leader but not leading");
        debug_assert!(
            self.tracker.progresses().all(|(_, pr)| pr.matched < pr.next && pr.next <= last + 1),
            "progress out of bounds: {:?} (last {last})",
            self.tracker
        );
        debug_assert!(
            self.role != Role::Leader
                || self.tracker.progresses().map(|(id, _)| id).eq(self.log.membership().others(self.cfg.id)),
            "the leader does not track exactly the other members: {:?}",
            self.tracker
        );
        debug_assert_eq!(self.membership_followed, self.log.membership_generation(), "the tracker lags the log");
        debug_assert!(
            self.transfer.is_none_or(|t| self.role == Role::Leader && self.log.membership().is_voter(t.to)),
            "transfer to {:?}, not a voter or not leading",
            self.transfer
        );
    }

    /// Whether this node's vote counts (for itself as for others).
    fn is_voter(&self) -> bool {
        self.log.membership().is_voter(self.cfg.id)
    }

    /// A voter may campaign, and so may a voter whose removal is in the log
    /// but not committed: its log may be the only one that can commit it,
    /// as when the leader that proposed it crashed (thesis §4.2.2). It wins
    /// by the votes of the membership that leaves it out, its own not
    /// counted, and hands over once the removal commits.
    fn may_campaign(&self) -> bool {
        self.is_voter()
            || (self.log.membership_index() > self.log.committed()
                && self.log.committed_membership().is_voter(self.cfg.id))
    }

    fn require_leader(&self) -> Result<(), NotLeader> {
        match self.role {
            Role::Leader => Ok(()),
            _ => Err(NotLeader { leader: self.leader }),
        }
    }

    fn hard_state_changed(&self) -> bool {
        self.term != self.last_hard_state.term || self.vote != self.last_hard_state.vote
    }

    /// Answers a request from an older term with ours, so a deposed leader or
    /// stale candidate steps down; stale replies are simply dropped.
    fn reply_to_stale(&mut self, m: &Message) {
        let body = match m.body {
            // No read round echoed: it belongs to an older leadership, and a
            // leader that restarted counts its rounds from 1 again, so the
            // echo could confirm its new reads without a quorum (found by
            // the simulator).
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

    fn randomize_election_timeout(&mut self) {
        let (min, max) = self.cfg.election_ticks;
        self.election_timeout = min + self.next_random() % (max - min).max(1);
    }

    /// splitmix64: tiny, fast and fully determined by the seed.
    fn next_random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}
