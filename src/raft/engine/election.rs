//! Elections: PreVote and the vote itself (§5.2, thesis §9.6), leader
//! stickiness (§4.2.3), and the role changes they lead to.

use log::{debug, info};

use super::{Leadership, Raft, RoleState};
use crate::raft::LogStore;
use crate::raft::message::{Body, Message};
use crate::raft::tracker::VoteResult;
use crate::raft::types::{Index, NodeId, Payload, Term};

/// What a campaign asks voters for (etcd's `CampaignType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Campaign {
    PreVote,
    Election,
    /// An election the leader asked for with `TimeoutNow`.
    Transfer,
}

impl<S: LogStore> Raft<S> {
    /// A tick on a node that does not lead: campaign once the election
    /// timeout passes without word from a leader. Learners and nodes outside
    /// the membership never campaign (a voter whose removal is pending is
    /// still in it).
    pub(super) fn tick_election(&mut self) {
        if self.election_elapsed < self.election_timeout {
            return;
        }
        if self.may_campaign() {
            self.campaign(if self.cfg.pre_vote { Campaign::PreVote } else { Campaign::Election });
        } else if self.log.membership().learners.contains(&self.cfg.id) {
            self.ask_if_still_a_member();
        }
    }

    pub(super) fn campaign(&mut self, campaign: Campaign) {
        if campaign == Campaign::PreVote {
            info!("node {}: election timeout; starting pre-vote for term {}", self.cfg.id, self.term + 1);
            self.enter(RoleState::PreCandidate);
        } else {
            self.term += 1;
            self.vote = Some(self.cfg.id);
            self.enter(RoleState::Candidate);
            info!("node {}: became candidate in term {}", self.cfg.id, self.term);
        }
        self.leader = None;
        self.start_election(campaign);
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

    pub(super) fn handle_request_vote(
        &mut self,
        m: &Message,
        last_log_index: Index,
        last_log_term: Term,
        pre_vote: bool,
    ) {
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

    pub(super) fn handle_vote_reply(&mut self, from: NodeId, granted: bool, pre_vote: bool) {
        let expected = match self.state {
            RoleState::PreCandidate => pre_vote,
            RoleState::Candidate => !pre_vote,
            _ => false,
        };
        if expected {
            self.tracker.record_vote(self.log.membership(), from, granted);
            self.tally_votes();
        }
    }

    fn tally_votes(&mut self) {
        match (self.tracker.vote_result(self.log.membership()), &self.state) {
            (VoteResult::Won, RoleState::PreCandidate) => self.campaign(Campaign::Election),
            (VoteResult::Won, RoleState::Candidate) => self.become_leader(),
            (VoteResult::Lost, _) => {
                info!("node {}: lost the election for term {}", self.cfg.id, self.term);
                self.become_follower(self.term, None);
            }
            _ => {}
        }
    }

    fn become_leader(&mut self) {
        info!("node {}: became leader in term {} (votes {:?})", self.cfg.id, self.term, self.tracker.votes());
        self.enter(RoleState::Leader(Leadership::new()));
        self.leader = Some(self.cfg.id);
        self.election_elapsed = 0;
        self.tracker.start_leading(self.log.membership(), self.log.last_index() + 1);
        // A no-op of our own term lets entries of earlier terms commit (§5.4.2).
        self.log.append(self.term, Payload::Noop);
    }

    pub(super) fn become_follower(&mut self, term: Term, leader: Option<NodeId>) {
        if term > self.term {
            self.term = term;
            self.vote = None;
        }
        let was_follower = matches!(self.state, RoleState::Follower);
        if !was_follower || self.leader != leader {
            info!("node {}: follower in term {}, leader {:?}", self.cfg.id, self.term, leader);
        }
        if !was_follower {
            self.randomize_election_timeout();
        }
        self.enter(RoleState::Follower);
        self.leader = leader;
        self.tracker.stop_leading();
    }

    /// Takes up a role. A leadership that ends takes its transfer with it
    /// and fails the reads it had not confirmed: another leader may have
    /// committed newer writes already.
    fn enter(&mut self, state: RoleState) {
        if let RoleState::Leader(ended) = std::mem::replace(&mut self.state, state) {
            self.failed_reads.extend(ended.pending_reads.into_iter().map(|r| r.ctx));
            self.failed_reads.extend(ended.reads_awaiting_commit);
        }
    }

    /// The leader asked us to take over, having caught our log up to its own:
    /// campaign now, without a pre-vote round (the leader is alive, so it
    /// would fail) and telling voters to disregard that leader's lease.
    /// Anything else claiming to be `TimeoutNow` is ignored: after `step`'s
    /// term rules, only our current leader in our current term qualifies.
    pub(super) fn handle_timeout_now(&mut self, from: NodeId) {
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
    pub(super) fn in_leader_lease(&self, pre_vote: bool) -> bool {
        (pre_vote || self.cfg.check_quorum)
            && self.leader.is_some()
            && self.election_elapsed < self.cfg.election_ticks.0
    }

    /// A voter may campaign, and so may a voter whose removal is in the log
    /// but not committed: its log may be the only one that can commit it,
    /// as when the leader that proposed it crashed (thesis §4.2.2). It wins
    /// by the votes of the membership that leaves it out, its own not
    /// counted, and hands over once the removal commits.
    pub(super) fn may_campaign(&self) -> bool {
        self.is_voter()
            || (self.log.membership_index() > self.log.committed()
                && self.log.committed_membership().is_voter(self.cfg.id))
    }

    pub(super) fn randomize_election_timeout(&mut self) {
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
